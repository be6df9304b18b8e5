"""A model folder is a sealed unit: SEAL.json lists the SHA-256 of every file the loader reads, checked at every load.

Without PyTorch (the light install checks the bundled model with it): hashlib, json and pathlib only.

Sealed: the files a loader reads from the folder, found by name, not by what model.json says (so a model.json that
drops a file from its description cannot drop it from the seal):

    model.json, detector.json                       the descriptions
    *.safetensors                                   weights, OOD statistics
    *.onnx, *.onnx.json                             ONNX exports and their sidecars
    STEM.json beside a STEM.safetensors             a checkpoint's description when it is not model.json
    any other file named by model.json / detector.json / a sidecar (ood.file, onnx.file, weights)

Not sealed: what a loader never reads (MODEL_CARD.md and other cards, which are rebuilt from the sealed model.json,
metrics.json, reports, figures, history.csv, checkpoints/ and other folders). They may change freely.

`verify(folder)` raises ModelError with one line naming the first file that differs from the seal, is missing, or
is a sealed kind of file the seal does not list (added later). `seal(folder)` (re)writes SEAL.json; every writer of a
model folder calls it last, and `bloodcell model seal DIR` re-seals a folder edited on purpose, saying what changed.

Every file name read from model.json, detector.json or a sidecar must be a plain name inside the folder (no '/',
'\\', '..', absolute path or symlink leading out): `member(folder, name, key)` checks it before anything is opened.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from bloodcell.errors import ModelError

SEAL_FILE = "SEAL.json"
SEAL_FORMAT = "bloodcell-seal"
SEAL_FORMAT_VERSION = 1
DESCRIPTIONS = ("model.json", "detector.json")  # listed first: a changed description is the first thing named
SEALED_SUFFIXES = (".safetensors", ".onnx", ".onnx.json")
# keys of a description whose value names a file in the folder: (section or None, key)
FILE_KEYS = ((None, "weights"), ("ood", "file"), ("onnx", "file"))


def reseal_hint(folder: Path) -> str:
    return f"if the change is deliberate, run `bloodcell model seal {folder}`"


def member(folder: str | os.PathLike, name: Any, key: str, source: str | os.PathLike | None = None) -> Path:
    """`folder / name` for a file name read from a model's description under `key`; a one-line ModelError naming the
    key unless it is a plain file name whose path, symlinks resolved, stays inside the folder. Opens nothing.

    Args:
        folder: the model (or detector) folder the file must be in.
        name: the value read from the description; anything but a plain file name is refused.
        key: the description's key it was read under, named in the error.
        source: what the error names as the description; None: `folder`.
    """
    folder = Path(folder)
    where = source if source is not None else folder
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or os.path.isabs(name)
        or (len(name) > 1 and name[1] == ":")
    ):
        raise ModelError(f"{where}: {key} must be a plain file name inside {folder}, got {name!r}")
    path = folder / name
    base = folder.resolve()
    target = path.resolve()
    if target.parent != base:
        raise ModelError(f"{where}: {key} '{name}' leads outside {folder} (to {target}): refused")
    return path


def _description_names(folder: Path, description: Path) -> list[tuple[str, str]]:
    """(file name, key) pairs a description (model.json, detector.json, a sidecar) names, each checked by `member`."""
    try:
        meta = json.loads(description.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []  # not readable: sealed as bytes, and the loader says what is wrong with it
    if not isinstance(meta, dict):
        return []
    found = []
    for section, key in FILE_KEYS:
        holder = meta if section is None else meta.get(section)
        if not isinstance(holder, dict) or holder.get(key) in (None, ""):
            continue
        label = f"{description.name} {key if section is None else f'{section}.{key}'}"
        found.append((member(folder, holder[key], label).name, label))
    return found


def sealed_names(folder: str | os.PathLike) -> list[str]:
    """The files of `folder` a loader reads (see the module docstring): descriptions first, then sorted."""
    folder = Path(folder)
    try:
        present = sorted(p.name for p in folder.iterdir() if p.name != SEAL_FILE and (p.is_file() or p.is_symlink()))
    except OSError as exc:
        raise ModelError(f"model folder {folder} cannot be read ({exc.strerror or exc})") from None
    names = {n for n in present if n in DESCRIPTIONS or n.endswith(SEALED_SUFFIXES)}
    names |= {f"{n[: -len('.safetensors')]}.json" for n in present if n.endswith(".safetensors")} & set(present)
    for description in [n for n in sorted(names) if n.endswith(".json")]:
        names |= {n for n, _ in _description_names(folder, folder / description) if n in present}
    for name in names:
        member(folder, name, name)  # a symlink leading out of the folder is refused, whatever its name
    return [n for n in DESCRIPTIONS if n in names] + sorted(names - set(DESCRIPTIONS))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def read_seal(folder: str | os.PathLike) -> dict:
    """The manifest in folder/SEAL.json; a one-line ModelError when it is missing or malformed."""
    folder = Path(folder)
    path = folder / SEAL_FILE
    if not path.is_file():
        raise ModelError(
            f"model folder {folder} is not sealed (no {SEAL_FILE}): if you trust its files, "
            f"run `bloodcell model seal {folder}`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(
            f"model folder {folder}: {SEAL_FILE} is not valid JSON ({exc}); {reseal_hint(folder)}"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != SEAL_FORMAT:
        raise ModelError(
            f"model folder {folder}: {SEAL_FILE} is not a bloodcell seal (format '{SEAL_FORMAT}' expected)"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
        for v in files.values()
    ):
        raise ModelError(f"model folder {folder}: {SEAL_FILE} lacks a valid `files` table; {reseal_hint(folder)}")
    for name in files:
        member(folder, name, f"{SEAL_FILE} entry")
    return manifest


def changes(folder: str | os.PathLike, manifest: dict | None = None) -> list[dict]:
    """How the folder differs from its seal: [{file, change: changed/removed/added, old, new}] (sha256 or None), in
    the order verify reports them (descriptions first). `manifest` None: read SEAL.json (no seal: every file added)."""
    folder = Path(folder)
    if manifest is None:
        manifest = read_seal(folder) if (folder / SEAL_FILE).exists() else {"files": {}}
    listed: dict = manifest["files"]
    now = sealed_names(folder)
    order = [n for n in DESCRIPTIONS if n in listed or n in now]
    order += sorted((set(listed) | set(now)) - set(order))
    out = []
    for name in order:
        old = listed.get(name)
        path = folder / name
        if name not in now:
            if old is not None:
                out.append({"file": name, "change": "removed", "old": old["sha256"], "new": None})
            continue
        entry = _entry(path)
        if old is None:
            out.append({"file": name, "change": "added", "old": None, "new": entry["sha256"]})
        elif entry["sha256"] != old["sha256"] or entry["size"] != old["size"]:
            out.append({"file": name, "change": "changed", "old": old["sha256"], "new": entry["sha256"]})
    return out


def verify(folder: str | os.PathLike) -> dict:
    """Check `folder` against its SEAL.json; return the manifest, or raise ModelError with one line naming the first
    file that changed, is missing, or was added (a sealed kind of file the seal does not list)."""
    folder = Path(folder)
    if not (folder / SEAL_FILE).exists() and not sealed_names(folder):
        return {"files": {}}  # no model here at all: the loader says what is missing
    manifest = read_seal(folder)
    found = changes(folder, manifest)
    if found:
        first = found[0]
        name = first["file"]
        if first["change"] == "changed":
            what = (
                f"{name} changed since it was sealed (sha256 {first['old'][:12]}... sealed, {first['new'][:12]}... now)"
            )
        elif first["change"] == "removed":
            what = f"{name} is missing (the seal lists it, sha256 {first['old'][:12]}...)"
        else:
            what = f"{name} was added after it was sealed (the seal does not list it)"
        more = f" and {len(found) - 1} more file{'s' if len(found) > 2 else ''} differ" if len(found) > 1 else ""
        raise ModelError(f"model folder {folder}: {what}{more}; {reseal_hint(folder)}")
    return manifest


def seal(folder: str | os.PathLike) -> dict:
    """(Re)write folder/SEAL.json from the files there now; return the manifest. Call it after writing a model."""
    from bloodcell import __version__
    from bloodcell.io import write_json

    folder = Path(folder)
    names = sealed_names(folder)
    if not names:
        raise ModelError(f"{folder}: nothing to seal (no model.json, detector.json, .safetensors or .onnx file)")
    manifest = {
        "format": SEAL_FORMAT,
        "format_version": SEAL_FORMAT_VERSION,
        "sealed_by": f"bloodcell {__version__}",
        "algorithm": "sha256",
        "files": {name: _entry(folder / name) for name in names},
    }
    write_json(folder / SEAL_FILE, manifest)
    return manifest


def reseal(folder: str | os.PathLike) -> tuple[dict, list[dict]]:
    """Seal a folder edited on purpose: (new manifest, what changed since the old seal; all 'added' if there was
    none)."""
    try:
        old = read_seal(folder)
    except ModelError:  # no seal, or a broken one: every file is new to it
        old = {"files": {}}
    found = changes(folder, old)
    return seal(folder), found


def is_sealed(folder: str | os.PathLike) -> bool:
    return (Path(folder) / SEAL_FILE).is_file()

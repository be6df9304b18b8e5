"""A checkpoint's metadata (model.json), without PyTorch: what the light inference install reads.

The weights half (load_checkpoint, save_checkpoint) lives in bloodcell.models.checkpoint and needs torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bloodcell.errors import ModelError

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
FORMAT = "bloodcell-checkpoint"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar"}


def _locate(path: Path) -> tuple[Path, Path]:
    """(weights file, metadata file) for a checkpoint folder or its .safetensors file."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ModelError(
            f"refusing to load {path}: pickle-based files can run code when loaded; "
            f"bloodcell checkpoints are a folder with {WEIGHTS_FILE} + {METADATA_FILE}"
        )
    if path.is_dir():
        return path / WEIGHTS_FILE, path / METADATA_FILE
    if path.suffix == ".safetensors":
        beside = path.with_suffix(".json")
        return path, beside if beside.is_file() else path.parent / METADATA_FILE
    if not path.exists():
        raise ModelError(f"checkpoint not found: {path}")
    raise ModelError(f"{path} is not a checkpoint: expected a folder with {WEIGHTS_FILE} + {METADATA_FILE}")


def read_json_object(path: Path, required: tuple[str, ...], what: str = "") -> dict:
    """The JSON object in `path`, holding the `required` keys, or a one-line ModelError naming the file."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{what}{path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or any(key not in meta for key in required):
        raise ModelError(f"{what}{path} lacks {' / '.join(required)}")
    return meta


def read_metadata(path: str | os.PathLike) -> dict:
    """The model.json of a checkpoint (folder or .safetensors path), checked for the basics."""
    _, meta_path = _locate(Path(path))
    if not meta_path.is_file():
        raise ModelError(f"checkpoint metadata not found: {meta_path} (written by save_checkpoint)")
    meta = read_json_object(meta_path, ("model_name", "num_classes"), "checkpoint metadata ")
    names = meta.get("class_names")
    if names is not None and len(names) != meta["num_classes"]:
        raise ModelError(
            f"checkpoint metadata {meta_path} lists {len(names)} class_names but num_classes is {meta['num_classes']}"
        )
    return meta


def write_sealed_json(path: str | os.PathLike, meta: dict) -> Path:
    """Write a model folder's description (model.json, detector.json, an .onnx.json sidecar) and re-seal the folder
    (bloodcell.models.seal): every writer of a model folder goes through here, so no written model is left unsealed."""
    from bloodcell.io import write_json
    from bloodcell.models.seal import seal

    path = Path(path)
    write_json(path, meta)
    seal(path.parent)
    return path


def write_model_json(folder: str | os.PathLike, meta: dict) -> Path:
    """Write folder/model.json and re-seal the folder; see write_sealed_json."""
    return write_sealed_json(Path(folder) / METADATA_FILE, meta)


BUNDLED_MODEL = ("assets", "default_model")


def bundled_model_dir() -> Path:
    """The model shipped inside the package (bloodcell/assets/default_model), if this install has one."""
    from importlib import resources

    node = resources.files("bloodcell").joinpath(*BUNDLED_MODEL)
    try:
        path = Path(os.fspath(node))  # a regular install: a real folder
    except TypeError:
        path = None
    if path is None or not path.is_dir() or not any((path / f).is_file() for f in ("model.json", "model.onnx.json")):
        raise ModelError("no bundled model in this install: pass --model RUN_DIR")
    return path


def is_bloodcell_model(source: Any) -> bool:
    """True for 'default' (the bundled model) and for a folder holding a bloodcell model.json."""
    if isinstance(source, str) and source == "default":
        return True
    return isinstance(source, (str, os.PathLike)) and Path(source).is_dir() and (Path(source) / METADATA_FILE).is_file()


def preprocessing(meta: dict) -> dict:
    """How a model wants its images: model.json's `preprocess` section, else what its training config recorded."""
    data = (meta.get("training_config") or {}).get("data") or {}
    pre = meta.get("preprocess") or {}
    return {
        "input_size": pre.get("input_size", meta.get("input_size")),
        "interpolation": pre.get("interpolation") or data.get("interpolation") or "bilinear",
        "white_balance": pre.get("white_balance") or data.get("white_balance") or "none",
        "mean": meta.get("mean"),
        "std": meta.get("std"),
    }

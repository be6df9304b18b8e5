"""Find, validate and fingerprint the images of a dataset: a class-per-folder tree (ImageFolder / PBC layout) or a
CSV of `path,label[,group]`.

`scan(root)` walks `root/<class>/**` (or reads the CSV's rows), decodes every image once (in parallel), hashes its bytes
and returns an `Inventory`: readable images in dataset order (class, then path), files skipped with a reason, and groups
of byte-identical files. Per-file results are cached so a second scan only stats the files; a file is hashed again when
its size, mtime, ctime, inode or mode changed. ctime and inode matter: tools that copy or restore files (`cp -p`,
`rsync -t`, `touch -d`) can give new content the old size and mtime, but they cannot set ctime, and a replacement by
rename brings a new inode, so the scan does not reuse the hash of content that is gone. The one change it cannot see is
a rewrite within the same file-system clock tick (a few ms) as its own read that also keeps size and mtime (git's stat
cache has the same limit); deleting `<cache>/scans/` forces a full rescan.
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import os
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from rich.console import Console
from rich.table import Table

from bloodcell import io
from bloodcell.data.images import DEFAULT_MAX_PIXELS, UnreadableImage, is_image_name, open_rgb
from bloodcell.data.workers import exit_with_parent, pool_context
from bloodcell.errors import DataError
from bloodcell.progress import progress_bar

SCAN_VERSION = 2  # 2: entries also carry ctime and inode
# Below this many files a process pool costs more than it saves: its spawned workers take about 0.5 s to start, and
# one process checks about 2,000 images/s (docs/reliability.md)
_PARALLEL_MIN_FILES = 2048


@dataclass(frozen=True)
class ImageRecord:
    """One readable image. `relpath` is relative to the dataset root, '/'-separated."""

    relpath: str
    label: str
    sha256: str
    width: int
    height: int
    mode: str
    size_bytes: int
    mtime_ns: int
    group: str = ""  # a CSV's `group` (patient, slide, smear): all its images stay on one side of every split


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class Inventory:
    root: Path
    class_names: list[str]
    records: list[ImageRecord]
    skipped: list[Skipped]
    files: int
    ignored: list[Skipped] = field(default_factory=list)  # files at the root, outside any class folder
    empty_classes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    csv: Path | None = None  # the CSV the records came from (paths are relative to its folder, `root`)

    @property
    def has_groups(self) -> bool:
        return any(r.group for r in self.records)

    @property
    def labels(self) -> list[int]:
        index = {name: i for i, name in enumerate(self.class_names)}
        return [index[r.label] for r in self.records]

    def path(self, i: int) -> Path:
        return self.root / self.records[i].relpath

    def duplicate_groups(self) -> list[list[int]]:
        """Indices of byte-identical images, groups of two or more, in dataset order."""
        by_hash: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(self.records):
            by_hash[r.sha256].append(i)
        return [g for g in by_hash.values() if len(g) > 1]

    def conflicting_groups(self) -> list[list[int]]:
        """Duplicate groups whose members carry more than one label."""
        return [g for g in self.duplicate_groups() if len({self.records[i].label for i in g}) > 1]

    def fingerprint(self) -> str:
        """sha256 over (path, content hash) of every readable image: changes when any image changes."""
        h = hashlib.sha256()
        for r in self.records:  # a group only when given, so folder datasets keep the fingerprints they had
            h.update(f"{r.relpath}\0{r.label}\0{r.sha256}{chr(0) + r.group if r.group else ''}\n".encode())
        return h.hexdigest()

    def summary(self) -> dict:
        names = lambda group: [self.records[i].relpath for i in group]  # noqa: E731
        counts = Counter(r.label for r in self.records)
        return {
            "root": str(self.csv or self.root),
            "files": self.files,
            "images": len(self.records),
            "unreadable": [asdict(s) for s in self.skipped],
            "ignored": [asdict(s) for s in self.ignored],
            "classes": {name: counts.get(name, 0) for name in self.class_names},
            "empty_classes": self.empty_classes,
            "duplicate_groups": [names(g) for g in self.duplicate_groups()],
            "conflicting_groups": [names(g) for g in self.conflicting_groups()],
            "sizes": dict(Counter(f"{r.width}x{r.height}" for r in self.records).most_common()),
            "modes": dict(Counter(r.mode for r in self.records).most_common()),
            "groups": len({r.group for r in self.records if r.group}),
            "fingerprint": self.fingerprint(),
            "warnings": self.warnings,
        }


def default_cache_dir() -> Path:
    return Path(os.environ.get("BLOODCELL_CACHE", Path.home() / ".cache" / "bloodcell"))


def _stat_key(st: os.stat_result) -> list[int]:
    """What must be unchanged for a cached scan result to be reused (see the module docstring)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, st.st_mode]


def _probe(args: tuple[str, str, int]) -> tuple[str, dict | str, list[int] | None]:
    """Hash and fully decode one file: (path, record fields or a reason, stat key taken before reading)."""
    path, _, max_pixels = args
    st = None
    try:
        st = os.stat(path)
        with open(path, "rb") as fh:
            data = fh.read()
    except PermissionError:
        return path, "permission denied", _stat_key(st) if st else None
    except FileNotFoundError:
        return path, "broken symbolic link or file vanished", None
    except OSError as exc:
        return path, f"cannot read: {exc.strerror or exc}", None
    key = _stat_key(st)
    try:
        from PIL import Image  # noqa: F401  (imported here so worker processes import it once)

        img = open_rgb(data, max_pixels=max_pixels)
        del img
        with Image.open(_bytes_io(data)) as header:
            width, height, mode = header.size[0], header.size[1], header.mode
    except UnreadableImage as exc:
        return path, str(exc), key
    return (
        path,
        {
            "sha256": hashlib.sha256(data).hexdigest(),
            "width": width,
            "height": height,
            "mode": mode,
            "size_bytes": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        },
        key,
    )


def _bytes_io(data: bytes):
    return _io.BytesIO(data)


def _walk_files(class_dir: Path, root: Path, warnings: list[str], unlisted: list[Skipped]) -> Iterable[Path]:
    """Every file below class_dir, following symlinked folders once (symlink loops are reported, not followed).

    Folders that cannot be listed (permission denied) are added to `unlisted`: their files are unknown.
    """
    seen: set[tuple[int, int]] = set()
    stack = [class_dir]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
        except OSError as exc:
            warnings.append(f"{folder.relative_to(root).as_posix()}: cannot open folder ({exc.strerror or exc})")
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:
            warnings.append(f"{folder.relative_to(root).as_posix()}: symbolic link loop, not followed")
            continue
        seen.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            reason = "permission denied" if isinstance(exc, PermissionError) else f"cannot list ({exc.strerror or exc})"
            unlisted.append(
                Skipped(folder.relative_to(root).as_posix() + "/", f"{reason}: folder and its contents skipped")
            )
            continue
        for entry in entries:
            p = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                stack.append(p)
            else:
                yield p


def _load_scan_cache(cache_file: Path | None) -> dict:
    if cache_file is None or not cache_file.exists():
        return {}
    try:
        data = json.loads(cache_file.read_text())
        return data["entries"] if data.get("version") == SCAN_VERSION else {}
    except (OSError, ValueError, KeyError):
        return {}  # a damaged cache is only a slower scan


def scan(
    root: str | os.PathLike,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = "default",
) -> Inventory:
    """Walk `root/<class>/...` (or read the list in a `path,label[,group]` CSV), validate every file and return the
    Inventory.

    Args:
        root: the folder of class folders, or a CSV.
        max_pixels: a larger image is unreadable (refused before it is decoded).
        workers: processes that decode the images (None: one per core; a small folder is read in this process).
        progress: show a progress bar.
        cache_dir: where results per file are kept for the next scan; "default": $BLOODCELL_CACHE or
            ~/.cache/bloodcell; None: no cache.

    Raises DataError (one line, naming the path) when root is missing, is not a folder or holds no class folders.
    Unreadable files and empty class folders are reported in the Inventory, never raised.
    """
    root = Path(root).expanduser()
    if root.suffix.lower() == ".csv" and root.is_file():
        return _scan_entries(
            _csv_entries(root.resolve()), max_pixels=max_pixels, workers=workers, progress=progress, cache_dir=cache_dir
        )
    if not root.exists():
        raise DataError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"dataset path is not a folder or a .csv: {root}")
    root = root.resolve()
    warnings: list[str] = []
    skipped: list[Skipped] = []
    ignored: list[Skipped] = []
    files = 0
    class_dirs: list[Path] = []
    try:
        top = sorted(os.scandir(root), key=lambda e: e.name)
    except PermissionError:
        raise DataError(f"permission denied reading dataset folder: {root}") from None
    for entry in top:
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError as exc:  # e.g. a symbolic link loop: is_dir raises instead of answering
            ignored.append(Skipped(entry.name, f"cannot open ({exc.strerror or exc}), not used as a class folder"))
            continue
        if is_dir:
            if entry.name.startswith(".") or entry.name == "__MACOSX":
                warnings.append(f"{entry.name}/: hidden folder ignored")
            else:
                class_dirs.append(Path(entry.path))
        else:
            files += 1
            broken = entry.is_symlink() and not os.path.exists(entry.path)
            reason = (
                "broken symbolic link at dataset root" if broken else "file at dataset root, not inside a class folder"
            )
            ignored.append(Skipped(entry.name, reason))
    if not class_dirs:
        raise DataError(f"no class folders in {root} (expected one sub-folder of images per class)")

    to_probe: list[tuple[Path, str, str]] = []
    for class_dir in class_dirs:
        for p in _walk_files(class_dir, root, warnings, skipped):
            files += 1
            rel = p.relative_to(root).as_posix()
            if not is_image_name(p):
                skipped.append(Skipped(rel, f"not an image file type ({p.suffix or 'no extension'})"))
            else:
                to_probe.append((p, class_dir.name, ""))
    listing = _Listing(root, None, to_probe, [d.name for d in class_dirs], files, skipped, ignored, warnings)
    return _scan_entries(listing, max_pixels=max_pixels, workers=workers, progress=progress, cache_dir=cache_dir)


@dataclass
class _Listing:
    """What a dataset lists before any image is opened: (file, label, group) to check, and what was left out."""

    root: Path  # relpaths are relative to it
    csv: Path | None
    to_probe: list[tuple[Path, str, str]]
    classes: list[str]  # every class named (folders, or CSV labels), with images or not
    files: int
    skipped: list[Skipped]
    ignored: list[Skipped]
    warnings: list[str]


CSV_COLUMNS = ("path", "label", "group")


def _relpath(p: Path, root: Path) -> str:
    try:
        return p.relative_to(root).as_posix()
    except ValueError:  # a CSV may name files outside its folder: they keep their absolute path
        return p.as_posix()


def _csv_entries(csv_path: Path) -> _Listing:
    """Rows of `path,label[,group]` (a header row names the columns; paths relative to the CSV's folder or absolute)."""
    root = csv_path.parent
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read dataset CSV {csv_path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not rows:
        raise DataError(f"dataset CSV {csv_path} is empty (expected a header row: path,label[,group])")
    header = [h.strip().lower() for h in rows[0]]
    for column in ("path", "label"):
        if column not in header:
            raise DataError(
                f"dataset CSV {csv_path} has no '{column}' column "
                f"(header: {','.join(rows[0])}; expected path,label[,group])"
            )
    unknown = [h for h in header if h not in CSV_COLUMNS]
    if unknown:
        raise DataError(f"dataset CSV {csv_path}: unknown column '{unknown[0]}' (expected path,label[,group])")
    col = {name: header.index(name) for name in CSV_COLUMNS if name in header}
    to_probe: list[tuple[Path, str, str]] = []
    skipped: list[Skipped] = []
    seen: dict[str, int] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise DataError(f"dataset CSV {csv_path}, line {line}: {len(row)} fields, the header has {len(header)}")
        cells = {name: row[i].strip() for name, i in col.items()}
        if not cells["path"] or not cells["label"]:
            raise DataError(f"dataset CSV {csv_path}, line {line}: empty {'path' if not cells['path'] else 'label'}")
        p = Path(cells["path"]).expanduser()
        p = p if p.is_absolute() else root / p
        rel = _relpath(p, root)
        if rel in seen:
            raise DataError(
                f"dataset CSV {csv_path}, line {line}: {cells['path']} is listed again (first on line {seen[rel]})"
            )
        seen[rel] = line
        if not is_image_name(p):
            skipped.append(Skipped(rel, f"not an image file type ({p.suffix or 'no extension'})"))
        elif not p.exists():
            skipped.append(Skipped(rel, f"listed on line {line} of the CSV, no such file"))
        else:
            to_probe.append((p, cells["label"], cells.get("group", "")))
    if not seen:
        raise DataError(f"dataset CSV {csv_path} lists no images")
    classes = sorted({label for _, label, _ in to_probe})
    return _Listing(root, csv_path, to_probe, classes, len(seen), skipped, [], [])


def _scan_entries(listing: _Listing, *, max_pixels: int, workers: int | None, progress: bool, cache_dir) -> Inventory:
    root, to_probe, skipped, warnings = listing.root, listing.to_probe, listing.skipped, listing.warnings
    cache_file = None
    if cache_dir is not None:
        base = default_cache_dir() if cache_dir == "default" else Path(cache_dir)
        cache_file = base / "scans" / (hashlib.sha256(str(listing.csv or root).encode()).hexdigest()[:20] + ".json")
    cached = _load_scan_cache(cache_file)
    results: dict[str, tuple[dict | str, list[int] | None]] = {}
    todo: list[tuple[str, str, int]] = []
    for p, _, _ in to_probe:
        key = str(p)
        hit = cached.get(key)
        if hit is not None:
            try:
                st = p.stat()
            except OSError:
                st = None
            if st is not None and hit.get("stat") == _stat_key(st) and hit.get("max_pixels") == max_pixels:
                results[key] = (hit["result"], hit["stat"])
                continue
        todo.append((key, "", max_pixels))

    n_workers = workers or os.cpu_count() or 1
    with progress_bar(len(todo), f"checking {len(todo)} images", enabled=progress) as advance:
        if len(todo) >= _PARALLEL_MIN_FILES and n_workers > 1:
            with ProcessPoolExecutor(
                max_workers=n_workers, mp_context=pool_context(), initializer=exit_with_parent
            ) as pool:
                for path, res, stat_key in pool.map(_probe, todo, chunksize=64):
                    results[path] = (res, stat_key)
                    advance()
        else:
            for item in todo:
                path, res, stat_key = _probe(item)
                results[path] = (res, stat_key)
                advance()

    records: list[ImageRecord] = []
    new_cache: dict[str, dict] = {}
    for p, label, group in to_probe:
        key = str(p)
        res, stat_key = results[key]
        rel = _relpath(p, root)
        if isinstance(res, str):
            skipped.append(Skipped(rel, res))
        else:
            records.append(ImageRecord(relpath=rel, label=label, group=group, **res))
        if stat_key is not None:
            new_cache[key] = {"stat": stat_key, "max_pixels": max_pixels, "result": res}
    if cache_file is not None and todo:
        try:
            io.write_json(cache_file, {"version": SCAN_VERSION, "root": str(listing.csv or root), "entries": new_cache})
        except OSError as exc:
            warnings.append(f"could not write scan cache {cache_file}: {exc}")

    records.sort(key=lambda r: (r.label, r.relpath))
    skipped.sort(key=lambda s: s.path)
    present = {r.label for r in records}
    empty = [name for name in listing.classes if name not in present]
    for name in empty:
        warnings.append(
            f"{name}{'' if listing.csv else '/'}: class {'label' if listing.csv else 'folder'} "
            "has no readable images; class left out"
        )
    return Inventory(
        root=root,
        class_names=sorted(present),
        records=records,
        skipped=skipped,
        files=listing.files,
        ignored=listing.ignored,
        empty_classes=empty,
        warnings=warnings,
        csv=listing.csv,
    )


def require_trainable(inv: Inventory) -> None:
    """Raise DataError unless the inventory can train a classifier (two or more classes with images)."""
    if not inv.records:
        raise DataError(f"no readable images in {inv.root}")
    if len(inv.class_names) < 2:
        only = inv.class_names[0] if inv.class_names else "none"
        raise DataError(f"only one class with images in {inv.root} ({only}); a classifier needs at least two")


def print_summary(report: dict) -> None:
    """Human-readable tables of a summary() dict."""
    out = Console()
    table = Table(title=f"{report['root']}: {report['images']:,} images in {len(report['classes'])} classes")
    table.add_column("class")
    table.add_column("images", justify="right")
    for name, n in report["classes"].items():
        table.add_row(name, f"{n:,}")
    out.print(table)
    out.print(f"files seen: {report['files']:,}   sizes: {_top(report['sizes'])}   modes: {_top(report['modes'])}")
    for s in report["ignored"]:
        out.print(f"ignored {s['path']}: {s['reason']}", markup=False)
    if report["unreadable"]:
        out.print(f"[yellow]skipped {len(report['unreadable'])} file(s):")
        for s in report["unreadable"][:50]:
            out.print(f"  {s['path']}: {s['reason']}", markup=False)
        if len(report["unreadable"]) > 50:
            out.print(f"  ... and {len(report['unreadable']) - 50} more (see --json)")
    out.print(
        f"duplicate groups (byte-identical): {len(report['duplicate_groups'])}; "
        f"with conflicting labels: {len(report['conflicting_groups'])}"
    )
    for g in report["conflicting_groups"]:
        out.print(f"  [red]conflict:[/red] {' == '.join(g)}")
    if report.get("groups"):
        out.print(f"groups (the CSV's group column): {report['groups']:,}; each stays on one side of every split")
    for w in report["warnings"]:
        out.print(f"[yellow]warning:[/yellow] {w}", markup=True)


def _top(counter: dict, k: int = 3) -> str:
    items = list(counter.items())
    text = ", ".join(f"{key} ({n:,})" for key, n in items[:k])
    return text + (f", +{len(items) - k} more" if len(items) > k else "")

"""Preprocessing cache: every image decoded, converted to RGB and resized once into a uint8 array on disk.

Layout: `<cache_root>/arrays/<key>/images.npy` (N, S, S, 3 uint8, memory-mappable) and `manifest.json`.
The key hashes the inventory fingerprint (paths + content hashes), size and interpolation, so any changed,
added or removed source gives a new key and a rebuild. Each file is hashed again as it is decoded and must match
the hash of the scan, so pixels that differ from the key's content are never cached. A build happens in a temporary
folder that is renamed into place only once complete, with the manifest written last: a killed build is never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bloodcell import io
from bloodcell.data.discover import Inventory, default_cache_dir
from bloodcell.data.workers import exit_with_parent, pool_context
from bloodcell.data.images import DEFAULT_MAX_PIXELS, INTERPOLATIONS, WHITE_BALANCES, UnreadableImage, load_array
from bloodcell.errors import DataError
from bloodcell.progress import progress_bar

CACHE_VERSION = 1
_CHUNK = 64
# Below this many images one process builds the cache sooner than a pool, whose spawned workers take about 0.5 s to
# start (one process decodes about 1,000 images/s at 224 px; docs/reliability.md)
_PARALLEL_MIN_IMAGES = 1024


@dataclass
class ImageCache:
    """Images of an inventory as one (N, S, S, 3) uint8 array, in inventory order."""

    path: Path
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    relpaths: list[str]
    size: int
    interpolation: str
    build_seconds: float | None = None  # None when reused

    @property
    def reused(self) -> bool:
        return self.build_seconds is None


def cache_key(inv: Inventory, size: int, interpolation: str, white_balance: str = "none") -> str:
    """The name of the cache folder for this inventory at this size, interpolation and white balance.

    Args:
        inv: the scanned dataset; its fingerprint (paths and content hashes) goes into the key.
        size: the side in pixels every image is resized to.
        interpolation: a key of data.images.INTERPOLATIONS (nearest, bilinear, bicubic, lanczos, area).
        white_balance: "none" or "background"; "none" adds nothing, so caches made before the option keep their key.
    """
    step = "" if white_balance == "none" else f"|wb={white_balance}"  # caches made before the option keep their key
    h = hashlib.sha256(f"v{CACHE_VERSION}|{inv.fingerprint()}|{size}|{interpolation}{step}".encode()).hexdigest()
    return f"{size}-{interpolation}{'-' + white_balance if step else ''}-{h[:24]}"


# Worker state: each process opens the output memmap once.
_worker_out: np.ndarray | None = None


def _init_worker(npy_path: str, in_pool: bool = True) -> None:
    global _worker_out
    if in_pool:
        exit_with_parent()
    _worker_out = np.load(npy_path, mmap_mode="r+")


def _fill_chunk(args: tuple[int, list[str], list[str], int, str, int, str]) -> tuple[int, list[tuple[int, str]]]:
    start, paths, hashes, size, interpolation, max_pixels, white_balance = args
    failures = []
    for offset, (path, expected) in enumerate(zip(paths, hashes)):
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            if hashlib.sha256(data).hexdigest() != expected:
                failures.append((start + offset, f"{path}: content differs from the scan"))
                continue
            _worker_out[start + offset] = load_array(data, size, interpolation, max_pixels, white_balance)
        except (UnreadableImage, OSError) as exc:
            failures.append((start + offset, f"{path}: {exc}"))
    _worker_out.flush()
    return len(paths), failures


def load_cache(
    inv: Inventory,
    size: int = 224,
    interpolation: str = "nearest",
    cache_root: str | os.PathLike | None = None,
    white_balance: str = "none",
) -> ImageCache | None:
    """The cache for this inventory if a complete, matching one exists, else None.

    Args:
        inv: the scanned dataset; the cache must hold exactly its files, in its order, with the same hashes.
        size: the side in pixels of the cached images.
        interpolation: a key of data.images.INTERPOLATIONS.
        cache_root: the cache folder; None: $BLOODCELL_CACHE, else ~/.cache/bloodcell.
        white_balance: "none" or "background" (data.images.WHITE_BALANCES).
    """
    folder = Path(cache_root or default_cache_dir()) / "arrays" / cache_key(inv, size, interpolation, white_balance)
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        images = np.load(folder / "images.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    expected = [r.relpath for r in inv.records]
    if (
        manifest.get("version") != CACHE_VERSION
        or manifest.get("complete") is not True
        or manifest.get("relpaths") != expected
        or manifest.get("sha256") != [r.sha256 for r in inv.records]
        or images.shape != (len(expected), size, size, 3)
    ):
        return None
    return ImageCache(
        folder, images, np.asarray(inv.labels, dtype=np.int64), list(inv.class_names), expected, size, interpolation
    )


def build_cache(
    inv: Inventory,
    size: int = 224,
    interpolation: str = "nearest",
    cache_root: str | os.PathLike | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    force: bool = False,
    white_balance: str = "none",
) -> ImageCache:
    """Return the cache for `inv`, building it (in parallel, with a progress bar) unless a valid one exists.

    Args:
        inv: the scanned dataset to cache, in its order.
        size: the side in pixels every image is resized to (at least 8).
        interpolation: a key of data.images.INTERPOLATIONS.
        cache_root: the cache folder; None: $BLOODCELL_CACHE, else ~/.cache/bloodcell.
        workers: decoding processes; None: one per CPU. Below 1,024 images one process does it all.
        progress: show a progress bar.
        max_pixels: a larger image (width x height) fails as a possible decompression bomb.
        force: rebuild even when a valid cache exists.
        white_balance: "none" or "background" (data.images.WHITE_BALANCES).
    """
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"unknown interpolation '{interpolation}'; choose one of {sorted(INTERPOLATIONS)}")
    if white_balance not in WHITE_BALANCES:
        raise DataError(f"unknown white_balance '{white_balance}'; choose one of {', '.join(WHITE_BALANCES)}")
    if size < 8:
        raise DataError(f"image size {size} is too small (minimum 8 px)")
    if not force:
        found = load_cache(inv, size, interpolation, cache_root, white_balance)
        if found is not None:
            return found
    if not inv.records:
        raise DataError(f"no readable images in {inv.root} to cache")
    arrays_dir = Path(cache_root or default_cache_dir()) / "arrays"
    key = cache_key(inv, size, interpolation, white_balance)
    # One builder per cache at a time: DDP ranks, study workers and two users' jobs all call this. The others wait,
    # then find the finished cache, so none rebuilds (and rmtree's) a cache another process is reading.
    with _exclusive(arrays_dir / f".lock-{key}"):
        if not force:
            found = load_cache(inv, size, interpolation, cache_root, white_balance)
            if found is not None:
                return found
        return _build(
            inv,
            size,
            interpolation,
            arrays_dir,
            arrays_dir / key,
            workers,
            progress,
            max_pixels,
            white_balance,
            cache_root,
        )


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """An exclusive advisory lock (flock) held for the block; a no-op where flock does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock_path, "a+")
    except OSError as exc:
        raise _unwritable(lock_path.parent, exc, 0) from None
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _building(arrays_dir: Path, final: Path, n: int, size: int):
    """Yield a temporary folder holding an empty (n, size, size, 3) uint8 `images.npy`, its disk space reserved; the
    block fills it and writes manifest.json. Only if the block succeeds does the folder replace `final` (one rename);
    it is removed either way, and a write that fails is the one-line error naming the cache folder."""
    nbytes = n * size * size * 3
    tmp = arrays_dir / f".build-{os.getpid()}-{final.name}"
    try:
        arrays_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_builds(arrays_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3)).flush()
        _reserve_disk_space(tmp / "images.npy")
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as exc:
        raise _unwritable(arrays_dir, exc, nbytes) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _build(
    inv: Inventory,
    size: int,
    interpolation: str,
    arrays_dir: Path,
    final: Path,
    workers,
    progress: bool,
    max_pixels: int,
    white_balance: str,
    cache_root,
) -> ImageCache:
    with _building(arrays_dir, final, len(inv.records), size) as tmp:
        seconds = _fill(inv, size, interpolation, tmp, workers, progress, max_pixels, white_balance)
    cache = load_cache(inv, size, interpolation, cache_root, white_balance)
    assert cache is not None, "cache just built does not validate"
    cache.build_seconds = seconds
    return cache


def _fill(
    inv: Inventory,
    size: int,
    interpolation: str,
    tmp: Path,
    workers,
    progress: bool,
    max_pixels: int,
    white_balance: str,
) -> float:
    """Decode every image into tmp/images.npy (in worker processes), then write tmp/manifest.json; return seconds."""
    n = len(inv.records)
    npy = tmp / "images.npy"
    paths = [str(inv.path(i)) for i in range(n)]
    hashes = [r.sha256 for r in inv.records]
    jobs = [
        (s, paths[s : s + _CHUNK], hashes[s : s + _CHUNK], size, interpolation, max_pixels, white_balance)
        for s in range(0, n, _CHUNK)
    ]
    failures: list[tuple[int, str]] = []
    t0 = time.perf_counter()
    n_workers = min(workers or os.cpu_count() or 1, len(jobs)) if n >= _PARALLEL_MIN_IMAGES else 1
    with progress_bar(n, f"caching {n} images at {size}px", enabled=progress) as advance:
        if n_workers > 1:
            with ProcessPoolExecutor(
                n_workers, mp_context=pool_context(), initializer=_init_worker, initargs=(str(npy),)
            ) as pool:
                for done, bad in pool.map(_fill_chunk, jobs):
                    failures.extend(bad)
                    advance(done)
        else:
            _init_worker(str(npy), in_pool=False)
            for job in jobs:
                done, bad = _fill_chunk(job)
                failures.extend(bad)
                advance(done)
    if failures:
        # The inventory said these decode; they changed or vanished since the scan.
        raise DataError(
            f"{len(failures)} image(s) changed since the dataset was scanned, e.g. {failures[0][1]}; "
            f"run the command again to rescan the dataset"
        )
    seconds = time.perf_counter() - t0
    io.write_json(
        tmp / "manifest.json",
        {
            "version": CACHE_VERSION,
            "complete": True,
            "root": str(inv.root),
            "fingerprint": inv.fingerprint(),
            "size": size,
            "interpolation": interpolation,
            "white_balance": white_balance,
            "class_names": inv.class_names,
            "relpaths": [r.relpath for r in inv.records],
            "sha256": [r.sha256 for r in inv.records],
            "size_bytes": [r.size_bytes for r in inv.records],
            "mtime_ns": [r.mtime_ns for r in inv.records],
            "build_seconds": round(seconds, 3),
        },
    )
    return seconds


def _unwritable(arrays_dir: Path, exc: OSError, nbytes: int) -> DataError:
    return DataError(
        f"cannot write the preprocessing cache in {arrays_dir} "
        f"({exc.strerror or exc}; it needs {nbytes / 1e9:.2f} GB): "
        f"free space there or set BLOODCELL_CACHE to another folder"
    )


def _reserve_disk_space(npy: Path) -> None:
    """Allocate the array's blocks now: a full disk is then an error here, not a SIGBUS while filling the memmap."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(npy, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if exc.errno in io.NO_SPACE_ERRNOS:
            raise
        # the file system cannot reserve space (EINVAL, EOPNOTSUPP...): fill the memmap unreserved
    finally:
        os.close(fd)


def _remove_stale_builds(arrays_dir: Path, older_than_s: float = 3600) -> None:
    """Temporary folders of killed builds (an hour old) are deleted; they were never trusted."""
    now = time.time()
    for p in arrays_dir.glob(".build-*"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def resized_array_cache(
    images: np.ndarray,
    fingerprint: str,
    size: int,
    interpolation: str = "bilinear",
    white_balance: str = "none",
    cache_root: str | os.PathLike | None = None,
    progress: bool = True,
) -> np.ndarray:
    """`images` (N, H, W, 3 uint8, e.g. a MedMNIST .npz) at size x size, as a memory-mapped uint8 cache resized image
    by image exactly as folder images are (Pillow), so a 224 px copy of a large set never exists as float32 in
    memory. `fingerprint` names the source content; a complete cache is reused.

    Args:
        images: (N, H, W, 3) uint8 array, read image by image (it may be memory-mapped).
        fingerprint: a string naming the source content; it goes into the cache key and the manifest.
        size: the side in pixels every image is resized to.
        interpolation: a key of data.images.INTERPOLATIONS.
        white_balance: "none" or "background" (data.images.WHITE_BALANCES).
        cache_root: the cache folder; None: $BLOODCELL_CACHE, else ~/.cache/bloodcell.
        progress: show a progress bar.
    """
    if interpolation not in INTERPOLATIONS:
        raise DataError(f"unknown interpolation '{interpolation}'; choose one of {sorted(INTERPOLATIONS)}")
    arrays_dir = Path(cache_root or default_cache_dir()) / "arrays"
    h = hashlib.sha256(
        f"v{CACHE_VERSION}|array|{fingerprint}|{size}|{interpolation}|{white_balance}".encode()
    ).hexdigest()
    final = arrays_dir / f"array-{size}-{interpolation}-{h[:24]}"
    n = len(images)

    def complete() -> np.ndarray | None:
        try:
            manifest = json.loads((final / "manifest.json").read_text())
            cached = np.load(final / "images.npy", mmap_mode="r")
        except (OSError, ValueError):
            return None
        ok = (
            manifest.get("complete") is True
            and manifest.get("fingerprint") == fingerprint
            and cached.shape == (n, size, size, 3)
        )
        return cached if ok else None

    found = complete()
    if found is not None:
        return found
    with _exclusive(arrays_dir / f".lock-{final.name}"):
        found = complete()
        if found is not None:
            return found
        from PIL import Image

        from bloodcell.data.images import prepare_array

        with _building(arrays_dir, final, n, size) as tmp:
            out = np.load(tmp / "images.npy", mmap_mode="r+")
            with progress_bar(n, f"resizing {n} images to {size}px", enabled=progress) as advance:
                for i in range(n):
                    out[i] = prepare_array(Image.fromarray(np.asarray(images[i])), size, interpolation, white_balance)
                    advance()
            out.flush()
            del out
            io.write_json(
                tmp / "manifest.json",
                {
                    "version": CACHE_VERSION,
                    "complete": True,
                    "fingerprint": fingerprint,
                    "size": size,
                    "interpolation": interpolation,
                    "white_balance": white_balance,
                    "images": n,
                },
            )
    found = complete()
    assert found is not None, "array cache just built does not validate"
    return found

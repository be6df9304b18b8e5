"""Everything a run needs from its data, in one object: images (uint8, cached), labels, parts, provenance.

A folder dataset is scanned, split (or the run's saved split.json reused) and cached at the input size;
a MedMNIST .npz brings its own parts. Nothing else in the pipeline touches files or splits.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bloodcell.config import RunConfig
from bloodcell.data.cache import build_cache, resized_array_cache
from bloodcell.data.discover import require_trainable, scan
from bloodcell.data.medmnist import load_npz
from bloodcell.data.split import Split, SplitConfig, load_split, make_folds, make_split
from bloodcell.errors import ConfigError, DataError


@dataclass
class PreparedData:
    images: np.ndarray  # (N, S, S, 3) uint8, possibly a read-only memmap
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    relpaths: list[str]
    parts: dict[str, np.ndarray]  # train (in training order) / val / test -> indices into images
    source: dict = field(default_factory=dict)  # provenance: root, fingerprint, counts, skipped...
    split: Split | None = None
    lab_tests: dict[str, np.ndarray] = field(
        default_factory=dict
    )  # data.labs: each lab's own test part, indices into images

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _split_config(cfg: RunConfig) -> SplitConfig:
    s = cfg.data.split
    return SplitConfig(seed=cfg.split_seed, test_size=s.test_size, val_size=s.val_size, dedup=s.dedup, order=s.order)


def split_files(
    cfg: RunConfig, root: str | os.PathLike, part: str = "test", progress: bool = False, fingerprint: str | None = None
) -> tuple[list[Path], list[str]]:
    """(files, class names) of one part of the split `cfg` makes of `root`: e.g. a model's test part, for benchmarks.

    Pass `parse_config(model_json["training_config"])` to get exactly the images a trained model never saw, and
    model.json's `data_fingerprint` as `fingerprint` to refuse a folder that is not the data it was trained on
    (other images would split differently, and its parts would not be the model's).

    Args:
        cfg: the run's config; its data.split section and split seed make the split.
        root: the class-per-folder dataset (or CSV) to scan.
        part: "train", "val" or "test".
        progress: show the scan's progress bar.
        fingerprint: the inventory fingerprint `root` must have (a DataError otherwise); None: no check.
    """
    inv = scan(root, max_pixels=cfg.data.max_pixels, progress=progress)
    if fingerprint is not None and inv.fingerprint() != fingerprint:
        raise DataError(
            f"{inv.root} is not the data the model was trained on "
            "(its fingerprint differs from model.json's data_fingerprint)"
        )
    split = make_split(inv, _split_config(cfg))
    idx = split.part(part)
    return [inv.path(int(i)) for i in idx], [inv.class_names[inv.labels[int(i)]] for i in idx]


def prepare_data(
    cfg: RunConfig, *, split_file: str | os.PathLike | None = None, fold: int | None = None, progress: bool = True
) -> PreparedData:
    """Load, validate, split and cache the data of `cfg` (see module docstring).

    Args:
        cfg: the run's config (data, split seed, cv.folds).
        split_file: reuse this saved split when it exists (a resumed or re-evaluated run keeps its images).
        fold: with cv.folds, train/val come from fold `fold` of the training pool; test stays the same.
        progress: show progress bars.
    """
    if cfg.data.npz:
        return _prepare_npz(cfg, progress)
    if not cfg.data.root:
        raise ConfigError("data.root is not set: pass --data DIR or set data.root in the config")
    inv = scan(cfg.data.root, max_pixels=cfg.data.max_pixels, progress=progress)
    require_trainable(inv)
    if split_file is not None and Path(split_file).exists():
        split = load_split(split_file, inv)
    else:
        split = make_split(inv, _split_config(cfg))
        if fold is not None:
            split = make_folds(inv, split, cfg.cv.folds or 5)[fold]
    cache = build_cache(
        inv,
        cfg.data.input_size,
        cfg.data.interpolation,
        max_pixels=cfg.data.max_pixels,
        progress=progress,
        white_balance=cfg.data.white_balance,
    )
    summary = inv.summary()
    source = {
        "kind": "csv" if inv.csv else "folder",
        "root": str(inv.csv or inv.root),
        "fingerprint": summary["fingerprint"],
        "files": summary["files"],
        "images": summary["images"],
        "classes": summary["classes"],
        "unreadable": summary["unreadable"],
        "empty_classes": summary["empty_classes"],
        "warnings": summary["warnings"],
        "duplicate_groups": len(summary["duplicate_groups"]),
        "conflicting_groups": summary["conflicting_groups"],
        "dropped_by_split": split.dropped,
        "groups": summary["groups"],
        "split_groups": split.group_counts(),
        "cache": str(cache.path),
    }
    data = PreparedData(
        images=cache.images,
        labels=np.asarray(inv.labels, dtype=np.int64),
        class_names=list(inv.class_names),
        relpaths=[r.relpath for r in inv.records],
        parts={p: np.asarray(split.part(p), dtype=np.int64) for p in ("train", "val", "test")},
        source=source,
        split=split,
    )
    return _add_labs(data, cfg, progress) if cfg.data.labs else data


def _add_labs(data: PreparedData, cfg: RunConfig, progress: bool) -> PreparedData:
    """data.labs: each lab's train and val cells join ours (mixed into the training order); its test part is kept
    apart."""
    from bloodcell.data.labs import lab_images

    images, labels, relpaths = [np.asarray(data.images)], [data.labels], list(data.relpaths)
    parts = {k: [v] for k, v in data.parts.items()}
    offset, counts, lab_tests = len(data.labels), {}, {}
    for source in cfg.data.labs:
        lab = lab_images(
            source,
            data.class_names,
            size=cfg.data.input_size,
            interpolation=cfg.data.interpolation,
            white_balance=cfg.data.white_balance,
            max_pixels=cfg.data.max_pixels,
            split_config=_split_config(cfg),
            progress=progress,
        )
        index = offset + np.arange(len(lab.labels))
        for part in ("train", "val"):
            parts[part].append(index[lab.parts == part])
        lab_tests[source.name] = index[lab.parts == "test"]
        counts[source.name] = {p: int((lab.parts == p).sum()) for p in ("train", "val", "test")}
        images.append(lab.images)
        labels.append(lab.labels)
        relpaths += lab.relpaths
        offset += len(lab.labels)
    train = np.concatenate(parts["train"])
    if cfg.data.split.order != "sorted":  # the other labs' cells are spread through the training order, seeded
        train = train[np.random.default_rng(cfg.split_seed).permutation(len(train))]
    data.images = np.concatenate(images)
    data.labels = np.concatenate(labels)
    data.relpaths = relpaths
    data.parts = {"train": train, "val": np.concatenate(parts["val"]), "test": parts["test"][0]}
    data.lab_tests = lab_tests
    data.source["labs"] = {s.name: {"root": s.root, "parts": s.parts, **counts[s.name]} for s in cfg.data.labs}
    return data


def _prepare_npz(cfg: RunConfig, progress: bool = True) -> PreparedData:
    ds = load_npz(cfg.data.npz)
    fp = hashlib.sha256(ds.images.tobytes() + ds.labels.tobytes()).hexdigest()
    images = ds.images
    if images.shape[1:3] != (cfg.data.input_size, cfg.data.input_size) or cfg.data.white_balance != "none":
        # through a uint8 cache, image by image: BloodMNIST upscaled to 224 px as one float32 tensor was about 10 GB
        images = resized_array_cache(
            ds.images, fp, cfg.data.input_size, cfg.data.interpolation, cfg.data.white_balance, progress=progress
        )
    parts = dict(ds.parts)
    if cfg.data.split.order != "sorted":
        rng = np.random.default_rng(cfg.split_seed)
        parts["train"] = parts["train"][rng.permutation(len(parts["train"]))]
    counts = np.bincount(ds.labels, minlength=len(ds.class_names))
    return PreparedData(
        images=images,
        labels=ds.labels,
        class_names=ds.class_names,
        relpaths=ds.relpaths,
        parts=parts,
        source={
            "kind": "npz",
            "root": str(cfg.data.npz),
            "fingerprint": fp,
            "images": int(len(ds.labels)),
            "classes": {n: int(c) for n, c in zip(ds.class_names, counts)},
        },
    )

"""MedMNIST `.npz` files (e.g. BloodMNIST) as a second data source.

The file holds `train_images`, `train_labels`, `val_images`, `val_labels`, `test_images`, `test_labels`;
images are (N, H, W) or (N, H, W, 3) uint8, labels (N,) or (N, 1). Loaded with `allow_pickle=False`:
a user's file is never unpickled.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bloodcell.errors import DataError

# BloodMNIST's label order (its info dict), the same eight PBC classes in the same order as PBC's folders.
BLOODMNIST_CLASSES = [
    "basophil",
    "eosinophil",
    "erythroblast",
    "ig",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
]
PARTS = ("train", "val", "test")


@dataclass
class NpzDataset:
    images: np.ndarray  # (N, H, W, 3) uint8, the three parts concatenated in train, val, test order
    labels: np.ndarray  # (N,) int64
    class_names: list[str]
    parts: dict[str, np.ndarray]  # part -> indices into images

    @property
    def relpaths(self) -> list[str]:
        names = []
        for part in PARTS:
            names += [f"{part}/{k}" for k in range(len(self.parts[part]))]
        return names


def load_npz(path: str | Path, class_names: list[str] | None = None) -> NpzDataset:
    path = Path(path)
    if not path.exists():
        raise DataError(f"npz file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read npz file {path}: {exc}") from None
    with data:
        missing = [f"{p}_{k}" for p in PARTS for k in ("images", "labels") if f"{p}_{k}" not in data.files]
        if missing:
            raise DataError(f"{path}: missing key(s) {', '.join(missing)} (MedMNIST layout expected)")
        images, labels, parts, start = [], [], {}, 0
        for part in PARTS:
            x = np.asarray(data[f"{part}_images"])
            y = np.asarray(data[f"{part}_labels"]).reshape(-1)
            if x.dtype != np.uint8:
                raise DataError(f"{path}: {part}_images must be uint8, got {x.dtype}")
            if x.ndim == 3:
                x = np.repeat(x[..., None], 3, axis=-1)
            if x.ndim != 4 or x.shape[-1] != 3:
                raise DataError(f"{path}: {part}_images has shape {x.shape}; expected (N, H, W) or (N, H, W, 3)")
            if len(x) != len(y):
                raise DataError(f"{path}: {part}_images has {len(x)} images but {part}_labels has {len(y)} labels")
            images.append(x)
            labels.append(y.astype(np.int64))
            parts[part] = np.arange(start, start + len(x))
            start += len(x)
    labels_all = np.concatenate(labels)
    n_classes = int(labels_all.max()) + 1 if len(labels_all) else 0
    names = class_names or (
        BLOODMNIST_CLASSES if n_classes <= len(BLOODMNIST_CLASSES) else [str(k) for k in range(n_classes)]
    )
    if labels_all.min(initial=0) < 0 or n_classes > len(names):
        raise DataError(f"{path}: labels range over {n_classes} classes but {len(names)} class names were given")
    return NpzDataset(np.concatenate(images), labels_all, list(names), parts)

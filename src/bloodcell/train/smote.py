"""SMOTE on the training part only (imbalanced-learn), on flattened images at a configurable size.

The paper oversampled flattened 128 px images. Synthetic images are made at `smote.size` and resized to the
input size when the two differ. The memory SMOTE needs is estimated first and a config that cannot fit is
refused with the figure, before any work starts.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F

from bloodcell.config import SmoteConfig
from bloodcell.errors import ConfigError


def smote_memory_bytes(class_counts: np.ndarray, size: int) -> int:
    """Peak bytes: float32 features of the balanced set, about twice (input copy + output)."""
    n_after = int(class_counts.max()) * int((class_counts > 0).sum())
    return 2 * n_after * size * size * 3 * 4


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    if images.shape[1] == size and images.shape[2] == size:
        return np.asarray(images)
    t = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float()
    t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return t.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def check_smote_fits(labels: np.ndarray, cfg: SmoteConfig, num_classes: int) -> int:
    counts = np.bincount(labels, minlength=num_classes)
    need = smote_memory_bytes(counts, cfg.size)
    limit = int(cfg.max_memory_gb * (1 << 30)) if cfg.max_memory_gb else _physical_memory() // 2
    if need > limit:
        raise ConfigError(
            f"smote: oversampling {len(labels):,} images to {int(counts.max()) * int((counts > 0).sum()):,} at "
            f"{cfg.size}px needs about {need / (1 << 30):.1f} GiB, over the {limit / (1 << 30):.1f} GiB limit; "
            f"lower smote.size (the paper used 128) or raise smote.max_memory_gb"
        )
    return need


def smote_oversample(
    images: np.ndarray, labels: np.ndarray, cfg: SmoteConfig, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (images, labels) of the training part with every class raised to the largest class's count.

    The originals come first, unchanged; synthetic images follow.

    Args:
        images: The training images, uint8 (N, H, W, 3).
        labels: Their class indices (N,).
        cfg: smote.size (the side synthetic images are made at), k_neighbors and max_memory_gb.
        num_classes: The number of classes.
        seed: SMOTE's random state.
    """
    from imblearn.over_sampling import SMOTE

    check_smote_fits(labels, cfg, num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    present = counts[counts > 0]
    k = min(cfg.k_neighbors, int(present.min()) - 1)
    if k < 1:
        raise ConfigError(f"smote: a class has only {int(present.min())} training image(s); SMOTE needs at least 2")
    small = _resize(images, cfg.size)
    flat = small.reshape(len(small), -1).astype(np.float32)
    x_res, y_res = SMOTE(k_neighbors=k, random_state=seed).fit_resample(flat, labels)
    synthetic = np.clip(np.rint(x_res[len(flat) :]), 0, 255).astype(np.uint8).reshape(-1, cfg.size, cfg.size, 3)
    synthetic = _resize(synthetic, images.shape[1])
    return np.concatenate([np.asarray(images), synthetic]), np.concatenate([labels, y_res[len(flat) :]]).astype(
        np.int64
    )

"""Dataset figures: class distribution per split (paper Fig. 2) and sample images per class (Fig. 1)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bloodcell import io  # noqa: E402
from bloodcell.data.discover import Inventory  # noqa: E402
from bloodcell.data.images import load_array  # noqa: E402
from bloodcell.data.split import Split  # noqa: E402


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write `fig` to `path` as PNG via a temp file (atomic), always closing the figure."""
    path = Path(path)
    try:
        with io.atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_class_distribution(split: Split, path: str | Path) -> Path:
    cfg = split.config
    title = (
        f"Class distribution per split (test {cfg.test_size:.0%}, val {cfg.val_size:.0%} of train, "
        f"seed {cfg.seed}, dedup {'on' if cfg.dedup else 'off'}, order {cfg.order})"
    )
    return plot_part_counts(split.class_counts(), split.class_names, path, title)


def plot_part_counts(counts: dict[str, dict[str, int]], names: list[str], path: str | Path, title: str) -> Path:
    """Grouped bars: images per class in each of train / val / test (paper Fig. 2).

    Args:
        counts: images per class name in each part: {"train" | "val" | "test": {class name: count}}.
        names: the classes to plot, in order (each must be in every part's counts).
        path: the PNG written (atomically).
        title: the figure's title.
    """
    x = np.arange(len(names))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names)), 4))
    for k, (part, colour) in enumerate([("train", "#4C72B0"), ("val", "#DD8452"), ("test", "#55A868")]):
        values = [counts[part][n] for n in names]
        bars = ax.bar(x + (k - 1) * width, values, width, label=f"{part} ({sum(values):,})", color=colour)
        ax.bar_label(bars, fontsize=7, padding=1)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=9)
    ax.legend()
    return save_figure(fig, path)


def plot_sample_grid(inv: Inventory, path: str | Path, per_class: int = 6, seed: int = 0, size: int = 128) -> Path:
    """A grid of random sample images, one row per class of `inv`, written as a PNG to `path`.

    Args:
        inv: the scanned dataset; each row's title gives its class's image count.
        path: the PNG written (atomically).
        per_class: images (columns) a class; a class with fewer shows all it has.
        seed: the random picks' seed.
        size: the side in pixels each image is resized to (bilinear).
    """
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {name: [] for name in inv.class_names}
    for i, r in enumerate(inv.records):
        by_class[r.label].append(i)
    rows = len(inv.class_names)
    fig, axes = plt.subplots(
        rows, per_class, figsize=(1.4 * per_class, 1.5 * rows), squeeze=False, layout="constrained"
    )
    for r, name in enumerate(inv.class_names):
        members = by_class[name]
        picks = rng.choice(members, size=min(per_class, len(members)), replace=False) if members else []
        for c in range(per_class):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(picks):
                ax.imshow(load_array(inv.path(int(picks[c])), size, "bilinear"))
            if c == 0:
                ax.set_title(f"{name} ({len(members):,})", fontsize=8, loc="left")
    fig.suptitle(f"Sample images per class: {inv.root.name}", fontsize=10)
    return save_figure(fig, path)

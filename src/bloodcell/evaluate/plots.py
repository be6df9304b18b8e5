"""Evaluation figures. Each function writes one PNG atomically, closes its figure, returns the Path."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from bloodcell.errors import DataError  # noqa: E402
from bloodcell.evaluate.metrics import (  # noqa: E402
    expected_calibration_error,
    normalize_confusion_matrix,
    reliability_curve,
)
from bloodcell.data.figures import save_figure  # noqa: E402

DPI = 120
RIGHT, WRONG = "#1a7f37", "#cf222e"  # green / red that stay distinguishable in print


def _save(fig, path) -> Path:
    return save_figure(fig, path, dpi=DPI)


# ---------------------------------------------------------------- training curves (paper Figs 7-9)

_CURVE_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")


def plot_training_curves(history, path, title: str | None = None) -> Path:
    """Plot accuracy (left) and loss (right) per epoch, train and validation; return the PNG path.

    `history` is a list of dicts or the path of a CSV with columns epoch, train_loss, train_acc,
    val_loss, val_acc. Validation columns may be missing or have empty cells (no val split).
    """
    return _plot_curves({"": history}, path, title)


def plot_protocol_curves(histories: Mapping[str, object], path, title: str | None = None) -> Path:
    """Accuracy (left) and loss (right) per epoch of several runs on shared axes, one colour per run
    (e.g. one model without and with shuffling, the paper's Figs 7-9); train solid, validation dashed."""
    return _plot_curves(histories, path, title)


def _plot_curves(histories: Mapping[str, object], path, title: str | None) -> Path:
    """One run: train and validation in the default colours; several: one colour per run, its label first."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    several = len(histories) > 1
    for k, (label, history) in enumerate(histories.items()):
        rows = _read_history(history)
        cols = {c: np.array([_num(r.get(c)) for r in rows]) for c in _CURVE_COLUMNS}
        epochs = cols["epoch"] if not np.all(np.isnan(cols["epoch"])) else np.arange(1, len(rows) + 1)
        for ax, metric in ((axes[0], "acc"), (axes[1], "loss")):
            for split, style in (("train", "-o"), ("val", "--s")):
                y = cols[f"{split}_{metric}"]
                ok = ~np.isnan(y)
                if ok.any():
                    ax.plot(
                        epochs[ok],
                        y[ok],
                        style,
                        color=colours[k % len(colours)] if several else None,
                        markersize=3,
                        label=f"{label}, {split}" if label else split,
                    )
    for ax, name in ((axes[0], "Accuracy"), (axes[1], "Loss")):
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8 if several else None)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _read_history(history) -> list[Mapping]:
    if isinstance(history, (str, os.PathLike)):
        p = Path(history)
        if not p.is_file():
            raise DataError(f"training history {p} does not exist")
        with open(p, newline="") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = list(history)
    if not rows:
        raise DataError("training history is empty: nothing to plot")
    return rows


def _num(v) -> float:
    """Float of a CSV cell or dict value; missing/empty/non-numeric becomes NaN."""
    if v is None or v == "":
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


# ---------------------------------------------------------------- confusion matrix


def plot_confusion_matrix(
    cm,
    class_names: Sequence[str],
    path,
    normalize: bool | str = False,
    title: str | None = None,
) -> Path:
    """Plot a confusion matrix (rows = true, columns = predicted); return the PNG path.

    Args:
        cm: (K, K) counts, rows = true, columns = predicted.
        class_names: the K class names, in the matrix's order.
        path: the PNG written (atomically).
        normalize: False draws counts, True row-normalised rates, "both" the two side by side.
        title: the figure's title; None: none.
    """
    cm = np.asarray(cm)
    k = len(class_names)
    if cm.shape != (k, k):
        raise DataError(f"confusion matrix has shape {cm.shape}, expected ({k}, {k}) for {k} classes")
    if normalize not in (False, True, "both"):
        raise DataError(f"normalize must be False, True or 'both', got {normalize!r}")
    panels = {False: [False], True: [True], "both": [False, True]}[normalize]

    side = max(4.5, 0.6 * k + 2)
    fig, axes = plt.subplots(1, len(panels), figsize=(side * len(panels), side), squeeze=False)
    for ax, norm in zip(axes[0], panels):
        data = normalize_confusion_matrix(cm) if norm else cm
        im = ax.imshow(data, cmap="Blues", vmin=0, vmax=1 if norm else max(1, data.max()))
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        thresh = (1 if norm else max(1, data.max())) / 2
        for i in range(k):
            for j in range(k):
                text = f"{data[i, j]:.2f}" if norm else f"{int(data[i, j])}"
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=8, color="white" if data[i, j] > thresh else "black"
                )
        ax.set_xticks(range(k), class_names, rotation=45, ha="right")
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("Predicted")
        ax.set_ylabel("True")
        ax.set_title("Row-normalised" if norm else "Counts")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- reliability diagram


def plot_reliability_diagram(
    probs,
    y_true,
    path,
    title: str | None = None,
    *,
    probs_calibrated=None,
    n_bins: int = 15,
) -> Path:
    """Plot per-bin accuracy against confidence with the diagonal and a confidence histogram.

    ECE is shown in the title. With `probs_calibrated` (e.g. after temperature scaling) the raw
    and calibrated curves are drawn side by side in each bin. Returns the PNG path.

    Args:
        probs: (N, K) class probabilities (the raw curve).
        y_true: (N,) true class indices.
        path: the PNG written (atomically).
        title: put before the ECE in the title; None: the ECE alone.
        probs_calibrated: (N, K) calibrated probabilities; None: the raw curve alone.
        n_bins: equal-width confidence bins over [0, 1].
    """
    series = [("raw", probs, "#0969da")]
    if probs_calibrated is not None:
        series.append(("calibrated", probs_calibrated, "#bf8700"))

    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = 1.0 / n_bins / len(series)
    eces = []
    for s, (name, p, color) in enumerate(series):
        curve = reliability_curve(p, y_true, n_bins)
        ece = expected_calibration_error(p, y_true, n_bins)
        eces.append(f"{name} {ece:.3f}" if len(series) > 1 else f"{ece:.3f}")
        used = curve["count"] > 0
        left = curve["bin_lower"][used] + s * width
        ax.bar(
            left,
            curve["accuracy"][used],
            width=width,
            align="edge",
            color=color,
            alpha=0.75,
            edgecolor="black",
            linewidth=0.5,
            label=f"{name} (ECE {ece:.3f})",
        )
        hist.bar(left, curve["count"][used], width=width, align="edge", color=color, alpha=0.75)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Accuracy")
    ax.legend(loc="upper left", fontsize=8)
    hist.set_xlabel("Confidence (top-class probability)")
    hist.set_ylabel("Samples")
    ax.set_title(f"{title + ' - ' if title else ''}ECE {', '.join(eces)}")
    return _save(fig, path)


# ---------------------------------------------------------------- image grids (paper Fig. 14)


def plot_prediction_grid(images, y_true, y_pred, probs, class_names, path, n: int = 16) -> Path:
    """Show the first `n` images titled "pred (p) / true", green if right, red if wrong.

    Args:
        images: uint8 (N, H, W, 3) or (N, H, W).
        y_true: (N,) true class indices into `class_names`.
        y_pred: (N,) predicted class indices into `class_names`.
        probs: (N, K) class probabilities, or (N,) confidences of the predicted class.
        class_names: the class names the titles show.
        path: the PNG written (atomically).
        n: how many images, from the first.

    Returns:
        the PNG path.
    """
    images = _images(images)
    y_true, y_pred = np.asarray(y_true).astype(int), np.asarray(y_pred).astype(int)
    probs = np.asarray(probs, dtype=float)
    if not len(images) == len(y_true) == len(y_pred) == len(probs):
        raise DataError(
            f"images, labels, predictions and probabilities differ in length: "
            f"{len(images)}, {len(y_true)}, {len(y_pred)}, {len(probs)}"
        )
    conf = probs[np.arange(len(probs)), y_pred] if probs.ndim == 2 else probs
    idx = np.arange(min(n, len(images)))
    return _grid(images, idx, y_true, y_pred, conf, class_names, path, "Predictions")


def plot_confident_mistakes(images, y_true, probs, class_names, path, n: int = 12) -> Path:
    """Show the `n` wrong predictions with the highest confidence, most confident first.

    With no mistakes the figure says so. Returns the PNG path.

    Args:
        images: uint8 (N, H, W, 3) or (N, H, W).
        y_true: (N,) true class indices into `class_names`.
        probs: (N, K) class probabilities; the prediction is their argmax, the confidence their max.
        class_names: the class names the titles show.
        path: the PNG written (atomically).
        n: at most this many mistakes are shown.
    """
    images = _images(images)
    y_true, probs = np.asarray(y_true).astype(int), np.asarray(probs, dtype=float)
    if not len(images) == len(y_true) == len(probs) or probs.ndim != 2:
        raise DataError(
            f"need (N, K) probabilities and N images and labels, got {probs.shape}, "
            f"{len(images)} images, {len(y_true)} labels"
        )
    y_pred = probs.argmax(axis=1)
    conf = probs.max(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    if len(wrong) == 0:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"No mistakes ({len(y_true)} images)", ha="center", va="center", fontsize=14)
        return _save(fig, path)
    # Stable sort keeps ties in input order, so the figure is reproducible.
    idx = wrong[np.argsort(-conf[wrong], kind="stable")][:n]
    return _grid(
        images, idx, y_true, y_pred, conf, class_names, path, f"Most confident mistakes ({len(idx)} of {len(wrong)})"
    )


def _grid(images, idx, y_true, y_pred, conf, class_names, path, title) -> Path:
    if len(idx) == 0:
        raise DataError("no images to plot")
    cols = min(len(idx), 4 if len(idx) <= 12 else int(math.ceil(math.sqrt(len(idx)))))
    rows = int(math.ceil(len(idx) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), idx):
        ax.imshow(images[i], cmap="gray" if images[i].ndim == 2 else None)
        right = y_pred[i] == y_true[i]
        ax.set_title(
            f"{class_names[y_pred[i]]} ({conf[i]:.2f})\n/ {class_names[y_true[i]]}",
            color=RIGHT if right else WRONG,
            fontsize=9,
        )
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _images(images) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (3, 4)):
        raise DataError(f"images must be (N, H, W, 3) or (N, H, W), got shape {images.shape}")
    return images


# ---------------------------------------------------------------- per-class bars


def plot_per_class_bars(per_class: Mapping[str, Mapping[str, float]], path, title: str | None = None) -> Path:
    """Grouped precision/recall/F1 bars per class from classification_metrics()["per_class"].

    Tick labels carry the class support. Returns the PNG path.
    """
    if not per_class:
        raise DataError("per-class metrics are empty: nothing to plot")
    names = list(per_class)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 4))
    for s, key in enumerate(("precision", "recall", "f1")):
        ax.bar(x + (s - 1) * 0.27, [per_class[c][key] for c in names], width=0.27, label=key)
    ax.set_xticks(x, [f"{c}\n(n={per_class[c].get('support', '?')})" for c in names], fontsize=8)
    ax.set_ylim(0, 1.15)  # headroom for the legend above the bars
    ax.set_ylabel("Score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", ncol=3, fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)

"""Classification metrics for one run on one test set: the paper's numbers plus calibration and CIs.

All functions take integer labels `y_true` (N,) in [0, K) and class probabilities `probs` (N, K)
(softmax outputs, rows summing to 1). Predictions are `probs.argmax(1)`.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from bloodcell.errors import DataError

# Metrics that bootstrap_ci computes for all resamples at once instead of one call per resample.
_VECTORISED = ("accuracy", "f1_macro")


def classification_metrics(
    y_true,
    probs,
    class_names: Sequence[str],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Return a JSON-serialisable dict of metrics (plain floats, ints and lists).

    Keys: accuracy, precision_weighted, recall_weighted, f1_weighted, precision_macro,
    recall_macro, f1_macro, top2_accuracy, nll, ece, n, class_names,
    per_class {name: {precision, recall, f1, support}}, confusion_matrix (counts, rows = true),
    confusion_matrix_normalized (rows sum to 1; all-zero rows for classes absent from y_true),
    ci95 {accuracy: [lo, hi], f1_macro: [lo, hi]} (percentile bootstrap over test samples;
    None when n_bootstrap == 0).

    Every class in `class_names` counts, present in the data or not: a class absent from both
    y_true and predictions scores 0 and is included in the macro averages (sklearn's behaviour
    with labels=range(K), zero_division=0), and never yields NaN or a warning.

    Args:
        y_true: (N,) true class indices.
        probs: (N, K) class probabilities; predictions are their argmax.
        class_names: K names, in the order of the columns of `probs`.
        n_bootstrap: resamples of ci95 (0: ci95 is None).
        seed: the bootstrap's seed.
    """
    y_true, probs = _check(y_true, probs)
    k = probs.shape[1]
    if len(class_names) != k:
        raise DataError(f"got {len(class_names)} class names for probabilities over {k} classes")
    labels = list(range(k))
    y_pred = probs.argmax(axis=1)

    out: dict = {"n": int(len(y_true)), "class_names": [str(c) for c in class_names]}
    out["accuracy"] = float(accuracy_score(y_true, y_pred))
    for avg in ("weighted", "macro"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out[f"precision_{avg}"], out[f"recall_{avg}"], out[f"f1_{avg}"] = float(p), float(r), float(f)
    # With 2 classes the top-2 set is every class; sklearn warns about that, so say it directly.
    out["top2_accuracy"] = float(top_k_accuracy_score(y_true, probs, k=2, labels=labels)) if k > 2 else 1.0
    out["nll"] = float(log_loss(y_true, probs, labels=labels))
    out["ece"] = expected_calibration_error(probs, y_true, n_bins=15)

    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out["per_class"] = {
        str(name): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, name in enumerate(class_names)
    }
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    out["confusion_matrix"] = cm.tolist()
    out["confusion_matrix_normalized"] = normalize_confusion_matrix(cm).tolist()

    if n_bootstrap > 0:
        out["ci95"] = {
            name: list(bootstrap_ci(y_true, y_pred, name, n=n_bootstrap, seed=seed, n_classes=k))
            for name in _VECTORISED
        }
    else:
        out["ci95"] = None
    return out


def restrict(probs: np.ndarray, present: list[int]) -> np.ndarray:
    """Probabilities renormalised over the `present` columns; a row with no mass there becomes uniform."""
    sub = probs[:, present]
    sums = sub.sum(axis=1, keepdims=True)
    return np.where(sums > 0, sub / np.where(sums > 0, sums, 1.0), 1.0 / len(present))


def normalize_confusion_matrix(cm) -> np.ndarray:
    """Return `cm` with each row divided by its sum; rows summing to 0 stay all zeros (no NaN)."""
    cm = np.asarray(cm, dtype=float)
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)


def reliability_curve(probs, y_true, n_bins: int = 15) -> dict:
    """Bin samples by top-class confidence into `n_bins` equal-width bins over [0, 1].

    Returns a dict of numpy arrays of length n_bins: bin_lower, bin_upper, confidence (mean
    top-class probability in the bin), accuracy (fraction correct in the bin), count. Empty
    bins have count 0 and NaN confidence/accuracy, so plots can skip them.
    """
    y_true, probs = _check(y_true, probs)
    if n_bins < 1:
        raise DataError(f"n_bins must be at least 1, got {n_bins}")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(float)
    # Bins are (lo, hi] as in Guo et al. 2017; confidence 0 can only come from a degenerate row
    # and goes to the first bin.
    idx = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(idx, weights=conf, minlength=n_bins) / count
        mean_acc = np.bincount(idx, weights=correct, minlength=n_bins) / count
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "confidence": mean_conf,
        "accuracy": mean_acc,
        "count": count,
    }


def expected_calibration_error(probs, y_true, n_bins: int = 15) -> float:
    """Return ECE: sum over bins of (bin size / N) * |accuracy - mean confidence|, top class only."""
    curve = reliability_curve(probs, y_true, n_bins)
    used = curve["count"] > 0
    gaps = np.abs(curve["accuracy"][used] - curve["confidence"][used])
    return float(np.sum(gaps * curve["count"][used]) / curve["count"].sum())


def bootstrap_ci(
    y_true,
    y_pred,
    metric_fn: str | Callable[[np.ndarray, np.ndarray], float],
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    *,
    n_classes: int | None = None,
) -> tuple[float, float]:
    """Return the (lo, hi) percentile-bootstrap interval of a metric over resampled test samples.

    `metric_fn` is "accuracy" or "f1_macro" (computed for all resamples at once) or any
    callable f(y_true, y_pred) -> float (called once per resample: slower). For "f1_macro",
    classes are range(n_classes) (default: max label + 1), absent classes scoring 0 like
    classification_metrics. The same seed always gives the same interval.

    Args:
        y_true: (N,) true class indices.
        y_pred: (N,) predicted class indices.
        metric_fn: "accuracy", "f1_macro" or a callable f(y_true, y_pred) -> float.
        n: the number of resamples (at least 1).
        seed: the resampling's seed.
        alpha: 1 - the interval's coverage (0.05: a 95 % interval).
        n_classes: for "f1_macro", the classes are range(n_classes); None: max label + 1.
    """
    y_true = np.asarray(y_true).astype(int).ravel()
    y_pred = np.asarray(y_pred).astype(int).ravel()
    if len(y_true) == 0 or len(y_true) != len(y_pred):
        raise DataError(f"need equal, non-zero numbers of labels and predictions, got {len(y_true)} and {len(y_pred)}")
    if n < 1:
        raise DataError(f"number of bootstrap resamples must be at least 1, got {n}")
    if not 0 < alpha < 1:
        raise DataError(f"alpha must be in (0, 1), got {alpha}")
    if isinstance(metric_fn, str) and metric_fn not in _VECTORISED:
        raise DataError(f"unknown bootstrap metric {metric_fn!r}; use one of {_VECTORISED} or a callable")

    size = len(y_true)
    k = n_classes or int(max(y_true.max(), y_pred.max())) + 1
    rng = np.random.default_rng(seed)
    # Resample in blocks so memory stays bounded (~2M indices) for large test sets.
    block = max(1, 2_000_000 // size)
    values = []
    for start in range(0, n, block):
        idx = rng.integers(0, size, size=(min(block, n - start), size))
        if metric_fn == "accuracy":
            values.append((y_true == y_pred)[idx].mean(axis=1))
        elif metric_fn == "f1_macro":
            values.append(_f1_macro_rows(y_true[idx], y_pred[idx], k))
        else:
            values.append(np.array([metric_fn(y_true[i], y_pred[i]) for i in idx], dtype=float))
    values = np.concatenate(values)
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


def _f1_macro_rows(t: np.ndarray, p: np.ndarray, k: int) -> np.ndarray:
    """Macro F1 of each row of (R, N) label arrays, over classes 0..k-1, 0 for empty classes."""
    rows = t.shape[0]
    offset = (np.arange(rows) * k)[:, None]  # one bincount for all rows: row r uses slots r*k..r*k+k-1

    def counts(labels, weights=None):
        return np.bincount((labels + offset).ravel(), weights=weights, minlength=rows * k).reshape(rows, k)

    tp = counts(t, (t == p).ravel().astype(float))
    denom = counts(t) + counts(p)  # = 2TP + FP + FN
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return f1.mean(axis=1)


def f1_macro(y_true, y_pred, n_classes: int) -> float:
    """Return sklearn's macro F1 over classes 0..n_classes-1 (absent classes score 0)."""
    return float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0))


def _check(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert labels to int (N,) and probabilities to float64 (N, K)."""
    probs = _to_numpy(probs).astype(np.float64)
    y_true = _to_numpy(y_true)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise DataError(f"probabilities must have shape (N, K) with N >= 1 and K >= 2, got {probs.shape}")
    if y_true.ndim != 1 or len(y_true) != len(probs):
        raise DataError(f"labels must have shape ({len(probs)},) to match the probabilities, got {y_true.shape}")
    if not np.issubdtype(y_true.dtype, np.integer):
        if not np.all(np.mod(y_true, 1) == 0):
            raise DataError("labels must be integer class indices")
    y_true = y_true.astype(int)
    k = probs.shape[1]
    if y_true.min() < 0 or y_true.max() >= k:
        raise DataError(f"labels must lie in [0, {k}), got values from {y_true.min()} to {y_true.max()}")
    if not np.all(np.isfinite(probs)) or probs.min() < 0:
        raise DataError("probabilities must be finite and non-negative")
    sums = probs.sum(axis=1, keepdims=True)
    if np.any(np.abs(sums - 1) > 1e-3):
        raise DataError("probability rows must sum to 1: pass softmax outputs, not logits")
    # Renormalise away float32 rounding so sklearn's log_loss accepts the rows.
    return y_true, probs / sums


def _to_numpy(x) -> np.ndarray:
    """Accept numpy arrays, lists and torch tensors (on any device) without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)

"""Soft-voting ensembles of finished runs: average their test-set probabilities, no retraining.

Every run writes predictions.csv (one row per test image: path, true class, p_<class> columns). Runs trained on one
split (same data, same split seed) have the same rows in the same order; their mean probabilities are the ensemble's
prediction. Runs tested on other images or with other classes are refused: an ensemble needs one test set.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from bloodcell import io
from bloodcell.errors import ConfigError, DataError
from bloodcell.evaluate.metrics import classification_metrics
from bloodcell.evaluate.plots import plot_confusion_matrix
from bloodcell.evaluate.run import write_predictions
from bloodcell.evaluate.stats import mcnemar_test


def read_predictions(run_dir: str | os.PathLike) -> tuple[list[str], list[str], list[str], np.ndarray]:
    """(paths, true class names, class names, probabilities (N, K)) from a run's predictions.csv."""
    path = Path(run_dir) / "predictions.csv"
    if not path.is_file():
        raise DataError(f"{path} not found: ensembles need finished runs (bloodcell train / study writes it)")
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0] if rows else []
    classes = [h[2:] for h in header if h.startswith("p_")]
    if header[:2] != ["path", "true"] or not classes or len(rows) < 2:
        raise DataError(f"{path} is not a predictions file (expected path, true, ..., p_<class> columns and rows)")
    first = header.index("p_" + classes[0])
    try:
        probs = np.array([[float(v) for v in r[first : first + len(classes)]] for r in rows[1:]], dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    return [r[0] for r in rows[1:]], [r[1] for r in rows[1:]], classes, probs


def ensemble_runs(
    run_dirs: list[str | os.PathLike],
    out_dir: str | os.PathLike | None = None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """Average the test probabilities of `run_dirs`; return (and write to out_dir) the ensemble's metrics.

    The result holds the ensemble's metrics (classification_metrics, with bootstrap CIs), each member's accuracy,
    and McNemar's test of the ensemble against its best member on the same images.

    Args:
        run_dirs: at least 2 finished runs (each with predictions.csv) tested on the same images and classes.
        out_dir: where metrics.json, predictions.csv and figures/confusion.png are written; None: nothing is written.
        n_bootstrap: resamples of the 95 % confidence intervals (0: none).
        seed: the bootstrap's seed.
    """
    if len(run_dirs) < 2:
        raise ConfigError(f"an ensemble needs at least 2 runs, got {len(run_dirs)}")
    members = [(Path(d), *read_predictions(d)) for d in run_dirs]
    ref_dir, ref_paths, ref_true, ref_classes, _ = members[0]
    for d, paths, true, classes, _ in members[1:]:
        if classes != ref_classes:
            raise ConfigError(
                f"{d} predicts classes {classes}, {ref_dir} predicts {ref_classes}: an ensemble needs one class list"
            )
        if paths != ref_paths or true != ref_true:
            raise ConfigError(
                f"{d} and {ref_dir} were tested on different images (another split seed or dataset): "
                "an ensemble needs one test set"
            )
    index = {c: i for i, c in enumerate(ref_classes)}
    y = np.array([index[c] for c in ref_true])
    probs = np.mean([m[4] for m in members], axis=0)
    metrics = classification_metrics(y, probs, ref_classes, n_bootstrap=n_bootstrap, seed=seed)
    member_acc = {str(m[0]): float((m[4].argmax(1) == y).mean()) for m in members}
    best = max(range(len(members)), key=lambda i: member_acc[str(members[i][0])])
    result = {
        "members": [str(m[0]) for m in members],
        "member_accuracy": member_acc,
        "test": metrics,
        "vs_best_member": {
            "member": str(members[best][0]),
            **mcnemar_test(y, probs.argmax(1), members[best][4].argmax(1)),
        },
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        io.write_json(out / "metrics.json", result)
        write_predictions(out / "predictions.csv", ref_paths, ref_true, ref_classes, probs)
        plot_confusion_matrix(
            np.asarray(metrics["confusion_matrix"]),
            ref_classes,
            out / "figures" / "confusion.png",
            normalize="both",
            title=f"ensemble of {len(members)} runs: test confusion matrix",
        )
    return result

"""Evaluate a trained run: predictions on train / val / test, metrics.json, predictions.csv and figures.

Temperature scaling is fitted on the validation part and stored in model.json together with the review
threshold (the lowest calibrated confidence at which validation predictions were at least 99 % right), so
inference can flag uncertain cells.
"""

from __future__ import annotations

import csv
import io as _io
import os
import time
from pathlib import Path

import numpy as np
import torch

from bloodcell import io
from bloodcell.config import RunConfig
from bloodcell.data.prepare import PreparedData
from bloodcell.evaluate.calibration import apply_temperature, fit_temperature, softmax
from bloodcell.evaluate.machine import environment
from bloodcell.evaluate.metrics import classification_metrics, expected_calibration_error
from bloodcell.evaluate.ood import energy_score, fit_mahalanobis, mahalanobis_score, threshold_for
from bloodcell.evaluate.labs import evaluate_labs, lab_summary
from bloodcell.evaluate.outputs import predict_logits, predict_outputs  # noqa: F401 - their home before evaluate/outputs.py
from bloodcell.models.description import METADATA_FILE, update_description
from bloodcell.models.ood import METHOD as OOD_METHOD, OOD_FILE, save_ood
from bloodcell.evaluate.plots import (
    plot_confident_mistakes,
    plot_confusion_matrix,
    plot_prediction_grid,
    plot_reliability_diagram,
    plot_training_curves,
)

REVIEW_TARGET_ACCURACY = 0.99


def choose_review_threshold(probs: np.ndarray, y_true: np.ndarray, target: float = REVIEW_TARGET_ACCURACY) -> float:
    """Lowest confidence t such that predictions with confidence >= t are at least `target` accurate."""
    if len(y_true) == 0:
        return 0.9
    conf, correct = probs.max(1), probs.argmax(1) == y_true
    for t in np.round(np.arange(0.30, 0.995, 0.01), 2):
        kept = conf >= t
        if kept.sum() >= max(10, 0.05 * len(y_true)) and correct[kept].mean() >= target:
            return float(t)
    return 0.99


def fit_ood_score(
    run_dir: Path, outputs: dict, y: dict, num_classes: int, false_alarm: float
) -> tuple[dict, tuple] | None:
    """Fit the Mahalanobis OOD score on the training part, set its threshold on validation, write ood.safetensors.

    Returns the `ood` section of metrics.json and (means, precision, threshold), or None without a training and a
    validation part. The energy score's false alarms at its own validation threshold are reported beside it.

    Args:
        run_dir: the run's folder; ood.safetensors is written there.
        outputs: {part: (logits, features)} of the run's parts (train, val, and test when there).
        y: {part: (N,) true class indices}; the training part's fit the class means.
        num_classes: the model's number of classes.
        false_alarm: the fraction of validation images the threshold flags.
    """
    if "train" not in outputs or "val" not in outputs or len(y["train"]) < 2:
        return None
    means, precision = fit_mahalanobis(outputs["train"][1], y["train"], num_classes)
    scores = {k: mahalanobis_score(f, means, precision) for k, (_, f) in outputs.items() if k != "train"}
    threshold = threshold_for(scores["val"], false_alarm)
    save_ood(run_dir, means, precision)
    out = {
        "method": OOD_METHOD,
        "file": OOD_FILE,
        "threshold": threshold,
        "false_alarm_target": false_alarm,
        "fitted_on": f"{len(y['train'])} training images (means, Ledoit-Wolf covariance); "
        f"threshold: validation quantile {1 - false_alarm:g} of {len(y['val'])} images",
        "val_flagged": float((scores["val"] > threshold).mean()),
    }
    if "test" in scores:
        out["test_flagged"] = float((scores["test"] > threshold).mean())
        energy_val, energy_test = energy_score(outputs["val"][0]), energy_score(outputs["test"][0])
        out["energy_test_flagged"] = float((energy_test > threshold_for(energy_val, false_alarm)).mean())
    return out, (means, precision, threshold)


def write_predictions(
    path: Path, paths: list[str], true_names: list[str], class_names: list[str], probs: np.ndarray
) -> None:
    """predictions.csv: path, true class, predicted class, confidence, then one probability column per class.

    Args:
        path: the CSV written (atomically).
        paths: each image's path, one row each.
        true_names: each image's true class name.
        class_names: the model's classes, in the order of the columns of `probs`.
        probs: (N, K) probabilities; the predicted class is their argmax.
    """
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "true", "pred", "confidence"] + [f"p_{c}" for c in class_names])
    for name, true, p in zip(paths, true_names, probs):
        w.writerow([name, true, class_names[int(p.argmax())], f"{p.max():.6f}"] + [f"{v:.6f}" for v in p])
    io.write_text(path, buf.getvalue())


def evaluate_run(
    run_dir: str | os.PathLike,
    cfg: RunConfig,
    data: PreparedData,
    model: torch.nn.Module,
    *,
    progress: bool = True,
    extra: dict | None = None,
) -> dict:
    """Write metrics.json, predictions.csv and figures/ into run_dir, and the calibration into its model.json.

    Args:
        run_dir: the run folder (its model.json, when there, gets temperature, review threshold, OOD and labs).
        cfg: the run's config (bootstrap, review threshold, OOD false alarms, labs).
        data: the prepared images, labels and split the model was trained on.
        model: the trained network.
        progress: show progress bars.
        extra: more provenance to record (e.g. train_seconds).

    Returns:
        The metrics dict, as written to metrics.json.
    """
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    names = data.class_names
    parts = {k: np.asarray(v) for k, v in data.parts.items()}
    outputs = {
        k: predict_outputs(model, data.images, idx, progress=progress, desc=f"evaluating {k}")
        for k, idx in parts.items()
        if len(idx)
    }
    logits = {k: v[0] for k, v in outputs.items()}
    y = {k: data.labels[idx] for k, idx in parts.items()}

    temperature = fit_temperature(logits["val"], y["val"]) if "val" in logits and len(np.unique(y["val"])) > 1 else 1.0
    metrics = _classification(run_dir, cfg, data, parts, logits, y, temperature)
    fitted = fit_ood_score(run_dir, outputs, y, len(names), cfg.eval.ood_false_alarm)
    ood = fitted[0] if fitted is not None else None
    if ood is not None:
        metrics["ood"] = ood
    if data.lab_tests or cfg.eval.labs:
        metrics["labs"] = evaluate_labs(
            run_dir,
            cfg,
            data,
            model,
            temperature,
            metrics["review_threshold"],
            fitted[1] if fitted else None,
            test=outputs.get("test"),
            progress=progress,
        )
    metrics["provenance"] = _provenance(cfg, data, parts, extra)
    io.write_json(run_dir / "metrics.json", metrics)
    if (run_dir / METADATA_FILE).exists():  # calibration goes with the model, for predict / serve
        _store_calibration(run_dir, metrics)
    _figures(run_dir / "figures", cfg, data, parts, logits, y, temperature, metrics.get("test"))
    metrics["provenance"]["evaluate_seconds"] = round(time.perf_counter() - t0, 2)
    return metrics


def _classification(
    run_dir: Path, cfg: RunConfig, data: PreparedData, parts: dict, logits: dict, y: dict, temperature: float
) -> dict:
    """Temperature, metrics per part (the test part with CIs, calibrated ECE and its review figures), the review
    threshold; predictions.csv of the test part."""
    names = data.class_names
    metrics: dict = {"temperature": temperature}
    if "test" in logits:
        raw = softmax(logits["test"])
        cal = apply_temperature(logits["test"], temperature)
        test = classification_metrics(y["test"], raw, names, n_bootstrap=cfg.eval.bootstrap, seed=cfg.seed)
        test["ece_calibrated"] = expected_calibration_error(cal, y["test"])
        metrics["test"] = test
        write_predictions(
            run_dir / "predictions.csv",
            [data.relpaths[i] for i in parts["test"]],
            [names[data.labels[i]] for i in parts["test"]],
            names,
            raw,
        )
    for part in ("train", "val"):
        if part in logits:
            metrics[part] = classification_metrics(y[part], softmax(logits[part]), names, n_bootstrap=0)
    val_cal = apply_temperature(logits["val"], temperature) if "val" in logits else None
    review = cfg.eval.review_threshold or (choose_review_threshold(val_cal, y["val"]) if val_cal is not None else 0.9)
    metrics["review_threshold"] = review
    if "test" in logits:
        cal = apply_temperature(logits["test"], temperature)
        flagged = cal.max(1) < review
        right = cal.argmax(1) == y["test"]
        metrics["test"]["review_fraction"] = float(flagged.mean())
        metrics["test"]["accuracy_unflagged"] = float(right[~flagged].mean()) if (~flagged).any() else None
    return metrics


_SOURCE_KEYS = (
    "kind",
    "files",
    "images",
    "classes",
    "unreadable",
    "empty_classes",
    "warnings",
    "duplicate_groups",
    "conflicting_groups",
    "dropped_by_split",
    "groups",
    "split_groups",
    "labs",
)


def _provenance(cfg: RunConfig, data: PreparedData, parts: dict, extra: dict | None) -> dict:
    return {
        "data": data.source.get("root"),
        "data_fingerprint": data.source.get("fingerprint"),
        "dataset": {k: data.source.get(k) for k in _SOURCE_KEYS if k in data.source},
        "split_counts": data.split.class_counts() if data.split is not None else None,
        "split_seed": cfg.split_seed,
        "seed": cfg.seed,
        "sizes": {k: int(len(v)) for k, v in parts.items()},
        "model": cfg.model.name,
        "pretrained": cfg.model.pretrained or "none (trained from scratch)",
        "input_size": cfg.data.input_size,
        "environment": environment(),
        **(extra or {}),
    }


_OOD_KEYS = ("method", "file", "threshold", "false_alarm_target", "fitted_on")  # metrics.json has more
_TEST_KEYS = ("accuracy", "f1_macro", "f1_weighted", "ece", "ece_calibrated")


def _store_calibration(run_dir: Path, metrics: dict) -> None:
    """model.json's calibration, OOD and labs sections from the metrics, re-sealed (ood.safetensors changed too);
    a section the metrics lack is removed, so no stale threshold survives a re-evaluation."""
    ood = metrics.get("ood")
    update_description(
        run_dir,
        ood={k: ood[k] for k in _OOD_KEYS} if ood is not None else None,
        labs=lab_summary(metrics["labs"]) if "labs" in metrics else None,  # what the card says of other labs
        temperature=metrics["temperature"],
        review_threshold=metrics["review_threshold"],
        test_metrics={k: metrics.get("test", {}).get(k) for k in _TEST_KEYS},
    )


def _figures(
    figures: Path,
    cfg: RunConfig,
    data: PreparedData,
    parts: dict,
    logits: dict,
    y: dict,
    temperature: float,
    test: dict | None,
) -> None:
    """curves.png (from history.csv) and, with a test part, the confusion matrix, reliability diagram, a grid of
    predictions and the most confident mistakes."""
    name = cfg.model.name
    if (figures.parent / "history.csv").exists():
        plot_training_curves(figures.parent / "history.csv", figures / "curves.png", title=f"{name}: training curves")
    if test is None:
        return
    names = data.class_names
    plot_confusion_matrix(
        np.asarray(test["confusion_matrix"]),
        names,
        figures / "confusion.png",
        normalize="both",
        title=f"{name}: test confusion matrix",
    )
    plot_reliability_diagram(
        softmax(logits["test"]),
        y["test"],
        figures / "reliability.png",
        probs_calibrated=apply_temperature(logits["test"], temperature),
        title=f"{name}: reliability (T={temperature:.2f})",
    )
    if cfg.eval.grid_images:
        rng = np.random.default_rng(cfg.seed)
        size = min(cfg.eval.grid_images, len(parts["test"]))
        pick = np.sort(rng.choice(len(parts["test"]), size=size, replace=False))
        imgs = np.asarray(data.images[parts["test"][pick]])
        probs = softmax(logits["test"][pick])
        plot_prediction_grid(
            imgs, y["test"][pick], probs.argmax(1), probs, names, figures / "predictions.png", n=len(pick)
        )
    probs = softmax(logits["test"])
    wrong = np.flatnonzero(probs.argmax(1) != y["test"])
    top = wrong[np.argsort(-probs[wrong].max(1))][:12]
    images = np.asarray(data.images[parts["test"][top]]) if len(top) else np.zeros((0, 8, 8, 3), np.uint8)
    plot_confident_mistakes(images, y["test"][top], probs[top], names, figures / "mistakes.png", n=12)

"""How well a detector finds and counts cells in smear photographs, and its operating thresholds, chosen by the same
rule.

Per class: precision and recall at one IoU (each true box matched to at most one found box, by the assignment
that maximises matches), mean average precision at that IoU (torchmetrics, COCO's definition), and the count
error per photograph. Operating thresholds are chosen here on validation photographs, never on test ones.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import box_iou

from bloodcell.data.fields import FIELD_CLASSES, FieldAnnotation
from bloodcell.data.images import open_rgb
from bloodcell.detect.base import Detections, FieldDetector, keep_above
from bloodcell.evaluate.machine import cpu_line
from bloodcell.progress import progress_bar


# ---------------------------------------------------------------- matching and operating thresholds
# One rule: the run chooses a detector's thresholds by it and its report measures with it.


def matched(found: np.ndarray, truth: np.ndarray, match_iou: float) -> int:
    """How many true boxes are found: one-to-one matches with IoU >= match_iou, as many as possible."""
    if len(found) == 0 or len(truth) == 0:
        return 0
    iou = box_iou(torch.as_tensor(found, dtype=torch.float32), torch.as_tensor(truth, dtype=torch.float32)).numpy()
    ok = iou >= match_iou
    rows, cols = linear_sum_assignment(ok, maximize=True)
    return int(ok[rows, cols].sum())


def class_counts(found: Sequence[Detections], truth: Sequence[FieldAnnotation], cls: str, match_iou: float) -> dict:
    """tp/fp/fn over all photographs and the count error per photograph, for one class."""
    k = FIELD_CLASSES.index(cls)
    tp = fp = fn = 0
    n_found, n_true = [], []
    for det, ann in zip(found, truth):
        boxes = det.boxes[det.labels == k]
        true_boxes = ann.boxes[ann.labels == k]
        hit = matched(boxes, true_boxes, match_iou)
        tp, fp, fn = tp + hit, fp + len(boxes) - hit, fn + len(true_boxes) - hit
        n_found.append(len(boxes))
        n_true.append(len(true_boxes))
    n_found, n_true = np.array(n_found), np.array(n_true)
    err = n_found - n_true
    has = n_true > 0
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
    counted = count_errors(n_found, n_true)
    return {
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_total": int(n_true.sum()),
        "found_total": int(n_found.sum()),
        "count_mae": counted["mae"],
        "count_bias": counted["bias"],
        # the per-photograph error relative to its true count, over photographs that have the class
        "count_rel_error": float((np.abs(err[has]) / n_true[has]).mean()) if has.any() else float("nan"),
        "count_error_ratio": counted["error_ratio"],
        "count_exact": counted["exact"],
        "photos_with_class": int(has.sum()),
    }


def count_errors(found: np.ndarray, truth: np.ndarray) -> dict:
    """Counts per photograph against the true ones: the error of the whole count (mean |found - true| over the mean
    true count, photographs without the class too; issue 25's figure), the mean absolute error, the bias and the
    fraction of photographs counted exactly."""
    err = np.asarray(found, float) - np.asarray(truth, float)
    total = float(np.sum(truth))
    return {
        "error_ratio": float(np.abs(err).sum() / total) if total else float("nan"),
        "mae": float(np.abs(err).mean()) if len(err) else float("nan"),
        "bias": float(err.mean()) if len(err) else float("nan"),
        "exact": float((err == 0).mean()) if len(err) else float("nan"),
        "photos": int(len(err)),
    }


def choose_thresholds(
    raw: Sequence[Detections], truth: Sequence[FieldAnnotation], match_iou: float = 0.5
) -> dict[str, float]:
    """Per class, the lowest score kept: best F1 for white cells and platelets (boxes matter: they are cropped or
    located), smallest count error for red cells (mean |found - true| over the mean true count: their number is what
    is reported), F1 breaking ties."""
    chosen = {}
    for k, cls in enumerate(FIELD_CLASSES):
        scores = np.concatenate([d.scores[d.labels == k] for d in raw] or [np.zeros(0)])
        if len(scores) == 0:
            chosen[cls] = 0.5
            continue
        # quantiles alone are too coarse where most candidates are background (a few white cells among thousands of
        # low-scoring boxes put 2 quantiles across all of them), so every hundredth of the score range is tried too
        candidates = np.unique(np.concatenate([np.quantile(scores, np.linspace(0, 1, 41)), np.arange(0.01, 1.0, 0.01)]))
        candidates = candidates[candidates <= scores.max()]
        best, best_key = candidates[0], None
        for t in candidates:
            only_this = {**{c: 0.0 for c in FIELD_CLASSES}, cls: float(t)}
            stats = class_counts([keep_above(d, only_this) for d in raw], truth, cls, match_iou)
            f1 = 0.0 if np.isnan(stats["f1"]) else stats["f1"]
            key = (-stats["count_error_ratio"], f1) if cls == "rbc" else (f1, -stats["count_rel_error"])
            key = tuple(-np.inf if np.isnan(v) else v for v in key)
            if best_key is None or key > best_key:
                best, best_key = t, key
        chosen[cls] = float(best)
    return chosen


def mean_average_precision(raw: Sequence[Detections], truth: Sequence[FieldAnnotation], match_iou: float) -> dict:
    """COCO-style AP at one IoU per class and their mean (torchmetrics; all boxes, before thresholds)."""
    # COCO's rule: the 100 highest-scoring boxes per photograph (BCCD photographs hold at most about 30 cells)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[match_iou], class_metrics=True)
    preds = [
        dict(
            boxes=torch.as_tensor(d.boxes, dtype=torch.float32),
            scores=torch.as_tensor(d.scores, dtype=torch.float32),
            labels=torch.as_tensor(d.labels, dtype=torch.int64),
        )
        for d in raw
    ]
    target = [
        dict(boxes=torch.as_tensor(a.boxes, dtype=torch.float32), labels=torch.as_tensor(a.labels, dtype=torch.int64))
        for a in truth
    ]
    metric.update(preds, target)
    out = metric.compute()
    per_class = {
        FIELD_CLASSES[int(c)]: float(v) for c, v in zip(out["classes"].reshape(-1), out["map_per_class"].reshape(-1))
    }
    return {"per_class": {c: per_class.get(c, float("nan")) for c in FIELD_CLASSES}, "mean": float(out["map"])}


def detection_metrics(
    raw: Sequence[Detections],
    truth: Sequence[FieldAnnotation],
    thresholds: dict[str, float],
    match_iou: float = 0.5,
) -> dict:
    """Everything the report shows for one split: AP on all boxes, the rest at the operating thresholds.

    Args:
        raw: each photograph's detections, every candidate box (AP uses them all), in the order of `truth`.
        truth: the annotated photographs, as many as `raw`.
        thresholds: the operating score threshold per FIELD_CLASSES name, for precision, recall and counts.
        match_iou: the IoU at which a box matches a true one.
    """
    if len(raw) != len(truth):
        raise ValueError(f"{len(raw)} detection results for {len(truth)} photographs")
    kept = [keep_above(d, thresholds) for d in raw]
    ap = mean_average_precision(raw, truth, match_iou)
    return {
        "photos": len(truth),
        "match_iou": match_iou,
        "map": ap["mean"],
        "classes": {
            c: {"ap": ap["per_class"][c], "threshold": thresholds[c], **class_counts(kept, truth, c, match_iou)}
            for c in FIELD_CLASSES
        },
    }


def run_detector(
    detector: FieldDetector, photos: Sequence[FieldAnnotation], progress: bool = False, description: str = "detecting"
) -> tuple[list[Detections], float]:
    """Raw detections for each photograph and the mean seconds per photograph (decode excluded).

    Args:
        detector: any FieldDetector; its raw() gives every candidate box, before thresholds.
        photos: the annotated photographs, decoded from their paths.
        progress: show a progress bar.
        description: the progress bar's label.
    """
    out, seconds = [], 0.0
    with progress_bar(len(photos), description, enabled=progress) as advance:
        for ann in photos:
            image = np.asarray(open_rgb(ann.path))
            start = time.perf_counter()
            out.append(detector.raw([image])[0])
            seconds += time.perf_counter() - start
            advance()
    return out, seconds / max(len(photos), 1)


def machine_line() -> str:
    return f"{cpu_line()}, torch threads {torch.get_num_threads()}"


def metrics_table(metrics: dict) -> str:
    """Markdown table of one split's metrics."""
    rows = [
        "| class | AP@%.1f | precision | recall | F1 | threshold | count error / photo (abs) | (relative) | bias |"
        % metrics["match_iou"],
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for cls in FIELD_CLASSES:
        m = metrics["classes"][cls]
        rows.append(
            f"| {cls} | {m['ap']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
            f"{m['threshold']:.3f} | "
            f"{m['count_mae']:.2f} | {100 * m['count_rel_error']:.1f} % | {m['count_bias']:+.2f} |"
        )
    return "\n".join(rows)


def source_table(by_set: dict[str, dict[str, dict]], left_out: str | None = None) -> str:
    """One row per set and source: red-cell count, white-cell finding and counting, platelet recall, mAP."""
    match_iou = next(iter(next(iter(by_set.values())).values()))["match_iou"]
    rows = [
        "| set / source | photos | red cells: count error (bias / photo) | red P / R | white P / R | "
        "white count exact | platelet P / R | mAP@%.1f |" % match_iou,
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, groups in by_set.items():
        for src, m in groups.items():
            r, w, p = (m["classes"][c] for c in ("rbc", "wbc", "platelet"))
            label = f"{name} / {src}" if len(groups) > 1 or src != name else name
            label += " (left out)" if left_out and src == left_out else ""
            plt = f"{p['precision']:.3f} / {p['recall']:.3f}" if p["true_total"] else "none boxed"
            rows.append(
                f"| {label} | {m['photos']} | {100 * r['count_error_ratio']:.1f} % ({r['count_bias']:+.1f}) | "
                f"{r['precision']:.3f} / {r['recall']:.3f} | {w['precision']:.3f} / {w['recall']:.3f} | "
                f"{100 * w['count_exact']:.0f} % | {plt} | {m['map']:.3f} |"
            )
    return "\n".join(rows)

"""How well a detector finds and counts cells in smear photographs.

Per class: precision and recall at one IoU (each true box matched to at most one found box, by the assignment
that maximises matches), mean average precision at that IoU (torchmetrics, COCO's definition), and the count
error per photograph. Operating thresholds are chosen here on validation photographs, never on test ones.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from bloodcell.data.fields import FIELD_CLASSES, FieldAnnotation
from bloodcell.models.detector import (  # noqa: F401  (the matching rule lives with the detectors, which fit by it)
    Detections,
    FieldDetector,
    choose_thresholds,
    class_counts,
    matched,
)
from bloodcell.models.detector import keep_above


def mean_average_precision(raw: Sequence[Detections], truth: Sequence[FieldAnnotation], match_iou: float) -> dict:
    """COCO-style AP at one IoU per class and their mean (torchmetrics; all boxes, before thresholds)."""
    from torchmetrics.detection import MeanAveragePrecision

    # COCO's rule: the 100 highest-scoring boxes per photograph (BCCD photographs hold at most about 30 cells)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[match_iou], class_metrics=True)
    preds = [dict(boxes=torch.as_tensor(d.boxes, dtype=torch.float32), scores=torch.as_tensor(d.scores, dtype=torch.float32),
                  labels=torch.as_tensor(d.labels, dtype=torch.int64)) for d in raw]
    target = [dict(boxes=torch.as_tensor(a.boxes, dtype=torch.float32), labels=torch.as_tensor(a.labels, dtype=torch.int64))
              for a in truth]
    metric.update(preds, target)
    out = metric.compute()
    per_class = {FIELD_CLASSES[int(c)]: float(v) for c, v in zip(out["classes"].reshape(-1), out["map_per_class"].reshape(-1))}
    return {"per_class": {c: per_class.get(c, float("nan")) for c in FIELD_CLASSES}, "mean": float(out["map"])}


def detection_metrics(raw: Sequence[Detections], truth: Sequence[FieldAnnotation], thresholds: dict[str, float],
                      match_iou: float = 0.5, detector: FieldDetector | None = None) -> dict:
    """Everything the report shows for one split: AP on all boxes, the rest at the operating thresholds."""
    if len(raw) != len(truth):
        raise ValueError(f"{len(raw)} detection results for {len(truth)} photographs")
    kept = [keep_above(d, thresholds) for d in raw]
    ap = mean_average_precision(raw, truth, match_iou)
    return {
        "photos": len(truth),
        "match_iou": match_iou,
        "map": ap["mean"],
        "classes": {c: {"ap": ap["per_class"][c], "threshold": thresholds[c], **class_counts(kept, truth, c, match_iou)}
                    for c in FIELD_CLASSES},
    }


def run_detector(detector: FieldDetector, photos: Sequence[FieldAnnotation], progress: bool = False,
                 description: str = "detecting") -> tuple[list[Detections], float]:
    """Raw detections for each photograph and the mean seconds per photograph (decode excluded)."""
    from bloodcell.data.images import open_rgb
    from bloodcell.progress import progress_bar

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
    from bloodcell.evaluate.machine import cpu_line

    return f"{cpu_line()}, torch threads {torch.get_num_threads()}"


def metrics_table(metrics: dict) -> str:
    """Markdown table of one split's metrics."""
    rows = ["| class | AP@%.1f | precision | recall | F1 | threshold | count error / photo (abs) | (relative) | bias |" % metrics["match_iou"],
            "|---|---|---|---|---|---|---|---|---|"]
    for cls in FIELD_CLASSES:
        m = metrics["classes"][cls]
        rows.append(f"| {cls} | {m['ap']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['threshold']:.3f} | "
                    f"{m['count_mae']:.2f} | {100 * m['count_rel_error']:.1f} % | {m['count_bias']:+.2f} |")
    return "\n".join(rows)


def source_table(by_set: dict[str, dict[str, dict]], left_out: str | None = None) -> str:
    """One row per set and source: red-cell count, white-cell finding and counting, platelet recall, mAP."""
    rows = ["| set / source | photos | red cells: count error (bias / photo) | red P / R | white P / R | white count exact | "
            "platelet P / R | mAP@%.1f |" % next(iter(next(iter(by_set.values())).values()))["match_iou"],
            "|---|---|---|---|---|---|---|---|"]
    for name, groups in by_set.items():
        for src, m in groups.items():
            r, w, p = (m["classes"][c] for c in ("rbc", "wbc", "platelet"))
            label = f"{name} / {src}" if len(groups) > 1 or src != name else name
            label += " (left out)" if left_out and src == left_out else ""
            plt = f"{p['precision']:.3f} / {p['recall']:.3f}" if p["true_total"] else "none boxed"
            rows.append(f"| {label} | {m['photos']} | {100 * r['count_error_ratio']:.1f} % ({r['count_bias']:+.1f}) | "
                        f"{r['precision']:.3f} / {r['recall']:.3f} | {w['precision']:.3f} / {w['recall']:.3f} | "
                        f"{100 * w['count_exact']:.0f} % | {plt} | {m['map']:.3f} |")
    return "\n".join(rows)

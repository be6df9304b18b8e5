"""How many cells a photograph holds, from a detector's boxes: the rules compared where red cells touch and overlap.

A detector's boxes at its operating threshold are one count. Where cells overlap, boxes are lost (to the score
threshold, or to non-maximum suppression merging two cells into one), so two corrections are measured against it,
each fitted on validation photographs only:

- `boxes`:      the boxes kept at the class's operating threshold (what FieldReader reports).
- `scaled`:     those boxes times one factor per class, sum(true) / sum(boxes) over the validation photographs.
- `score_sum`:  the sum of every candidate box's score (no threshold), times sum(true) / sum(scores) on validation:
                a soft count in which two half-sure boxes over a clump add up to one cell.

benchmarks/detector_counting.py measures them per source; docs/fields.md says which was kept and why.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from bloodcell.data.fields import FIELD_CLASSES, FieldAnnotation
from bloodcell.detect.base import Detections
from bloodcell.detect.metrics import count_errors  # noqa: F401  (one formula, shared with the detection metrics)

COUNT_RULES = ("boxes", "scaled", "score_sum")


def raw_counts(raw: Sequence[Detections], cls: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Per photograph: boxes of `cls` at `threshold`, and the sum of all its candidate boxes' scores."""
    k = FIELD_CLASSES.index(cls)
    boxes = np.array([int(((d.labels == k) & (d.scores >= threshold)).sum()) for d in raw], float)
    scores = np.array([float(d.scores[d.labels == k].sum()) for d in raw])
    return boxes, scores


def true_counts(photos: Sequence[FieldAnnotation], cls: str) -> np.ndarray:
    return np.array([a.count(cls) for a in photos], float)


def fit_count_rules(raw: Sequence[Detections], photos: Sequence[FieldAnnotation], thresholds: dict[str, float]) -> dict:
    """Per class, each rule's factor fitted on these (validation) photographs."""
    fitted = {}
    for cls in FIELD_CLASSES:
        boxes, scores = raw_counts(raw, cls, thresholds[cls])
        truth = true_counts(photos, cls).sum()
        fitted[cls] = {
            "boxes": 1.0,
            "scaled": truth / boxes.sum() if boxes.sum() else 1.0,
            "score_sum": truth / scores.sum() if scores.sum() else 1.0,
        }
    return fitted


def predict_counts(raw: Sequence[Detections], cls: str, threshold: float, rule: str, factor: float) -> np.ndarray:
    """Per photograph, the count of `cls` that `rule` gives (see the module docstring).

    Args:
        raw: each photograph's detections, every candidate box (no threshold).
        cls: a FIELD_CLASSES name (rbc, wbc, platelet).
        threshold: the class's operating score threshold; the boxes counted score at least this.
        rule: one of COUNT_RULES: "boxes", "scaled" or "score_sum"; anything else is a ValueError.
        factor: the rule's fitted factor (fit_count_rules); unused by "boxes".
    """
    boxes, scores = raw_counts(raw, cls, threshold)
    if rule not in COUNT_RULES:
        raise ValueError(f"unknown count rule '{rule}'; known: {', '.join(COUNT_RULES)}")
    return boxes if rule == "boxes" else np.rint((boxes if rule == "scaled" else scores) * factor)

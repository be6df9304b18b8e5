"""The detectors' face: what a detector returns (Detections), the base class (FieldDetector), the table of detectors by
name with its decorator (register_detector), and the matching rule that a detector's fit and its report share.

Nothing here imports a detector: the built-ins (bloodcell.models.detectors) register themselves with
`register_detector`, and the factory (bloodcell.models.detector: create_detector, load_detector) imports them before
its first look-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from bloodcell.data.fields import FIELD_CLASSES, FieldAnnotation
from bloodcell.errors import ModelError

if TYPE_CHECKING:  # torch is imported where a detector learns or loads weights: the light install has none
    import torch

_DETECTORS: dict[str, Callable[..., "FieldDetector"]] = {}


@dataclass
class Detections:
    """Boxes found in one photograph: (N, 4) float32 x0 y0 x1 y1 pixels, labels index FIELD_CLASSES."""

    boxes: np.ndarray
    labels: np.ndarray
    scores: np.ndarray

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, keep: np.ndarray) -> "Detections":
        return Detections(self.boxes[keep], self.labels[keep], self.scores[keep])

    def of_class(self, cls: str) -> "Detections":
        return self.select(self.labels == FIELD_CLASSES.index(cls))

    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == i).sum()) for i, c in enumerate(FIELD_CLASSES)}


class FieldDetector:
    """Base class. Subclasses set `name`, implement `detect_one` and, when they learn, `fit`."""

    name = "detector"
    classes = FIELD_CLASSES

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)
        # per-class lowest score kept, chosen on validation photographs by fit (see evaluate.detect)
        self.score_thresholds: dict[str, float] = {c: 0.5 for c in FIELD_CLASSES}
        # the size of the cells it learned from, as it sees them (see cell_scale()); empty when not known
        self.cell_scale: dict[str, Any] = {}

    # -- what every detector provides
    def detect_one(self, image: np.ndarray) -> Detections:
        """All candidate boxes with their scores, before the operating thresholds."""
        raise NotImplementedError

    def fit(self, train: Sequence, val: Sequence, settings: Any, run_dir: Path, resume: bool, progress: bool) -> dict:
        """Learn from annotated photographs (FieldAnnotation); return a summary for the run's metrics."""
        return {}

    def state(self) -> dict[str, Any]:
        """JSON-able fitted settings beyond the constructor options (restored by load_state); subclasses extend it."""
        return {"cell_scale": self.cell_scale} if self.cell_scale else {}

    def load_state(self, state: dict[str, Any]) -> None:
        self.cell_scale = dict(state.get("cell_scale") or {})

    def tensors(self) -> dict[str, torch.Tensor]:
        """Learned weights to keep in detector.safetensors (none for a classical pipeline)."""
        return {}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def load_onnx_weights(self, path: Path) -> None:
        """Learned weights kept as the initializers of the detector's ONNX export (the bundled FCOS detector)."""
        raise ModelError(f"{path}: a '{self.name}' detector does not load its weights from an ONNX graph")

    # -- shared behaviour
    def raw(self, images: Sequence[np.ndarray]) -> list[Detections]:
        return [self.detect_one(_check_image(img)) for img in images]

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        """Boxes kept at the operating thresholds, one Detections per photograph."""
        return [self.apply_thresholds(d) for d in self.raw(images)]

    def apply_thresholds(self, det: Detections, thresholds: dict[str, float] | None = None) -> Detections:
        return keep_above(det, thresholds or self.score_thresholds)


# ---------------------------------------------------------------- matching and operating thresholds
# Here, not in evaluate/, because a detector's fit chooses its thresholds by the same rule its report measures with.


def matched(found: np.ndarray, truth: np.ndarray, match_iou: float) -> int:
    """How many true boxes are found: one-to-one matches with IoU >= match_iou, as many as possible."""
    import torch
    from torchvision.ops import box_iou

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
        "tp": tp, "fp": fp, "fn": fn,
        "precision": precision, "recall": recall, "f1": f1,
        "true_total": int(n_true.sum()), "found_total": int(n_found.sum()),
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


def cell_scale(photos: Sequence[FieldAnnotation], long_side: int | None) -> dict[str, Any]:
    """Red-cell box sides (sqrt of the box area) of training photographs, in the pixels the detector sees them in
    (the photograph resized to `long_side`; its own pixels when None): what a photograph at another magnification
    is told apart by (infer.field_checks)."""
    sides = []
    k = FIELD_CLASSES.index("rbc")
    for ann in photos:
        b = ann.boxes[ann.labels == k]
        scale = long_side / max(ann.width, ann.height) if long_side else 1.0
        sides.append(np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) * scale)
    sides = np.concatenate(sides or [np.zeros(0)])
    if not len(sides):
        return {}
    q = np.percentile(sides, [5, 50, 95])
    return {"rbc_side_px": {"p05": round(float(q[0]), 1), "p50": round(float(q[1]), 1), "p95": round(float(q[2]), 1)},
            "long_side": long_side, "photos": len(photos), "boxes": int(len(sides))}


def keep_above(det: Detections, thresholds: dict[str, float]) -> Detections:
    floor = np.array([thresholds[c] for c in FIELD_CLASSES], dtype=np.float32)
    return det.select(det.scores >= floor[det.labels]) if len(det) else det


def choose_thresholds(raw: Sequence[Detections], truth: Sequence[FieldAnnotation], match_iou: float = 0.5) -> dict[str, float]:
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
            stats = class_counts([keep_above(d, {**{c: 0.0 for c in FIELD_CLASSES}, cls: float(t)}) for d in raw], truth, cls, match_iou)
            f1 = 0.0 if np.isnan(stats["f1"]) else stats["f1"]
            key = (-stats["count_error_ratio"], f1) if cls == "rbc" else (f1, -stats["count_rel_error"])
            key = tuple(-np.inf if np.isnan(v) else v for v in key)
            if best_key is None or key > best_key:
                best, best_key = t, key
        chosen[cls] = float(best)
    return chosen


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = getattr(image, "shape", type(image).__name__)
        raise ModelError(f"a detector takes RGB photographs as H x W x 3 uint8 arrays, got {got}")
    return image


def register_detector(name: str) -> Callable:
    """Decorator: register a FieldDetector subclass (or factory taking its options) as `name`."""

    def decorate(factory: Callable) -> Callable:
        if name in _DETECTORS:
            raise ValueError(f"detector name '{name}' registered twice")
        _DETECTORS[name] = factory
        return factory

    return decorate

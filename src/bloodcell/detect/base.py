"""The detectors' face: what a detector returns (Detections), the base class (FieldDetector), the table of detectors
by name with its decorator (register_detector), and the helpers every detector shares (keep_above, cell_scale).

Nothing here imports a detector: the built-ins (bloodcell.detect.builtins) register themselves with
`register_detector`, and the factory (bloodcell.detect.registry: create_detector, load_detector) imports them before
its first look-up. A detector finds cells; what teaches it is its trainer, chosen by the run (bloodcell.detect.runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from bloodcell.data.fields import FIELD_CLASSES, FieldAnnotation
from bloodcell.errors import ModelError

if TYPE_CHECKING:  # torch is imported where a detector learns or loads weights: the light install has none
    import torch

DETECTORS: dict[str, Callable[..., "FieldDetector"]] = {}


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
    """Base class. Subclasses set `name` and implement `detect_one`; one that learns has a trainer (detect.runs)."""

    name = "detector"
    classes = FIELD_CLASSES

    def __init__(self, **options: Any) -> None:
        self.options = dict(options)
        # per-class lowest score kept, chosen on validation photographs by the run (detect.metrics.choose_thresholds)
        self.score_thresholds: dict[str, float] = {c: 0.5 for c in FIELD_CLASSES}
        # the size of the cells it learned from, as it sees them (see cell_scale()); empty when not known
        self.cell_scale: dict[str, Any] = {}

    # -- what every detector provides
    def detect_one(self, image: np.ndarray) -> Detections:
        """All candidate boxes with their scores, before the operating thresholds."""
        raise NotImplementedError

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
    return {
        "rbc_side_px": {"p05": round(float(q[0]), 1), "p50": round(float(q[1]), 1), "p95": round(float(q[2]), 1)},
        "long_side": long_side,
        "photos": len(photos),
        "boxes": int(len(sides)),
    }


def keep_above(det: Detections, thresholds: dict[str, float]) -> Detections:
    floor = np.array([thresholds[c] for c in FIELD_CLASSES], dtype=np.float32)
    return det.select(det.scores >= floor[det.labels]) if len(det) else det


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = getattr(image, "shape", type(image).__name__)
        raise ModelError(f"a detector takes RGB photographs as H x W x 3 uint8 arrays, got {got}")
    return image


def register_detector(name: str) -> Callable:
    """Decorator: register a FieldDetector subclass (or factory taking its options) as `name`."""

    def decorate(factory: Callable) -> Callable:
        if name in DETECTORS:
            raise ValueError(f"detector name '{name}' registered twice")
        DETECTORS[name] = factory
        return factory

    return decorate

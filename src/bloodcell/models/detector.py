"""Cell detectors for smear-field photographs: one face, one registry, one file format.

A detector takes RGB photographs (H x W x 3 uint8) and returns boxes, a class from FIELD_CLASSES and a score
per box. Every detector is saved as `detector.json` (name, options, fitted settings, operating thresholds)
plus `detector.safetensors` when it has learned weights; nothing is unpickled. An FCOS detector can also carry its
ONNX export (`detector.onnx`, described by detector.json's `onnx` section), which runs without PyTorch; a bundled one
keeps its weights only there (the graph's initializers, `onnx.state_dict: "initializers"`), and the torch FCOS loads
them from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from bloodcell.data.fields import FIELD_CLASSES, FieldAnnotation
from bloodcell.errors import ModelError
from bloodcell.extras import INSTALL_TRAIN, has_torch, missing_train_module
from bloodcell.io import write_bytes
from bloodcell.models.metadata import write_sealed_json
from bloodcell.models.seal import member, verify

if TYPE_CHECKING:  # torch is imported where a detector learns or loads weights: the light install has none
    import torch

DETECTOR_WEIGHTS = "detector.safetensors"
DETECTOR_METADATA = "detector.json"
DETECTOR_FORMAT = "bloodcell-detector"
# detector.json's onnx.state_dict when the ONNX export's initializers are the torch detector's weights (by state_dict name)
ONNX_STATE_DICT = "initializers"

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


def _registry() -> dict[str, Callable[..., FieldDetector]]:
    import bloodcell.models.detectors  # noqa: F401  (registers the built-in detectors on first use)

    return _DETECTORS


def list_detectors() -> list[str]:
    return list(_registry())


def create_detector(name: str, **options: Any) -> FieldDetector:
    registry = _registry()
    if name not in registry:
        raise ModelError(f"unknown detector '{name}'; known detectors: {', '.join(registry)}")
    try:
        detector = registry[name](**options)
    except TypeError as exc:
        raise ModelError(f"detector '{name}': {exc}") from None
    detector.name = name
    return detector


def save_detector(detector: FieldDetector, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write detector.json (+ detector.safetensors when it has weights) atomically; return the folder."""
    from safetensors.torch import save

    from bloodcell import __version__

    directory = Path(directory)
    meta = dict(metadata or {})
    tensors = {k: v.detach().cpu().contiguous() for k, v in detector.tensors().items()}
    meta.update(
        format=DETECTOR_FORMAT,
        format_version=1,
        detector=detector.name,
        classes=list(FIELD_CLASSES),
        options=detector.options,
        state=detector.state(),
        score_thresholds=detector.score_thresholds,
        weights=DETECTOR_WEIGHTS if tensors else None,
        bloodcell_version=__version__,
    )
    if tensors:
        write_bytes(directory / DETECTOR_WEIGHTS, save(tensors, metadata={"detector": detector.name}))
    write_sealed_json(directory / DETECTOR_METADATA, meta)  # and seal the folder (bloodcell.models.seal)
    return directory


def bundled_detector_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "default_detector"


def load_detector(path: str | os.PathLike | None = None) -> FieldDetector:
    """A saved detector: its folder, detector.json, or an .onnx file its detector.json describes; None or 'default':
    the one bundled with bloodcell.

    Without PyTorch (the light install), a folder whose detector.json has an `onnx` section (the bundled one has)
    loads as that ONNX export (`fcos-onnx`, bloodcell.models.detector_onnx), which finds the same cells. With PyTorch,
    a folder without a weights file whose `onnx` section says `"state_dict": "initializers"` (the bundled one) loads
    the torch detector's weights from that ONNX graph."""
    if path is None or str(path) == "default":
        path = bundled_detector_dir()
    path = Path(path)
    onnx_file = path if path.suffix.lower() == ".onnx" else None
    meta_file = path.with_name(DETECTOR_METADATA) if onnx_file else path / DETECTOR_METADATA if path.is_dir() else path
    if not meta_file.is_file():
        if onnx_file:
            raise ModelError(f"{path}: no {DETECTOR_METADATA} beside it (an ONNX detector is described by the {DETECTOR_METADATA} of its folder)")
        raise ModelError(f"{path}: no {DETECTOR_METADATA} (a detector folder holds {DETECTOR_METADATA} and maybe {DETECTOR_WEIGHTS} or detector.onnx)")
    verify(meta_file.parent)
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{meta_file}: not readable as JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != DETECTOR_FORMAT:
        raise ModelError(f"{meta_file}: not a bloodcell detector (format '{DETECTOR_FORMAT}' expected)")
    for key in ("detector", "options", "score_thresholds"):
        if key not in meta:
            raise ModelError(f"{meta_file}: missing key '{key}'")
    section = meta.get("onnx") if isinstance(meta.get("onnx"), dict) else None
    if section and section.get("file") is not None:
        member(meta_file.parent, section["file"], "onnx.file", meta_file)
    if meta.get("weights") is not None:
        member(meta_file.parent, meta["weights"], "weights", meta_file)
    if onnx_file is None and section and not has_torch():  # the light install runs the same detector's ONNX export
        onnx_file = meta_file.parent / str(section.get("file"))
    if onnx_file is not None and (not section or section.get("file") != onnx_file.name or not section.get("detector")):
        raise ModelError(f"{onnx_file}: {meta_file} does not describe it (no onnx section with file '{onnx_file.name}')")
    name = section["detector"] if onnx_file else meta["detector"]
    try:
        detector = create_detector(name, **meta["options"])
    except ModuleNotFoundError as exc:
        if missing_train_module(exc) is None:
            raise
        raise ModelError(f"the field detector ({meta['detector']}, {path}) runs on PyTorch, which this install lacks: {INSTALL_TRAIN}") from None
    detector.load_state(meta.get("state") or {})
    thresholds = meta["score_thresholds"]
    if set(thresholds) != set(FIELD_CLASSES):
        raise ModelError(f"{meta_file}: score_thresholds must name {', '.join(FIELD_CLASSES)}")
    detector.score_thresholds = {c: float(thresholds[c]) for c in FIELD_CLASSES}
    if onnx_file is not None:
        detector.load_onnx(onnx_file, section)
    elif meta.get("weights"):
        weights = meta_file.parent / meta["weights"]
        if not weights.is_file():
            raise ModelError(f"{meta_file}: names weights {weights.name} but the file is missing")
        from safetensors.torch import load_file

        try:
            detector.load_tensors(load_file(str(weights)))
        except Exception as exc:  # safetensors raises its own types for torn files
            raise ModelError(f"{weights}: cannot load detector weights ({exc})") from None
    elif section and section.get("state_dict") == ONNX_STATE_DICT:  # weights kept once, in the ONNX export
        detector.load_onnx_weights(meta_file.parent / str(section.get("file")))
    detector.metadata = meta
    detector.source = str(meta_file.parent)
    return detector

"""The FCOS detector without PyTorch: its network as ONNX (`detector.onnx`), everything around it in numpy.

The ONNX graph is the part of torchvision's FCOS between its transform and its postprocess: trunk, FPN and head,
taking one normalised image padded to a multiple of 32 (1 x 3 x H x W float32, H and W free) and giving, per FPN
level, the head's classification logits (1 x K x h x w, K counting the background), box regression (1 x 4 x h x w,
after the head's ReLU) and centerness (1 x 1 x h x w). This module does the rest as torchvision does it, so the
light install (`pip install bloodcell`, no PyTorch) finds the same cells as the PyTorch detector:

    uint8 photograph -> [0, 1] -> (x - mean) / std -> bilinear resize, long side `long_side` (torch's interpolate:
    output size int(side * scale), align_corners False, no antialiasing) -> zero padding to a multiple of 32
    -> network -> per level: score sqrt(sigmoid(cls) * sigmoid(ctr)), kept above min_score, its top 1000;
    boxes decoded from the level's anchor points (torchvision's BoxLinearCoder, normalize_by_size) and clipped to the
    resized image -> class-wise NMS at IoU 0.5 -> the best max_detections -> scaled back to the photograph's pixels.

It is registered as `fcos-onnx` and described by the `onnx` section of the FCOS detector's own detector.json (no
second copy of the metadata); `load_detector` picks it where PyTorch is missing. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from bloodcell.detect.base import Detections, FieldDetector, register_detector
from bloodcell.errors import ModelError
from bloodcell.models.onnx_runtime import onnx_session

DETECTOR_ONNX = "detector.onnx"  # described by detector.json's `onnx` section; a bundled detector's only weights file
# detector.json's onnx.state_dict when the ONNX export's initializers are the torch detector's weights (by
# state_dict name)
ONNX_STATE_DICT = "initializers"
ONNX_DETECTOR = "fcos-onnx"

# What the torch FCOS is built with (bloodcell.detect.fcos imports these, so both sides share one value).
IMAGE_MEAN = (0.485, 0.456, 0.406)  # per-channel RGB statistics the network's input is normalised with (ImageNet's)
IMAGE_STD = (0.229, 0.224, 0.225)
SIZE_DIVISIBLE = 32  # the resized image is zero-padded to a multiple of this (torchvision's batch_images)
NMS_IOU = 0.5
TOPK_CANDIDATES = 1000  # best-scoring candidates kept per level before NMS
FIRST_STRIDE = 8  # FPN level i has stride (and anchor size) 8 * 2**i
OUTPUTS = ("cls_logits", "bbox_regression", "bbox_ctrness")  # per level i: "<name>_<i>"


def level_sizes(levels: int) -> tuple[int, ...]:
    """The nominal stride, which is also the anchor size, of each FPN level, finest first."""
    return tuple(FIRST_STRIDE * 2**i for i in range(levels))


# ---------------------------------------------------------------- before the network


def resized_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(h, w) torchvision's transform resizes to: scale = long_side / long side, each side int(side * scale).

    int(), not round(): torch's interpolate truncates the product, so 1000 px at 384 / 1000 can become 383."""
    scale = min(long_side / min(height, width), long_side / max(height, width))
    return max(1, int(height * scale)), max(1, int(width * scale))


def _linear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights of bilinear interpolation along one axis (align_corners=False) as torch's CPU kernel
    computes them: src = (dst + 0.5) * scale - 0.5 with scale = in / out in float32, floored at 0. The kernel rounds
    the multiply-add once (a fused multiply-add): done here in float64, where it is exact, then rounded to float32."""
    scale = np.float64(np.float32(size_in) / np.float32(size_out))
    src = ((np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)  # src >= 0: truncation is floor
    w1 = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    w0 = (np.float32(1) - w1).astype(np.float32)
    i1 = np.minimum(i0 + 1, size_in - 1)
    return i0, i1, w0, w1


def resize_bilinear(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """A C x H x W float32 array resized to C x height x width like torch.nn.functional.interpolate(mode='bilinear',
    align_corners=False, antialias=False): each output pixel from the 2 x 2 source pixels around it."""
    _, h_in, w_in = x.shape
    if (h_in, w_in) == (height, width):
        return x.copy()
    y0, y1, wy0, wy1 = _linear_taps(h_in, height)
    x0, x1, wx0, wx1 = _linear_taps(w_in, width)
    # as torch sums: along the width first, then the height
    top = x[:, y0][:, :, x0] * wx0 + x[:, y0][:, :, x1] * wx1
    bottom = x[:, y1][:, :, x0] * wx0 + x[:, y1][:, :, x1] * wx1
    return (top * wy0[:, None] + bottom * wy1[:, None]).astype(np.float32)


def network_input(image: np.ndarray, long_side: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The network's input for an H x W x 3 uint8 photograph (1 x 3 x H' x W' float32, normalised, resized, padded)
    and the resized size (h, w) before padding."""
    x = image.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0)
    mean = np.asarray(IMAGE_MEAN, np.float32)[:, None, None]
    std = np.asarray(IMAGE_STD, np.float32)[:, None, None]
    x = (x - mean) / std  # normalised before resizing, as torchvision's transform does
    h, w = resized_size(image.shape[0], image.shape[1], long_side)
    x = resize_bilinear(x, h, w)
    ph, pw = (-(-h // SIZE_DIVISIBLE) * SIZE_DIVISIBLE, -(-w // SIZE_DIVISIBLE) * SIZE_DIVISIBLE)
    padded = np.zeros((1, 3, ph, pw), np.float32)
    padded[0, :, :h, :w] = x
    return padded, (h, w)


# ---------------------------------------------------------------- after the network


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (np.float32(1) / (np.float32(1) + np.exp(-x))).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression (torchvision.ops.nms): indices kept, best score first; a box is dropped when
    its IoU with a kept, better one is above `iou`. float32 throughout, as torch's CPU kernel."""
    order = np.argsort(-scores, kind="stable")
    boxes = boxes[order]
    x0, y0, x1, y1 = boxes.T
    areas = (x1 - x0) * (y1 - y0)
    alive = np.ones(len(order), bool)
    keep = []
    threshold = np.float32(iou)
    for i in range(len(order)):
        if not alive[i]:
            continue
        keep.append(i)
        rest = np.flatnonzero(alive[i + 1 :]) + i + 1
        if not len(rest):
            break
        w = np.maximum(np.float32(0), np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]))
        h = np.maximum(np.float32(0), np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):  # two empty boxes: 0 / 0 is NaN, kept, as in torch
            alive[rest[inter / (areas[i] + areas[rest] - inter) > threshold]] = False
    return order[np.asarray(keep, np.int64)]


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float) -> np.ndarray:
    """NMS within each label, best score first (torchvision.ops.batched_nms). Like torchvision on CPU, up to 1000
    boxes are shifted apart by label * (largest coordinate + 1) and suppressed together (the same float32 sums), more
    are suppressed class by class.

    Args:
        boxes: (N, 4) float32 (x0, y0, x1, y1).
        scores: (N,) float32.
        labels: (N,) int class of each box; boxes of different labels never suppress each other.
        iou: a box is dropped when its IoU with a kept, better one of its label is above this.
    """
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    if boxes.size > 4000:
        kept = np.concatenate(
            [np.flatnonzero(labels == c)[nms(boxes[labels == c], scores[labels == c], iou)] for c in np.unique(labels)]
        )
        return kept[np.argsort(-scores[kept], kind="stable")]
    offsets = labels.astype(np.float32) * (boxes.max() + np.float32(1))
    return nms(boxes + offsets[:, None], scores, iou)


def postprocess(
    levels: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    padded: tuple[int, int],
    resized: tuple[int, int],
    original: tuple[int, int],
    min_score: float,
    max_detections: int,
    topk: int = TOPK_CANDIDATES,
    nms_iou: float = NMS_IOU,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torchvision FCOS's postprocess_detections + the transform's box rescaling, for one image.

    Args:
        levels: per FPN level, finest first, the network's (cls K x h x w, reg 4 x h x w, ctr 1 x h x w).
        padded: (height, width) of the network's input.
        resized: (height, width) of the resized image inside it (boxes are clipped to it).
        original: (height, width) of the photograph, whose pixels the boxes are returned in.
        min_score: candidates scoring this or less are dropped before NMS.
        max_detections: at most this many boxes are returned, the best.
        topk: the best-scoring candidates kept per level before NMS.
        nms_iou: the IoU above which a box of the same label as a better one is suppressed.

    Returns:
        boxes (N x 4 float32, the photograph's pixels), labels (N, 0 = background) and scores, best first, as FCOS
        returns them.
    """
    all_boxes, all_scores, all_labels = [], [], []
    for size, (cls, reg, ctr) in zip(level_sizes(len(levels)), levels):
        k, h, w = cls.shape
        cls = cls.reshape(k, h * w).T  # (locations, K): location y * w + x, as the head flattens it
        reg = reg.reshape(4, h * w).T
        ctr = ctr.reshape(1, h * w).T
        scores = np.sqrt(_sigmoid(cls) * _sigmoid(ctr)).reshape(-1)
        candidates = np.flatnonzero(scores > np.float32(min_score))
        best = np.argsort(-scores[candidates], kind="stable")[:topk]
        candidates = candidates[best]
        location, label = candidates // k, candidates % k
        # anchor points: a size x size box centred on (x * stride_x, y * stride_y), the stride being the padded
        # image's side // the level's side (torchvision's AnchorGenerator; 57, not 64, for 288 px over 5 cells)
        stride_y, stride_x = padded[0] // h, padded[1] // w
        half = np.float32(np.round(size / 2))
        ax = (location % w).astype(np.float32) * np.float32(stride_x)
        ay = (location // w).astype(np.float32) * np.float32(stride_y)
        anchors = np.stack([ax - half, ay - half, ax + half, ay + half], axis=1)
        all_boxes.append(_decode(reg[location], anchors, resized))
        all_scores.append(scores[candidates])
        all_labels.append(label)
    boxes = np.concatenate(all_boxes).astype(np.float32)
    scores = np.concatenate(all_scores).astype(np.float32)
    labels = np.concatenate(all_labels).astype(np.int64)
    keep = batched_nms(boxes, scores, labels, nms_iou)[:max_detections]
    ratio = np.asarray(original, np.float32) / np.asarray(resized, np.float32)  # (height, width)
    scale = np.array([ratio[1], ratio[0], ratio[1], ratio[0]], np.float32)
    return (boxes[keep] * scale).astype(np.float32), labels[keep], scores[keep]


def _decode(codes: np.ndarray, anchors: np.ndarray, resized: tuple[int, int]) -> np.ndarray:
    """BoxLinearCoder(normalize_by_size=True).decode, then clipped to the resized image."""
    cx = np.float32(0.5) * (anchors[:, 0] + anchors[:, 2])
    cy = np.float32(0.5) * (anchors[:, 1] + anchors[:, 3])
    bw, bh = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    codes = codes * np.stack([bw, bh, bw, bh], axis=1)
    boxes = np.stack([cx - codes[:, 0], cy - codes[:, 1], cx + codes[:, 2], cy + codes[:, 3]], axis=1)
    h, w = resized
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, w)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, h)
    return boxes.astype(np.float32)


# ---------------------------------------------------------------- the detector


class FCOSOptions(FieldDetector):
    """The options both FCOS detectors take, with their defaults and checks: the PyTorch one (`fcos`, which builds
    the network from them) and the ONNX one (for which those of the network only describe the graph)."""

    def __init__(
        self,
        long_side: int = 320,
        fpn_channels: int = 128,
        head_convs: int = 2,
        trunk: str = "layer3",
        min_score: float = 0.05,
        max_detections: int = 300,
        bf16: bool = True,
    ) -> None:
        super().__init__(
            long_side=long_side,
            fpn_channels=fpn_channels,
            head_convs=head_convs,
            trunk=trunk,
            min_score=min_score,
            max_detections=max_detections,
            bf16=bf16,
        )
        if not 64 <= int(long_side) <= 4096:
            raise ModelError(f"detector '{self.name}': long_side must be 64..4096, got {long_side}")
        self.long_side = int(long_side)
        self.min_score = float(min_score)
        self.max_detections = int(max_detections)


@register_detector(ONNX_DETECTOR)
class FCOSOnnxDetector(FCOSOptions):
    """The FCOS detector's ONNX export run by ONNX Runtime, with numpy around it (see the module docstring).

    It takes the FCOS detector's options (those of the network only describe the graph) and is loaded by
    `load_detector` from a detector.json whose `onnx` section names the .onnx file; it cannot be trained."""

    name = ONNX_DETECTOR

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.session: Any = None
        self.onnx_file: Path | None = None
        self.output_names: list[str] = []
        self._input = "input"

    def load_onnx(self, path: str | Path, section: dict) -> None:
        """Open the graph at `path` (described by `section`, detector.json's `onnx`) with ONNX Runtime on the CPU."""
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"{path}: the detector's ONNX file is missing (detector.json's onnx section names it)")
        session = onnx_session(path)
        names = [o.name for o in session.get_outputs()]
        levels = sum(n.startswith(f"{OUTPUTS[0]}_") for n in names)
        want = [f"{o}_{i}" for i in range(levels) for o in OUTPUTS]
        if not levels or sorted(names) != sorted(want):
            raise ModelError(
                f"{path}: not an FCOS detector graph (outputs {names[:4]}..., expected {want[:3]}... per level)"
            )
        self.session, self.onnx_file, self.output_names = session, path, want
        self._input = session.get_inputs()[0].name

    def network(self, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The graph's outputs for a 1 x 3 x H x W input: per level (cls K x h x w, reg 4 x h x w, ctr 1 x h x w)."""
        if self.session is None:
            raise ModelError(
                f"detector '{ONNX_DETECTOR}' has no graph loaded: load it with load_detector from a "
                "folder whose detector.json has an onnx section"
            )
        out = dict(zip(self.output_names, self.session.run(self.output_names, {self._input: x})))
        levels = len(self.output_names) // len(OUTPUTS)
        return [tuple(out[f"{o}_{i}"][0] for o in OUTPUTS) for i in range(levels)]

    def detect_one(self, image: np.ndarray) -> Detections:
        x, resized = network_input(image, self.long_side)
        boxes, labels, scores = postprocess(
            self.network(x), x.shape[2:], resized, image.shape[:2], self.min_score, self.max_detections
        )
        keep = labels > 0  # label 0 is the background; FIELD_CLASSES index i is label i + 1
        return Detections(boxes[keep], labels[keep] - 1, scores[keep])


# ---------------------------------------------------------------- parity with the PyTorch detector


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) x0 y0 x1 y1 boxes, float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = w * h
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def agreement(want: Detections, got: Detections) -> dict:
    """How closely `got` reproduces `want`: boxes paired one-to-one by IoU (Hungarian), then the lowest IoU of a
    pair, the largest score difference and the label disagreements; `unpaired` counts boxes one side lacks."""
    out = {
        "boxes": len(want),
        "unpaired": abs(len(want) - len(got)),
        "min_iou": 1.0,
        "max_score_diff": 0.0,
        "label_mismatches": 0,
    }
    if len(want) and len(got):
        iou = box_iou(want.boxes, got.boxes)
        rows, cols = linear_sum_assignment(iou, maximize=True)
        out["min_iou"] = float(iou[rows, cols].min())
        out["max_score_diff"] = float(np.abs(want.scores[rows] - got.scores[cols]).max())
        out["label_mismatches"] = int((want.labels[rows] != got.labels[cols]).sum())
    elif len(want) or len(got):
        out["min_iou"] = 0.0
    return out

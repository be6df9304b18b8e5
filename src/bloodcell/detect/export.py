"""The FCOS detector's ONNX export: what the install without PyTorch runs (bloodcell.detect.fcos_onnx).

`export_bundled_detector` writes the network to detector.onnx, checks it against PyTorch and describes it in the
folder's own detector.json (its `onnx` section). The graph's initializers are the model's own parameters and buffers
under their state_dict names, so the bundled folder keeps its weights once, in detector.onnx.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime
import torch
from torch import nn

from bloodcell import io
from bloodcell.detect.fcos import FCOSDetector, graph_tensors
from bloodcell.detect.fcos_onnx import (
    DETECTOR_ONNX,
    ONNX_DETECTOR,
    ONNX_STATE_DICT,
    OUTPUTS,
    FCOSOnnxDetector,
    agreement,
    network_input,
)
from bloodcell.detect.registry import DETECTOR_METADATA, DETECTOR_WEIGHTS, create_detector, load_detector
from bloodcell.errors import ModelError
from bloodcell.models.seal import member, seal

ONNX_TOLERANCE = 1e-3  # largest difference allowed in the network's raw outputs (logits, box codes) vs PyTorch
PARITY = {"min_iou": 0.99, "max_score_diff": 1e-3}  # detections at the operating thresholds, per paired box


class _RawOutputs(nn.Module):
    """FCOS between its transform and its postprocess: a normalised, padded 1 x 3 x H x W image -> per FPN level the
    head's classification logits, box regression (after the head's ReLU) and centerness, as 1 x C x h x w maps
    (FCOSHead.forward without its flattening, which bloodcell.detect.fcos_onnx does in numpy)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = model.backbone, model.head

    def forward(self, x):
        cls, reg = self.head.classification_head, self.head.regression_head
        outputs = []
        for feature in self.backbone(x).values():
            box_feature = reg.conv(feature)
            outputs += [
                cls.cls_logits(cls.conv(feature)),
                nn.functional.relu(reg.bbox_reg(box_feature)),
                reg.bbox_ctrness(box_feature),
            ]
        return tuple(outputs)


def _levels(detector: FCOSDetector) -> int:
    return len(detector.model.anchor_generator.sizes)


def export_graph(detector: FCOSDetector, path: Path, opset: int = 17) -> str:
    """Write the detector's network (see _RawOutputs) to `path` with free H and W; returns the exporter's name.

    The graph keeps the model's own tensors as its initializers, under their state_dict names, so it is also where
    the weights are kept (graph_tensors reads them back): no constant folding, and BatchNorm stays BatchNormalization
    (inference mode, with running_mean/var), not folded into the convolutions (TrainingMode.PRESERVE skips the
    exporter's eval-mode fusion; the module is in eval mode). ONNX Runtime fuses BatchNorm itself when it opens the
    graph. The exporter stores bit-equal tensors once (in a residual block both BatchNorm biases, added together,
    train alike) and gives the other name with an Identity node."""
    names = [f"{o}_{i}" for i in range(_levels(detector)) for o in OUTPUTS]
    axes = {"input": {2: "height", 3: "width"}, **{n: {2: f"height_{n[-1]}", 3: f"width_{n[-1]}"} for n in names}}
    net = _RawOutputs(detector.model).eval()
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
            torch.onnx.export(
                net,
                (torch.zeros(1, 3, 256, 320),),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=names,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=False,
                training=torch.onnx.TrainingMode.PRESERVE,
            )
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"ONNX export of the detector failed: {type(exc).__name__}: {first_line}") from None
    return "torchscript"


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of learned tensors: name, dtype, shape and bytes of each, by name, without BatchNorm's
    num_batches_tracked (not kept in the ONNX graph). The same whether the weights come from detector.safetensors
    or from detector.onnx, so detector.json can record which trained weights its graph holds."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        if name.endswith(".num_batches_tracked"):
            continue
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _same_tensors(detector: FCOSDetector, arrays: dict[str, np.ndarray]) -> list[str]:
    """Names of the detector's tensors the graph does not hold bit for bit (num_batches_tracked aside)."""
    bad = []
    for k, v in detector.model.state_dict().items():
        if k.endswith(".num_batches_tracked"):
            continue
        a = arrays.get(k)
        if a is None or a.shape != tuple(v.shape) or a.tobytes() != v.detach().cpu().contiguous().numpy().tobytes():
            bad.append(k)
    bad += sorted(set(arrays) - set(detector.model.state_dict()))
    return bad


def check_photos(n: int = 6, seed: int = 0) -> list[np.ndarray]:
    """Generated smear-like photographs of several shapes (landscape, portrait, square, odd sizes that round down,
    one smaller than long_side), for checking an export where no real photographs are given."""
    rng = np.random.default_rng(seed)
    sizes = [(480, 640), (640, 480), (500, 500), (750, 1000), (333, 517), (200, 300)]
    photos = []
    for h, w in sizes[:n]:
        yy, xx = np.mgrid[:h, :w]
        img = np.empty((h, w, 3), np.float32)
        img[:] = (236, 226, 232)
        for _ in range(30):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.04, 0.09) * min(h, w)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = (214, 140, 150)
        r = 0.1 * min(h, w)
        img[(xx - w / 2) ** 2 + (yy - h / 2) ** 2 <= r * r] = (110, 60, 150)
        photos.append(np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8))
    return photos


def check_onnx(detector: FCOSDetector, onnx_detector: FCOSOnnxDetector, photos: Sequence[np.ndarray]) -> dict:
    """Run both detectors on `photos`; the figures the export is judged by (and recorded with)."""
    raw = pre = 0.0
    worst = {
        "photos": len(photos),
        "boxes": 0,
        "unpaired": 0,
        "min_iou": 1.0,
        "max_score_diff": 0.0,
        "label_mismatches": 0,
    }
    raw_boxes = {"boxes": 0, "unpaired": 0}
    net = _RawOutputs(detector.model).eval()
    for image in photos:
        x, _ = network_input(image, detector.long_side)
        with torch.inference_mode():
            torch_x = detector.model.transform([torch.tensor(image).permute(2, 0, 1).float().div_(255.0)])[0].tensors
            want = [t.numpy() for t in net(torch.from_numpy(x))]
        pre = max(pre, float(np.abs(torch_x.numpy() - x).max()) if torch_x.shape == x.shape else float("inf"))
        got = [v for level in onnx_detector.network(x) for v in level]
        raw = max(raw, max(float(np.abs(w[0] - g).max()) for w, g in zip(want, got)))
        torch_raw, onnx_raw = detector.raw([image])[0], onnx_detector.raw([image])[0]
        raw_boxes["boxes"] += len(torch_raw)
        raw_boxes["unpaired"] += abs(len(torch_raw) - len(onnx_raw))
        a = agreement(detector.apply_thresholds(torch_raw), onnx_detector.apply_thresholds(onnx_raw))
        worst.update(
            boxes=worst["boxes"] + a["boxes"],
            unpaired=worst["unpaired"] + a["unpaired"],
            label_mismatches=worst["label_mismatches"] + a["label_mismatches"],
            min_iou=min(worst["min_iou"], a["min_iou"]),
            max_score_diff=max(worst["max_score_diff"], a["max_score_diff"]),
        )
    return {"preprocess_max_abs_diff": pre, "max_abs_diff": raw, "at_thresholds": worst, "before_thresholds": raw_boxes}


def export_bundled_detector(
    folder: str | Path, photos: Sequence[np.ndarray] | None = None, source: str = "", opset: int = 17
) -> dict:
    """Make `folder` a single-copy detector folder: detector.json + detector.onnx, the FCOS network exported to ONNX
    with its weights as the graph's initializers (export_graph), checked against PyTorch, and described by the
    folder's own detector.json (`onnx` section). detector.safetensors, if there, is then removed: the torch FCOS loads
    its weights from detector.onnx. Returns the `onnx` section.

    The weights come from detector.safetensors (a training run's, copied in by tools/bundle_detector.py) or, in a
    folder that has only the ONNX, from detector.onnx itself (re-export: they must be the ones its detector.json
    records). The check runs both on `photos` (default: check_photos()) and refuses (ModelError, nothing written)
    unless the graph holds the detector's tensors bit for bit, the network's outputs agree within ONNX_TOLERANCE and,
    at the operating thresholds, every photograph gives the same number of boxes, paired with IoU >= 0.99, the same
    labels and scores within 1e-3. The section records the SHA-256 of detector.onnx (`sha256`), of the weights it
    holds (`weights_sha256`, weights_digest: the same from either file) and of the training run's weights file it
    was exported from (`exported_from`).

    Args:
        folder: a detector folder (detector.json with detector.safetensors, or with detector.onnx alone).
        photos: H x W x 3 uint8 photographs the export is checked on; None: check_photos().
        source: what `photos` are, for the section's `checked_on` ("12 BCCD test photographs").
        opset: the ONNX opset to export with.
    """
    folder = Path(folder)
    meta = json.loads((folder / DETECTOR_METADATA).read_text())
    detector = load_detector(folder / DETECTOR_METADATA)
    if not isinstance(detector, FCOSDetector):
        raise ModelError(f"{folder}: only an fcos detector has an ONNX export, this one is '{detector.name}'")
    digest = weights_digest(detector.tensors())
    exported_from = _exported_from(folder, meta, digest)
    if photos is None:
        photos, source = check_photos(), "generated photographs"
    section, figures = _write_checked_export(detector, folder / DETECTOR_ONNX, photos, source, opset)
    section.update(
        weights_sha256=digest,
        exported_from=exported_from,
        checked_on=f"{len(photos)} {source}",
        **figures,
        versions={"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
    )
    weights_file = meta.get("weights")
    meta["weights"] = None  # kept once, in detector.onnx
    meta["onnx"] = section
    io.write_json(folder / DETECTOR_METADATA, meta)
    for name in {DETECTOR_WEIGHTS, weights_file} - {None}:
        (folder / name).unlink(missing_ok=True)
    seal(folder)  # detector.json + detector.onnx, as they are now
    return section


def _exported_from(folder: Path, meta: dict, digest: str) -> dict[str, str]:
    """The training run's weights file the export comes from, by SHA-256: the folder's own, or (a re-export) the one
    its detector.json records, when the graph's weights are still those (`digest`)."""
    previous = meta.get("onnx") if isinstance(meta.get("onnx"), dict) else {}
    if meta.get("weights"):  # a training run's weights file
        return {meta["weights"]: io.file_sha256(member(folder, meta["weights"], "weights", folder / DETECTOR_METADATA))}
    if previous.get("state_dict") == ONNX_STATE_DICT and previous.get("weights_sha256") == digest:
        return previous.get("exported_from") or {}  # the same weights, already exported once
    raise ModelError(
        f"{folder / DETECTOR_ONNX}: its weights are not the ones {DETECTOR_METADATA} records "
        f"(weights_sha256); bundle the detector again from its training run"
    )


def _write_checked_export(
    detector: FCOSDetector, target: Path, photos: Sequence[np.ndarray], source: str, opset: int
) -> tuple[dict, dict]:
    """Export to a temporary file, check it (weights by name, outputs, detections), then move it to `target`; returns
    the `onnx` section so far and the check's figures. Nothing is written when a check fails."""
    with tempfile.TemporaryDirectory(prefix="bloodcell-detector-") as work:
        tmp = Path(work) / DETECTOR_ONNX
        exporter = export_graph(detector, tmp, opset)
        differ = _same_tensors(detector, graph_tensors(tmp))
        if differ:
            raise ModelError(
                f"the detector's ONNX export does not hold its weights under their names "
                f"({', '.join(differ[:3])}); nothing written"
            )
        section = {"detector": ONNX_DETECTOR, "file": DETECTOR_ONNX}
        onnx_detector = create_detector(ONNX_DETECTOR, **detector.options)
        onnx_detector.score_thresholds = dict(detector.score_thresholds)
        onnx_detector.load_onnx(tmp, section)
        figures = check_onnx(detector, onnx_detector, photos)
        at = figures["at_thresholds"]
        if not (
            figures["max_abs_diff"] <= ONNX_TOLERANCE
            and at["unpaired"] == 0
            and at["label_mismatches"] == 0
            and at["min_iou"] >= PARITY["min_iou"]
            and at["max_score_diff"] <= PARITY["max_score_diff"]
        ):
            raise ModelError(
                f"the detector's ONNX export differs from PyTorch on {len(photos)} {source}: {figures}; nothing written"
            )
        onnx_detector.session = None  # let go of the file before it moves
        file_digest = io.file_sha256(tmp)
        with io.atomic_path(target) as final:
            shutil.copyfile(tmp, final)
    section.update(
        opset=opset,
        exporter=exporter,
        input="input",
        input_layout="1 x 3 x H x W float32: the photograph normalised, resized to long_side, zero-padded to a "
        "multiple of 32",
        outputs=onnx_detector.output_names,
        sha256=file_digest,
        state_dict=ONNX_STATE_DICT,
    )
    return section, figures

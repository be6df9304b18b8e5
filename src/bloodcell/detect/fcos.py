"""A learned cell detector: torchvision's anchor-free FCOS on a small ResNet-18 trunk, trained from scratch.

The photograph is resized once so its long side is `long_side` (BCCD 640x480 -> 320x240 keeps platelets ~20 px
wide), fed through a ResNet-18 trunk up to layer3 (trainable BatchNorm: nothing is pretrained), a narrow FPN
(strides 8/16 from the trunk, 32/64 from extra convolutions) and an FCOS head of `head_convs` convolutions per
branch. Boxes come back in the photograph's own pixels.

This module is the network and its weights only. Its trainer is bloodcell.detect.fcos_train (Lightning, safetensors
checkpoints, resume) and its ONNX export bloodcell.detect.export: what an install without PyTorch runs
(bloodcell.detect.fcos_onnx). The graph's initializers are the model's own parameters and buffers under their
state_dict names, so the bundled folder keeps its weights once, in detector.onnx, and the torch FCOS loads them from
there (`load_onnx_weights`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from bloodcell.data.fields import FIELD_CLASSES
from bloodcell.detect.base import Detections, register_detector

# normalisation (ImageNet's statistics; BatchNorm absorbs the rest), NMS, candidates and strides: one value each,
# shared with the detector's ONNX export (fcos_onnx does the same steps in numpy)
from bloodcell.detect.fcos_onnx import (
    IMAGE_MEAN,
    IMAGE_STD,
    NMS_IOU,
    SIZE_DIVISIBLE,
    TOPK_CANDIDATES,
    FCOSOptions,
    level_sizes,
)
from bloodcell.errors import ModelError


class _Backbone(nn.Module):
    """Trunk + FPN: an image batch -> an ordered dict of feature maps, finest first."""

    def __init__(self, body: nn.Module, fpn: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body, self.fpn, self.out_channels = body, fpn, out_channels

    def forward(self, x):
        return self.fpn(self.body(x))


class _LongSideTransform(GeneralizedRCNNTransform):
    """Normalise, and at inference resize so the long side is `long_side`; training batches come resized."""

    def resize(self, image, target=None):
        if self.training:
            return image, target
        return super().resize(image, target)


def _build_fcos(long_side: int, fpn_channels: int, head_convs: int, trunk: str, min_score: float, max_detections: int):
    resnet = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    if trunk == "layer3":
        layers, channels = {"layer2": "0", "layer3": "1"}, [128, 256]
    elif trunk == "layer4":
        layers, channels = {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512]
    else:
        raise ModelError(f"detector 'fcos': trunk must be 'layer3' or 'layer4', got '{trunk}'")
    body = IntermediateLayerGetter(resnet, return_layers=layers)
    # P6P7 adds two levels above the last trunk level (its own 3x3 stride-2 convolutions)
    fpn = FeaturePyramidNetwork(channels, fpn_channels, extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
    backbone = _Backbone(body, fpn, fpn_channels)
    levels = len(channels) + 2
    strides = level_sizes(levels)
    anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * levels)
    head = FCOSHead(fpn_channels, 1, len(FIELD_CLASSES) + 1, num_convs=head_convs)
    model = FCOS(
        backbone,
        num_classes=len(FIELD_CLASSES) + 1,  # label 0 is background; FIELD_CLASSES index i is label i + 1
        min_size=long_side,
        max_size=long_side,  # min_size == max_size: the long side becomes long_side, whatever the aspect
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
        anchor_generator=anchors,
        head=head,
        score_thresh=min_score,
        nms_thresh=NMS_IOU,
        detections_per_img=max_detections,
        topk_candidates=TOPK_CANDIDATES,
    )
    model.transform = _LongSideTransform(
        long_side, long_side, list(IMAGE_MEAN), list(IMAGE_STD), size_divisible=SIZE_DIVISIBLE
    )
    return model


@register_detector("fcos")
class FCOSDetector(FCOSOptions):
    """FCOS (anchor-free) on a from-scratch ResNet-18 trunk; see the module docstring."""

    name = "fcos"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        fpn_channels, head_convs = int(self.options["fpn_channels"]), int(self.options["head_convs"])
        if fpn_channels < 32 or fpn_channels % 32:
            raise ModelError(
                f"detector 'fcos': fpn_channels must be a multiple of 32 (the head's GroupNorm has 32 "
                f"groups), got {fpn_channels}"
            )
        if not 1 <= head_convs <= 8:
            raise ModelError(f"detector 'fcos': head_convs must be 1..8, got {head_convs}")
        self.bf16 = bool(self.options["bf16"])  # bf16 autocast while training, where the CPU runs it natively
        self.model = _build_fcos(
            self.long_side, fpn_channels, head_convs, self.options["trunk"], self.min_score, self.max_detections
        )
        self.model.eval()
        self.fit_summary: dict[str, Any] = {}

    # -- inference
    def detect_one(self, image: np.ndarray) -> Detections:
        self.model.eval()
        x = torch.tensor(image).permute(2, 0, 1).float().div_(255.0)  # a copy: read-only arrays are fine
        with torch.inference_mode():
            out = self.model([x])[0]
        labels = out["labels"].numpy().astype(np.int64) - 1
        keep = labels >= 0
        return Detections(
            out["boxes"].numpy().astype(np.float32)[keep],
            labels[keep],
            out["scores"].numpy().astype(np.float32)[keep],
        )

    # -- saving
    def state(self) -> dict[str, Any]:
        return {**super().state(), **({"fit": self.fit_summary} if self.fit_summary else {})}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        self.fit_summary = dict(state.get("fit") or {})

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items()}

    def load_onnx_weights(self, path: str | Path) -> None:
        """The weights kept in an ONNX export's initializers (see export_graph): every parameter and buffer by its
        state_dict name, shape and dtype; a one-line ModelError naming the file when they do not fit."""
        path = Path(path)
        arrays = graph_tensors(path)
        own = self.model.state_dict()
        tensors = {}
        for k, v in own.items():
            if k.endswith(".num_batches_tracked") and k not in arrays:
                # BatchNorm's count of training batches is not in the graph (inference does not use it, nor does
                # training with a set momentum, as here): it keeps the freshly built module's value, 0
                tensors[k] = v
            elif k in arrays:
                a = arrays[k]
                if a.dtype != np.dtype(str(v.dtype).removeprefix("torch.")):
                    own_dtype = str(v.dtype).removeprefix("torch.")
                    raise ModelError(f"{path}: initializer {k} is {a.dtype}, the fcos detector's is {own_dtype}")
                tensors[k] = torch.from_numpy(a.copy())
        extra = sorted(set(arrays) - set(own))
        if extra:
            raise ModelError(
                f"{path}: the graph holds tensors the fcos detector lacks ({', '.join(extra[:3])}): "
                "not an export of its weights"
            )
        try:
            self.load_tensors(tensors)
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from None

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise ModelError(
                f"fcos weights do not fit this architecture: missing {missing[:3]}, "
                f"unexpected {extra[:3]} "
                "(check the options in detector.json)"
            )
        bad = [k for k in own if own[k].shape != tensors[k].shape]
        if bad:
            raise ModelError(
                f"fcos weights do not fit this architecture: {bad[0]} is {tuple(tensors[bad[0]].shape)}, "
                f"expected {tuple(own[bad[0]].shape)}"
            )
        self.model.load_state_dict(tensors)
        self.model.eval()


def graph_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors an ONNX graph stores, by name: its initializers, and the names Identity nodes give them (the
    exporter's way of storing bit-equal tensors once). Constants inside nodes are not included."""
    # here, not at the top: onnx takes seconds to import, and only a detector whose weights are in its graph needs it
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: the detector's ONNX file is missing (detector.json's onnx section names it)")
    try:
        graph = onnx.load(str(path)).graph
        arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"{path}: not readable as ONNX ({type(exc).__name__}: {first_line})") from None
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in arrays and node.output[0] not in arrays:
            arrays[node.output[0]] = arrays[node.input[0]]
    return arrays

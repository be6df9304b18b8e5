"""A learned cell detector: torchvision's anchor-free FCOS on a small ResNet-18 trunk, trained from scratch.

The photograph is resized once so its long side is `long_side` (BCCD 640x480 -> 320x240 keeps platelets ~20 px
wide), fed through a ResNet-18 trunk up to layer3 (trainable BatchNorm: nothing is pretrained), a narrow FPN
(strides 8/16 from the trunk, 32/64 from extra convolutions) and an FCOS head of `head_convs` convolutions per
branch. Boxes come back in the photograph's own pixels. Training (`fit`) runs on Lightning, with safetensors
checkpoints every epoch so `resume=True` continues a killed run; it ends by choosing the per-class operating
score thresholds on the validation photographs. `export_bundled_detector` writes the network to detector.onnx, checked
against PyTorch: what an install without PyTorch runs (bloodcell.models.detector_onnx). The graph's initializers are
the model's own parameters and buffers under their state_dict names, so the bundled folder keeps its weights once, in
detector.onnx, and the torch FCOS loads them from there (`load_onnx_weights`).
"""

from __future__ import annotations

import csv
import io as _io
import math
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from bloodcell.data.fields import FIELD_CLASSES
from bloodcell.errors import ConfigError, DataError, ModelError
from bloodcell.models.detector import ONNX_STATE_DICT
from bloodcell.models.detector_base import Detections, choose_thresholds, register_detector

# normalisation (ImageNet's statistics; BatchNorm absorbs the rest), NMS, candidates and strides: one value each,
# shared with the detector's ONNX export (detector_onnx does the same steps in numpy)
from bloodcell.models.detector_onnx import FCOSOptions, IMAGE_MEAN, IMAGE_STD, NMS_IOU, SIZE_DIVISIBLE, TOPK_CANDIDATES, level_sizes
LOG_COLUMNS = ["epoch", "loss", "classification", "bbox_regression", "bbox_ctrness", "lr", "seconds"]


class _Backbone(nn.Module):
    """Trunk + FPN: an image batch -> an ordered dict of feature maps, finest first."""

    def __init__(self, body: nn.Module, fpn: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.body, self.fpn, self.out_channels = body, fpn, out_channels

    def forward(self, x):
        return self.fpn(self.body(x))


def _build_fcos(long_side: int, fpn_channels: int, head_convs: int, trunk: str, min_score: float, max_detections: int):
    from torchvision.models import resnet18
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOS, FCOSHead
    from torchvision.models.detection.transform import GeneralizedRCNNTransform
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

    class _LongSideTransform(GeneralizedRCNNTransform):
        """Normalise, and at inference resize so the long side is `long_side`; training batches come resized."""

        def resize(self, image, target=None):
            if self.training:
                return image, target
            return super().resize(image, target)

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
    model.transform = _LongSideTransform(long_side, long_side, list(IMAGE_MEAN), list(IMAGE_STD), size_divisible=SIZE_DIVISIBLE)
    return model


@register_detector("fcos")
class FCOSDetector(FCOSOptions):
    """FCOS (anchor-free) on a from-scratch ResNet-18 trunk; see the module docstring."""

    name = "fcos"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        fpn_channels, head_convs = int(self.options["fpn_channels"]), int(self.options["head_convs"])
        if fpn_channels < 32 or fpn_channels % 32:
            raise ModelError(f"detector 'fcos': fpn_channels must be a multiple of 32 (the head's GroupNorm has 32 groups), got {fpn_channels}")
        if not 1 <= head_convs <= 8:
            raise ModelError(f"detector 'fcos': head_convs must be 1..8, got {head_convs}")
        self.bf16 = bool(self.options["bf16"])  # bf16 autocast while training, where the CPU runs it natively
        self.model = _build_fcos(self.long_side, fpn_channels, head_convs, self.options["trunk"], self.min_score, self.max_detections)
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
                    raise ModelError(f"{path}: initializer {k} is {a.dtype}, the fcos detector's is {str(v.dtype).removeprefix('torch.')}")
                tensors[k] = torch.from_numpy(a.copy())
        extra = sorted(set(arrays) - set(own))
        if extra:
            raise ModelError(f"{path}: the graph holds tensors the fcos detector lacks ({', '.join(extra[:3])}): not an export of its weights")
        try:
            self.load_tensors(tensors)
        except ModelError as exc:
            raise ModelError(f"{path}: {exc}") from None

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        if missing or extra:
            raise ModelError(f"fcos weights do not fit this architecture: missing {missing[:3]}, unexpected {extra[:3]} (check the options in detector.json)")
        bad = [k for k in own if own[k].shape != tensors[k].shape]
        if bad:
            raise ModelError(f"fcos weights do not fit this architecture: {bad[0]} is {tuple(tensors[bad[0]].shape)}, expected {tuple(own[bad[0]].shape)}")
        self.model.load_state_dict(tensors)
        self.model.eval()

    # -- training
    def fit(self, train: Sequence, val: Sequence, settings: Any, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
        """Train on `train` (FieldAnnotation) with Lightning; choose the operating thresholds on `val`."""
        summary = _fit(self, list(train), list(val), settings, Path(run_dir), resume, progress)
        self.fit_summary = summary
        return summary


# ---------------------------------------------------------------- data


def load_field_image(ann) -> np.ndarray:
    """The photograph of a FieldAnnotation as H x W x 3 uint8 RGB."""
    from PIL import Image

    try:
        with Image.open(ann.path) as im:
            return np.array(im.convert("RGB"))  # a writable copy
    except (OSError, ValueError) as exc:
        raise DataError(f"{ann.path}: cannot read the photograph ({exc})") from None


def _resized(image: np.ndarray, long_side: int) -> tuple[np.ndarray, float, float]:
    """`image` with its long side `long_side` (area-averaged), and the x and y scale factors applied."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = np.array(Image.fromarray(image).resize((nw, nh), Image.BILINEAR, reducing_gap=None))
    return out, nw / w, nh / h


def rot90_boxes(boxes: np.ndarray, k: int, width: int, height: int) -> np.ndarray:
    """Boxes of a W x H image after np.rot90(image, k) (k quarter turns counter-clockwise)."""
    boxes = boxes.copy()
    for _ in range(k % 4):
        x0, y0, x1, y1 = boxes.T
        boxes = np.stack([y0, width - x1, y1, width - x0], axis=1).astype(np.float32)
        width, height = height, width
    return boxes


class _FieldBatches(torch.utils.data.Dataset):
    """Photographs decoded and resized once; item = a list of positions -> (images, targets), augmented.

    Augmentation draws from a generator seeded by (seed, epoch, photo), so a resumed run sees what the
    uninterrupted one would have: flips, quarter turns, scale jitter and mild brightness/contrast/colour jitter.
    """

    def __init__(self, items: list, long_side: int, seed: int, augment: bool, scale_jitter: float = 0.2):
        self.images, self.boxes, self.labels = [], [], []
        for ann in items:
            image = load_field_image(ann)
            small, sx, sy = _resized(image, long_side)
            # the annotation's size, not the decoded one, is what its boxes are measured in
            fx, fy = small.shape[1] / ann.width, small.shape[0] / ann.height
            boxes = ann.boxes.astype(np.float32) * np.array([fx, fy, fx, fy], np.float32)
            self.images.append(small)
            self.boxes.append(boxes)
            self.labels.append(ann.labels.astype(np.int64))
        self.seed, self.augment, self.scale_jitter = seed, augment, scale_jitter
        self.sampler = None  # the EpochBatches feeding this set (its epoch seeds the augmentation)

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, i: int, epoch: int) -> tuple[torch.Tensor, dict]:
        image, boxes, labels = self.images[i], self.boxes[i], self.labels[i]
        if self.augment:
            rng = np.random.default_rng([self.seed, epoch, i, 17])
            h, w = image.shape[:2]
            if rng.random() < 0.5:
                image = image[:, ::-1]
                boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
            if rng.random() < 0.5:
                image = image[::-1]
                boxes = np.stack([boxes[:, 0], h - boxes[:, 3], boxes[:, 2], h - boxes[:, 1]], axis=1)
            k = int(rng.integers(4))
            image = np.rot90(image, k)
            boxes = rot90_boxes(boxes, k, w, h)
        x = torch.from_numpy(image.copy()).permute(2, 0, 1).float().div_(255.0)  # flips/turns are views
        b = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4)
        if self.augment:
            scale = float(np.exp(rng.uniform(-self.scale_jitter, self.scale_jitter)))
            if abs(scale - 1) > 1e-3:
                size = (max(32, round(x.shape[1] * scale)), max(32, round(x.shape[2] * scale)))
                b = b * torch.tensor([size[1] / x.shape[2], size[0] / x.shape[1]] * 2)
                x = torch.nn.functional.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=scale < 1)[0]
            gain = torch.from_numpy(rng.uniform(0.93, 1.07, 3).astype(np.float32))[:, None, None]
            brightness, contrast = float(rng.uniform(0.85, 1.15)), float(rng.uniform(0.85, 1.15))
            mean = x.mean()
            x = ((x - mean) * contrast + mean) * brightness * gain
            x = x.clamp_(0, 1)
        lab = torch.from_numpy(labels) + 1
        keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
        return x, {"boxes": b[keep], "labels": lab[keep]}

    def __getitem__(self, positions):
        epoch = self.sampler.epoch if self.sampler is not None else 0
        pairs = [self.sample(int(i), epoch) for i in positions]
        return [p[0] for p in pairs], [p[1] for p in pairs]


# ---------------------------------------------------------------- training


def _lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 1 % to 100 %, then cosine decay to 1 %."""
    if step < warmup_steps:
        return 0.01 + 0.99 * step / max(1, warmup_steps)
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _write_log(run_dir: Path, rows: list[dict]) -> None:
    from bloodcell import io

    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    io.write_text(run_dir / "train_log.csv", buf.getvalue())


def _module(detector: FCOSDetector, settings: Any, steps_per_epoch: int, run_dir: Path):
    import lightning as L

    from bloodcell.errors import TrainingDiverged

    class FCOSModule(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = detector.model
            self.history: list[dict] = []
            self.started_at_epoch = 0

        def on_train_epoch_start(self):
            self.model.train()  # Lightning keeps submodules' modes; the detector's model is built in eval mode
            self._t0, self._sums, self._n = time.time(), {}, 0

        def training_step(self, batch, batch_idx):
            images, targets = batch
            losses = self.model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"fcos: the loss became {loss.item()} in epoch {self.current_epoch + 1}; lower train.lr")
            for k, v in losses.items():
                self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
            self._sums["loss"] = self._sums.get("loss", 0.0) + float(loss.detach())
            self._n += 1
            return loss

        def on_train_epoch_end(self):
            row = {k: round(v / max(1, self._n), 5) for k, v in self._sums.items()}
            row.update(epoch=self.current_epoch + 1, lr=f"{self.optimizers().param_groups[0]['lr']:.3g}", seconds=round(time.time() - self._t0, 1))
            self.history.append(row)
            _write_log(run_dir, self.history)

        def configure_optimizers(self):
            decay, no_decay = [], []
            for name, p in self.model.named_parameters():
                (no_decay if p.ndim <= 1 else decay).append(p)  # no decay on norms and biases
            opt = torch.optim.AdamW(
                [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr
            )
            total = settings.epochs * steps_per_epoch
            warm = settings.warmup_epochs * steps_per_epoch
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, warm, total))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def on_save_checkpoint(self, checkpoint):
            checkpoint["fcos_history"] = [dict(r) for r in self.history]

        def on_load_checkpoint(self, checkpoint):
            self.history = [dict(r) for r in checkpoint.get("fcos_history", [])]
            self.started_at_epoch = len(self.history)

    return FCOSModule()


def _initial_weights(detector: FCOSDetector, source: str) -> str:
    """Start from the weights of a saved fcos detector of the same architecture (a folder, or 'default': the bundled
    one); returns what was loaded, for the run's summary. A resumed run's checkpoint overrides them."""
    from bloodcell.models.detector import load_detector

    start = load_detector(source)
    if not isinstance(start, FCOSDetector):
        raise ConfigError(f"train.init: {source} is a '{start.name}' detector; only fcos weights can start an fcos run")
    if start.options != detector.options:
        changed = sorted(k for k in detector.options if start.options.get(k) != detector.options[k])
        raise ConfigError(f"train.init: {source} was built with other options ({', '.join(changed)}); use the same detector.kwargs")
    detector.load_tensors(start.model.state_dict())
    return str(getattr(start, "source", source))


def _fit(detector: FCOSDetector, train: list, val: list, settings: Any, run_dir: Path, resume: bool, progress: bool) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar

    from bloodcell.progress import enabled_by_default
    from bloodcell.train.checkpoint_io import SafetensorsCheckpointIO
    from bloodcell.train.fit import EpochBatches, _resumable_checkpoint, cpu_has_native_bf16

    if not train:
        raise DataError("fcos: no training photographs")
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    if settings.long_side != detector.long_side:
        raise ConfigError(
            f"fcos: train.long_side is {settings.long_side} but the detector's long_side option is {detector.long_side}; set both alike"
        )
    progress = progress and enabled_by_default()
    # tiny gradients and Adam moments turn subnormal as training settles; on x86 each one costs ~100 cycles
    torch.set_flush_denormal(True)
    seed = int(torch.initial_seed() % (2**31))
    start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    initial = _initial_weights(detector, settings.init) if settings.init else None
    data = _FieldBatches(train, detector.long_side, seed, augment=True)
    sampler = EpochBatches(len(data), settings.batch_size, True, seed)
    data.sampler = sampler
    loader = torch.utils.data.DataLoader(data, sampler=sampler, batch_size=None, num_workers=0)
    module = _module(detector, settings, len(sampler), run_dir)
    precision = "bf16-mixed" if detector.bf16 and cpu_has_native_bf16() else "32-true"
    callbacks = [
        ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)
    ]
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        max_epochs=settings.epochs,
        callbacks=callbacks,
        plugins=[SafetensorsCheckpointIO()],
        logger=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        gradient_clip_val=10.0,
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
    )
    detector.model.train()
    ckpt = _resumable_checkpoint(run_dir / "checkpoints" / "last.ckpt") if resume else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*|.*exists and is not empty.*|.*LeafSpec.*")
        trainer.fit(module, loader, ckpt_path=ckpt)
    detector.model = module.model.float().eval()
    # the epochs of earlier sessions (restored with the checkpoint) count too: a resumed run's time is its whole fit
    earlier = sum(float(r.get("seconds") or 0) for r in module.history[:module.started_at_epoch])
    train_seconds = earlier + time.time() - start
    summary: dict[str, Any] = {
        "epochs": len(module.history),
        "resumed_from_epoch": module.started_at_epoch,
        "seconds": round(train_seconds, 1),
        "final_loss": module.history[-1]["loss"] if module.history else None,
        "precision": precision,
        "train_photographs": len(train),
        "initial_weights": initial,
    }
    if val:
        dets = [detector.detect_one(load_field_image(a)) for a in val]
        detector.score_thresholds = choose_thresholds(dets, val)
        summary["val_photographs"] = len(val)
        summary["score_thresholds"] = dict(detector.score_thresholds)
    _write_log(run_dir, module.history)
    return summary


# ---------------------------------------------------------------- ONNX export: what the install without PyTorch runs

ONNX_TOLERANCE = 1e-3  # largest difference allowed in the network's raw outputs (logits, box codes) vs PyTorch
PARITY = {"min_iou": 0.99, "max_score_diff": 1e-3}  # detections at the operating thresholds, per paired box


class _RawOutputs(nn.Module):
    """FCOS between its transform and its postprocess: a normalised, padded 1 x 3 x H x W image -> per FPN level the
    head's classification logits, box regression (after the head's ReLU) and centerness, as 1 x C x h x w maps
    (FCOSHead.forward without its flattening, which bloodcell.models.detector_onnx does in numpy)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = model.backbone, model.head

    def forward(self, x):
        cls, reg = self.head.classification_head, self.head.regression_head
        outputs = []
        for feature in self.backbone(x).values():
            box_feature = reg.conv(feature)
            outputs += [cls.cls_logits(cls.conv(feature)), nn.functional.relu(reg.bbox_reg(box_feature)), reg.bbox_ctrness(box_feature)]
        return tuple(outputs)


def _levels(detector: "FCOSDetector") -> int:
    return len(detector.model.anchor_generator.sizes)


def export_graph(detector: "FCOSDetector", path: Path, opset: int = 17) -> str:
    """Write the detector's network (see _RawOutputs) to `path` with free H and W; returns the exporter's name.

    The graph keeps the model's own tensors as its initializers, under their state_dict names, so it is also where
    the weights are kept (graph_tensors reads them back): no constant folding, and BatchNorm stays BatchNormalization
    (inference mode, with running_mean/var), not folded into the convolutions (TrainingMode.PRESERVE skips the
    exporter's eval-mode fusion; the module is in eval mode). ONNX Runtime fuses BatchNorm itself when it opens the
    graph. The exporter stores bit-equal tensors once (in a residual block both BatchNorm biases, added together,
    train alike) and gives the other name with an Identity node."""
    from bloodcell.models.detector_onnx import OUTPUTS

    names = [f"{o}_{i}" for i in range(_levels(detector)) for o in OUTPUTS]
    axes = {"input": {2: "height", 3: "width"}, **{n: {2: f"height_{n[-1]}", 3: f"width_{n[-1]}"} for n in names}}
    net = _RawOutputs(detector.model).eval()
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
            torch.onnx.export(net, (torch.zeros(1, 3, 256, 320),), str(path), dynamo=False, input_names=["input"],
                              output_names=names, dynamic_axes=axes, opset_version=opset, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.PRESERVE)
    except Exception as exc:
        raise ModelError(f"ONNX export of the detector failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    return "torchscript"


def graph_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors an ONNX graph stores, by name: its initializers, and the names Identity nodes give them (the
    exporter's way of storing bit-equal tensors once). Constants inside nodes are not included."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: the detector's ONNX file is missing (detector.json's onnx section names it)")
    try:
        graph = onnx.load(str(path)).graph
        arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    except Exception as exc:
        raise ModelError(f"{path}: not readable as ONNX ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in arrays and node.output[0] not in arrays:
            arrays[node.output[0]] = arrays[node.input[0]]
    return arrays


def weights_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of learned tensors: name, dtype, shape and bytes of each, by name, without BatchNorm's
    num_batches_tracked (not kept in the ONNX graph). The same whether the weights come from detector.safetensors
    or from detector.onnx, so detector.json can record which trained weights its graph holds."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(tensors):
        if name.endswith(".num_batches_tracked"):
            continue
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _same_tensors(detector: "FCOSDetector", arrays: dict[str, np.ndarray]) -> list[str]:
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


def check_onnx(detector: "FCOSDetector", onnx_detector, photos: Sequence[np.ndarray]) -> dict:
    """Run both detectors on `photos`; the figures the export is judged by (and recorded with)."""
    from bloodcell.models.detector_onnx import agreement, network_input

    raw = pre = 0.0
    worst = {"photos": len(photos), "boxes": 0, "unpaired": 0, "min_iou": 1.0, "max_score_diff": 0.0, "label_mismatches": 0}
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
        worst.update(boxes=worst["boxes"] + a["boxes"], unpaired=worst["unpaired"] + a["unpaired"],
                     label_mismatches=worst["label_mismatches"] + a["label_mismatches"],
                     min_iou=min(worst["min_iou"], a["min_iou"]), max_score_diff=max(worst["max_score_diff"], a["max_score_diff"]))
    return {"preprocess_max_abs_diff": pre, "max_abs_diff": raw, "at_thresholds": worst, "before_thresholds": raw_boxes}


def export_bundled_detector(folder: str | Path, photos: Sequence[np.ndarray] | None = None, source: str = "",
                            opset: int = 17) -> dict:
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
    was exported from (`exported_from`)."""
    import json
    import shutil
    import tempfile

    import onnxruntime

    from bloodcell import io
    from bloodcell.models.detector import DETECTOR_METADATA, DETECTOR_WEIGHTS, create_detector, load_detector
    from bloodcell.models.detector_onnx import DETECTOR_ONNX, ONNX_DETECTOR
    from bloodcell.models.seal import member, seal

    folder = Path(folder)
    meta = json.loads((folder / DETECTOR_METADATA).read_text())
    detector = load_detector(folder / DETECTOR_METADATA)
    if not isinstance(detector, FCOSDetector):
        raise ModelError(f"{folder}: only an fcos detector has an ONNX export, this one is '{detector.name}'")
    digest = weights_digest(detector.tensors())
    previous = meta.get("onnx") if isinstance(meta.get("onnx"), dict) else {}
    if meta.get("weights"):  # a training run's weights file
        exported_from = {meta["weights"]: io.file_sha256(member(folder, meta["weights"], "weights", folder / DETECTOR_METADATA))}
    elif previous.get("state_dict") == ONNX_STATE_DICT and previous.get("weights_sha256") == digest:
        exported_from = previous.get("exported_from") or {}  # the same weights, already exported once
    else:
        raise ModelError(f"{folder / DETECTOR_ONNX}: its weights are not the ones {DETECTOR_METADATA} records "
                         f"(weights_sha256); bundle the detector again from its training run")
    if photos is None:
        photos, source = check_photos(), "generated photographs"
    with tempfile.TemporaryDirectory(prefix="bloodcell-detector-") as work:
        tmp = Path(work) / DETECTOR_ONNX
        exporter = export_graph(detector, tmp, opset)
        differ = _same_tensors(detector, graph_tensors(tmp))
        if differ:
            raise ModelError(f"the detector's ONNX export does not hold its weights under their names ({', '.join(differ[:3])}); nothing written")
        section = {"detector": ONNX_DETECTOR, "file": DETECTOR_ONNX}
        onnx_detector = create_detector(ONNX_DETECTOR, **detector.options)
        onnx_detector.score_thresholds = dict(detector.score_thresholds)
        onnx_detector.load_onnx(tmp, section)
        figures = check_onnx(detector, onnx_detector, photos)
        at = figures["at_thresholds"]
        if not (figures["max_abs_diff"] <= ONNX_TOLERANCE and at["unpaired"] == 0 and at["label_mismatches"] == 0
                and at["min_iou"] >= PARITY["min_iou"] and at["max_score_diff"] <= PARITY["max_score_diff"]):
            raise ModelError(f"the detector's ONNX export differs from PyTorch on {len(photos)} {source}: {figures}; nothing written")
        onnx_detector.session = None  # let go of the file before it moves
        file_digest = io.file_sha256(tmp)
        with io.atomic_path(folder / DETECTOR_ONNX) as final:
            shutil.copyfile(tmp, final)
    section.update(
        opset=opset,
        exporter=exporter,
        input="input",
        input_layout="1 x 3 x H x W float32: the photograph normalised, resized to long_side, zero-padded to a multiple of 32",
        outputs=onnx_detector.output_names,
        sha256=file_digest,
        state_dict=ONNX_STATE_DICT,
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

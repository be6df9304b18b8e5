"""The FCOS detector's trainer: Lightning on the CPU, safetensors checkpoints every epoch so `resume=True` continues a
killed run, and train_log.csv (a row per epoch) in the run folder. The run (bloodcell.detect.runs) chooses it for an
`fcos` detector and then chooses the operating thresholds on the validation photographs.
"""

from __future__ import annotations

import csv
import io as _io
import math
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
from torch import nn

from bloodcell import io
from bloodcell.data.fields import FieldAnnotation
from bloodcell.detect.config import DetectorTrainConfig
from bloodcell.detect.data import FieldBatches
from bloodcell.detect.fcos import FCOSDetector
from bloodcell.detect.registry import load_detector
from bloodcell.errors import ConfigError, DataError, TrainingDiverged
from bloodcell.progress import enabled_by_default
from bloodcell.train.batches import EpochBatches
from bloodcell.train.checkpoint_io import SafetensorsCheckpointIO, resumable_checkpoint
from bloodcell.train.hardware import cpu_has_native_bf16

LOG_COLUMNS = ["epoch", "loss", "classification", "bbox_regression", "bbox_ctrness", "lr", "seconds"]


def _lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 1 % to 100 %, then cosine decay to 1 %."""
    if step < warmup_steps:
        return 0.01 + 0.99 * step / max(1, warmup_steps)
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _write_log(run_dir: Path, rows: list[dict]) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    io.write_text(run_dir / "train_log.csv", buf.getvalue())


class FCOSModule(L.LightningModule):
    """The detector's network in Lightning: its losses summed, AdamW with warm-up and cosine decay, a log row per
    epoch (train_log.csv) and the rows kept in the checkpoint so a resumed run's log is whole."""

    def __init__(self, model: nn.Module, settings: DetectorTrainConfig, steps_per_epoch: int, run_dir: Path):
        super().__init__()
        self.model = model
        self.settings, self.steps_per_epoch, self.run_dir = settings, steps_per_epoch, run_dir
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
            raise TrainingDiverged(
                f"fcos: the loss became {loss.item()} in epoch {self.current_epoch + 1}; lower train.lr"
            )
        for k, v in losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v.detach())
        self._sums["loss"] = self._sums.get("loss", 0.0) + float(loss.detach())
        self._n += 1
        return loss

    def on_train_epoch_end(self):
        row = {k: round(v / max(1, self._n), 5) for k, v in self._sums.items()}
        row.update(
            epoch=self.current_epoch + 1,
            lr=f"{self.optimizers().param_groups[0]['lr']:.3g}",
            seconds=round(time.time() - self._t0, 1),
        )
        self.history.append(row)
        _write_log(self.run_dir, self.history)

    def configure_optimizers(self):
        settings, steps_per_epoch = self.settings, self.steps_per_epoch
        decay, no_decay = [], []
        for p in self.model.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)  # no decay on norms and biases
        groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=settings.lr)
        total = settings.epochs * steps_per_epoch
        warm = settings.warmup_epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: _lr_factor(step, warm, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        checkpoint["fcos_history"] = [dict(r) for r in self.history]

    def on_load_checkpoint(self, checkpoint):
        self.history = [dict(r) for r in checkpoint.get("fcos_history", [])]
        self.started_at_epoch = len(self.history)


def _initial_weights(detector: FCOSDetector, source: str) -> str:
    """Start from the weights of a saved fcos detector of the same architecture (a folder, or 'default': the bundled
    one); returns what was loaded, for the run's summary. A resumed run's checkpoint overrides them."""
    start = load_detector(source)
    if not isinstance(start, FCOSDetector):
        raise ConfigError(f"train.init: {source} is a '{start.name}' detector; only fcos weights can start an fcos run")
    if start.options != detector.options:
        changed = sorted(k for k in detector.options if start.options.get(k) != detector.options[k])
        raise ConfigError(
            f"train.init: {source} was built with other options ({', '.join(changed)}); use the same detector.kwargs"
        )
    detector.load_tensors(start.model.state_dict())
    return str(getattr(start, "source", source))


def _check(detector: FCOSDetector, train: Sequence, settings: DetectorTrainConfig) -> None:
    if not train:
        raise DataError("fcos: no training photographs")
    if settings.long_side != detector.long_side:
        raise ConfigError(
            f"fcos: train.long_side is {settings.long_side} but the detector's long_side option is "
            f"{detector.long_side}; set both alike"
        )


def _trainer(settings: DetectorTrainConfig, precision: str, run_dir: Path, progress: bool) -> L.Trainer:
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="last",
            save_top_k=-1,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
    ]
    if progress:
        callbacks.append(RichProgressBar(leave=True))
    return L.Trainer(
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


def fit_fcos(
    detector: FCOSDetector,
    train: Sequence[FieldAnnotation],
    settings: DetectorTrainConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `detector`'s network in place on the `train` photographs; return the fit's summary (also kept in the
    detector's state as `fit`).

    Args:
        settings: the run's `train` section (epochs, batch size, learning rate, long side, threads, initial weights).
        run_dir: where checkpoints/last.ckpt and train_log.csv go.
        resume: continue from run_dir's last checkpoint (a missing or torn one starts again from epoch 1).
    """
    _check(detector, train, settings)
    run_dir = Path(run_dir)
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    progress = progress and enabled_by_default()
    # tiny gradients and Adam moments turn subnormal as training settles; on x86 each one costs ~100 cycles
    torch.set_flush_denormal(True)
    seed = int(torch.initial_seed() % (2**31))
    start = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    initial = _initial_weights(detector, settings.init) if settings.init else None
    data = FieldBatches(list(train), detector.long_side, seed, augment=True)
    sampler = EpochBatches(len(data), settings.batch_size, True, seed)
    data.sampler = sampler
    loader = torch.utils.data.DataLoader(data, sampler=sampler, batch_size=None, num_workers=0)
    module = FCOSModule(detector.model, settings, len(sampler), run_dir)
    precision = "bf16-mixed" if detector.bf16 and cpu_has_native_bf16() else "32-true"
    trainer = _trainer(settings, precision, run_dir, progress)
    detector.model.train()
    ckpt = resumable_checkpoint(run_dir / "checkpoints" / "last.ckpt") if resume else None
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*does not have many workers.*|.*exists and is not empty.*|.*LeafSpec.*"
        )
        trainer.fit(module, loader, ckpt_path=ckpt)
    detector.model = module.model.float().eval()
    # the epochs of earlier sessions (restored with the checkpoint) count too: a resumed run's time is its whole fit
    earlier = sum(float(r.get("seconds") or 0) for r in module.history[: module.started_at_epoch])
    detector.fit_summary = {
        "epochs": len(module.history),
        "resumed_from_epoch": module.started_at_epoch,
        "seconds": round(earlier + time.time() - start, 1),
        "final_loss": module.history[-1]["loss"] if module.history else None,
        "precision": precision,
        "train_photographs": len(train),
        "initial_weights": initial,
    }
    _write_log(run_dir, module.history)
    return detector.fit_summary

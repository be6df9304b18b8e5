"""The LightningModule: uint8 batches in, normalised (and augmented) on the device, cross-entropy or SupCon loss.

Staged schedules: `train.stages` is a list of stages run back to back; at a stage boundary the optimizer and
schedule are rebuilt (the paper's hybrid "re-compiled and trained 5 more epochs") and the stage's freezing is
applied. Randomness is re-seeded from (seed, epoch, batch) at every batch, so a run resumed from the checkpoint
of epoch k repeats the uninterrupted run exactly on CPU.
"""

from __future__ import annotations

import math
import time
import warnings

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from bloodcell import events
from bloodcell.config import RunConfig, StageConfig
from bloodcell.errors import TrainingDiverged
from bloodcell.models.losses import supcon_loss
from bloodcell.train.augment import augment_batch


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    return int(np.random.SeedSequence([seed, epoch, salt]).generate_state(1)[0])


class Classifier(L.LightningModule):
    def __init__(
        self,
        model: torch.nn.Module,
        cfg: RunConfig,
        class_weights: torch.Tensor | None = None,
        device_images: np.ndarray | None = None,
    ):
        super().__init__()
        self.model = model
        self.cfg = cfg
        # torch's AveragedModel keeps the weight EMA as a submodule: it is in the state dict, so checkpoints and an
        # exact resume carry it; no gradients, so neither the optimizer nor DDP sees it.
        self.ema = (
            AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)
            if cfg.train.ema_decay
            else None
        )
        if self.ema is not None:
            self.ema.requires_grad_(False)
        self.stages = cfg.train.resolved_stages()
        self.register_buffer("mean", torch.tensor(model.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(model.std).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer(
            "class_weights",
            class_weights if class_weights is not None else torch.ones(model.num_classes),
            persistent=False,
        )
        self.use_class_weights = class_weights is not None
        self.stage_index = 0
        self.history: list[dict] = []
        self._epoch_t0 = 0.0
        self._epoch_lr = 0.0
        self._host_images = device_images  # uploaded to the device in setup when device caching is on
        self.device_images: torch.Tensor | None = None
        self._aug_gen = torch.Generator()
        self._sums: dict[str, list[float]] = {}
        self.on_history = None  # called with the history after each epoch on rank 0 (fit writes history.csv)
        self.channels_last = cfg.train.channels_last  # fit resolves it for the machine (resolve_channels_last)

    # ------------------------------------------------------------------ stages

    def stage_for_epoch(self, epoch: int) -> int:
        end = 0
        for i, s in enumerate(self.stages):
            end += s.epochs
            if epoch < end:
                return i
        return len(self.stages) - 1

    @property
    def stage(self) -> StageConfig:
        return self.stages[self.stage_index]

    def _apply_freezing(self) -> None:
        s, t = self.stage, self.cfg.train
        self.model.unfreeze()
        if s.freeze_encoder:
            for name, p in self.model.named_parameters():
                p.requires_grad = name.startswith("head.")
            return
        blocks = s.freeze_blocks if s.freeze_blocks is not None else t.freeze_blocks
        prefixes = s.freeze_prefixes if s.freeze_prefixes is not None else t.freeze_prefixes
        if blocks or prefixes:
            self.model.freeze(blocks=blocks or None, prefixes=prefixes or None)

    def configure_optimizers(self):
        self._apply_freezing()
        s, t = self.stage, self.cfg.train
        name, lr = (
            s.optimizer or t.optimizer,
            (s.lr or t.lr) * (self.trainer.world_size if t.lr_scaling == "linear" else 1),
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        fused = {"fused": True} if torch.cuda.is_available() and self.device.type == "cuda" else {}
        if name == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=t.weight_decay, **fused)
        elif name == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay, **fused)
        elif name == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay, **fused)
        else:  # Keras' RMSprop defaults: rho 0.9, eps 1e-7
            opt = torch.optim.RMSprop(params, lr=lr, alpha=0.9, eps=1e-7, weight_decay=t.weight_decay)
        schedule = s.schedule or t.schedule
        warmup = min(t.warmup_epochs, s.epochs - 1) if self.stage_index == 0 else 0
        if schedule == "none" and not warmup:
            return opt

        def factor(epoch_in_stage: int) -> float:
            if epoch_in_stage < warmup:
                return (epoch_in_stage + 1) / (warmup + 1)
            if schedule == "step":
                return t.gamma ** ((epoch_in_stage - warmup) // t.step_size)
            if schedule == "cosine":
                span = max(1, s.epochs - warmup)
                return 0.5 * (1 + math.cos(math.pi * (epoch_in_stage - warmup) / span))
            return 1.0

        # A closure is not picklable, but schedulers are stored as their state dict (last_epoch, base_lrs) only.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    # ------------------------------------------------------------------ data on the device

    def setup(self, stage: str) -> None:
        if self._host_images is not None and self.device_images is None:
            with warnings.catch_warnings():  # the cache is a read-only memmap; these images are only ever read
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                self.device_images = torch.from_numpy(np.ascontiguousarray(self._host_images)).to(self.device)

    def _images(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        if self.device_images is not None and x.ndim == 1:  # a batch of indices: gather on the device
            x = self.device_images.index_select(0, x.to(self.device_images.device))
        return x, y

    def preprocess(self, x: torch.Tensor, augment: bool) -> torch.Tensor:
        """uint8 (B, H, W, 3) -> normalised float (B, 3, H, W), augmented when asked."""
        x = x.permute(0, 3, 1, 2).float()
        if augment:
            x = augment_batch(x / 255.0, self.cfg.augment, self._aug_gen) * 255.0
        x = (x - self.mean) / self.std
        # the uint8 batch is (B, H, W, 3), so the permuted view is already channels_last in memory: make either
        # layout explicit, or `channels_last: false` would silently train channels_last too
        x = x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        return x

    # ------------------------------------------------------------------ steps

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.float(),
            y,
            weight=self.class_weights if self.use_class_weights else None,
            label_smoothing=self.cfg.train.label_smoothing,
        )

    def _log_step(self, split: str, loss: torch.Tensor, correct: int | None, n: int) -> None:
        acc = self._sums.setdefault(split, [0.0, 0.0, 0.0])
        acc[0] += float(loss.detach()) * n
        acc[1] += 0.0 if correct is None else float(correct)
        acc[2] += n

    def on_train_batch_start(self, batch, batch_idx) -> None:
        # Every batch draws from generators seeded by (seed, epoch, batch, rank) alone, so its dropout masks and
        # augmentations do not depend on what ran before it: a resumed run repeats the uninterrupted one exactly.
        key = (self.current_epoch << 20) + batch_idx
        torch.manual_seed(epoch_seed(self.cfg.seed, key, 1 + self.global_rank))
        self._aug_gen.manual_seed(epoch_seed(self.cfg.seed, key, 1000 + self.global_rank))
        events.emit("batch", epoch=self.current_epoch + 1, batch=batch_idx, rank=self.global_rank)

    def training_step(self, batch, batch_idx):
        x, y = self._images(batch)
        if self.stage.objective == "supcon":
            views = torch.cat([self.preprocess(x, augment=True), self.preprocess(x, augment=True)])
            embeddings, labels = self._across_ranks(self.model.embed(views).float(), torch.cat([y, y]))
            loss = supcon_loss(embeddings, labels, self.cfg.train.supcon_temperature)
            correct = None
        else:
            logits = self.model(self.preprocess(x, augment=self.cfg.augment.enabled))
            loss = self._ce(logits, y)
            correct = int((logits.argmax(1) == y).sum())
        finite = bool(torch.isfinite(loss))
        # Under DDP every rank must stop at the same step: one that stopped alone would leave the others waiting in
        # the gradient all-reduce for ever. One boolean all-reduce per step; `float(loss)` below syncs anyway.
        finite_everywhere = (
            finite if self.trainer.world_size == 1 else self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        )
        if not finite_everywhere:
            value = float(loss.detach()) if not finite else "not finite on another process"
            self._diverged(f"training loss is {value} at epoch {self.current_epoch + 1}, step {batch_idx}")
        self._log_step("train", loss, correct, len(y))
        return loss

    def _across_ranks(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Under DDP, every rank's embeddings and labels, so SupCon contrasts each cell with the whole global batch
        (as on one device), not with its rank's share alone. Gradients flow back through the gather; each rank
        then holds world_size times its share of the global loss's gradient, and DDP's averaging undoes that."""
        if self.trainer.world_size == 1:
            return embeddings, labels
        gathered = self.all_gather(embeddings, sync_grads=True)  # (world, B, D)
        return gathered.reshape(-1, embeddings.shape[-1]), self.all_gather(labels).reshape(-1)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    @property
    def final_model(self) -> torch.nn.Module:
        """The weights training hands on: the EMA when train.ema_decay is set, else the trained model itself."""
        return self.ema.module if self.ema is not None else self.model

    def validation_step(self, batch, batch_idx):
        x, y = self._images(batch)
        xp = self.preprocess(x, augment=False)
        net = self.final_model
        if self.stage.objective == "supcon":
            loss = supcon_loss(net.embed(xp).float(), y, self.cfg.train.supcon_temperature)
            correct = None
        else:
            logits = net(xp)
            loss = self._ce(logits, y)
            correct = int((logits.argmax(1) == y).sum())
        self._log_step("val", loss, correct, len(y))
        # Lightning's early stopping and checkpoint callbacks read this
        self.log("val_loss", loss, batch_size=len(y), on_epoch=True, prog_bar=False, sync_dist=True)

    # ------------------------------------------------------------------ epoch bookkeeping

    def on_train_epoch_start(self) -> None:
        epoch = self.current_epoch
        wanted = self.stage_for_epoch(epoch)
        if wanted != self.stage_index:
            self.stage_index = wanted
            self.trainer.strategy.setup_optimizers(self.trainer)  # new stage: fresh optimizer and schedule
        self._sums = {}
        self._epoch_t0 = time.perf_counter()
        # Lightning steps an epoch schedule after the epoch's last batch, before the epoch-end hooks: note the lr now
        self._epoch_lr = self.trainer.optimizers[0].param_groups[0]["lr"]

    def on_validation_epoch_start(self) -> None:
        self._sums.pop("val", None)

    def _reduced(self, split: str) -> tuple[float | None, float | None]:
        s = self._sums.get(split)
        if not s:
            return None, None
        t = torch.tensor(s, dtype=torch.float64, device=self.device)
        t = self.trainer.strategy.reduce(t, reduce_op="sum") if self.trainer.world_size > 1 else t
        loss_sum, correct, n = (float(v) for v in t)
        objective_has_acc = self.stage.objective == "ce"
        return loss_sum / n, (correct / n if objective_has_acc else None)

    def _diverged(self, what: str):
        # fit adds which checkpoint is kept; the epoch checkpoint is written after this hook, so it is never the bad one
        raise TrainingDiverged(f"{what}; lower train.lr (now {self.stage.lr or self.cfg.train.lr})")

    def on_train_epoch_end(self) -> None:
        train_loss, train_acc = self._reduced("train")
        val_loss, val_acc = self._reduced("val")
        # A finite loss on the last batch can still be followed by a step to inf/nan weights: stop before saving them.
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()):
            self._diverged(f"weights became inf or nan in epoch {self.current_epoch + 1}")
        if val_loss is not None and not math.isfinite(val_loss):
            self._diverged(f"validation loss is {val_loss} at epoch {self.current_epoch + 1}")
        row = {
            "epoch": self.current_epoch + 1,
            "stage": self.stage_index + 1,
            "objective": self.stage.objective,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": self._epoch_lr,
            "seconds": round(time.perf_counter() - self._epoch_t0, 3),
        }
        self.history.append(row)
        if self.on_history is not None and self.trainer.is_global_zero:
            self.on_history(self.history)
        for key in ("train_loss", "train_acc", "val_acc"):
            if row[key] is not None:
                self.log(key, row[key], prog_bar=True, rank_zero_only=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["bloodcell"] = {"stage_index": self.stage_index, "history": self.history}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("bloodcell", {})
        self.stage_index = int(state.get("stage_index", 0))
        self.history = list(state.get("history", []))

"""Train one model on prepared data with Lightning: devices, precision, DDP, checkpoints, resume.

`fit(cfg, data, run_dir)` leaves in `run_dir`: history.csv, model.safetensors + model.json (final weights) and,
while running, checkpoints/last.ckpt (+ its tensor file) written at the end of every epoch. With `resume=True` it
continues from that checkpoint, so kill -9 loses at most the epoch in progress.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io as _io
import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from torch.utils.data import DataLoader

from bloodcell import io
from bloodcell.config import RunConfig
from bloodcell.data.prepare import PreparedData
from bloodcell.data.workers import loader_worker_init, pool_context
from bloodcell.errors import ConfigError, ModelError, TrainingDiverged, WriteError
from bloodcell.models import create_model
from bloodcell.models.checkpoint import init_from_model, save_checkpoint
from bloodcell.models.metadata import is_bloodcell_model
from bloodcell.progress import enabled_by_default
from bloodcell.train.batches import ArrayBatches, EpochBatches
from bloodcell.train.checkpoint_io import SafetensorsCheckpointIO, read_checkpoint, resumable_checkpoint
from bloodcell.train.hardware import resolve_accelerator, resolve_channels_last, resolve_precision
from bloodcell.train.module import Classifier
from bloodcell.train.smote import smote_oversample


class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # Lightning's start-up "Tip: ... litlogger" line
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())

HISTORY_COLUMNS = ["epoch", "stage", "objective", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


def class_weights_for(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _write_history(run_dir: Path, rows: list[dict]) -> None:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in HISTORY_COLUMNS})
    io.write_text(run_dir / "history.csv", buf.getvalue())


def _kept_checkpoint(path: Path, exc: Exception) -> str:
    try:
        epoch = int(read_checkpoint(path)["epoch"]) + 1
    except ModelError:
        return "no epoch finished, so no checkpoint was kept"
    then = (
        "; a resumed run continues from it" if isinstance(exc, WriteError) else ""
    )  # a diverged one would diverge again
    return f"the checkpoint of epoch {epoch}, the last good one, is kept: {path}{then}"


def _deterministic_state_restorer():
    """Lightning's `deterministic=True` (used on CPU, for exact resumes) turns torch's deterministic mode on for the
    whole process, and that mode also fills every new tensor with NaN to expose reads of uninitialised memory. The
    filling cost 12 % of a ResNet-50 fp32 step on an AVX2 CPU (profiled: aten::fill_ under aten::empty) and changes
    no result, so it is off while bloodcell trains; afterwards (evaluation, the user's own code) torch's flags are
    put back as they were. Returns the function that puts them back."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.utils.deterministic.fill_uninitialized_memory,
    )

    def restore() -> None:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]

    return restore


def make_logger(kind: str, run_dir: Path):
    """The Lightning logger `train.logger` names (history.csv is written whatever it is); False for none."""
    if kind == "none":
        return False
    if kind == "csv":
        return CSVLogger(str(run_dir), name="logs")
    # the package is named as the logger (TensorBoard's also writes through tensorboardX)
    if importlib.util.find_spec(kind) is None and not (
        kind == "tensorboard" and importlib.util.find_spec("tensorboardX")
    ):
        raise ConfigError(f"train.logger is '{kind}' but {kind} is not installed: pip install {kind}")
    if kind == "tensorboard":
        return TensorBoardLogger(str(run_dir), name="logs")
    return MLFlowLogger(experiment_name="bloodcell", run_name=run_dir.name, save_dir=str(run_dir / "mlruns"))


def build_model(cfg: RunConfig, num_classes: int, class_names: list[str] | None = None):
    """The run's model: from scratch, from ImageNet backbone weights, or from a trained bloodcell model
    (fine-tuning)."""
    pretrained = cfg.model.pretrained if cfg.model.pretrained not in (None,) else False
    if is_bloodcell_model(pretrained):
        model = create_model(
            cfg.model.name,
            num_classes=num_classes,
            pretrained=False,
            input_size=cfg.data.input_size,
            **cfg.model.kwargs,
        )
        names = class_names or [f"class_{i}" for i in range(num_classes)]
        try:
            init_from_model(model, pretrained, names, cfg.data.input_size, cfg.data.white_balance)
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
        return model
    return create_model(
        cfg.model.name,
        num_classes=num_classes,
        pretrained=pretrained,
        input_size=cfg.data.input_size,
        **cfg.model.kwargs,
    )


def _training_arrays(cfg: RunConfig, data: PreparedData) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, train indices, val indices) the run trains on: the prepared cache's, or with SMOTE the training
    images oversampled into an in-memory array (originals, then synthetic ones) with the val images after them."""
    train_idx, val_idx = data.parts["train"], data.parts["val"]
    if len(train_idx) == 0:
        raise ConfigError("the training part is empty")
    images, labels = data.images, data.labels
    if not cfg.smote.enabled:
        return images, labels, train_idx, val_idx
    ordered = np.sort(train_idx)
    x, y = smote_oversample(np.asarray(images[ordered]), labels[ordered], cfg.smote, data.num_classes, cfg.seed)
    val_x = np.asarray(images[val_idx]) if len(val_idx) else np.empty((0,) + images.shape[1:], np.uint8)
    images = np.concatenate([x, val_x])
    labels = np.concatenate([y, labels[val_idx]])
    rng = np.random.default_rng(cfg.seed)
    train_idx = rng.permutation(len(x)) if cfg.data.split.order != "sorted" else np.arange(len(x))
    return images, labels, train_idx, np.arange(len(x), len(x) + len(val_x))


def _images_on_device(cfg: RunConfig, accelerator: str, images: np.ndarray) -> bool:
    """`train.device_cache`: keep every image on the GPU (batches then send indices only); `auto` where they fit."""
    if cfg.train.device_cache == "on":
        return True
    if cfg.train.device_cache != "auto" or accelerator != "gpu":
        return False
    return images.nbytes < 0.4 * torch.cuda.get_device_properties(0).total_memory


def _trainer(
    cfg: RunConfig, accelerator: str, run_dir: Path, progress: bool, has_val: bool, train_size: int
) -> L.Trainer:
    """The Lightning trainer: a checkpoint every epoch (safetensors), early stopping on val, the run's precision."""
    callbacks = [
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="last",
            save_last=False,
            save_top_k=-1,
            every_n_epochs=1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        ),
    ]
    if progress and rank_zero_only.rank == 0:
        callbacks.append(RichProgressBar(leave=True))
    if cfg.train.early_stopping_patience and has_val:
        callbacks.append(EarlyStopping(monitor="val_loss", patience=cfg.train.early_stopping_patience, mode="min"))
    return L.Trainer(
        accelerator=accelerator,
        devices=cfg.train.devices,
        num_nodes=cfg.train.num_nodes,
        strategy=cfg.train.strategy,
        precision=resolve_precision(cfg, accelerator),
        max_epochs=cfg.train.epochs,
        callbacks=callbacks,
        plugins=[SafetensorsCheckpointIO()],
        logger=make_logger(cfg.train.logger, run_dir),
        enable_progress_bar=progress and rank_zero_only.rank == 0,
        enable_model_summary=False,
        deterministic=accelerator == "cpu",
        use_distributed_sampler=False,  # EpochBatches shards by rank itself, keeping (seed, epoch) order
        num_sanity_val_steps=0,
        # a logger (train.logger) sees every step of a short epoch, not nothing
        log_every_n_steps=max(1, min(50, train_size // cfg.train.batch_size)),
        default_root_dir=str(run_dir),
    )


def _loaders(
    cfg: RunConfig,
    trainer: L.Trainer,
    accelerator: str,
    images: np.ndarray | None,
    labels: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
) -> tuple[DataLoader, DataLoader | None]:
    """Train and val loaders, sharded by the trainer's rank; `images` None when they live on the device."""
    # The trainer knows the real world size and this process's rank (also with devices="auto" on many GPUs).
    rank, world = trainer.global_rank, trainer.world_size
    workers = cfg.train.workers if cfg.train.workers is not None else 0
    loader_args = dict(
        batch_size=None,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=accelerator == "gpu" and images is not None,
    )
    if workers:  # spawned, never forked (a trainer has threads: see bloodcell.data.workers), and they die with it
        loader_args.update(
            multiprocessing_context=pool_context(), worker_init_fn=functools.partial(loader_worker_init, rank=rank)
        )
    train_loader = DataLoader(
        ArrayBatches(images, labels, train_idx),
        sampler=EpochBatches(len(train_idx), cfg.train.batch_size, cfg.train.epoch_shuffle, cfg.seed, rank, world),
        **loader_args,
    )
    if not len(val_idx):
        return train_loader, None
    val_sampler = EpochBatches(len(val_idx), max(cfg.train.batch_size, 64), False, cfg.seed, rank, world)
    return train_loader, DataLoader(ArrayBatches(images, labels, val_idx), sampler=val_sampler, **loader_args)


def _train(
    trainer: L.Trainer,
    module: Classifier,
    loaders: tuple,
    run_dir: Path,
    resume: bool,
    restore_torch_flags: Callable[[], None],
) -> None:
    """trainer.fit from the last checkpoint when resuming; a diverged or failed write names the checkpoint kept."""
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    resume_from = resumable_checkpoint(ckpt_path) if resume else None
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*|.*exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*predict_dataloader.*|.*val_dataloader.*|.*LeafSpec.*")
        torch.utils.deterministic.fill_uninitialized_memory = False
        try:
            trainer.fit(module, *loaders, ckpt_path=resume_from)
        except (TrainingDiverged, WriteError) as exc:
            raise type(exc)(f"{exc}; {_kept_checkpoint(ckpt_path, exc)}") from None
        finally:
            restore_torch_flags()


def fit(cfg: RunConfig, data: PreparedData, run_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True):
    """Train `cfg.model` on `data`; return the trained model (on CPU, eval mode) or None on non-zero DDP ranks.

    Args:
        cfg: The run's config (model, training, hardware).
        data: The prepared images, labels and split.
        run_dir: The run's folder: checkpoints, history.csv and the final model are written there.
        resume: Continue from run_dir/checkpoints/last.ckpt when one can be resumed; False starts afresh.
        progress: Show progress bars (unless turned off by default, e.g. BLOODCELL_PROGRESS=0).
    """
    run_dir = Path(run_dir)
    progress = progress and enabled_by_default()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    restore_torch_flags = _deterministic_state_restorer()  # before L.Trainer, which changes them
    accelerator = resolve_accelerator(cfg)
    images, labels, train_idx, val_idx = _training_arrays(cfg, data)
    model = build_model(cfg, data.num_classes, data.class_names)
    weights = class_weights_for(labels[train_idx], data.num_classes) if cfg.train.class_weights == "balanced" else None
    on_device = _images_on_device(cfg, accelerator, images)
    module = Classifier(model, cfg, weights, device_images=images if on_device else None)
    module.on_history = lambda rows: _write_history(run_dir, rows)  # history.csv after every epoch
    module.channels_last = resolve_channels_last(cfg, accelerator)
    trainer = _trainer(cfg, accelerator, run_dir, progress, len(val_idx) > 0, len(train_idx))
    loaders = _loaders(cfg, trainer, accelerator, None if on_device else images, labels, train_idx, val_idx)
    if cfg.train.compile:
        module.model = torch.compile(module.model)
    _train(trainer, module, loaders, run_dir, resume, restore_torch_flags)
    if not trainer.is_global_zero:
        return None
    _write_history(run_dir, module.history)
    final = module.final_model
    final = getattr(final, "_orig_mod", final)  # torch.compile's wrapper
    final = final.to("cpu").eval()
    save_checkpoint(
        final,
        run_dir,
        {
            "class_names": data.class_names,
            # what every path that feeds this model must do to an image (predict, serve, explain, ONNX users)
            "preprocess": {
                "input_size": cfg.data.input_size,
                "interpolation": cfg.data.interpolation,
                "white_balance": cfg.data.white_balance,
                "normalise": "(pixel / 255 - mean) / std, per RGB channel",
            },
            "training_config": cfg.model_dump(mode="json"),
            "epochs_trained": len(module.history),
            "accelerator": accelerator,
            "precision": trainer.precision,
            "data_fingerprint": data.source.get("fingerprint"),
            "split_seed": cfg.split_seed,
        },
    )
    return final

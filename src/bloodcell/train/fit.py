"""Train one model on prepared data with Lightning: devices, precision, DDP, checkpoints, resume.

`fit(cfg, data, run_dir)` leaves in `run_dir`: history.csv, model.safetensors + model.json (final weights) and,
while running, checkpoints/last.ckpt (+ its tensor file) written at the end of every epoch. With `resume=True` it
continues from that checkpoint, so kill -9 loses at most the epoch in progress.
"""

from __future__ import annotations

import csv
import functools
import io as _io
import logging
import mmap
import os
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, RichProgressBar
from torch.utils.data import DataLoader, Dataset, Sampler

from bloodcell import io
from bloodcell.config import RunConfig
from bloodcell.data.prepare import PreparedData
from bloodcell.data.workers import loader_worker_init, pool_context
from bloodcell.errors import ConfigError, ModelError, TrainingDiverged, WriteError
from bloodcell.models import create_model
from bloodcell.models.checkpoint import init_from_model, save_checkpoint
from bloodcell.models.metadata import is_bloodcell_model
from bloodcell.progress import console, enabled_by_default
from bloodcell.train.checkpoint_io import SafetensorsCheckpointIO, read_checkpoint
from bloodcell.train.module import Classifier, epoch_seed
from bloodcell.train.smote import smote_oversample

class _NoAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # Lightning's start-up "Tip: ... litlogger" line
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_NoAdverts())

HISTORY_COLUMNS = ["epoch", "stage", "objective", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]


class EpochBatches(Sampler):
    """Batches of indices: a (seed, epoch) permutation when shuffling, sharded across DDP ranks.

    A last batch of one image joins the batch before it: BatchNorm cannot train on one image whose features are
    1x1 (small inputs through deep networks), and the images of every epoch are all still seen.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> np.ndarray:
        order = np.random.default_rng(epoch_seed(self.seed, self.epoch, 7)).permutation(self.n) if self.shuffle else np.arange(self.n)
        if self.world_size > 1:  # equal shares for every rank (DDP needs the same number of steps)
            per_rank = -(-self.n // self.world_size)
            order = np.resize(order, per_rank * self.world_size)[self.rank :: self.world_size]
        return order

    def __iter__(self):
        order = self._indices()
        starts = list(range(0, len(order), self.batch_size))
        if len(starts) > 1 and len(order) - starts[-1] == 1:
            starts.pop()  # a lone last image joins the batch before it
        for start, end in zip(starts, starts[1:] + [len(order)]):
            yield order[start:end].tolist()

    def __len__(self) -> int:
        per_rank = -(-self.n // self.world_size)
        batches = -(-per_rank // self.batch_size)
        return batches - 1 if batches > 1 and per_rank % self.batch_size == 1 else batches


class ArrayBatches(Dataset):
    """Item i of the sampler is a list of positions; returns (uint8 images (B,H,W,3) or their indices, labels)."""

    def __init__(self, images: np.ndarray | None, labels: np.ndarray, index: np.ndarray):
        self.images, self.labels, self.index = images, labels, np.asarray(index)

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        """Sent to a spawned loader worker: the preprocessing cache's memmap as its file (reopened there), not its
        bytes."""
        state = dict(self.__dict__)
        a = self.images
        if isinstance(a, np.memmap) and isinstance(a.base, mmap.mmap) and a.filename:
            state["images"] = ("memmap", a.filename, a.offset, a.shape, a.dtype.str, bool(a.flags.f_contiguous and not a.flags.c_contiguous))
        return state

    def __setstate__(self, state: dict) -> None:
        a = state["images"]
        if isinstance(a, tuple):
            _, filename, offset, shape, dtype, fortran = a
            state["images"] = np.memmap(filename, dtype=np.dtype(dtype), mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
        self.__dict__.update(state)

    def __getitem__(self, positions):
        idx = self.index[np.asarray(positions)]
        y = torch.from_numpy(self.labels[idx].astype(np.int64))
        if self.images is None:  # images live on the device; send indices only
            return torch.from_numpy(idx.astype(np.int64)), y
        order = np.argsort(idx, kind="stable")  # sorted reads are faster from a memmap
        x = np.empty((len(idx),) + self.images.shape[1:], dtype=np.uint8)
        x[order] = self.images[idx[order]]
        return torch.from_numpy(x), y


def cpu_kernels_below_avx512() -> bool:
    """torch's CPU kernels are AVX2 or older: an older CPU, or a newer one capped (ATEN_CPU_CAPABILITY=avx2)."""
    return torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX")


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which bf16 convolutions still run natively
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "ALL")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 convolutions run natively (1.6-2.2x fp32 on this project's EPYC); elsewhere they are
    emulated. A capped ISA (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2: how an older CPU is emulated, or a
    workaround for a kernel bug) counts as the CPU it emulates."""
    try:
        hardware = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # torch without these probes: stay with fp32
        return False
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    return hardware and not cpu_kernels_below_avx512() and onednn_cap.startswith(_ONEDNN_BF16_ISAS)


def resolve_precision(cfg: RunConfig, accelerator: str) -> str:
    """`auto`: bf16 autocast where the hardware runs bf16 natively (CUDA with bf16, or such a CPU), else fp32."""
    p = cfg.train.precision
    if p != "auto":
        return {"32": "32-true"}.get(p, p)
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    if accelerator == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"


# Measured (docs/benchmarks.md): channels_last is faster for every zoo model on AVX-512 CPUs, and for every one but
# VGG-16 on CPUs with AVX2 alone, where a bare VGG-16 step ran 0.87x contiguous at 224 px (whole epochs 0.86-0.96x).
CONTIGUOUS_ON_AVX2_CPUS = {"vgg16"}


def resolve_channels_last(cfg: RunConfig, accelerator: str) -> bool:
    """`train.channels_last` for this machine: off where it was measured slower (VGG-16 on an AVX2-only CPU)."""
    if not cfg.train.channels_last:
        return False
    return not (accelerator == "cpu" and cpu_kernels_below_avx512() and cfg.model.name in CONTIGUOUS_ON_AVX2_CPUS)


def resolve_accelerator(cfg: RunConfig) -> str:
    a = cfg.train.accelerator
    if a == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if a in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.accelerator is '{a}' but no CUDA device is available")
    return "gpu" if a == "cuda" else a


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


def _resumable_checkpoint(path: Path) -> str | None:
    """`path` if it holds a whole checkpoint; None (train from the start) if there is none or it is unusable."""
    if not path.exists():
        return None
    try:
        read_checkpoint(path)
    except ModelError as exc:
        if rank_zero_only.rank == 0:
            console().print(f"warning: {exc}; training starts again from epoch 1", markup=False, highlight=False, soft_wrap=True)
        return None
    return str(path)


def _kept_checkpoint(path: Path, exc: Exception) -> str:
    try:
        epoch = int(read_checkpoint(path)["epoch"]) + 1
    except ModelError:
        return "no epoch finished, so no checkpoint was kept"
    then = "; a resumed run continues from it" if isinstance(exc, WriteError) else ""  # a diverged one would diverge again
    return f"the checkpoint of epoch {epoch}, the last good one, is kept: {path}{then}"


def _deterministic_state_restorer():
    """Lightning's `deterministic=True` (used on CPU, for exact resumes) turns torch's deterministic mode on for the
    whole process, and that mode also fills every new tensor with NaN to expose reads of uninitialised memory. The
    filling cost 12 % of a ResNet-50 fp32 step on an AVX2 CPU (profiled: aten::fill_ under aten::empty) and changes
    no result, so it is off while bloodcell trains; afterwards (evaluation, the user's own code) torch's flags are
    put back as they were. Returns the function that puts them back."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(), torch.utils.deterministic.fill_uninitialized_memory)

    def restore() -> None:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.utils.deterministic.fill_uninitialized_memory = saved[2]

    return restore


def make_logger(kind: str, run_dir: Path):
    """The Lightning logger `train.logger` names (history.csv is written whatever it is); False for none."""
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(str(run_dir), name="logs")
    import importlib.util

    # the package is named as the logger (TensorBoard's also writes through tensorboardX)
    if importlib.util.find_spec(kind) is None and not (kind == "tensorboard" and importlib.util.find_spec("tensorboardX")):
        raise ConfigError(f"train.logger is '{kind}' but {kind} is not installed: pip install {kind}")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(str(run_dir), name="logs")
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name="bloodcell", run_name=run_dir.name, save_dir=str(run_dir / "mlruns"))


def build_model(cfg: RunConfig, num_classes: int, class_names: list[str] | None = None):
    """The run's model: from scratch, from ImageNet backbone weights, or from a trained bloodcell model (fine-tuning)."""
    pretrained = cfg.model.pretrained if cfg.model.pretrained not in (None,) else False
    if is_bloodcell_model(pretrained):
        model = create_model(cfg.model.name, num_classes=num_classes, pretrained=False, input_size=cfg.data.input_size, **cfg.model.kwargs)
        names = class_names or [f"class_{i}" for i in range(num_classes)]
        try:
            init_from_model(model, pretrained, names, cfg.data.input_size, cfg.data.white_balance)
        except ModelError as exc:
            raise ConfigError(str(exc)) from None
        return model
    return create_model(cfg.model.name, num_classes=num_classes, pretrained=pretrained, input_size=cfg.data.input_size, **cfg.model.kwargs)


def fit(cfg: RunConfig, data: PreparedData, run_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True):
    """Train `cfg.model` on `data`; return the trained model (on CPU, eval mode) or None on non-zero DDP ranks."""
    run_dir = Path(run_dir)
    progress = progress and enabled_by_default()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    restore_torch_flags = _deterministic_state_restorer()  # before L.Trainer, which changes them
    accelerator = resolve_accelerator(cfg)
    train_idx, val_idx = data.parts["train"], data.parts["val"]
    if len(train_idx) == 0:
        raise ConfigError("the training part is empty")
    images, labels = data.images, data.labels
    if cfg.smote.enabled:
        x, y = smote_oversample(np.asarray(images[np.sort(train_idx)]), labels[np.sort(train_idx)], cfg.smote, data.num_classes, cfg.seed)
        # training images become an in-memory array: originals then synthetic ones; val stays on the cache
        val_x = np.asarray(images[val_idx]) if len(val_idx) else np.empty((0,) + images.shape[1:], np.uint8)
        images = np.concatenate([x, val_x])
        labels = np.concatenate([y, labels[val_idx]])
        rng = np.random.default_rng(cfg.seed)
        train_idx = rng.permutation(len(x)) if cfg.data.split.order != "sorted" else np.arange(len(x))
        val_idx = np.arange(len(x), len(x) + len(val_x))

    model = build_model(cfg, data.num_classes, data.class_names)
    weights = class_weights_for(labels[train_idx], data.num_classes) if cfg.train.class_weights == "balanced" else None
    on_device = cfg.train.device_cache == "on" or (
        cfg.train.device_cache == "auto" and accelerator == "gpu" and images.nbytes < 0.4 * torch.cuda.get_device_properties(0).total_memory
    )
    module = Classifier(model, cfg, weights, device_images=images if on_device else None)
    module.on_history = lambda rows: _write_history(run_dir, rows)  # history.csv after every epoch
    module.channels_last = resolve_channels_last(cfg, accelerator)

    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_last=False, save_top_k=-1, every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False),
    ]
    if progress and rank_zero_only.rank == 0:
        callbacks.append(RichProgressBar(leave=True))
    if cfg.train.early_stopping_patience and len(val_idx):
        callbacks.append(EarlyStopping(monitor="val_loss", patience=cfg.train.early_stopping_patience, mode="min"))
    trainer = L.Trainer(
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
        log_every_n_steps=max(1, min(50, len(train_idx) // cfg.train.batch_size)),
        default_root_dir=str(run_dir),
    )
    # The trainer knows the real world size and this process's rank (also with devices="auto" on many GPUs).
    rank, world = trainer.global_rank, trainer.world_size
    workers = cfg.train.workers if cfg.train.workers is not None else 0
    loader_args = dict(batch_size=None, num_workers=workers, persistent_workers=workers > 0, pin_memory=accelerator == "gpu" and not on_device)
    if workers:  # spawned, never forked (a trainer has threads: see bloodcell.data.workers), and they die with it
        loader_args.update(multiprocessing_context=pool_context(), worker_init_fn=functools.partial(loader_worker_init, rank=rank))
    train_loader = DataLoader(
        ArrayBatches(None if on_device else images, labels, train_idx),
        sampler=EpochBatches(len(train_idx), cfg.train.batch_size, cfg.train.epoch_shuffle, cfg.seed, rank, world),
        **loader_args,
    )
    val_loader = (
        DataLoader(ArrayBatches(None if on_device else images, labels, val_idx), sampler=EpochBatches(len(val_idx), max(cfg.train.batch_size, 64), False, cfg.seed, rank, world), **loader_args)
        if len(val_idx)
        else None
    )
    if cfg.train.compile:
        module.model = torch.compile(module.model)
    ckpt_path = ckpt_dir / "last.ckpt"
    resume_from = _resumable_checkpoint(ckpt_path) if resume else None
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*|.*exists and is not empty.*")
        warnings.filterwarnings("ignore", message=".*predict_dataloader.*|.*val_dataloader.*|.*LeafSpec.*")
        torch.utils.deterministic.fill_uninitialized_memory = False
        try:
            trainer.fit(module, train_loader, val_loader, ckpt_path=resume_from)
        except (TrainingDiverged, WriteError) as exc:
            raise type(exc)(f"{exc}; {_kept_checkpoint(ckpt_path, exc)}") from None
        finally:
            restore_torch_flags()
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

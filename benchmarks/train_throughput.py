"""Benchmark (not a test): training throughput, bloodcell's loop vs a reference loop, same models, images, machine.

    .venv/bin/python benchmarks/train_throughput.py DATA_DIR --models resnet50 --size 128 --images 512
    .venv/bin/python benchmarks/train_throughput.py DATA_DIR --models all --size 224 --images 64

The reference loop is written the way torchvision's references/classification/train.py does it: ImageFolder, PIL
transforms per image (RandomResizedCrop replaced by Resize so both loops see the same pixels, horizontal flip,
ToTensor, Normalize), a DataLoader with worker processes, SGD, and autocast. It runs twice per model:
  * "usual": as that script runs on this device. Its --amp is CUDA autocast + GradScaler (fp16); on a CPU it does
    nothing, so there the usual way trains in fp32.
  * "same precision": autocast in the precision bloodcell resolves (bf16 where the hardware has it), like for like.
bloodcell's loop is `bloodcell.train.fit` with its defaults (`precision: auto`, `device_cache: auto`,
channels_last) on the uint8 cache, decoded once, with batched augmentation on the device.
Each loop trains one warm-up epoch and `--timed-epochs` timed epochs (default 1) over the same `--images` images;
the fastest timed epoch of each loop is printed as images/s, with the ratios, as a markdown table (on a shared
machine, the best of several epochs is the one least disturbed by others).
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time

import numpy as np
import torch
import torchvision
import yaml
from torch.utils.data import DataLoader, Subset

from bloodcell.config import parse_config
from bloodcell.data.cache import build_cache
from bloodcell.data.discover import scan
from bloodcell.data.images import is_image_name
from bloodcell.data.prepare import PreparedData
from bloodcell.evaluate.machine import cpu_line, environment
from bloodcell.models import create_model, list_models, model_info
from bloodcell.train.fit import fit
from bloodcell.train.hardware import resolve_accelerator, resolve_precision

AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def reference_epoch_rate(
    root: str, model_name: str, size: int, n: int, batch: int, workers: int, precision: str, device: str, timed: int = 1
) -> float:
    """torchvision-reference style: PIL decode + transforms per image per epoch in DataLoader workers."""
    from torchvision import transforms as T

    tf = T.Compose(
        [
            T.Resize((size, size)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )
    # the suffixes bloodcell's scan reads (the device pack is WebP), hidden files left out as the scan does
    ds = torchvision.datasets.ImageFolder(
        root, transform=tf, is_valid_file=lambda p: is_image_name(p) and not os.path.basename(p).startswith(".")
    )
    idx = np.random.default_rng(0).permutation(len(ds))[:n]
    loader = DataLoader(
        Subset(ds, idx.tolist()),
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=False,
        persistent_workers=workers > 0,
        pin_memory=device == "cuda",
    )
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=len(ds.classes), input_size=size).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    crit = torch.nn.CrossEntropyLoss()
    dtype = AUTOCAST_DTYPES.get(precision)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    model.train()
    rate = 0.0
    for epoch in range(1 + timed):  # a warm-up epoch, then the timed ones
        t0, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += len(y)
        if device == "cuda":
            torch.cuda.synchronize()
        if epoch:
            rate = max(rate, seen / (time.perf_counter() - t0))
    return rate


def bloodcell_epoch_rate(
    cache,
    model_name: str,
    size: int,
    n: int,
    batch: int,
    precision: str,
    timed: int = 1,
    train_extra: dict | None = None,
) -> float:
    idx = np.random.default_rng(0).permutation(len(cache.labels))[:n]
    data = PreparedData(
        cache.images,
        cache.labels,
        cache.class_names,
        cache.relpaths,
        {"train": idx, "val": np.arange(0), "test": np.arange(0)},
    )
    train = {
        "epochs": 1 + timed,
        "batch_size": batch,
        "optimizer": "sgd",
        "lr": 0.01,
        "precision": precision,
        **(train_extra or {}),
    }
    if model_name == "supcon":  # time the cross-entropy objective, as the reference loop trains
        train["stages"] = None
    cfg = parse_config(
        {
            "model": {"name": model_name},
            "data": {"input_size": size, "interpolation": "bilinear"},
            "train": train,
            "augment": {
                "enabled": True,
                "rot90": False,
                "vflip": False,
                "degrees": 0,
                "translate": 0,
                "scale": [1.0, 1.0],
                "brightness": 0,
                "contrast": 0,
                "saturation": 0,
                "hue": 0,
            },
        }
    )
    with tempfile.TemporaryDirectory() as d:
        fit(cfg, data, d, progress=False)
        rows = list(csv.DictReader(open(os.path.join(d, "history.csv"))))
    return max(n / float(r["seconds"]) for r in rows[1:])  # after the first epoch: warm caches, allocator and threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--models", nargs="+", default=["resnet50"], help="zoo names, or 'all'")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="reference DataLoader workers")
    ap.add_argument("--precision", default="auto", help="bloodcell precision (auto resolves per device)")
    ap.add_argument(
        "--timed-epochs",
        type=int,
        default=1,
        help="timed epochs per loop after the warm-up one; the fastest is reported",
    )
    ap.add_argument(
        "--train-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="bloodcell train.* options to try, e.g. channels_last=false",
    )
    ap.add_argument(
        "--skip-usual",
        action="store_true",
        help="time the reference loop only at bloodcell's precision (saves a loop where they differ)",
    )
    args = ap.parse_args()
    models = list_models() if args.models == ["all"] else args.models
    train_extra = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.train_set)}
    env = environment()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = parse_config({"train": {"precision": args.precision}})
    ours = resolve_precision(base, resolve_accelerator(base))
    usual = "16-mixed" if device == "cuda" else "32-true"  # torchvision reference --amp: CUDA fp16 autocast only
    print(
        f"machine: {cpu_line()}, {env['cpus']} cores, device {env['device']}; "
        f"torch {env['torch']} ({torch.get_num_threads()} threads), "
        f"lightning {env.get('lightning')}; {time.strftime('%Y-%m-%d')}"
    )
    print(
        f"{args.images} PBC images per epoch at {args.size}px, batch {args.batch}, SGD, "
        f"best of {args.timed_epochs} timed epoch(s) after a warm-up; reference DataLoader workers {args.workers}; "
        f"bloodcell precision {ours}, reference usual {usual}"
        + (f"; bloodcell train options {train_extra}" if train_extra else "")
        + "\n"
    )
    cache = build_cache(scan(args.root, progress=False), args.size, "bilinear", progress=False)
    print(
        f"| model | reference, usual ({usual}) img/s | reference, {ours} img/s | bloodcell ({ours}) img/s | "
        "vs usual | vs same precision |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name in models:
        size = max(args.size, model_info(name).min_input_size)
        ref_usual = (
            None
            if args.skip_usual and ours != usual
            else reference_epoch_rate(
                args.root, name, size, args.images, args.batch, args.workers, usual, device, args.timed_epochs
            )
        )
        ref_same = (
            ref_usual
            if ours == usual
            else reference_epoch_rate(
                args.root, name, size, args.images, args.batch, args.workers, ours, device, args.timed_epochs
            )
        )
        rate = bloodcell_epoch_rate(
            cache
            if size == args.size
            else build_cache(scan(args.root, progress=False), size, "bilinear", progress=False),
            name,
            size,
            args.images,
            args.batch,
            args.precision,
            args.timed_epochs,
            train_extra,
        )
        usual_cells = ("-", "-") if ref_usual is None else (f"{ref_usual:.1f}", f"{rate / ref_usual:.2f}x")
        print(
            f"| {name}{'' if size == args.size else f' ({size}px)'} | {usual_cells[0]} | {ref_same:.1f} | "
            f"{rate:.1f} | {usual_cells[1]} | {rate / ref_same:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()

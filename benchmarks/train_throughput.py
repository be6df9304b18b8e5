"""Benchmark (not a test): training throughput, bloodcell's loop vs a reference loop, same model, images, machine.

    .venv/bin/python benchmarks/train_throughput.py DATA_DIR --model resnet50 --size 128 --images 512

The reference loop is written the way torchvision's references/classification/train.py does it: ImageFolder,
PIL transforms per image (RandomResizedCrop replaced by Resize so both loops see the same pixels, horizontal flip,
ToTensor, Normalize), a DataLoader with worker processes, SGD, and autocast when --amp is given. bloodcell's loop is
`bloodcell.train.fit` on the uint8 cache (decoded once), with batched on-device augmentation and channels_last.
Both train for one warm-up epoch and one timed epoch over the same `--images` images; the timed epochs are printed
as images/s and their ratio.
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
from torch.utils.data import DataLoader, Subset

from bloodcell.config import parse_config
from bloodcell.data.cache import build_cache
from bloodcell.data.discover import scan
from bloodcell.data.prepare import PreparedData
from bloodcell.evaluate.run import environment
from bloodcell.models import create_model
from bloodcell.train.fit import fit


def reference_epoch_rate(root: str, model_name: str, size: int, n: int, batch: int, workers: int, amp: bool) -> float:
    """torchvision-reference style: PIL decode + transforms per image per epoch in DataLoader workers."""
    from torchvision import transforms as T

    tf = T.Compose([T.Resize((size, size)), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    ds = torchvision.datasets.ImageFolder(root, transform=tf, is_valid_file=lambda p: p.lower().endswith((".jpg", ".png")) and not os.path.basename(p).startswith("."))
    idx = np.random.default_rng(0).permutation(len(ds))[:n]
    loader = DataLoader(Subset(ds, idx.tolist()), batch_size=batch, shuffle=True, num_workers=workers, drop_last=False, persistent_workers=workers > 0)
    model = create_model(model_name, num_classes=len(ds.classes), input_size=size)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    crit = torch.nn.CrossEntropyLoss()
    model.train()
    rate = 0.0
    for epoch in range(2):
        t0, seen = time.perf_counter(), 0
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        rate = seen / (time.perf_counter() - t0)
    return rate


def bloodcell_epoch_rate(root: str, model_name: str, size: int, n: int, batch: int, precision: str) -> float:
    inv = scan(root, progress=False)
    cache = build_cache(inv, size, "bilinear", progress=False)
    idx = np.random.default_rng(0).permutation(len(inv.records))[:n]
    data = PreparedData(cache.images, cache.labels, cache.class_names, cache.relpaths, {"train": idx, "val": np.arange(0), "test": np.arange(0)})
    cfg = parse_config({
        "model": {"name": model_name}, "data": {"input_size": size, "interpolation": "bilinear"},
        "train": {"epochs": 2, "batch_size": batch, "optimizer": "sgd", "lr": 0.01, "precision": precision, "accelerator": "cpu"},
        "augment": {"enabled": True, "rot90": False, "vflip": False, "degrees": 0, "translate": 0, "scale": [1.0, 1.0], "brightness": 0, "contrast": 0, "saturation": 0, "hue": 0},
    })
    with tempfile.TemporaryDirectory() as d:
        fit(cfg, data, d, progress=False)
        rows = list(csv.DictReader(open(os.path.join(d, "history.csv"))))
    return n / float(rows[-1]["seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--precision", default="32-true", help="bloodcell precision: 32-true or bf16-mixed")
    ap.add_argument("--amp", action="store_true", help="reference loop under bf16 autocast")
    args = ap.parse_args()
    env = environment()
    print(f"machine: {env['processor']}, {env['cpus']} cores; torch {env['torch']} threads {torch.get_num_threads()}; {time.strftime('%Y-%m-%d')}")
    print(f"model {args.model} at {args.size}px, {args.images} images per epoch, batch {args.batch}")
    ref = reference_epoch_rate(args.root, args.model, args.size, args.images, args.batch, args.workers, args.amp)
    print(f"reference loop (ImageFolder + PIL transforms + DataLoader x{args.workers}{' + bf16 autocast' if args.amp else ''}): {ref:.1f} img/s")
    ours = bloodcell_epoch_rate(args.root, args.model, args.size, args.images, args.batch, args.precision)
    print(f"bloodcell loop (uint8 cache, batched augmentation, channels_last, {args.precision}): {ours:.1f} img/s")
    print(f"ratio bloodcell / reference: {ours / ref:.2f}x")


if __name__ == "__main__":
    main()

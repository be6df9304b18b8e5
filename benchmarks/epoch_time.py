"""Benchmark (not a test): seconds per training epoch of every zoo model on this machine, at given input sizes.

    .venv/bin/python benchmarks/epoch_time.py --sizes 64 224 --images 112

One epoch = one pass over `--images` training images (default: the 112-image training part of the embedded
sample's default split), batch 32, Adam, fp32 unless --precision says otherwise, through bloodcell's own Lightning loop,
after one warm-up batch. Prints seconds per epoch and images per second, with the machine and versions.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from bloodcell.config import parse_config
from bloodcell.data.prepare import PreparedData
from bloodcell.evaluate.machine import cpu_line, environment
from bloodcell.models import list_models, model_info
from bloodcell.train.fit import fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    ap.add_argument("--images", type=int, default=112)
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--precision", default="32-true", help="train.precision (the table in docs/benchmarks.md is fp32)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment()
    print(
        f"machine: {cpu_line()}, {env['cpus']} cores, torch threads {torch.get_num_threads()}; "
        f"torch {env['torch']}, lightning {env.get('lightning')}; {time.strftime('%Y-%m-%d')}"
    )
    print(f"epoch = {args.images} images, batch 32, Adam, {args.precision}, CPU\n")
    print(f"{'model':12s} {'size':>5s} {'s/epoch':>9s} {'img/s':>8s}")
    rng = np.random.default_rng(0)
    for name in args.models or list_models():
        for size in args.sizes:
            s = max(size, model_info(name).min_input_size)
            imgs = rng.integers(0, 256, (args.images + 8, s, s, 3), dtype=np.uint8)
            labels = np.arange(len(imgs)) % 8
            data = PreparedData(
                imgs,
                labels.astype(np.int64),
                [f"c{k}" for k in range(8)],
                [str(i) for i in range(len(imgs))],
                {"train": np.arange(args.images), "val": np.arange(args.images, args.images + 8), "test": np.arange(0)},
            )
            cfg = parse_config(
                {
                    "model": {"name": name},
                    "data": {"input_size": s},
                    "train": {"epochs": 2, "batch_size": 32, "accelerator": "cpu", "precision": args.precision},
                }
            )
            if name == "supcon":
                cfg = parse_config(
                    {**cfg.model_dump(), "train": {**cfg.train.model_dump(), "stages": None, "epochs": 2}}
                )
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                fit(cfg, data, d, progress=False)
                import csv

                rows = list(csv.DictReader(open(os.path.join(d, "history.csv"))))
            secs = float(rows[-1]["seconds"])  # the second epoch: warm caches, allocator and threads
            print(f"{name:12s} {s:5d} {secs:9.2f} {args.images / secs:8.1f}", flush=True)


if __name__ == "__main__":
    main()

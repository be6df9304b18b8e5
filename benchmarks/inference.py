"""Benchmark (not a test): CPU inference speed, PyTorch eager vs ONNX Runtime, at batch 1 and 32.

    .venv/bin/python benchmarks/inference.py --model runs/cnn        # a trained run directory
    .venv/bin/python benchmarks/inference.py                          # the bundled model
    .venv/bin/python benchmarks/inference.py --arch cnn --size 64     # a fresh untrained model

The model is exported to ONNX in a temporary folder (with the usual parity check), then each backend
classifies random uint8 batches (normalisation + forward, no decoding): warm-up iterations, then
timed iterations until both --iters and --min-seconds are reached. A last line times the whole
pipeline (decode + resize + forward) with Predictor.predict_paths on the embedded sample.
Prints the machine, library versions and the command, then a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "pbc-sample"


def time_batches(fn, batch: np.ndarray, warmup: int, iters: int, min_seconds: float) -> tuple[float, float]:
    """(images per second, median milliseconds per batch)."""
    for _ in range(warmup):
        fn(batch)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < iters or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t0)
    return len(batch) * len(times) / sum(times), 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="run directory (default: the bundled model)")
    ap.add_argument("--arch", help="benchmark a fresh untrained model of this architecture instead (e.g. cnn)")
    ap.add_argument("--size", type=int, default=None, help="input size for --arch (default: the model's)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--min-seconds", type=float, default=3.0)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch and onnxruntime intra-op threads (default: library defaults)"
    )
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from bloodcell import __version__
    from bloodcell.evaluate.machine import cpu_line
    from bloodcell.infer import Predictor
    from bloodcell.infer.export import export_onnx
    from bloodcell.models import create_model, save_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        if args.arch:
            names = (
                sorted(d.name for d in SAMPLE.iterdir() if d.is_dir())
                if SAMPLE.is_dir()
                else [f"class_{i}" for i in range(8)]
            )
            net = create_model(args.arch, num_classes=len(names), input_size=args.size)
            source = save_checkpoint(net, Path(tmp) / "run", {"class_names": names})
            label = f"untrained {args.arch} (fresh weights)"
        else:
            source = args.model
            label = str(args.model or "bundled model")
        pt = Predictor.load(source)
        report = export_onnx(pt.source, Path(tmp) / "model.onnx")
        onnx = Predictor.load(report.path)
        if args.threads:
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            onnx.session = ort.InferenceSession(str(report.path), sess_options=opts, providers=["CPUExecutionProvider"])
        params = sum(p.numel() for p in pt.model.parameters())

        print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
        print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
        print(
            f"machine: {cpu_line()}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}; "
            f"torch threads {torch.get_num_threads()}, onnxruntime intra-op threads {args.threads or 'default'}"
        )
        print(
            f"versions: python {platform.python_version()}, torch {torch.__version__}, "
            f"onnxruntime {ort.__version__}, bloodcell {__version__}"
        )
        print(
            f"model: {pt.model_name} ({label}), {params:,} parameters, input {pt.input_size}x{pt.input_size}; "
            f"ONNX parity {report.max_abs_diff:.2g} on {report.images} {report.image_source}"
        )
        print()
        print("| backend | batch | images/s | ms per batch (median) |")
        print("|---|---:|---:|---:|")
        rng = np.random.default_rng(0)
        for bs in args.batch_sizes:
            batch = rng.integers(0, 256, (bs, pt.input_size, pt.input_size, 3), dtype=np.uint8)
            for name, predictor in (("PyTorch eager", pt), ("ONNX Runtime", onnx)):
                ips, ms = time_batches(predictor.logits, batch, args.warmup, args.iters, args.min_seconds)
                print(f"| {name} | {bs} | {ips:,.1f} | {ms:,.1f} |", flush=True)
        if SAMPLE.is_dir():
            files = sorted(SAMPLE.rglob("*.jpg"))
            for name, predictor in (("PyTorch eager", pt), ("ONNX Runtime", onnx)):
                predictor.predict_paths(files[:32], progress=False)  # warm-up
                t0 = time.perf_counter()
                predictor.predict_paths(files, batch_size=32, progress=False)
                dt = time.perf_counter() - t0
                print(
                    f"| {name}, predict_paths (decode + resize + forward) on {len(files)} sample JPEGs | 32 | "
                    f"{len(files) / dt:,.1f} | - |"
                )


if __name__ == "__main__":
    main()

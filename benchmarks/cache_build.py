"""Benchmark (not a test): preprocessing-cache build rate on a dataset folder.

    .venv/bin/python benchmarks/cache_build.py ../shared/data/pbc --size 224

Scans the folder (validation and hashing, timed separately), rescans it (the scan cache: stat only), then builds the
uint8 cache into a fresh temporary cache root so nothing is reused, and prints images/s with the machine it ran on.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from bloodcell.data.cache import build_cache
from bloodcell.data.discover import scan
from bloodcell.evaluate.machine import cpu_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--interpolation", default="nearest")
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache_root:
        t0 = time.perf_counter()
        inv = scan(args.root, cache_dir=cache_root, workers=args.workers)
        scan_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        rescan = scan(args.root, cache_dir=cache_root, progress=False)
        rescan_s = time.perf_counter() - t0
        assert rescan.fingerprint() == inv.fingerprint()
        cache = build_cache(inv, args.size, args.interpolation, cache_root, workers=args.workers)
        n = len(inv.records)
        t0 = time.perf_counter()
        again = build_cache(inv, args.size, args.interpolation, cache_root)
        reuse_s = time.perf_counter() - t0
        assert again.reused
    workers = args.workers or os.cpu_count()
    print(f"machine: {cpu_line()}, {os.cpu_count()} cores, {workers} workers; python {platform.python_version()}")
    print(f"images: {n:,} from {args.root}")
    print(f"scan (decode + sha256 + validate): {scan_s:.1f} s = {n / scan_s:,.0f} img/s")
    print(f"rescan with the scan cache (stat only): {rescan_s:.2f} s")
    print(
        f"cache build at {args.size}px {args.interpolation}: "
        f"{cache.build_seconds:.1f} s = {n / cache.build_seconds:,.0f} img/s"
    )
    print(f"cache reuse check: {reuse_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()

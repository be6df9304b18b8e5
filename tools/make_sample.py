"""Regenerate examples/pbc-sample: 25 real PBC images per class from the TEST part of the default split.

    .venv/bin/python tools/make_sample.py ../shared/data/pbc examples/pbc-sample

Taken from the test part (seed 42, 70/30, dedup on) so that a model trained with defaults never saw them.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

from bloodcell.data.discover import scan
from bloodcell.data.split import SplitConfig, make_split


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("pbc_root")
    ap.add_argument("out")
    ap.add_argument("--per-class", type=int, default=25)
    args = ap.parse_args()
    inv = scan(args.pbc_root, progress=False)
    split = make_split(inv, SplitConfig(seed=42))
    rng = np.random.default_rng(42)
    out = Path(args.out)
    for k, name in enumerate(split.class_names):
        test_of_class = [i for i in split.test if split.labels[i] == k]
        for i in sorted(rng.choice(test_of_class, size=args.per_class, replace=False)):
            src = inv.path(int(i))
            dst = out / name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    print(f"wrote {args.per_class * len(split.class_names)} images to {out}")


if __name__ == "__main__":
    main()

"""Benchmark (not a test): adapting a trained model to another lab with k labelled cells per class.

    .venv/bin/python benchmarks/fewshot.py                                  # bundled model, Tecom set, k = 0 1 5 10 20
    .venv/bin/python benchmarks/fewshot.py --base runs/x --k 5 --seeds 0 1 2 --folder /path/to/lab_cells

For every k and seed: draw k cells per class of the lab's folder (seeded, stratified; a class with at most k cells
gives all but one, so every class keeps at least one test cell), fine-tune with configs/finetune.yaml exactly as a
lab would (`bloodcell train configs/finetune.yaml --data FOLDER`), then score the rest, restricted to the classes
the folder has. k = 0 is the base model itself on the same test cells. Prints mean, sd and a t-interval per k.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TECOM = REPO.parent / "shared" / "data" / "external" / "tecom_zheng2018"


def draw(folder: Path, k: int, seed: int) -> tuple[dict[str, list[Path]], dict[str, list[Path]]]:
    """(train, test) files per class: k per class for training (at most n - 1), the rest for testing."""
    from bloodcell.data.images import is_image_name

    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for cls in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        files = sorted(f for f in (folder / cls).iterdir() if f.is_file() and is_image_name(f))
        order = rng.permutation(len(files))
        n = min(k, len(files) - 1)
        train[cls] = [files[i] for i in order[:n]]
        test[cls] = [files[i] for i in order[n:]]
    return train, test


def restricted_accuracy(predictor, test: dict[str, list[Path]]) -> tuple[float, int]:
    """Accuracy over the classes the folder has: probabilities renormalised over those of them the model knows.

    A fine-tuned model knows the classes it was shown; a test cell of a class it never saw (the Tecom set's single
    basophil when k = 1) counts as wrong.
    """
    from bloodcell.data.classes import resolve_class

    classes = [c for c in test if test[c]]
    known = {c: resolve_class(c, predictor.class_names) for c in classes}
    cols = [known[c] for c in classes if known[c] is not None]
    files = [f for c in classes for f in test[c]]
    truth = [known[c] for c in classes for _ in test[c]]
    result = predictor.predict_paths(files, progress=False)
    pred = [max(cols, key=lambda k: p["probabilities"][k]) for p in result["predictions"]]
    return float(np.mean([t is not None and t == q for t, q in zip(truth, pred)])), len(files)


def finetune(base: str, train: dict[str, list[Path]], out: Path, config: Path, seed: int) -> Path:
    from bloodcell.config import load_config
    from bloodcell.study.experiment import run_config

    data = out / "cells"
    for cls, files in train.items():
        if files:
            (data / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(f, data / cls / f.name)
    cfg = load_config(config, [f"model.pretrained={base}", f"seed={seed}", f"data.root={data}"])
    run_config(cfg, out / "run", resume=True, progress=False)
    return out / "run"


def t_interval(values: list[float]) -> tuple[float, float, float, float]:
    from scipy import stats

    v = np.asarray(values, float)
    mean, sd = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0
    half = float(stats.t.ppf(0.975, len(v) - 1) * sd / np.sqrt(len(v))) if len(v) > 1 else 0.0
    return mean, sd, max(0.0, mean - half), min(1.0, mean + half)  # an accuracy interval stays within [0, 1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default", help="model to adapt: 'default' (bundled) or a run directory")
    ap.add_argument("--folder", type=Path, default=TECOM, help="the lab's labelled cells, one folder per class")
    ap.add_argument("--k", type=int, nargs="+", default=[0, 1, 5, 10, 20])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "finetune.yaml")
    ap.add_argument("--work", type=Path, help="keep the runs here (default: a temporary folder)")
    args = ap.parse_args(argv)

    import torch

    from bloodcell.evaluate.machine import cpu_line
    from bloodcell.infer import Predictor

    work = args.work or Path(tempfile.mkdtemp(prefix="fewshot-"))
    base = Predictor.load(None if args.base == "default" else args.base)
    rows: dict[int, list[float]] = {}
    t0 = time.perf_counter()
    for k in args.k:
        for seed in args.seeds:
            train, test = draw(args.folder, k, seed)
            model = (
                base
                if k == 0
                else Predictor.load(finetune(args.base, train, work / f"k{k}-s{seed}", args.config, seed))
            )
            acc, n = restricted_accuracy(model, test)
            rows.setdefault(k, []).append(acc)
            print(f"k={k:>2} seed={seed}: {100 * acc:.1f} % of {n} test cells", flush=True)
    print(
        f"\n# Few-shot adaptation, {time.strftime('%Y-%m-%d')}, {cpu_line()}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__}"
    )
    print(
        f"base {args.base}, folder {args.folder}, config {args.config.name}, seeds {args.seeds}, "
        f"{time.perf_counter() - t0:.0f} s in all\n"
    )
    print("| k per class | accuracy (mean) | sd | 95 % t-interval | seeds |")
    print("|---:|---:|---:|---|---:|")
    summary = {}
    for k, accs in rows.items():
        mean, sd, lo, hi = t_interval(accs)
        summary[k] = {"mean": mean, "sd": sd, "ci95": [lo, hi], "runs": accs}
        print(f"| {k} | {100 * mean:.1f} % | {100 * sd:.1f} | {100 * lo:.1f}-{100 * hi:.1f} | {len(accs)} |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

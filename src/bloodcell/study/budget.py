"""How long a study will take on this machine, from measured epoch rates, before it runs.

Every distinct (model, input size, precision, batch, objective) of the study is trained for two short epochs on
random images through the real `fit` (the second epoch is timed), twice, with two numbers of images: the
difference gives seconds per training image on this machine, the rest the fixed cost of an epoch (checkpoint,
Lightning's hooks). A run then costs, per stage, epochs x (fixed + training images x that rate + validation
images x the evaluation rate), plus its test evaluation. Evaluation (forward only, no gradient) is taken as a
third of a training step per image, which `benchmarks/epoch_time.py`-style measurements support within the
precision an estimate needs.
Image counts come from the dataset folder (images per class folder) and the split fractions; SMOTE raises every
class of the training part to the largest one.
"""

from __future__ import annotations

import csv
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bloodcell.config import RunConfig, parse_config
from bloodcell.study.spec import RunSpec

EVAL_COST = 1 / 3  # evaluation seconds per image, as a share of a training step's
RUN_OVERHEAD_S = 15.0  # per run: split, bootstrap CIs, calibration, figures (measured ~10-20 s on 2 cores)
PROBE_IMAGES = (32, 128)


@dataclass
class RunEstimate:
    run: str
    model: str
    input_size: int
    epochs: int
    folds: int
    train_images: int
    seconds: float


def class_counts(root: str | os.PathLike) -> list[int]:
    """Images per class folder (by extension; a cheap count: the real run also drops unreadable files)."""
    exts = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}
    root = Path(root)
    counts = [sum(1 for f in d.iterdir() if f.suffix.lower() in exts) for d in sorted(root.iterdir()) if d.is_dir()]
    return [c for c in counts if c]


def part_sizes(cfg: RunConfig, counts: list[int]) -> tuple[int, int, int, int]:
    """(training images, validation images, test images, runs) of one run of cfg on data with these class counts."""
    n = sum(counts)
    test = round(n * cfg.data.split.test_size)
    pool = n - test
    folds = cfg.cv.folds or 1
    val = round(pool / folds) if cfg.cv.folds else round(pool * cfg.data.split.val_size)
    train = pool - val
    if cfg.smote.enabled:  # every class raised to the largest
        train = round(max(counts) * len(counts) * train / n)
    return train, val, test, folds


def _probe_key(cfg: RunConfig, objective: str) -> tuple:
    return (
        cfg.model.name,
        repr(sorted(cfg.model.kwargs.items())),
        cfg.data.input_size,
        cfg.train.precision,
        cfg.train.batch_size,
        cfg.train.channels_last,
        objective,
    )


def measure_rate(cfg: RunConfig, objective: str = "ce", num_classes: int = 8) -> tuple[float, float]:
    """(seconds per training image, fixed seconds per epoch) of cfg's model at its size and precision here."""
    (n1, n2), (t1, t2) = PROBE_IMAGES, [_epoch_seconds(cfg, objective, n, num_classes) for n in PROBE_IMAGES]
    rate = max(t2 - t1, 0.0) / (n2 - n1) or t2 / n2
    return rate, max(t1 - n1 * rate, 0.0)


def _epoch_seconds(cfg: RunConfig, objective: str, images: int, num_classes: int) -> float:
    """Seconds of the second of two epochs over `images` random images (warm caches, allocator and threads)."""
    from bloodcell.data.prepare import PreparedData
    from bloodcell.train.fit import fit

    s = cfg.data.input_size
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (images + 8, s, s, 3), dtype=np.uint8)
    labels = (np.arange(len(imgs)) % num_classes).astype(np.int64)
    data = PreparedData(
        imgs,
        labels,
        [f"c{k}" for k in range(num_classes)],
        [str(i) for i in range(len(imgs))],
        {"train": np.arange(images), "val": np.arange(images, images + 8), "test": np.arange(0)},
    )
    raw = cfg.model_dump()
    raw["train"].update(
        epochs=2,
        stages=[{"epochs": 2, "objective": objective}],
        early_stopping_patience=None,
        accelerator="cpu" if cfg.train.accelerator == "auto" else cfg.train.accelerator,
    )
    raw["smote"]["enabled"] = False
    raw["cv"]["folds"] = None
    probe = parse_config(raw)
    with tempfile.TemporaryDirectory() as d:
        fit(probe, data, d, progress=False)
        with open(Path(d) / "history.csv") as fh:
            rows = list(csv.DictReader(fh))
    return float(rows[-1]["seconds"])


def estimate_runs(runs: list[RunSpec], counts: list[int], *, progress=None) -> list[RunEstimate]:
    """Seconds each run will take on this machine (rates measured once per distinct model set-up)."""
    rates: dict[tuple, tuple[float, float]] = {}
    out = []
    for run in runs:
        cfg = run.config
        train, val, test, folds = part_sizes(cfg, counts)
        seconds = 0.0
        for stage in cfg.train.resolved_stages():
            key = _probe_key(cfg, stage.objective)
            if key not in rates:
                if progress:
                    progress(f"measuring {cfg.model.name} at {cfg.data.input_size} px ({stage.objective})")
                rates[key] = measure_rate(cfg, stage.objective, num_classes=len(counts))
            rate, fixed = rates[key]
            seconds += stage.epochs * (fixed + train * rate + val * rate * EVAL_COST)
        eval_rate = rates.get(_probe_key(cfg, "ce"), (rate, fixed))[0]
        seconds += (test + val) * eval_rate * EVAL_COST + RUN_OVERHEAD_S  # test evaluation and calibration on val
        out.append(
            RunEstimate(
                run.key, cfg.model.name, cfg.data.input_size, cfg.train.epochs, folds, train, round(seconds * folds, 1)
            )
        )
    return out


def budget_record(estimates: list[RunEstimate]) -> dict:
    from bloodcell.evaluate.machine import cpu_line

    return {
        "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": cpu_line(),
        "total_seconds": round(sum(e.seconds for e in estimates), 1),
        "runs": [asdict(e) for e in estimates],
    }

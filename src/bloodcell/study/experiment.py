"""One experiment = one config: a single run, or one run per fold and/or seed, with their aggregate.

A run directory holds config.yaml, split.json, history.csv, metrics.json, predictions.csv, model.safetensors
+ model.json, figures/ and status.json. status.json says `complete` only once everything is written; a run
found complete is skipped, an incomplete one is resumed from its last epoch checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from bloodcell import io
from bloodcell.config import RunConfig, save_config
from bloodcell.data.prepare import prepare_data
from bloodcell.evaluate.stats import mean_sd_ci
from bloodcell.errors import ConfigError

AGGREGATE_KEYS = [
    "train.accuracy",
    "test.accuracy",
    "test.precision_weighted",
    "test.recall_weighted",
    "test.f1_weighted",
    "test.f1_macro",
    "test.ece",
    "test.ece_calibrated",
]


def read_status(run_dir: str | os.PathLike) -> dict:
    try:
        return json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def is_complete(run_dir: str | os.PathLike) -> bool:
    run_dir = Path(run_dir)
    done = (run_dir / "metrics.json").exists() or (run_dir / "aggregate.json").exists()
    return read_status(run_dir).get("state") == "complete" and done


def remove_stale_checkpoints(run_dir: str | os.PathLike) -> None:
    """Resume checkpoints of finished runs (under run_dir, folds and seeds included) are left only by a kill
    between marking the run complete and deleting them; the finished model is model.safetensors."""
    for ckpt_dir in Path(run_dir).rglob("checkpoints"):
        if ckpt_dir.is_dir() and is_complete(ckpt_dir.parent):
            shutil.rmtree(ckpt_dir, ignore_errors=True)


def _set_status(run_dir: Path, state: str, **fields) -> None:
    if rank_zero_only.rank == 0:
        io.write_json(
            run_dir / "status.json", {"state": state, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}
        )


def lookup(metrics: dict, dotted: str):
    node = metrics
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def run_one(
    cfg: RunConfig, run_dir: str | os.PathLike, *, fold: int | None = None, resume: bool = True, progress: bool = True
) -> dict:
    """Train and evaluate one run in run_dir; return its metrics. Skips a complete run, resumes an incomplete one.

    Args:
        cfg: The run's config (one seed); a resumed run_dir must hold the same config.
        run_dir: The run's folder (config, split, checkpoints, model and metrics).
        fold: With cv.folds, the cross-validation fold whose train/val split is used; None: no cross-validation.
        resume: Continue from run_dir's last checkpoint and check its config; False trains from the start.
        progress: Show progress bars.
    """
    from bloodcell.evaluate.run import evaluate_run
    from bloodcell.train.fit import fit
    from bloodcell.train.hardware import resolve_accelerator, resolve_channels_last, resolve_precision

    run_dir = Path(run_dir)
    if is_complete(run_dir) and (run_dir / "metrics.json").exists():
        remove_stale_checkpoints(run_dir)
        return json.loads((run_dir / "metrics.json").read_text())
    config_file = run_dir / "config.yaml"
    if config_file.exists() and resume:
        from bloodcell.config import load_config

        saved = load_config(config_file)
        if saved.model_dump() != cfg.model_dump():
            raise ConfigError(f"{run_dir} holds a run of a different config; choose another --out or delete it")
    t0 = time.perf_counter()
    earlier = _earlier_epoch_seconds(run_dir) if resume else 0.0
    data = prepare_data(cfg, split_file=run_dir / "split.json", fold=fold, progress=progress)
    if rank_zero_only.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, config_file)
        if data.split is not None and not (run_dir / "split.json").exists():
            data.split.save(run_dir / "split.json")
        _set_status(run_dir, "running", started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    model = fit(cfg, data, run_dir, resume=resume, progress=progress)
    if model is None:  # a non-zero DDP rank: rank 0 evaluates and writes
        return {}
    train_seconds = earlier + time.perf_counter() - t0
    metrics = evaluate_run(
        run_dir,
        cfg,
        data,
        model,
        progress=progress,
        extra={
            "train_seconds": round(train_seconds, 2),
            "fold": fold,
            "precision": resolve_precision(cfg, resolve_accelerator(cfg)),
            "channels_last": resolve_channels_last(cfg, resolve_accelerator(cfg)),
        },
    )
    _set_status(run_dir, "complete", seconds=round(time.perf_counter() - t0, 2))
    # only now: a kill before this line leaves the resume checkpoint, never a finished run without either
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the final model is model.safetensors
    return metrics


def _earlier_epoch_seconds(run_dir: Path) -> float:
    """Seconds of the epochs an interrupted run trained before this session (history.csv is written after each
    epoch), so that a resumed run's train_seconds is its whole training, not its last part. An epoch that ended
    after the last checkpoint was saved is trained again and counted twice: at most one epoch too many."""
    import csv

    try:
        with open(run_dir / "history.csv", newline="", encoding="utf-8") as fh:
            return sum(float(row.get("seconds") or 0) for row in csv.DictReader(fh))
    except (OSError, ValueError):
        return 0.0


def aggregate(metrics_list: list[dict], labels: list[str]) -> dict:
    out = {"runs": labels, "per_run": {}, "summary": {}}
    for key in AGGREGATE_KEYS:
        values = [lookup(m, key) for m in metrics_list]
        out["per_run"][key] = values
        present = [v for v in values if v is not None]
        if present:
            out["summary"][key] = mean_sd_ci(present)
    return out


def run_config(cfg: RunConfig, out_dir: str | os.PathLike, *, resume: bool = True, progress: bool = True) -> dict:
    """Run `cfg` in out_dir: directly, or one sub-run per seed (seed-S/) and fold (fold-K/), plus aggregate.json.

    Args:
        cfg: The config; its `seeds` (else `seed`) and cv.folds decide the sub-runs.
        out_dir: The output folder.
        resume: Resume incomplete runs from their last checkpoint (complete ones are always skipped).
        progress: Show progress bars.
    """
    out_dir = Path(out_dir)
    if rank_zero_only.rank == 0 and out_dir.is_dir():
        io.remove_leftover_temporaries(out_dir)  # an interrupted run's half-written files
    seeds = cfg.seeds or [cfg.seed]
    folds = list(range(cfg.cv.folds)) if cfg.cv.folds else [None]
    if len(seeds) == 1 and folds == [None]:
        return run_one(
            cfg.model_copy(update={"seed": seeds[0], "seeds": None}), out_dir, resume=resume, progress=progress
        )
    if rank_zero_only.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    results, labels = [], []
    for seed in seeds:
        for fold in folds:
            sub = cfg.model_copy(update={"seed": seed, "seeds": None}, deep=True)
            parts = ([f"seed-{seed}"] if len(seeds) > 1 else []) + ([f"fold-{fold}"] if fold is not None else [])
            run_dir = out_dir.joinpath(*parts)
            results.append(run_one(sub, run_dir, fold=fold, resume=resume, progress=progress))
            labels.append("/".join(parts))
    if rank_zero_only.rank != 0:
        return {}
    agg = aggregate(results, labels)
    io.write_json(out_dir / "aggregate.json", agg)
    _set_status(out_dir, "complete")
    return agg


def failure_record(exc: BaseException) -> dict:
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}

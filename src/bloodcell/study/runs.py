"""One study run: where it lives (run_dir_for), training it (train_run) and its state (run_state).

Below the runner, the parallel workers and the report, which all need them; bloodcell.study.runner re-exports them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from bloodcell import io
from bloodcell.config import RunConfig
from bloodcell.study.experiment import failure_record, read_status, run_config
from bloodcell.study.spec import RunSpec


def run_dir_for(out: Path, run: RunSpec) -> Path:
    return out / "runs" / run.experiment.name / run.protocol / f"seed-{run.seed}"


def train_run(cfg: RunConfig, run_dir: Path, *, progress: bool) -> dict:
    """Train one study run (resuming it if it was interrupted); return its record. A failure is recorded in its
    status.json, not raised: one failed run must not sink the study."""
    t0 = time.perf_counter()
    try:
        run_config(cfg, run_dir, resume=True, progress=progress)
        return {"state": "complete", "seconds": round(time.perf_counter() - t0, 1)}
    except Exception as exc:  # noqa: BLE001 - one failed run must not sink the study
        record = {"state": "failed", **failure_record(exc), "seconds": round(time.perf_counter() - t0, 1)}
        if rank_zero_only.rank == 0:  # under DDP every rank fails the run; one writes it, as for success
            run_dir.mkdir(parents=True, exist_ok=True)
            io.write_json(run_dir / "status.json", record)
        return record


def run_state(out: Path, run: RunSpec) -> dict:
    d = run_dir_for(out, run)
    status = read_status(d)
    if status.get("state") == "complete":
        metrics_file = d / "metrics.json" if (d / "metrics.json").exists() else d / "aggregate.json"
        status["metrics"] = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    return status

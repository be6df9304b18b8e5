"""kill -9 at seeded random points of `bloodcell train` and `bloodcell study`, then resume: the result equals an
uninterrupted run exactly (CPU, same seed): metrics.json, history.csv (but for wall times) and the model's bytes.

The points are events the run reports (a batch starts, a file is written), drawn from random.Random(BLOODCELL_KILL_SEED)
(default 8) and printed with the state the run was in when it was killed, so a failure can be replayed:
BLOODCELL_KILL_SEED=8 pytest -s tests/reliability/test_kill_resume.py
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bloodcell import events
from bloodcell.cli import app

from conftest import SAMPLE
from run_checks import assert_finished_cleanly, checkpoint_epoch, outcome
from test_train import BLOODCELL, cli_env, read_history, write_cfg

pytestmark = pytest.mark.slow

KILL_SEED = int(os.environ.get("BLOODCELL_KILL_SEED", "8"))
runner = CliRunner()

# 4 epochs of 7 batches, a warm-up then a cosine schedule (its position must survive the resume), augmentation on
RUN = {
    "model": {"name": "cnn"},
    "data": {"input_size": 32},
    "train": {"epochs": 4, "batch_size": 16, "lr": 0.002, "schedule": "cosine", "warmup_epochs": 1},
    "augment": {"enabled": True},
    "eval": {"bootstrap": 20, "grid_images": 0},
}


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run outside the per-test cache of conftest
        mp.setenv("BLOODCELL_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


# ----------------------------------------------------------------------------- watching and killing
# Kills land on events the run reports itself (BLOODCELL_EVENTS: a training batch starts, a file is written), not
# after sleeps, so a given seed kills at the same point on a fast machine and a loaded one.


def run_state(run: Path) -> str:
    rows = len(read_history(run)) if (run / "history.csv").exists() else 0
    status = json.loads((run / "status.json").read_text())["state"] if (run / "status.json").exists() else "-"
    written = [name for name in ("model.safetensors", "metrics.json") if (run / name).exists()]
    return f"history rows {rows}, checkpoint epoch {checkpoint_epoch(run)}, status {status}, written {written or '-'}"


def writes_under(log: list[dict], root: Path) -> list[str]:
    """The files written under `root`, in order, as paths relative to it."""
    return [
        Path(e["path"]).relative_to(root).as_posix()
        for e in log
        if e["event"] == "wrote" and Path(e["path"]).is_relative_to(root)
    ]


def batches(log: list[dict]) -> list[tuple[int, int]]:
    return [(e["epoch"], e["batch"]) for e in log if e["event"] == "batch"]


@contextlib.contextmanager
def recording(path: Path):
    """Record the events of what runs in this process (the reference runs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(events.ENV, str(path))
        yield


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    t0 = time.time()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}")
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.001)


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    # its own session, so whatever it started can be cleaned up by its process group after the test
    env = dict(cli_env(), **{events.ENV: str(log)})
    return subprocess.Popen(
        BLOODCELL + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def kill_9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def clean_up(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        kill_9(proc)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # pool workers it may have left (they exit on their own within a second)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- train

# Each point is an event of the uninterrupted reference run, drawn by the seeded RNG from a stage of it:
#   batch-epoch-1   a training batch of epoch 1 starts (no checkpoint yet: the resume starts from scratch)
#   batch-later     a training batch of epochs 2-4 starts (the resume continues from the checkpoint before it)
#   training-write  a file written while training (history.csv, the checkpoint's halves, status.json ...)
#   evaluation-write a file written after model.safetensors (model.json, predictions, figures ...), up to metrics.json
#   metrics         metrics.json written, the run not yet marked complete
TRAIN_POINTS = ["batch-epoch-1", "batch-later", "training-write", "evaluation-write", "metrics"]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, isolated_cache) -> dict:
    base = tmp_path_factory.mktemp("train-ref")
    cfg = write_cfg(base / "run.yaml", RUN)
    with recording(base / "events.jsonl"):
        result = runner.invoke(app, ["train", str(cfg), "--data", str(SAMPLE), "--out", str(base / "run")])
    assert result.exit_code == 0, result.output
    lrs = [float(row["lr"]) for row in read_history(base / "run")]
    assert lrs == pytest.approx([0.001, 0.002, 0.0015, 0.0005])  # warm-up, then cosine: a position a resume must keep
    log = events.read(base / "events.jsonl")
    return {
        "config": cfg,
        "outcome": outcome(base / "run"),
        "writes": writes_under(log, base / "run"),
        "batches": batches(log),
    }


def train_kill_point(point_id: str, ref: dict, rng: random.Random) -> tuple[str, object]:
    """(description, condition on the spawned run's events and dir) for one point."""
    writes = ref["writes"]
    model_at, metrics_at = writes.index("model.safetensors"), writes.index("metrics.json")
    if point_id.startswith("batch"):
        epoch, batch = rng.choice([b for b in ref["batches"] if (b[0] == 1) == (point_id == "batch-epoch-1")])
        return f"as batch {batch} of epoch {epoch} starts", lambda log, run: (epoch, batch) in batches(log)
    i = {
        "training-write": lambda: rng.randrange(model_at),
        "evaluation-write": lambda: rng.randrange(model_at, metrics_at + 1),
        "metrics": lambda: metrics_at,
    }[point_id]()
    return f"after write {i + 1} of {len(writes)} ({writes[i]})", lambda log, run: len(writes_under(log, run)) > i


@pytest.mark.parametrize("point_id", TRAIN_POINTS)
def test_train_killed_then_resumed_equals_an_uninterrupted_run(tmp_path, reference_run, point_id):
    where, reached = train_kill_point(point_id, reference_run, random.Random(f"{KILL_SEED}/train/{point_id}"))
    run, log = tmp_path / "run", tmp_path / "events.jsonl"
    args = ["train", str(reference_run["config"]), "--data", str(SAMPLE), "--out", str(run)]
    proc = spawn(args, log)
    try:
        t0 = time.time()
        wait_for(lambda: reached(events.read(log), run), proc, where)
        kill_9(proc)
        state = run_state(run)
    finally:
        clean_up(proc)
    print(f"\n[seed {KILL_SEED}] train killed {where}, {time.time() - t0:.2f} s after the start: {state}")

    if (run / "config.yaml").exists():  # an unfinished run is only continued when asked
        refused = runner.invoke(app, args)
        assert refused.exit_code == 2 and "--resume" in refused.output
    resumed = runner.invoke(app, args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert_finished_cleanly(run)
    got, want = outcome(run), reference_run["outcome"]
    assert got["history"] == want["history"]
    assert got["metrics"] == want["metrics"]
    assert got["weights"] == want["weights"]


# ----------------------------------------------------------------------------- study


def study_config(path: Path) -> Path:
    spec = {
        "name": "kill",
        "base": {"data": {"root": str(SAMPLE)}, "eval": {"bootstrap": 20, "grid_images": 0}},
        "seeds": [1, 2],
        "experiments": [
            {
                "name": "cnn",
                "set": {
                    "model.name": "cnn",
                    "data.input_size": 32,
                    "train.epochs": 2,
                    "train.batch_size": 16,
                    "train.schedule": "cosine",
                },
            },
        ],
    }
    path.write_text(yaml.safe_dump(spec))
    return path


def study_runs(out: Path) -> list[Path]:
    return [out / "runs" / "cnn" / "default" / f"seed-{s}" for s in (1, 2)]


def is_complete(run: Path) -> bool:
    try:
        return json.loads((run / "status.json").read_text())["state"] == "complete"
    except (OSError, ValueError, KeyError):
        return False


# first-run     a seeded training batch of the first run starts
# between-runs  the first run is marked complete
# report        a seeded file of the report is written (after study_status.json, before report.html)
STUDY_POINTS = ["first-run", "between-runs", "report"]


@pytest.fixture(scope="module")
def reference_study(tmp_path_factory, isolated_cache) -> dict:
    base = tmp_path_factory.mktemp("study-ref")
    cfg = study_config(base / "study.yaml")
    with recording(base / "events.jsonl"):
        result = runner.invoke(app, ["study", str(cfg), "--out", str(base / "out")])
    assert result.exit_code == 0 and "runs complete: 2 of 2" in result.output, result.output
    status = json.loads((base / "out" / "study_status.json").read_text())
    log = events.read(base / "events.jsonl")
    return {
        "config": cfg,
        "outcomes": [outcome(r) for r in study_runs(base / "out")],
        "results": status["results"],
        "writes": writes_under(log, base / "out"),
        "batches": batches(log),
    }


@pytest.mark.parametrize("point_id", STUDY_POINTS)
def test_study_killed_then_rerun_redoes_nothing_finished_and_equals_an_uninterrupted_study(
    tmp_path, reference_study, point_id
):
    rng = random.Random(f"{KILL_SEED}/study/{point_id}")
    out, log = tmp_path / "out", tmp_path / "events.jsonl"
    first, second = study_runs(out)
    if point_id == "first-run":
        n = rng.randint(1, len(reference_study["batches"]) // 2)  # both runs have the same number of batches
        where, reached = f"as training batch {n} of the first run starts", lambda: len(batches(events.read(log))) >= n
    elif point_id == "between-runs":
        where, reached = "as soon as the first run is complete", lambda: is_complete(first)
    else:
        writes = reference_study["writes"]
        i = rng.randrange(writes.index("study_status.json"), writes.index("report.html"))
        where, reached = (
            f"after write {i + 1} of {len(writes)} ({writes[i]})",
            lambda: len(writes_under(events.read(log), out)) > i,
        )
    proc = spawn(["study", str(reference_study["config"]), "--out", str(out)], log)
    try:
        wait_for(reached, proc, where)
        kill_9(proc)
    finally:
        clean_up(proc)
    finished = [r for r in (first, second) if is_complete(r)]
    stamps = {
        r: {f: (r / f).stat().st_mtime_ns for f in ("metrics.json", "model.safetensors", "history.csv")}
        for r in finished
    }
    print(
        f"\n[seed {KILL_SEED}] study killed {where}: complete runs {[r.name for r in finished]}; "
        + "; ".join(f"{r.name}: {run_state(r)}" for r in (first, second))
    )

    result = runner.invoke(app, ["study", str(reference_study["config"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "runs complete: 2 of 2" in result.output
    for run, stamp in stamps.items():  # finished runs are skipped, not trained again
        assert {f: (run / f).stat().st_mtime_ns for f in stamp} == stamp, f"{run} was redone"
    for run, want in zip((first, second), reference_study["outcomes"]):
        assert_finished_cleanly(run)
        assert outcome(run) == want, run
    assert json.loads((out / "study_status.json").read_text())["results"] == reference_study["results"]
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    assert not list(out.rglob("*.tmp")), "temporary files left behind"

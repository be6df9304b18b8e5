"""kill -9 at seeded random points of `bloodcell train` and `bloodcell study`, then resume: the result equals an
uninterrupted run exactly (CPU, same seed): metrics.json, history.csv (but for wall times) and the model's bytes.

The points are drawn from random.Random(BLOODCELL_KILL_SEED) (default 8) and printed with the state the run was
in when it was killed, so a failure can be replayed: BLOODCELL_KILL_SEED=8 pytest -s tests/reliability/test_kill_resume.py
"""

from __future__ import annotations

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


def run_state(run: Path) -> str:
    rows = len(read_history(run)) if (run / "history.csv").exists() else 0
    status = json.loads((run / "status.json").read_text())["state"] if (run / "status.json").exists() else "-"
    written = [name for name in ("model.safetensors", "metrics.json") if (run / name).exists()]
    return f"history rows {rows}, checkpoint epoch {checkpoint_epoch(run)}, status {status}, written {written or '-'}"


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    t0 = time.time()
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (rc {proc.returncode}) before {what}")
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.005)


def spawn(args: list[str]) -> subprocess.Popen:
    # its own session, so whatever it started can be cleaned up by its process group after the test
    return subprocess.Popen(BLOODCELL + args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


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

# id -> (where the kill lands, what to wait for, range of the seconds waited after it, drawn by the seeded RNG)
TRAIN_POINTS = {
    "epoch-1": ("during epoch 1, before any checkpoint", "status.json", (0.0, 0.4)),
    "checkpoint": ("after the checkpoint of a random epoch k (at once or during epoch k+1)", "checkpoint", (0.0, 0.15)),
    "evaluation": ("during the final evaluation", "model.safetensors", (0.0, 0.25)),
    "metrics": ("after metrics.json, before the run is marked complete", "metrics.json", (0.0, 0.0)),
}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, isolated_cache) -> dict:
    base = tmp_path_factory.mktemp("train-ref")
    cfg = write_cfg(base / "run.yaml", RUN)
    result = runner.invoke(app, ["train", str(cfg), "--data", str(SAMPLE), "--out", str(base / "run")])
    assert result.exit_code == 0, result.output
    lrs = [float(row["lr"]) for row in read_history(base / "run")]
    assert lrs == pytest.approx([0.001, 0.002, 0.0015, 0.0005])  # warm-up, then cosine: a position a resume must keep
    return {"config": cfg, "outcome": outcome(base / "run")}


@pytest.mark.parametrize("point_id", list(TRAIN_POINTS))
def test_train_killed_then_resumed_equals_an_uninterrupted_run(tmp_path, reference_run, point_id):
    point, trigger, delay_range = TRAIN_POINTS[point_id]
    rng = random.Random(f"{KILL_SEED}/train/{point_id}")
    epoch = rng.randint(1, RUN["train"]["epochs"] - 1)
    delay = rng.uniform(*delay_range)
    run = tmp_path / "run"
    args = ["train", str(reference_run["config"]), "--data", str(SAMPLE), "--out", str(run)]
    proc = spawn(args)
    try:
        t0 = time.time()
        if trigger == "status.json":
            wait_for(lambda: (run / "status.json").exists(), proc, "the run started")
        elif trigger == "checkpoint":
            wait_for(lambda: checkpoint_epoch(run) >= epoch, proc, f"the checkpoint of epoch {epoch}")
        else:
            wait_for(lambda: (run / trigger).exists(), proc, trigger)
        time.sleep(delay)
        assert proc.poll() is None, f"the run finished before the kill ({point})"
        kill_9(proc)
        state = run_state(run)
    finally:
        clean_up(proc)
    where = point.replace("a random epoch k", f"epoch {epoch}").replace("epoch k+1", f"epoch {epoch + 1}")
    print(f"\n[seed {KILL_SEED}] train killed {where}, +{delay:.3f} s ({time.time() - t0:.2f} s after the start): {state}")

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
            {"name": "cnn", "set": {"model.name": "cnn", "data.input_size": 32, "train.epochs": 2, "train.batch_size": 16, "train.schedule": "cosine"}},
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


# id -> (where the kill lands, what to wait for, range of the seconds waited after it)
STUDY_POINTS = {
    "first-run": ("while the first run trains", "seed-1 status.json", (0.0, 1.0)),
    "between-runs": ("as soon as the first run is complete", "seed-1 complete", (0.0, 0.0)),
    "report": ("while the report is written", "study_status.json", (0.0, 0.3)),
}


@pytest.fixture(scope="module")
def reference_study(tmp_path_factory, isolated_cache) -> dict:
    base = tmp_path_factory.mktemp("study-ref")
    cfg = study_config(base / "study.yaml")
    result = runner.invoke(app, ["study", str(cfg), "--out", str(base / "out")])
    assert result.exit_code == 0 and "runs complete: 2 of 2" in result.output, result.output
    status = json.loads((base / "out" / "study_status.json").read_text())
    return {"config": cfg, "outcomes": [outcome(r) for r in study_runs(base / "out")], "results": status["results"]}


@pytest.mark.parametrize("point_id", list(STUDY_POINTS))
def test_study_killed_then_rerun_redoes_nothing_finished_and_equals_an_uninterrupted_study(tmp_path, reference_study, point_id):
    point, trigger, delay_range = STUDY_POINTS[point_id]
    delay = random.Random(f"{KILL_SEED}/study/{point_id}").uniform(*delay_range)
    out = tmp_path / "out"
    first, second = study_runs(out)
    conditions = {
        "seed-1 status.json": lambda: (first / "status.json").exists(),
        "seed-1 complete": lambda: is_complete(first),
        "study_status.json": lambda: (out / "study_status.json").exists(),
    }
    proc = spawn(["study", str(reference_study["config"]), "--out", str(out)])
    try:
        wait_for(conditions[trigger], proc, trigger)
        time.sleep(delay)
        assert proc.poll() is None, f"the study finished before the kill ({point})"
        kill_9(proc)
    finally:
        clean_up(proc)
    finished = [r for r in (first, second) if is_complete(r)]
    stamps = {r: {f: (r / f).stat().st_mtime_ns for f in ("metrics.json", "model.safetensors", "history.csv")} for r in finished}
    print(f"\n[seed {KILL_SEED}] study killed {point}, +{delay:.3f} s: complete runs {[r.name for r in finished]}; "
          + "; ".join(f"{r.name}: {run_state(r)}" for r in (first, second)))

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

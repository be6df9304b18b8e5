"""`bloodcell study --parallel K`: K runs at once in worker processes, on CPU here (K = 2).

The same runs as a sequential study (metrics, predictions, weights), really at the same time (the runs' own
events), a failing run reported while the rest go on, bad values refused in one line. Interruptions (Ctrl-C,
SIGTERM, kill -9 of the study or of a worker) are in tests/reliability/test_study_parallel_faults.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from bloodcell import events
from bloodcell.cli import app
from bloodcell.errors import ConfigError
from bloodcell.study import parallel
from bloodcell.study.spec import expand_runs, load_study

from conftest import SAMPLE
from reliability.run_checks import outcome

runner = CliRunner()
GOOD = ["cnn/default/seed-1", "cnn/default/seed-2"]
BROKEN = "broken/default/seed-1"


def spec(path: Path, broken: bool = True, **train) -> Path:
    """Two short CNN runs (seeds 1 and 2) and, after them, one that fails at run time (an unknown model)."""
    experiments = [
        {
            "name": "cnn",
            "seeds": [1, 2],
            "set": {
                "model.name": "cnn",
                "data.input_size": 16,
                "train.epochs": 2,
                "train.batch_size": 32,
                **{f"train.{k}": v for k, v in train.items()},
            },
        }
    ]
    if broken:
        experiments.append(
            {
                "name": "broken",
                "row": "Broken",
                "seeds": [1],
                "set": {"model.name": "no-such-model", "data.input_size": 16},
            }
        )
    path.write_text(
        yaml.safe_dump(
            {
                "name": "par",
                "base": {"data": {"root": str(SAMPLE)}, "eval": {"bootstrap": 20, "grid_images": 0}},
                "experiments": experiments,
            }
        )
    )
    return path


def study(cfg: Path, out: Path, *args: str):
    result = runner.invoke(app, ["study", str(cfg), "--out", str(out), *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict:
    """The same study sequentially (the two good runs) and with --parallel 2 (all three), its events recorded.

    The parallel study's parent has 2 torch threads, so each worker must get 1: the sequential study's count here
    (conftest), without which CPU results differ in the last digits."""
    base = tmp_path_factory.mktemp("parallel")
    cfg = spec(base / "par.yaml")
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run outside the per-test cache of conftest
        mp.setenv("BLOODCELL_CACHE", str(base / "cache"))
        sequential = study(cfg, base / "seq", "--only", "cnn")
        mp.setenv(events.ENV, str(base / "events.jsonl"))
        torch.set_num_threads(2)
        try:
            par = study(cfg, base / "par", "--parallel", "2")
        finally:
            torch.set_num_threads(1)
    return {
        "cfg": cfg,
        "seq": base / "seq",
        "par": base / "par",
        "output": par.output,
        "seq_output": sequential.output,
        "events": events.read(base / "events.jsonl"),
    }


def test_parallel_study_equals_the_sequential_one(studies):
    for key in GOOD:
        seq, par = studies["seq"] / "runs" / key, studies["par"] / "runs" / key
        assert outcome(par) == outcome(seq), key  # metrics (wall time aside), history, weights
        assert (par / "predictions.csv").read_bytes() == (seq / "predictions.csv").read_bytes()
        assert (
            json.loads((par / "metrics.json").read_text())["provenance"]["environment"]["torch_threads"] == 1
        )  # 2 threads // 2 workers
    # the report and the status come from the run directories in study order, whatever order the runs finished in
    status = json.loads((studies["par"] / "study_status.json").read_text())
    assert [r["run"] for r in status["results"]] == GOOD
    assert status["results"] == json.loads((studies["seq"] / "study_status.json").read_text())["results"]
    assert status["parallel"] == 2
    md = (studies["par"] / "report.md").read_text()
    per_run = md[md.index("## Environment") :]
    assert [per_run.index(k) for k in GOOD + [BROKEN]] == sorted(per_run.index(k) for k in GOOD + [BROKEN])
    assert "| runs at once (--parallel) | 2 |" in md
    for key in GOOD + [BROKEN]:  # each worker's output is kept, the run's directory stays as a sequential run leaves it
        assert (studies["par"] / "logs" / f"{key}.log").is_file()
    assert sorted(p.name for p in (studies["par"] / "runs" / GOOD[0]).iterdir()) == sorted(
        p.name for p in (studies["seq"] / "runs" / GOOD[0]).iterdir()
    )


def test_parallel_runs_train_at_the_same_time(studies):
    """Each run is one worker process: one run's first training batch comes before the other run is complete,
    both ways round (one after the other, a run starts only once the one before it has been marked complete)."""
    log, runs = studies["events"], studies["par"] / "runs"
    pid_of = {}
    for e in log:
        if e["event"] == "wrote" and Path(e["path"]).name == "config.yaml" and Path(e["path"]).is_relative_to(runs):
            pid_of[Path(e["path"]).parent.relative_to(runs).as_posix()] = e["pid"]
    assert set(GOOD) <= set(pid_of) and len({pid_of[k] for k in GOOD}) == 2, pid_of
    first_batch = {k: min(e["time"] for e in log if e["event"] == "batch" and e["pid"] == pid_of[k]) for k in GOOD}
    completed = {
        k: max(e["time"] for e in log if e["event"] == "wrote" and e["path"] == str(runs / k / "status.json"))
        for k in GOOD
    }
    a, b = GOOD
    assert first_batch[b] < completed[a] and first_batch[a] < completed[b], (first_batch, completed)
    assert os.getpid() not in {pid_of[k] for k in GOOD}  # trained in workers, not in the study's process


def test_a_failing_run_in_a_worker_is_reported_and_the_others_complete(studies):
    assert "runs complete: 2 of 3" in studies["output"] and f"failed: {BROKEN}" in studies["output"]
    status = json.loads((studies["par"] / "runs" / BROKEN / "status.json").read_text())
    assert status["state"] == "failed" and "no-such-model" in status["error"] and "Traceback" in status["traceback"]
    assert json.loads((studies["par"] / "study_status.json").read_text())["failed"] == [BROKEN]
    md = (studies["par"] / "report.md").read_text()
    assert f"**Run {BROKEN} failed**" in md and "no-such-model" in md


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "", "²"])
def test_bad_parallel_values_are_one_line_errors(tmp_path, value):
    out = tmp_path / "out"
    result = runner.invoke(app, ["study", str(spec(tmp_path / "s.yaml")), "--out", str(out), "--parallel", value])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --parallel: expected how many runs") and result.output.count("\n") == 1, (
        result.output
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "train, key",
    [
        ({"devices": 2}, "train.devices: 2"),
        ({"devices": [0, 1]}, "train.devices: [0,1]"),
        ({"devices": "0,1"}, "train.devices: 0,1"),
        ({"num_nodes": 2}, "train.num_nodes: 2"),
    ],
)
def test_runs_on_several_devices_are_refused_in_parallel(tmp_path, train, key):
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["study", str(spec(tmp_path / "s.yaml", broken=False, **train)), "--out", str(out), "--parallel", "2"]
    )
    assert result.exit_code == 2, result.output
    assert (
        result.output.startswith("error: --parallel 2: run cnn/default/seed-1 sets " + key)
        and result.output.count("\n") == 1
    ), result.output
    assert not out.exists()  # refused before anything is written


def test_auto_is_one_worker_per_visible_gpu(tmp_path, monkeypatch):
    runs = expand_runs(*load_study(spec(tmp_path / "s.yaml")))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert parallel.resolve_parallel("auto", runs) == 1  # no CUDA: one run at a time
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,GPU-4e1c,7")
    assert parallel.resolve_parallel("auto", runs) == 3
    cpu_runs = expand_runs(*load_study(spec(tmp_path / "s.yaml", accelerator="cpu")), only=["cnn"])
    assert parallel.resolve_parallel("auto", cpu_runs) == 1  # runs that train on the CPU get no GPU workers
    # worker i sees only its GPU (round-robin past the last), as device 0; threads are split between the workers
    slots = parallel.plan_slots(4, parallel.visible_gpus(), threads=16)
    assert [s.gpu for s in slots] == ["5", "GPU-4e1c", "7", "5"] and {s.threads for s in slots} == {4}
    env = parallel.worker_env(slots[1])
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-4e1c" and env["OMP_NUM_THREADS"] == "4"
    assert parallel.plan_slots(3, [], threads=2)[0].threads == 1  # never 0 threads
    with pytest.raises(ConfigError, match="--parallel"):
        parallel.resolve_parallel("many", runs)

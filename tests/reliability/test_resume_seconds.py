"""A resumed run's `train_seconds` is the whole training, not the part after the interruption (issue 27)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bloodcell import events
from bloodcell.cli import app
from conftest import SAMPLE
from test_kill_resume import clean_up, kill_9, spawn, wait_for
from test_train import write_cfg

pytestmark = pytest.mark.slow
EPOCHS = 8


def epoch_seconds(run: Path) -> list[float]:
    with open(run / "history.csv", newline="") as fh:
        return [float(r["seconds"]) for r in csv.DictReader(fh)]


def test_a_resumed_run_counts_the_epochs_before_the_kill(tmp_path):
    cfg = write_cfg(
        tmp_path / "run.yaml",
        {
            "model": {"name": "cnn"},
            "data": {"input_size": 48},
            "train": {"epochs": EPOCHS, "batch_size": 16, "lr": 0.002},
            "eval": {"bootstrap": 20, "grid_images": 0},
        },
    )
    run, log = tmp_path / "run", tmp_path / "events.jsonl"
    proc = spawn(["train", str(cfg), "--data", str(SAMPLE), "--out", str(run)], log)
    try:
        wait_for(
            lambda: any(e["event"] == "batch" and e.get("epoch") == EPOCHS for e in events.read(log)),
            proc,
            f"epoch {EPOCHS} to start",
        )
        kill_9(proc)
    finally:
        clean_up(proc)
    before = epoch_seconds(run)  # the epochs the killed session trained (at least EPOCHS - 2: one may be redone)
    assert len(before) >= EPOCHS - 2
    res = CliRunner().invoke(app, ["train", str(cfg), "--data", str(SAMPLE), "--out", str(run), "--resume"])
    assert res.exit_code == 0, res.output
    seconds = json.loads((run / "metrics.json").read_text())["provenance"]["train_seconds"]
    every_epoch = epoch_seconds(run)
    assert len(every_epoch) == EPOCHS
    # the whole training: at least every epoch's own time (it was only the resumed session's: prep and the last epochs)
    assert seconds >= sum(every_epoch), (seconds, every_epoch)

"""NaN loss: an absurd learning rate stops the run with one line naming the epoch and step and asking for a lower
lr; the checkpoint of the last good epoch is kept and loads, and nothing with inf/nan weights is ever saved."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.models import create_model
from bloodcell.train.checkpoint_io import read_checkpoint

from conftest import SAMPLE
from test_train import BLOODCELL, cli_env, read_history, write_cfg

runner = CliRunner()


def config(batch_size: int, bad_lr: float, bad_optimizer: str = "sgd", bad_epochs: int = 2) -> dict:
    """One good epoch (adam, lr 0.002), then a stage of `bad_optimizer` at `bad_lr`."""
    return {
        "model": {"name": "cnn"},
        "data": {"input_size": 32},
        "train": {
            "batch_size": batch_size,
            "stages": [{"epochs": 1, "lr": 0.002}, {"epochs": bad_epochs, "optimizer": bad_optimizer, "lr": bad_lr}],
        },
        "eval": {"bootstrap": 0, "grid_images": 0},
    }


def assert_kept_good_checkpoint(run: Path, epochs: int) -> None:
    """checkpoints/last.ckpt is the one of epoch `epochs`, every tensor finite, and it loads into a fresh model."""
    ckpt = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["epoch"] + 1 == epochs
    state = ckpt["state_dict"]
    assert state and all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    model = create_model("cnn", num_classes=8, input_size=32)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})
    assert [int(r["epoch"]) for r in read_history(run)] == list(range(1, epochs + 1))
    assert not (run / "model.safetensors").exists()  # no final model from a diverged run
    assert json.loads((run / "status.json").read_text())["state"] != "complete"
    assert not list(run.rglob("*.tmp"))


@pytest.mark.slow
def test_nan_loss_stops_with_one_line_naming_epoch_and_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = write_cfg(tmp_path / "c.yaml", config(batch_size=16, bad_lr=1e12))
    run = tmp_path / "run"
    proc = subprocess.run(
        BLOODCELL + ["train", str(cfg), "--data", str(SAMPLE), "--out", str(run)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    message = errors[0]
    # the first SGD steps at lr 1e12 are taken on finite losses; a later batch of epoch 2 sees the wreck
    assert re.match(
        r"error: training loss is (nan|-?inf) at epoch 2, step [1-9]\d*; lower train\.lr \(now 1000000000000\.0\); ",
        message,
    ), message
    assert f"the checkpoint of epoch 1, the last good one, is kept: {run / 'checkpoints' / 'last.ckpt'}" in message
    assert_kept_good_checkpoint(run, epochs=1)


def test_weights_turned_inf_by_an_epochs_last_step_are_never_checkpointed(tmp_path):
    """One batch per epoch: epoch 2's only loss is finite, and its RMSprop step (about 3.2 x lr = 6e38 per weight, over
    float32's 3.4e38) makes the weights inf. That epoch's checkpoint must not be written: it would become `last`."""
    cfg = write_cfg(tmp_path / "c.yaml", config(batch_size=128, bad_lr=2e38, bad_optimizer="rmsprop"))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(cfg), "--data", str(SAMPLE), "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: weights became inf or nan in epoch 2; lower train.lr (now 2e+38)"), (
        result.output
    )
    assert "the checkpoint of epoch 1, the last good one, is kept" in result.output
    assert_kept_good_checkpoint(run, epochs=1)


def test_nan_loss_in_the_first_epoch_says_no_checkpoint_was_kept(tmp_path):
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {**config(16, 1e12), "train": {"batch_size": 16, "epochs": 2, "optimizer": "sgd", "lr": 1e12}},
    )
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(cfg), "--data", str(SAMPLE), "--out", str(run)])
    assert result.exit_code == 2, result.output
    assert re.match(
        r"error: training loss is (nan|-?inf) at epoch 1, step [1-9]\d*; lower train\.lr ", result.output
    ), result.output
    assert result.output.strip().endswith("no epoch finished, so no checkpoint was kept")
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
    assert not (run / "model.safetensors").exists()

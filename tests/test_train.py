"""Training engine on the embedded sample: learning, resume after kill -9, DDP, k-fold, SMOTE, SupCon, staged runs,
configs."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.config import load_config, parse_config
from bloodcell.errors import ConfigError
from bloodcell.train.checkpoint_io import SafetensorsCheckpointIO, read_checkpoint
from bloodcell.train.smote import check_smote_fits, smote_oversample

from conftest import REPO, SAMPLE, cli_env, env_with_startup_hook

runner = CliRunner()
BLOODCELL = [sys.executable, "-m", "bloodcell.cli"]

TINY = {
    "model": {"name": "cnn"},
    "data": {"input_size": 32},
    "train": {"epochs": 3, "batch_size": 16, "lr": 0.002},
    "eval": {"bootstrap": 50, "grid_images": 4},
}


def write_cfg(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(cfg_path: Path, out: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["train", str(cfg_path), "--data", str(SAMPLE), "--out", str(out), *extra])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return (
        json.loads((out / "metrics.json").read_text())
        if (out / "metrics.json").exists()
        else json.loads((out / "aggregate.json").read_text())
    )


def read_history(run: Path) -> list[dict]:
    with open(run / "history.csv") as fh:
        return list(csv.DictReader(fh))


def test_short_cnn_run_learns_well_above_chance(tmp_path):
    """112 training images, 8 classes (chance 12.5 %): 25 epochs at 32 px reach 45-57 % on 3 seeds; we ask for 30 %."""
    cfg = write_cfg(tmp_path / "c.yaml", {**TINY, "train": {"epochs": 25, "batch_size": 16, "lr": 0.002}})
    run = tmp_path / "run"
    metrics = train(cfg, run)
    assert metrics["test"]["accuracy"] >= 0.30
    assert metrics["test"]["n"] == 60 and metrics["provenance"]["sizes"] == {"train": 112, "val": 28, "test": 60}
    for name in (
        "config.yaml",
        "split.json",
        "history.csv",
        "metrics.json",
        "predictions.csv",
        "model.safetensors",
        "model.json",
        "status.json",
    ):
        assert (run / name).is_file(), name
    for fig in ("curves", "confusion", "reliability", "predictions", "mistakes"):
        assert (run / "figures" / f"{fig}.png").stat().st_size > 1000
    assert not (run / "checkpoints").exists()
    keys = (
        "accuracy",
        "precision_weighted",
        "recall_weighted",
        "f1_weighted",
        "f1_macro",
        "ece",
        "ece_calibrated",
        "per_class",
        "confusion_matrix",
        "ci95",
    )
    assert all(k in metrics["test"] for k in keys) and "accuracy" in metrics["train"]
    model_json = json.loads((run / "model.json").read_text())
    assert model_json["class_names"][0] == "basophil" and model_json["temperature"] > 0
    history = read_history(run)
    assert [int(r["epoch"]) for r in history] == list(range(1, 26))
    assert float(history[-1]["train_loss"]) < float(history[0]["train_loss"])
    # the resolved config repeats the run
    again = load_config(run / "config.yaml")
    assert again.train.epochs == 25 and again.data.root == str(SAMPLE)


def test_same_seed_repeats_exactly_on_cpu(tmp_path):
    cfg = write_cfg(tmp_path / "c.yaml", TINY)
    a = train(cfg, tmp_path / "a")
    b = train(cfg, tmp_path / "b")
    assert a["test"]["accuracy"] == b["test"]["accuracy"] and a["test"]["nll"] == b["test"]["nll"]
    assert (tmp_path / "a" / "split.json").read_text() == (tmp_path / "b" / "split.json").read_text()


def checkpoint_epoch(run: Path) -> int:
    """Epochs saved in checkpoints/last.ckpt (0 if none); the JSON is replaced atomically, so a read sees a whole
    one."""
    try:
        return json.loads((run / "checkpoints" / "last.ckpt").read_text())["tree"]["__dict__"]["epoch"] + 1
    except (OSError, ValueError, KeyError):
        return 0


def _wait_for_epochs(run: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if (run / "history.csv").exists() and len(read_history(run)) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.stdout.read()}")
        time.sleep(0.02)
    raise AssertionError("timed out waiting for epochs")


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {**TINY, "train": {"epochs": 5, "batch_size": 16, "lr": 0.002}, "augment": {"enabled": True}},
    )
    full = train(cfg, tmp_path / "full")
    run = tmp_path / "killed"
    proc = subprocess.Popen(
        BLOODCELL + ["train", str(cfg), "--data", str(SAMPLE), "--out", str(run)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for_epochs(run, 2, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((run / "status.json").read_text())["state"] == "running"
    saved = checkpoint_epoch(run)  # epochs the checkpoint holds; a later history row may be of an unsaved epoch
    assert saved >= 1
    written = (run / "history.csv").read_text().splitlines()[: 1 + saved]
    refused = runner.invoke(app, ["train", str(cfg), "--data", str(SAMPLE), "--out", str(run)])
    assert refused.exit_code == 2 and "--resume" in refused.output
    resumed = train(cfg, run, "--resume")
    assert resumed["test"]["accuracy"] == full["test"]["accuracy"]
    assert resumed["test"]["nll"] == full["test"]["nll"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_history(run)) == strip(read_history(tmp_path / "full"))
    # the saved epochs were not trained again: their rows, wall seconds included, are the ones written before the kill
    assert (run / "history.csv").read_text().splitlines()[: 1 + saved] == written


def test_two_process_ddp_on_cpu_completes(tmp_path):
    cfg = write_cfg(
        tmp_path / "c.yaml", {**TINY, "train": {**TINY["train"], "devices": 2, "strategy": "ddp", "accelerator": "cpu"}}
    )
    run = tmp_path / "ddp"
    proc = subprocess.run(
        BLOODCELL + ["train", str(cfg), "--data", str(SAMPLE), "--out", str(run)],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert len(read_history(run)) == 3
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr  # two processes joined the group


def test_kfold_writes_every_fold_and_the_aggregate(tmp_path):
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {**TINY, "train": {"epochs": 1, "batch_size": 32}, "cv": {"folds": 5}, "data": {"input_size": 16}},
    )
    agg = train(cfg, tmp_path / "cv")
    assert agg["runs"] == [f"fold-{k}" for k in range(5)]
    assert agg["summary"]["test.accuracy"]["n"] == 5
    vals = [set(json.loads((tmp_path / "cv" / f"fold-{k}" / "split.json").read_text())["val"]) for k in range(5)]
    assert all(not (vals[i] & vals[j]) for i in range(5) for j in range(i + 1, 5))
    tests = {tuple(json.loads((tmp_path / "cv" / f"fold-{k}" / "split.json").read_text())["test"]) for k in range(5)}
    assert len(tests) == 1  # every fold is tested on the same held-out part
    per_run = agg["per_run"]["test.accuracy"]
    assert agg["summary"]["test.accuracy"]["mean"] == pytest.approx(np.mean(per_run))


def test_several_seeds_make_one_run_each(tmp_path):
    cfg = write_cfg(tmp_path / "c.yaml", {**TINY, "train": {"epochs": 1, "batch_size": 32}, "seeds": [1, 2]})
    agg = train(cfg, tmp_path / "seeds")
    assert agg["runs"] == ["seed-1", "seed-2"]
    assert load_config(tmp_path / "seeds" / "seed-2" / "config.yaml").seed == 2


def test_smote_equalises_training_classes():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 12 + [2] * 5)
    images = rng.integers(0, 256, (len(labels), 24, 24, 3), dtype=np.uint8)
    cfg = parse_config({"smote": {"enabled": True, "size": 16, "k_neighbors": 3}}).smote
    x, y = smote_oversample(images, labels, cfg, num_classes=3, seed=0)
    assert np.bincount(y).tolist() == [30, 30, 30]
    assert x.shape == (90, 24, 24, 3) and x.dtype == np.uint8
    assert np.array_equal(x[: len(labels)], images)  # originals first, unchanged


def test_smote_that_cannot_fit_is_refused_with_the_figure():
    labels = np.array([0] * 9000 + [1] * 100)
    cfg = parse_config({"smote": {"enabled": True, "size": 224, "max_memory_gb": 4}}).smote
    with pytest.raises(ConfigError, match=r"needs about 20\.2 GiB, over the 4\.0 GiB limit"):
        check_smote_fits(labels, cfg, 2)


def test_supcon_two_stage_run(tmp_path):
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {
            "model": {"name": "supcon"},
            "data": {"input_size": 32},
            "eval": {"bootstrap": 0, "grid_images": 0},
            "train": {
                "batch_size": 64,
                "stages": [
                    {"epochs": 1, "objective": "supcon"},
                    {"epochs": 1, "objective": "ce", "freeze_encoder": True, "lr": 0.01},
                ],
            },
        },
    )
    run = tmp_path / "supcon"
    train(cfg, run)
    h = read_history(run)
    assert [r["objective"] for r in h] == ["supcon", "ce"]
    assert h[0]["train_acc"] == "" and h[1]["train_acc"] != ""


def test_staged_schedule_rebuilds_the_optimizer(tmp_path):
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {
            **TINY,
            "train": {
                "batch_size": 32,
                "lr": 0.002,
                "stages": [{"epochs": 2}, {"epochs": 1, "lr": 0.0005, "optimizer": "sgd"}],
            },
        },
    )
    run = tmp_path / "staged"
    train(cfg, run)
    h = read_history(run)
    assert [(r["stage"], float(r["lr"])) for r in h] == [("1", 0.002), ("1", 0.002), ("2", 0.0005)]


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    cfg = write_cfg(
        tmp_path / "c.yaml", {**TINY, "train": {"epochs": 3, "batch_size": 16, "lr": 1e12, "optimizer": "sgd"}}
    )
    result = runner.invoke(app, ["train", str(cfg), "--data", str(SAMPLE), "--out", str(tmp_path / "nan")])
    assert result.exit_code == 2
    assert result.output.startswith("error: training loss is nan") and "lower train.lr" in result.output


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train": {"epocs": 3}}, "unknown key 'train.epocs'"),
        ({"train": {"epochs": "ten"}}, "train.epochs: Input should be a valid integer"),
        ({"model": {"name": 5}}, "model.name"),
        ({"train": {"optimizer": "adagrad"}}, "train.optimizer"),
        ({"data": {"input_size": 2}}, "data.input_size"),
        ({"train": {"lr": 1e40}}, "train.lr: Value error, 1e+40 is beyond float32"),
    ],
)
def test_bad_configs_name_the_key(tmp_path, raw, message):
    cfg = write_cfg(tmp_path / "bad.yaml", raw)
    result = runner.invoke(app, ["train", str(cfg), "--data", str(SAMPLE), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert message in result.output and str(cfg) in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_overrides_set_nested_keys_and_reject_unknown_ones(tmp_path):
    cfg = load_config(
        REPO / "configs" / "train" / "cnn.yaml", ["train.epochs=2", "data.split.order=sorted", "seeds=[1, 2]"]
    )
    assert cfg.train.epochs == 2 and cfg.data.split.order == "sorted" and cfg.seeds == [1, 2]
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'"):
        load_config(REPO / "configs" / "train" / "cnn.yaml", ["train.epoch=2"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["train.epochs"])


def test_missing_data_and_unknown_model_are_clear(tmp_path):
    cfg = write_cfg(tmp_path / "c.yaml", TINY)
    result = runner.invoke(app, ["train", str(cfg), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "data.root is not set" in result.output
    cfg2 = write_cfg(tmp_path / "c2.yaml", {**TINY, "model": {"name": "resnet9000"}})
    result = runner.invoke(app, ["train", str(cfg2), "--data", str(SAMPLE), "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "resnet9000" in result.output


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_train_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.model.name == path.stem


# ----------------------------------------------------------------------------- checkpoints


def test_training_checkpoints_round_trip_without_pickle(tmp_path):
    state = {
        "epoch": 3,
        "state_dict": {"w": torch.randn(3, 2)},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(4.0)}}, "param_groups": [{"lr": 0.1, "params": [0]}]}],
        "best": float("inf"),
        "t": (1, 2),
    }
    io = SafetensorsCheckpointIO()
    io.save_checkpoint(state, tmp_path / "last.ckpt")
    back = read_checkpoint(tmp_path / "last.ckpt")
    assert back["epoch"] == 3 and torch.equal(back["state_dict"]["w"], state["state_dict"]["w"])
    assert (
        back["optimizer_states"][0]["state"][0]["step"].item() == 4.0
        and back["best"] == float("inf")
        and back["t"] == (1, 2)
    )
    # a torn pair (tensor file from another save) is refused, never loaded
    io.save_checkpoint({"x": torch.zeros(1)}, tmp_path / "other.ckpt")
    tensor_file = lambda ckpt: tmp_path / json.loads((tmp_path / ckpt).read_text())["tensors_file"]  # noqa: E731
    os.replace(tensor_file("other.ckpt"), tensor_file("last.ckpt"))
    from bloodcell.errors import ModelError

    with pytest.raises(ModelError, match="incomplete"):
        read_checkpoint(tmp_path / "last.ckpt")


def test_evaluate_rebuilds_the_metrics_of_a_run(tmp_path):
    cfg = write_cfg(tmp_path / "c.yaml", {**TINY, "train": {"epochs": 2, "batch_size": 32}})
    run = tmp_path / "run"
    first = train(cfg, run)
    (run / "metrics.json").unlink()
    result = runner.invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 0, result.output
    again = json.loads((run / "metrics.json").read_text())
    assert again["test"]["accuracy"] == first["test"]["accuracy"] and again["temperature"] == first["temperature"]
    not_a_run = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert not_a_run.exit_code == 2 and "is not a run directory" in not_a_run.output


def test_ema_weights_are_what_training_hands_on_and_resume_exactly(tmp_path):
    from bloodcell.data.prepare import prepare_data
    from bloodcell.train.fit import fit
    from bloodcell.train.module import Classifier

    base = {
        **TINY,
        "data": {"root": str(SAMPLE), "input_size": 32},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.002, "precision": "32-true"},
    }
    with_ema = {**base, "train": {**base["train"], "ema_decay": 0.8}}
    data = prepare_data(parse_config(base), progress=False)
    plain = fit(parse_config(base), data, tmp_path / "plain", progress=False)
    ema = fit(parse_config(with_ema), data, tmp_path / "ema", progress=False)
    # the average only reads the weights: the training trajectory is the same step for step
    assert [r["train_loss"] for r in read_history(tmp_path / "plain")] == [
        r["train_loss"] for r in read_history(tmp_path / "ema")
    ]
    # ...but what is saved and evaluated is the average, not the last weights
    differs = [not torch.equal(a, b) for a, b in zip(plain.state_dict().values(), ema.state_dict().values())]
    assert any(differs)
    assert [r["val_loss"] for r in read_history(tmp_path / "plain")] != [
        r["val_loss"] for r in read_history(tmp_path / "ema")
    ]
    # the average is in the checkpoint: one epoch, then resumed to two, gives the same weights
    fit(
        parse_config({**with_ema, "train": {**with_ema["train"], "epochs": 1}}),
        data,
        tmp_path / "resumed",
        progress=False,
    )
    first_epoch = (tmp_path / "resumed" / "history.csv").read_text().splitlines()
    steps = []
    original_step = Classifier.training_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Classifier, "training_step", lambda self, *a, **k: steps.append(1) or original_step(self, *a, **k))
        resumed = fit(parse_config(with_ema), data, tmp_path / "resumed", resume=True, progress=False)
    # epoch 1 came from the checkpoint, not from training it again: one epoch of steps ran, and its row (wall
    # seconds too) is unchanged
    assert len(steps) == -(-len(data.parts["train"]) // 16)
    assert (tmp_path / "resumed" / "history.csv").read_text().splitlines()[:2] == first_epoch
    for (name, a), b in zip(ema.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("n, world", [(65, 1), (64, 1), (33, 1), (1, 1), (97, 3), (10, 2)])
def test_epoch_batches_cover_the_epoch_once_without_a_lone_last_image(n, world):
    """Every image once per epoch (DDP ranks: disjoint shards covering it), seeded reshuffling per epoch, and never
    a training batch of one image (BatchNorm cannot train on it when features are 1x1)."""
    from bloodcell.train.batches import EpochBatches

    for shuffle in (True, False):
        per_epoch = []
        for epoch in (0, 1):
            shards = []
            for rank in range(world):
                sampler = EpochBatches(n, 32, shuffle, seed=3, rank=rank, world_size=world)
                sampler.set_epoch(epoch)
                batches = list(sampler)
                assert len(batches) == len(sampler)
                assert n == 1 or min(len(b) for b in batches) > 1
                shards.append([i for b in batches for i in b])
            assert len({len(s) for s in shards}) == 1  # DDP: the same number of samples on every rank
            flat = [i for s in shards for i in s]
            assert set(flat) == set(range(n))  # the epoch covered...
            if n % world == 0:
                assert sorted(flat) == list(range(n))  # ...each image once, no rank sharing one
            per_epoch.append(flat)
        if shuffle and n > 2:
            assert per_epoch[0] != per_epoch[1]  # a new order each epoch
        if not shuffle and world == 1:
            assert per_epoch[0] == per_epoch[1] == list(range(n))  # dataset order, every epoch


# Loaded at start-up by every process of the study below (sitecustomize on PYTHONPATH). Only in DDP rank 1 (the
# process Lightning launches with LOCAL_RANK=1), the 3rd cross-entropy (a training step) returns NaN, once: one rank
# diverges alone.
NAN_ON_RANK_1 = """
import os
if os.environ.get("LOCAL_RANK") == "1":
    import torch, torch.nn.functional as F
    _ce, _calls = F.cross_entropy, [0]
    def cross_entropy(*args, **kwargs):
        _calls[0] += 1
        loss = _ce(*args, **kwargs)
        return loss * float("nan") if _calls[0] == 3 else loss
    F.cross_entropy = cross_entropy
"""


@pytest.mark.slow
def test_a_loss_that_diverges_on_one_ddp_rank_stops_every_rank_and_the_study_goes_on(tmp_path):
    spec = {
        "name": "ddp-nan",
        "base": {"data": {"root": str(SAMPLE)}, "eval": {"bootstrap": 0, "grid_images": 0}},
        "seeds": [1],
        "experiments": [
            {
                "name": f"run{k}",
                "set": {
                    "model.name": "cnn",
                    "data.input_size": 16,
                    "train.epochs": 1,
                    "train.batch_size": 16,
                    "train.devices": 2,
                    "train.strategy": "ddp",
                    "train.accelerator": "cpu",
                    "train.precision": "32",
                },
            }
            for k in (1, 2)
        ],
    }
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    env = env_with_startup_hook(tmp_path, NAN_ON_RANK_1)
    # without the shared stop, rank 0 waits in the gradient all-reduce for rank 1 until this timeout
    proc = subprocess.run(
        BLOODCELL + ["study", str(tmp_path / "study.yaml"), "--out", str(tmp_path / "out")],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads((tmp_path / "out" / "study_status.json").read_text())
    assert status["failed"] == ["run1/default/seed-1"] and status["complete"] == 1
    failed = json.loads(next((tmp_path / "out" / "runs" / "run1").rglob("status.json")).read_text())
    assert failed["state"] == "failed" and "not finite on another process" in failed["error"]


RECORD_SUPCON_ROWS = """
import os
import bloodcell.train.module as m
_loss = m.supcon_loss
def supcon_loss(embeddings, labels, temperature):
    with open(os.environ["SUPCON_ROWS"], "a") as fh:
        fh.write(f"{os.environ.get('LOCAL_RANK', '0')} {embeddings.shape[0]} {labels.shape[0]}\\n")
    return _loss(embeddings, labels, temperature)
m.supcon_loss = supcon_loss
"""


@pytest.mark.slow
def test_supcon_under_ddp_contrasts_the_global_batch(tmp_path):
    """Two ranks of 8 cells, two views each: the loss of each rank sees 2 x 2 x 8 = 32 embeddings, not its own 16."""
    rows = tmp_path / "rows.txt"
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {
            "model": {"name": "supcon"},
            "data": {"input_size": 32},
            "eval": {"bootstrap": 0, "grid_images": 0},
            "augment": {"enabled": False},
            "smote": {"enabled": False},
            # the SupCon stage leaves the classifier head unused, which plain "ddp" refuses
            # (Lightning says so in one line)
            "train": {
                "batch_size": 8,
                "devices": 2,
                "strategy": "ddp_find_unused_parameters_true",
                "accelerator": "cpu",
                "precision": "32",
                "stages": [
                    {"epochs": 1, "objective": "supcon", "optimizer": "adam", "lr": 0.001},
                    {"epochs": 1, "objective": "ce", "freeze_encoder": True, "optimizer": "adam", "lr": 0.001},
                ],
            },
        },
    )
    env = env_with_startup_hook(tmp_path, RECORD_SUPCON_ROWS, SUPCON_ROWS=str(rows))
    proc = subprocess.run(
        BLOODCELL + ["train", str(cfg), "--data", str(SAMPLE), "--out", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = [tuple(map(int, line.split())) for line in rows.read_text().splitlines()]
    assert {rank for rank, _, _ in seen} == {0, 1} and all(e == n for _, e, n in seen)
    # 112 training cells = 7 full batches of 8 per rank; validation (not gathered) has at most 14 cells a rank
    assert max(e for _, e, _ in seen) == 32 and sum(e == 32 for _, e, _ in seen) == 2 * 7, seen

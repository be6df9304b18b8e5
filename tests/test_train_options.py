"""Training options through the real fit / CLI on the embedded sample: class weights, label smoothing, early
stopping, the step schedule, the device cache, the precision recorded, and training from a MedMNIST .npz."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bloodcell.cli import app
from bloodcell.config import parse_config
from bloodcell.data.prepare import prepare_data
from bloodcell.train.fit import class_weights_for, fit
from bloodcell.train.hardware import resolve_precision
from bloodcell.train.module import Classifier

from conftest import SAMPLE
from test_data import _write_npz
from test_train import read_history, runner, train, write_cfg

# 16 px on the CPU in fp32 (exactly repeatable), no bootstrap or figures of predictions: a run takes seconds
SMALL = {
    "model": {"name": "cnn"},
    "data": {"root": str(SAMPLE), "input_size": 16},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.002, "precision": "32-true", "accelerator": "cpu"},
    "eval": {"bootstrap": 0, "grid_images": 0},
}


def config(root=SAMPLE, **train):
    return parse_config({**SMALL, "data": {**SMALL["data"], "root": str(root)}, "train": {**SMALL["train"], **train}})


def without_seconds(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_class_weights_for_is_inverse_class_frequency():
    """n / (classes * count): a class twice as common weighs half; an absent class weighs 0."""
    w = class_weights_for(np.array([0, 0, 0, 1, 1, 1, 1, 1, 1]), 3)
    torch.testing.assert_close(w, torch.tensor([9 / (3 * 3), 9 / (3 * 6), 0.0]))


def test_balanced_class_weights_reach_the_training_loss(tmp_path, monkeypatch):
    """The sample is balanced, so three of its classes are copied at 25 : 10 : 5; every loss the run computes gets
    the inverse frequencies of its training part, and none without `balanced`."""
    root = tmp_path / "uneven"
    for name, n in {"basophil": 25, "eosinophil": 10, "erythroblast": 5}.items():  # 5 : 2 : 1
        (root / name).mkdir(parents=True)
        for f in sorted((SAMPLE / name).iterdir())[:n]:
            shutil.copy(f, root / name / f.name)
    weights_seen = []
    original = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: weights_seen.append(k.get("weight")) or original(*a, **k))
    cfg = config(root, class_weights="balanced", batch_size=8)
    data = prepare_data(cfg, progress=False)
    counts = np.bincount(data.labels[data.parts["train"]], minlength=3)
    assert counts[0] > 2 * counts[2]  # the training part really is uneven
    fit(cfg, data, tmp_path / "run", progress=False)
    assert weights_seen and all(w is not None for w in weights_seen)
    for w in weights_seen:
        torch.testing.assert_close(w.cpu(), torch.tensor(counts.sum() / (3 * counts), dtype=torch.float32))
    weights_seen.clear()
    fit(config(root, class_weights="none", batch_size=8), data, tmp_path / "plain", progress=False)
    assert weights_seen and all(w is None for w in weights_seen)


def first_training_loss(cfg, data, run, monkeypatch):
    """(logits, labels, loss) of the first training batch of a real fit."""
    calls = []
    original = Classifier._ce

    def recording(self, logits, y):
        loss = original(self, logits, y)
        calls.append((logits.detach(), y, loss.detach()))
        return loss

    monkeypatch.setattr(Classifier, "_ce", recording)
    fit(cfg, data, run, progress=False)
    logits, y, loss = calls[0]
    return logits, y, float(loss)


def test_label_smoothing_changes_the_training_loss_as_defined(tmp_path, monkeypatch):
    """With smoothing e the target is (1 - e) on the true class plus e spread over all classes."""
    data = prepare_data(config(), progress=False)
    logits0, y0, plain = first_training_loss(config(label_smoothing=0.0), data, tmp_path / "a", monkeypatch)
    logits, y, smoothed = first_training_loss(config(label_smoothing=0.2), data, tmp_path / "b", monkeypatch)
    assert torch.equal(logits, logits0) and torch.equal(y, y0)  # same seed: the same first batch and weights
    logp = torch.log_softmax(logits.float(), 1)
    nll = float(-logp.gather(1, y[:, None]).mean())
    uniform = float(-logp.mean(1).mean())
    assert plain == pytest.approx(nll, rel=1e-5)
    assert smoothed == pytest.approx(0.8 * nll + 0.2 * uniform, rel=1e-5)
    assert smoothed != pytest.approx(plain, rel=1e-3)


@pytest.mark.parametrize("patience", [None, 1, 2])
@pytest.mark.filterwarnings("ignore:Found .* in eval mode at the start of training")  # the frozen BatchNorm layers
def test_early_stopping_ends_the_run_after_patience_epochs_without_improvement(tmp_path, patience):
    """The backbone frozen (its BatchNorm statistics too) and a learning rate of 1e-30: the validation loss cannot
    change, so it never improves after epoch 1 and the run stops after 1 + patience epochs."""
    cfg = config(epochs=5, lr=1e-30, freeze_blocks=4, early_stopping_patience=patience)
    fit(cfg, prepare_data(cfg, progress=False), tmp_path / "run", progress=False)
    history = read_history(tmp_path / "run")
    assert len({r["val_loss"] for r in history}) == 1  # the construction holds: validation loss never moves
    assert len(history) == (5 if patience is None else 1 + patience)


def test_step_schedule_multiplies_the_lr_by_gamma_every_step_size_epochs(tmp_path):
    cfg = config(epochs=5, lr=0.01, schedule="step", step_size=2, gamma=0.1)
    fit(cfg, prepare_data(cfg, progress=False), tmp_path / "run", progress=False)
    lrs = [float(r["lr"]) for r in read_history(tmp_path / "run")]
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.0001], rel=1e-9)


def test_device_cache_on_cpu_trains_exactly_as_without_it(tmp_path):
    """device_cache on: batches are gathered from one uploaded array instead of copied per batch; same images, same
    run."""
    data = prepare_data(config(), progress=False)
    cached = fit(config(epochs=2, device_cache="on"), data, tmp_path / "on", progress=False)
    plain = fit(config(epochs=2, device_cache="off"), data, tmp_path / "off", progress=False)
    assert without_seconds(read_history(tmp_path / "on")) == without_seconds(read_history(tmp_path / "off"))
    for (name, a), b in zip(cached.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("asked, recorded", [("32", "32-true"), ("auto", None)])
def test_metrics_record_the_precision_the_run_trained_in(tmp_path, asked, recorded):
    """metrics.json gives the resolved precision (auto: bf16 where the CPU runs it natively, else fp32), the one
    Lightning trained with (model.json)."""
    raw = {**SMALL, "train": {**SMALL["train"], "precision": asked}}
    raw["data"] = {"input_size": 16}
    run = tmp_path / "run"
    metrics = train(write_cfg(tmp_path / "c.yaml", raw), run)
    expected = recorded or resolve_precision(parse_config(raw), "cpu")
    assert metrics["provenance"]["precision"] == expected
    assert json.loads((run / "model.json").read_text())["precision"] == expected
    # re-evaluating the run keeps what training recorded
    again = runner.invoke(app, ["evaluate", str(run)])
    assert again.exit_code == 0, again.output
    kept = json.loads((run / "metrics.json").read_text())["provenance"]
    assert kept["precision"] == expected and kept["train_seconds"] == metrics["provenance"]["train_seconds"]


def test_training_from_a_medmnist_npz_runs_end_to_end(tmp_path):
    npz = _write_npz(tmp_path / "bloodmnist.npz", n=(48, 16, 20))  # 28 px, random labels of the 8 classes
    cfg = write_cfg(
        tmp_path / "c.yaml",
        {**SMALL, "data": {"npz": str(npz), "input_size": 16}, "train": {**SMALL["train"], "epochs": 2}},
    )
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(cfg), "--out", str(run)])  # no --data: the npz is the data
    assert result.exit_code == 0, result.output + repr(result.exception)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["provenance"]["sizes"] == {"train": 48, "val": 16, "test": 20}  # the file's own parts
    assert metrics["provenance"]["dataset"]["kind"] == "npz"
    assert metrics["test"]["n"] == 20 and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert len(read_history(run)) == 2
    with open(run / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["path"] for r in rows] == [f"test/{k}" for k in range(20)]
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert json.loads((run / "model.json").read_text())["class_names"][3] == "ig"


def _native_bf16_in_subprocess(**env) -> bool:
    import os
    import subprocess
    import sys

    code = "from bloodcell.train.hardware import cpu_has_native_bf16; print(cpu_has_native_bf16())"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return out.stdout.strip() == "True"


def test_an_isa_capped_to_avx2_counts_as_the_cpu_it_emulates():
    import torch

    hardware = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    assert _native_bf16_in_subprocess() == hardware
    # either cap alone makes bf16 emulated, so `precision: auto` must fall back to fp32 as on a real AVX2 CPU
    assert not _native_bf16_in_subprocess(ATEN_CPU_CAPABILITY="avx2")
    assert not _native_bf16_in_subprocess(ONEDNN_MAX_CPU_ISA="AVX2")
    assert _native_bf16_in_subprocess(ONEDNN_MAX_CPU_ISA="AVX512_CORE_BF16") == hardware


def test_training_is_deterministic_without_nan_filling_and_puts_torchs_flags_back(tmp_path, monkeypatch):
    """Inside fit on CPU: deterministic algorithms on (exact resumes), NaN-filling of new tensors off (it cost 12 % of
    a step); after fit, torch's flags are what they were, so evaluation and the user's code run as before."""
    seen = []
    original = Classifier.training_step

    def recording_step(self, batch, batch_idx):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory))
        return original(self, batch, batch_idx)

    monkeypatch.setattr(Classifier, "training_step", recording_step)
    cfg = config()
    before = (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory)
    fit(cfg, prepare_data(cfg, progress=False), tmp_path / "run", progress=False)
    assert seen and set(seen) == {(True, False)}
    assert (torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory) == before


@pytest.mark.parametrize("scaling, world, expected", [("none", 4, 0.002), ("linear", 4, 0.008), ("linear", 1, 0.002)])
def test_lr_scaling_multiplies_the_learning_rate_by_the_world_size(scaling, world, expected):
    from types import SimpleNamespace

    from bloodcell.models import create_model

    cfg = config(lr_scaling=scaling, optimizer="sgd")
    module = Classifier(create_model("cnn", num_classes=8, input_size=16), cfg)
    module._trainer = SimpleNamespace(world_size=world)  # what configure_optimizers reads of the trainer
    opt = module.configure_optimizers()
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)


def test_csv_logger_writes_lightning_metrics_beside_history(tmp_path):
    cfg = config(logger="csv", epochs=2)
    fit(cfg, prepare_data(cfg, progress=False), tmp_path / "run", progress=False)
    logged = list(csv.DictReader(open(tmp_path / "run" / "logs" / "version_0" / "metrics.csv")))
    losses = [float(r["train_loss"]) for r in logged if r.get("train_loss")]
    history = read_history(tmp_path / "run")
    assert losses == pytest.approx([float(r["train_loss"]) for r in history])


def test_a_logger_whose_package_is_missing_is_a_one_line_config_error(tmp_path, monkeypatch):
    import importlib.util

    from bloodcell.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = config(logger="mlflow")
    with pytest.raises(ConfigError, match="train.logger is 'mlflow' but mlflow is not installed: pip install mlflow"):
        fit(cfg, prepare_data(cfg, progress=False), tmp_path / "run", progress=False)


def test_channels_last_resolves_per_machine_as_measured(monkeypatch):
    from bloodcell.train.hardware import resolve_channels_last

    vgg, resnet = parse_config({"model": {"name": "vgg16"}}), parse_config({"model": {"name": "resnet50"}})
    for capability, vgg_on_cpu in (("AVX512", True), ("AVX2", False), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert resolve_channels_last(vgg, "cpu") is vgg_on_cpu
        assert resolve_channels_last(resnet, "cpu") is True
        assert resolve_channels_last(vgg, "gpu") is True
    assert (
        resolve_channels_last(parse_config({"model": {"name": "resnet50"}, "train": {"channels_last": False}}), "gpu")
        is False
    )


def test_the_resolved_channels_last_reaches_the_batches(tmp_path, monkeypatch):
    monkeypatch.setattr("bloodcell.train.fit.resolve_channels_last", lambda cfg, accelerator: False)
    seen = []
    original = Classifier.preprocess

    def recording(self, x, augment):
        out = original(self, x, augment)
        seen.append(out.is_contiguous())
        return out

    monkeypatch.setattr(Classifier, "preprocess", recording)
    cfg = config()
    fit(cfg, prepare_data(cfg, progress=False), tmp_path / "run", progress=False)
    assert seen and all(seen), "the resolved contiguous format was not used"
    monkeypatch.setattr("bloodcell.train.fit.resolve_channels_last", lambda cfg, accelerator: True)
    seen.clear()
    fit(cfg, prepare_data(cfg, progress=False), tmp_path / "run2", progress=False)
    assert seen and not any(seen)

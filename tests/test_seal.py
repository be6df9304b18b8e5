"""A model folder that cannot lie (issue 27): SEAL.json checked at every load; file names stay inside the folder;
model_kwargs only plain options; `bloodcell model seal / verify`."""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.errors import ModelError
from bloodcell.infer import Predictor
from bloodcell.models import registry
from bloodcell.models.checkpoint import load_checkpoint
from bloodcell.detect.registry import bundled_detector_dir, create_detector, load_detector, save_detector
from bloodcell.models.metadata import bundled_model_dir, write_model_json
from bloodcell.models.seal import SEAL_FILE, sealed_names, verify

from conftest import SAMPLE, toy_run, with_ood

runner = CliRunner()
IMAGE = sorted(SAMPLE.rglob("*.jpg"))[0]


@pytest.fixture
def run(tmp_path) -> Path:
    return toy_run(tmp_path / "run", size=32)


def _meta(run: Path) -> dict:
    return json.loads((run / "model.json").read_text())


def _refused(model: Path, *fragments: str) -> str:
    """Predictor.load refuses `model` with one line holding every fragment; so does `bloodcell predict` (exit 2)."""
    with pytest.raises(ModelError) as err:
        Predictor.load(model)
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    result = runner.invoke(app, ["predict", str(IMAGE), "--model", str(model)])
    assert result.exit_code == 2 and result.stdout == "" and result.stderr.splitlines() == [f"error: {message}"]
    return message


def _forge_seal(folder: Path) -> None:
    """A seal written by hand over whatever the folder holds (no checks): what the loader does behind the seal."""
    files = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != SEAL_FILE:
            files[p.name] = {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    (folder / SEAL_FILE).write_text(json.dumps({"format": "bloodcell-seal", "format_version": 1, "files": files}))


# ------------------------------------------------------------------------------------------ edits the seal catches


def test_swapped_class_names_are_a_one_line_error_naming_model_json(run):
    meta = _meta(run)
    names = meta["class_names"]
    names[0], names[1] = names[1], names[0]
    (run / "model.json").write_text(json.dumps(meta))
    message = _refused(
        run, f"model folder {run}: model.json changed since it was sealed", f"bloodcell model seal {run}"
    )
    assert message.count("sha256") == 1


def test_swapped_rows_of_the_last_layer_name_the_weights_file(run):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    weights = run / "model.safetensors"
    with safe_open(str(weights), framework="pt") as fh:
        header = fh.metadata()
    state = load_file(str(weights))
    last = sorted(k for k in state if k.startswith("head.") and k.endswith(".weight"))[-1]
    for key in (last, last.replace(".weight", ".bias")):
        state[key][[0, 1]] = state[key][[1, 0]]
    save_file(state, str(weights), metadata=header)  # same shapes, same header: nothing else would notice
    _refused(run, "model.safetensors changed since it was sealed")
    _refused(weights, "model.safetensors changed since it was sealed")  # the file itself, not only its folder


def test_an_ood_threshold_of_1e30_is_refused(run):
    with_ood(run)
    meta = _meta(run)
    meta["ood"]["threshold"] = 1e30  # would turn the OOD check off
    (run / "model.json").write_text(json.dumps(meta))
    _refused(run, "model.json changed since it was sealed")


def test_missing_and_added_files_are_named(run):
    with_ood(run)
    shutil.copy(run / "ood.safetensors", run / "extra.safetensors")  # a weights file the seal does not list
    _refused(run, "extra.safetensors was added after it was sealed")
    (run / "extra.safetensors").unlink()
    (run / "ood.safetensors").unlink()
    _refused(run, "ood.safetensors is missing")


def test_files_the_loader_never_reads_are_not_sealed(run):
    (run / "report.md").write_text("notes")
    (run / "metrics.json").write_text("{}")
    (run / "figures").mkdir()
    assert sealed_names(run) == ["model.json", "model.safetensors"]
    Predictor.load(run)


def test_an_unsealed_model_is_refused_until_sealed(run):
    (run / SEAL_FILE).unlink()
    _refused(run, f"model folder {run} is not sealed", f"run `bloodcell model seal {run}`")
    assert runner.invoke(app, ["model", "seal", str(run)]).exit_code == 0
    Predictor.load(run)


# ---------------------------------------------------------------------------------------- bloodcell model seal / verify


def test_model_seal_after_a_deliberate_edit_says_what_changed_and_loads_again(run):
    old = verify(run)["files"]["model.json"]["sha256"]
    meta = _meta(run)
    meta["review_threshold"] = 0.75
    (run / "model.json").write_text(json.dumps(meta))
    result = runner.invoke(app, ["model", "verify", str(run)])
    assert result.exit_code == 2 and result.stderr.splitlines()[0].startswith(
        f"error: model folder {run}: model.json changed"
    )
    result = runner.invoke(app, ["model", "seal", str(run)])
    assert result.exit_code == 0, result.output
    new = verify(run)["files"]["model.json"]["sha256"]
    assert result.stdout.splitlines() == [
        f"changed  model.json  sha256 {old[:12]} -> {new[:12]}",
        f"sealed {run}: 2 files (1 file changed)",
    ]
    assert Predictor.load(run).review_threshold == 0.75
    result = runner.invoke(app, ["model", "verify", str(run)])
    assert result.exit_code == 0 and result.stdout.startswith(f"OK {run}: 2 files match the seal")


def test_the_bundled_model_and_detector_verify():
    assert sorted(verify(bundled_model_dir())["files"]) == [
        "model.json",
        "model.onnx",
        "model.safetensors",
        "ood.safetensors",
    ]
    assert sorted(verify(bundled_detector_dir())["files"]) == ["detector.json", "detector.onnx"]
    assert runner.invoke(app, ["model", "verify", "default"]).exit_code == 0
    assert runner.invoke(app, ["model", "verify", str(bundled_detector_dir())]).exit_code == 0


def test_writers_leave_sealed_folders(run, tmp_path):
    verify(run)  # save_checkpoint
    with_ood(run)  # write_model_json, as evaluate and adapt use
    assert sorted(verify(run)["files"]) == ["model.json", "model.safetensors", "ood.safetensors"]
    detector = save_detector(create_detector("classical"), tmp_path / "det")
    assert sorted(verify(detector)["files"]) == ["detector.json"]


# ---------------------------------------------------------------------------------------- paths stay inside the folder


@pytest.mark.parametrize(
    "name", ["../ood.safetensors", "/etc/passwd", "sub/ood.safetensors", "..\\ood.safetensors", "link"]
)
def test_ood_file_outside_the_folder_is_refused_naming_the_key(run, monkeypatch, name):
    with_ood(run)
    if name == "link":
        os.symlink("/etc/passwd", run / "link")
    meta = _meta(run)
    meta["ood"]["file"] = name
    (run / "model.json").write_text(json.dumps(meta))
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (opened.append(str(f)), real_open(f, *a, **k))[1])
    import bloodcell.models.ood as ood_mod

    monkeypatch.setattr(ood_mod, "load_ood", lambda *a, **k: pytest.fail("load_ood called"))
    # the seal check finds it (it reads the names model.json gives) ...
    _refused(run, "ood.file", str(run))
    # ... a seal written by hand over it does not help: the loader refuses it too
    if name != "link":
        _forge_seal(run)
        _refused(run, "ood.file", str(run))
    # ... and `bloodcell model seal` will not seal it
    result = runner.invoke(app, ["model", "seal", str(run)])
    assert result.exit_code == 2 and "ood.file" in result.stderr
    assert not any(f.endswith("passwd") for f in opened)


def test_detector_files_stay_inside_their_folder(tmp_path):
    folder = save_detector(create_detector("classical"), tmp_path / "det")
    meta = json.loads((folder / "detector.json").read_text())
    meta["weights"] = "/etc/passwd"
    (folder / "detector.json").write_text(json.dumps(meta))
    _forge_seal(folder)
    with pytest.raises(ModelError, match="weights must be a plain file name"):
        load_detector(folder)


def test_an_edited_detector_is_refused(tmp_path):
    folder = tmp_path / "det"
    shutil.copytree(bundled_detector_dir(), folder)
    meta = json.loads((folder / "detector.json").read_text())
    meta["score_thresholds"]["wbc"] = 0.99
    (folder / "detector.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"^model folder .*det: detector.json changed since it was sealed"):
        load_detector(folder)
    # a server does not start on it (the detector itself loads with the first photograph); a subprocess with a
    # timeout, so that a server that does start fails the test instead of running for ever
    import subprocess
    import sys

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "bloodcell",
            "serve",
            "--detector",
            str(folder),
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "lab"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "detector.json changed since it was sealed" in res.stderr, res.stderr
    assert res.stderr.strip().count("\n") == 0


# ------------------------------------------------------------------------------------------ model_kwargs


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"pretrained": "/etc/passwd"}, "'pretrained' is not an option"),
        ({"checkpoint_path": "x.pth"}, "'checkpoint_path' is not an option"),
        ({"pretrained_cfg": {"url": "https://example.com/w.bin"}}, "'pretrained_cfg' is not an option"),
        ({"depth": 3}, "'depth' is not an option"),
        ({"head_hidden": "64"}, "'head_hidden' must be an integer"),
        ({"norm": "/etc/passwd"}, "'norm' must be one of batch, group, layer"),
        ({"head_dropout": float("nan")}, "'head_dropout' must be a number 0..1"),
        ([1, 2], "must be an object"),
    ],
)
def test_model_kwargs_are_checked_before_the_model_is_built(run, monkeypatch, kwargs, fragment):
    meta = _meta(run)
    meta["model_kwargs"] = kwargs
    write_model_json(run, meta)  # sealed: the check stands behind the seal
    monkeypatch.setattr(registry, "create_model", lambda *a, **k: pytest.fail("create_model called"))
    with pytest.raises(ModelError) as err:
        load_checkpoint(run)
    assert fragment in str(err.value) and "model_kwargs" in str(err.value) and "\n" not in str(err.value)


def test_plain_model_kwargs_still_load(tmp_path):
    from bloodcell.models import create_model, save_checkpoint

    folder = save_checkpoint(
        create_model("cnn", num_classes=3, input_size=32, head_hidden=16, norm="group", widths=(8, 16)),
        tmp_path / "m",
        {"class_names": ["a", "b", "c"]},
    )
    model, _ = load_checkpoint(folder)
    assert model.model_kwargs == {"head_hidden": 16, "norm": "group", "widths": [8, 16]}

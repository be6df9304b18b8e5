"""Reliability: checkpoints that must be refused, from the Python API and from every CLI command that loads one.

Every fault gives a ModelError whose one-line message names the file, and from `predict`, `evaluate` and
`export` exit status 2 with exactly that line on stderr, no traceback and nothing written. Pickle files are
never unpickled: each carries a payload whose unpickling would create a marker file, and the marker must
not exist afterwards (a control shows the payload does create it when unpickled).
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.config import parse_config, save_config
from bloodcell.errors import ModelError
from bloodcell.infer import Predictor
from bloodcell.models import create_model, load_checkpoint, save_checkpoint
from bloodcell.models.seal import seal, verify

from conftest import CLASS_NAMES, SAMPLE, toy_run

runner = CliRunner()
SIZE = 32
IMAGE = sorted((SAMPLE / "basophil").glob("*.jpg"))[0]


class MarkerPayload:
    """Unpickling this object creates the file `marker` (the harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return (Path.touch, (self.marker,))


# ----------------------------------------------------------------------------- helpers


def make_run_dir(directory: Path) -> Path:
    """A run directory as `bloodcell evaluate` wants it: checkpoint + config.yaml (its data is never reached)."""
    save_config(
        parse_config({"model": {"name": "cnn"}, "data": {"root": str(SAMPLE), "input_size": SIZE}}),
        directory / "config.yaml",
    )
    return directory


def assert_refused(path: Path, message: str, tmp_path: Path, *, evaluate_target: Path | None = None) -> None:
    """The API raises ModelError(message); predict, evaluate and export exit 2 with `error: message` only."""
    with pytest.raises(ModelError) as err:
        load_checkpoint(path)
    assert str(err.value) == message
    with pytest.raises(ModelError) as err:
        Predictor.load(path)
    assert str(err.value) == message

    out = tmp_path / "export-out"
    commands = {
        "predict": ["predict", str(IMAGE), "--model", str(path)],
        "export": ["export", str(path), "--onnx", str(out / "model.onnx")],
    }
    if evaluate_target is not None:
        commands["evaluate"] = ["evaluate", str(evaluate_target)]
    for name, argv in commands.items():
        result = runner.invoke(app, argv)
        assert result.exit_code == 2, (name, result.output, repr(result.exception))
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
        assert result.stdout == "", name
        assert result.stderr.splitlines() == [f"error: {message}"], (name, result.stderr)
    assert not out.exists() or list(out.iterdir()) == []  # export wrote nothing, not even a temporary file


@pytest.fixture
def run(tmp_path) -> Path:
    """A cnn run directory (8 classes, 32 px), also usable by `bloodcell evaluate`."""
    return make_run_dir(toy_run(tmp_path / "run", size=SIZE))


def _replace_json(run: Path, other: Path) -> None:
    shutil.copy(other / "model.json", run / "model.json")
    sealed_as_is(run, "model.json")


def sealed_as_is(folder: Path, changed: str) -> None:
    """The seal catches a changed or missing file first, naming it; then the folder is sealed as it is (a tool that
    sealed a broken folder), and the checks behind the seal must still refuse it with their own message."""
    with pytest.raises(
        ModelError,
        match=rf"^model folder {re.escape(str(folder))}: {re.escape(changed)} (changed since it was sealed|is missing)",
    ):
        verify(folder)
    seal(folder)


# ----------------------------------------------------------------------------- checkpoints that do not fit


@pytest.mark.slow
def test_weights_of_another_model(run, tmp_path):
    """resnet50 weights under a model.json that says cnn (files of two runs mixed up)."""
    resnet = create_model("resnet50", num_classes=8, input_size=SIZE)
    save_checkpoint(resnet, tmp_path / "resnet", {"class_names": CLASS_NAMES})
    shutil.copy(tmp_path / "resnet" / "model.safetensors", run / "model.safetensors")
    sealed_as_is(run, "model.safetensors")
    message = f"{run / 'model.json'} names model 'cnn' but model.safetensors holds weights of 'resnet50'"
    assert_refused(run, message, tmp_path, evaluate_target=run)
    # the same weights without the header that names their model: the tensors themselves do not fit
    from safetensors.torch import load_file, save_file

    save_file(load_file(run / "model.safetensors"), run / "model.safetensors")
    sealed_as_is(run, "model.safetensors")
    with pytest.raises(
        ModelError,
        match=rf"^weights {run / 'model.safetensors'} do not fit model 'cnn' named in model.json: "
        rf"\d+ missing, \d+ unexpected",
    ):
        load_checkpoint(run)


def test_another_class_list(run, tmp_path):
    """model.json of a 5-class run beside the weights of an 8-class run."""
    five = save_checkpoint(
        create_model("cnn", num_classes=5, input_size=SIZE), tmp_path / "five", {"class_names": list("abcde")}
    )
    _replace_json(run, five)
    message = f"checkpoint {run}: model.json says 5 classes but the weights have 8 outputs"
    assert_refused(run, message, tmp_path, evaluate_target=run)


def test_class_names_that_disagree_with_num_classes(run, tmp_path):
    meta = json.loads((run / "model.json").read_text())
    meta["class_names"] = CLASS_NAMES[:5]
    (run / "model.json").write_text(json.dumps(meta))
    sealed_as_is(run, "model.json")
    message = f"checkpoint metadata {run / 'model.json'} lists 5 class_names but num_classes is 8"
    assert_refused(run, message, tmp_path, evaluate_target=run)


def test_another_input_size(run, tmp_path):
    """Before: a model.json from a 64 px run was accepted and images were resized to 64 px for a 32 px model."""
    other = save_checkpoint(
        create_model("cnn", num_classes=8, input_size=64), tmp_path / "big", {"class_names": CLASS_NAMES}
    )
    _replace_json(run, other)
    message = (
        f"{run / 'model.json'} says input size 64 but model.safetensors was saved from a model at 32 px; "
        f"the two files come from different checkpoints"
    )
    assert_refused(run, message, tmp_path, evaluate_target=run)


def test_onnx_sidecar_with_another_input_size_or_class_count(run, tmp_path):
    """Before: the mismatch surfaced at the first prediction as an onnxruntime traceback."""
    from bloodcell.infer.export import export_onnx

    onnx = tmp_path / "exported" / "model.onnx"
    export_onnx(run, onnx)
    sidecar = onnx.with_name("model.onnx.json")
    good = json.loads(sidecar.read_text())
    cases = {
        "input_size": (64, f"{sidecar} says input 3 x 64 x 64 but model.onnx takes [3, 32, 32]"),
        "num_classes": (5, f"{sidecar} lists 5 classes but model.onnx outputs [8]"),
    }
    for key, (value, message) in cases.items():
        bad = dict(good, **{key: value})
        if key == "num_classes":
            bad["class_names"] = CLASS_NAMES[:5]
        sidecar.write_text(json.dumps(bad))
        sealed_as_is(sidecar.parent, sidecar.name)
        with pytest.raises(ModelError) as err:
            Predictor.load(onnx)
        assert str(err.value) == message
        result = runner.invoke(app, ["predict", str(IMAGE), "--model", str(onnx)])
        assert result.exit_code == 2 and result.stdout == "" and result.stderr.splitlines() == [f"error: {message}"]


# ----------------------------------------------------------------------------- damaged files


def test_truncated_safetensors(run, tmp_path):
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    sealed_as_is(run, "model.safetensors")
    with pytest.raises(ModelError) as err:
        load_checkpoint(run)
    message = str(err.value)
    assert message.startswith(f"checkpoint weights {weights} are truncated or corrupt (") and "\n" not in message
    assert_refused(run, message, tmp_path, evaluate_target=run)


def test_missing_model_json(run, tmp_path):
    (run / "model.json").unlink()
    sealed_as_is(run, "model.json")
    message = f"checkpoint metadata not found: {run / 'model.json'} (written by save_checkpoint)"
    assert_refused(run, message, tmp_path, evaluate_target=run)
    assert_refused(run / "model.safetensors", message, tmp_path)


def test_corrupt_model_json(run, tmp_path):
    meta = run / "model.json"
    meta.write_text(meta.read_text()[:40])  # cut off mid-write by an old, non-atomic tool
    sealed_as_is(run, "model.json")
    with pytest.raises(ModelError) as err:
        load_checkpoint(run)
    message = str(err.value)
    assert message.startswith(f"checkpoint metadata {meta} is not valid JSON (")
    assert_refused(run, message, tmp_path, evaluate_target=run)
    meta.write_text("[1, 2, 3]")  # valid JSON, not a checkpoint's metadata
    sealed_as_is(run, "model.json")
    assert_refused(run, f"checkpoint metadata {meta} lacks model_name / num_classes", tmp_path, evaluate_target=run)


def test_missing_or_corrupt_onnx_sidecar(run, tmp_path):
    from bloodcell.infer.export import export_onnx

    onnx = tmp_path / "exported" / "model.onnx"
    export_onnx(run, onnx)
    sidecar = onnx.with_name("model.onnx.json")
    sidecar.write_text("{not json")
    sealed_as_is(sidecar.parent, sidecar.name)
    with pytest.raises(ModelError, match=rf"^{sidecar} is not valid JSON \("):
        Predictor.load(onnx)
    sidecar.unlink()
    sealed_as_is(sidecar.parent, sidecar.name)
    message = f"{onnx}: metadata sidecar {sidecar} not found (written by 'bloodcell export')"
    with pytest.raises(ModelError) as err:
        Predictor.load(onnx)
    assert str(err.value) == message
    result = runner.invoke(app, ["predict", str(IMAGE), "--model", str(onnx)])
    assert result.exit_code == 2 and result.stderr.splitlines() == [f"error: {message}"]


# ----------------------------------------------------------------------------- pickles are never loaded


def test_pickle_payload_runs_code_when_unpickled(tmp_path):
    """Control: the payload used below really creates its marker when unpickled."""
    marker = tmp_path / "control-marker"
    torch.save({"weights": MarkerPayload(marker)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert marker.exists()


def test_pt_pickle_file_is_refused_and_never_unpickled(run, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "model.pt"
    torch.save({"head.3.weight": MarkerPayload(marker)}, evil)
    message = (
        f"refusing to load {evil}: pickle-based files can run code when loaded; "
        f"bloodcell checkpoints are a folder with model.safetensors + model.json"
    )
    assert_refused(evil, message, tmp_path)
    result = runner.invoke(app, ["evaluate", str(evil)])
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        f"error: {evil} is not a run directory (no config.yaml)"
    ]
    assert not marker.exists()


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_named_safetensors_is_refused_and_never_unpickled(run, tmp_path, writer):
    """Before: refused as 'truncated or corrupt'; now the message says what the file is."""
    marker = tmp_path / "marker"
    weights = run / "model.safetensors"
    payload = {"head.3.weight": MarkerPayload(marker)}
    if writer == "torch.save":
        torch.save(payload, weights)
    else:
        weights.write_bytes(pickle.dumps(payload, protocol=4))
    sealed_as_is(run, "model.safetensors")
    message = (
        f"refusing to load {weights}: it holds a pickle (torch.save) file, not safetensors; "
        f"pickle-based files can run code when loaded"
    )
    assert_refused(run, message, tmp_path, evaluate_target=run)
    assert_refused(weights, message, tmp_path)
    assert not marker.exists()

"""Which ONNX exporter writes an export: the dynamo one (torch.export + onnxscript), else a visible TorchScript
fallback."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest
import torch

from bloodcell.infer import Predictor
from bloodcell.infer import export as ex
from bloodcell.models.onnx_runtime import onnx_session

from conftest import SAMPLE, toy_run, with_ood

FALLBACK = "warning: ONNX export falls back to the deprecated TorchScript exporter: "


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory):
    """A toy cnn (32 px) with an OOD score: the graph has both outputs, as the bundled model's has."""
    return with_ood(toy_run(tmp_path_factory.mktemp("export") / "run"))


def _images(predictor, n: int = 5) -> np.ndarray:
    files = [sorted(d.glob("*.jpg"))[0] for d in sorted(SAMPLE.iterdir()) if d.is_dir()][:n]
    return predictor.normalise(np.stack([predictor.decode(f) for f in files]))


def _check_against_pytorch(path, predictor) -> None:
    """Batch 5 and five batch-1 runs of the graph give PyTorch's logits and OOD scores, within PARITY_TOLERANCE."""
    x = _images(predictor)
    with torch.no_grad():
        want = [t.numpy() for t in predictor.scored_model(torch.from_numpy(x))]
    session = onnx_session(path)
    five = session.run(None, {"input": x})
    ones = [session.run(None, {"input": x[i : i + 1]}) for i in range(len(x))]
    for k, scale in ((0, 1.0), (1, max(1.0, float(np.abs(want[1]).max())))):  # the OOD score relative to its size
        assert five[k].shape == want[k].shape == (5,) + want[k].shape[1:]
        np.testing.assert_allclose(
            np.concatenate([o[k] for o in ones]), five[k], rtol=0, atol=ex.PARITY_TOLERANCE * scale
        )
        np.testing.assert_allclose(five[k], want[k], rtol=0, atol=ex.PARITY_TOLERANCE * scale)


def test_dynamo_exports_the_ood_model_with_a_dynamic_batch(ood_run, tmp_path, capsys):
    why = ex.dynamo_unavailable()
    if why:
        pytest.skip(f"{why}: the dynamo exporter cannot run (onnxscript is to be a declared dependency)")
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        report = ex.export_onnx(ood_run, tmp_path / "m.onnx")
    assert [str(w.message) for w in shown] == []
    assert report.exporter == "dynamo" and report.fallback_reason is None
    assert report.max_abs_diff <= ex.PARITY_TOLERANCE and report.opset == ex.DEFAULT_OPSET
    assert "warning" not in capsys.readouterr().err  # no fallback line, and none of the exporter's chatter
    side = json.loads(report.sidecar.read_text())["onnx"]
    assert side["exporter"] == "dynamo" and "fallback_reason" not in side and side["opset"] == ex.DEFAULT_OPSET
    # the names Predictor, serve and the int8 calibration read
    assert side["input"] == "input" and side["outputs"] == ["logits", "ood_score"]
    graph = onnx.load(str(report.path)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits", "ood_score"]
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a symbolic batch axis, not a fixed 1
    predictor = Predictor.load(ood_run)
    _check_against_pytorch(report.path, predictor)
    onnx_predictor = Predictor.load(report.path)
    assert onnx_predictor.has_ood and onnx_predictor.backend == "onnxruntime"


def _dynamo_fails(monkeypatch):
    """The dynamo exporter raising, as it does on a model torch.export cannot trace; TorchScript left as it is."""
    real = torch.onnx.export

    def export(*args, dynamo=True, **kwargs):
        if dynamo:
            raise RuntimeError("cannot trace this model\nsecond line of a long message")
        return real(*args, dynamo=dynamo, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export)


@pytest.mark.parametrize(
    "case, reason",
    [
        ("dynamo raises", "dynamo exporter failed: RuntimeError: cannot trace this model"),
        ("opset 17", "opset 17 asked; the dynamo exporter writes opset 18 or later"),
        ("no onnxscript", "onnxscript is not installed (pip install onnxscript)"),
    ],
)
def test_a_fallback_to_torchscript_says_why_in_the_sidecar_and_one_warning_line(
    ood_run, tmp_path, monkeypatch, capsys, case, reason
):
    kwargs = {}
    if case == "no onnxscript":
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a, **k: None if name == "onnxscript" else real(name, *a, **k)
        )
    else:
        monkeypatch.setattr(ex, "dynamo_unavailable", lambda: None)  # as where onnxscript is installed
        if case == "dynamo raises":
            _dynamo_fails(monkeypatch)
        else:
            kwargs["opset"] = 17
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        report = ex.export_onnx(ood_run, tmp_path / "m.onnx", **kwargs)
    assert [str(w.message) for w in shown] == []  # the deprecation notice and the tracer's shape notes are known noise
    assert report.exporter == "torchscript" and report.fallback_reason == reason
    side = json.loads(report.sidecar.read_text())["onnx"]
    assert side["exporter"] == "torchscript" and side["fallback_reason"] == reason
    assert side["opset"] == kwargs.get("opset", ex.DEFAULT_OPSET) == report.opset
    err = capsys.readouterr().err.splitlines()
    assert err == [FALLBACK + reason]  # one line
    _check_against_pytorch(report.path, Predictor.load(ood_run))


def test_the_cli_default_opset_is_the_one_dynamo_writes():
    import inspect

    from bloodcell.cli.model import export_cmd

    assert inspect.signature(export_cmd).parameters["opset"].default.default == ex.DEFAULT_OPSET == ex.DYNAMO_MIN_OPSET


def test_parity_is_relative_to_the_size_of_the_outputs(tmp_path):
    """A correct export of a network with large logits (a deep one's are in the tens, this one's near 1e5) differs
    from PyTorch by float32 rounding, which grows with the values: the check must accept it, and still refuse an
    export that is wrong by a small share of its outputs."""
    from bloodcell.models import create_model
    from bloodcell.models.checkpoint import save_checkpoint

    from conftest import CLASS_NAMES

    torch.manual_seed(0)
    model = create_model("cnn", num_classes=8, input_size=32)
    with torch.no_grad():
        model.head[-1].weight.mul_(1e6)
    run = save_checkpoint(model, tmp_path / "run", {"class_names": CLASS_NAMES})
    report = ex.export_onnx(run, tmp_path / "big.onnx")
    session = onnx_session(tmp_path / "big.onnx")
    logits = session.run(None, {"input": _images(Predictor.load(run))})[0]
    assert np.abs(logits).max() > 1e4 and report.max_abs_diff <= ex.PARITY_TOLERANCE

    want = np.array([[1e5, -2e5, 3.0]], np.float32)
    assert ex.output_difference(want, want + 0.05) == pytest.approx(
        0.05 / 2e5, rel=1e-2
    )  # rounding at this size: accepted
    assert ex.output_difference(want, want * 1.001) > ex.PARITY_TOLERANCE  # 0.1 % off: refused
    small = np.array([[0.5, -0.25]], np.float32)
    assert ex.output_difference(small, small + 2e-4) == pytest.approx(2e-4, rel=1e-3)  # below 1: absolute

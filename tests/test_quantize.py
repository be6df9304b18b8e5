"""int8 static quantization of an exported model (bloodcell.infer.quantize, `bloodcell export --quantize int8`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.errors import BloodcellError, DataError
from bloodcell.infer import Predictor
from bloodcell.infer import quantize as q
from bloodcell.infer.export import export_onnx

from conftest import PBC, SAMPLE, make_tree, needs_pbc, set_ood_threshold, toy_run, with_ood


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A toy run with an OOD score: the int8 graph must keep both outputs.

    Its threshold flags 2 of the 200 sample images, as a real one flags about 1 % of in-distribution cells (the
    bundled model: 0.88 % of its test part); the median threshold of `with_ood` would put half the images beside it,
    where the few % that int8 moves a score flip flags by the dozen.
    """
    run = with_ood(toy_run(tmp_path_factory.mktemp("run") / "run"))
    set_ood_threshold(run, sorted(SAMPLE.rglob("*.jpg")), flagged=2)
    return run


def _labels(predictor) -> list[str]:
    return [p["label"] for p in predictor.predict_paths([SAMPLE], progress=False)["predictions"]]


def test_int8_is_smaller_loads_like_any_onnx_and_agrees_with_fp32(run, tmp_path):
    fp32 = export_onnx(run, tmp_path / "fp32.onnx")
    report = export_onnx(run, tmp_path / "int8.onnx", quantize="int8", calibration_images=64, calibration_dir=SAMPLE)
    assert report.path.stat().st_size < 0.7 * fp32.path.stat().st_size

    int8 = Predictor.load(report.path)
    assert int8.backend == "onnxruntime" and int8.has_ood  # the OOD score survives quantization
    import onnx

    nodes = onnx.load(str(report.path)).graph.node
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in nodes}  # really int8, not the fp32 graph again
    # the OOD score's matrix product stays fp32: a float whitening matrix, and no dequantized input
    dequantized = {o for n in nodes if n.op_type == "DequantizeLinear" for o in n.output}
    (matmul,) = [n for n in nodes if n.name in set(q.fp32_only_nodes(fp32.path)) and n.op_type == "MatMul"]
    weights = {t.name: t for t in onnx.load(str(report.path)).graph.initializer}
    assert not set(matmul.input) & dequantized and weights[matmul.input[1]].data_type == onnx.TensorProto.FLOAT
    a, b = _labels(int8), _labels(Predictor.load(fp32.path))
    assert len(a) == 200 and np.mean([x == y for x, y in zip(a, b)]) >= 0.9

    side = json.loads(report.sidecar.read_text())
    qz = side["quantization"]
    assert qz["mode"] == "int8-static" and qz["calibration"] == f"64 images from {SAMPLE} (--calibration-dir)"
    assert qz["check"]["on"] == f"136 other images from {SAMPLE} (--calibration-dir)" and qz["check"]["images"] == 136
    assert qz["check"]["top1_agreement"] >= q.MIN_AGREEMENT and "ood_flag_agreement" in qz["check"]
    assert side["class_names"] == int8.class_names and side["onnx"]["max_abs_diff"] < 1e-4


def test_calibration_feeds_what_predictor_feeds(run, tmp_path, monkeypatch):
    """The calibration batches are Predictor.decode + Predictor.normalise of the calibration images, nothing else."""
    import onnxruntime.quantization as ortq

    seen = []

    def spy(model_input, model_output, reader, **kwargs):
        while (batch := reader.get_next()) is not None:
            seen.append(batch["input"])

    fp32 = export_onnx(run, tmp_path / "fp32.onnx").path
    monkeypatch.setattr(ortq, "quantize_static", spy)
    p = Predictor.load(run)
    files = sorted(SAMPLE.rglob("*.jpg"))[:40]
    images, bad = q.decode_all(p, files)
    q.quantize_file(p, fp32, tmp_path / "int8.onnx", images, q.QuantSettings())
    got = np.concatenate(seen)
    assert bad == 0 and got.dtype == np.float32 and got.shape == (40, 3, p.input_size, p.input_size)
    np.testing.assert_array_equal(got, p.normalise(np.stack([p.decode(f) for f in files])))


def test_guard_refuses_an_int8_model_that_disagrees(run, tmp_path, monkeypatch):
    """Calibrated on blank images, the activation ranges are far too narrow: the guard must refuse, writing nothing.

    (The toy's top-1 labels survive, its head being sharpened 25-fold; its OOD flags do not, and the guard names them.)
    """
    real = q.quantize_file
    monkeypatch.setattr(
        q, "quantize_file", lambda p, src, out, images, s: real(p, src, out, np.full_like(images, 128), s)
    )
    out = tmp_path / "int8.onnx"
    with pytest.raises(BloodcellError) as err:
        export_onnx(run, out, quantize="int8", calibration_images=64, calibration_dir=SAMPLE)
    msg = str(err.value)
    assert "\n" not in msg and "agrees with fp32 on OOD flags for only" in msg and "nothing written" in msg
    assert str(run) in msg and "--min-agreement" in msg
    assert list(tmp_path.iterdir()) == []


def test_calibration_on_the_validation_part_of_the_recorded_split(tmp_path):
    """Without --calibration-dir the images are the model's validation part: never its test part."""
    from bloodcell.config import parse_config
    from bloodcell.data.discover import scan
    from bloodcell.data.prepare import split_files

    data = make_tree(tmp_path / "data", {"basophil": 30, "eosinophil": 30, "platelet": 30})
    meta = {
        "training_config": {"data": {"root": str(data)}, "seed": 7},
        "data_fingerprint": scan(data, progress=False).fingerprint(),
    }
    cs = q.calibration_set(meta, "toy", n=8, check=4)
    cfg = parse_config(meta["training_config"])
    val, test = split_files(cfg, data, "val")[0], split_files(cfg, data, "test")[0]
    assert len(cs.calibration) == 8 and len(cs.check) == 4 and not set(cs.calibration) & set(cs.check)
    assert set(cs.calibration) | set(cs.check) <= set(val) and not set(cs.calibration) & set(test)
    assert cs.description.startswith("8 validation images of split seed 7 (")

    meta["data_fingerprint"] = "0" * 64  # other data: its split would not be the model's
    with pytest.raises(DataError, match="is not the data the model was trained on"):
        q.calibration_set(meta, "toy")
    with pytest.raises(DataError, match="the training data of toy is not at .*nodata.*--calibration-dir DIR"):
        q.calibration_set(meta, "toy", data_root=tmp_path / "nodata")
    meta["training_config"]["data"]["root"] = None
    with pytest.raises(BloodcellError, match="records no training data folder"):
        q.calibration_set(meta, "toy")


def test_too_few_images_check_on_the_calibration_images(tmp_path):
    folder = make_tree(tmp_path / "few", {"a": 3})
    cs = q.calibration_set({}, "toy", n=10, calibration_dir=folder)
    assert (
        len(cs.calibration) == 3
        and cs.check == cs.calibration
        and cs.check_description == "the 3 calibration images (no others left)"
    )


def test_cli_writes_int8_and_says_what_it_checked(run, tmp_path):
    out = tmp_path / "m.onnx"
    result = CliRunner().invoke(
        app,
        [
            "export",
            str(run),
            "--onnx",
            str(out),
            "--quantize",
            "int8",
            "--calibration-dir",
            str(SAMPLE),
            "--calibration-images",
            "100",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "int8: calibrated on 100 images from" in result.output and "top-1" in result.output
    assert json.loads((tmp_path / "m.onnx.json").read_text())["quantization"]["settings"]["fmt"] == "QDQ"


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--quantize", "int8"], "records no training_config"),  # the toy run: no split, no folder given
        (["--quantize", "int8", "--calibration-dir", "{tmp}/nowhere"], "nowhere is not a folder"),
        (["--quantize", "int4"], "--quantize must be one of int8, got 'int4'"),
        (["--calibration-images", "8"], "only apply with --quantize int8"),
        (["--min-agreement", "0.5"], "only apply with --quantize int8"),
        (["--quantize", "int8", "--calibration-dir", str(SAMPLE), "--data", str(SAMPLE)], "not both"),
        (
            ["--quantize", "int8", "--calibration-images", "0", "--calibration-dir", str(SAMPLE)],
            "--calibration-images must be >= 1",
        ),
        (
            ["--quantize", "int8", "--calibration-dir", str(SAMPLE), "--min-agreement", "1.5"],
            "--min-agreement must be in (0, 1]",
        ),
    ],
)
def test_bad_quantize_input_is_one_line(run, tmp_path, extra, expected):
    out = tmp_path / "m.onnx"
    args = ["export", str(run), "--onnx", str(out)] + [a.replace("{tmp}", str(tmp_path)) for a in extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not out.exists() and not (tmp_path / "m.onnx.json").exists()


@needs_pbc()
def test_bundled_model_calibrates_on_its_validation_part_only():
    """The real split: calibration and check images of the bundled model are validation images, none of its 5,130
    test images."""
    from bloodcell.config import parse_config
    from bloodcell.data.prepare import split_files
    from bloodcell.models.metadata import bundled_model_dir

    meta = json.loads((bundled_model_dir() / "model.json").read_text())
    cs = q.calibration_set(meta, "bundled", data_root=PBC)
    cfg = parse_config(meta["training_config"])
    val, test = split_files(cfg, PBC, "val")[0], split_files(cfg, PBC, "test")[0]
    assert len(test) == meta["bundled"]["test_n"]
    used = set(cs.calibration) | set(cs.check)
    assert (
        len(used) == q.DEFAULT_CALIBRATION_IMAGES + q.DEFAULT_CHECK_IMAGES and used <= set(val) and not used & set(test)
    )
    assert "validation images of split seed 42" in cs.description

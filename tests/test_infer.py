"""Tests for bloodcell.infer: Predictor, result arithmetic, CLI predict/export/explain, ONNX parity, Grad-CAM."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.errors import DataError, ModelError
from bloodcell.infer import Predictor, summarize
from bloodcell.models import metadata as checkpoint_mod
from bloodcell.models import create_model, save_checkpoint
from bloodcell.models.metadata import write_model_json
from bloodcell.models.seal import seal
from conftest import set_ood_threshold, with_ood

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "pbc-sample"
NAMES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
SIZE = 32


def sample_files(n_per_class: int = 1) -> list[Path]:
    return [f for c in NAMES for f in sorted((SAMPLE / c).glob("*.jpg"))[:n_per_class]]


def make_run(directory: Path, seed: int = 0, scale: float = 25.0, force: str | None = None, **meta) -> Path:
    """A tiny untrained cnn; `scale` spreads the logits so temperature matters; `force` makes one class win always."""
    torch.manual_seed(seed)
    model = create_model("cnn", num_classes=len(NAMES), input_size=SIZE)
    last = model.head[-1]
    with torch.no_grad():
        last.weight.mul_(scale)
        if force is not None:
            last.weight.zero_()
            last.bias.zero_()
            last.bias[NAMES.index(force)] = 5.0
    metadata = {"class_names": NAMES, "temperature": 1.3, "review_threshold": 0.6}
    metadata.update(meta)
    return save_checkpoint(model, directory, metadata)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("infer") / "run")


@pytest.fixture(scope="module")
def predictor(run_dir) -> Predictor:
    return Predictor.load(run_dir)


def manual_probs(run_dir: Path, files, temperature: float, interpolation=Image.Resampling.BILINEAR) -> np.ndarray:
    """The whole pipeline written out independently: PIL resize, normalise, forward, softmax(z / T)."""
    from bloodcell.models import load_checkpoint

    model, meta = load_checkpoint(run_dir)
    arrays = [
        np.asarray(Image.open(f).convert("RGB").resize((SIZE, SIZE), interpolation), dtype=np.float32) for f in files
    ]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
    x = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        z = model(x).double().numpy() / temperature
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def prob_matrix(result) -> np.ndarray:
    return np.array([[p["probabilities"][c] for c in NAMES] for p in result["predictions"]])


# ---------------------------------------------------------------------- Predictor


def test_result_shape_and_keys(predictor):
    files = sample_files()
    r = predictor.predict_paths(files, progress=False)
    assert list(r) == [
        "predictions",
        "counted",
        "ood_count",
        "ood_check",
        "counts",
        "percent",
        "wbc_percent",
        "flags",
        "verdict",
        "unreadable",
    ]
    assert r["verdict"] is None  # no OOD score: no folder-level verdict
    assert (
        r["ood_check"] is False and r["counted"] == len(files) and r["ood_count"] == 0
    )  # this toy model has no OOD score
    assert [p["path"] for p in r["predictions"]] == [str(f) for f in files]
    for p in r["predictions"]:
        assert set(p) == {"path", "label", "probabilities", "confidence", "review", "ood", "ood_score"}
        assert p["ood"] is None and p["ood_score"] is None
        assert list(p["probabilities"]) == NAMES
        assert sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
        assert p["confidence"] == p["probabilities"][p["label"]]
        assert isinstance(p["review"], bool)
    assert list(r["counts"]) == NAMES and sum(r["counts"].values()) == len(files)
    assert set(r["wbc_percent"]) == {"basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"}
    assert r["unreadable"] == []
    json.dumps(r)  # plain JSON types only


def test_temperature_and_preprocessing_match_manual_computation(run_dir, predictor):
    files = sample_files(2)
    got = prob_matrix(predictor.predict_paths(files, progress=False))
    np.testing.assert_allclose(got, manual_probs(run_dir, files, 1.3), atol=2e-6)
    # and the temperature really matters for this model: T=1 gives visibly different numbers
    assert np.abs(got - manual_probs(run_dir, files, 1.0)).max() > 1e-2
    assert predictor.temperature == 1.3 and predictor.interpolation == "bilinear"


def test_defaults_when_calibration_absent_and_recorded_interpolation(tmp_path):
    run = make_run(tmp_path / "run", training_config={"data": {"interpolation": "nearest"}})
    meta = json.loads((run / "model.json").read_text())
    del meta["temperature"], meta["review_threshold"]
    write_model_json(run, meta)
    p = Predictor.load(run)
    assert (p.temperature, p.review_threshold, p.interpolation) == (1.0, 0.9, "nearest")
    files = sample_files()[:3]
    got = prob_matrix(p.predict_paths(files, progress=False))
    np.testing.assert_allclose(got, manual_probs(run, files, 1.0, Image.Resampling.NEAREST), atol=2e-6)


def test_review_flag_follows_threshold(run_dir):
    files = sample_files(3)
    conf = np.array(
        [p["confidence"] for p in Predictor.load(run_dir).predict_paths(files, progress=False)["predictions"]]
    )
    threshold = float(np.median(conf))
    r = Predictor.load(run_dir, review_threshold=threshold).predict_paths(files, progress=False)
    review = np.array([p["review"] for p in r["predictions"]])
    np.testing.assert_array_equal(review, conf < threshold)
    assert 0 < review.sum() < len(files)
    with pytest.raises(ModelError, match="threshold"):
        Predictor.load(run_dir, review_threshold=1.5)


def test_counts_percent_and_flags_arithmetic():
    labels = (
        ["neutrophil"] * 12
        + ["lymphocyte"] * 8
        + ["monocyte"] * 4
        + ["eosinophil"] * 2
        + ["ig"] * 3
        + ["erythroblast"] * 1
        + ["platelet"] * 10
    )
    probs = np.full((len(labels), len(NAMES)), 0.02)
    for i, lab in enumerate(labels):
        probs[i, NAMES.index(lab)] = 1 - 0.02 * (len(NAMES) - 1)
    r = summarize([f"c{i}" for i in range(len(labels))], probs, NAMES, 0.9)
    assert r["counts"] == {
        "basophil": 0,
        "eosinophil": 2,
        "erythroblast": 1,
        "ig": 3,
        "lymphocyte": 8,
        "monocyte": 4,
        "neutrophil": 12,
        "platelet": 10,
    }
    assert r["percent"]["ig"] == 7.5 and r["percent"]["neutrophil"] == 30.0 and r["percent"]["platelet"] == 25.0
    assert sum(r["percent"].values()) == pytest.approx(100.0)
    # white cells: 12 + 8 + 4 + 2 + 0 = 26
    assert r["wbc_percent"]["neutrophil"] == round(100 * 12 / 26, 2)
    assert r["wbc_percent"]["eosinophil"] == round(100 * 2 / 26, 2)
    assert sum(r["wbc_percent"].values()) == pytest.approx(100.0, abs=0.02)
    assert r["flags"] == [
        "immature granulocytes present: 3 of 40 cells (7.5%)",
        "erythroblasts (nucleated red cells) present: 1 of 40 cells (2.5%)",
        "the differential rests on 26 white cells (fewer than 100): read the percentages with care",
    ]
    assert all(p["review"] for p in r["predictions"])  # top probability 0.86 < 0.9


def test_review_rule_in_summarize():
    probs = np.array([[0.7, 0.3], [0.5, 0.5], [0.95, 0.05]])
    r = summarize(["a", "b", "c"], probs, ["x", "y"], 0.7)
    assert [p["review"] for p in r["predictions"]] == [False, True, False]
    assert r["wbc_percent"] == {} and r["flags"] == []


def test_no_flags_without_ig_or_erythroblasts():
    probs = np.eye(len(NAMES))[[NAMES.index("neutrophil")] * 3]
    r = summarize(["a", "b", "c"], probs, NAMES, 0.5)
    assert not any("present" in f for f in r["flags"]) and r["wbc_percent"]["neutrophil"] == 100.0
    assert r["flags"] == ["the differential rests on 3 white cells (fewer than 100): read the percentages with care"]


def test_flag_present_when_model_predicts_ig(tmp_path):
    p = Predictor.load(make_run(tmp_path / "ig", force="ig"))
    r = p.predict_paths(sample_files(), progress=False)
    n = len(NAMES)
    assert r["counts"]["ig"] == n
    assert r["flags"] == [f"immature granulocytes present: {n} of {n} cells (100.0%)"]
    assert all(v == 0.0 for v in r["wbc_percent"].values())


def test_unreadable_files_are_listed_not_fatal(tmp_path, predictor):
    good = sample_files()[:2]
    folder = tmp_path / "mixed" / "deeper"
    folder.mkdir(parents=True)
    for f in good:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "text.jpg").write_text("not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "cut.jpg").write_bytes(good[0].read_bytes()[:1500])
    (folder / "notes.txt").write_text("ignored: not an image name")
    r = predictor.predict_paths([tmp_path / "mixed"], progress=False)
    assert sorted(Path(p["path"]).name for p in r["predictions"]) == sorted(f.name for f in good)
    reasons = {Path(u["path"]).name: u["reason"] for u in r["unreadable"]}
    assert set(reasons) == {"text.jpg", "empty.png", "cut.jpg"}
    assert (
        "not an image" in reasons["text.jpg"] and "empty" in reasons["empty.png"] and "truncated" in reasons["cut.jpg"]
    )


def test_predict_images_from_bytes_matches_paths(predictor):
    files = sample_files()[:3]
    by_path = predictor.predict_paths(files, progress=False)
    by_bytes = predictor.predict_images([(f.name, f.read_bytes()) for f in files] + [("x.png", b"\x89PNG junk")])
    assert [p["path"] for p in by_bytes["predictions"]] == [f.name for f in files]
    np.testing.assert_allclose(prob_matrix(by_bytes), prob_matrix(by_path))
    assert by_bytes["unreadable"][0]["path"] == "x.png"


def test_batching_does_not_change_results(predictor):
    files = sample_files(2)
    a = prob_matrix(predictor.predict_paths(files, batch_size=1, progress=False))
    b = prob_matrix(predictor.predict_paths(files, batch_size=64, progress=False))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_load_errors(tmp_path, run_dir, monkeypatch):
    with pytest.raises(ModelError, match="model not found: .*nowhere"):
        Predictor.load(tmp_path / "nowhere")
    monkeypatch.setattr(checkpoint_mod, "BUNDLED_MODEL", ("assets", "no_such_model"))
    with pytest.raises(ModelError, match="no bundled model in this install: pass --model RUN_DIR"):
        Predictor.load(None)
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(b"not onnx")
    with pytest.raises(ModelError, match="is not sealed"):
        Predictor.load(lone)
    seal(tmp_path)
    with pytest.raises(ModelError, match="sidecar"):
        Predictor.load(lone)
    (tmp_path / "lone.onnx.json").write_text((run_dir / "model.json").read_text())
    seal(tmp_path)
    with pytest.raises(ModelError, match="cannot load ONNX model"):
        Predictor.load(lone)
    with pytest.raises(DataError, match="not found"):
        Predictor.load(run_dir).predict_paths([tmp_path / "missing.jpg"], progress=False)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="no image files"):
        Predictor.load(run_dir).predict_paths([tmp_path / "empty_dir"], progress=False)


def test_load_by_safetensors_path(run_dir, predictor):
    files = sample_files()
    a = Predictor.load(run_dir / "model.safetensors").predict_paths(files, progress=False)
    assert [p["label"] for p in a["predictions"]] == [
        p["label"] for p in predictor.predict_paths(files, progress=False)["predictions"]
    ]


# ---------------------------------------------------------------------- CLI predict


runner = CliRunner()


def test_cli_predict_json(run_dir, predictor):
    files = sample_files()[:4]
    res = runner.invoke(app, ["predict", *map(str, files), "--model", str(run_dir), "--format", "json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    want = predictor.predict_paths(files, progress=False)
    # sample cells stay cells (--input auto): the classifier's answer unchanged, plus how the input was read
    assert [p.pop("input") for p in got["predictions"]] == ["cell"] * len(files)
    assert all(p.pop("input_reason") for p in got["predictions"])
    assert (got.pop("fields"), got.pop("field_summary")) == ([], None)
    assert got == json.loads(json.dumps(want))


def test_cli_predict_csv_and_out(tmp_path, run_dir, predictor):
    files = sample_files()[:3]
    out = tmp_path / "sub" / "pred.csv"
    res = runner.invoke(
        app,
        [
            "predict",
            *map(str, files),
            "--model",
            str(run_dir),
            "--format",
            "csv",
            "--out",
            str(out),
            "--threshold",
            "0.95",
        ],
    )
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(io.StringIO(out.read_text())))
    assert rows[0] == ["path", "label", "confidence", "review", "ood", "ood_score"] + [f"p_{c}" for c in NAMES]
    assert len(rows) == 1 + len(files)
    want = predictor.predict_paths(files, progress=False)["predictions"]
    for row, p in zip(rows[1:], want):
        assert row[0] == p["path"] and row[1] == p["label"]
        assert float(row[2]) == pytest.approx(p["confidence"], abs=1e-6)
        assert row[3] == str(p["confidence"] < 0.95).lower()
        assert row[4:6] == ["", ""]  # no OOD score in this model
        assert sum(map(float, row[6:])) == pytest.approx(1.0, abs=1e-4)
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temporary behind


def test_cli_predict_table(run_dir, predictor):
    files = sample_files()[:2]
    res = runner.invoke(app, ["predict", *map(str, files), "--model", str(run_dir)])
    assert res.exit_code == 0, res.output
    assert "differential count (2 cells)" in res.stdout
    assert "no OOD check for this model" in " ".join(res.stdout.split())
    for p in predictor.predict_paths(files, progress=False)["predictions"]:
        assert p["label"] in res.stdout


def test_cli_predict_summary_is_the_table_without_a_row_per_image(run_dir):
    files = sample_files()[:3]
    full = runner.invoke(app, ["predict", *map(str, files), "--model", str(run_dir)])
    summary = runner.invoke(app, ["predict", *map(str, files), "--model", str(run_dir), "--format", "summary"])
    assert summary.exit_code == 0, summary.output
    assert "runner-up" in full.stdout and "runner-up" not in summary.stdout  # the per-image table's column
    assert "differential count (3 cells)" in summary.stdout
    assert set(summary.stdout.splitlines()) <= set(full.stdout.splitlines())  # the same count, lines and flags


# ---------------------------------------------------------------------- OOD in the outputs


@pytest.fixture(scope="module")
def ood_files() -> list[Path]:
    return sample_files()  # one per class


@pytest.fixture(scope="module")
def ood_run_dir(tmp_path_factory, ood_files) -> Path:
    """A toy run with an OOD score whose threshold flags exactly 3 of the 8 `ood_files`."""
    run = with_ood(make_run(tmp_path_factory.mktemp("ood") / "run"))
    set_ood_threshold(run, ood_files, 3)
    return run


def rendered(result: dict, width: int = 250) -> str:
    from rich.console import Console

    from bloodcell.infer.report import tables

    console = Console(file=io.StringIO(), width=width, record=True)
    for item in tables(result, 0.6):
        console.print(item)
    return console.export_text()


def test_cli_predict_csv_has_ood_columns(ood_run_dir, ood_files):
    res = runner.invoke(app, ["predict", *map(str, ood_files), "--model", str(ood_run_dir), "--format", "csv"])
    assert res.exit_code == 0, res.output
    rows = list(csv.reader(io.StringIO(res.stdout)))
    assert rows[0][:6] == ["path", "label", "confidence", "review", "ood", "ood_score"]
    want = Predictor.load(ood_run_dir).predict_paths(ood_files, progress=False)["predictions"]
    assert [r[4] for r in rows[1:]] == [str(p["ood"]).lower() for p in want]
    assert [r[4] for r in rows[1:]].count("true") == 3
    assert [float(r[5]) for r in rows[1:]] == pytest.approx([p["ood_score"] for p in want], abs=1e-3)


def test_cli_predict_table_says_what_the_count_rests_on(ood_run_dir, ood_files):
    res = runner.invoke(app, ["predict", *map(str, ood_files), "--model", str(ood_run_dir)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())  # rich wraps long lines at the terminal width
    assert "differential count (5 of 8 images; 3 OOD not counted)" in text
    assert "3 of 8 images look unlike the cells this model was trained on (OOD)" in text
    assert "no OOD check" not in text
    result = Predictor.load(ood_run_dir).predict_paths(ood_files, progress=False)
    lines = rendered(result).splitlines()
    for p in result["predictions"]:
        row = next(line for line in lines if Path(p["path"]).name in line)
        assert row.rstrip(" │").endswith("OOD") == p["ood"], row  # the OOD column marks exactly the flagged images
    total = next(line for line in lines if line.strip("│ ").startswith("total"))
    assert total.split("│")[2].strip() == "5"


def test_json_output_is_strict_json_with_a_nan_ood_score():
    from bloodcell.infer.report import to_json

    result = summarize(["a.jpg"], np.eye(len(NAMES))[[0]], NAMES, 0.5, ood_scores=np.array([np.nan]), ood_threshold=1.0)
    got = json.loads(to_json(result), parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))
    assert got["predictions"][0]["ood"] is True and got["predictions"][0]["ood_score"] is None


def test_table_when_every_image_is_ood():
    probs = np.eye(len(NAMES))[[0, 4, 6]]
    result = summarize(
        ["a.jpg", "b.jpg", "c.jpg"], probs, NAMES, 0.5, ood_scores=np.array([9.0, 8.0, 7.0]), ood_threshold=1.0
    )
    text = " ".join(rendered(result, 100).split())
    assert "differential count (0 of 3 images; 3 OOD not counted)" in text
    assert "ALL 3 images look unlike the cells this model was trained on (OOD): no cell was counted" in text


def test_cli_predict_errors(tmp_path, run_dir):
    res = runner.invoke(app, ["predict", str(SAMPLE / "ig"), "--model", str(run_dir), "--format", "xml"])
    assert res.exit_code == 2 and "--format must be one of table, summary, csv, json" in res.output
    res = runner.invoke(app, ["predict", str(tmp_path / "gone.jpg"), "--model", str(run_dir)])
    assert res.exit_code == 2 and "gone.jpg" in res.output
    bad = tmp_path / "bad.jpg"
    bad.write_text("text")
    res = runner.invoke(app, ["predict", str(bad), "--model", str(run_dir)])
    assert res.exit_code == 2 and "no readable image" in res.output and "bad.jpg" in res.output


def tiny_image(path: Path, size=(1, 1)) -> Path:
    Image.new("RGB", size, (200, 180, 210)).save(path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "json", "table"])
def test_cli_predict_names_unreadable_inputs_on_stderr_and_exits_3_unless_allowed(tmp_path, run_dir, fmt):
    good = sample_files()[:2]
    bad = tmp_path / "bad.jpg"
    bad.write_text("text")
    tiny = tiny_image(tmp_path / "tiny.png")
    args = ["predict", *map(str, good), str(bad), str(tiny), "--model", str(run_dir), "--format", fmt]
    res = runner.invoke(app, args)
    assert res.exit_code == 3, res.output
    said = [line for line in res.stderr.splitlines() if line.startswith("unreadable: ")]
    assert said == [
        f"unreadable: {bad}: not an image (unrecognised content)",
        f"unreadable: {tiny}: too small to hold a blood cell: 1x1 px (a cell image needs at least 16 px a side)",
    ]
    assert "2 input(s) unreadable: exit status 3" in res.stderr
    if fmt == "csv":  # the readable rows, the columns unchanged
        rows = list(csv.reader(io.StringIO(res.stdout)))
        assert rows[0] == ["path", "label", "confidence", "review", "ood", "ood_score"] + [f"p_{c}" for c in NAMES]
        assert [r[0] for r in rows[1:]] == list(map(str, good))
    elif fmt == "json":
        got = json.loads(res.stdout)
        assert [p["path"] for p in got["predictions"]] == list(map(str, good)) and len(got["unreadable"]) == 2
    else:
        assert "differential count (2 cells)" in res.stdout and "unreadable:" not in res.stdout  # said once, on stderr
    allowed = runner.invoke(app, args + ["--allow-unreadable"])
    assert allowed.exit_code == 0, allowed.output
    assert allowed.stdout == res.stdout
    assert [line for line in allowed.stderr.splitlines() if line.startswith("unreadable: ")] == said


def test_cli_predict_out_file_with_unreadable_inputs_exits_3(tmp_path, run_dir):
    out = tmp_path / "pred.csv"
    bad = tmp_path / "bad.jpg"
    bad.write_text("text")
    res = runner.invoke(
        app,
        ["predict", str(sample_files()[0]), str(bad), "--model", str(run_dir), "--format", "csv", "--out", str(out)],
    )
    assert res.exit_code == 3, res.output
    assert len(out.read_text().splitlines()) == 2 and f"unreadable: {bad}: not an image" in res.stderr
    assert "(1 cells, 0 fields, 1 unreadable)" in res.stderr


def test_cli_predict_help_documents_the_exit_status():
    res = runner.invoke(app, ["predict", "--help"])
    text = " ".join(res.stdout.split())
    assert "--allow-unreadable" in text and "Exit status: 0 all inputs read; 3 some inputs unreadable" in text


@pytest.mark.parametrize("size", [(1, 1), (15, 40), (40, 15)])
def test_images_too_small_to_hold_a_cell_are_unreadable_on_both_backends(tmp_path, predictor, onnx_file, size):
    tiny = tiny_image(tmp_path / "tiny.png", size)
    ok = tiny_image(tmp_path / "ok.png", (16, 16))  # the smallest a cell image may be
    reason = f"too small to hold a blood cell: {size[0]}x{size[1]} px (a cell image needs at least 16 px a side)"
    for p in (predictor, Predictor.load(onnx_file)):
        by_path = p.predict_paths([tiny, ok], progress=False)
        assert [x["path"] for x in by_path["predictions"]] == [str(ok)]
        assert by_path["unreadable"] == [{"path": str(tiny), "reason": reason}]
        by_bytes = p.predict_images([("tiny.png", tiny.read_bytes()), ("ok.png", ok.read_bytes())])
        assert [x["path"] for x in by_bytes["predictions"]] == ["ok.png"]
        assert by_bytes["unreadable"] == [{"path": "tiny.png", "reason": reason}]


def test_cli_predict_of_only_a_tiny_image_is_a_one_line_error(tmp_path, run_dir):
    tiny = tiny_image(tmp_path / "tiny.png")
    res = runner.invoke(app, ["predict", str(tiny), "--model", str(run_dir)])
    assert res.exit_code == 2 and len(res.stderr.splitlines()) == 1
    assert (
        res.stderr.startswith("error: no readable image among 1 file(s)")
        and "too small to hold a blood cell: 1x1 px" in res.stderr
    )


# ---------------------------------------------------------------------- ONNX export


@pytest.fixture(scope="module")
def onnx_file(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    res = runner.invoke(app, ["export", str(run_dir), "--onnx", str(out)])
    assert res.exit_code == 0, res.output
    assert "largest difference vs PyTorch (relative to the outputs' size when above 1) on 8 sample images" in res.output
    return out


def test_export_parity_and_dynamic_batch(onnx_file, run_dir, predictor):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    images = np.stack([predictor.decode(f) for f in sample_files()[:5]])
    x = predictor.normalise(images)
    with torch.no_grad():
        expected = predictor.model(torch.from_numpy(x)).numpy()
    for batch in (x[:1], x):  # batch 1 and batch 5 through the same graph
        got = sess.run(None, {"input": batch})[0]
        assert got.shape == (len(batch), len(NAMES))
        assert np.abs(got - expected[: len(batch)]).max() <= 1e-4
    meta = json.loads(Path(str(onnx_file) + ".json").read_text())
    model_json = json.loads((run_dir / "model.json").read_text())
    assert {k: meta[k] for k in model_json} == model_json
    assert meta["onnx"]["max_abs_diff"] <= 1e-4 and meta["onnx"]["opset"] == 18


def test_predictor_on_onnx_matches_pytorch(onnx_file, predictor):
    files = sample_files(2)
    a = predictor.predict_paths(files, progress=False)
    onnx = Predictor.load(onnx_file)
    assert onnx.backend == "onnxruntime" and onnx.temperature == 1.3 and onnx.review_threshold == 0.6
    b = onnx.predict_paths(files, progress=False)
    assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
    np.testing.assert_allclose(prob_matrix(a), prob_matrix(b), atol=1e-5)


def test_export_fails_and_writes_nothing_when_parity_breaks(tmp_path, run_dir):
    from bloodcell.infer.export import export_onnx

    out = tmp_path / "bad.onnx"
    with pytest.raises(ModelError, match="differs from PyTorch by up to .*nothing written"):
        export_onnx(run_dir, out, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ModelError, match="must end in .onnx"):
        export_onnx(run_dir, tmp_path / "x.bin")


# ---------------------------------------------------------------------- Grad-CAM


def test_explain_writes_pngs(tmp_path, run_dir, predictor):
    a, b = sample_files()[:2]
    twin = tmp_path / "other" / a.name  # same file name in another folder must not overwrite
    twin.parent.mkdir()
    twin.write_bytes(b.read_bytes())
    out = tmp_path / "cams"
    res = runner.invoke(app, ["explain", str(a), str(twin), "--model", str(run_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    written = [Path(line) for line in res.stdout.split()]
    assert [p.name for p in written] == [f"{a.stem}.gradcam.png", f"{a.stem}-2.gradcam.png"]
    for p in written:
        with Image.open(p) as img:
            assert img.format == "PNG" and img.width >= 400
    assert written[0].read_bytes() != written[1].read_bytes()


def test_gradcam_targets_last_feature_map_and_is_normalised(predictor):
    from bloodcell.infer.explain import gradcam, target_layers

    assert target_layers(predictor.model) == [predictor.model.features]
    cams, probs = gradcam(predictor, np.stack([predictor.decode(f) for f in sample_files()[:2]]))
    assert cams.shape == (2, SIZE, SIZE)
    assert cams.min() >= 0 and cams.max() <= 1 and cams.std() > 0
    assert probs.shape == (2, len(NAMES))
    assert all(p.grad is None for p in predictor.model.parameters())  # no gradients left behind


def test_explain_refuses_onnx(onnx_file, tmp_path):
    res = runner.invoke(
        app, ["explain", str(sample_files()[0]), "--model", str(onnx_file), "--out", str(tmp_path / "c")]
    )
    assert res.exit_code == 2 and "Grad-CAM needs the PyTorch model" in res.output


def test_device_option_runs_where_asked_and_refuses_a_missing_gpu_in_one_line(tmp_path):
    import torch
    from typer.testing import CliRunner

    from bloodcell.cli import app
    from bloodcell.errors import ModelError
    from bloodcell.infer.export import export_onnx
    from conftest import toy_run

    run = toy_run(tmp_path / "run")
    images = sorted((SAMPLE / "neutrophil").glob("*.jpg"))[:4]
    on_cpu = Predictor.load(run, device="cpu")
    auto = Predictor.load(run, device="auto")
    assert auto.device == ("cuda" if torch.cuda.is_available() else "cpu")
    np.testing.assert_allclose(
        auto.probabilities(np.stack([auto.decode(p) for p in images])),
        on_cpu.probabilities(np.stack([on_cpu.decode(p) for p in images])),
        atol=1e-4,
    )
    with pytest.raises(ModelError, match="--device must be cpu, cuda, cuda:N or auto, got 'tpu'"):
        Predictor.load(run, device="tpu")
    onnx = export_onnx(run, tmp_path / "m.onnx").path
    assert Predictor.load(onnx, device="cpu").session.get_providers() == ["CPUExecutionProvider"]
    if not torch.cuda.is_available():
        result = CliRunner().invoke(app, ["predict", str(images[0]), "--model", str(run), "--device", "cuda"])
        assert result.exit_code == 2
        assert (
            result.output.strip() == "error: --device cuda: no CUDA device is visible to PyTorch here; use --device cpu"
        )

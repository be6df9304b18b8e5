"""Tests for mutations of the package that the rest of the suite let through (issue 27, docs/reliability.md
"Mutation testing"): each test here fails on its mutant and passes on the real code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bloodcell.errors import DataError, ModelError

from conftest import SAMPLE, toy_run, with_ood

# ---------------------------------------------------------------------------------------------------- data/classes.py


def test_a_name_whose_singular_and_plural_match_two_classes_is_ambiguous_not_the_first():
    """'Neutrophiles' is 'neutrophil' + 'es' and 'neutrophile' + 's': it could be either class, so it is neither."""
    from bloodcell.data.classes import resolve_class

    for classes in (["Neutrophil", "Neutrophile"], ["Neutrophile", "Neutrophil"]):  # not the first, whichever it is
        assert resolve_class("Neutrophiles", classes) is None
        assert resolve_class("neutrophil", classes) == "Neutrophil"  # the exact (normalised) name still decides
    assert resolve_class("cell", ["Cells", "Celles"]) is None  # both singularise to 'cell'
    assert resolve_class("cell", ["Cells", "Blast"]) == "Cells"  # one loose match: taken


def test_a_folder_name_matching_two_model_classes_is_a_one_line_error_asking_for_map():
    from bloodcell.evaluate.folder import match_folders

    with pytest.raises(
        DataError, match=r"class folder 'Neutrophiles' matches no class of the model.*--map 'Neutrophiles=CLASS'"
    ):
        match_folders(["Neutrophiles"], ["Neutrophil", "Neutrophile"])
    assert match_folders(["Neutrophiles"], ["Neutrophil", "Neutrophile"], {"Neutrophiles": "Neutrophile"}) == {
        "Neutrophiles": "Neutrophile"
    }


# ------------------------------------------------------------------------------------------------- evaluate/run.py


def test_the_ood_threshold_is_fitted_on_validation_not_on_test(tmp_path):
    """Test images far from the training cells score high: a threshold set on them would flag nothing of test."""
    from bloodcell.evaluate.ood import fit_mahalanobis, mahalanobis_score, threshold_for
    from bloodcell.evaluate.run import fit_ood_score

    rng = np.random.default_rng(0)
    y = {"train": np.repeat(np.arange(3), 40), "val": np.repeat(np.arange(3), 100), "test": np.repeat(np.arange(3), 30)}
    centres = np.eye(3, 6) * 8

    def part(name, spread, shift):
        feats = (centres[y[name]] + rng.normal(0, spread, (len(y[name]), 6)) + shift).astype(np.float32)
        return rng.normal(0, 1, (len(y[name]), 3)).astype(np.float32), feats

    outputs = {"train": part("train", 1.0, 0.0), "val": part("val", 1.0, 0.0), "test": part("test", 1.0, 6.0)}
    out, (means, precision, threshold) = fit_ood_score(tmp_path, outputs, y, 3, 0.05)
    fitted_means, fitted_precision = fit_mahalanobis(outputs["train"][1], y["train"], 3)
    val_scores = mahalanobis_score(outputs["val"][1], fitted_means, fitted_precision)
    test_scores = mahalanobis_score(outputs["test"][1], fitted_means, fitted_precision)
    assert threshold_for(test_scores, 0.05) > 2 * threshold_for(val_scores, 0.05)  # the two parts disagree
    assert out["threshold"] == threshold == pytest.approx(threshold_for(val_scores, 0.05))
    assert out["val_flagged"] == pytest.approx(0.05, abs=0.01)
    assert out["test_flagged"] > 0.9  # the shifted test part is out of distribution
    assert (tmp_path / out["file"]).is_file()


# ---------------------------------------------------------------------------------------------- models/detector.py


def _counting_case():
    """Per class, 4 true cells and 4 candidates: 2 right boxes (0.9, 0.8) and 2 boxes on empty background (0.7, 0.6).

    Best F1 keeps the 2 right boxes (threshold 0.8: F1 0.67, count 2 of 4); the best count keeps all 4 candidates
    (threshold <= 0.6: count 4 of 4, F1 0.5). Red cells are counted, white cells and platelets are located."""
    from bloodcell.data.fields import FIELD_CLASSES, FieldAnnotation
    from bloodcell.detect.base import Detections

    true_boxes, true_labels, boxes, labels, scores = [], [], [], [], []
    for k in range(len(FIELD_CLASSES)):
        y = 200 * k
        cells = [[x, y, x + 40, y + 40] for x in (0, 100, 200, 300)]
        true_boxes += cells
        true_labels += [k] * 4
        boxes += cells[:2] + [[500, y, 540, y + 40], [600, y, 640, y + 40]]
        labels += [k] * 4
        scores += [0.9, 0.8, 0.7, 0.6]
    truth = FieldAnnotation(Path("x.jpg"), 800, 800, np.array(true_boxes, np.float32), np.array(true_labels, np.int64))
    found = Detections(np.array(boxes, np.float32), np.array(labels, np.int64), np.array(scores, np.float32))
    return [found], [truth]


def test_red_cell_threshold_minimises_count_error_and_white_cell_threshold_maximises_f1():
    from bloodcell.detect.metrics import choose_thresholds

    found, truth = _counting_case()
    t = choose_thresholds(found, truth)
    assert t["rbc"] <= 0.6  # all four red candidates kept: the count is right
    assert 0.7 < t["wbc"] <= 0.8  # only the two right white boxes kept: best F1
    assert 0.7 < t["platelet"] <= 0.8


# -------------------------------------------------------------------------------------------------- infer/export.py


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory):
    return with_ood(toy_run(tmp_path_factory.mktemp("mutants") / "run"))


@pytest.mark.parametrize("output", [0, 1])
def test_a_nan_in_the_exported_graphs_output_fails_the_parity_check(ood_run, tmp_path, monkeypatch, output):
    """NaN compares false with everything: `diff > tol` and `max(diff, nan)` both let it through."""
    import bloodcell.models.onnx_runtime as rt
    from bloodcell.infer import export as ex

    real = rt.onnx_session

    class NaNSession:
        def __init__(self, session):
            self.session = session

        def __getattr__(self, name):
            return getattr(self.session, name)

        def run(self, names, feed):
            outs = [np.array(o, copy=True) for o in self.session.run(names, feed)]
            outs[output].flat[0] = np.nan
            return outs

    monkeypatch.setattr(rt, "onnx_session", lambda path, *a, **k: NaNSession(real(path, *a, **k)))
    with pytest.raises(ModelError, match="differs from PyTorch by up to nan"):
        ex.export_onnx(ood_run, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.onnx.json").exists()
    monkeypatch.setattr(rt, "onnx_session", real)
    assert ex.export_onnx(ood_run, tmp_path / "m.onnx").max_abs_diff <= ex.PARITY_TOLERANCE  # unpatched: exported


def test_output_difference_of_a_nan_is_not_a_small_number():
    from bloodcell.infer.export import PARITY_TOLERANCE, output_difference

    want = np.ones((2, 3), np.float32)
    got = want.copy()
    got[1, 2] = np.nan
    assert not output_difference(want, got) <= PARITY_TOLERANCE


# ----------------------------------------------------------------------------------------------------- serve/app.py

LIMIT_FILES, LIMIT_BYTES = 5, 200_000


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from bloodcell.infer import Predictor
    from bloodcell.serve.app import create_app

    predictor = Predictor.load(toy_run(tmp_path_factory.mktemp("serve") / "run", seed=0))
    return TestClient(create_app(predictor, max_upload_bytes=LIMIT_BYTES, max_pixels=1_000_000, max_files=LIMIT_FILES))


def _cell() -> bytes:
    return sorted((SAMPLE / "neutrophil").glob("*.jpg"))[0].read_bytes()


def _multipart(files: list[bytes], size: int | None = None, boundary: str = "edgeboundary") -> bytes:
    """A multipart body of `files`, padded to exactly `size` bytes with a field the server ignores."""

    def part(headers: str, data: bytes) -> bytes:
        return f"--{boundary}\r\n{headers}\r\n\r\n".encode() + data + b"\r\n"

    body = b"".join(
        part(f'Content-Disposition: form-data; name="files"; filename="c{i}.jpg"', f) for i, f in enumerate(files)
    )
    end = f"--{boundary}--\r\n".encode()
    if size is not None:
        pad_header = 'Content-Disposition: form-data; name="padding"'
        pad = size - len(body) - len(end) - len(part(pad_header, b""))
        assert pad >= 0
        body += part(pad_header, b"p" * pad)
    return body + end


def _post(client, body: bytes, streamed: bool):
    headers = {"content-type": "multipart/form-data; boundary=edgeboundary"}
    if streamed:  # no content-length: the server counts the bytes as they come

        def chunks():
            for i in range(0, len(body), 7_000):
                yield body[i : i + 7_000]

        return client.post("/predict", content=chunks(), headers=headers)
    return client.post("/predict", content=body, headers=headers)


def test_exactly_max_files_files_are_accepted_and_one_more_is_refused(client):
    r = client.post("/predict", files=[("files", (f"c{i}.jpg", _cell(), "image/jpeg")) for i in range(LIMIT_FILES)])
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == LIMIT_FILES
    r = client.post("/predict", files=[("files", (f"c{i}.jpg", _cell(), "image/jpeg")) for i in range(LIMIT_FILES + 1)])
    assert r.status_code == 413 and "too many files" in r.json()["detail"]


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
def test_a_body_of_exactly_max_upload_bytes_is_accepted_and_one_byte_more_is_refused(client, streamed):
    exact = _multipart([_cell()], LIMIT_BYTES)
    assert len(exact) == LIMIT_BYTES
    r = _post(client, exact, streamed)
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 1
    over = _multipart([_cell()], LIMIT_BYTES + 1)
    r = _post(client, over, streamed)
    assert r.status_code == 413 and "upload too large" in r.json()["detail"]


# ------------------------------------------------------------------ survivors of the 20 sampled mutations (issue 27)


def test_the_study_report_names_the_first_ten_skipped_and_dropped_files_with_their_reasons(tmp_path):
    """Sampled mutation 5 (study/report.py): `skipped[:10]` -> `skipped[1:10]` left the first skipped file unnamed."""
    from bloodcell.study.report import Doc, _dataset_section

    skipped = [{"path": f"a/bad{i}.png", "reason": f"reason {i}"} for i in range(12)]
    dropped = [{"path": f"b/twin{i}.png", "reason": "identical copies carry different labels"} for i in range(11)]
    prov = {
        "dataset": {"images": 100, "classes": {"a": 50, "b": 50}, "unreadable": skipped, "dropped_by_split": dropped}
    }
    doc = Doc()
    _dataset_section(doc, tmp_path, prov)
    md = doc.to_markdown(tmp_path)
    assert "12 file(s) skipped" in md and "11 image(s) dropped" in md
    named = [line for line in md.splitlines() if line.startswith("Skipped `")]
    assert named == [f"Skipped `a/bad{i}.png`: reason {i}." for i in range(10)]  # the first ten, in order, no more
    assert [line for line in md.splitlines() if line.startswith("Dropped `")] == [
        f"Dropped `b/twin{i}.png`: identical copies carry different labels." for i in range(10)
    ]


def _prepared(n_per_part=(30, 18, 24), classes=3, size=32, seed=0):
    from bloodcell.data.prepare import PreparedData

    rng = np.random.default_rng(seed)
    n = sum(n_per_part)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % classes
    bounds = np.cumsum((0,) + tuple(n_per_part))
    parts = {p: np.arange(bounds[i], bounds[i + 1]) for i, p in enumerate(("train", "val", "test")) if n_per_part[i]}
    return PreparedData(
        images,
        labels.astype(np.int64),
        [f"c{k}" for k in range(classes)],
        [f"c{labels[i]}/{i}.png" for i in range(n)],
        parts,
    )


def test_evaluate_run_scores_the_training_and_validation_parts_too(tmp_path):
    """Sampled mutation 11 (evaluate/run.py): `if part in logits` negated dropped metrics.json's train and val
    sections."""
    import json

    import torch

    from bloodcell.config import parse_config
    from bloodcell.evaluate.outputs import predict_outputs
    from bloodcell.evaluate.run import evaluate_run
    from bloodcell.models import create_model

    torch.manual_seed(0)
    model = create_model("cnn", num_classes=3, input_size=32)
    data = _prepared()
    cfg = parse_config(
        {"model": {"name": "cnn"}, "data": {"input_size": 32}, "eval": {"bootstrap": 0, "grid_images": 0}}
    )
    metrics = evaluate_run(tmp_path, cfg, data, model, progress=False)
    for part in ("train", "val", "test"):
        logits, _ = predict_outputs(model, data.images, data.parts[part])
        want = float((logits.argmax(1) == data.labels[data.parts[part]]).mean())
        assert metrics[part]["accuracy"] == pytest.approx(want), part
    assert set(json.loads((tmp_path / "metrics.json").read_text())) >= {"train", "val", "test"}
    no_val = _prepared((30, 0, 24))  # no validation part: no val section, and no crash
    metrics = evaluate_run(tmp_path / "no-val", cfg, no_val, model, progress=False)
    assert "train" in metrics and "val" not in metrics and metrics["temperature"] == 1.0


def test_the_left_out_source_is_marked_in_the_per_source_table_and_only_it():
    """Sampled mutation 18 (evaluate/detect.py): `src == left_out` -> `src != left_out` marked every other source."""
    from bloodcell.detect.metrics import detection_metrics, source_table

    found, truth = _counting_case()
    m = detection_metrics(found, truth, {"rbc": 0.5, "wbc": 0.5, "platelet": 0.5})
    table = source_table({"txl": {"labA": m, "labB": m}, "bccd": {"bccd": m}}, left_out="labB")
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert list(rows) == ["txl / labA", "txl / labB (left out)", "bccd"]
    assert "(left out)" not in source_table({"txl": {"labA": m, "labB": m}})


def test_a_run_is_complete_only_when_marked_complete_and_its_metrics_are_written(tmp_path):
    """Sampled mutation 19 (study/experiment.py): `and done` -> `or done` took a run killed after writing metrics.json
    (status still `running`) for finished, skipping it and deleting its resume checkpoints."""
    import json

    from bloodcell.study.experiment import is_complete, remove_stale_checkpoints

    def run(name, state, *files):
        d = tmp_path / name
        (d / "checkpoints").mkdir(parents=True)
        (d / "checkpoints" / "last.ckpt").write_text("{}")
        if state:
            (d / "status.json").write_text(json.dumps({"state": state}))
        for f in files:
            (d / f).write_text("{}")
        return d

    killed = run("killed", "running", "metrics.json")  # killed between metrics.json and status `complete`
    failed = run("failed", "failed", "metrics.json")
    marked = run("marked", "complete")  # complete, yet its metrics are gone
    finished = run("finished", "complete", "metrics.json")
    folds = run("folds", "complete", "aggregate.json")
    assert [is_complete(d) for d in (killed, failed, marked, finished, folds)] == [False, False, False, True, True]
    remove_stale_checkpoints(tmp_path)
    assert [(d / "checkpoints").exists() for d in (killed, failed, marked, finished, folds)] == [
        True,
        True,
        True,
        False,
        False,
    ]

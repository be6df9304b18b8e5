"""Tests for bloodcell.serve: the HTTP API (FastAPI TestClient), its limits and the page."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bloodcell.infer import Predictor
from conftest import CLASS_NAMES, FIXED_COUNTS, field_photo, set_ood_threshold, toy_run, with_ood
from bloodcell.serve.app import create_app
from bloodcell.serve.uploads import clean_name as _clean_name

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "pbc-sample"
NAMES = CLASS_NAMES
TWO = [sorted((SAMPLE / "neutrophil").glob("*.jpg"))[0], sorted((SAMPLE / "lymphocyte").glob("*.jpg"))[0]]
FOUR = [sorted((SAMPLE / c).glob("*.jpg"))[1] for c in ("basophil", "eosinophil", "monocyte", "platelet")]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.load(toy_run(tmp_path_factory.mktemp("run") / "run", seed=0))


@pytest.fixture(scope="module")
def client(predictor) -> TestClient:
    return TestClient(create_app(predictor, max_upload_bytes=200_000, max_pixels=1_000_000, max_files=5))


def upload(*items, field="files"):
    return [(field, (name, data, "application/octet-stream")) for name, data in items]


def sample(path: Path) -> tuple[str, bytes]:
    return path.name, path.read_bytes()


def png_bytes(w: int, h: int) -> bytes:
    """A flat-colour PNG: many pixels in few bytes."""
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 180, 210)).save(buf, format="PNG")
    return buf.getvalue()


def test_health(client, predictor):
    r = client.get("/health")
    assert r.status_code == 200
    h = r.json()
    assert h["status"] == "ok" and h["model"] == "cnn" and h["classes"] == NAMES
    assert h["explain"] is True and h["review_threshold"] == 0.6 and h["max_upload_bytes"] == 200_000
    assert h["ood_check"] is False and h["ood_threshold"] is None


def test_predict_two_sample_images(client, predictor):
    r = client.post("/predict", files=upload(*map(sample, TWO)))
    assert r.status_code == 200, r.text
    got = r.json()
    want = predictor.predict_paths(TWO, progress=False)
    assert [p["path"] for p in got["predictions"]] == [f.name for f in TWO]
    assert [p["label"] for p in got["predictions"]] == [p["label"] for p in want["predictions"]]
    for g, w in zip(got["predictions"], want["predictions"]):
        assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-6)
    assert got["counts"] == want["counts"] and got["wbc_percent"] == want["wbc_percent"] and got["unreadable"] == []
    # a model without an OOD score: nothing flagged, every image counted, and the answer says there was no check
    assert got["ood_check"] is False and got["counted"] == 2 and got["ood_count"] == 0
    assert [(p["ood"], p["ood_score"]) for p in got["predictions"]] == [(None, None)] * 2


@pytest.fixture(scope="module")
def ood_predictor(tmp_path_factory) -> Predictor:
    """A toy model with an OOD score whose threshold flags 2 of the FOUR images."""
    run = with_ood(toy_run(tmp_path_factory.mktemp("ood") / "run", seed=0))
    set_ood_threshold(run, FOUR, 2)
    return Predictor.load(run)


def test_predict_json_carries_ood_and_counts_leave_flagged_images_out(ood_predictor):
    client = TestClient(create_app(ood_predictor))
    h = client.get("/health").json()
    assert h["ood_check"] is True and h["ood_threshold"] == pytest.approx(ood_predictor.ood_threshold)
    r = client.post("/predict", files=upload(*map(sample, FOUR)))
    assert r.status_code == 200, r.text
    got = r.json()
    want = ood_predictor.predict_paths(FOUR, progress=False)
    assert [p["ood"] for p in got["predictions"]] == [p["ood"] for p in want["predictions"]]
    assert [p["ood"] for p in got["predictions"]].count(True) == 2
    assert [p["ood_score"] for p in got["predictions"]] == pytest.approx(
        [p["ood_score"] for p in want["predictions"]], abs=1e-3
    )
    assert all(isinstance(p["ood_score"], float) for p in got["predictions"])
    assert got["ood_check"] is True and got["ood_count"] == 2 and got["counted"] == 2
    counted = [p["label"] for p in got["predictions"] if not p["ood"]]
    assert got["counts"] == {c: counted.count(c) for c in NAMES} and sum(got["counts"].values()) == 2
    assert got["flags"][0] == "2 of 4 images look unlike the cells this model was trained on (OOD): not counted"


def test_non_finite_ood_score_is_null_not_a_server_error(ood_predictor, monkeypatch):
    def nan_scores(items, *args, **kwargs):  # Predictor.classify: what /predict runs on the uploads
        names = [n for n, _ in items]
        return names, np.eye(len(NAMES))[[0] * len(names)], np.full(len(names), np.nan), []

    monkeypatch.setattr(ood_predictor, "classify", nan_scores)
    r = TestClient(create_app(ood_predictor)).post("/predict", files=upload(sample(TWO[0])))
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["ood"] is True and r.json()["predictions"][0]["ood_score"] is None


# ---------------------------------------------------------------- smear-field photographs (?input=)


@pytest.fixture
def field_client(predictor, fixed_detector) -> TestClient:
    return TestClient(create_app(predictor, detector=fixed_detector))


def photo(tmp_path: Path, name: str, seed: int = 0, size=(640, 480), blank: bool = False) -> tuple[str, bytes]:
    return name, field_photo(tmp_path / f"{seed}-{name}", size, seed, blank).read_bytes()


def test_input_field_returns_every_cell_with_its_box_and_summed_counts(
    field_client, fixed_detector, predictor, tmp_path
):
    a, b = photo(tmp_path, "a.jpg", 1), photo(tmp_path, "b.jpg", 2, size=(800, 600))
    r = field_client.post("/predict?input=field", files=upload(a, b))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["predictions"] == [] and got["unreadable"] == []
    assert [f["path"] for f in got["fields"]] == ["a.jpg", "b.jpg"]
    assert [f["size"] for f in got["fields"]] == [[640, 480], [800, 600]]
    for f, (name, data) in zip(got["fields"], (a, b)):
        assert f["input"] == "field" and f["input_reason"] and f["note"] == ""
        # the boxes are the detector's, at its operating thresholds, in the photograph's pixels
        det = fixed_detector.detect([np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))])[0]
        want = sorted((FIELD_KINDS[int(k)], [round(float(v), 1) for v in box]) for k, box in zip(det.labels, det.boxes))
        assert sorted((c["kind"], c["box"]) for c in f["cells"]) == want
        assert f["counts"] == FIXED_COUNTS and len(f["cells"]) == sum(FIXED_COUNTS.values())
        (wbc,) = [c for c in f["cells"] if c["kind"] == "wbc"]
        assert wbc["path"] == f"{name}#wbc1" and wbc["label"] in NAMES and wbc["crop_side"] > 0
        assert sum(wbc["probabilities"].values()) == pytest.approx(1, abs=1e-4)
        assert wbc["confidence"] == pytest.approx(max(wbc["probabilities"].values()))
        assert f["wbc_classes"] == {c: int(c == wbc["label"]) for c in NAMES}
        assert all(c["score"] == pytest.approx(0.9) for c in f["cells"])
    s = got["field_summary"]
    assert s["photos"] == 2
    assert s["totals"] == {k: sum(f["counts"][k] for f in got["fields"]) for k in ("rbc", "wbc", "platelet")}
    assert s["totals"] == {k: 2 * n for k, n in FIXED_COUNTS.items()}
    assert s["per_photo"] == {k: float(n) for k, n in FIXED_COUNTS.items()}
    labels = [c["label"] for f in got["fields"] for c in f["cells"] if c["kind"] == "wbc"]
    assert s["wbc_counted"] == 2 and s["wbc_ood"] == 0
    assert s["differential"] == {c: labels.count(c) for c in NAMES}
    wbc_labels = [c for c in labels if c in s["differential_percent"]]
    for c, p in s["differential_percent"].items():
        assert p == pytest.approx(100 * wbc_labels.count(c) / len(wbc_labels) if wbc_labels else 0.0, abs=0.05)


FIELD_KINDS = ("rbc", "wbc", "platelet")


def test_input_auto_tells_a_cell_crop_from_a_field(field_client, tmp_path):
    r = field_client.post("/predict", files=upload(sample(TWO[0]), photo(tmp_path, "smear.jpg")))
    assert r.status_code == 200, r.text
    got = r.json()
    assert [p["path"] for p in got["predictions"]] == [TWO[0].name]
    assert got["predictions"][0]["input"] == "cell" and "single-cell crop" in got["predictions"][0]["input_reason"]
    assert [f["path"] for f in got["fields"]] == ["smear.jpg"] and got["field_summary"]["photos"] == 1
    assert got["fields"][0]["input_reason"].startswith("the detector found 1 white, 4 red cells, 1 platelets")


def test_input_cell_returns_no_fields(field_client, tmp_path):
    r = field_client.post("/predict?input=cell", files=upload(photo(tmp_path, "smear.jpg"), sample(TWO[0])))
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["fields"] == [] and got["field_summary"] is None
    assert [p["path"] for p in got["predictions"]] == ["smear.jpg", TWO[0].name]
    assert {(p["input"], p["input_reason"]) for p in got["predictions"]} == {("cell", "--input cell")}


def test_blank_photograph_is_an_answer_with_no_cells_found(field_client, tmp_path):
    r = field_client.post("/predict?input=field", files=upload(photo(tmp_path, "blank.jpg", blank=True)))
    assert r.status_code == 200, r.text
    got = r.json()
    (f,) = got["fields"]
    assert f["note"] == "no cells found" and f["cells"] == [] and f["counts"] == {"rbc": 0, "wbc": 0, "platelet": 0}
    assert f["wbc_classes"] == {c: 0 for c in NAMES}
    s = got["field_summary"]
    assert s["photos"] == 1 and s["totals"] == {"rbc": 0, "wbc": 0, "platelet": 0} and s["wbc_counted"] == 0
    assert set(s["differential"].values()) == {0}


@pytest.mark.parametrize("query", ["input=xyz", "input=", "input=FIELD"])
def test_bad_input_kind_is_422(field_client, query):
    r = field_client.post(f"/predict?{query}", files=upload(sample(TWO[0])))
    assert r.status_code == 422 and "input" in r.text


def test_server_without_detector_reads_cells_and_refuses_fields(predictor, tmp_path):
    # auto: the detector cannot be loaded, every image is read as a cell (and says why); field: 503, not a crash
    client = TestClient(
        create_app(
            predictor, max_upload_bytes=200_000, max_pixels=1_000_000, max_files=5, detector=tmp_path / "no-detector"
        )
    )
    photo = ("smear.jpg", field_photo(tmp_path / "smear.jpg").read_bytes())  # rectangular: a field candidate
    r = client.post("/predict", files=upload(photo))
    assert r.status_code == 200, r.text
    assert r.json()["fields"] == [] and "no field detector" in r.json()["predictions"][0]["input_reason"]
    r = client.post("/predict?input=field", files=upload(sample(TWO[0])))
    assert r.status_code == 503 and "detector" in r.json()["detail"]


def test_content_is_sniffed_not_the_name(client):
    name, data = sample(TWO[0])
    r = client.post("/predict", files=[("files", ("cell.txt", data, "text/plain"))])
    assert r.status_code == 200 and r.json()["predictions"][0]["path"] == "cell.txt"


@pytest.mark.parametrize(
    "name, data, reason",
    [
        ("notes.jpg", b"just some text, not a picture", "not an image"),
        ("cut.jpg", TWO[0].read_bytes()[:1500], "truncated"),
        ("empty.png", b"", "empty file"),
    ],
)
def test_single_bad_upload_is_422_naming_the_file(client, name, data, reason):
    r = client.post("/predict", files=upload((name, data)))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert name in detail and reason in detail


def test_bad_upload_beside_good_ones_is_listed(client):
    r = client.post("/predict", files=upload(sample(TWO[0]), ("notes.jpg", b"text")))
    assert r.status_code == 200
    body = r.json()
    assert [p["path"] for p in body["predictions"]] == [TWO[0].name]
    assert body["unreadable"] == [{"path": "notes.jpg", "reason": "not an image (unrecognised content)"}]


def test_an_upload_too_small_to_hold_a_cell_is_listed_not_classified(client):
    r = client.post("/predict", files=upload(sample(TWO[0]), ("dot.png", png_bytes(1, 1))))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [p["path"] for p in body["predictions"]] == [TWO[0].name]
    assert body["unreadable"] == [
        {
            "path": "dot.png",
            "reason": "too small to hold a blood cell: 1x1 px (a cell image needs at least 16 px a side)",
        }
    ]
    alone = client.post("/predict", files=upload(("dot.png", png_bytes(1, 1))))
    assert alone.status_code == 422 and "too small to hold a blood cell" in alone.json()["detail"]


def test_oversize_upload_is_413(client):
    r = client.post("/predict", files=upload(("big.png", b"\0" * 250_000)))
    assert r.status_code == 413
    assert "upload too large" in r.json()["detail"] and "MB" in r.json()["detail"]


def test_oversize_without_content_length_is_413(client):
    def chunks():
        for _ in range(30):
            yield b"x" * 10_000

    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=abc"})
    assert r.status_code == 413


def test_too_many_pixels_is_422(client):
    data = png_bytes(1100, 1000)
    assert len(data) < 200_000  # under the byte limit: the pixel limit must be what stops it
    r = client.post("/predict", files=upload(("huge.png", data)))
    assert r.status_code == 422
    assert "huge.png" in r.json()["detail"] and "too many pixels" in r.json()["detail"]


def test_too_many_files_is_413(client):
    r = client.post("/predict", files=upload(*[sample(TWO[0])] * 6))
    assert r.status_code == 413 and "too many files" in r.json()["detail"]


def test_missing_files_field_is_422(client):
    r = client.post("/predict", files=upload(sample(TWO[0]), field="image"))
    assert r.status_code == 422 and "'files'" in r.json()["detail"]
    r = client.post("/predict")
    assert r.status_code == 422
    r = client.post("/predict", data={"files": "not a file"})
    assert r.status_code == 422


def test_malformed_multipart_is_400(client):
    headers = {"content-type": "multipart/form-data; boundary=abc"}
    r = client.post("/predict", content=b"garbage\r\n\r\n", headers=headers)
    assert r.status_code == 400 and "malformed multipart body" in r.json()["detail"]
    r = client.post("/predict", content=b"--abc\r\nbad header line\r\n\r\nxx\r\n--abc--\r\n", headers=headers)
    assert r.status_code == 400


def test_file_names_are_only_echoed(client, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    name, data = sample(TWO[0])
    r = client.post("/predict", files=upload(("../../evil.jpg", data)))
    assert r.status_code == 200
    assert r.json()["predictions"][0]["path"] == "../../evil.jpg"
    assert list(tmp_path.iterdir()) == [] and not (tmp_path.parent.parent / "evil.jpg").exists()
    assert _clean_name(" a\x00b\x1f\x7fc.jpg\n") == "abc.jpg" and len(_clean_name("x" * 500)) == 200


def test_explain_returns_png(client):
    r = client.post("/explain", files=upload(sample(TWO[0]), field="file"))
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == "PNG" and img.width >= 400
    bad = client.post("/explain", files=upload(("x.jpg", b"nope"), field="file"))
    assert bad.status_code == 422 and "x.jpg" in bad.json()["detail"]
    two = client.post("/explain", files=upload(*map(sample, TWO), field="file"))
    assert two.status_code == 422 and "exactly one" in two.json()["detail"]


def test_explain_on_onnx_model_is_501(predictor, tmp_path):
    from bloodcell.infer.export import export_onnx

    report = export_onnx(predictor.source, tmp_path / "m.onnx")
    onnx_client = TestClient(create_app(Predictor.load(report.path)))
    assert onnx_client.get("/health").json()["explain"] is False
    r = onnx_client.post("/explain", files=upload(sample(TWO[0]), field="file"))
    assert r.status_code == 501 and "PyTorch" in r.json()["detail"]
    assert onnx_client.post("/predict", files=upload(sample(TWO[0]))).status_code == 200


def test_page_and_static_assets(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="file-input"' in r.text and "/static/app.js" in r.text
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert "http://" not in r.text and "https://" not in r.text  # no external assets
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        a = client.get(f"/static/{asset}")
        assert a.status_code == 200 and kind in a.headers["content-type"]
        text = a.text.replace('"http://www.w3.org/2000/svg"', "")  # the SVG namespace is a name, never fetched
        assert "http://" not in text and "https://" not in text
    assert client.get("/static/../app.py").status_code == 404


def test_the_model_version_is_the_digest_the_seal_records_for_the_description_it_was_read_from(tmp_path):
    from types import SimpleNamespace

    from bloodcell.models.seal import file_sha256, seal
    from bloodcell.serve.app import model_version

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.json").write_text('{"model_name": "x", "num_classes": 2}')
    (folder / "model.onnx").write_bytes(b"a graph")
    (folder / "model.onnx.json").write_text('{"model_name": "x", "num_classes": 2, "onnx": {}}')
    seal(folder)
    assert model_version(SimpleNamespace(source=str(folder), metadata={})) == file_sha256(folder / "model.json")
    onnx = SimpleNamespace(source=str(folder / "model.onnx"), metadata={})
    assert model_version(onnx) == file_sha256(folder / "model.onnx.json")  # an export's sidecar describes it
    assert len(model_version(SimpleNamespace(source="", metadata={"model_name": "x"}))) == 12  # no folder: no seal


def test_openapi_documents_the_endpoints(client):
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/explain", "/health"} <= set(spec["paths"])
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["files"]
    assert client.get("/docs").status_code == 200


def test_serve_on_a_port_in_use_is_a_one_line_error_naming_it(predictor):
    import socket

    from typer.testing import CliRunner

    from bloodcell.cli import app

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--model", str(predictor.source), "--port", str(port)])
    assert result.exit_code == 2
    assert f"error: cannot listen on 127.0.0.1:{port}:" in result.output and "in use" in result.output

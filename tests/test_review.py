"""The review workstation's store, count, report, export and API (bloodcell.review, serve.review_api).

Store tests write real SQLite databases with generated cell images; API tests run the bundled model (its ONNX export)
behind FastAPI's TestClient. The browser test of a whole sample is tests/test_review_browser.py.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from bloodcell.cli import app as cli
from bloodcell.review.counting import CountedCell, count
from bloodcell.review.export import export_zip, write_export
from bloodcell.review.report import render_report
from bloodcell.review.records import DATABASE_FILE, Conflict, NewCell, NewUpload, NotFound, ReviewError, StoreDamaged
from bloodcell.review.store import ReviewStore
from bloodcell.models.seal import read_seal
from conftest import CLASS_NAMES, SAMPLE, FixedDetector, field_photo

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
MODEL = {"name": "toy", "version": "abc123", "bloodcell": "0.1.0"}


def png(seed: int, side: int = 40) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(arr).save(out, "PNG")
    return out.getvalue()


def new_cell(label: str, i: int = 0, ood: bool = False, review: bool = False) -> NewCell:
    return NewCell(
        name=f"cell{i}.png",
        label=label,
        probabilities={label: 0.9},
        confidence=0.9,
        review=review,
        ood=ood,
        ood_score=1.0,
        image=png(i),
        image_type="image/png",
        thumb=b"jpeg",
    )


def upload(labels: list[str], ood: set[int] = frozenset(), review: set[int] = frozenset()) -> NewUpload:
    cells = [new_cell(label, i, i in ood, i in review) for i, label in enumerate(labels)]
    return NewUpload("cells", "cell", 40, 40, b"raw", cells)


@pytest.fixture
def store(tmp_path) -> ReviewStore:
    return ReviewStore(tmp_path / "lab", "toy", CLASS_NAMES)


def sample_with(store: ReviewStore, labels: list[str], sample_id: str = "S-1", **kw) -> list[dict]:
    store.create_sample(sample_id, "AB")
    store.add_upload(sample_id, upload(labels, **kw))
    return store.cells(sample_id)


# ---------------------------------------------------------------------- the count


def test_the_count_is_written_in_clinical_order_with_nucleated_red_cells_per_100_white_cells():
    labels = (
        ["basophil"]
        + ["monocyte"] * 10
        + ["neutrophil"] * 60
        + ["ig"] * 4
        + ["lymphocyte"] * 25
        + ["erythroblast"] * 5
        + ["platelet"] * 7
        + ["smudge"] * 3
        + ["artefact"] * 2
        + ["eosinophil"] * 0
    )
    res = count([CountedCell(label) for label in labels], wbc_count=8.0)
    wbc = [r for r in res["rows"] if r["kind"] == "wbc"]
    assert [r["label"] for r in wbc] == ["neutrophil", "lymphocyte", "monocyte", "basophil", "ig"]
    assert res["wbc_total"] == 100 and [r["percent"] for r in wbc] == [60.0, 25.0, 10.0, 1.0, 4.0]
    assert [r["absolute"] for r in wbc] == [4.8, 2.0, 0.8, 0.08, 0.32]
    others = {r["label"]: r for r in res["rows"] if r["kind"] != "wbc"}
    assert list(others) == ["nrbc", "platelet", "smudge", "artefact"]
    assert others["nrbc"]["percent"] == 5.0 == res["nrbc_per_100_wbc"] and others["platelet"]["percent"] is None
    # the analyser's count includes the nucleated red cells: 8.0 x 100 / 105
    assert res["wbc_count_corrected"] == pytest.approx(7.619, abs=1e-3)
    assert any(f.startswith("Immature granulocytes: 4 (4.0% of white cells)") for f in res["flags"])
    assert any(f.startswith("Nucleated red cells: 5 (5.0 per 100 white cells)") and "7.619" in f for f in res["flags"])
    assert not any("fewer than 100" in f for f in res["flags"])


def test_a_model_s_plural_or_capitalised_class_names_fall_in_the_clinical_rows():
    res = count(
        [
            CountedCell(n)
            for n in ["Neutrophils", "LYMPHOCYTE", "Erythroblasts", "Band neutrophil", "reactive lymphocyte"]
        ],
        {"reactive lymphocyte": "wbc"},
    )
    assert [(r["label"], r["cells"]) for r in res["rows"]] == [
        ("neutrophil", 2),
        ("lymphocyte", 1),
        ("reactive lymphocyte", 1),
        ("nrbc", 1),
    ]


def test_a_cell_unlike_the_training_cells_counts_only_once_a_person_labels_it():
    cells = [
        CountedCell("neutrophil", ood=True),
        CountedCell("neutrophil", ood=True, reviewed=True),
        CountedCell("lymphocyte"),
    ]
    res = count(cells)
    assert res["wbc_total"] == 2 and res["not_counted_ood"] == 1
    assert any("1 of 3 cells (33%) look unlike" in f for f in res["flags"])
    assert any("rests on 2 white cells (fewer than 100)" in f for f in res["flags"])
    assert any(f.startswith("Blasts") for f in count([CountedCell("blast")])["flags"])


# ---------------------------------------------------------------------- corrections


def test_two_tabs_on_one_sample_cannot_overwrite_each_other_silently(store):
    cell = sample_with(store, ["neutrophil", "lymphocyte"])[0]
    first = store.relabel("S-1", cell["id"], "monocyte", "AB", rev=cell["rev"])  # tab 1, made on revision 0
    assert first["label"] == "monocyte" and first["reviewed"] and first["rev"] == 1
    with pytest.raises(Conflict, match=r"cell \d+ was changed by AB .* it is now 'monocyte'"):
        store.relabel("S-1", cell["id"], "basophil", "CD", rev=cell["rev"])  # tab 2 still shows revision 0
    assert store.cell("S-1", cell["id"])["label"] == "monocyte"
    assert [(c["before"], c["after"], c["who"]) for c in store.corrections("S-1")] == [("neutrophil", "monocyte", "AB")]


def test_undo_gives_back_the_label_and_refuses_when_someone_changed_the_cell_since(store):
    a, b = sample_with(store, ["neutrophil", "lymphocyte"])
    store.relabel("S-1", a["id"], "smudge", "AB")
    store.relabel("S-1", b["id"], "artefact", "AB")
    undone = store.undo("S-1", "AB")  # the last of AB's changes first
    assert undone["id"] == b["id"] and undone["label"] == "lymphocyte" and not undone["reviewed"]
    store.relabel("S-1", a["id"], "monocyte", "CD")  # CD changed the cell of AB's remaining change
    with pytest.raises(Conflict, match="was changed by CD"):
        store.undo("S-1", "AB")
    assert store.cell("S-1", a["id"])["label"] == "monocyte"
    with pytest.raises(Conflict, match="nothing of 'EF' to undo"):
        store.undo("S-1", "EF")


def test_a_label_is_a_class_of_the_model_a_review_label_or_one_of_the_lab_s(store):
    cell = sample_with(store, ["neutrophil"])[0]
    with pytest.raises(ReviewError, match="label 'giant platelet' is not a class here"):
        store.relabel("S-1", cell["id"], "giant platelet", "AB")
    store.add_lab_class("giant platelet", "other")
    store.add_lab_class("reactive lymphocyte")
    with pytest.raises(ReviewError, match="already a class"):
        store.add_lab_class("Neutrophils")
    store.relabel("S-1", cell["id"], "giant platelet", "AB")
    assert store.count("S-1")["rows"][0]["kind"] == "other" and store.count("S-1")["wbc_total"] == 0
    again = ReviewStore(store.folder, "toy", CLASS_NAMES)  # kept in the database
    assert again.lab_classes() == {"giant platelet": "other", "reactive lymphocyte": "wbc"}
    assert again.labels()[:8] == [
        "neutrophil",
        "lymphocyte",
        "monocyte",
        "eosinophil",
        "basophil",
        "ig",
        "erythroblast",
        "platelet",
    ]
    assert again.labels()[8:] == ["unidentified", "smudge", "artefact", "giant platelet", "reactive lymphocyte"]


# ---------------------------------------------------------------------- sign-off and versions


def test_a_signed_off_sample_is_locked_and_a_change_needs_a_reason_and_makes_a_new_version(store):
    cell = sample_with(store, ["neutrophil"] * 3 + ["ig"])[0]
    rev = store.sample("S-1")["rev"]
    store.relabel("S-1", cell["id"], "lymphocyte", "AB")
    with pytest.raises(Conflict, match="changed since you loaded it"):
        store.sign_off("S-1", "AB", rev=rev)
    signed = store.sign_off("S-1", "AB", rev=store.sample("S-1")["rev"])
    assert signed["status"] == "signed" and signed["version"] == 1
    for change in (
        lambda: store.relabel("S-1", cell["id"], "monocyte", "AB"),
        lambda: store.undo("S-1", "AB"),
        lambda: store.add_upload("S-1", upload(["neutrophil"])),
        lambda: store.update_sample("S-1", "AB", note="x"),
    ):
        with pytest.raises(Conflict, match="signed off \\(version 1\\): reopen it with a reason"):
            change()
    with pytest.raises(ReviewError, match="reason"):
        store.reopen("S-1", "AB", "  ")
    v2 = store.reopen("S-1", "CD", "cell 1 is a monocyte on second look")
    assert v2["status"] == "open" and v2["version"] == 2
    store.relabel("S-1", cell["id"], "monocyte", "CD")
    store.sign_off("S-1", "CD")
    history = store.history("S-1")
    assert [(h["version"], h["action"], h["who"]) for h in history] == [
        (1, "signed", "AB"),
        (2, "reopened", "CD"),
        (2, "signed", "CD"),
    ]
    # each sign-off keeps the count it signed: version 1 had a lymphocyte, version 2 a monocyte
    rows = [
        {r["label"]: r["cells"] for r in h["snapshot"]["count"]["rows"]} for h in history if h["action"] == "signed"
    ]
    assert rows[0]["lymphocyte"] == 1 and "monocyte" not in rows[0] and rows[1]["monocyte"] == 1
    report = render_report(store, "S-1", MODEL)
    assert "Signed off by CD" in report and "cell 1 is a monocyte on second look" in report and "(version 2)" in report
    assert "abc123" in report and "not a diagnosis" in report and "DRAFT" not in report


def test_an_open_sample_s_report_is_a_draft_with_the_count_and_flags(store):
    sample_with(store, ["neutrophil"] * 5 + ["ig"])
    store.update_sample("S-1", "AB", wbc_count=6.0, note="<b>bold</b> note")
    report = render_report(store, "S-1", MODEL)
    assert "DRAFT: not signed off" in report and "Immature granulocytes: 1" in report
    assert "&lt;b&gt;bold&lt;/b&gt;" in report and "<b>bold</b>" not in report  # a note is text, never markup
    assert "5.00" in report  # 5 of 6 white cells at 6.0 x10^9/L
    with pytest.raises(ReviewError, match="wbc_count"):
        store.update_sample("S-1", "AB", wbc_count=-1)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "bad", ["../etc", "a/b", "", "x" * 65, "a\x00b", "<script>", "Ünïcode", " lead", "-dash", "a b"]
)
def test_a_sample_id_with_odd_characters_is_one_clear_line_and_nothing_saved_is_lost(store, bad):
    sample_with(store, ["neutrophil"])
    with pytest.raises(ReviewError) as info:
        store.create_sample(bad, "AB")
    message = str(info.value)
    assert message.startswith("sample ID") and "\n" not in message and "\x00" not in message and len(message) < 200
    assert [s["sample_id"] for s in store.samples()] == ["S-1"] and len(store.cells("S-1")) == 1


def test_a_duplicate_sample_id_and_an_unknown_one_are_refused(store):
    sample_with(store, ["neutrophil"])
    with pytest.raises(Conflict, match="exists already"):
        store.create_sample("S-1", "AB")
    with pytest.raises(NotFound, match="no sample 'S-2'"):
        store.cells("S-2")
    with pytest.raises(ReviewError, match="who"):
        store.create_sample("S-3", " ")


def test_a_damaged_database_is_refused_naming_the_file_and_left_as_it_is(tmp_path):
    folder = tmp_path / "lab"
    store = ReviewStore(folder, "toy", CLASS_NAMES)
    sample_with(store, ["neutrophil"] * 3)
    store.close()
    db = folder / DATABASE_FILE
    good = db.read_bytes()
    assert len(good) > 4096
    # a wrecked file: garbage over its pages after the header
    damaged = good[:100] + bytes(range(256)) * ((len(good) - 100) // 256 + 1)
    db.write_bytes(damaged[: len(good)])
    for wal in folder.glob(f"{DATABASE_FILE}-*"):
        wal.unlink()
    with pytest.raises(StoreDamaged, match=f"review database {db} cannot be read") as info:
        ReviewStore(folder, "toy", CLASS_NAMES).samples()
    assert "\n" not in str(info.value) and db.read_bytes() == damaged[: len(good)]
    # not a database at all; and the same through `bloodcell serve`: one line, exit 2, the file untouched
    db.write_bytes(b"these are my notes, not a database" * 200)
    with pytest.raises(StoreDamaged, match="file is not a database"):
        ReviewStore(folder, "toy", CLASS_NAMES)
    res = runner.invoke(cli, ["serve", "--data-dir", str(folder), "--port", "0"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and str(db) in res.output, res.output
    assert db.read_bytes() == b"these are my notes, not a database" * 200


FULL_DISK_CHILD = r"""
import io, json, resource, signal, sys
import numpy as np
from PIL import Image
from fastapi.testclient import TestClient
from bloodcell.infer import Predictor
from bloodcell.serve.app import create_app

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
client = TestClient(create_app(Predictor.load(None), data_dir=sys.argv[1]))
assert client.post("/api/samples", json={"sample_id": "FULL-1", "who": "AB"}).status_code == 201

def cell(seed):
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (160, 160, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()

soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (3_000_000, hard))  # files may grow to 3 MB: the disk fills
saved, refused = 0, None
for seed in range(100):
    pair = [("files", (f"c{seed}-{k}.png", cell(2 * seed + k), "image/png")) for k in (0, 1)]  # a request is saved whole or not at all
    r = client.post("/api/samples/FULL-1/uploads?who=AB&input=cell", files=pair)
    if r.status_code != 200:
        refused = {"status": r.status_code, "detail": r.json()["detail"]}
        break
    saved += 1
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again: the same server goes on
after = client.post("/api/samples/FULL-1/uploads?who=AB&input=cell", files=[("files", ("after.png", cell(999), "image/png"))])
print(json.dumps({"saved": saved, "refused": refused, "after": after.status_code}))
"""  # noqa: E501


@pytest.mark.slow
def test_a_full_disk_while_saving_refuses_the_change_and_loses_nothing_saved_before(tmp_path):
    folder = tmp_path / "lab"
    out = subprocess.run(
        [sys.executable, "-c", FULL_DISK_CHILD, str(folder)], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["saved"] >= 2 and result["refused"] is not None, result
    assert result["refused"]["status"] == 507, result
    assert "this change was not saved; everything saved before it is intact" in result["refused"]["detail"]
    assert str(folder / DATABASE_FILE) in result["refused"]["detail"]
    assert result["after"] == 200  # once there is room, the same server saves again
    store = ReviewStore(folder, "bundled", CLASS_NAMES)
    cells = store.cells("FULL-1")
    assert [c["name"] for c in cells] == [f"c{i}-{k}.png" for i in range(result["saved"]) for k in (0, 1)] + [
        "after.png"
    ]
    assert store._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---------------------------------------------------------------------- export


def test_the_export_holds_what_a_person_vouched_for_in_folders_and_a_csv_the_training_reader_takes(store, tmp_path):
    from bloodcell.data.discover import scan

    cells = sample_with(store, ["neutrophil", "lymphocyte", "monocyte", "ig"], ood={2})
    store.relabel("S-1", cells[0]["id"], "artefact", "AB")
    with pytest.raises(ReviewError, match="exists"):
        write_export(store, ["S-1"], tmp_path)
    # open sample: only the cell a person labelled
    assert write_export(store, ["S-1"], tmp_path / "open")["per_label"] == {"artefact": 1}
    store.sign_off("S-1", "AB")  # signed: every counted cell, never the OOD one nobody labelled
    done = write_export(store, ["S-1"], tmp_path / "signed")
    assert done["per_label"] == {"artefact": 1, "lymphocyte": 1, "ig": 1}
    inventory = scan(tmp_path / "signed" / "labels.csv")
    assert sorted((r.label, r.group) for r in inventory.records) == [
        ("artefact", "S-1"),
        ("ig", "S-1"),
        ("lymphocyte", "S-1"),
    ]
    assert {r.relpath.split("/")[0] for r in inventory.records} == {"artefact", "ig", "lymphocyte"}
    folders = scan(tmp_path / "signed")  # the folders alone too (labels.csv beside them is no image)
    assert sorted(r.label for r in folders.records) == ["artefact", "ig", "lymphocyte"]
    exported = (tmp_path / "signed" / next(r.relpath for r in inventory.records if r.label == "ig")).read_bytes()
    assert exported == png(3)  # the very bytes uploaded
    only_model = write_export(store, ["S-1"], tmp_path / "model", labels=CLASS_NAMES)
    assert only_model["per_label"] == {"lymphocyte": 1, "ig": 1}
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(export_zip(store, "S-1"))).namelist()
    assert sorted(names) == sorted(["S-1/labels.csv", *[f"S-1/{r.relpath}" for r in inventory.records]])
    assert not list(tmp_path.glob(".*"))  # no temporary folder left


# ---------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def bundled():
    from bloodcell.infer import Predictor

    return Predictor.load(None)


@pytest.fixture
def client(bundled, tmp_path):
    from bloodcell.serve.app import create_app

    return TestClient(create_app(bundled, detector=FixedDetector(), data_dir=tmp_path / "lab"))


def sample_files(n: int) -> list[Path]:
    return sorted(f for d in SAMPLE.iterdir() if d.is_dir() for f in d.iterdir())[:n]


def test_the_api_keeps_cells_and_photographs_with_what_the_model_said(client, tmp_path):
    assert client.get("/health").json()["review"] is True
    assert client.post("/api/samples", json={"sample_id": "H26-1", "who": "AB", "note": "n"}).status_code == 201
    photo = field_photo(tmp_path / "field.jpg")
    files = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in sample_files(4)]
    files += [
        ("files", ("field.jpg", photo.read_bytes(), "image/jpeg")),
        ("files", ("broken.png", b"not an image", "image/png")),
    ]
    res = client.post("/api/samples/H26-1/uploads?who=AB", files=files)
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["uploads"] == 5 and len(body["cells"]) == 5
    assert [u["path"] for u in body["unreadable"]] == ["broken.png"]
    cells = client.get("/api/samples/H26-1/cells").json()
    field_cell = next(c for c in cells if c["box"])
    assert field_cell["name"] == "field.jpg#wbc1" and set(field_cell["probabilities"]) == set(CLASS_NAMES)
    uploads = client.get("/api/samples/H26-1/uploads").json()
    assert next(u for u in uploads if u["kind"] == "field")["counts"] == {"rbc": 4, "wbc": 1, "platelet": 1}
    image = client.get(f"/api/samples/H26-1/cells/{field_cell['id']}/image")
    crop = Image.open(io.BytesIO(image.content))
    assert image.headers["content-type"] == "image/png" and crop.size[0] == crop.size[1] > 16
    thumb = Image.open(io.BytesIO(client.get(f"/api/samples/H26-1/cells/{cells[0]['id']}/image?thumb=true").content))
    assert thumb.format == "JPEG" and max(thumb.size) == 96
    first = sample_files(1)[0].read_bytes()
    assert client.get(f"/api/samples/H26-1/cells/{cells[0]['id']}/image").content == first  # the upload, kept as sent
    relabelled = client.post(
        f"/api/samples/H26-1/cells/{cells[0]['id']}/label", json={"label": "smudge", "who": "AB", "rev": 0}
    )
    assert (
        relabelled.json()["label"] == "smudge"
        and relabelled.json()["sample_rev"] == client.get("/api/samples/H26-1").json()["rev"]
    )
    stale = client.post(f"/api/samples/H26-1/cells/{cells[0]['id']}/label", json={"label": "ig", "who": "CD", "rev": 0})
    assert stale.status_code == 409 and "changed by AB" in stale.json()["detail"]
    assert client.get("/api/samples/H26-1/count").json()["rows"][-1]["label"] == "smudge"


@pytest.mark.parametrize(
    "path, status, words",
    [
        ("/api/samples/NOPE/cells", 404, "no sample 'NOPE'"),
        ("/api/samples/a%3Cb%3E/cells", 422, "sample_id: String should match pattern '^[A-Za-z0-9]"),
        ("/api/samples/" + "x" * 5000, 422, "xxx...')"),
    ],
)
def test_api_refusals_are_one_short_line(client, path, status, words):
    res = client.get(path)
    assert res.status_code == status and words in res.json()["detail"] and len(res.json()["detail"]) < 200


def test_an_upload_of_nothing_readable_is_refused_and_adds_nothing(client):
    client.post("/api/samples", json={"sample_id": "S2", "who": "AB"})
    res = client.post("/api/samples/S2/uploads?who=AB", files=[("files", ("x.png", b"junk", "image/png"))])
    assert res.status_code == 422 and "'x.png'" in res.json()["detail"]
    assert (
        client.post("/api/samples/S2/uploads", files=[("files", ("x.png", b"junk", "image/png"))]).status_code == 422
    )  # no who
    assert client.get("/api/samples/S2").json()["cells"] == 0


def test_an_upload_to_a_signed_off_sample_is_refused_before_any_work(client):
    client.post("/api/samples", json={"sample_id": "S3", "who": "AB"})
    one = [("files", ("a.jpg", sample_files(1)[0].read_bytes(), "image/jpeg"))]
    client.post("/api/samples/S3/uploads?who=AB", files=one)
    client.post("/api/samples/S3/signoff", json={"who": "AB"})
    res = client.post("/api/samples/S3/uploads?who=AB", files=one)
    assert res.status_code == 409 and "signed off (version 1)" in res.json()["detail"]
    assert client.get("/api/samples/S3").json()["cells"] == 1


def test_the_review_api_is_documented(client):
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/samples",
        "/api/samples/{sample_id}/uploads",
        "/api/samples/{sample_id}/cells/{cell_id}/label",
        "/api/samples/{sample_id}/undo",
        "/api/samples/{sample_id}/signoff",
        "/api/samples/{sample_id}/reopen",
        "/api/samples/{sample_id}/report",
        "/api/samples/{sample_id}/export.zip",
        "/api/labels",
    ):
        assert path in paths, path
    assert "409" in paths["/api/samples/{sample_id}/cells/{cell_id}/label"]["post"]["responses"]


def test_the_report_names_the_model_by_the_digest_its_seal_records(client, bundled):
    """One identity for one model: the version on every report is model.json's SHA-256 as SEAL.json records it."""
    sealed = read_seal(Path(bundled.source))["files"]["model.json"]["sha256"]
    assert client.app.state.model_identity["version"] == sealed
    client.post("/api/samples", json={"sample_id": "S4", "who": "AB"})
    report = client.get("/api/samples/S4/report").text
    assert f"(version {sealed})" in report


def test_a_wrong_method_is_405_naming_every_method_of_the_path(client):
    res = client.delete("/api/samples")  # GET and POST are two routes of one included router
    assert res.status_code == 405 and res.headers["allow"] == "GET, POST"
    assert client.put("/api/samples/S5").headers["allow"] == "GET, PATCH"
    assert client.delete("/health").headers["allow"] == "GET"


def test_without_a_data_folder_the_server_is_the_one_off_page(bundled):
    from bloodcell.serve.app import create_app

    plain = TestClient(create_app(bundled))
    assert plain.get("/health").json()["review"] is False and plain.get("/api/samples").status_code == 404
    assert "review.js" not in plain.get("/").text and "app.js" in plain.get("/").text


# ---------------------------------------------------------------------- the loop back to training


@pytest.mark.slow
def test_a_reviewed_sample_fine_tunes_the_bundled_model_with_the_shipped_config(client, tmp_path, monkeypatch):
    """review -> export -> `bloodcell train configs/finetune.yaml` as the docs say, with the bundled model as base."""
    monkeypatch.setenv("BLOODCELL_DATA_DIR", str(tmp_path / "lab"))
    client.post("/api/samples", json={"sample_id": "FT-1", "who": "AB"})
    files = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in sample_files(200)[::8]]
    assert client.post("/api/samples/FT-1/uploads?who=AB&input=cell", files=files).status_code == 200
    cell = client.get("/api/samples/FT-1/cells").json()[0]
    client.post(f"/api/samples/FT-1/cells/{cell['id']}/label", json={"label": "monocyte", "who": "AB"})
    client.post("/api/samples/FT-1/signoff", json={"who": "AB"})
    listed = runner.invoke(cli, ["review", "list"])
    assert listed.exit_code == 0 and "FT-1" in listed.output and "signed v1" in listed.output
    res = runner.invoke(cli, ["review", "export", "--out", str(tmp_path / "cells"), "--labels", "model"])
    assert res.exit_code == 0 and "CSV:" in res.output, res.output
    res = runner.invoke(
        cli,
        [
            "train",
            str(REPO / "configs" / "finetune.yaml"),
            "--data",
            str(tmp_path / "cells" / "labels.csv"),
            "--out",
            str(tmp_path / "ft"),
            "--set",
            "train.epochs=1",
        ],
    )
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert meta["training_config"]["model"]["pretrained"] == "default" and "monocyte" in meta["class_names"]
    backup = runner.invoke(cli, ["review", "backup", str(tmp_path / "copy.sqlite3")])
    assert backup.exit_code == 0, backup.output  # the copy opens as a review database:
    copy = tmp_path / "copy-folder"
    copy.mkdir()
    os.replace(tmp_path / "copy.sqlite3", copy / DATABASE_FILE)
    assert [s["sample_id"] for s in ReviewStore(copy).samples()] == ["FT-1"]

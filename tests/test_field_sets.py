"""Annotated smear photographs from several sets: the YOLO layout (TXL-PBC's) read as Pascal VOC is, sets combined
without a photograph crossing from an evaluation split into training, and a detector run reporting per source."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell.data.fields import FIELD_CLASSES, combine_field_sets, load_fields, load_yolo, read_yolo
from bloodcell.errors import DataError

from conftest import REPO
from test_fields import photograph, voc_folder

TXL = REPO.parent / "shared" / "data" / "txl_pbc"
BCCD = REPO.parent / "shared" / "data" / "bccd"
needs_txl = pytest.mark.skipif(
    not (TXL.is_dir() and BCCD.is_dir()), reason=f"TXL-PBC or BCCD not beside the checkout ({TXL})"
)
NAMES = ["WBC", "RBC", "Platelets"]  # TXL-PBC's order: the file's class numbers are not ours


def yolo_line(box, label: int, size=(640, 480)) -> str:
    x0, y0, x1, y1 = box
    w, h = size
    k = NAMES.index(("RBC", "WBC", "Platelets")[label])
    return f"{k} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"


def yolo_folder(root: Path, splits=("train", "train", "val", "test"), sources=None) -> Path:
    """A YOLO folder of drawn photographs (those of test_fields.photograph, moved a little each) and its sources.csv."""
    rows = []
    for k, split in enumerate(splits):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        img, boxes, labels = photograph(
            rbc_centres=((80 + 10 * k, 80), (300, 90), (520, 100)), wbc=(320, 260 + 10 * k, 70)
        )
        name = f"img_{k}"
        Image.fromarray(img).save(root / "images" / split / f"{name}.jpg", quality=95)
        (root / "labels" / split / f"{name}.txt").write_text(
            "\n".join(yolo_line(b, k) for b, k in zip(boxes, labels)) + "\n"
        )
        rows.append(
            {
                "image": f"images/{split}/{name}.jpg",
                "split": split,
                "source": (sources or {}).get(k, "lab_a"),
                "width": 640,
                "height": 480,
                "voc_name": "",
            }
        )
    (root / "data.yaml").write_text("train: ./images/train/\nnc: 3\nnames: ['WBC', 'RBC', 'Platelets']\n")
    return root, rows


def write_sources(root: Path, rows: list[dict]) -> None:
    with (root / "sources.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_yolo_boxes_become_pixel_boxes_of_our_classes(tmp_path):
    root, rows = yolo_folder(tmp_path / "y")
    items = load_yolo(root, "train")
    img, boxes, labels = photograph(rbc_centres=((80, 80), (300, 90), (520, 100)), wbc=(320, 260, 70))
    first = items[0]
    assert (first.width, first.height) == (640, 480) and first.name == "img_0"
    np.testing.assert_allclose(first.boxes, np.array(boxes, np.float32), atol=0.01)
    assert first.labels.tolist() == labels  # WBC is 0 in the file, 1 (FIELD_CLASSES) here
    assert [FIELD_CLASSES[i] for i in first.labels].count("rbc") == 3
    assert first.identity == "y:img_0" and first.source == "y"  # no sources.csv: the folder names both
    assert load_fields(root, "val")[0].name == "img_2"  # the layout is recognised by load_fields too


def test_yolo_clips_drops_empty_boxes_and_names_bad_lines(tmp_path):
    labels = tmp_path / "a.txt"
    labels.write_text("1 0.95 0.5 0.2 0.1\n1 0.5 0.5 0 0.1\n\n")  # half outside the right edge; one with no width
    ann = read_yolo(labels, tmp_path / "a.jpg", [1, 0, 2], size=(100, 50))
    np.testing.assert_allclose(ann.boxes, [[85, 22.5, 100, 27.5]])
    assert ann.labels.tolist() == [0] and ann.dropped == 1
    assert (
        len(read_yolo(tmp_path / "none.txt", tmp_path / "a.jpg", [1, 0, 2], size=(10, 10)).labels) == 0
    )  # no file: no cells
    labels.write_text("1 0.5 0.5 0.2\n")
    with pytest.raises(DataError, match=r"a\.txt:1: expected 'class cx cy w h'"):
        read_yolo(labels, tmp_path / "a.jpg", [1, 0, 2], size=(100, 50))
    labels.write_text("7 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"a\.txt:1: class 7 is not in data.yaml's 3 names"):
        read_yolo(labels, tmp_path / "a.jpg", [1, 0, 2], size=(100, 50))


def test_a_yolo_folder_without_its_class_names_or_split_is_refused(tmp_path):
    root, _ = yolo_folder(tmp_path / "y")
    with pytest.raises(DataError, match="no such split; known splits: test, train, val"):
        load_yolo(root, "holdout")
    (root / "data.yaml").unlink()
    with pytest.raises(DataError, match=r"data.yaml: missing"):
        load_yolo(root, "train")


def test_combined_sets_never_train_on_a_photograph_another_set_tests(tmp_path):
    """The YOLO set holds the VOC set's photographs under other splits (as TXL-PBC holds BCCD's)."""
    voc = voc_folder(tmp_path / "voc")  # photo_0, photo_1 train; photo_2, photo_3 val; photo_4, photo_5 test
    root, rows = yolo_folder(
        tmp_path / "y",
        splits=("train", "train", "train", "val", "test"),
        sources={0: "lab_a", 1: "lab_b", 2: "lab_b", 3: "lab_a", 4: "lab_b"},
    )
    rows[0]["voc_name"] = "photo_4"  # YOLO train img_0 is the VOC set's test photo_4: never trained on
    rows[1]["voc_name"] = "photo_0"  # YOLO train img_1 is VOC train photo_0: kept once, from the set listed first
    rows[2]["voc_name"] = "photo_2"  # YOLO train img_2 is VOC val photo_2: an evaluation split wins
    rows[4]["voc_name"] = "photo_1"  # YOLO test img_4 is VOC train photo_1: never trained on
    write_sources(root, rows)
    spec = dict(train_split="train", val_split="val", test_split="test")
    sets = combine_field_sets({"y": {"root": root, **spec}, "voc": {"root": voc, **spec, "thresholds": False}})
    assert sorted(a.name for a in sets.train) == ["img_1"]
    assert sorted(a.name for a in sets.val) == ["img_3"]  # the VOC set's val photographs do not choose thresholds
    assert {k: sorted(a.name for a in v) for k, v in sets.tests.items()} == {
        "y": ["img_4"],
        "voc": ["photo_4", "photo_5"],
    }
    assert sets.removed == {"train: in an evaluation split": 3, "train: a duplicate": 1}
    assert [a.source for a in sets.train] == ["lab_b"] and sets.tests["voc"][0].source == "voc"

    left = combine_field_sets({"y": {"root": root, **spec}, "voc": {"root": voc, **spec}}, leave_out="lab_b")
    assert "img_1" not in {a.name for a in left.train} and all(a.source != "lab_b" for a in left.train + left.val)
    assert [a.name for a in left.tests["y"]] == ["img_4"]  # the left-out source is still tested
    with pytest.raises(DataError, match="no training photographs left"):
        combine_field_sets({"voc": {"root": voc, **spec}}, leave_out="voc")


@needs_txl
def test_txl_pbc_and_bccd_combined_as_the_bundled_detector_trains_on_them():
    spec = dict(train_split="train", val_split="val", test_split="test")
    sets = combine_field_sets({"txl_pbc": {"root": TXL, **spec}, "bccd": {"root": BCCD, **spec, "thresholds": False}})
    with (TXL / "sources.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 1440 and len(sets.tests["txl_pbc"]) == 144 and len(sets.tests["bccd"]) == 72
    evaluated = {a.identity for a in sets.val} | {a.identity for t in sets.tests.values() for a in t}
    bccd_eval = {f"bccd:{r['bccd_name']}" for r in table if r["bccd_name"] and r["bccd_split"] in ("val", "test")}
    assert not {a.identity for a in sets.train} & (evaluated | bccd_eval)
    assert len({a.identity for a in sets.train}) == len(sets.train)  # each photograph once
    # every TXL-PBC train photograph that is no evaluation photograph of either set, and BCCD's train ones TXL-PBC lacks
    assert len(sets.train) == 1025 and {a.source for a in sets.train} == {"raabin", "pbc", "bccd", "bcd"}
    assert {a.source for a in sets.tests["txl_pbc"]} == {"raabin", "pbc", "bccd", "bcd"}
    counts = {
        s: sum(a.count(c) for a in sets.tests["txl_pbc"] if a.source == s for c in FIELD_CLASSES) for s in ("raabin",)
    }
    boxed = sum(
        int(r["wbc"]) + int(r["rbc"]) + int(r["platelet"])
        for r in table
        if r["source"] == "raabin" and r["split"] == "test"
    )
    assert counts["raabin"] == boxed  # the YOLO boxes read are the ones sources.csv counts


def test_a_detector_run_on_two_sets_reports_each_source(tmp_path):
    from typer.testing import CliRunner

    from bloodcell.cli import app

    voc = voc_folder(tmp_path / "voc")
    root, rows = yolo_folder(
        tmp_path / "y", splits=("train", "train", "val", "test", "test"), sources={3: "lab_a", 4: "lab_b"}
    )
    write_sources(root, rows)
    out = tmp_path / "run"
    args = [
        "detector",
        "train",
        str(REPO / "configs" / "detector-classical.yaml"),
        "--out",
        str(out),
        "--set",
        f"data.sets.y.root={root}",
        "--set",
        f"data.sets.voc.root={voc}",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test_sets"]) == {"y", "voc"} and set(metrics["test_sets"]["y"]) == {"lab_a", "lab_b"}
    assert metrics["test_sets"]["y"]["lab_b"]["photos"] == 1 and metrics["photos"]["train"] == 4
    assert metrics["test_sets"]["y"]["lab_a"]["classes"]["wbc"]["count_exact"] == 1.0  # the drawn white cell, found
    report = (out / "report.md").read_text()
    assert "| y / lab_a | 1 |" in report and "| voc | 2 |" in report
    detector = json.loads((out / "detector.json").read_text())
    assert set(detector["test_by_source"]) == {"y/lab_a", "y/lab_b", "voc"}
    assert detector["state"]["cell_scale"]["rbc_side_px"]["p50"] == pytest.approx(
        90.0, abs=1
    )  # drawn red cells: r = 45

    evaluated = CliRunner().invoke(
        app,
        ["detector", "evaluate", str(out), "--data", str(root), "--split", "test", "--out", str(tmp_path / "m.json")],
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert set(json.loads((tmp_path / "m.json").read_text())["sources"]) == {"lab_a", "lab_b"}
    assert "lab_b" in evaluated.output


# ------------------------------------------------------------------------------------------------ count rules


def _dets(scores_by_photo):
    from bloodcell.detect.base import Detections

    out = []
    for scores in scores_by_photo:
        n = len(scores)
        out.append(
            Detections(
                np.tile(np.array([[0, 0, 10, 10]], np.float32), (n, 1)),
                np.zeros(n, np.int64),
                np.array(scores, np.float32),
            )
        )
    return out


def _truth(counts):
    from bloodcell.data.fields import FieldAnnotation

    return [
        FieldAnnotation(Path(f"p{i}.jpg"), 100, 100, np.zeros((n, 4), np.float32), np.zeros(n, np.int64))
        for i, n in enumerate(counts)
    ]


def test_count_rules_fitted_on_validation_correct_a_detector_that_misses_overlapping_cells():
    from bloodcell.detect.counting import count_errors, fit_count_rules, predict_counts, true_counts

    # each photograph: 3 sure boxes and, where 2 cells overlap, one half-sure box per pair (below the 0.5 threshold)
    val = _dets([[0.9, 0.9, 0.9, 0.3], [0.9, 0.9, 0.9, 0.3, 0.3]])
    val_truth = _truth([5, 7])
    thresholds = {"rbc": 0.5, "wbc": 0.5, "platelet": 0.5}
    fitted = fit_count_rules(val, val_truth, thresholds)["rbc"]
    assert fitted["boxes"] == 1.0 and fitted["scaled"] == pytest.approx(12 / 6)
    assert fitted["score_sum"] == pytest.approx(12 / (2.7 + 0.3 + 2.7 + 0.6))
    test = _dets([[0.9, 0.9, 0.9, 0.9, 0.3, 0.3]])
    truth = true_counts(_truth([8]), "rbc")
    boxes = predict_counts(test, "rbc", 0.5, "boxes", fitted["boxes"])
    assert boxes.tolist() == [4.0] and predict_counts(test, "rbc", 0.5, "scaled", fitted["scaled"]).tolist() == [8.0]
    assert predict_counts(test, "rbc", 0.5, "score_sum", fitted["score_sum"]).tolist() == [round(4.2 * 12 / 6.3)]
    errors = count_errors(boxes, truth)
    assert errors == {"error_ratio": 0.5, "mae": 4.0, "bias": -4.0, "exact": 0.0, "photos": 1}
    with pytest.raises(ValueError, match="unknown count rule 'density'"):
        predict_counts(test, "rbc", 0.5, "density", 1.0)


def test_thresholds_are_found_for_a_rare_class_among_thousands_of_background_boxes():
    """A few white cells among many low-scoring candidates: a grid of score quantiles alone steps over them."""
    from bloodcell.data.fields import FieldAnnotation
    from bloodcell.detect.base import Detections
    from bloodcell.detect.metrics import choose_thresholds

    rng = np.random.default_rng(0)
    raw, truth = [], []
    for i in range(10):
        cell = np.array([[10, 10, 60, 60]], np.float32)
        background = rng.uniform(100, 400, (100, 2)).astype(np.float32)
        boxes = np.concatenate([cell, cell + 200, np.concatenate([background, background + 30], 1)])
        # the true white cell (score 0.6-0.9), one false one (0.3), 100 background candidates (0.05-0.2)
        scores = np.concatenate([[rng.uniform(0.6, 0.9)], [0.3], rng.uniform(0.05, 0.2, 100)]).astype(np.float32)
        raw.append(Detections(boxes, np.ones(len(boxes), np.int64), scores))
        truth.append(FieldAnnotation(Path(f"{i}.jpg"), 500, 500, cell, np.array([1])))
    chosen = choose_thresholds(raw, truth)["wbc"]
    assert 0.3 < chosen <= min(d.scores[0] for d in raw)  # every true cell kept, the false one and the background not


def test_a_box_listed_twice_is_one_cell(tmp_path):
    labels = tmp_path / "a.txt"
    # a white cell listed twice (once shifted by a pixel), two red cells that touch (IoU 0.33): 3 cells, 1 repeat
    labels.write_text("0 0.5 0.5 0.2 0.2\n0 0.501 0.5 0.2 0.2\n1 0.2 0.2 0.1 0.1\n1 0.25 0.2 0.1 0.1\n")
    ann = read_yolo(labels, tmp_path / "a.jpg", [1, 0, 2], size=(200, 200))
    assert ann.labels.tolist() == [1, 0, 0] and ann.duplicates == 1
    assert ann.count("wbc") == 1 and ann.count("rbc") == 2


@needs_txl
def test_txl_pbc_lists_some_pbc_test_boxes_twice_and_they_are_read_once():
    photos = load_fields(TXL, "test", "txl_pbc")
    repeats = {a.name: a.duplicates for a in photos if a.duplicates}
    assert sum(repeats.values()) == 36 and len(repeats) == 2
    assert {a.source for a in photos if a.duplicates} == {"pbc"}

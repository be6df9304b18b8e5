"""Smear-field photographs: VOC reading, detector metrics, thresholds, and reading a field with a fixed detector."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell.data.fields import FIELD_CLASSES, FieldAnnotation, load_voc, read_voc
from bloodcell.errors import DataError
from bloodcell.detect.base import Detections, FieldDetector
from bloodcell.detect.metrics import choose_thresholds, class_counts, detection_metrics, matched

from conftest import CLASS_NAMES, REPO, toy_run, with_ood

BCCD = REPO.parent / "shared" / "data" / "bccd"
RBC, WBC, PLT = (FIELD_CLASSES.index(c) for c in ("rbc", "wbc", "platelet"))


def voc_xml(path: Path, objects: list[tuple[str, tuple]], size=(640, 480), filename="a.jpg") -> Path:
    objs = "".join(
        f"<object><name>{n}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    path.write_text(
        f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
        f"<depth>3</depth></size>{objs}</annotation>"
    )
    return path


# ------------------------------------------------------------------------------------------------ reading VOC


def test_read_voc_maps_labels_clips_and_drops_empty_boxes(tmp_path):
    xml = voc_xml(
        tmp_path / "a.xml",
        [
            ("RBC", (10, 10, 60, 70)),
            ("Platelets", (600, 400, 700, 500)),
            ("WBC", (5, 5, 5, 40)),
            ("wbc", (100, 100, 300, 280)),
        ],
    )
    ann = read_voc(xml, tmp_path)
    assert ann.path == tmp_path / "a.jpg" and (ann.width, ann.height) == (640, 480)
    assert [FIELD_CLASSES[k] for k in ann.labels] == ["rbc", "platelet", "wbc"]
    assert ann.boxes[1].tolist() == [600, 400, 640, 480]  # clipped to the image
    assert ann.dropped == 1  # the zero-width WBC box is counted, not used


def test_read_voc_refuses_unknown_labels_and_broken_files(tmp_path):
    with pytest.raises(DataError, match=r"b\.xml.*unknown cell label 'Sickle'"):
        read_voc(voc_xml(tmp_path / "b.xml", [("Sickle", (1, 1, 9, 9))]), tmp_path)
    (tmp_path / "c.xml").write_text("<annotation><size>")
    with pytest.raises(DataError, match=r"c\.xml: not a readable Pascal VOC"):
        read_voc(tmp_path / "c.xml", tmp_path)


def test_load_voc_names_a_missing_split(tmp_path):
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (tmp_path / d).mkdir(parents=True)
    voc_xml(tmp_path / "Annotations" / "a.xml", [("RBC", (1, 1, 9, 9))])
    (tmp_path / "ImageSets/Main/train.txt").write_text("a\n")
    assert len(load_voc(tmp_path, "train")) == 1
    with pytest.raises(DataError, match="no such split; known splits: train"):
        load_voc(tmp_path, "test")


@pytest.mark.skipif(not BCCD.is_dir(), reason="BCCD not beside the checkout (../shared/data/bccd)")
def test_bccd_splits_are_the_datasets_own():
    sizes = {s: load_voc(BCCD, s) for s in ("train", "val", "test")}
    assert {s: len(v) for s, v in sizes.items()} == {"train": 205, "val": 87, "test": 72}
    names = [{a.name for a in v} for v in sizes.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    test = sizes["test"]
    assert all(a.path.is_file() for a in test)
    assert sum(a.count("wbc") for a in test) >= 70  # about one white cell per photograph


# ------------------------------------------------------------------------------------------------ metrics


def ann(boxes, labels) -> FieldAnnotation:
    return FieldAnnotation(
        Path("x.jpg"), 640, 480, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)
    )


def det(boxes, labels, scores) -> Detections:
    return Detections(
        np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64), np.asarray(scores, np.float32)
    )


def test_matching_is_one_to_one_at_the_iou():
    truth = np.array([[0, 0, 100, 100], [200, 200, 300, 300]], np.float32)
    assert matched(truth, truth, 0.5) == 2
    assert matched(np.array([[0, 0, 100, 100], [2, 2, 100, 100]], np.float32), truth, 0.5) == 1  # a duplicate finds one
    assert matched(np.array([[0, 0, 100, 45]], np.float32), truth, 0.5) == 0  # IoU 0.45


def test_detection_metrics_on_known_answers():
    truth = [
        ann([[0, 0, 100, 100], [200, 200, 300, 300], [400, 50, 600, 250]], [RBC, RBC, WBC]),
        ann([[10, 10, 110, 110], [300, 300, 340, 340]], [RBC, PLT]),
    ]
    found = [
        det(
            [[0, 0, 100, 100], [202, 198, 300, 300], [400, 50, 600, 250], [500, 400, 600, 470]],
            [RBC, RBC, WBC, RBC],
            [0.9, 0.8, 0.95, 0.3],
        ),
        det([[10, 10, 110, 110]], [RBC], [0.7]),
    ]
    m = detection_metrics(found, truth, {c: 0.5 for c in FIELD_CLASSES})
    rbc, wbc, plt = (m["classes"][c] for c in FIELD_CLASSES)
    assert (rbc["tp"], rbc["fp"], rbc["fn"]) == (3, 0, 0)  # the 0.3 box is below the threshold
    assert (wbc["precision"], wbc["recall"]) == (1.0, 1.0) and wbc["ap"] == pytest.approx(1.0)
    assert (plt["tp"], plt["fn"], plt["recall"]) == (0, 1, 0.0)
    assert rbc["count_mae"] == 0 and plt["count_mae"] == 0.5 and plt["count_rel_error"] == 1.0
    low = detection_metrics(found, truth, {c: 0.2 for c in FIELD_CLASSES})["classes"]["rbc"]
    assert (low["fp"], low["count_bias"], low["count_rel_error"]) == (1, 0.5, 0.25)  # photo 1: 3 found, 2 true
    assert rbc["ap"] > 0.9 and m["map"] > 0.5


def test_thresholds_chosen_on_validation_separate_right_from_wrong():
    rng = np.random.default_rng(0)
    truth, found = [], []
    for i in range(12):
        boxes = [[x, 40, x + 90, 130] for x in range(0, 540, 100)]
        truth.append(ann(boxes + [[100, 250, 300, 450]], [RBC] * len(boxes) + [WBC]))
        junk = [[x + 30, 300, x + 60, 330] for x in range(0, 300, 60)]  # false boxes, scored lower
        found.append(
            det(
                boxes + [[100, 250, 300, 450]] + junk,
                [RBC] * len(boxes) + [WBC] + [WBC] * len(junk),
                np.r_[rng.uniform(0.6, 0.9, len(boxes)), 0.9, rng.uniform(0.1, 0.4, len(junk))],
            )
        )
    t = choose_thresholds(found, truth)
    junk_max = max(d.scores[d.labels == WBC][1:].max() for d in found)
    assert junk_max < t["wbc"] <= 0.9  # keeps the real white cell, drops the junk
    assert t["rbc"] <= min(d.scores[d.labels == RBC].min() for d in found)  # every red cell kept: no count error
    stats = class_counts(
        [d.select(d.scores >= np.where(d.labels == WBC, t["wbc"], t["rbc"])) for d in found], truth, "wbc", 0.5
    )
    assert (stats["precision"], stats["recall"]) == (1.0, 1.0)


# ------------------------------------------------------------------------------------------------ reading a field


NUCLEUS = (90, 40, 150)


def photograph(
    size=(640, 480),
    rbc_centres=((80, 80), (300, 90), (520, 100), (100, 380), (540, 400)),
    r=45,
    wbc=(320, 260, 70),
    platelets=((460, 250),),
) -> tuple[np.ndarray, list, list]:
    """A drawn smear field and its true boxes: pink red cells, a white cell with a purple nucleus, platelets."""
    from skimage.draw import disk

    img = np.full((size[1], size[0], 3), (235, 225, 220), np.uint8)
    boxes, labels = [], []
    for cx, cy in rbc_centres:
        img[disk((cy, cx), r, shape=img.shape[:2])] = (215, 120, 120)
        boxes.append([cx - r, cy - r, cx + r, cy + r])
        labels.append(RBC)
    if wbc:
        cx, cy, rw = wbc
        img[disk((cy, cx), rw, shape=img.shape[:2])] = (200, 170, 200)
        img[disk((cy, cx), rw * 0.6, shape=img.shape[:2])] = NUCLEUS
        boxes.append([cx - rw, cy - rw, cx + rw, cy + rw])
        labels.append(WBC)
    for cx, cy in platelets:
        img[disk((cy, cx), 9, shape=img.shape[:2])] = (120, 60, 160)
        boxes.append([cx - 9, cy - 9, cx + 9, cy + 9])
        labels.append(PLT)
    return img, boxes, labels


class FixedDetector(FieldDetector):
    """Stands in for a trained detector: finds exactly the cells `photograph` drew, when the image is one."""

    name = "fixed"

    def __init__(self, **options):
        super().__init__(**options)
        _, self.boxes, self.labels = photograph()
        self.calls = 0

    def detect_one(self, image):
        self.calls += 1
        if image.shape[:2] != (480, 640) or image.std() < 1:  # not a drawn photograph, or a blank one
            return Detections.empty()
        return det(self.boxes, self.labels, [0.9] * len(self.labels))


@pytest.fixture(scope="module")
def toy_ood_run(tmp_path_factory):
    return with_ood(toy_run(tmp_path_factory.mktemp("fields") / "run"))


def _png(arr: np.ndarray, path: Path) -> Path:
    Image.fromarray(arr).save(path)
    return path


def test_white_cells_are_cropped_at_the_classifiers_scale_around_their_centre(toy_ood_run):
    from bloodcell.infer import Predictor
    from bloodcell.infer.fields import FieldReader

    predictor = Predictor.load(toy_ood_run)
    reader = FieldReader(predictor, FixedDetector(), view={"rbc_diameters": 3.0, "wbc_sides": 2.0})
    img, boxes, labels = photograph()
    seen = []
    original = predictor.prepare
    predictor.prepare = lambda crop: seen.append(crop) or original(crop)
    out = reader.read("p.png", Image.fromarray(img), reason="test")
    assert len(seen) == 1
    crop = np.asarray(seen[0])
    assert crop.shape[:2] == (270, 270)  # 3 red-cell diameters of 90 px
    assert tuple(crop[135, 135]) == NUCLEUS  # centred on the white cell
    assert out["counts"] == {"rbc": 5, "wbc": 1, "platelet": 1}
    wbc = [c for c in out["cells"] if c["kind"] == "wbc"][0]
    assert wbc["box"] == [250.0, 190.0, 390.0, 330.0] and wbc["label"] in CLASS_NAMES and wbc["crop_side"] == 270.0
    assert sum(out["wbc_classes"].values()) == (0 if wbc["ood"] else 1)
    assert "5 red cells, median 90 px" in out["scale"]

    # too few red cells to measure by: the white cell's box sets the scale instead
    few = FixedDetector()
    few.boxes, few.labels = few.boxes[3:], few.labels[3:]
    seen.clear()
    FieldReader(predictor, few, view={"rbc_diameters": 3.0, "wbc_sides": 2.0}).read("p.png", Image.fromarray(img))
    assert np.asarray(seen[0]).shape[:2] == (280, 280)


def test_a_crop_over_the_edge_is_padded_with_the_background(toy_ood_run):
    from bloodcell.infer import Predictor
    from bloodcell.infer.fields import FieldReader

    reader = FieldReader(Predictor.load(toy_ood_run), FixedDetector(), view={"rbc_diameters": 3.0, "wbc_sides": 2.0})
    img, _, _ = photograph()
    crop = np.asarray(reader.crop(Image.fromarray(img), np.array([0, 0, 60, 60]), 200, reader.background(img)))
    assert crop.shape[:2] == (200, 200)
    assert tuple(crop[5, 5]) == (235, 225, 220)  # outside the photograph: its background colour
    assert tuple(crop[110, 110]) == tuple(img[10, 10])  # inside: the photograph itself


def test_predict_mixed_auto_keeps_cells_and_reads_fields(toy_ood_run, tmp_path):
    from bloodcell.infer import Predictor
    from bloodcell.infer.fields import predict_mixed

    from conftest import SAMPLE

    predictor = Predictor.load(toy_ood_run)
    cells = sorted(SAMPLE.rglob("*.jpg"))[:6]
    photo = _png(photograph()[0], tmp_path / "field.png")
    blank = _png(np.full((480, 640, 3), 230, np.uint8), tmp_path / "blank.png")
    names, _, scores, _ = predictor.classify([(str(p), p) for p in cells + [photo, blank]])
    # every sample cell in distribution, the two photographs out of it (threshold set between them)
    predictor.ood_threshold = float(max(scores[:6].max(), min(scores[6:]) - 1e-3))
    inside = [p for p, s in zip(cells, scores) if s <= predictor.ood_threshold]
    assert scores[6] > predictor.ood_threshold and scores[7] > predictor.ood_threshold
    detector = FixedDetector()
    items = [(p.name, p.read_bytes()) for p in inside] + [
        ("field.png", photo.read_bytes()),
        ("blank.png", blank.read_bytes()),
    ]
    result = predict_mixed(predictor, items, "auto", detector)
    assert detector.calls == 2  # only the two images the classifier flagged were shown to the detector
    assert [f["path"] for f in result["fields"]] == ["field.png"]
    cell_paths = [p["path"] for p in result["predictions"]]
    assert cell_paths == [p.name for p in inside] + ["blank.png"]
    assert all(p["input"] == "cell" for p in result["predictions"])
    assert "square-ish image: read as a single-cell crop" in result["predictions"][0]["input_reason"]
    assert "found no cells" in result["predictions"][-1]["input_reason"]
    assert result["counted"] == len(inside)  # the blank image stays OOD and uncounted, as before
    field = result["fields"][0]
    assert field["counts"] == {"rbc": 5, "wbc": 1, "platelet": 1} and "found 1 white, 5 red" in field["input_reason"]
    assert field["cells"][0]["path"] == "field.png#wbc1"
    assert result["field_summary"]["totals"] == {"rbc": 5, "wbc": 1, "platelet": 1}

    # --input cell: exactly the classifier's answer, no detector
    plain = predictor._predict(items, 32, False)
    as_cells = predict_mixed(predictor, items, "cell", FixedDetector())
    assert [{k: v for k, v in p.items() if not k.startswith("input")} for p in as_cells["predictions"]] == plain[
        "predictions"
    ]
    assert as_cells["fields"] == [] and as_cells["counts"] == plain["counts"]


def test_field_mode_sums_photographs_and_answers_an_empty_one(toy_ood_run, tmp_path):
    from bloodcell.infer import Predictor
    from bloodcell.infer.fields import predict_mixed

    predictor = Predictor.load(toy_ood_run)
    photo = _png(photograph()[0], tmp_path / "field.png").read_bytes()
    blank = _png(np.full((480, 640, 3), 230, np.uint8), tmp_path / "blank.png").read_bytes()
    # the same name twice: results are kept apart by position
    result = predict_mixed(predictor, [("a.png", photo), ("a.png", photo), ("b.png", blank)], "field", FixedDetector())
    assert result["predictions"] == [] and len(result["fields"]) == 3
    assert [f["path"] for f in result["fields"]] == ["a.png", "a.png", "b.png"]
    empty = result["fields"][2]
    assert (
        empty["note"] == "no cells found"
        and empty["counts"] == {"rbc": 0, "wbc": 0, "platelet": 0}
        and empty["cells"] == []
    )
    summary = result["field_summary"]
    assert summary["photos"] == 3 and summary["totals"] == {"rbc": 10, "wbc": 2, "platelet": 2}
    assert summary["per_photo"]["rbc"] == pytest.approx(10 / 3, abs=0.01)
    assert summary["wbc_counted"] + summary["wbc_ood"] == 2
    assert sum(summary["differential"].values()) == summary["wbc_counted"]


def test_a_photograph_over_the_field_limit_is_refused_with_its_size(toy_ood_run, tmp_path):
    from bloodcell.infer import Predictor
    from bloodcell.infer.fields import predict_mixed

    predictor = Predictor.load(toy_ood_run)
    big = _png(np.full((700, 900, 3), 230, np.uint8), tmp_path / "big.png").read_bytes()
    detector = FixedDetector()
    result = predict_mixed(predictor, [("big.png", big)], "field", detector, max_field_pixels=500_000)
    assert detector.calls == 0
    assert result["fields"] == []
    assert "900x700 px is larger than the 500,000-pixel limit" in result["unreadable"][0]["reason"]


def test_annotated_photograph_shows_each_cell(toy_ood_run, tmp_path):
    from bloodcell.evaluate.annotate import KIND_COLOURS
    from bloodcell.infer import Predictor
    from bloodcell.infer.fields import annotate_fields, predict_mixed

    predictor = Predictor.load(toy_ood_run)
    photo = _png(photograph()[0], tmp_path / "field.png")
    result = predict_mixed(predictor, [(str(photo), photo)], "field", FixedDetector())
    written = annotate_fields(result, {}, tmp_path / "out")
    assert [p.name for p in written] == ["field.annotated.png"]
    drawn = np.asarray(Image.open(written[0]).convert("RGB"))
    assert drawn.shape == (480, 640, 3)
    wbc = [c for c in result["fields"][0]["cells"] if c["kind"] == "wbc"][0]
    colour = (240, 140, 0) if (wbc["ood"] or wbc["review"]) else KIND_COLOURS["wbc"]
    x0, y0, x1, y1 = (int(v) for v in wbc["box"])
    assert tuple(drawn[(y0 + y1) // 2, x0]) == colour and tuple(drawn[(y0 + y1) // 2, x1]) == colour
    x0, y0, x1, y1 = photograph()[1][0]
    assert tuple(drawn[(y0 + y1) // 2, x0]) == KIND_COLOURS["rbc"]


# ------------------------------------------------------------------------------------------------ a detector run


def voc_folder(root: Path) -> Path:
    """A Pascal VOC folder of drawn photographs: 2 per split, the cells moved a little in each."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    names = {}
    for k, split in enumerate(["train", "train", "val", "val", "test", "test"]):
        shift = 12 * k
        img, boxes, labels = photograph(
            rbc_centres=((80 + shift, 80), (300, 90 + shift), (520, 100), (100, 380)),
            wbc=(320 + shift, 260, 70),
            platelets=((470, 250 + shift),),
        )
        name = f"photo_{k}"
        Image.fromarray(img).save(root / "JPEGImages" / f"{name}.jpg", quality=95)
        voc_xml(
            root / "Annotations" / f"{name}.xml",
            [(("RBC", "WBC", "Platelets")[k], tuple(b)) for b, k in zip(boxes, labels)],
            filename=f"{name}.jpg",
        )
        names.setdefault(split, []).append(name)
    for split, listed in names.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(listed) + "\n")
    return root


def test_detector_train_writes_a_run_directory_and_refuses_to_overwrite_it(tmp_path):
    from typer.testing import CliRunner

    from bloodcell.cli import app
    from bloodcell.detect.registry import load_detector

    data = voc_folder(tmp_path / "voc")
    out = tmp_path / "run"
    args = [
        "detector",
        "train",
        str(REPO / "configs" / "detector-classical.yaml"),
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    for name in ("config.yaml", "detector.json", "metrics.json", "report.md", "examples.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert {k: metrics["photos"][k] for k in ("train", "val", "test")} == {"train": 2, "val": 2, "test": {"voc": 2}}
    assert metrics["test"]["classes"]["wbc"]["recall"] == 1.0  # a drawn white cell is found in both test photographs
    detector = load_detector(out)
    assert (
        detector.name == "classical"
        and detector.score_thresholds == json.loads((out / "detector.json").read_text())["score_thresholds"]
    )
    assert "| voc | 2 |" in (out / "report.md").read_text()

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "already holds a detector run" in again.output
    other = CliRunner().invoke(app, args + ["--resume", "--set", "seed=1"])
    assert other.exit_code == 2 and "started with another config" in other.output
    evaluated = CliRunner().invoke(
        app,
        ["detector", "evaluate", str(out), "--data", str(data), "--split", "val", "--out", str(tmp_path / "m.json")],
    )
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads((tmp_path / "m.json").read_text())["photos"] == 2

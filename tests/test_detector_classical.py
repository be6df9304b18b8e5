"""The classical field detector: synthetic smear fields with known boxes, a blank photo, the saved form, BCCD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell.data.fields import FIELD_CLASSES, FieldAnnotation, load_voc
from bloodcell.errors import ModelError
from bloodcell.detect.base import Detections
from bloodcell.detect.classical_fit import fit_classical
from bloodcell.detect.metrics import matched as matches
from bloodcell.detect.registry import create_detector, load_detector, save_detector

BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"
RBC, WBC, PLT = (FIELD_CLASSES.index(c) for c in ("rbc", "wbc", "platelet"))

BACKGROUND = (206, 208, 213)
RBC_RIM = (188, 150, 156)
RBC_CENTRE = (205, 197, 199)
CYTOPLASM = (196, 178, 212)
NUCLEUS = (118, 98, 192)
PLATELET = (150, 135, 200)


def _disc(img: np.ndarray, cx: float, cy: float, r: float, colour) -> None:
    yy, xx = np.ogrid[: img.shape[0], : img.shape[1]]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour


def synthetic_field(seed: int = 0, width: int = 640, height: int = 480):
    """A smear-like photograph: pale-pink red cells with paler centres (two of them touching), one white cell
    (three separate purple nucleus lobes in lilac cytoplasm) and three purple platelets, on a light background.
    Returns (image uint8 HxWx3, boxes (N, 4), labels (N,))."""
    rng = np.random.default_rng(seed)
    img = np.empty((height, width, 3), np.float32)
    img[:] = BACKGROUND
    boxes, labels = [], []
    # white cell, upper left
    wx, wy, wr = 150.0, 140.0, 85.0
    _disc(img, wx, wy, wr, CYTOPLASM)
    for dx, dy in ((-26, -14), (26, -14), (0, 31)):  # three lobes, 8 px apart: one nucleus
        _disc(img, wx + dx, wy + dy, 22, NUCLEUS)
    boxes.append((wx - wr, wy - wr, wx + wr, wy + wr))
    labels.append(WBC)
    # red cells: separate ones plus one touching pair (lower right)
    r = 46.0
    centres = [(360, 70), (480, 80), (590, 200), (360, 230), (90, 400), (230, 380), (470, 330), (550, 360)]
    for cx, cy in centres:
        _disc(img, cx, cy, r, RBC_RIM)
        _disc(img, cx, cy, r * 0.38, RBC_CENTRE)
        boxes.append((cx - r, cy - r, cx + r, cy + r))
        labels.append(RBC)
    # platelets, in the gaps
    for cx, cy in ((280, 150), (330, 430), (600, 40)):
        _disc(img, cx, cy, 8, PLATELET)
        boxes.append((cx - 19, cy - 19, cx + 19, cy + 19))
        labels.append(PLT)
    img += rng.normal(0, 2.0, img.shape)
    boxes = np.clip(np.asarray(boxes, np.float32), 0, [width, height, width, height])
    return np.clip(img, 0, 255).astype(np.uint8), boxes, np.asarray(labels, np.int64)


@pytest.fixture(scope="module")
def detector():
    return create_detector("classical")


def test_synthetic_field_finds_every_kind_of_cell(detector):
    image, boxes, labels = synthetic_field()
    det = detector.detect([image])[0]
    assert isinstance(det, Detections)
    assert det.boxes.dtype == np.float32 and det.boxes.shape[1] == 4
    assert np.all((det.scores >= 0) & (det.scores <= 1))
    # the white cell, once, at IoU >= 0.5
    wbc = det.of_class("wbc")
    assert len(wbc) == 1, wbc
    assert matches(wbc.boxes, boxes[labels == WBC], 0.5) == 1
    # red cells: the count within one of the truth, and most of them boxed at IoU >= 0.5
    n_rbc = int((labels == RBC).sum())
    rbc = det.of_class("rbc")
    assert abs(len(rbc) - n_rbc) <= 1, (len(rbc), n_rbc)
    assert matches(rbc.boxes, boxes[labels == RBC], 0.5) >= n_rbc - 1
    # platelets: all three, nothing else
    plt = det.of_class("platelet")
    assert matches(plt.boxes, boxes[labels == PLT], 0.5) == 3
    assert len(plt) == 3


def test_touching_red_cells_are_split(detector):
    image, boxes, labels = synthetic_field()
    # the pair at (470, 330) and (550, 360) overlaps; both must come back as separate boxes
    pair = boxes[labels == RBC][-2:]
    assert matches(detector.detect([image])[0].of_class("rbc").boxes, pair, 0.5) == 2


def test_blank_photo_has_no_cells(detector):
    blank = np.empty((480, 640, 3), np.uint8)
    blank[:] = BACKGROUND
    det = detector.detect([blank])[0]
    assert len(det) == 0 and det.boxes.shape == (0, 4)
    noisy = np.clip(blank + np.random.default_rng(1).normal(0, 2, blank.shape), 0, 255).astype(np.uint8)
    assert len(detector.raw([noisy])[0].of_class("wbc")) == 0


def test_odd_sizes_and_bad_input(detector):
    image, _, _ = synthetic_field(width=333, height=251)
    det = detector.raw([image])[0]
    assert np.all(det.boxes[:, [0, 2]] <= 333) and np.all(det.boxes[:, [1, 3]] <= 251)
    with pytest.raises(ModelError):
        detector.raw([image[..., 0]])
    with pytest.raises(ModelError, match="unknown option"):
        create_detector("classical", nucleus_treshold=1.0)


def test_save_load_round_trip(tmp_path):
    image, _, _ = synthetic_field(seed=3)
    detector = create_detector("classical")
    detector.load_state({"params": {"rbc_min_distance": 18, "wbc_pad": 26.0}})  # as a fit would leave it
    detector.score_thresholds = {"rbc": 0.1, "wbc": 0.2, "platelet": 0.3}
    save_detector(detector, tmp_path / "det")
    again = load_detector(tmp_path / "det")
    assert again.score_thresholds == detector.score_thresholds
    assert again.params == detector.params
    a, b = detector.detect([image])[0], again.detect([image])[0]
    assert (
        np.array_equal(a.boxes, b.boxes) and np.array_equal(a.labels, b.labels) and np.array_equal(a.scores, b.scores)
    )


def test_fit_searches_and_logs(tmp_path):
    items = []
    for seed in range(2):
        image, boxes, labels = synthetic_field(seed=seed)
        path = tmp_path / f"field{seed}.png"
        Image.fromarray(image).save(path)
        items.append(FieldAnnotation(path=path, width=640, height=480, boxes=boxes, labels=labels, name=path.stem))
    det = create_detector("classical")
    summary = fit_classical(det, items, None, tmp_path / "run", False, False)
    assert (tmp_path / "run" / "search.csv").is_file()
    assert summary["train_wbc_f1"] == 1.0
    assert summary["train_platelet_f1"] == 1.0
    assert summary["train_rbc_count_rel"] <= 0.15
    restored = create_detector("classical")
    restored.load_state(det.state())
    assert restored.params == det.params


@pytest.fixture(scope="module")
def bccd_val():
    if not (BCCD / "BCCD").is_dir():
        pytest.skip(f"BCCD not found at {BCCD}")
    return [a for a in load_voc(BCCD, "val") if a.count("wbc") == 1][:5]


def test_bccd_white_cells_found(bccd_val, detector):
    images = [np.asarray(Image.open(a.path).convert("RGB")) for a in bccd_val]
    for det, a in zip(detector.detect(images), bccd_val):
        assert matches(det.of_class("wbc").boxes, a.boxes[a.labels == WBC], 0.5) == 1, a.name
        n_rbc = a.count("rbc")
        assert abs(det.counts()["rbc"] - n_rbc) <= max(6, n_rbc), a.name


def test_overlapping_white_cell_boxes_merge():
    from bloodcell.detect.classical import _merge_overlapping

    cells = [
        (np.array([0.0, 0, 100, 100]), 0.9),
        (np.array([40.0, 50, 130, 140]), 0.7),
        (np.array([200.0, 0, 260, 60]), 0.5),
    ]
    merged = _merge_overlapping(cells)
    assert len(merged) == 2
    assert np.array_equal(merged[0][0], [0, 0, 130, 140]) and merged[0][1] == 0.9

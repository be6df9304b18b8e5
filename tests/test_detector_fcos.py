"""The FCOS cell detector: outputs in the photograph's pixels, save/load, augmentation geometry, fit and resume."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell.config import DetectorTrainConfig
from bloodcell.data.fields import FieldAnnotation, load_voc
from bloodcell.errors import ConfigError, ModelError
from bloodcell.models.detector import Detections, create_detector, load_detector, save_detector
from bloodcell.models.detector_fcos import _FieldBatches, choose_thresholds, rot90_boxes

BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"
TINY = dict(long_side=96, fpn_channels=32, head_convs=1, bf16=False)


def _tiny(**kw):
    torch.manual_seed(0)
    return create_detector("fcos", **{**TINY, **kw})


def _photo(rng, width=160, height=120):
    """A synthetic smear: light background, red discs (rbc), one big purple blob (wbc), a small dot (platelet)."""
    img = np.full((height, width, 3), (235, 225, 230), np.uint8)
    yy, xx = np.mgrid[:height, :width]
    boxes, labels = [], []

    def disc(cx, cy, r, colour, label):
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= r * r] = colour
        boxes.append((cx - r, cy - r, cx + r, cy + r))
        labels.append(label)

    for _ in range(4):
        disc(int(rng.integers(15, width - 15)), int(rng.integers(15, height - 15)), 12, (200, 90, 90), 0)
    disc(int(rng.integers(25, width - 25)), int(rng.integers(25, height - 25)), 22, (110, 60, 160), 1)
    disc(int(rng.integers(6, width - 6)), int(rng.integers(6, height - 6)), 4, (130, 80, 170), 2)
    return img, np.array(boxes, np.float32), np.array(labels, np.int64)


@pytest.fixture(scope="module")
def synthetic_fields(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fields")
    rng = np.random.default_rng(0)
    items = []
    for i in range(4):
        img, boxes, labels = _photo(rng)
        path = folder / f"f{i}.png"
        Image.fromarray(img).save(path)
        items.append(FieldAnnotation(path=path, width=160, height=120, boxes=boxes, labels=labels, name=path.stem))
    return items


def test_detect_one_returns_boxes_in_the_photographs_pixels():
    det = _tiny(long_side=128)
    image = np.random.default_rng(1).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    out = det.detect_one(image)
    assert isinstance(out, Detections) and len(out) > 0  # untrained: the focal-loss prior scores ~0.07 > 0.05
    assert out.boxes.dtype == np.float32 and out.boxes.shape == (len(out), 4)
    assert set(np.unique(out.labels)) <= {0, 1, 2}
    assert (out.scores >= 0.05).all()
    # the network sees 128 x 96; boxes come back scaled to 640 x 480
    assert out.boxes[:, 2].max() > 300 and out.boxes[:, 3].max() > 250
    assert out.boxes[:, [0, 2]].max() <= 640 and out.boxes[:, [1, 3]].max() <= 480 and out.boxes.min() >= 0
    assert det.model.transform.min_size == (128,) and det.model.transform.max_size == 128


def test_save_and_load_give_identical_detections(tmp_path):
    det = _tiny()
    det.score_thresholds = {"rbc": 0.3, "wbc": 0.4, "platelet": 0.2}
    image = np.random.default_rng(2).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    before = det.detect_one(image)
    save_detector(det, tmp_path)
    assert (tmp_path / "detector.safetensors").stat().st_size > 0
    back = load_detector(tmp_path)
    after = back.detect_one(image)
    assert back.options == det.options and back.score_thresholds == det.score_thresholds
    np.testing.assert_array_equal(before.boxes, after.boxes)
    np.testing.assert_array_equal(before.labels, after.labels)
    np.testing.assert_array_equal(before.scores, after.scores)


def test_weights_of_another_architecture_are_refused(tmp_path):
    save_detector(_tiny(), tmp_path)
    other = _tiny(fpn_channels=64)
    from safetensors.torch import load_file

    with pytest.raises(ModelError, match="do not fit"):
        other.load_tensors(load_file(str(tmp_path / "detector.safetensors")))


def test_bad_options_are_one_line_errors():
    with pytest.raises(ModelError, match="fpn_channels"):
        create_detector("fcos", fpn_channels=30)
    with pytest.raises(ModelError, match="trunk"):
        create_detector("fcos", trunk="layer9")


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_quarter_turns_move_boxes_with_the_image(k):
    mask = np.zeros((30, 50), bool)
    mask[5:12, 20:41] = True  # box x0=20 y0=5 x1=41 y1=12 (exclusive ends)
    turned = np.rot90(mask, k)
    ys, xs = np.nonzero(turned)
    expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    got = rot90_boxes(np.array([[20, 5, 41, 12]], np.float32), k, width=50, height=30)[0]
    np.testing.assert_allclose(got, expected)


def test_augmented_samples_keep_boxes_on_their_cells(tmp_path):
    img = np.zeros((120, 160, 3), np.uint8)
    img[30:50, 100:140] = 255
    path = tmp_path / "one.png"
    Image.fromarray(img).save(path)
    ann = FieldAnnotation(path=path, width=160, height=120, boxes=np.array([[100, 30, 140, 50]], np.float32), labels=np.array([1]))
    data = _FieldBatches([ann], long_side=160, seed=3, augment=True)
    shapes = set()
    for epoch in range(12):
        x, target = data.sample(0, epoch)
        grey = x.mean(0).numpy()
        ys, xs = np.nonzero(grey > 0.5 * grey.max())
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
        np.testing.assert_allclose(target["boxes"][0].numpy(), found, atol=2.0)
        assert target["labels"].tolist() == [2]  # FIELD_CLASSES index 1 (wbc) is FCOS label 2
        shapes.add(tuple(x.shape[1:]))
    assert len(shapes) > 2  # quarter turns and scale jitter change the shape
    np.testing.assert_array_equal(data.sample(0, 5)[0], data.sample(0, 5)[0])  # (seed, epoch, photo) decides


def test_thresholds_maximise_f1_and_rbc_counts():
    truth = FieldAnnotation(
        path=Path("x"), width=100, height=100,
        boxes=np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 70, 70]], np.float32), labels=np.array([0, 0, 1]),
    )
    det = Detections(
        np.array([[0, 0, 10, 10], [20, 20, 30, 30], [80, 80, 90, 90], [50, 50, 70, 70], [0, 50, 20, 70]], np.float32),
        np.array([0, 0, 0, 1, 1]),
        np.array([0.9, 0.6, 0.3, 0.8, 0.4], np.float32),
    )
    t = choose_thresholds([det], [truth])
    assert 0.3 < t["rbc"] <= 0.6  # two red cells are counted
    assert 0.4 < t["wbc"] <= 0.8  # the true white cell kept, the false one dropped


def _settings(epochs, **kw):
    return DetectorTrainConfig(epochs=epochs, batch_size=2, lr=1e-3, warmup_epochs=1, long_side=96, num_threads=1, **kw)


def _log(run_dir):
    with open(run_dir / "train_log.csv") as fh:
        return list(csv.DictReader(fh))


def test_fit_writes_a_checkpoint_and_resume_continues(synthetic_fields, tmp_path):
    first = _tiny()
    summary = first.fit(synthetic_fields[:3], synthetic_fields[3:], _settings(1), tmp_path, resume=False, progress=False)
    assert summary["epochs"] == 1 and summary["resumed_from_epoch"] == 0
    assert set(summary["score_thresholds"]) == {"rbc", "wbc", "platelet"}
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    rows = _log(tmp_path)
    assert [r["epoch"] for r in rows] == ["1"] and float(rows[0]["loss"]) > 0

    second = _tiny()
    summary = second.fit(synthetic_fields[:3], synthetic_fields[3:], _settings(2), tmp_path, resume=True, progress=False)
    assert summary["epochs"] == 2 and summary["resumed_from_epoch"] == 1
    again = _log(tmp_path)
    assert [r["epoch"] for r in again] == ["1", "2"]
    assert again[0] == rows[0]  # epoch 1 was not run again (its wall seconds would differ)
    assert second.model.training is False
    image = np.asarray(Image.open(synthetic_fields[0].path))
    assert isinstance(second.detect_one(image), Detections)


def test_fit_refuses_a_long_side_other_than_the_detectors(synthetic_fields, tmp_path):
    with pytest.raises(ConfigError, match="long_side"):
        _tiny().fit(synthetic_fields, [], _settings(1).model_copy(update={"long_side": 128}), tmp_path, False, False)


@pytest.mark.skipif(not BCCD.is_dir(), reason="BCCD not present")
def test_bccd_photographs_are_resized_once_with_their_boxes():
    items = load_voc(BCCD, "train")[:2]
    data = _FieldBatches(items, long_side=320, seed=0, augment=False)
    for ann, img, boxes in zip(items, data.images, data.boxes):
        assert img.shape == (240, 320, 3)
        np.testing.assert_allclose(boxes, ann.boxes * 0.5, atol=1e-4)

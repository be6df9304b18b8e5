"""The FCOS cell detector: outputs in the photograph's pixels, save/load, augmentation geometry, fit and resume; and
its ONNX export (what the install without PyTorch runs: bloodcell.detect.fcos_onnx), which must find the same
cells."""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell.data.fields import FieldAnnotation, load_voc
from bloodcell.detect import export as detector_export
from bloodcell.detect import registry as detector_module
from bloodcell.detect.base import Detections
from bloodcell.detect.config import DetectorTrainConfig
from bloodcell.detect.data import FieldBatches, rot90_boxes
from bloodcell.detect.export import export_bundled_detector, export_graph, weights_digest
from bloodcell.detect.fcos import FCOSDetector, graph_tensors
from bloodcell.detect.fcos_onnx import FCOSOnnxDetector, agreement, batched_nms, network_input, resized_size
from bloodcell.detect.fcos_train import fit_fcos
from bloodcell.detect.metrics import choose_thresholds
from bloodcell.detect.registry import bundled_detector_dir, create_detector, load_detector, save_detector
from bloodcell.detect.runs import fit_detector
from bloodcell.errors import ConfigError, ModelError
from bloodcell.models.seal import seal

from conftest import BCCD, field_photo, needs_bccd

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
    ann = FieldAnnotation(
        path=path, width=160, height=120, boxes=np.array([[100, 30, 140, 50]], np.float32), labels=np.array([1])
    )
    data = FieldBatches([ann], long_side=160, seed=3, augment=True)
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
        path=Path("x"),
        width=100,
        height=100,
        boxes=np.array([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 70, 70]], np.float32),
        labels=np.array([0, 0, 1]),
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


class _SlowClock:
    """time for detect.fcos_train in which every reading is a minute after the last: the first session's epoch looks
    long."""

    def __init__(self) -> None:
        import time

        self._now = time.time()

    def time(self) -> float:
        self._now += 60.0
        return self._now


def test_fit_writes_a_checkpoint_and_resume_continues(synthetic_fields, tmp_path, monkeypatch):
    from bloodcell.detect import fcos_train

    first = _tiny()
    with monkeypatch.context() as slow:
        slow.setattr(fcos_train, "time", _SlowClock())
        summary, _ = fit_detector(
            first, synthetic_fields[:3], synthetic_fields[3:], _settings(1), tmp_path, resume=False, progress=False
        )
    assert summary["epochs"] == 1 and summary["resumed_from_epoch"] == 0
    assert set(summary["score_thresholds"]) == {"rbc", "wbc", "platelet"}
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    rows = _log(tmp_path)
    assert [r["epoch"] for r in rows] == ["1"] and float(rows[0]["loss"]) > 0

    second = _tiny()
    summary, _ = fit_detector(
        second, synthetic_fields[:3], synthetic_fields[3:], _settings(2), tmp_path, resume=True, progress=False
    )
    assert summary["epochs"] == 2 and summary["resumed_from_epoch"] == 1
    again = _log(tmp_path)
    assert [r["epoch"] for r in again] == ["1", "2"]
    assert again[0] == rows[0]  # epoch 1 was not run again (its wall seconds would differ)
    # the fit's seconds are the whole fit: the first session's (slow-clock) epoch counts too (issue 27)
    assert (
        float(again[0]["seconds"]) >= 60
        and summary["seconds"] >= float(again[0]["seconds"]) + float(again[1]["seconds"]) - 0.1
    )
    assert second.model.training is False
    image = np.asarray(Image.open(synthetic_fields[0].path))
    assert isinstance(second.detect_one(image), Detections)


def test_fit_refuses_a_long_side_other_than_the_detectors(synthetic_fields, tmp_path):
    with pytest.raises(ConfigError, match="long_side"):
        fit_fcos(_tiny(), synthetic_fields, _settings(1).model_copy(update={"long_side": 128}), tmp_path, False, False)


@needs_bccd()
def test_bccd_photographs_are_resized_once_with_their_boxes():
    items = load_voc(BCCD, "train")[:2]
    data = FieldBatches(items, long_side=320, seed=0, augment=False)
    for ann, img, boxes in zip(items, data.images, data.boxes):
        assert img.shape == (240, 320, 3)
        np.testing.assert_allclose(boxes, ann.boxes * 0.5, atol=1e-4)


# ---------------------------------------------------------------- the ONNX export (no PyTorch where it runs)

# landscape, portrait, square, larger than BCCD, one whose long side torch truncates to 383 (294 * (384 / 294) is
# 383.99...), one whose short side truncates (301 * 384 / 517 = 223.56 -> 223) and one smaller than the network's input
PHOTO_SIZES = [(480, 640), (640, 480), (500, 500), (750, 1000), (220, 294), (301, 517), (150, 200)]


@pytest.mark.parametrize("long_side", [384, 96])
def test_the_numpy_input_is_torchvisions_transform(long_side):
    """Resize (size, interpolation), normalisation and padding as GeneralizedRCNNTransform does them."""
    det = _tiny(long_side=long_side)
    rng = np.random.default_rng(5)
    for h, w in PHOTO_SIZES:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        x, (rh, rw) = network_input(image, long_side)
        with torch.inference_mode():
            images = det.model.transform([torch.tensor(image).permute(2, 0, 1).float().div_(255.0)])[0]
        assert images.image_sizes[0] == (rh, rw) == resized_size(h, w, long_side), (h, w)
        assert x.shape == tuple(images.tensors.shape), (h, w)
        assert np.abs(images.tensors.numpy() - x).max() < 1e-5, (h, w)
    assert resized_size(220, 294, 384) == (287, 383)  # torch truncates; round() would say 384


@pytest.mark.parametrize("n", [300, 1500], ids=["offset-trick", "class-by-class"])
def test_batched_nms_keeps_what_torchvision_keeps(n):
    """Both of torchvision's ways (boxes shifted apart per label up to 1000 boxes, one label at a time above)."""
    from torchvision.ops import batched_nms as tv_batched_nms

    rng = np.random.default_rng(n)
    xy = rng.uniform(0, 300, (n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(5, 60, (n, 2)).astype(np.float32)], axis=1)
    scores = rng.uniform(0.05, 1, n).astype(np.float32)
    labels = rng.integers(0, 4, n)
    want = tv_batched_nms(torch.from_numpy(boxes), torch.from_numpy(scores), torch.from_numpy(labels), 0.5).numpy()
    got = batched_nms(boxes, scores, labels, 0.5)
    assert 20 < len(want) < n
    np.testing.assert_array_equal(got, want)


# (photograph, resized, mean logit): many candidates (top-k, NMS and max_detections decide) or few (min_score decides)
@pytest.mark.parametrize(
    "original, resized, logit",
    [((480, 640), (288, 384), -4), ((500, 375), (384, 288), -4), ((150, 200), (288, 384), -9)],
)
def test_the_numpy_postprocess_is_fcos_postprocess(original, resized, logit):
    """Same head outputs in, same boxes, labels and scores out as FCOS's own postprocess_detections + transform
    (anchors from its AnchorGenerator: at 288 px the coarsest level has 5 cells, so a stride of 57, not 64)."""
    from torchvision.models.detection.image_list import ImageList

    from bloodcell.detect.fcos_onnx import postprocess

    model = _tiny(long_side=384).model
    padded = tuple(-(-s // 32) * 32 for s in resized)
    rng = np.random.default_rng(sum(original))
    levels = []
    for stride in (8, 16, 32, 64):
        h, w = -(-padded[0] // stride), -(-padded[1] // stride)
        levels.append(
            (
                rng.normal(logit, 2, (4, h, w)).astype(np.float32),
                rng.uniform(0, 4, (4, h, w)).astype(np.float32),
                rng.normal(0, 2, (1, h, w)).astype(np.float32),
            )
        )

    def flat(a):  # (C, h, w) -> (1, hw, C), as the head
        return torch.from_numpy(a).permute(1, 2, 0).reshape(1, -1, a.shape[0])

    images = ImageList(torch.zeros(1, 3, *padded), [resized])
    anchors = model.anchor_generator(images, [torch.zeros(1, 1, *lv[0].shape[1:]) for lv in levels])
    sizes = [lv[0].shape[1] * lv[0].shape[2] for lv in levels]
    outputs = {
        name: [flat(lv[k]) for lv in levels] for k, name in enumerate(("cls_logits", "bbox_regression", "bbox_ctrness"))
    }
    with torch.inference_mode():
        want = model.postprocess_detections(outputs, [list(anchors[0].split(sizes))], [resized])
        want = model.transform.postprocess(want, [resized], [original])[0]
    boxes, labels, scores = postprocess(levels, padded, resized, original, 0.05, 300)
    assert (len(want["boxes"]) == 300) == (logit == -4)
    np.testing.assert_array_equal(labels, want["labels"].numpy())
    np.testing.assert_allclose(scores, want["scores"].numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(boxes, want["boxes"].numpy(), rtol=0, atol=1e-3)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same(a: Detections, b: Detections) -> None:
    np.testing.assert_array_equal(a.boxes, b.boxes)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.scores, b.scores)


def test_an_exported_detector_keeps_its_weights_once_in_the_onnx_and_runs_any_shape(tmp_path):
    det = _tiny()
    save_detector(det, tmp_path)
    trained = _sha256(tmp_path / "detector.safetensors")
    section = export_bundled_detector(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "SEAL.json",
        "detector.json",
        "detector.onnx",
    ]  # one copy of the weights
    meta = json.loads((tmp_path / "detector.json").read_text())
    assert meta["onnx"] == json.loads(json.dumps(section)) and meta["detector"] == "fcos"  # one description
    assert meta["weights"] is None and section["state_dict"] == "initializers"
    assert section["exported_from"] == {"detector.safetensors": trained}
    assert section["sha256"] == _sha256(tmp_path / "detector.onnx")
    assert section["weights_sha256"] == weights_digest(det.tensors())
    assert section["max_abs_diff"] < 1e-3
    # with PyTorch, the folder is still the torch detector: its weights read from the graph, bit for bit
    back = load_detector(tmp_path)
    assert (
        isinstance(back, FCOSDetector) and back.options == det.options and back.score_thresholds == det.score_thresholds
    )
    assert weights_digest(back.tensors()) == section["weights_sha256"]
    image = np.random.default_rng(2).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    _same(back.detect_one(image), det.detect_one(image))
    onnx = load_detector(tmp_path / "detector.onnx")
    assert isinstance(onnx, FCOSOnnxDetector) and onnx.name == "fcos-onnx" and onnx.options == det.options
    assert onnx.score_thresholds == det.score_thresholds
    for h, w in [(96, 72), (72, 96), (41, 200)]:  # one graph, any height and width
        x, _ = network_input(np.zeros((h, w, 3), np.uint8), 96)
        levels = onnx.network(x)
        assert [lv[0].shape[1:] for lv in levels][0] == (x.shape[2] // 8, x.shape[3] // 8)
    (tmp_path / "other.onnx").write_bytes((tmp_path / "detector.onnx").read_bytes())
    with pytest.raises(ModelError, match="other.onnx was added after it was sealed"):
        load_detector(tmp_path / "other.onnx")
    seal(tmp_path)
    with pytest.raises(ModelError, match="does not describe it"):  # an .onnx its detector.json does not name
        load_detector(tmp_path / "other.onnx")


def test_the_graph_holds_every_tensor_by_its_state_dict_name(tmp_path):
    """BatchNorm kept (running_mean/var are initializers), nothing folded; the one thing left out is
    num_batches_tracked, and a bit-equal tensor stored once is found under both names (an Identity node)."""
    det = _tiny()
    export_graph(det, tmp_path / "g.onnx")
    arrays = graph_tensors(tmp_path / "g.onnx")
    own = det.model.state_dict()
    assert sorted(arrays) == sorted(k for k in own if not k.endswith(".num_batches_tracked"))
    for k, a in arrays.items():
        np.testing.assert_array_equal(a, own[k].numpy(), err_msg=k)
    # untrained, both BatchNorm biases of a downsampling block are zeros: the exporter stores them once
    import onnx

    stored = {t.name for t in onnx.load(str(tmp_path / "g.onnx")).graph.initializer}
    assert (
        "backbone.body.layer2.0.downsample.1.bias" not in stored
        and "backbone.body.layer2.0.downsample.1.bias" in arrays
    )


def test_refresh_works_from_a_folder_that_has_only_the_onnx(tmp_path):
    det = _tiny()
    save_detector(det, tmp_path)
    first = export_bundled_detector(tmp_path)
    again = export_bundled_detector(tmp_path)  # its weights now come from detector.onnx
    assert again["exported_from"] == first["exported_from"] and again["weights_sha256"] == first["weights_sha256"]
    assert again["sha256"] == first["sha256"] == _sha256(tmp_path / "detector.onnx")  # the same graph, byte for byte
    # another detector's graph in its place: not the weights detector.json records
    other = tmp_path / "other"
    torch.manual_seed(1)
    save_detector(create_detector("fcos", **TINY), other)
    export_bundled_detector(other)
    (tmp_path / "detector.onnx").write_bytes((other / "detector.onnx").read_bytes())
    seal(tmp_path)  # sealed that way: export still refuses a graph of other weights
    with pytest.raises(ModelError, match="not the ones detector.json records"):
        export_bundled_detector(tmp_path)


def test_onnx_weights_that_do_not_fit_are_one_line_errors(tmp_path):
    """A folder whose weights are its graph's: another architecture's graph, a graph with BatchNorm folded into the
    convolutions (the export before weights were kept there) and a torn file each fail in one line naming the file."""
    save_detector(_tiny(), tmp_path)
    export_bundled_detector(tmp_path)
    onnx_file = tmp_path / "detector.onnx"
    export_graph(_tiny(fpn_channels=64), onnx_file)
    with pytest.raises(ModelError, match=r"detector\.onnx changed since it was sealed"):  # the seal names it first
        load_detector(tmp_path)
    seal(tmp_path)  # sealed that way, each still fails on its own check
    with pytest.raises(
        ModelError, match=r"detector\.onnx: fcos weights do not fit this architecture: backbone\.fpn"
    ) as err:
        load_detector(tmp_path)
    assert len(str(err.value).splitlines()) == 1
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            detector_export._RawOutputs(_tiny().model).eval(),
            (torch.zeros(1, 3, 96, 96),),
            str(onnx_file),
            dynamo=False,
            opset_version=17,
        )  # the exporter's defaults: folded, under generated names
    seal(tmp_path)
    with pytest.raises(ModelError, match=r"detector\.onnx: the graph holds tensors the fcos detector lacks \(onnx::"):
        load_detector(tmp_path)
    onnx_file.write_bytes(b"not a graph")
    seal(tmp_path)
    with pytest.raises(ModelError, match=r"detector\.onnx: not readable as ONNX"):
        load_detector(tmp_path)
    onnx_file.unlink()
    seal(tmp_path)
    with pytest.raises(ModelError, match=r"detector\.onnx: the detector's ONNX file is missing"):
        load_detector(tmp_path)


def test_an_export_that_computes_something_else_is_refused(tmp_path, monkeypatch):
    save_detector(_tiny(), tmp_path)
    real = FCOSOnnxDetector.network
    monkeypatch.setattr(
        FCOSOnnxDetector, "network", lambda self, x: [tuple(v + 0.01 for v in lv) for lv in real(self, x)]
    )
    with pytest.raises(ModelError, match="differs from PyTorch"):
        export_bundled_detector(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SEAL.json", "detector.json", "detector.safetensors"]
    assert "onnx" not in json.loads((tmp_path / "detector.json").read_text())


def test_an_export_that_does_not_hold_the_weights_is_refused(tmp_path, monkeypatch):
    save_detector(_tiny(), tmp_path)
    real = detector_export.graph_tensors

    def one_changed(path):
        arrays = real(path)
        arrays["head.classification_head.cls_logits.bias"] = arrays[
            "head.classification_head.cls_logits.bias"
        ] + np.float32(1e-6)
        return arrays

    monkeypatch.setattr(detector_export, "graph_tensors", one_changed)
    with pytest.raises(
        ModelError, match="does not hold its weights under their names .head.classification_head.cls_logits.bias"
    ):
        export_bundled_detector(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["SEAL.json", "detector.json", "detector.safetensors"]


def test_without_pytorch_load_detector_takes_the_onnx_export(monkeypatch):
    assert isinstance(load_detector(None), FCOSDetector)
    monkeypatch.setattr(detector_module, "has_torch", lambda: False)
    det = load_detector(None)
    assert isinstance(det, FCOSOnnxDetector) and det.onnx_file == bundled_detector_dir() / "detector.onnx"
    assert det.score_thresholds == load_detector(bundled_detector_dir()).score_thresholds


def test_the_bundled_detector_keeps_its_trained_weights_once_in_its_onnx():
    """detector.json + detector.onnx, nothing else: the file is the one exported (its SHA-256), and the weights the
    torch FCOS reads from it are the trained ones (weights_sha256, taken from the run's detector.safetensors at
    export)."""
    folder = bundled_detector_dir()
    assert sorted(p.name for p in folder.iterdir() if p.name != "__pycache__") == [
        "DETECTOR_CARD.md",
        "SEAL.json",
        "detector.json",
        "detector.onnx",
    ]
    meta = json.loads((folder / "detector.json").read_text())
    section = meta["onnx"]
    assert section["file"] == "detector.onnx" and section["detector"] == "fcos-onnx"
    assert meta["weights"] is None and section["state_dict"] == "initializers"
    assert section["sha256"] == _sha256(folder / "detector.onnx"), (
        "detector.onnx is not the file detector.json describes: "
        "tools/bundle_detector.py RUN src/bloodcell/assets/default_detector"
    )
    assert weights_digest(load_detector(folder).tensors()) == section["weights_sha256"]
    assert (
        list(section["exported_from"]) == ["detector.safetensors"]
        and len(section["exported_from"]["detector.safetensors"]) == 64
    )
    assert (folder / "detector.onnx").stat().st_size < 20e6


@pytest.fixture(scope="module")
def bundled_pair():
    """The bundled detector through PyTorch and through its ONNX export."""
    folder = bundled_detector_dir()
    return load_detector(folder), load_detector(folder / "detector.onnx")


def assert_same_detections(torch_det, onnx_det, image: np.ndarray, what: str) -> int:
    """Same counts per class at the operating thresholds, boxes paired with IoU > 0.99, same labels, scores within
    1e-3."""
    want, got = torch_det.detect([image])[0], onnx_det.detect([image])[0]
    assert got.counts() == want.counts(), what
    a = agreement(want, got)
    assert a["unpaired"] == 0 and a["label_mismatches"] == 0, (what, a)
    assert a["min_iou"] > 0.99 and a["max_score_diff"] < 1e-3, (what, a)
    return len(want)


def test_onnx_detector_finds_what_pytorch_finds_on_generated_photographs(bundled_pair, tmp_path):
    torch_det, onnx_det = bundled_pair
    found = 0
    for i, (h, w) in enumerate(PHOTO_SIZES):
        image = np.array(Image.open(field_photo(tmp_path / f"{i}.jpg", size=(w, h), seed=i)))
        found += assert_same_detections(torch_det, onnx_det, image, f"{w}x{h}")
    assert found > 20  # it compared boxes, not empty lists


@needs_bccd()
def test_onnx_detector_finds_what_pytorch_finds_on_bccd_photographs(bundled_pair):
    torch_det, onnx_det = bundled_pair
    test = load_voc(BCCD, "test")
    found = sum(
        assert_same_detections(torch_det, onnx_det, np.array(Image.open(a.path).convert("RGB")), a.name)
        for a in test[::6]
    )  # 12 of the 72
    assert found > 100

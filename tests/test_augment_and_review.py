"""Cell augmentation (augment_batch), one operation at a time, and the review-threshold rule.

The lab-shift operations (stain, white balance, colour matrix, gamma, grayscale, blur, noise) are in test_lab_shift.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bloodcell.config import AugmentConfig
from bloodcell.evaluate.run import choose_review_threshold
from bloodcell.train.augment import augment_batch

B, S = 64, 32  # batch size, image side
ALL_OFF = dict(
    hflip=False,
    vflip=False,
    rot90=False,
    degrees=0.0,
    translate=0.0,
    scale=(1.0, 1.0),
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
)
GRAY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # luma weights (ITU-R 601)


def only(**ops) -> AugmentConfig:
    """An augmentation config with every operation off except `ops`."""
    return AugmentConfig(enabled=True, **{**ALL_OFF, **ops})


def run(x: torch.Tensor, cfg: AugmentConfig, seed: int = 0) -> torch.Tensor:
    return augment_batch(x.clone(), cfg, torch.Generator().manual_seed(seed))


def random_batch(lo: float = 0.0, hi: float = 1.0, b: int = B, h: int = S, w: int = S, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g) * (hi - lo) + lo


def luma(x: torch.Tensor) -> torch.Tensor:
    return (x * GRAY.to(x.dtype)).sum(1, keepdim=True)


def moments(img: torch.Tensor) -> tuple[float, float, float, float, float]:
    """Centroid (cx, cy) and central second moments (mxx, myy, mxy) of a (H, W) intensity image."""
    h, w = img.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=img.dtype), torch.arange(w, dtype=img.dtype), indexing="ij")
    m = img.sum()
    cx, cy = (img * xx).sum() / m, (img * yy).sum() / m
    mxx = (img * (xx - cx) ** 2).sum() / m
    myy = (img * (yy - cy) ** 2).sum() / m
    mxy = (img * (xx - cx) * (yy - cy)).sum() / m
    return float(cx), float(cy), float(mxx), float(myy), float(mxy)


def blob_batch(sigma: float = 3.0) -> torch.Tensor:
    """Every sample: a Gaussian spot of width `sigma` px in the middle of a black image."""
    c = (S - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(S, dtype=torch.float32), torch.arange(S, dtype=torch.float32), indexing="ij")
    spot = torch.exp(-((xx - c) ** 2 + (yy - c) ** 2) / (2 * sigma**2))
    return spot.expand(B, 3, S, S).clone()


def bar_batch() -> torch.Tensor:
    """Every sample: a horizontal white bar (18 x 4 px) centred in a black image."""
    x = torch.zeros(B, 3, S, S)
    x[:, :, 14:18, 7:25] = 1.0
    return x


# ---------------------------------------------------------------------- one operation at a time


def test_everything_off_leaves_the_batch_unchanged():
    x = random_batch()
    assert torch.equal(run(x, only()), x)


@pytest.mark.parametrize("op, dims", [("hflip", (3,)), ("vflip", (2,))])
def test_flip_gives_each_sample_either_itself_or_its_mirror_image_and_both_occur(op, dims):
    x = random_batch()
    out = run(x, only(**{op: True}))
    same = [torch.equal(o, xi) for o, xi in zip(out, x)]
    mirrored = [torch.equal(o, xi.flip(dims[0] - 1)) for o, xi in zip(out, x)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert 0 < sum(mirrored) < B  # some flipped, some not


def test_rot90_turns_each_sample_by_a_multiple_of_90_degrees_and_all_four_occur():
    x = random_batch()
    out = run(x, only(rot90=True))
    turns = []
    for o, xi in zip(out, x):
        k = [k for k in range(4) if torch.equal(o, torch.rot90(xi, k, dims=(1, 2)))]
        assert len(k) == 1
        turns += k
    assert set(turns) == {0, 1, 2, 3}


def test_rot90_leaves_non_square_images_alone():
    """A quarter turn would change the shape of a non-square batch, so it is skipped."""
    x = random_batch(h=24, w=32)
    assert torch.equal(run(x, only(rot90=True)), x)


def test_degrees_rotates_by_an_angle_within_plus_or_minus_degrees():
    x = bar_batch()
    out = run(x, only(degrees=30.0))
    angles = []
    for o in out:
        _, _, mxx, myy, mxy = moments(o[0])
        angles.append(math.degrees(0.5 * math.atan2(2 * mxy, mxx - myy)))  # the bar's orientation
    angles = np.array(angles)
    assert np.abs(angles).max() <= 31.0
    assert angles.min() < -15 and angles.max() > 15  # spread over the range, both ways
    # a rotation about the centre keeps the bar's centre and its length
    for o in out:
        cx, cy, mxx, myy, _ = moments(o[0])
        assert abs(cx - 15.5) < 0.3 and abs(cy - 15.5) < 0.3
        assert mxx + myy == pytest.approx(moments(x[0, 0])[2] + moments(x[0, 0])[3], rel=0.1)


def test_translate_shifts_by_at_most_translate_times_the_side():
    x = blob_batch()
    out = run(x, only(translate=0.1))
    c0 = moments(x[0, 0])[:2]
    shifts = np.array([[a - b for a, b in zip(moments(o[0])[:2], c0)] for o in out])  # (B, 2): dx, dy in px
    assert np.abs(shifts).max() <= 0.1 * S + 0.2
    for axis in (0, 1):
        assert shifts[:, axis].min() < -1.5 and shifts[:, axis].max() > 1.5
    # the spot moves without changing size
    for o in out:
        assert moments(o[0])[2] == pytest.approx(moments(x[0, 0])[2], rel=0.05)


def test_scale_zooms_by_a_factor_within_the_range():
    """scale (1.2, 1.5): the spot grows by 1.2-1.5 times in width, and stays where it was."""
    x = blob_batch(sigma=2.5)
    out = run(x, only(scale=(1.2, 1.5)))
    width0 = math.sqrt(moments(x[0, 0])[2])
    factors = []
    for o in out:
        cx, cy, mxx, _, _ = moments(o[0])
        assert abs(cx - moments(x[0, 0])[0]) < 0.3 and abs(cy - moments(x[0, 0])[1]) < 0.3
        factors.append(math.sqrt(mxx) / width0)
    factors = np.array(factors)
    assert factors.min() >= 1.15 and factors.max() <= 1.55
    assert factors.max() - factors.min() > 0.15  # a factor per sample


def test_brightness_multiplies_each_sample_by_one_factor_within_the_range():
    x = random_batch(0.1, 0.5)  # x * 1.5 stays below 1: nothing is clipped
    out = run(x, only(brightness=0.5))
    ratio = out / x
    per_sample = ratio.flatten(1)
    assert (per_sample.std(1) < 1e-5).all()  # one factor for the whole sample
    f = per_sample.mean(1)
    assert f.min() >= 0.5 - 1e-5 and f.max() <= 1.5 + 1e-5
    assert f.min() < 0.8 and f.max() > 1.2


def test_contrast_scales_deviations_from_the_mean_grey_and_keeps_the_mean():
    x = random_batch(0.35, 0.65)
    out = run(x, only(contrast=0.5))
    mean_in = luma(x).mean(dim=(1, 2, 3))
    mean_out = luma(out).mean(dim=(1, 2, 3))
    torch.testing.assert_close(mean_out, mean_in, atol=1e-5, rtol=0)
    dev_in = x - mean_in.view(-1, 1, 1, 1)
    dev_out = out - mean_in.view(-1, 1, 1, 1)
    f = (dev_out * dev_in).flatten(1).sum(1) / (dev_in**2).flatten(1).sum(1)  # least-squares factor per sample
    torch.testing.assert_close(dev_out, dev_in * f.view(-1, 1, 1, 1), atol=1e-5, rtol=0)
    assert f.min() >= 0.5 - 1e-4 and f.max() <= 1.5 + 1e-4
    assert f.min() < 0.8 and f.max() > 1.2


def test_saturation_scales_colour_around_each_pixels_grey_and_keeps_the_grey():
    """saturation 1: factors 0-2; a factor near 0 leaves (almost) a grey image."""
    x = random_batch(0.35, 0.65)  # twice as colourful stays inside [0, 1]
    out = run(x, only(saturation=1.0))
    torch.testing.assert_close(luma(out), luma(x), atol=1e-5, rtol=0)
    chroma_in, chroma_out = x - luma(x), out - luma(x)
    f = (chroma_out * chroma_in).flatten(1).sum(1) / (chroma_in**2).flatten(1).sum(1)
    torch.testing.assert_close(chroma_out, chroma_in * f.view(-1, 1, 1, 1), atol=1e-5, rtol=0)
    assert f.min() >= -1e-4 and f.max() <= 2 + 1e-4
    assert f.min() < 0.1 and f.max() > 1.5
    nearly_grey = out[int(f.argmin())]
    assert float((nearly_grey - nearly_grey.mean(0, keepdim=True)).abs().max()) < 0.1 * float(chroma_in.abs().max())


def test_hue_rotates_colour_around_the_grey_axis_by_at_most_hue_turns():
    """The YIQ hue rotation keeps brightness (Y) and colourfulness (|IQ|); the angle of IQ turns by up to 2 pi hue."""
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64)
    x = random_batch(0.4, 0.6).double()  # near grey: any turn of its colour stays inside [0, 1]
    out = run(x, only(hue=0.1))
    a, b = torch.einsum("ij,bjhw->bihw", yiq, x), torch.einsum("ij,bjhw->bihw", yiq, out)
    torch.testing.assert_close(b[:, 0], a[:, 0], atol=1e-9, rtol=0)  # Y
    torch.testing.assert_close(b[:, 1:].norm(dim=1), a[:, 1:].norm(dim=1), atol=1e-9, rtol=0)  # |IQ|
    turn = torch.atan2(b[:, 2], b[:, 1]) - torch.atan2(a[:, 2], a[:, 1])
    turn = torch.remainder(turn + math.pi, 2 * math.pi) - math.pi  # (B, H, W), in (-pi, pi]
    per_sample = turn.flatten(1)
    assert (per_sample.std(1) < 1e-6).all()  # one angle for every pixel of a sample
    angle = per_sample.mean(1)
    assert angle.abs().max() <= 2 * math.pi * 0.1 + 1e-6
    assert angle.min() < -0.3 and angle.max() > 0.3


@pytest.mark.parametrize(
    "ops",
    [
        dict(hflip=True),
        dict(vflip=True),
        dict(rot90=True),
        dict(degrees=180.0),
        dict(translate=0.5),
        dict(scale=(0.5, 2.0)),
        dict(brightness=1.0),
        dict(contrast=1.0),
        dict(saturation=1.0),
        dict(hue=0.5),
        {},
    ],
    ids=lambda ops: ",".join(ops) or "defaults",
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_operation_keeps_shape_and_dtype_stays_in_0_1_and_changes_the_batch(ops, dtype):
    x = random_batch().to(dtype)  # values reach 0 and 1: the strongest settings push them out unless clamped
    cfg = only(**ops) if ops else AugmentConfig(enabled=True)  # {}: every operation at its default
    out = run(x, cfg)
    assert out.shape == x.shape and out.dtype == dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)


def test_same_generator_seed_gives_the_same_batch_and_another_seed_another():
    cfg = AugmentConfig(enabled=True)
    x = random_batch()
    assert torch.equal(run(x, cfg, seed=5), run(x, cfg, seed=5))
    assert not torch.equal(run(x, cfg, seed=5), run(x, cfg, seed=6))


def test_augmentation_sees_only_training_batches_never_validation_or_test(tmp_path, monkeypatch):
    """A full run (fit, then evaluation) augments exactly its training images once per epoch, and nothing else."""
    import bloodcell.train.module as module
    from test_train import read_history, train, write_cfg

    seen = []
    original = module.augment_batch
    monkeypatch.setattr(module, "augment_batch", lambda x, cfg, g: seen.append(len(x)) or original(x, cfg, g))
    base = {
        "model": {"name": "cnn"},
        "data": {"input_size": 16},
        "train": {"epochs": 2, "batch_size": 32, "precision": "32-true", "accelerator": "cpu"},
        "eval": {"bootstrap": 0, "grid_images": 0},
    }
    metrics = train(write_cfg(tmp_path / "on.yaml", {**base, "augment": {"enabled": True}}), tmp_path / "on")
    sizes = metrics["provenance"]["sizes"]
    assert sizes["val"] > 0 and sizes["test"] > 0
    assert len(read_history(tmp_path / "on")) == 2
    assert sum(seen) == 2 * sizes["train"]  # training batches only: no validation image, no test image
    seen.clear()
    train(write_cfg(tmp_path / "off.yaml", {**base, "augment": {"enabled": False}}), tmp_path / "off")
    assert seen == []  # off by default: training does not augment either


# ---------------------------------------------------------------------- review threshold


def confidences(groups: list[tuple[int, float, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Four-class probabilities and labels from (count, top probability, right?) groups; class 0 is always predicted."""
    probs, y = [], []
    for n, conf, right in groups:
        probs += [[conf] + [(1 - conf) / 3] * 3] * n
        y += [0 if right else 1] * n
    return np.array(probs), np.array(y)


def test_review_threshold_is_the_lowest_confidence_above_which_99_percent_are_right():
    # at t <= 0.40 all 200 kept, 195 right (97.5 %); at t <= 0.70 105 kept, 100 right (95 %);
    # above 0.70 only the 100 right
    probs, y = confidences([(100, 0.95, True), (5, 0.70, False), (95, 0.40, True)])
    assert choose_review_threshold(probs, y) == pytest.approx(0.71)


def test_review_threshold_accepts_exactly_99_percent_right():
    probs, y = confidences([(99, 0.9, True), (1, 0.9, False)])
    assert choose_review_threshold(probs, y) == pytest.approx(0.30)  # the lowest searched: all kept, 99 % right
    probs, y = confidences([(98, 0.9, True), (2, 0.9, False)])
    assert choose_review_threshold(probs, y) == pytest.approx(0.99)  # never 99 % right: the highest


def test_review_threshold_keeps_at_least_10_cells():
    # above 0.60 only the right ones are kept: 9 of them are too few, 10 are enough
    probs, y = confidences([(9, 0.98, True), (10, 0.60, False), (81, 0.50, True)])
    assert choose_review_threshold(probs, y) == pytest.approx(0.99)
    probs, y = confidences([(10, 0.98, True), (10, 0.60, False), (80, 0.50, True)])
    assert choose_review_threshold(probs, y) == pytest.approx(0.61)


def test_review_threshold_keeps_at_least_5_percent_of_the_validation_part():
    # 1000 cells: above 0.50 only the right ones are kept; 40 (4 %) are too few, 50 (5 %) are enough
    probs, y = confidences([(40, 0.97, True), (100, 0.50, False), (860, 0.40, True)])
    assert choose_review_threshold(probs, y) == pytest.approx(0.99)
    probs, y = confidences([(50, 0.97, True), (100, 0.50, False), (850, 0.40, True)])
    assert choose_review_threshold(probs, y) == pytest.approx(0.51)

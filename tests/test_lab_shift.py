"""Shifts between labs: the white-balance preprocessing step and the lab-shift augmentations."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bloodcell.config import AugmentConfig, parse_config
from bloodcell.data.images import balance_background, load_array
from bloodcell.errors import ConfigError
from bloodcell.models.metadata import write_model_json
from bloodcell.train.augment import _gaussian_blur, _stain_shift, augment_batch

from conftest import toy_run


def smear(background=(250, 240, 150), cell=(120, 60, 110), size=64) -> np.ndarray:
    """A flat background with a darker disc in the middle: the simplest 'cell on a smear'."""
    img = np.empty((size, size, 3), np.uint8)
    img[:] = background
    yy, xx = np.mgrid[:size, :size]
    img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] = cell
    return img


# ---------------------------------------------------------------------- white balance


def test_background_balance_makes_any_cast_white_and_keeps_relative_colour():
    yellow, pink = smear((250, 240, 150), (125, 60, 75)), smear((240, 220, 225), (120, 55, 112))
    for img in (yellow, pink):
        out = balance_background(img)
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert np.abs(out[0, 0].astype(int) - 255).max() <= 1  # the background is white
    # the cell keeps its colour relative to the background: channel ratios cell / background are unchanged
    out = balance_background(yellow)
    np.testing.assert_allclose(out[32, 32] / 255.0, yellow[32, 32] / yellow[0, 0], atol=2 / 255)
    # both smears' backgrounds now agree although they started 90 grey levels apart in blue
    assert np.abs(balance_background(pink)[0, 0].astype(int) - out[0, 0].astype(int)).max() <= 1


def test_load_array_applies_the_balance_only_when_asked(tmp_path):
    path = tmp_path / "cell.png"
    Image.fromarray(smear()).save(path)
    plain = load_array(path, 32, "bilinear")
    balanced = load_array(path, 32, "bilinear", white_balance="background")
    np.testing.assert_array_equal(balanced, balance_background(plain))
    assert not np.array_equal(plain, balanced)
    with pytest.raises(ValueError, match="unknown white_balance 'grey'"):
        load_array(path, 32, "bilinear", white_balance="grey")
    with pytest.raises(ConfigError, match="data.white_balance"):
        parse_config({"data": {"white_balance": "grey"}})


def test_predictor_reads_the_step_from_model_json_and_uses_it(tmp_path):
    from bloodcell.infer import Predictor

    run = toy_run(tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    buf = io.BytesIO()
    Image.fromarray(smear()).save(buf, format="PNG")
    plain = Predictor.load(run)
    assert plain.white_balance == "none"
    meta["preprocess"] = {"input_size": 32, "interpolation": "bilinear", "white_balance": "background"}
    write_model_json(run, meta)
    balanced = Predictor.load(run)
    assert balanced.white_balance == "background"
    np.testing.assert_array_equal(balanced.decode(buf.getvalue()), balance_background(plain.decode(buf.getvalue())))
    a = plain.predict_images([("x.png", buf.getvalue())])["predictions"][0]["probabilities"]
    b = balanced.predict_images([("x.png", buf.getvalue())])["predictions"][0]["probabilities"]
    assert a != b  # the model really sees the balanced image
    meta["preprocess"]["white_balance"] = "magic"
    write_model_json(run, meta)
    from bloodcell.errors import ModelError

    with pytest.raises(ModelError, match="unknown white_balance 'magic'"):
        Predictor.load(run)


def test_cache_keeps_balanced_and_plain_arrays_apart(tmp_path):
    from bloodcell.data.cache import build_cache
    from bloodcell.data.discover import scan

    from conftest import make_tree

    inv = scan(make_tree(tmp_path / "ds", {"a": 3, "b": 3}), progress=False, cache_dir=None)
    plain = build_cache(inv, 16, "bilinear", tmp_path / "c", progress=False, workers=1)
    balanced = build_cache(inv, 16, "bilinear", tmp_path / "c", progress=False, workers=1, white_balance="background")
    assert plain.path != balanced.path
    np.testing.assert_array_equal(np.asarray(balanced.images[0]), balance_background(np.asarray(plain.images[0])))


# ---------------------------------------------------------------------- augmentations


def batch(n=6, size=32, seed=0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    imgs = np.stack(
        [
            smear(
                tuple(int(v) for v in rng.integers(200, 256, 3)), tuple(int(v) for v in rng.integers(40, 160, 3)), size
            )
            for _ in range(n)
        ]
    )
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255


OFF = dict(
    enabled=True,
    hflip=False,
    vflip=False,
    rot90=False,
    degrees=0,
    translate=0,
    scale=(1.0, 1.0),
    brightness=0,
    contrast=0,
    saturation=0,
    hue=0,
)


@pytest.mark.parametrize(
    "option",
    [
        {"stain": 0.3},
        {"stain_bias": 0.05},
        {"white_balance": 0.2},
        {"color_matrix": 0.2},
        {"gamma": 0.4},
        {"grayscale": 1.0},
        {"blur": 2.0},
        {"noise": 0.05},
        {"scale": (1.5, 2.5)},
    ],
)
def test_each_lab_shift_changes_the_batch_keeps_shape_range_and_repeats_with_the_seed(option):
    x = batch()
    cfg = AugmentConfig(**{**OFF, **option})
    a = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - x).abs().max() > 0.01
    assert torch.equal(augment_batch(x, AugmentConfig(**OFF), torch.Generator().manual_seed(1)), x.clamp(0, 1))


def test_stain_shift_is_scikit_image_deconvolution_and_back():
    from skimage.color import hed2rgb, rgb2hed

    x = batch(3)
    same = _stain_shift(x, torch.ones(3, 3), torch.zeros(3, 3))
    want = np.stack([hed2rgb(rgb2hed(im.permute(1, 2, 0).numpy())) for im in x])
    np.testing.assert_allclose(same.permute(0, 2, 3, 1).numpy(), want, atol=1e-5)
    more_h = _stain_shift(x, torch.tensor([[1.5, 1.0, 1.0]] * 3), torch.zeros(3, 3))
    assert (more_h.mean() < same.mean()).item()  # more stain absorbs more light


def test_grayscale_and_zoom_do_what_they_say():
    x = batch(4)
    grey = augment_batch(x, AugmentConfig(**{**OFF, "grayscale": 1.0}), torch.Generator().manual_seed(0))
    assert torch.allclose(grey[:, 0], grey[:, 1]) and torch.allclose(grey[:, 1], grey[:, 2])
    zoom = augment_batch(x, AugmentConfig(**{**OFF, "scale": (2.0, 2.0)}), torch.Generator().manual_seed(0))
    dark = lambda t: (t.mean(1) < 0.7).float().mean().item()  # noqa: E731  share of the frame the disc covers
    assert dark(zoom) == pytest.approx(4 * dark(x), rel=0.15)  # twice the diameter, four times the area


def test_blur_smooths_and_zero_sigma_keeps_a_sample():
    x = batch(2)
    y = _gaussian_blur(x, torch.tensor([0.0, 2.0]))
    assert torch.allclose(y[0], x[0], atol=1e-5)
    edge = lambda t: (t[:, :, 1:] - t[:, :, :-1]).abs().max().item()  # noqa: E731  the steepest step
    assert edge(y[1]) < 0.7 * edge(x[1])


def test_scale_range_must_be_ordered():
    with pytest.raises(ConfigError, match="augment.scale"):
        parse_config({"augment": {"scale": [2.0, 0.5]}})

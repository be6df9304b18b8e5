"""benchmarks/robustness.py: what each shift does to an image, and one tiny end-to-end run of main()."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_benchmark, make_tree

rb = load_benchmark("robustness")

BACKGROUND = (230, 200, 190)
CELL = (80, 40, 120)


def disc_image(size: int = 128, radius: float = 16.0, width: int | None = None) -> np.ndarray:
    h, w = size, width or size
    yy, xx = np.mgrid[:h, :w]
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    img[(yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= radius**2] = CELL
    return img


def dark_components(img: np.ndarray) -> tuple[np.ndarray, int]:
    from skimage.measure import label

    return label(img.astype(int).sum(axis=-1) < (sum(BACKGROUND) + sum(CELL)) / 2, return_num=True)


def central_radius(img: np.ndarray) -> float:
    """Radius (from its area) of the dark blob under the image centre."""
    labels, _ = dark_components(img)
    centre = labels[img.shape[0] // 2, img.shape[1] // 2]
    assert centre > 0, "no blob at the centre"
    return float(np.sqrt((labels == centre).sum() / np.pi))


def textured(seed: int = 0) -> np.ndarray:
    """A colourful non-square image with a cell: every shift has something to change."""
    rng = np.random.default_rng(seed)
    img = disc_image(72, 18, width=64).astype(np.int16)
    img += rng.integers(-25, 26, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", list(rb.SHIFTS))
def test_shift_keeps_shape_and_dtype_and_changes_the_image(name):
    img = textured()
    before = img.copy()
    out = rb.SHIFTS[name](img, rb.image_rng(0, 3))
    assert out.shape == img.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(img, before)  # the input is not modified in place
    diff = np.abs(out.astype(int) - img.astype(int)).mean()
    if name == "none":
        assert diff == 0
    else:
        assert diff > 1.0, f"{name} barely changes the image (mean |diff| {diff:.2f})"


@pytest.mark.parametrize(
    "name", ["rescale 2x", "rescale 1.5x", "rescale 0.75x", "rescale 0.5x", "rescale 0.5x (flat pad)"]
)
def test_rescale_scales_a_centred_disc(name):
    s = {"rescale 2x": 2.0, "rescale 1.5x": 1.5, "rescale 0.75x": 0.75}.get(name, 0.5)
    r = 16.0
    img = disc_image(128, r)
    assert central_radius(img) == pytest.approx(r, abs=0.5)
    out = rb.SHIFTS[name](img, rb.image_rng(0, 0))
    assert central_radius(out) == pytest.approx(s * r, abs=max(1.0, 0.06 * s * r))


def test_rescale_on_non_square_images_and_flat_pad_adds_no_copies():
    img = disc_image(96, 12, width=80)
    for s in (0.5, 0.75, 1.5, 2.0):
        out = rb.rescale(img, s)
        assert out.shape == img.shape
        assert central_radius(out) == pytest.approx(s * 12, abs=1.0)
    # reflect padding at 0.5x mirrors parts of the disc into the border (documented); the flat pad does not
    assert dark_components(rb.rescale(img, 0.5))[1] > 1
    flat = rb.rescale(img, 0.5, pad_mode="background")
    assert dark_components(flat)[1] == 1
    assert tuple(flat[0, 0]) == BACKGROUND


def test_yellow_background_lowers_blue_and_keeps_red_green():
    img = textured()
    # tecom-like = the 2x rescale, then the same white balance
    for name, ref in (("yellow background", img), ("tecom-like (2x + yellow)", rb.rescale(img, 2.0))):
        out = rb.SHIFTS[name](img, rb.image_rng(0, 0)).astype(float)
        assert out[..., 2].mean() < 0.7 * ref[..., 2].mean()
        assert out[..., 0].mean() >= ref[..., 0].mean() and out[..., 1].mean() >= ref[..., 1].mean()


def test_noise_is_seeded():
    img = textured()
    noisy = rb.SHIFTS["noise sd 0.05"]
    a, b = noisy(img, rb.image_rng(7, 11)), noisy(img, rb.image_rng(7, 11))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, noisy(img, rb.image_rng(7, 12)))
    assert not np.array_equal(a, noisy(img, rb.image_rng(8, 11)))
    sd = (a.astype(float) - img.astype(float)).std() / 255
    assert 0.035 < sd < 0.06


def test_stain_shift_strength_orders_the_change():
    img = textured()
    mild = np.abs(rb.SHIFTS["stain mild (H x1.15, E x0.85)"](img, None).astype(int) - img).mean()
    strong = np.abs(rb.SHIFTS["stain strong (H x1.4, E x0.6, +H)"](img, None).astype(int) - img).mean()
    assert 0 < mild < strong


def tiny_run(directory: Path, names: list[str]) -> Path:
    from bloodcell.models import create_model
    from bloodcell.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = create_model("cnn", num_classes=len(names), input_size=32)
    with torch.no_grad():
        model.head[-1].weight.mul_(25)
    return save_checkpoint(model, directory, {"class_names": names})


def test_main_end_to_end_on_a_tiny_folder(tmp_path, capsys):
    from bloodcell.config import parse_config
    from bloodcell.data.discover import scan
    from bloodcell.data.prepare import _split_config
    from bloodcell.data.split import make_split
    from bloodcell.infer import Predictor

    names = ["alpha", "beta", "gamma"]
    data = make_tree(tmp_path / "ds", {"alpha": 12, "beta": 9, "gamma": 7}, size=(48, 40))
    run = tiny_run(tmp_path / "run", names)
    out = tmp_path / "out" / "robustness.json"
    png = tmp_path / "out" / "shifts.png"
    report = rb.main(
        [
            "--model",
            str(run),
            "--name",
            "tiny",
            "--model",
            str(Path(run) / "model.safetensors"),
            "--data",
            str(data),
            "--limit",
            "0",
            "--chunk",
            "4",
            "--bootstrap",
            "50",
            "--json",
            str(out),
            "--save-examples",
            str(png),
        ]
    )
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert png.stat().st_size > 0

    # the test part is the one training makes with the bundled model's split options
    meta = Predictor.load(None).metadata
    inv = scan(data, progress=False)
    split = make_split(inv, _split_config(parse_config(meta["training_config"])))
    assert saved["data"]["test"] == len(split.test) == saved["subset"]["n"]

    assert saved["shifts"] == list(rb.SHIFTS) and list(saved["results"]) == list(rb.SHIFTS)
    for shift, row in saved["results"].items():
        assert set(row) == {"tiny", "model.safetensors"}
        for cell in row.values():
            assert cell["n"] == len(split.test)
            assert cell["ci95"][0] <= cell["accuracy"] <= cell["ci95"][1]
            assert cell["correct"] == round(cell["accuracy"] * cell["n"])
            assert set(cell["predicted"]) == set(names) and sum(cell["predicted"].values()) == cell["n"]
        # the same model loaded two ways scores the same
        assert row["tiny"]["accuracy"] == row["model.safetensors"]["accuracy"]
    assert saved["results"]["none"]["tiny"]["drop_vs_none"] == 0

    # unshifted, the benchmark agrees with production inference on the files themselves
    files = [inv.path(i) for i in split.test]
    direct = Predictor.load(run).predict_paths(files, progress=False)["predictions"]
    truth = [inv.records[i].label for i in split.test]
    expected = np.mean([p["label"] == t for p, t in zip(direct, truth)])
    assert saved["results"]["none"]["tiny"]["accuracy"] == pytest.approx(expected)

    # the printed table: one row per shift, both columns
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| shift")]
    assert [r.split(" | ")[0][2:] for r in rows] == list(rb.SHIFTS)
    assert "tiny acc % [95% CI]" in text and "model.safetensors vs none" in text


def test_limit_takes_a_stratified_seeded_subset():
    labels = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    keep = rb.subset(labels, 20, seed=3)
    assert len(keep) == 20 and list(keep) == sorted(keep)
    picked = [labels[i] for i in keep]
    assert (picked.count("a"), picked.count("b"), picked.count("c")) == (12, 6, 2)
    np.testing.assert_array_equal(keep, rb.subset(labels, 20, seed=3))
    assert not np.array_equal(keep, rb.subset(labels, 20, seed=4))
    assert len(rb.subset(labels, 0, seed=3)) == 100 and len(rb.subset(labels, 500, seed=3)) == 100

"""`bloodcell adapt`: re-estimate a model's BatchNorm statistics on a new lab's unlabelled cells, refuse or warn on
folders that would degrade it, and write a model folder the other commands take."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.errors import DataError, ModelError
from bloodcell.infer import Predictor, collect_images
from bloodcell.infer.adapt import METHOD, adapt_model, background_colours, mixed_labs
from bloodcell.io import file_sha256
from bloodcell.models import create_model, save_checkpoint
from bloodcell.models.adapt import MIN_ADAPT_IMAGES, recompute_norm_statistics
from bloodcell.models.checkpoint import load_checkpoint
from bloodcell.models.metadata import bundled_model_dir
from conftest import CLASS_NAMES, SAMPLE, env_with_startup_hook

runner = CliRunner()
YELLOW = (1.0, 0.97, 0.62)  # a lab whose lamp and stain turn the background yellow (as Tecom's)
GREY = (0.82, 0.86, 0.9)  # another: a dim, bluish background


def tinted_lab(root: Path, tint, per_class: int = 8, classes=CLASS_NAMES, offset: int = 0) -> Path:
    """Sample cells as another lab shows them: each channel scaled by `tint`, saved as PNG in class folders."""
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for f in sorted((SAMPLE / c).glob("*.jpg"))[offset : offset + per_class]:
            rgb = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) * np.asarray(tint, np.float32)
            Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(root / c / f"{f.stem}.png")
    return root


def one_line_error(res) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    return tinted_lab(tmp_path_factory.mktemp("yellow") / "lab", YELLOW)  # 64 cells, 8 per class


@pytest.fixture(scope="module")
def adapted(lab, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("adapted") / "model"
    return out, adapt_model(lab, out, progress=False)


# ---------------------------------------------------------------------- what it writes


def test_only_the_norm_statistics_change_and_they_are_the_labs(lab, adapted):
    out, report = adapted
    source = load_file(str(bundled_model_dir() / "model.safetensors"))
    new = load_file(str(out / "model.safetensors"))
    assert set(source) == set(new)
    stats = [k for k in source if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 2 * report["norm_layers"] == 8
    for key in source:
        if key in stats:
            assert not torch.allclose(source[key], new[key]), key
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(source[key], new[key]), key  # conv, linear and BatchNorm affine weights: untouched
    # the statistics are those of the lab's cells as the model reads them (size, interpolation, white balance)
    p = Predictor.load(None)
    recompute_norm_statistics(p.model, np.stack([p.decode(f) for f in collect_images(lab)]))
    for key, value in p.model.state_dict().items():
        if key in stats:
            torch.testing.assert_close(value, new[key], rtol=1e-5, atol=1e-5)


def test_written_folder_predicts_keeps_the_calibration_and_refits_the_ood_check_to_the_lab(lab, adapted):
    out, report = adapted
    source, p = Predictor.load(None), Predictor.load(out)
    assert (p.class_names, p.temperature, p.review_threshold) == (
        source.class_names,
        source.temperature,
        source.review_threshold,
    )
    # the OOD check is refitted on the lab's own cells: few of them flagged now, where the source flagged them all
    assert (
        p.ood_threshold != source.ood_threshold
        and (out / "ood.safetensors").read_bytes() != (bundled_model_dir() / "ood.safetensors").read_bytes()
    )
    assert "unlabelled cells" in json.loads((out / "model.json").read_text())["ood"]["fitted_on"]
    assert report["ood_before"] > 0.9 and report["ood_after"] < 0.1
    files = collect_images(lab)
    got, before = p.predict_paths(files, progress=False), source.predict_paths(files, progress=False)
    assert len(got["predictions"]) == len(files) == report["images"] == 64
    assert [q["probabilities"] for q in got["predictions"]] != [q["probabilities"] for q in before["predictions"]]
    labels = [q["label"] for q in got["predictions"]]
    assert report["predicted_after"] == {c: labels.count(c) for c in CLASS_NAMES}  # the summary is the written model's
    assert report["ood_after"] == pytest.approx(np.mean([q["ood"] for q in got["predictions"]]), abs=1e-4)
    assert report["ood_before"] == pytest.approx(np.mean([q["ood"] for q in before["predictions"]]), abs=1e-4)


def test_model_json_stays_consistent_and_records_the_adaptation(lab, adapted):
    out, report = adapted
    meta = json.loads((out / "model.json").read_text())
    source = json.loads((bundled_model_dir() / "model.json").read_text())
    a = meta["adaptation"]
    assert a == report["adaptation"] and a["method"] == METHOD == "batchnorm statistics re-estimated (AdaBN)"
    assert a["folder"] == str(lab.resolve()) and a["images"] == 64 and a["unreadable"] == 0 and a["norm_layers"] == 4
    assert datetime.fromisoformat(a["date"]).tzinfo is not None
    assert a["source"] == {
        "model": "default",
        "model_name": "cnn",
        "weights_sha256": file_sha256(bundled_model_dir() / "model.safetensors"),
    }
    assert a["weights_sha256"] == file_sha256(out / "model.safetensors") != a["source"]["weights_sha256"]
    assert a["warnings"] == report["warnings"]
    # no model.onnx was written, so no `onnx` section may describe one (with the source weights' hashes)
    assert "onnx" in source and "onnx" not in meta and not (out / "model.onnx").exists()
    for key in ("class_names", "temperature", "review_threshold", "preprocess", "training_config", "mean", "std"):
        assert meta[key] == source[key], key
    assert {k: v for k, v in meta["ood"].items() if k not in ("threshold", "fitted_on")} == {
        k: v for k, v in source["ood"].items() if k not in ("threshold", "fitted_on")
    }  # same method and false-alarm target
    load_checkpoint(out)  # the weights' header agrees with model.json
    assert not list(out.parent.glob(".*"))  # no temporary folder left beside it


def test_evaluate_card_and_predict_take_the_adapted_folder(lab, adapted, tmp_path):
    out, _ = adapted
    res = runner.invoke(
        app, ["evaluate", str(lab), "--model", str(out), "--out", str(tmp_path / "ev"), "--bootstrap", "0"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 64
    res = runner.invoke(app, ["card", "--model", str(out)])
    assert res.exit_code == 0 and "# Model card: cnn at " in res.stdout and " px (model)" in res.stdout, (
        res.output
    )  # not "bundled with bloodcell"
    assert "## Adapted to a lab" in res.stdout and "on 64 unlabelled images of" in res.stdout
    res = runner.invoke(app, ["predict", str(lab / "neutrophil"), "--model", str(out), "--format", "json"])
    assert res.exit_code == 0 and len(json.loads(res.stdout)["predictions"]) == 8, res.output


def test_cli_prints_the_summary(lab, tmp_path):
    res = runner.invoke(app, ["adapt", str(lab), "--out", str(tmp_path / "m"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "adapted on 64 images: 4 BatchNorm layers re-estimated" in res.stdout
    assert "flagged OOD:" in res.stdout and "% of the images before," in res.stdout
    assert "predicted after: " in res.stdout and f"wrote {tmp_path / 'm'}" in res.stdout
    Predictor.load(tmp_path / "m")


def test_onnx_flag_writes_a_checked_export_described_with_the_new_weights(lab, tmp_path):
    out = tmp_path / "m"
    adapt_model(lab, out, progress=False, onnx=True)
    section = json.loads((out / "model.json").read_text())["onnx"]
    assert section["file"] == "model.onnx" and section["max_abs_diff"] <= 1e-4
    assert section["exported_from"] == {
        name: file_sha256(out / name) for name in ("model.safetensors", "ood.safetensors")
    }
    files = collect_images(lab)
    torch_run = Predictor.load(out).predict_paths(files, progress=False)
    onnx_run = Predictor.load(out / "model.onnx").predict_paths(files, progress=False)
    assert onnx_run["counts"] == torch_run["counts"] and onnx_run["ood_count"] == torch_run["ood_count"]
    assert [q["label"] for q in onnx_run["predictions"]] == [q["label"] for q in torch_run["predictions"]]


# ---------------------------------------------------------------------- what it refuses


def test_fewer_images_than_the_minimum_are_refused_in_one_line(tmp_path):
    folder = tmp_path / "three"
    folder.mkdir()
    for f in sorted((SAMPLE / "neutrophil").glob("*.jpg"))[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not an image")
    line = one_line_error(runner.invoke(app, ["adapt", str(folder), "--out", str(tmp_path / "m")]))
    assert str(folder) in line and "3 readable images (1 unreadable)" in line and f"at least {MIN_ADAPT_IMAGES}" in line
    assert not (tmp_path / "m").exists()


def test_a_model_without_batchnorm_is_refused(tmp_path, lab):
    torch.manual_seed(0)
    run = save_checkpoint(
        create_model("cnn", num_classes=8, input_size=32, norm="group"), tmp_path / "gn", {"class_names": CLASS_NAMES}
    )
    with pytest.raises(ModelError, match="has no BatchNorm layers .*nothing to adapt"):
        adapt_model(lab, tmp_path / "m", model=run, progress=False)
    line = one_line_error(runner.invoke(app, ["adapt", str(lab), "--out", str(tmp_path / "m"), "--model", str(run)]))
    assert str(run) in line and "'norm': 'group'" in line


def test_out_folder_rules(tmp_path, lab, adapted):
    out, _ = adapted
    bundled = bundled_model_dir()
    with pytest.raises(DataError, match="is the model being adapted"):
        adapt_model(lab, out, model=out, progress=False)
    with pytest.raises(DataError, match="is the model being adapted"):
        adapt_model(lab, bundled, progress=False)
    with pytest.raises(DataError, match="inside the package's assets"):
        adapt_model(lab, bundled.parent / "adapted", progress=False)
    assert not (bundled.parent / "adapted").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    (busy / "model.onnx").write_bytes(b"an export of other weights")
    line = one_line_error(runner.invoke(app, ["adapt", str(lab), "--out", str(busy)]))
    assert str(busy) in line and "--force" in line
    adapt_model(lab, busy, progress=False, force=True)
    assert (busy / "notes.txt").read_text() == "mine" and not (busy / "model.onnx").exists()  # a stale export is gone
    Predictor.load(busy)
    empty = tmp_path / "empty"
    empty.mkdir()
    adapt_model(lab, empty, progress=False)
    assert (empty / "model.json").is_file() and oct(empty.stat().st_mode & 0o777) != "0o700"


def test_needs_pytorch_in_one_line(tmp_path, lab):
    block_torch = (
        "import importlib.abc, sys\n"
        "class _NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'safetensors'):\n"
        "            raise ModuleNotFoundError(f\"No module named '{name}'\", name=name)\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "bloodcell", "adapt", str(lab), "--out", str(tmp_path / "m")],
        env=env_with_startup_hook(tmp_path, block_torch),
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert (
        lines[0].startswith("error: 'bloodcell adapt' needs PyTorch") and "pip install 'bloodcell[train]'" in lines[0]
    )


# ---------------------------------------------------------------------- what it warns of


def test_a_folder_of_one_kind_of_cell_warns_and_records_it(tmp_path):
    folder = tmp_path / "platelets"
    folder.mkdir()
    for f in sorted((SAMPLE / "platelet").glob("*.jpg")):  # 25 cells, and each mirrored: 50 platelets
        img = Image.open(f).convert("RGB")
        img.save(folder / f"{f.stem}.png")
        img.transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(folder / f"{f.stem}-flipped.png")
    report = adapt_model(folder, tmp_path / "m", progress=False)
    one_kind = [w for w in report["warnings"] if "statistics re-estimated from one kind of cell shift every class" in w]
    assert len(one_kind) == 1 and "adapt on a folder of mixed cells as a smear gives them" in one_kind[0], report[
        "warnings"
    ]
    assert "\n" not in one_kind[0]
    assert json.loads((tmp_path / "m" / "model.json").read_text())["adaptation"]["warnings"] == report["warnings"]
    # the sample is the bundled model's own lab: adapting to it is not needed, and the warning says so
    assert any("adapting is not needed" in w for w in report["warnings"])
    res = runner.invoke(app, ["adapt", str(folder), "--out", str(tmp_path / "m2"), "--device", "cpu"])
    assert res.exit_code == 0 and "warning: " in res.output and "one kind of cell" in res.output


def test_mixed_cells_of_one_lab_give_no_one_kind_or_mixed_lab_warning(adapted):
    _, report = adapted
    assert not any("one kind of cell" in w or "more than one lab" in w for w in report["warnings"]), report["warnings"]


def test_a_folder_mixing_two_labs_warns(tmp_path):
    folder = tmp_path / "two-labs"
    tinted_lab(folder / "lab-a", YELLOW, per_class=5)
    tinted_lab(folder / "lab-b", GREY, per_class=5, offset=5)
    report = adapt_model(folder, tmp_path / "m", progress=False)
    mixed = [w for w in report["warnings"] if "looks like more than one lab or stain" in w]
    assert len(mixed) == 1 and "(40 and 40 images" in mixed[0] and "adapt on each lab's cells separately" in mixed[0]
    grey_alone = adapt_model(folder / "lab-b", tmp_path / "m-grey", progress=False)
    assert not any("more than one lab" in w for w in grey_alone["warnings"]), grey_alone["warnings"]


def test_mixed_lab_rule_on_background_colours():
    rng = np.random.default_rng(0)
    one = rng.normal((250, 230, 205), 3, (200, 3))
    other = rng.normal((250, 250, 160), 3, (200, 3))
    assert mixed_labs(one) is None and mixed_labs(other) is None
    assert mixed_labs(np.concatenate([one, other[:40]])) is not None  # 40 of 240 (17 %): a second lab
    assert mixed_labs(np.concatenate([one, other[:10]])) is None  # 10 of 210 (5 %): a few odd images, not a lab
    tight = rng.normal((250, 230, 205), 0.2, (200, 3))  # backgrounds that barely vary ...
    assert mixed_labs(np.concatenate([tight, tight + (0, 0, 5)])) is None  # ... 5 grey levels apart: one lab's shades
    assert mixed_labs(np.concatenate([tight, tight + (0, 0, 15)])) is not None
    flat = rng.uniform((240, 220, 195), (255, 240, 215), (300, 3))  # a wide but single spread
    assert mixed_labs(flat) is None
    # the background is the brightest pixels, whatever the cell: a dark disc on a pale field gives the field's colour
    img = np.full((1, 40, 40, 3), (240, 230, 200), np.uint8)
    img[0, 5:35, 5:35] = (90, 40, 120)
    np.testing.assert_allclose(background_colours(img)[0], (240, 230, 200))


def test_tent_moves_only_the_norm_layers_scale_and_shift(lab, tmp_path):
    out = tmp_path / "tent"
    report = adapt_model(lab, out, progress=False, tent=True)
    assert report["adaptation"]["method"].endswith("(Tent)")
    source = load_file(str(bundled_model_dir() / "model.safetensors"))
    new = load_file(str(out / "model.safetensors"))
    changed = {k for k in source if not torch.equal(source[k], new[k])}
    bn_affine = {k for k in source if k.startswith("features.") and k.endswith((".1.weight", ".1.bias"))}
    assert bn_affine and bn_affine <= changed  # Tent trained them
    assert changed <= bn_affine | {
        k for k in source if "running_" in k or "num_batches" in k
    }  # and nothing but the statistics
    assert Predictor.load(out).predict_paths(collect_images(lab), progress=False)["predictions"]

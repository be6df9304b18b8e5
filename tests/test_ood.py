"""Out-of-distribution score: fitting, the score in PyTorch / numpy / ONNX, flags and counts, fine-tuning from a
model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.errors import ConfigError, ModelError
from bloodcell.evaluate.ood import auroc, energy_score, fit_mahalanobis, mahalanobis_score, msp_score, threshold_for
from bloodcell.infer import Predictor, summarize
from bloodcell.models.ood import MahalanobisScore, load_ood, save_ood
from bloodcell.models.seal import seal

from conftest import CLASS_NAMES, SAMPLE, toy_run, with_ood

runner = CliRunner()


def gaussian_classes(rng, n_per_class=300, k=3, d=16, spread=6.0):
    centres = rng.normal(0, spread, (k, d))
    x = np.concatenate([rng.normal(centres[c], 1.0, (n_per_class, d)) for c in range(k)])
    return x, np.repeat(np.arange(k), n_per_class), centres


# ---------------------------------------------------------------------- fitting and scores


def test_mahalanobis_tells_far_points_from_the_training_classes():
    rng = np.random.default_rng(0)
    x, y, centres = gaussian_classes(rng)
    means, precision = fit_mahalanobis(x, y, 3)
    np.testing.assert_allclose(means, centres, atol=0.25)  # 300 samples of unit noise per class
    val, _, _ = gaussian_classes(np.random.default_rng(1), 300)
    fresh, _, _ = gaussian_classes(np.random.default_rng(2), 300)
    # same centres for val / fresh: regenerate them from the training centres
    val = centres[np.repeat(np.arange(3), 300)] + np.random.default_rng(1).normal(0, 1, val.shape)
    fresh = centres[np.repeat(np.arange(3), 300)] + np.random.default_rng(2).normal(0, 1, fresh.shape)
    far = rng.normal(0, 1, (200, 16)) + 4 * centres.max()
    t = threshold_for(mahalanobis_score(val, means, precision), 0.01)
    in_flagged = (mahalanobis_score(fresh, means, precision) > t).mean()
    assert 0.0 <= in_flagged <= 0.03  # about the 1 % asked for
    assert (mahalanobis_score(far, means, precision) > t).all()
    assert auroc(mahalanobis_score(fresh, means, precision), mahalanobis_score(far, means, precision)) == 1.0


def test_torch_score_equals_numpy_score():
    rng = np.random.default_rng(3)
    x, y, _ = gaussian_classes(rng, 50, 4, 8)
    means, precision = fit_mahalanobis(x, y, 4)
    probe = rng.normal(0, 8, (20, 8))
    want = mahalanobis_score(probe, means, precision)
    diff = probe[:, None, :] - means[None]  # the definition, written out: min over k of (f - mu_k)^T P (f - mu_k)
    np.testing.assert_allclose(want, np.einsum("nkd,de,nke->nk", diff, precision, diff).min(1), rtol=1e-9)
    got = MahalanobisScore(torch.tensor(means), torch.tensor(precision))(
        torch.tensor(probe, dtype=torch.float32)
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_logit_scores_rank_confident_logits_as_ordinary():
    confident, flat = np.array([[9.0, 0.0, 0.0]]), np.array([[0.1, 0.0, 0.05]])
    assert energy_score(confident)[0] < energy_score(flat)[0]
    assert msp_score(confident)[0] < msp_score(flat)[0]


def test_fit_refuses_mismatched_inputs():
    with pytest.raises(Exception, match="OOD fit needs"):
        fit_mahalanobis(np.zeros((5, 3)), np.zeros(4, int), 2)
    with pytest.raises(Exception, match="without validation images"):
        threshold_for(np.zeros(0))


# ---------------------------------------------------------------------- a model with an OOD score


@pytest.fixture(scope="module")
def ood_run(tmp_path_factory) -> Path:
    return with_ood(toy_run(tmp_path_factory.mktemp("ood") / "run"))


def test_predictions_carry_the_score_and_ood_cells_are_not_counted(ood_run):
    p = Predictor.load(ood_run)
    assert p.has_ood
    files = sorted(SAMPLE.rglob("*.jpg"))[:40]
    result = p.predict_paths(files, progress=False)
    scores = np.array([q["ood_score"] for q in result["predictions"]])
    flagged = np.array([q["ood"] for q in result["predictions"]])
    np.testing.assert_array_equal(flagged, scores > p.ood_threshold + 1e-3 * 0)  # the flag is the threshold rule
    assert 0 < flagged.sum() < len(files)  # the median threshold of fitted images flags some, not all
    assert result["ood_count"] == flagged.sum() and result["counted"] == len(files) - flagged.sum()
    counted_labels = [q["label"] for q in result["predictions"] if not q["ood"]]
    assert result["counts"] == {c: counted_labels.count(c) for c in CLASS_NAMES}
    assert abs(sum(result["percent"].values()) - 100) < 0.1
    if flagged.sum() >= len(files) / 2:  # most of the folder: one verdict on it instead (tests/test_count_verdict.py)
        assert result["verdict"]["ood_count"] == flagged.sum() and result["flags"][0] == result["verdict"]["message"]
    else:
        assert result["verdict"] is None
        assert (
            result["flags"][0]
            == f"{flagged.sum()} of {len(files)} images look unlike the cells this model was trained on (OOD): "
            "not counted"
        )


def test_summarize_without_and_with_all_ood():
    probs = np.eye(8)[[0, 1, 1]]
    plain = summarize(["a", "b", "c"], probs, CLASS_NAMES, 0.5)
    assert plain["ood_check"] is False and plain["counted"] == 3 and plain["predictions"][0]["ood"] is None
    allout = summarize(
        ["a", "b", "c"], probs, CLASS_NAMES, 0.5, ood_scores=np.array([5.0, 6.0, np.nan]), ood_threshold=1.0
    )
    assert allout["counted"] == 0 and all(v == 0 for v in allout["counts"].values())
    assert allout["flags"][0].startswith("all images look unlike")
    assert (
        allout["predictions"][2]["ood"] is True and allout["predictions"][2]["ood_score"] is None
    )  # nan: no number, still flagged
    json.dumps(allout, allow_nan=False)
    assert all(v == 0.0 for v in allout["percent"].values())


def test_onnx_export_computes_the_same_score(ood_run, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "m.onnx"
    res = runner.invoke(app, ["export", str(ood_run), "--onnx", str(out)])
    assert res.exit_code == 0, res.output
    assert [o.name for o in ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).get_outputs()] == [
        "logits",
        "ood_score",
    ]
    files = sorted(SAMPLE.rglob("*.jpg"))[:6]
    a = Predictor.load(ood_run).predict_paths(files, progress=False)
    b = Predictor.load(out).predict_paths(files, progress=False)
    sa = np.array([q["ood_score"] for q in a["predictions"]])
    sb = np.array([q["ood_score"] for q in b["predictions"]])
    np.testing.assert_allclose(sb, sa, rtol=1e-3)
    assert [q["ood"] for q in a["predictions"]] == [q["ood"] for q in b["predictions"]]


def test_missing_or_mismatched_ood_file_is_a_clear_error(ood_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ood_run, run)
    (run / "ood.safetensors").unlink()
    with pytest.raises(ModelError, match="ood.safetensors is missing"):  # the seal names it
        Predictor.load(run)
    seal(run)  # sealed without it: the loader still says what is missing
    with pytest.raises(ModelError, match="ood.safetensors not found"):
        Predictor.load(run)
    save_ood(run, np.zeros((3, 262)), np.eye(262))
    seal(run)
    with pytest.raises(
        ModelError, match="the model has 8 classes and 262 features"
    ):  # 128 pooled + 128 centre + 6 input statistics
        Predictor.load(run)
    with pytest.raises(ModelError, match="holds inf or nan"):
        save_ood(run, np.full((8, 262), np.inf), np.eye(262))
        load_ood(run / "ood.safetensors", 8, 262)


# ---------------------------------------------------------------------- a trained run fits it; fine-tuning from a model

TINY = {
    "model": {"name": "cnn"},
    "data": {"input_size": 32},
    "train": {"epochs": 2, "batch_size": 16, "lr": 0.002},
    "eval": {"bootstrap": 0, "grid_images": 0},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    cfg = root / "c.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    res = runner.invoke(app, ["train", str(cfg), "--data", str(SAMPLE), "--out", str(root / "run")])
    assert res.exit_code == 0, res.output
    return root / "run"


def test_training_fits_the_ood_score_on_training_features(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    meta = json.loads((trained / "model.json").read_text())
    assert meta["ood"]["method"] == "mahalanobis" and meta["ood"]["threshold"] == metrics["ood"]["threshold"]
    assert metrics["ood"]["val_flagged"] <= 1 / 28 + 1e-9  # 28 validation images, 99th percentile threshold
    p = Predictor.load(trained)
    assert p.has_ood
    # a flat grey square is far from every cell the run trained on
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    import io

    buf = io.BytesIO()
    grey.save(buf, format="PNG")
    result = p.predict_images([("grey.png", buf.getvalue())])
    assert result["predictions"][0]["ood"] is True and result["counted"] == 0


def lab_folder(root: Path, mapping: dict[str, str], n: int = 6) -> Path:
    """A 'lab' folder: n sample images of each PBC class, filed under the lab's own class names."""
    for src, dst in mapping.items():
        (root / dst).mkdir(parents=True, exist_ok=True)
        for f in sorted((SAMPLE / src).glob("*.jpg"))[:n]:
            shutil.copyfile(f, root / dst / f.name)
    return root


def test_fine_tuning_starts_from_the_model_and_keeps_shared_class_rows(trained, tmp_path):
    from bloodcell.config import parse_config
    from bloodcell.models.checkpoint import init_from_model, load_checkpoint
    from bloodcell.train.fit import build_model

    base, _ = load_checkpoint(trained)
    cfg = parse_config({**TINY, "model": {"name": "cnn", "pretrained": str(trained)}})
    model = build_model(cfg, 3, ["neutrophil", "lymphocyte", "smudge"])
    for key, value in base.state_dict().items():
        if not key.startswith("head.3."):
            assert torch.equal(model.state_dict()[key], value), key
    w, src = model.head[3].weight, base.head[3].weight
    assert torch.equal(w[0], src[CLASS_NAMES.index("neutrophil")]) and torch.equal(
        w[1], src[CLASS_NAMES.index("lymphocyte")]
    )
    assert not any(torch.equal(w[2], src[i]) for i in range(8))  # a class the model never knew starts fresh
    with pytest.raises(ConfigError, match="trained with white balance 'none': set data.white_balance=none"):
        build_model(
            parse_config(
                {
                    **TINY,
                    "data": {"input_size": 32, "white_balance": "background"},
                    "model": {"name": "cnn", "pretrained": str(trained)},
                }
            ),
            3,
        )
    with pytest.raises(ConfigError, match="trained at 32 px: set data.input_size=32"):
        build_model(
            parse_config({**TINY, "data": {"input_size": 48}, "model": {"name": "cnn", "pretrained": str(trained)}}), 3
        )
    with pytest.raises(ModelError, match="it is a 'cnn'"):
        from bloodcell.models import create_model

        init_from_model(create_model("mobilenetv2", num_classes=3, input_size=32), trained, ["a", "b", "c"], 32)


def test_a_lab_fine_tunes_with_the_two_commands(trained, tmp_path):
    lab = lab_folder(tmp_path / "lab", {"neutrophil": "Neutrophil", "lymphocyte": "Lymphocyte"})
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "finetune.yaml").read_text())
    cfg["data"]["input_size"], cfg["data"]["white_balance"] = 32, "none"  # the toy base model's preprocessing
    cfg["train"]["epochs"] = 2
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump(cfg))
    res = runner.invoke(
        app,
        [
            "train",
            str(tmp_path / "ft.yaml"),
            "--data",
            str(lab),
            "--out",
            str(tmp_path / "ft"),
            "--set",
            f"model.pretrained={trained}",
        ],
    )
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "ft" / "model.json").read_text())
    assert meta["class_names"] == ["Lymphocyte", "Neutrophil"] and meta["training_config"]["model"][
        "pretrained"
    ] == str(trained)
    res = runner.invoke(app, ["predict", str(lab), "--model", str(tmp_path / "ft"), "--format", "json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.output)["predictions"]) == 12


def test_ood_features_are_pooled_map_its_centre_and_input_statistics():
    from bloodcell.models import create_model
    from bloodcell.models.ood import ood_feature_dim, ood_features

    torch.manual_seed(0)
    model = create_model("cnn", num_classes=8, input_size=64).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits, f = ood_features(model, x)
        fmap = model.forward_feature_map(x)  # 4 x 4 at 64 px: the centre is the middle 2 x 2
        torch.testing.assert_close(logits, model(x))
    assert f.shape == (3, ood_feature_dim(model)) == (3, 2 * 128 + 6)
    torch.testing.assert_close(f[:, :128], fmap.mean(dim=(2, 3)))
    torch.testing.assert_close(f[:, 128:256], fmap[:, :, 1:3, 1:3].mean(dim=(2, 3)))
    torch.testing.assert_close(f[:, 256:], torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1))


def test_fewshot_draws_k_per_class_and_keeps_a_test_cell_of_each(tmp_path):
    from conftest import load_benchmark, make_tree

    fewshot = load_benchmark("fewshot")
    folder = make_tree(tmp_path / "lab", {"neutrophil": 8, "lymphocyte": 3, "basophil": 1})
    train, test = fewshot.draw(folder, 5, seed=1)
    assert {c: len(v) for c, v in train.items()} == {"basophil": 0, "lymphocyte": 2, "neutrophil": 5}
    assert {c: len(v) for c, v in test.items()} == {"basophil": 1, "lymphocyte": 1, "neutrophil": 3}
    for c in train:
        assert not set(train[c]) & set(test[c]) and len(train[c]) + len(test[c]) == len(list((folder / c).iterdir()))
    assert fewshot.draw(folder, 5, seed=1) == (train, test) and fewshot.draw(folder, 5, seed=2) != (train, test)

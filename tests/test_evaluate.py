"""Tests for bloodcell.evaluate: metrics vs scikit-learn and hand values, calibration, stats, plots."""

from __future__ import annotations

import json
import time
import warnings

import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps
from sklearn import metrics as skm

from bloodcell.errors import DataError
from bloodcell.evaluate.calibration import apply_temperature, fit_temperature, nll_at_temperature, softmax
from bloodcell.evaluate.metrics import (
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    f1_macro,
    reliability_curve,
)
from bloodcell.evaluate.stats import mcnemar_test, mean_sd_ci, paired_difference_summary

K = 8
NAMES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def random_probs(n, k=K, seed=0, skill=2.0):
    """Labels and softmax probabilities that favour the true class (accuracy well above chance)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += skill
    return y, softmax(logits)


def sample_labels(probs, rng):
    """Draw one label per row from its categorical distribution (inverse CDF)."""
    u = rng.random(len(probs))[:, None]
    return np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), probs.shape[1] - 1)


# ------------------------------------------------------------------ metrics vs scikit-learn


def test_metrics_match_sklearn_on_random_predictions():
    y, p = random_probs(2000, seed=1)
    pred = p.argmax(1)
    m = classification_metrics(y, p, NAMES, n_bootstrap=200)
    labels = list(range(K))
    assert m["n"] == 2000
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    for avg in ("weighted", "macro"):
        pr, rc, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average=avg, zero_division=0)
        assert m[f"precision_{avg}"] == pytest.approx(pr)
        assert m[f"recall_{avg}"] == pytest.approx(rc)
        assert m[f"f1_{avg}"] == pytest.approx(f1)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred, labels=labels).tolist()
    assert m["top2_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, p, k=2, labels=labels))
    assert m["nll"] == pytest.approx(skm.log_loss(y, p, labels=labels))
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i, name in enumerate(NAMES):
        assert m["per_class"][name] == pytest.approx(
            {"precision": pr[i], "recall": rc[i], "f1": f1[i], "support": sup[i]}
        )
    assert np.allclose(np.sum(m["confusion_matrix_normalized"], axis=1), 1.0)
    assert 0.3 < m["accuracy"] < 0.9 and m["top2_accuracy"] > m["accuracy"]
    json.dumps(m)  # plain Python types only


def test_metrics_hand_example():
    # y_pred = [0, 1, 1, 1, 2, 0]; top-2 sets put the true class second for samples 1 and 5 only.
    y = [0, 0, 1, 1, 2, 2]
    p = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.4, 0.5, 0.1],  # true 0 is second: top-2 hit
            [0.1, 0.8, 0.1],
            [0.2, 0.6, 0.2],
            [0.1, 0.1, 0.8],
            [0.6, 0.3, 0.1],  # true 2 is third: top-2 miss
        ]
    )
    m = classification_metrics(y, p, ["a", "b", "c"], n_bootstrap=0)
    # Per class: a P=1/2 R=1/2 F=1/2; b P=2/3 R=1 F=4/5; c P=1 R=1/2 F=2/3; equal supports of 2.
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["top2_accuracy"] == pytest.approx(5 / 6)
    assert m["precision_macro"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert m["f1_macro"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert m["f1_weighted"] == pytest.approx(m["f1_macro"])  # equal supports
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert np.allclose(m["confusion_matrix_normalized"], [[0.5, 0.5, 0], [0, 1, 0], [0.5, 0, 0.5]])
    nll = -np.mean(np.log([0.7, 0.4, 0.8, 0.6, 0.8, 0.1]))
    assert m["nll"] == pytest.approx(nll)
    assert m["ci95"] is None


def test_weighted_differs_from_macro_with_unequal_support():
    y = [0, 0, 0, 0, 1]
    p = np.array([[0.9, 0.1]] * 4 + [[0.8, 0.2]])  # always predicts 0
    m = classification_metrics(y, p, ["a", "b"], n_bootstrap=0)
    # a: P=4/5 R=1 F=8/9 (support 4); b: all zero (support 1).
    assert m["f1_weighted"] == pytest.approx(4 / 5 * 8 / 9)
    assert m["f1_macro"] == pytest.approx(8 / 9 / 2)
    assert m["top2_accuracy"] == 1.0


def test_missing_classes_give_no_nan_and_no_warnings():
    rng = np.random.default_rng(3)
    y = rng.choice([0, 2, 5], 300)  # classes 1, 3, 4, 6, 7 never appear as labels
    logits = rng.normal(size=(300, K))
    logits[np.arange(300), y] += 3
    logits[:, 7] -= 20  # and class 7 is never predicted
    p = softmax(logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = classification_metrics(y, p, NAMES, n_bootstrap=100)
    flat = json.dumps(m)
    assert "NaN" not in flat and "Infinity" not in flat
    assert m["per_class"]["platelet"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["confusion_matrix_normalized"][1] == [0.0] * K


def test_bad_inputs_raise_data_error():
    y, p = random_probs(10)
    with pytest.raises(DataError, match="class names"):
        classification_metrics(y, p, NAMES[:3])
    with pytest.raises(DataError, match="sum to 1"):
        classification_metrics(y, p * 5, NAMES)
    with pytest.raises(DataError, match="labels must lie"):
        classification_metrics(y + K, p, NAMES)


# ------------------------------------------------------------------ ECE and reliability


def test_ece_matches_hand_loop():
    p = np.array(
        [
            [0.95, 0.05],
            [0.90, 0.10],
            [0.20, 0.80],
            [0.45, 0.55],
            [0.60, 0.40],
            [0.30, 0.70],
            [0.51, 0.49],
        ]
    )
    y = np.array([0, 1, 1, 0, 0, 1, 1])
    n_bins = 5
    conf, pred = p.max(1), p.argmax(1)
    ece = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(len(y)) if lo < conf[i] <= hi]
        if members:
            acc = np.mean([pred[i] == y[i] for i in members])
            avg_conf = np.mean([conf[i] for i in members])
            ece += len(members) / len(y) * abs(acc - avg_conf)
    assert expected_calibration_error(p, y, n_bins=n_bins) == pytest.approx(ece)
    # Bins here: (0.4,0.6] holds 0.55, 0.60, 0.51 with 1 of 3 right; (0.6,0.8] holds 0.80, 0.70 both right;
    # (0.8,1] holds 0.95, 0.90 with 1 of 2 right.
    hand = 3 / 7 * abs(1 / 3 - (0.55 + 0.60 + 0.51) / 3) + 2 / 7 * abs(1 - 0.75) + 2 / 7 * abs(0.5 - 0.925)
    assert ece == pytest.approx(hand)
    curve = reliability_curve(p, y, n_bins=n_bins)
    assert curve["count"].tolist() == [0, 0, 3, 2, 2]
    assert np.isnan(curve["accuracy"][0]) and curve["accuracy"][3] == 1.0


def test_calibrated_set_has_small_ece_and_overconfidence_is_fixed_by_temperature():
    rng = np.random.default_rng(7)
    true_logits = rng.normal(scale=2.0, size=(5000, K))
    y = sample_labels(softmax(true_logits), rng)  # labels drawn from the model: calibrated by construction
    assert expected_calibration_error(softmax(true_logits), y) < 0.03

    over = true_logits * 3  # overconfident model
    t = fit_temperature(over, y)
    assert t == pytest.approx(3.0, abs=0.25)
    assert nll_at_temperature(over, y, t) < nll_at_temperature(over, y, 1.0)
    ece_before = expected_calibration_error(softmax(over), y)
    ece_after = expected_calibration_error(apply_temperature(over, t), y)
    assert ece_after < ece_before / 3
    assert fit_temperature(over, y) == t  # deterministic


def test_softmax_is_stable_and_temperature_keeps_argmax():
    z = np.array([[1000.0, 999.0, -1000.0], [0.0, 0.0, 0.0]])
    p = softmax(z)
    assert np.all(np.isfinite(p)) and np.allclose(p.sum(1), 1)
    assert p[1] == pytest.approx([1 / 3] * 3)
    assert np.array_equal(apply_temperature(z, 7.0).argmax(1), z.argmax(1))
    with pytest.raises(DataError):
        apply_temperature(z, 0.0)


# ------------------------------------------------------------------ bootstrap


def test_bootstrap_ci_contains_estimate_is_seeded_and_narrows():
    y, p = random_probs(5000, seed=2)
    pred = p.argmax(1)
    acc = float(np.mean(y == pred))
    lo, hi = bootstrap_ci(y, pred, "accuracy", n=1000, seed=0)
    assert lo < acc < hi
    assert bootstrap_ci(y, pred, "accuracy", n=1000, seed=0) == (lo, hi)
    assert bootstrap_ci(y, pred, "accuracy", n=1000, seed=1) != (lo, hi)
    lo_s, hi_s = bootstrap_ci(y[:200], pred[:200], "accuracy", n=1000, seed=0)
    assert hi_s - lo_s > 2 * (hi - lo)
    # Binomial standard error check: the 95% width is about 2 * 1.96 * sqrt(acc(1-acc)/n).
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(acc * (1 - acc) / 5000), rel=0.15)


def test_bootstrap_is_fast_for_accuracy():
    y, p = random_probs(5000, seed=2)
    pred = p.argmax(1)
    start = time.perf_counter()
    bootstrap_ci(y, pred, "accuracy", n=1000)
    assert time.perf_counter() - start < 1.0


def test_vectorised_f1_macro_matches_sklearn_callable():
    y, p = random_probs(300, seed=4)
    pred = p.argmax(1)
    fast = bootstrap_ci(y, pred, "f1_macro", n=50, seed=3, n_classes=K)
    slow = bootstrap_ci(y, pred, lambda t, q: f1_macro(t, q, K), n=50, seed=3)
    assert fast == pytest.approx(slow)


# ------------------------------------------------------------------ stats


def test_mcnemar():
    rng = np.random.default_rng(5)
    y = rng.integers(0, K, 500)
    same = mcnemar_test(y, y, y)
    assert same["p_value"] == 1.0 and same["b"] == same["c"] == 0

    a = y.copy()
    b_pred = y.copy()
    b_pred[:60] = (y[:60] + 1) % K  # B wrong on 60 samples A gets right
    b_pred[60:62] = (y[60:62] + 1) % K
    a[60:62] = (y[60:62] + 2) % K  # both wrong: not discordant
    res = mcnemar_test(y, a, b_pred)
    assert (res["b"], res["c"], res["method"]) == (60, 0, "chi2_cc")
    assert res["statistic"] == pytest.approx(59**2 / 60)
    assert res["p_value"] == pytest.approx(sps.chi2.sf(59**2 / 60, 1)) and res["p_value"] < 1e-10

    small_a, small_b = y.copy(), y.copy()
    small_b[:3] = (y[:3] + 1) % K  # b = 3
    small_a[3:12] = (y[3:12] + 1) % K  # c = 9
    res = mcnemar_test(y, small_a, small_b)
    assert (res["b"], res["c"], res["method"]) == (3, 9, "exact")
    assert res["p_value"] == pytest.approx(sps.binomtest(3, 12, 0.5).pvalue)


def test_mean_sd_ci_matches_numpy_scipy():
    x = np.array([0.91, 0.93, 0.92, 0.95, 0.90])
    r = mean_sd_ci(x)
    sem = np.std(x, ddof=1) / np.sqrt(5)
    lo, hi = sps.t.interval(0.95, df=4, loc=x.mean(), scale=sem)
    assert r["mean"] == pytest.approx(x.mean()) and r["sd"] == pytest.approx(np.std(x, ddof=1))
    assert r["n"] == 5 and r["ci95"] == pytest.approx([lo, hi])
    assert mean_sd_ci([0.9]) == {"mean": 0.9, "sd": 0.0, "n": 1, "ci95": None}
    with pytest.raises(DataError):
        mean_sd_ci([])


def test_paired_difference_summary():
    a = np.array([0.91, 0.93, 0.92, 0.95])
    b = np.array([0.90, 0.90, 0.91, 0.92])
    r = paired_difference_summary(a, b)
    assert r["mean_difference"] == pytest.approx(np.mean(a - b))
    assert r["p_value"] == pytest.approx(sps.ttest_rel(a, b).pvalue)
    assert paired_difference_summary([0.9], [0.8])["p_value"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert paired_difference_summary(a, a)["p_value"] == 1.0
    json.dumps(r)


# ------------------------------------------------------------------ plots


@pytest.fixture(scope="module")
def plots():
    from bloodcell.evaluate import plots as module

    return module


def assert_png(path, folder):
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 50
    assert not [f for f in folder.iterdir() if f.name.startswith(".") or f.suffix == ".tmp"]


def test_plots_write_pngs(tmp_path, plots):
    import matplotlib.pyplot as plt

    y, p = random_probs(120, seed=6)
    pred = p.argmax(1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(120, 24, 24, 3), dtype=np.uint8)
    m = classification_metrics(y, p, NAMES, n_bootstrap=0)
    history = [
        {"epoch": e, "train_loss": 1 / e, "train_acc": 1 - 0.5 / e, "val_loss": 1.2 / e, "val_acc": 0.9 - 0.5 / e}
        for e in range(1, 6)
    ]
    csv_path = tmp_path / "history" / "metrics.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("epoch,train_loss,train_acc,val_loss,val_acc\n1,1.0,0.5,,\n2,0.8,0.6,,\n")
    temp = fit_temperature(np.log(p) * 2, y)
    out = tmp_path / "figs"

    paths = [
        plots.plot_training_curves(history, out / "curves.png", title="demo"),
        plots.plot_training_curves(csv_path, out / "curves_csv.png"),
        plots.plot_confusion_matrix(m["confusion_matrix"], NAMES, out / "cm.png"),
        plots.plot_confusion_matrix(m["confusion_matrix"], NAMES, out / "cm_both.png", normalize="both", title="t"),
        plots.plot_reliability_diagram(p, y, out / "rel.png", title="raw"),
        plots.plot_reliability_diagram(
            softmax(np.log(p) * 2), y, out / "rel_cal.png", probs_calibrated=apply_temperature(np.log(p) * 2, temp)
        ),
        plots.plot_prediction_grid(images, y, pred, p, NAMES, out / "grid.png"),
        plots.plot_confident_mistakes(images, y, p, NAMES, out / "mistakes.png"),
        plots.plot_confident_mistakes(images[:5], pred[:5], p[:5], NAMES, out / "none.png"),
        plots.plot_per_class_bars(m["per_class"], out / "bars.png"),
    ]
    for path in paths:
        assert_png(path, out)
    assert sorted(f.name for f in out.iterdir()) == sorted(p.name for p in paths)
    assert plt.get_fignums() == []  # every figure closed


def test_plot_errors_are_data_errors(tmp_path, plots):
    with pytest.raises(DataError, match="does not exist"):
        plots.plot_training_curves(tmp_path / "missing.csv", tmp_path / "x.png")
    with pytest.raises(DataError, match="shape"):
        plots.plot_confusion_matrix(np.zeros((3, 3)), NAMES, tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    z = rng.normal(size=(50, K)) * 3
    y = rng.integers(0, K, 50)
    zt, yt = torch.tensor(z, dtype=torch.float32), torch.tensor(y)
    assert fit_temperature(zt, yt) == pytest.approx(fit_temperature(z, y), rel=1e-4)
    pt = torch.softmax(zt, dim=1)  # float32 rows: renormalised, not rejected
    assert classification_metrics(yt, pt, NAMES, n_bootstrap=0)["accuracy"] == pytest.approx(np.mean(z.argmax(1) == y))


def _member(run_dir, y, probs, classes=("a", "b", "c"), paths=None):
    from bloodcell.evaluate.run import write_predictions

    run_dir.mkdir(parents=True)
    paths = paths or [f"img{i}.jpg" for i in range(len(y))]
    write_predictions(run_dir / "predictions.csv", paths, [classes[k] for k in y], list(classes), probs)
    return run_dir


def test_soft_voting_ensemble_beats_members_that_err_on_different_images(tmp_path):
    from typer.testing import CliRunner

    from bloodcell.cli import app
    from bloodcell.evaluate.ensemble import ensemble_runs

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    runs = []
    for m in range(3):  # each member is confidently right except on its own third of the images
        probs = np.full((300, 3), 0.1)
        probs[np.arange(300), y] = 0.8
        wrong = np.arange(300) % 3 == m
        probs[wrong] = 0.1
        probs[wrong, (y[wrong] + 1) % 3] = 0.55
        probs[wrong, y[wrong]] = 0.35
        runs.append(_member(tmp_path / f"m{m}", y, probs))
    result = ensemble_runs(runs, tmp_path / "ens", n_bootstrap=100)
    assert all(abs(a - 2 / 3) < 1e-9 for a in result["member_accuracy"].values())
    assert result["test"]["accuracy"] == 1.0 and result["test"]["n"] == 300
    assert result["vs_best_member"]["p_value"] < 1e-10
    assert json.loads((tmp_path / "ens" / "metrics.json").read_text())["test"]["accuracy"] == 1.0
    assert (tmp_path / "ens" / "figures" / "confusion.png").stat().st_size > 1000
    out = CliRunner().invoke(app, ["ensemble", *map(str, runs), "--out", str(tmp_path / "cli"), "--bootstrap", "0"])
    assert out.exit_code == 0 and "ensemble of 3: test accuracy 1.0000" in out.output


def test_ensemble_refuses_runs_tested_on_other_images_or_classes(tmp_path):
    from typer.testing import CliRunner

    from bloodcell.cli import app

    y = np.array([0, 1, 2, 0])
    probs = np.eye(3)[y]
    a = _member(tmp_path / "a", y, probs)
    other_split = _member(tmp_path / "b", y, probs, paths=["x0.jpg", "img1.jpg", "img2.jpg", "img3.jpg"])
    other_classes = _member(tmp_path / "c", y, probs, classes=("a", "b", "z"))
    for other, words in (
        (other_split, "different images"),
        (other_classes, "one class list"),
        (tmp_path / "nothing", "predictions.csv not found"),
    ):
        out = CliRunner().invoke(app, ["ensemble", str(a), str(other), "--out", str(tmp_path / "o")])
        assert out.exit_code == 2 and words in out.output and "Traceback" not in out.output, out.output

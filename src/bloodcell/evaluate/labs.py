"""The run's model on other labs' cells: each lab scored over the classes it has, as is and adapted.

For every lab (a held-out one from `eval.labs`, and the test part of each lab the run trained on, `data.labs`)
the figures a lab relies on: accuracy over the classes it has (the model's probabilities renormalised over them),
accuracy over all the model's classes, macro F1, the review and OOD fractions, the kept fraction (neither flagged)
and the accuracy of the kept cells, with bootstrap CIs. With `eval.adapt`, the same after the BatchNorm statistics
are re-estimated on the lab's own images (bloodcell.models.adapt; "adapted"), and after Tent's entropy minimisation
on top ("adapted_tent"); neither uses a label of the lab.
"""

from __future__ import annotations

import copy
import csv
import io as _io
from pathlib import Path

import numpy as np

from bloodcell import io
from bloodcell.evaluate.calibration import apply_temperature
from bloodcell.evaluate.metrics import classification_metrics, restrict
from bloodcell.evaluate.ood import fit_mahalanobis_unlabelled, mahalanobis_score
from bloodcell.evaluate.outputs import predict_outputs


def score_cells(
    y: np.ndarray,
    probs: np.ndarray,
    names: list[str],
    review_threshold: float,
    ood_scores: np.ndarray | None,
    ood_threshold: float | None,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict:
    """The lab figures of calibrated `probs` against true labels `y` (indices into `names`).

    Args:
        y: (N,) true class indices into `names`.
        probs: (N, K) calibrated probabilities over `names`.
        names: the model's class names.
        review_threshold: an answer less confident than this is flagged for review.
        ood_scores: (N,) OOD scores; None: no cell is out of distribution.
        ood_threshold: a score above this is out of distribution; None: no cell is.
        n_bootstrap: resamples of the accuracy's 95 % confidence interval (0: none).
        seed: the bootstrap's seed.
    """
    present = sorted(set(int(v) for v in y))
    probs_r = restrict(probs, present)
    y_r = np.asarray([present.index(int(v)) for v in y])
    correct_r = probs_r.argmax(1) == y_r
    correct = probs.argmax(1) == y
    review = probs.max(1) < review_threshold
    ood = (
        (ood_scores > ood_threshold) if ood_scores is not None and ood_threshold is not None else np.zeros(len(y), bool)
    )
    kept = ~review & ~ood
    if len(present) >= 2:
        m = classification_metrics(y_r, probs_r, [names[i] for i in present], n_bootstrap=n_bootstrap, seed=seed)
        acc, f1, ci = m["accuracy"], m["f1_macro"], (m.get("ci95") or {}).get("accuracy")
        per_class = {c: v["recall"] for c, v in m["per_class"].items()}
    else:
        acc, f1, ci, per_class = float(correct_r.mean()), None, None, {}
    return {
        "n": int(len(y)),
        "classes_present": [names[i] for i in present],
        "accuracy": acc,
        "accuracy_ci95": ci,
        "f1_macro": f1,
        "recall": per_class,
        "accuracy_all_classes": float(correct.mean()),
        "review_fraction": float(review.mean()),
        "ood_fraction": float(ood.mean()),
        "kept_fraction": float(kept.mean()),
        "n_kept": int(kept.sum()),
        "accuracy_kept": float(correct_r[kept].mean()) if kept.any() else None,
        "accuracy_kept_all_classes": float(correct[kept].mean()) if kept.any() else None,
        "predicted_as": {
            names[k]: int(v) for k, v in enumerate(np.bincount(probs.argmax(1), minlength=len(names))) if v
        },
    }


def evaluate_lab(
    model,
    images: np.ndarray,
    y: np.ndarray,
    names: list[str],
    *,
    temperature: float,
    review_threshold: float,
    ood: tuple[np.ndarray, np.ndarray, float] | None,
    adapt: bool,
    out_dir: Path,
    relpaths: list[str],
    n_bootstrap: int,
    seed: int,
    progress: bool = False,
    false_alarm: float = 0.01,
) -> dict:
    """Score `model` on one lab's cells (as is, and adapted when `adapt`); write predictions CSVs into out_dir.

    Adapted, the OOD score is the one `bloodcell adapt` gives a lab: fitted on the lab's own unlabelled cells
    (evaluate.ood.fit_mahalanobis_unlabelled), so it flags what looks unlike them.

    Args:
        model: the trained classifier (its mean/std normalise the images).
        images: (N, S, S, 3) uint8 cells at the model's input size.
        y: (N,) true class indices into `names`.
        names: the model's class names.
        temperature: the calibration temperature applied to the logits.
        review_threshold: an answer less confident than this is flagged for review.
        ood: the training cells' OOD score (means, precision, threshold); None: no OOD score, adapted or not.
        adapt: also score the model adapted to these cells (batch-norm statistics, then entropy minimisation),
            when it has norm layers and there are models.adapt.MIN_ADAPT_IMAGES cells or more.
        out_dir: an existing folder; predictions_<variant>.csv and metrics.json are written there.
        relpaths: each cell's path, written in the predictions CSVs.
        n_bootstrap: resamples of the accuracy's 95 % confidence interval (0: none).
        seed: the bootstrap's, the adaptation's and the unlabelled OOD fit's seed.
        progress: show progress bars.
        false_alarm: the fraction of the lab's own cells an adapted model's OOD threshold flags.
    """
    from bloodcell.models.adapt import MIN_ADAPT_IMAGES, minimise_entropy, norm_layers, recompute_norm_statistics

    index = np.arange(len(y))
    variants = {"as_is": model}
    if adapt and norm_layers(model) and len(y) >= MIN_ADAPT_IMAGES:
        adapted = copy.deepcopy(model)
        recompute_norm_statistics(adapted, images)
        variants["adapted"] = adapted
        tent = copy.deepcopy(adapted)
        minimise_entropy(tent, images, seed=seed)
        variants["adapted_tent"] = tent
    out: dict = {}
    for key, net in variants.items():
        logits, features = predict_outputs(
            net, images, index, progress=progress, desc=f"scoring {out_dir.name} ({key})"
        )
        probs = apply_temperature(logits, temperature)
        stats = ood
        if key != "as_is" and ood is not None:
            stats = fit_mahalanobis_unlabelled(features, logits, false_alarm, seed=seed)
        scores = mahalanobis_score(features, stats[0], stats[1]) if stats is not None else None
        out[key] = score_cells(
            y, probs, names, review_threshold, scores, stats[2] if stats else None, n_bootstrap=n_bootstrap, seed=seed
        )
        _write_predictions(
            out_dir / f"predictions_{key}.csv",
            relpaths,
            [names[int(v)] for v in y],
            probs,
            names,
            scores,
            review_threshold,
            stats[2] if stats else None,
        )
    io.write_json(out_dir / "metrics.json", out)
    return out


def _write_predictions(path: Path, relpaths, true_names, probs, names, scores, review_threshold, ood_threshold) -> None:
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "true", "pred", "confidence", "review", "ood", "ood_score"] + [f"p_{c}" for c in names])
    for i, (rel, true, p) in enumerate(zip(relpaths, true_names, probs)):
        s = None if scores is None else float(scores[i])
        w.writerow(
            [
                rel,
                true,
                names[int(p.argmax())],
                f"{p.max():.6f}",
                int(p.max() < review_threshold),
                "" if s is None else int(s > ood_threshold),
                "" if s is None else f"{s:.4f}",
            ]
            + [f"{v:.6f}" for v in p]
        )
    io.write_text(path, buf.getvalue())


def evaluate_labs(
    run_dir: Path,
    cfg,
    data,
    model,
    temperature: float,
    review: float,
    ood: tuple | None,
    *,
    test: tuple | None = None,
    progress: bool = True,
) -> dict:
    """metrics.json `labs`: each trained-on lab's own test part ("seen") and each eval.labs lab ("held out").

    Args:
        run_dir: the run's folder; each lab's predictions go under run_dir/labs/<lab>.
        cfg: the run's RunConfig (eval.labs, eval.adapt, eval.bootstrap, the data's preprocessing, the seed).
        data: the run's loaded dataset (its parts and the test parts of the labs it trained on).
        model: the trained classifier.
        temperature: the calibration temperature fitted on validation.
        review: the review threshold (answers less confident are flagged).
        ood: the out-of-distribution score fitted on training cells (its two arrays, then its threshold), or None.
        test: (logits, features) of the main dataset's test part, to score it as one more lab row.
    """
    names = data.class_names
    out: dict = {}
    if test is not None:  # the main dataset's own test part, scored the same way, so every lab has one row format
        main = Path(str(data.source.get("root") or "main")).name
        out[main] = {"seen": True, "part": "test", "as_is": _main_test(cfg, data, test, temperature, review, ood)}
    kwargs = dict(
        temperature=temperature,
        review_threshold=review,
        ood=ood,
        adapt=cfg.eval.adapt,
        false_alarm=cfg.eval.ood_false_alarm,
        n_bootstrap=cfg.eval.bootstrap,
        seed=cfg.seed,
        progress=progress,
    )
    for name, idx in data.lab_tests.items():
        if len(idx):
            images = np.asarray(data.images[idx])
            out[name] = {
                "seen": True,
                "part": "test",
                **evaluate_lab(
                    model,
                    images,
                    data.labels[idx],
                    names,
                    out_dir=run_dir / "labs" / name,
                    relpaths=[data.relpaths[i] for i in idx],
                    **kwargs,
                ),
            }
    for source in cfg.eval.labs:
        if source.name in out:
            continue  # trained on: only its own test part is fair, scored above
        out[source.name] = _held_out_lab(source, run_dir, cfg, model, names, **kwargs)
    return out


def _held_out_lab(source, run_dir: Path, cfg, model, names: list[str], *, progress: bool, **kwargs) -> dict:
    """An eval.labs lab the run never trained on: all its cells (or the parts named), read as the run reads its own."""
    from bloodcell.data.labs import lab_images

    lab = lab_images(
        source,
        names,
        size=cfg.data.input_size,
        interpolation=cfg.data.interpolation,
        white_balance=cfg.data.white_balance,
        max_pixels=cfg.data.max_pixels,
        progress=progress,
    )
    return {
        "seen": False,
        "part": ",".join(source.parts or ["all"]),
        **evaluate_lab(
            model,
            lab.images,
            lab.labels,
            names,
            out_dir=run_dir / "labs" / source.name,
            relpaths=lab.relpaths,
            progress=progress,
            **kwargs,
        ),
    }


def _main_test(cfg, data, test: tuple, temperature: float, review: float, ood: tuple | None) -> dict:
    """The main dataset's test part scored from its (logits, features) as a lab's `as_is` block."""
    logits, features = test
    scores = mahalanobis_score(features, ood[0], ood[1]) if ood is not None else None
    return score_cells(
        data.labels[data.parts["test"]],
        apply_temperature(logits, temperature),
        data.class_names,
        review,
        scores,
        ood[2] if ood else None,
        n_bootstrap=cfg.eval.bootstrap,
        seed=cfg.seed,
    )


def lab_summary(labs: dict) -> dict:
    """model.json `labs`: per lab, whether the model trained on it and its headline figures, as is and adapted."""
    keys = (
        "n",
        "accuracy",
        "accuracy_ci95",
        "f1_macro",
        "kept_fraction",
        "accuracy_kept",
        "ood_fraction",
        "review_fraction",
    )
    return {
        name: {
            "seen": v.get("seen"),
            "part": v.get("part"),
            **{
                variant: {k: v[variant].get(k) for k in keys}
                for variant in ("as_is", "adapted", "adapted_tent")
                if variant in v
            },
        }
        for name, v in labs.items()
    }

"""Fitting and comparing out-of-distribution scores (the model-side score is bloodcell.models.ood).

- Mahalanobis (the one shipped): class means + a Ledoit-Wolf shared covariance of the training part's pooled
  features; score = squared distance to the nearest class mean.
- Energy (Liu et al. 2020): -logsumexp(logits); kept for comparison, as is 1 - max softmax.
Higher is more unusual for all three. The flag threshold is a quantile of the validation part's scores, so the
share of ordinary cells flagged (false alarms) is set by `false_alarm`, not by any OOD data.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from bloodcell.errors import DataError

DEFAULT_FALSE_ALARM = 0.01


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(means (K, D), precision (D, D)) from training features; a class with no sample gets the overall mean."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise DataError(
            f"OOD fit needs (N, D) features with N >= 2 and one label each, got {x.shape} and {len(y)} labels"
        )
    means = np.stack([x[y == k].mean(0) if (y == k).any() else x.mean(0) for k in range(num_classes)])
    centred = x - means[y]
    # one BLAS thread: the sums then run in one order, so a resumed run fits the very same numbers as an
    # uninterrupted one whatever threads the process was given
    with threadpool_limits(1):
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_  # shrinkage keeps it invertible
    return means, precision


def mahalanobis_score(features: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared distance to the nearest class mean: whiten once (precision = L L^T), then plain distances."""
    with threadpool_limits(1):  # one summation order: the same threshold in a resumed and an uninterrupted run
        whiten = np.linalg.cholesky(np.asarray(precision, np.float64))
        z, m = np.asarray(features, np.float64) @ whiten, np.asarray(means, np.float64) @ whiten
        return ((z[:, None, :] - m[None]) ** 2).sum(-1).min(1)


def energy_score(logits: np.ndarray) -> np.ndarray:
    return -logsumexp(np.asarray(logits, np.float64), axis=1)


def msp_score(logits: np.ndarray) -> np.ndarray:
    return 1.0 - softmax(np.asarray(logits, np.float64), axis=1).max(1)


def threshold_for(scores: np.ndarray, false_alarm: float = DEFAULT_FALSE_ALARM) -> float:
    """The score above which only `false_alarm` of these (in-distribution) scores lie."""
    scores = np.asarray(scores, np.float64)
    if len(scores) == 0:
        raise DataError("cannot set an OOD threshold without validation images")
    return float(np.quantile(scores, 1.0 - false_alarm))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling `out` from `in` by score (1.0: every out scores above every in)."""
    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))


def fit_mahalanobis_unlabelled(
    features: np.ndarray, logits: np.ndarray, false_alarm: float = DEFAULT_FALSE_ALARM, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, float]:
    """(means, precision, threshold) of the Mahalanobis score for a lab's own unlabelled cells (an adapted model).

    A model adapted to a lab (bloodcell.models.adapt) reads that lab's cells; what should be flagged is then what
    looks unlike them, not unlike the training lab (whose stain and camera every one of them differs from). With no
    labels, the model's own predictions name the classes; the statistics are fitted on one half of the cells and
    the threshold is the (1 - false_alarm) quantile of the other half's scores, so it is not set on the cells that
    shaped it.

    Args:
        features: (N, D) the model's OOD features of the lab's cells.
        logits: (N, K) the model's logits of the same cells; their argmax are the pseudo-labels.
        false_alarm: the fraction of the held-out half's scores above the threshold.
        seed: the random split of the cells into the fitting and the threshold halves.
    """
    x = np.asarray(features, np.float64)
    pseudo = np.asarray(logits).argmax(1)
    order = np.random.default_rng(seed).permutation(len(x))
    fit_idx, hold_idx = order[: len(x) // 2], order[len(x) // 2 :]
    means, precision = fit_mahalanobis(x[fit_idx], pseudo[fit_idx], np.asarray(logits).shape[1])
    return means, precision, threshold_for(mahalanobis_score(x[hold_idx], means, precision), false_alarm)

"""Statistics across runs: paired tests between two models, summaries over repeated seeds."""

from __future__ import annotations

import numpy as np
from scipy import stats

from bloodcell.errors import DataError

# Below this many discordant pairs the chi-square approximation is poor; use the exact test.
EXACT_BELOW = 25


def mcnemar_test(y_true, pred_a, pred_b) -> dict:
    """McNemar's test: do models A and B have the same error rate on the same test samples?

    Returns {b, c, n, statistic, p_value, method, accuracy_a, accuracy_b}, where b counts samples
    A got right and B wrong and c the reverse. With b + c < 25 the test is the exact two-sided
    binomial test of b ~ Bin(b + c, 0.5) (statistic = b); otherwise chi-square with continuity
    correction, (|b - c| - 1)^2 / (b + c) on 1 degree of freedom. No discordant pairs: p = 1.
    """
    y, a, b_ = (np.asarray(v).astype(int).ravel() for v in (y_true, pred_a, pred_b))
    if not len(y) == len(a) == len(b_) or len(y) == 0:
        raise DataError(f"need equal, non-zero numbers of labels and predictions, got {len(y)}, {len(a)}, {len(b_)}")
    right_a, right_b = a == y, b_ == y
    b = int(np.sum(right_a & ~right_b))
    c = int(np.sum(~right_a & right_b))
    if b + c < EXACT_BELOW:
        method = "exact"
        statistic = float(b)
        p = 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)
    else:
        method = "chi2_cc"
        statistic = (abs(b - c) - 1) ** 2 / (b + c)
        p = float(stats.chi2.sf(statistic, df=1))
    return {
        "b": b,
        "c": c,
        "n": int(len(y)),
        "statistic": float(statistic),
        "p_value": min(p, 1.0),
        "method": method,
        "accuracy_a": float(right_a.mean()),
        "accuracy_b": float(right_b.mean()),
    }


def mean_sd_ci(values, alpha: float = 0.05) -> dict:
    """Return {mean, sd, n, ci95} of `values` (e.g. one metric over seeds).

    sd is the sample standard deviation (ddof=1); ci95 is the Student-t (1 - alpha) interval
    for the mean (95% at the default alpha; the key keeps its name for other alphas).
    With one value there is no spread to estimate: sd is 0.0 and ci95 is None.
    """
    x = _floats(values, "values")
    if not 0 < alpha < 1:
        raise DataError(f"alpha must be in (0, 1), got {alpha}")
    n, mean = len(x), float(np.mean(x))
    if n == 1:
        return {"mean": mean, "sd": 0.0, "n": 1, "ci95": None}
    sd = float(np.std(x, ddof=1))
    half = float(stats.t.ppf(1 - alpha / 2, df=n - 1)) * sd / np.sqrt(n)
    return {"mean": mean, "sd": sd, "n": n, "ci95": [mean - half, mean + half]}


def paired_difference_summary(a_values, b_values) -> dict:
    """Summarise a - b over paired runs (e.g. the same seeds trained with two settings).

    Returns {mean_difference, sd, n, ci95, t_statistic, p_value}: mean_sd_ci of the differences
    plus a paired t-test (scipy.stats.ttest_rel). With n < 2 the test is undefined and
    t_statistic/p_value are None; when all differences are equal (sd 0), t_statistic is None and
    p_value is 1.0 if they are all 0, else 0.0.
    """
    a, b = _floats(a_values, "a_values"), _floats(b_values, "b_values")
    if len(a) != len(b):
        raise DataError(f"paired values need equal lengths, got {len(a)} and {len(b)}")
    d = a - b
    summary = mean_sd_ci(d)
    out = {"mean_difference": summary["mean"], "sd": summary["sd"], "n": summary["n"], "ci95": summary["ci95"]}
    if len(d) < 2:
        out.update(t_statistic=None, p_value=None)
    elif np.all(d == d[0]):
        # scipy returns NaN (and warns) here: the t statistic is 0/0 or x/0.
        out.update(t_statistic=None, p_value=1.0 if d[0] == 0 else 0.0)
    else:
        res = stats.ttest_rel(a, b)
        out.update(t_statistic=float(res.statistic), p_value=float(res.pvalue))
    return out


def _floats(values, name: str) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if len(x) == 0:
        raise DataError(f"{name} is empty")
    if not np.all(np.isfinite(x)):
        raise DataError(f"{name} contains NaN or infinity")
    return x

"""Temperature scaling (Guo et al. 2017): one scalar T > 0 that divides the logits.

T > 1 softens overconfident predictions; argmax, hence accuracy, never changes. Fit T on a
validation split, never on the test split it will be judged on.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import logsumexp

from bloodcell.errors import DataError

# Search range for T. An optimum at an edge means the logits carry no usable scale
# (e.g. perfectly separated validation data pushes T towards 0).
T_MIN, T_MAX = 1e-2, 1e2


def softmax(logits, axis: int = -1) -> np.ndarray:
    """Return softmax probabilities (float64) of `logits` along `axis`; stable for large logits."""
    z = _as_logits(logits, allow_any_ndim=True)
    z = z - z.max(axis=axis, keepdims=True)  # exp of <= 0 never overflows
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def apply_temperature(logits, temperature: float) -> np.ndarray:
    """Return softmax(logits / temperature) as float64 probabilities of shape (N, K)."""
    if not np.isfinite(temperature) or temperature <= 0:
        raise DataError(f"temperature must be a positive number, got {temperature}")
    return softmax(_as_logits(logits) / temperature)


def nll_at_temperature(logits, y_true, temperature: float) -> float:
    """Return the mean negative log-likelihood of softmax(logits / temperature) at the true labels."""
    z, y = _check(logits, y_true)
    return _nll(z, y, temperature)


def fit_temperature(logits, y_true) -> float:
    """Return the T in [0.01, 100] minimising the NLL of softmax(logits / T); deterministic.

    Optimises log T with bounded Brent search: the NLL is convex in 1/T, so it has a single
    minimum in log T and the search finds it without a starting point.
    """
    z, y = _check(logits, y_true)
    res = minimize_scalar(
        lambda log_t: _nll(z, y, float(np.exp(log_t))),
        bounds=(np.log(T_MIN), np.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(res.x))


def _nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    scaled = z / t
    return float(np.mean(logsumexp(scaled, axis=1) - scaled[np.arange(len(y)), y]))


def _check(logits, y_true) -> tuple[np.ndarray, np.ndarray]:
    z = _as_logits(logits)
    y = np.asarray(y_true.detach().cpu().numpy() if hasattr(y_true, "detach") else y_true)
    if y.shape != (len(z),):
        raise DataError(f"labels must have shape ({len(z)},) to match the logits, got {y.shape}")
    y = y.astype(int)
    if len(y) and (y.min() < 0 or y.max() >= z.shape[1]):
        raise DataError(f"labels must lie in [0, {z.shape[1]})")
    return z, y


def _as_logits(logits, allow_any_ndim: bool = False) -> np.ndarray:
    """Convert numpy/list/torch logits to float64, rejecting empty or non-finite input."""
    if hasattr(logits, "detach"):
        logits = logits.detach().cpu().numpy()
    z = np.asarray(logits, dtype=np.float64)
    if not allow_any_ndim and (z.ndim != 2 or z.shape[0] == 0):
        raise DataError(f"logits must have shape (N, K) with N >= 1, got {z.shape}")
    if z.size == 0:
        raise DataError("logits are empty")
    if not np.all(np.isfinite(z)):
        raise DataError("logits contain NaN or infinity")
    return z

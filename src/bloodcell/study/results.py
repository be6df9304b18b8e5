"""A study run's results as the report reads them: its metrics, predictions, state and wall time, and the
report's ways of writing a number (percent, mean ± sd, confidence interval, p-value)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from bloodcell.evaluate.stats import mean_sd_ci
from bloodcell.study.experiment import lookup, read_status
from bloodcell.study.runs import run_dir_for
from bloodcell.study.spec import RunSpec


def pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def mean_sd(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{100 * vals[0]:.2f}"
    s = mean_sd_ci(vals)
    return f"{100 * s['mean']:.2f} ± {100 * s['sd']:.2f}"


def ci_text(values: list[float], single_ci, unit: str = "seeds") -> str:
    vals = [v for v in values if v is not None]
    if len(vals) >= 2:
        lo, hi = mean_sd_ci(vals)["ci95"]
        return f"[{100 * lo:.2f}, {100 * hi:.2f}] (t, n={len(vals)} {unit})"
    if len(vals) == 1 and single_ci:
        return f"[{100 * single_ci[0]:.2f}, {100 * single_ci[1]:.2f}] (bootstrap)"
    return "–"


def run_metrics(out: Path, run: RunSpec) -> dict | None:
    d = run_dir_for(out, run)
    if read_status(d).get("state") != "complete":
        return None
    for name in ("metrics.json", "aggregate.json"):
        if (d / name).exists():
            return json.loads((d / name).read_text())
    return None


def metric_value(m: dict, key: str):
    """A metric from a single run (metrics.json) or the mean over folds (aggregate.json)."""
    if "summary" in m:
        s = m["summary"].get(key)
        return None if s is None else s["mean"]
    return lookup(m, key)


def read_predictions(run_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    f = run_dir / "predictions.csv"
    if not f.exists():
        return None
    with open(f) as fh:
        rows = list(csv.DictReader(fh))
    names = {n: i for i, n in enumerate(sorted({r["true"] for r in rows} | {r["pred"] for r in rows}))}
    return (
        [r["path"] for r in rows],
        np.array([names[r["true"]] for r in rows]),
        np.array([names[r["pred"]] for r in rows]),
    )


def missing_note(out: Path, entries: list) -> str:
    """Why a row has no numbers: '(failed)', '(interrupted)' or '(not run yet)'."""
    states = {read_status(run_dir_for(out, r)).get("state") for r, _ in entries}
    if "failed" in states:
        return " (failed)"
    return " (interrupted)" if "running" in states else " (not run yet)"


def run_seconds(out: Path, run: RunSpec) -> float | None:
    """A run's wall seconds: its status, or the sum over its fold / seed sub-runs."""
    d = run_dir_for(out, run)
    secs = read_status(d).get("seconds")
    if isinstance(secs, (int, float)):
        return float(secs)
    subs = [read_status(p.parent).get("seconds") for p in d.glob("*/status.json")]
    subs = [s for s in subs if isinstance(s, (int, float))]
    return float(sum(subs)) if subs and read_status(d).get("state") == "complete" else None


def read_budget(out: Path) -> dict | None:
    try:
        return json.loads((out / "budget.json").read_text())
    except (OSError, ValueError):
        return None


def p_text(p: float) -> str:
    return "< 1e-16" if p < 1e-16 else f"{p:.3g}"  # below double precision's resolution near 1

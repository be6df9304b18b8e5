"""Run a study: every (experiment, protocol, seed) in turn or K at once, resumable, one failure never stopping
the rest."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bloodcell import io
from bloodcell.progress import console, enabled_by_default
from bloodcell.study.experiment import is_complete, remove_stale_checkpoints
from bloodcell.study.parallel import check_single_device, resolve_parallel, run_parallel
from bloodcell.study.runs import run_dir_for, run_state, train_run  # noqa: F401  (their old home: study.runner)
from bloodcell.study.spec import RunSpec, expand_runs, load_study


def git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def run_study(
    config: str | os.PathLike,
    out: str | os.PathLike,
    *,
    data: str | None = None,
    overrides: list[str] | None = None,
    only: list[str] | None = None,
    progress: bool = True,
    report_only: bool = False,
    parallel: int | str = 1,
) -> dict:
    """Run every run of the study config into out/runs/..., then write out/report.md and out/report.html.

    `report_only`: train nothing; write the report from the runs already in `out` (e.g. while a study is paused).
    `parallel`: how many runs train at once, each in its own worker process on one device (bloodcell.study.parallel);
    'auto': one per visible CUDA device (1 without CUDA). 1: one after the other in this process.

    Args:
        config: The study YAML file.
        out: The study's output folder (runs/, logs, study.yaml, study_status.json, the report).
        data: The data folder, set as data.root on every run (after the other overrides); None keeps the configs'.
        overrides: `key=value` config overrides (dotted keys) applied to every run.
        only: Names of the experiments to run; None runs them all.
        progress: Show the study's progress bar.
        report_only: Train nothing, only write the report.
        parallel: Runs at once: a number or 'auto'.
    """
    from bloodcell.study.report import write_report

    spec, base_dir = load_study(config)
    extra = list(overrides or []) + ([f"data.root={data}"] if data else [])
    runs = expand_runs(spec, base_dir, extra, only)
    workers = 1 if report_only else resolve_parallel(parallel, runs)
    if workers > 1:
        check_single_device(runs, workers)  # before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not report_only:
        io.remove_leftover_temporaries(out)  # an interrupted study's half-written files
        io.write_text(out / "study.yaml", Path(config).read_text())
    t_start = time.perf_counter()
    show = progress and enabled_by_default()
    results = _train_runs(runs, out, workers, name=spec.name, show=show, train=not report_only)
    summary = _summary(spec.name, runs, out, results, workers, seconds=time.perf_counter() - t_start)
    io.write_json(out / "study_status.json", summary)
    report = write_report(spec, runs, out, summary)
    summary["report"] = str(report)
    return summary


def _train_runs(runs: list[RunSpec], out: Path, workers: int, *, name: str, show: bool, train: bool) -> dict[str, dict]:
    """Train the runs not yet complete, in turn or `workers` at once, under one progress bar; {run key: record}.
    With `train` false (report only) the bar is shown and nothing runs."""
    results: dict[str, dict] = {}
    columns = [
        TextColumn("[bold]study {task.fields[name]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("runs"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]
    with Progress(*columns, console=console(), disable=not show) as bar:
        task = bar.add_task("runs", total=len(runs), name=name)

        def done(run: RunSpec, record: dict) -> None:
            results[run.key] = record
            if record["state"] == "failed":
                console().print(f"[red]run {run.key} failed:[/red] {escape(record['error'])}")
            bar.advance(task)

        pending = []
        for run in runs if train else []:
            run_dir = run_dir_for(out, run)
            if is_complete(run_dir):
                remove_stale_checkpoints(run_dir)
                results[run.key] = {"state": "complete", "skipped": True}
                bar.advance(task)
            else:
                pending.append((run, run_dir))
        if workers > 1:
            run_parallel(
                pending,
                out,
                workers,
                on_done=done,
                on_start=lambda run, slot: (
                    console().print(f"[bold]{run.key}[/bold] ({_describe(run)}) on {slot.describe()}") if show else None
                ),
            )
        for run, run_dir in [] if workers > 1 else pending:
            console().print(f"[bold]{run.key}[/bold] ({_describe(run)})") if show else None
            done(run, train_run(run.config, run_dir, progress=show))
    return results


def _summary(name: str, runs: list[RunSpec], out: Path, results: dict, workers: int, *, seconds: float) -> dict:
    """study_status.json: counts, failures in study order, and each finished run's test accuracy and recalls."""
    summary = {
        "study": name,
        "runs": len(runs),
        "complete": sum(1 for r in runs if is_complete(run_dir_for(out, r))),
        "failed": [r.key for r in runs if results.get(r.key, {}).get("state") == "failed"],  # study order
        "parallel": workers,
        "wall_seconds_this_invocation": round(seconds, 1),
        "git_commit": git_commit(),
    }
    summary["results"] = []
    for r in runs:
        m = run_state(out, r).get("metrics", {})
        if "test" in m:
            summary["results"].append(
                {
                    "run": r.key,
                    "accuracy": m["test"]["accuracy"],
                    "per_class_recall": {k: v["recall"] for k, v in m["test"]["per_class"].items()},
                }
            )
    return summary


def _describe(run: RunSpec) -> str:
    return f"{run.config.model.name}, {run.config.data.input_size}px, {run.config.train.epochs} epochs"

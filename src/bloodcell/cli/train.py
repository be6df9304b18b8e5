"""`bloodcell train` and `bloodcell study`: train one run, or many experiments with their report."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from bloodcell.cli.common import app, print_result, user_errors, writable_folder
from bloodcell.errors import BloodcellError, DataError

# Heavy modules (torch, lightning, fastapi, the models, rich) are imported inside the commands: --help stays fast.


@app.command("train")
@user_errors
def train_cmd(
    config: Path = typer.Argument(..., help="Run config (YAML), e.g. configs/train/cnn.yaml."),
    overrides: List[str] = typer.Option([], "--set", help="Override a key: --set train.epochs=5 (repeatable)."),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        readable=False,
        help="Dataset folder (a sub-folder per class) or CSV of path,label[,group] (sets data.root).",
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<config name>)."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue an interrupted run in --out from its last checkpoint.",
    ),
) -> None:
    """Train a model (one run, or one per seed / fold) and evaluate it on the test part."""
    from bloodcell.config import load_config
    from bloodcell.study.experiment import run_config

    extra = list(overrides) + ([f"data.root={data}"] if data else [])
    cfg = load_config(config, extra)
    out = writable_folder(out or Path("runs") / (cfg.name or config.stem))
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    # DDP children re-run this command after rank 0 has created the run directory
    if not resume and rank_zero_only.rank == 0 and (out / "config.yaml").exists():
        from bloodcell.study.experiment import is_complete

        if not is_complete(out) and not (cfg.seeds or cfg.cv.folds):
            raise BloodcellError(f"{out} holds an unfinished run: add --resume to continue it, or choose another --out")
    result = run_config(cfg, out, resume=True)
    if not result:
        return  # a non-zero DDP rank
    print_result(out, result)


@app.command("study")
@user_errors
def study_cmd(
    config: Path = typer.Argument(..., help="Study config (YAML), e.g. configs/paper.yaml or configs/demo.yaml."),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        readable=False,
        help="Dataset folder or CSV of path,label[,group] (sets data.root of every run).",
    ),
    out: Optional[Path] = typer.Option(None, "--out", help="Study directory (default runs/<study name>)."),
    only: List[str] = typer.Option([], "--only", help="Run only these experiments (repeatable)."),
    overrides: List[str] = typer.Option([], "--set", help="Override a key of every run: --set train.epochs=2."),
    report_only: bool = typer.Option(
        False,
        "--report-only",
        help="Train nothing: write the report from the runs already in --out.",
    ),
    estimate: bool = typer.Option(
        False,
        "--estimate",
        help="Train nothing: measure each model's epoch rate here and print how long every run will take "
        "(writes --out/budget.json).",
    ),
    parallel: str = typer.Option(
        "1",
        "--parallel",
        metavar="K|auto",
        help="Train K runs at once, each in its own process on one device: on CUDA worker i sees only GPU i, "
        "on CPU each gets 1/K of the torch threads. auto: one per visible GPU (1 without CUDA).",
    ),
) -> None:
    """Run many experiments (model x protocol x seed), resumably, and write report.md + report.html."""
    from bloodcell.study.parallel import parse_parallel
    from bloodcell.study.runner import run_study
    from bloodcell.study.spec import load_study

    workers = parse_parallel(parallel)
    spec, _ = load_study(config)
    out = writable_folder(out or Path("runs") / spec.name)
    if estimate:
        _estimate_study(config, out, data, list(overrides), list(only) or None)
        return
    summary = run_study(
        config,
        out,
        data=str(data) if data else None,
        overrides=list(overrides),
        only=list(only) or None,
        report_only=report_only,
        parallel=workers,
    )
    failed = f"; failed: {', '.join(summary['failed'])}" if summary["failed"] else ""
    typer.echo(f"runs complete: {summary['complete']} of {summary['runs']}" + failed)
    _print_study_summary(summary)
    typer.echo(f"report: {summary['report']}")
    typer.echo(f"        {Path(summary['report']).with_suffix('.md')}")


def _estimate_study(
    config: Path, out: Path, data: Optional[Path], overrides: list[str], only: list[str] | None
) -> None:
    """`study --estimate`: each run's wall time here, from a measured epoch rate; written to OUT/budget.json."""
    from rich.console import Console
    from rich.table import Table

    from bloodcell import io
    from bloodcell.study.budget import budget_record, class_counts, estimate_runs
    from bloodcell.study.spec import expand_runs, load_study

    spec, base_dir = load_study(config)
    runs = expand_runs(spec, base_dir, overrides + ([f"data.root={data}"] if data else []), only)
    root = runs[0].config.data.root if runs else None
    if not root or not Path(root).is_dir():
        raise DataError(f"--estimate needs the dataset folder (--data DIR) to count its images; got {root}")
    c = Console(stderr=True)
    with c.status("measuring epoch rates") as status:
        estimates = estimate_runs(runs, class_counts(root), progress=lambda msg: status.update(msg))
    table = Table(title=f"{spec.name}: estimated wall time on this machine")
    for col in ("run", "model", "px", "epochs", "train images", "minutes"):
        table.add_column(col, justify="left" if col in ("run", "model") else "right")
    for e in estimates:
        epochs = str(e.epochs) + (f" x {e.folds} folds" if e.folds > 1 else "")
        table.add_row(e.run, e.model, str(e.input_size), epochs, f"{e.train_images:,}", f"{e.seconds / 60:.1f}")
    Console().print(table)
    record = budget_record(estimates)
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / "budget.json", record)
    typer.echo(
        f"total: {record['total_seconds'] / 60:.0f} min on {record['machine']} (written to {out / 'budget.json'})"
    )


def _print_study_summary(summary: dict) -> None:
    """Test accuracy per run and per-class recall of the best run: what a person wants to see first."""
    from rich.console import Console
    from rich.table import Table

    best = max(summary.get("results", []), key=lambda r: r["accuracy"], default=None)
    if best is None:
        return
    table = Table(title="test accuracy per run")
    table.add_column("run")
    table.add_column("test acc %", justify="right")
    for r in summary["results"]:
        table.add_row(r["run"], f"{100 * r['accuracy']:.1f}")
    Console().print(table)
    per_class = Table(title=f"best run {best['run']}: recall per class")
    per_class.add_column("class")
    per_class.add_column("recall %", justify="right")
    for name, v in best["per_class_recall"].items():
        per_class.add_row(name, f"{100 * v:.0f}")
    Console().print(per_class)

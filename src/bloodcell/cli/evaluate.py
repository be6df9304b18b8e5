"""`bloodcell evaluate` and `bloodcell ensemble`: score a finished run, a model on a labelled folder, or several runs
voting together."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from bloodcell.cli.common import app, print_result, user_errors, writable_folder
from bloodcell.errors import BloodcellError

# Heavy modules (torch, lightning, fastapi, the models, rich) are imported inside the commands: --help stays fast.


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    run_dir: Path = typer.Argument(
        ...,
        readable=False,
        help="A finished run directory (holds config.yaml and model.safetensors); "
        "with --model, a labelled folder (one sub-folder per class).",
    ),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        readable=False,
        help="Dataset folder or CSV, if it moved since training.",
    ),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        help="Score this model on the labelled folder DIR: a run directory, its model.safetensors, an .onnx, "
        "or 'default' (the bundled model).",
    ),
    maps: List[str] = typer.Option(
        [],
        "--map",
        help="With --model: folder=class, for a folder name the model does not know (repeatable).",
    ),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        help="With --model: output folder (default runs/evaluate/<DIR name>-<model name>).",
    ),
    bootstrap: int = typer.Option(
        1000,
        "--bootstrap",
        min=0,
        help="With --model: bootstrap resamples for the 95 % CIs.",
    ),
) -> None:
    """Re-evaluate a trained run on its own test part, or (--model M) score a model on any labelled folder."""
    if model is not None:
        if data is not None:
            raise BloodcellError("--data is for re-evaluating a run; with --model, DIR itself is the labelled folder")
        _evaluate_folder(run_dir, model, maps, out, bootstrap)
        return
    if maps or out is not None or bootstrap != 1000:
        raise BloodcellError("--map, --out and --bootstrap need --model (score a model on a labelled folder)")
    from bloodcell.config import load_config
    from bloodcell.data.prepare import prepare_data
    from bloodcell.evaluate.run import evaluate_run
    from bloodcell.models.checkpoint import load_checkpoint

    if not (run_dir / "config.yaml").exists():
        raise BloodcellError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", [f"data.root={data}"] if data else [])
    model_, _ = load_checkpoint(run_dir)
    prepared = prepare_data(cfg, split_file=run_dir / "split.json")
    # what training recorded (its wall time, fold, precision) stays: re-evaluating trains nothing
    metrics_file = run_dir / "metrics.json"
    previous = json.loads(metrics_file.read_text()).get("provenance", {}) if metrics_file.exists() else {}
    kept = {k: previous[k] for k in ("train_seconds", "fold", "precision", "channels_last") if k in previous}
    metrics = evaluate_run(run_dir, cfg, prepared, model_, extra=kept)
    print_result(run_dir, metrics)


def _evaluate_folder(folder: Path, model: str, maps: List[str], out: Optional[Path], bootstrap: int) -> None:
    """`bloodcell evaluate DIR --model M`: see bloodcell.evaluate.folder."""
    from rich.console import Console

    from bloodcell.evaluate.folder import evaluate_folder, headline, parse_mappings
    from bloodcell.infer import Predictor

    mapping = parse_mappings(maps)
    if not folder.is_dir():
        raise BloodcellError(
            f"labelled folder not found: {folder}"
            if not folder.exists()
            else f"{folder} is not a folder (DIR must hold one sub-folder per class)"
        )
    if out is not None:
        writable_folder(out)
    predictor = Predictor.load(None if model == "default" else model)
    out = writable_folder(out or Path("runs") / "evaluate" / f"{folder.resolve().name}-{predictor.model_name}")
    metrics = evaluate_folder(predictor, folder, out, mapping, progress=True, n_bootstrap=bootstrap, model_source=model)
    c = Console(soft_wrap=True)
    for line in headline(metrics):
        c.print(line, markup=False)
    for u in metrics["unreadable"][:20]:
        c.print(f"unreadable: {u['path']}: {u['reason']}", markup=False)
    if len(metrics["unreadable"]) > 20:
        c.print(f"... and {len(metrics['unreadable']) - 20} more unreadable (metrics.json)", markup=False)
    c.print(f"written to {out} (metrics.json, predictions.csv, report.md, figures/)", markup=False)


@app.command("ensemble")
@user_errors
def ensemble_cmd(
    run_dirs: list[Path] = typer.Argument(
        ...,
        help="Two or more finished runs tested on the same split (their predictions.csv).",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Directory for the ensemble's metrics.json, predictions.csv and figures/.",
    ),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Bootstrap resamples for the 95 % CIs."),
) -> None:
    """Soft-voting ensemble of finished runs: average their test probabilities, score them, compare with the best
    member."""
    from rich.console import Console

    from bloodcell.evaluate.ensemble import ensemble_runs

    result = ensemble_runs(run_dirs, out, n_bootstrap=bootstrap)
    c, t, vs = Console(), result["test"], result["vs_best_member"]
    for member, acc in result["member_accuracy"].items():
        c.print(f"member {member}: test accuracy {acc:.4f}")
    lo, hi = (t.get("ci95") or {}).get("accuracy", [float("nan")] * 2)
    c.print(
        f"ensemble of {len(run_dirs)}: test accuracy {t['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}), "
        f"macro F1 {t['f1_macro']:.4f}; "
        f"vs best member McNemar p = {vs['p_value']:.3g}"
    )
    c.print(f"written to {out}")

"""The `bloodcell` command line: a thin layer over functions users can import.

Heavy modules (torch, matplotlib) are imported inside each command so `--help` stays fast.
Errors a user can act on (BloodcellError) print as one line `error: ...` and exit with status 2.
Dataset folders are declared `readable=False` so that click does not pre-check them with a multi-line usage
error: the scan itself reports an unreadable folder in one line, naming it.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from bloodcell.errors import BloodcellError, DataError
from bloodcell.serve.limits import HELP as SERVE_HELP
from bloodcell.serve.limits import ServerLimits

app = typer.Typer(
    help="Classify images of single peripheral blood cells.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
)
data_app = typer.Typer(help="Inspect, validate and plot an image dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def user_errors(fn: Callable) -> Callable:
    """Turn BloodcellError into a one-line message and exit status 2; so is a command that needs the [train] extra
    in the light inference install."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BloodcellError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        except ModuleNotFoundError as exc:
            from bloodcell.extras import INSTALL_TRAIN, missing_train_module

            missing = missing_train_module(exc)
            if missing is None:
                raise
            command = "bloodcell " + fn.__name__.removesuffix("_cmd").replace("_", " ")
            typer.echo(f"error: '{command}' needs PyTorch and the training install ({missing} is not installed): {INSTALL_TRAIN}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def writable_folder(folder: Path, option: str = "--out") -> Path:
    """Check, before any work, that `folder` can be made and written in: a read-only folder, a file in the way or a
    permission denied is a one-line error naming the folder, not a traceback at the end. Folders the check had to
    make are removed again: a run that then fails on its data leaves nothing behind."""
    import os

    if folder.exists() and not folder.is_dir():
        raise BloodcellError(f"{option} {folder}: cannot write there: it is a file, not a folder")
    made, step = [], folder.absolute()
    while not step.exists() and step != step.parent:
        made.append(step)
        step = step.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".bloodcell-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        for path in made:  # deepest first
            path.rmdir()
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.filename and Path(exc.filename) != folder and not str(exc.filename).startswith(str(folder / ".bloodcell-write-check")):
            why += f" ({exc.filename})"
        raise BloodcellError(f"{option} {folder}: cannot write there: {why}") from None
    return folder


def _print_version(value: bool) -> None:
    """--version: an eager callback, so it answers before click asks for a command ("Missing command.")."""
    if value:
        from bloodcell import __version__

        typer.echo(f"bloodcell {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
) -> None:
    pass


# --------------------------------------------------------------------------- data


@data_app.command("inspect")
@user_errors
def data_inspect(
    root: Path = typer.Argument(..., readable=False, help="Dataset folder (one sub-folder per class, ImageFolder layout) or CSV of path,label[,group]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    max_pixels: int = typer.Option(
        None, help="Images with more pixels than this are skipped as possible decompression bombs."
    ),
) -> None:
    """Count images per class, list unreadable files and duplicate groups."""
    from bloodcell.data.discover import DEFAULT_MAX_PIXELS, scan

    inv = scan(root, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, progress=not as_json)
    report = inv.summary()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from bloodcell.data.discover import print_summary

    print_summary(report)


@data_app.command("figures")
@user_errors
def data_figures(
    root: Path = typer.Argument(..., readable=False, help="Dataset folder (ImageFolder layout)."),
    out: Path = typer.Option(..., "--out", help="Folder for the PNG figures."),
    seed: int = typer.Option(42, help="Split seed."),
    test_size: float = typer.Option(0.3, help="Test fraction of the stratified split."),
    val_size: float = typer.Option(0.2, help="Validation fraction carved from the training part."),
    per_class: int = typer.Option(6, help="Sample images per class in the grid."),
) -> None:
    """Plot the class distribution per split (paper Fig. 2) and a sample grid per class (Fig. 1)."""
    from bloodcell.data.discover import scan
    from bloodcell.data.figures import plot_class_distribution, plot_sample_grid
    from bloodcell.data.split import SplitConfig, make_split

    inv = scan(root)
    split = make_split(inv, SplitConfig(seed=seed, test_size=test_size, val_size=val_size))
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        plot_class_distribution(split, out / "class_distribution.png"),
        plot_sample_grid(inv, out / "samples.png", per_class=per_class, seed=seed),
    ]
    for p in paths:
        typer.echo(str(p))


# --------------------------------------------------------------------------- train / evaluate


@app.command("train")
@user_errors
def train_cmd(
    config: Path = typer.Argument(..., help="Run config (YAML), e.g. configs/train/cnn.yaml."),
    overrides: List[str] = typer.Option([], "--set", help="Override a key: --set train.epochs=5 (repeatable)."),
    data: Optional[Path] = typer.Option(None, "--data", readable=False, help="Dataset folder (a sub-folder per class) or CSV of path,label[,group] (sets data.root)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<config name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out from its last checkpoint."),
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
    _print_result(out, result)


@app.command("evaluate")
@user_errors
def evaluate_cmd(
    run_dir: Path = typer.Argument(
        ..., readable=False,
        help="A finished run directory (holds config.yaml and model.safetensors); with --model, a labelled folder (one sub-folder per class).",
    ),
    data: Optional[Path] = typer.Option(None, "--data", readable=False, help="Dataset folder or CSV, if it moved since training."),
    model: Optional[str] = typer.Option(
        None, "--model", help="Score this model on the labelled folder DIR: a run directory, its model.safetensors, an .onnx, or 'default' (the bundled model)."
    ),
    maps: List[str] = typer.Option([], "--map", help="With --model: folder=class, for a folder name the model does not know (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="With --model: output folder (default runs/evaluate/<DIR name>-<model name>)."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="With --model: bootstrap resamples for the 95 % CIs."),
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
    previous = json.loads((run_dir / "metrics.json").read_text()).get("provenance", {}) if (run_dir / "metrics.json").exists() else {}
    kept = {k: previous[k] for k in ("train_seconds", "fold", "precision", "channels_last") if k in previous}
    metrics = evaluate_run(run_dir, cfg, prepared, model_, extra=kept)
    _print_result(run_dir, metrics)


def _evaluate_folder(folder: Path, model: str, maps: List[str], out: Optional[Path], bootstrap: int) -> None:
    """`bloodcell evaluate DIR --model M`: see bloodcell.evaluate.folder."""
    from rich.console import Console

    from bloodcell.evaluate.folder import evaluate_folder, headline, parse_mappings
    from bloodcell.infer import Predictor

    mapping = parse_mappings(maps)
    if not folder.is_dir():
        raise BloodcellError(f"labelled folder not found: {folder}" if not folder.exists() else f"{folder} is not a folder (DIR must hold one sub-folder per class)")
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
    run_dirs: list[Path] = typer.Argument(..., help="Two or more finished runs tested on the same split (their predictions.csv)."),
    out: Path = typer.Option(..., "--out", help="Directory for the ensemble's metrics.json, predictions.csv and figures/."),
    bootstrap: int = typer.Option(1000, "--bootstrap", min=0, help="Bootstrap resamples for the 95 % CIs."),
) -> None:
    """Soft-voting ensemble of finished runs: average their test probabilities, score them, compare with the best member."""
    from rich.console import Console

    from bloodcell.evaluate.ensemble import ensemble_runs

    result = ensemble_runs(run_dirs, out, n_bootstrap=bootstrap)
    c, t, vs = Console(), result["test"], result["vs_best_member"]
    for member, acc in result["member_accuracy"].items():
        c.print(f"member {member}: test accuracy {acc:.4f}")
    lo, hi = (t.get("ci95") or {}).get("accuracy", [float("nan")] * 2)
    c.print(f"ensemble of {len(run_dirs)}: test accuracy {t['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}), macro F1 {t['f1_macro']:.4f}; "
            f"vs best member McNemar p = {vs['p_value']:.3g}")
    c.print(f"written to {out}")


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


def _print_result(out: Path, result: dict) -> None:
    from rich.console import Console

    c = Console()
    if "summary" in result:
        for key, s in result["summary"].items():
            ci = s.get("ci95")
            ci_text = f"  95% CI [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
            c.print(f"{key:28s} {s['mean']:.4f} +- {s['sd']:.4f} (n={s['n']}){ci_text}")
    else:
        t = result.get("test", {})
        if t:
            lo, hi = (t.get("ci95") or {}).get("accuracy", [float("nan")] * 2)
            c.print(f"test accuracy {t['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}), macro F1 {t['f1_macro']:.4f}, "
                    f"ECE {t['ece']:.4f} -> {t['ece_calibrated']:.4f} calibrated; train accuracy {result['train']['accuracy']:.4f}")
    c.print(f"run directory: {out}")


# --------------------------------------------------------------------------- study


@app.command("study")
@user_errors
def study_cmd(
    config: Path = typer.Argument(..., help="Study config (YAML), e.g. configs/paper.yaml or configs/demo.yaml."),
    data: Optional[Path] = typer.Option(None, "--data", readable=False, help="Dataset folder or CSV of path,label[,group] (sets data.root of every run)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Study directory (default runs/<study name>)."),
    only: List[str] = typer.Option([], "--only", help="Run only these experiments (repeatable)."),
    overrides: List[str] = typer.Option([], "--set", help="Override a key of every run: --set train.epochs=2."),
    report_only: bool = typer.Option(False, "--report-only", help="Train nothing: write the report from the runs already in --out."),
    estimate: bool = typer.Option(False, "--estimate", help="Train nothing: measure each model's epoch rate here and print how long every run will take (writes --out/budget.json)."),
    parallel: str = typer.Option(
        "1", "--parallel", metavar="K|auto",
        help="Train K runs at once, each in its own process on one device: on CUDA worker i sees only GPU i, on CPU each gets 1/K of the torch threads. auto: one per visible GPU (1 without CUDA).",
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
    summary = run_study(config, out, data=str(data) if data else None, overrides=list(overrides), only=list(only) or None, report_only=report_only, parallel=workers)
    typer.echo(f"runs complete: {summary['complete']} of {summary['runs']}" + (f"; failed: {', '.join(summary['failed'])}" if summary["failed"] else ""))
    _print_study_summary(summary)
    typer.echo(f"report: {summary['report']}")
    typer.echo(f"        {Path(summary['report']).with_suffix('.md')}")

def _estimate_study(config: Path, out: Path, data: Optional[Path], overrides: list[str], only: list[str] | None) -> None:
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
        table.add_row(e.run, e.model, str(e.input_size), str(e.epochs) + (f" x {e.folds} folds" if e.folds > 1 else ""), f"{e.train_images:,}", f"{e.seconds / 60:.1f}")
    Console().print(table)
    record = budget_record(estimates)
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / "budget.json", record)
    typer.echo(f"total: {record['total_seconds'] / 60:.0f} min on {record['machine']} (written to {out / 'budget.json'})")


# --------------------------------------------------------------------------- models


@app.command("models")
@user_errors
def models(
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
) -> None:
    """List the model zoo: paper row, parameters (8 classes), input sizes, ImageNet weights."""
    from bloodcell.models import list_models, model_info

    infos = [model_info(name) for name in list_models()]  # builds each model once to count params
    if as_json:
        keys = ("name", "params", "input_size", "min_input_size", "paper_row", "pretrained_available")
        typer.echo(json.dumps([{k: getattr(info, k) for k in keys} for info in infos], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bloodcell models")
    for column, justify in (
        ("name", "left"),
        ("paper row", "left"),
        ("params", "right"),
        ("input size", "right"),
        ("min size", "right"),
        ("ImageNet", "center"),
    ):
        table.add_column(column, justify=justify)
    for info in infos:
        min_size = str(info.min_input_size)
        if info.input_multiple > 1:
            min_size += f" (x{info.input_multiple})"
        table.add_row(
            info.name,
            info.paper_row,
            f"{info.params:,}",
            str(info.input_size),
            min_size,
            "yes" if info.pretrained_available else "no",
        )
    Console().print(table)


# --------------------------------------------------------------------------- predict / export / explain / serve

_MODEL_HELP = "Run directory, its model.safetensors, or an exported .onnx (default: the model bundled with bloodcell)."
_DEVICE_HELP = "Where the classifier runs: auto (CUDA when present), cpu, cuda or cuda:N."
EXIT_UNREADABLE = 3  # predict: answered, but some inputs could not be read


@app.command("predict")
@user_errors
def predict_cmd(
    paths: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively for images)."),
    model: Optional[Path] = typer.Option(None, "--model", help=_MODEL_HELP),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    fmt: str = typer.Option("table", "--format", help="table, summary (the table without a row per image), csv (one row per image) or json."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the output to this file (atomically) instead of stdout."),
    threshold: Optional[float] = typer.Option(
        None, "--threshold", help="Review threshold: flag cells whose calibrated confidence is below it (default: the model's)."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    input_kind: str = typer.Option(
        "auto", "--input", help="auto (decide per image), cell (each image is one cell crop) or field (a smear photograph)."
    ),
    detector: Optional[Path] = typer.Option(None, "--detector", help="Detector folder or its .onnx for fields (default: the bundled one)."),
    annotate: Optional[Path] = typer.Option(None, "--annotate", help="Write each field photograph with its cells drawn here (PNG)."),
    allow_unreadable: bool = typer.Option(
        False, "--allow-unreadable", help="Exit 0 although some inputs could not be read (they are still listed on stderr)."
    ),
) -> None:
    """Classify cell images and read smear photographs: per cell its class, probabilities, review and OOD flags;
    per photograph every cell found with its box and the counts; the differential over everything given.

    Every input that could not be read (not an image, truncated, too large, too small to hold a cell) is named on stderr with its reason, one line each; the readable ones are still answered.

    Exit status: 0 all inputs read; 3 some inputs unreadable (0 with --allow-unreadable); 2 an error, or no input readable.
    """
    from bloodcell.infer import Predictor
    from bloodcell.infer.fields import INPUT_KINDS, annotate_fields, predict_paths_mixed
    from bloodcell.infer.report import FORMATS, tables, to_csv, to_json

    if fmt not in FORMATS:
        raise BloodcellError(f"--format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    if input_kind not in INPUT_KINDS:
        raise BloodcellError(f"--input must be one of {', '.join(INPUT_KINDS)}, got '{input_kind}'")
    predictor = Predictor.load(model, review_threshold=threshold, device=device)
    result = predict_paths_mixed(predictor, paths, input_kind, detector, batch_size=batch_size, progress=True)
    if not result["predictions"] and not result["fields"]:
        bad = result["unreadable"]
        raise BloodcellError(f"no readable image among {len(bad)} file(s); first: {bad[0]['path']}: {bad[0]['reason']}")
    if annotate is not None:
        written = annotate_fields(result, {}, annotate)
        typer.echo(f"wrote {len(written)} annotated photograph(s) to {annotate}" if written
                   else f"--annotate: no field photograph among the inputs, nothing written to {annotate}", err=True)
    unreadable = result["unreadable"]
    for u in unreadable:
        typer.echo(f"unreadable: {u['path']}: {u['reason']}", err=True)
    if fmt in ("table", "summary"):
        import io

        from rich.console import Console

        console = Console() if out is None else Console(file=io.StringIO(), record=True, width=120)
        # on the terminal the lines above on stderr name the unreadable inputs; a written report keeps them
        shown = result if out is not None else {**result, "unreadable": []}
        for item in tables(shown, predictor.review_threshold, per_image=fmt == "table"):
            console.print(item)
        text = console.export_text() if out is not None else ""
    else:
        text = to_json(result) if fmt == "json" else to_csv(result)
        if out is None:
            typer.echo(text, nl=False)
    if out is not None:
        from bloodcell.io import write_text

        write_text(out, text)
        typer.echo(f"wrote {out} ({len(result['predictions'])} cells, {len(result['fields'])} fields, "
                   f"{len(unreadable)} unreadable)", err=True)
    if unreadable and not allow_unreadable:
        typer.echo(f"{len(unreadable)} input(s) unreadable: exit status {EXIT_UNREADABLE} (--allow-unreadable: 0)", err=True)
        raise typer.Exit(EXIT_UNREADABLE)


@app.command("adapt")
@user_errors
def adapt_cmd(
    folder: Path = typer.Argument(..., readable=False, help="Folder of the new lab's cell images, searched recursively; no labels needed."),
    out: Path = typer.Option(..., "--out", help="Folder for the adapted model (model.safetensors, model.json, ood.safetensors)."),
    model: Optional[str] = typer.Option(None, "--model", help="The model to adapt: a run directory, its model.safetensors, or 'default' (the bundled model)."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    force: bool = typer.Option(False, "--force", help="Write into --out although it holds files (its model files are replaced)."),
    onnx: bool = typer.Option(False, "--onnx", help="Also write model.onnx (checked against PyTorch) for installs without PyTorch."),
    tent: bool = typer.Option(False, "--tent/--no-tent", help="After AdaBN, minimise the prediction entropy on the folder (Tent): trains the norm layers' scale and shift."),
) -> None:
    """Adapt a model to a new lab without labels: re-estimate its BatchNorm statistics on that lab's cells (AdaBN)."""
    from bloodcell.infer.adapt import adapt_model  # imports torch: the light install gets the one-line "needs PyTorch"

    report = adapt_model(folder, out, model=model, device=device, progress=True, force=force, onnx=onnx, tent=tent)
    for u in report["unreadable"][:20]:
        typer.echo(f"unreadable: {u['path']}: {u['reason']}", err=True)
    if len(report["unreadable"]) > 20:
        typer.echo(f"... and {len(report['unreadable']) - 20} more unreadable", err=True)
    for line in report["warnings"]:
        typer.echo(f"warning: {line}", err=True)
    skipped = f", {len(report['unreadable'])} unreadable skipped" if report["unreadable"] else ""
    sampled = f" (a seeded sample of the {report['images_found']} found)" if report["images"] < report["images_found"] - len(report["unreadable"]) else ""
    typer.echo(f"adapted on {report['images']} images{sampled}{skipped}: {report['norm_layers']} BatchNorm layers re-estimated")
    if report["ood_before"] is not None:
        typer.echo(f"flagged OOD: {100 * report['ood_before']:.1f} % of the images before, {100 * report['ood_after']:.1f} % after "
                   "(before: the source model's OOD check; after: refitted on this folder's cells, flagging what looks unlike them)")
    predicted = sorted(report["predicted_after"].items(), key=lambda kv: -kv[1])
    typer.echo("predicted after: " + ", ".join(f"{c} {k} ({100 * k / report['images']:.0f} %)" for c, k in predicted if k))
    typer.echo(f"wrote {out} (bloodcell predict IMAGES --model {out})")


@app.command("export")
@user_errors
def export_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory (model.safetensors + model.json)."),
    onnx: Path = typer.Option(..., "--onnx", help="Output .onnx file; metadata goes beside it as <file>.onnx.json."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset version (below 18 the deprecated TorchScript exporter writes it)."),
    check: List[Path] = typer.Option([], "--check-image", help="Image(s) for the parity check (default: the embedded sample)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="'int8': write the int8 static quantization (smaller, faster on CPU; docs/inference.md)."),
    calibration_images: Optional[int] = typer.Option(None, "--calibration-images", help="With --quantize: how many images calibrate it (default 256)."),
    calibration_dir: Optional[Path] = typer.Option(None, "--calibration-dir", help="With --quantize: calibrate on images of this folder instead of the model's validation part."),
    data: Optional[Path] = typer.Option(None, "--data", help="With --quantize: the training data folder, when not where model.json says."),
    min_agreement: Optional[float] = typer.Option(None, "--min-agreement", help="With --quantize: refuse unless int8 and fp32 agree on this share of check images (default 0.98)."),
) -> None:
    """Export a trained model to ONNX (dynamic batch) and check it against PyTorch with onnxruntime."""
    from bloodcell.infer.export import PARITY_TOLERANCE, export_onnx

    if onnx.is_dir():
        raise BloodcellError(f"--onnx {onnx}: is a folder; name the .onnx file to write, e.g. {onnx / 'model.onnx'}")
    writable_folder(onnx.parent, "--onnx folder")
    report = export_onnx(run_dir, onnx, opset=opset, check_images=check or None, quantize=quantize,
                         calibration_images=calibration_images, calibration_dir=calibration_dir, data_root=data,
                         min_agreement=min_agreement)
    typer.echo(f"wrote {report.path}, {report.sidecar} and its model card ({report.exporter} exporter, opset {report.opset})")
    typer.echo(
        f"largest difference vs PyTorch (relative to the outputs' size when above 1) on {report.images} {report.image_source}: "
        f"{report.max_abs_diff:.3g} (tolerance {PARITY_TOLERANCE:g})"
    )
    if report.quantization:
        qz, c = report.quantization, report.quantization["check"]
        typer.echo(f"int8: calibrated on {qz['calibration']}; {qz['int8_bytes'] / 1e3:,.0f} kB instead of {qz['fp32_bytes'] / 1e3:,.0f} kB")
        ood = f", OOD flags {100 * c['ood_flag_agreement']:.1f} %" if "ood_flag_agreement" in c else ""
        typer.echo(f"int8 agrees with fp32 on {c['on']}: top-1 {100 * c['top1_agreement']:.1f} %{ood} (minimum {100 * c['min_agreement']:g} %)")


@app.command("card")
@user_errors
def card_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help=_MODEL_HELP),
) -> None:
    """Print a model's card (markdown): intended use, training data, metrics with CIs, calibration, known limits."""
    from bloodcell.errors import ModelError
    from bloodcell.infer.card import card_for
    from bloodcell.models.metadata import bundled_model_dir

    source = Path(model) if model and str(model) != "default" else bundled_model_dir()
    if source.name == "model.safetensors":
        source = source.parent
    try:
        typer.echo(card_for(source))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the metadata of {source}: {getattr(exc, 'strerror', None) or exc}") from None


@app.command("explain")
@user_errors
def explain_cmd(
    images: List[Path] = typer.Argument(..., help="Image files and/or folders."),
    model: Optional[Path] = typer.Option(None, "--model", help="Run directory (a PyTorch model; not .onnx). Default: the bundled model."),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    out: Path = typer.Option(..., "--out", help="Folder for the Grad-CAM PNGs (<image>.gradcam.png)."),
) -> None:
    """Grad-CAM overlays: which part of each image drove the predicted class."""
    from bloodcell.extras import INSTALL_TRAIN, has_torch
    from bloodcell.infer import Predictor
    from bloodcell.infer.explain import explain_paths

    if not has_torch():
        raise BloodcellError(f"Grad-CAM runs on PyTorch, which this install lacks: {INSTALL_TRAIN}")
    predictor = Predictor.load(model, device=device)
    skipped: list = []
    written = explain_paths(predictor, images, out, skipped=skipped)
    for u in skipped:
        typer.echo(f"unreadable: {u['path']}: {u['reason']}", err=True)
    if not written:
        raise BloodcellError("no readable image to explain")
    for path in written:
        typer.echo(str(path))


@app.command("serve")
@user_errors
def serve_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help=_MODEL_HELP),
    device: str = typer.Option("auto", "--device", help=_DEVICE_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind; 0.0.0.0 exposes the server to the network."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="0 lets the system pick a free port (printed on start)."),
    detector: Optional[Path] = typer.Option(None, "--detector", help="Detector folder or its .onnx for smear photographs (default: the bundled one)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Folder of the review workstation's database "
                                            "(default: $BLOODCELL_DATA_DIR, else the user's data folder, e.g. ~/.local/share/bloodcell)."),
    allow_host: List[str] = typer.Option([], "--allow-host", help=SERVE_HELP["allow_host"]),
    max_upload_mb: float = typer.Option(ServerLimits.max_upload_bytes / 2**20, "--max-upload-mb", min=0.001, help=SERVE_HELP["max_upload_mb"]),
    max_files: int = typer.Option(ServerLimits.max_files, "--max-files", min=1, help=SERVE_HELP["max_files"]),
    max_pixels: int = typer.Option(ServerLimits.max_pixels, "--max-pixels", min=1, help=SERVE_HELP["max_pixels"]),
    max_request_pixels: int = typer.Option(ServerLimits.max_request_pixels, "--max-request-pixels", min=1, help=SERVE_HELP["max_request_pixels"]),
    heavy_workers: int = typer.Option(ServerLimits.heavy_workers, "--heavy-workers", min=1, help=SERVE_HELP["heavy_workers"]),
    heavy_queue: int = typer.Option(ServerLimits.heavy_queue, "--heavy-queue", min=0, help=SERVE_HELP["heavy_queue"]),
    header_seconds: float = typer.Option(ServerLimits.header_seconds, "--header-seconds", min=0.1, help=SERVE_HELP["header_seconds"]),
    body_idle_seconds: float = typer.Option(ServerLimits.body_idle_seconds, "--body-idle-seconds", min=0.1, help=SERVE_HELP["body_idle_seconds"]),
    body_seconds: float = typer.Option(ServerLimits.body_seconds, "--body-seconds", min=0.1, help=SERVE_HELP["body_seconds"]),
) -> None:
    """Serve the model: the review workstation at / (samples kept in --data-dir), a one-off page at /classify,
    JSON API at /api, /predict and /explain, docs at /docs. Limits: bloodcell/serve/limits.py, docs/reliability.md."""
    from bloodcell.infer import Predictor
    from bloodcell.review.records import default_data_dir
    from bloodcell.serve.app import create_app
    from bloodcell.serve.server import run

    predictor = Predictor.load(model, max_pixels=max_pixels, device=device)
    _check_detector_seal(detector)  # the detector loads with the first photograph; its seal is checked now
    data_dir = data_dir or default_data_dir()
    limits = ServerLimits(
        max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_files=max_files, max_pixels=max_pixels,
        max_request_pixels=max_request_pixels, heavy_workers=heavy_workers, heavy_queue=heavy_queue,
        header_seconds=header_seconds, body_idle_seconds=body_idle_seconds, body_seconds=body_seconds,
        allowed_hosts=_served_names(host, allow_host))
    app_ = create_app(predictor, detector=detector, data_dir=data_dir, limits=limits)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: binding {host}: anyone who can reach this machine can upload images; no authentication", err=True)
    sock = _bound_socket(host, port)  # bound here, so the line below names the real port even for --port 0
    url_host = f"[{host}]" if ":" in host else host
    typer.echo(f"bloodcell: model {predictor.model_name} ({predictor.backend}) on http://{url_host}:{sock.getsockname()[1]}/ "
               f"(samples kept in {data_dir}; answers to {', '.join(limits.allowed_hosts)})", err=True)
    run(app_, sock, limits)


def _check_detector_seal(detector: Optional[Path]) -> None:
    """A server must not start on a detector folder that was changed since it was sealed (models.seal); a folder or
    file that is not there is left to the first photograph's one-line error, as before."""
    from bloodcell.detect.registry import bundled_detector_dir
    from bloodcell.models.seal import verify

    folder = bundled_detector_dir() if detector is None or str(detector) == "default" else Path(detector)
    folder = folder.parent if folder.is_file() else folder
    if folder.is_dir():
        verify(folder)


def _served_names(host: str, extra: List[str]) -> tuple[str, ...]:
    """The Host names the server answers to: the local ones, the bound address, this machine's names when it binds
    every interface, and --allow-host."""
    import socket

    from bloodcell.serve.limits import LOCAL_HOSTS

    names = [*LOCAL_HOSTS, host]
    if host in ("0.0.0.0", "::", ""):
        names += [socket.gethostname(), socket.getfqdn()]
        try:
            names += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None)]
        except OSError:
            pass
    names += [h.strip() for h in extra if h.strip()]
    return tuple(dict.fromkeys(n for n in names if n not in ("0.0.0.0", "::", "")))


def _bound_socket(host: str, port: int):
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise BloodcellError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


# --------------------------------------------------------------------------- detectors (smear photographs)

detector_app = typer.Typer(no_args_is_help=True, help="Detectors that find cells in smear photographs: train, evaluate, list.")
app.add_typer(detector_app, name="detector")


@detector_app.command("train")
@user_errors
def detector_train_cmd(
    config: Path = typer.Argument(..., help="Detector run config (YAML), e.g. configs/detector-classical.yaml."),
    overrides: List[str] = typer.Option([], "--set", help="Override a key: --set train.epochs=5 (repeatable)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Annotated photographs, a Pascal VOC or YOLO folder (sets data.root)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<config name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
) -> None:
    """Fit a detector on the train split, choose its thresholds on val, measure it on test; all in the run directory."""
    from bloodcell.config import load_config
    from bloodcell.detect.config import DetectorRunConfig
    from bloodcell.detect.runs import run_detector_config

    extra = list(overrides) + ([f"data.root={data}"] if data else [])
    cfg = load_config(config, extra, schema=DetectorRunConfig)
    out = writable_folder(out or Path("runs") / (cfg.name or config.stem))
    metrics = run_detector_config(cfg, out, resume=resume)
    _print_detector_metrics(metrics["test"], metrics["seconds_per_photo"])
    typer.echo(f"run directory: {out} (report.md, metrics.json, detector.json)")


def _print_detector_metrics(test: dict, seconds: float) -> None:
    for cls, m in test["classes"].items():
        typer.echo(f"{cls:9s} AP@{test['match_iou']:.1f} {m['ap']:.3f}  precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
                   f"count error {m['count_mae']:.2f} / photo ({100 * m['count_rel_error']:.1f} %)")
    typer.echo(f"{test['photos']} photographs, {seconds:.3f} s per photograph")


@detector_app.command("evaluate")
@user_errors
def detector_evaluate_cmd(
    detector: str = typer.Argument("default", help="Detector folder (or 'default', the bundled one)."),
    data: Path = typer.Option(..., "--data", help="Annotated photographs: a Pascal VOC folder or a YOLO folder (images/, labels/, data.yaml)."),
    split: str = typer.Option("test", "--split", help="The split to measure on (VOC: ImageSets/Main/<split>.txt; YOLO: images/<split>/)."),
    iou: float = typer.Option(0.5, "--iou", min=0.05, max=0.95, help="IoU at which a found box counts as the cell."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the metrics as JSON here."),
) -> None:
    """Measure a saved detector on annotated photographs at its own thresholds."""
    from bloodcell.detect.runs import evaluate_detector

    metrics = evaluate_detector(detector, data, split, iou)
    _print_detector_metrics(metrics, metrics["seconds_per_photo"])
    if len(metrics["sources"]) > 1:
        from bloodcell.detect.metrics import source_table

        typer.echo(source_table({Path(data).name: metrics["sources"]}))
    if out is not None:
        from bloodcell.io import write_json

        write_json(out, metrics)


@detector_app.command("card")
@user_errors
def detector_card_cmd(
    detector: str = typer.Argument("default", help="Detector folder or its detector.json (or 'default', the bundled one)."),
) -> None:
    """Print a detector's card (markdown): training data, per-source test figures, a lab it never saw, known limits."""
    from bloodcell.errors import ModelError
    from bloodcell.infer.card import detector_card_for
    from bloodcell.detect.registry import bundled_detector_dir

    source = bundled_detector_dir() if detector == "default" else Path(detector)
    try:
        typer.echo(detector_card_for(source))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the detector.json of {source}: {getattr(exc, 'strerror', None) or exc}") from None


@detector_app.command("list")
@user_errors
def detector_list_cmd() -> None:
    """The registered detectors."""
    from bloodcell.detect.registry import list_detectors

    for name in list_detectors():
        typer.echo(name)


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


# --------------------------------------------------------------------------- the review workstation's samples

review_app = typer.Typer(no_args_is_help=True, help="The review workstation's samples (bloodcell serve): list, export "
                         "corrected cells for training, back up.")
app.add_typer(review_app, name="review")
_DATA_DIR_HELP = "The workstation's folder (as given to serve --data-dir; default: $BLOODCELL_DATA_DIR or the user's data folder)."


def _review_store(data_dir: Optional[Path]):
    from bloodcell.review.records import DATABASE_FILE, default_data_dir
    from bloodcell.review.store import ReviewStore

    folder = data_dir or default_data_dir()
    if not (folder / DATABASE_FILE).is_file():
        raise DataError(f"no review database in {folder} ({DATABASE_FILE} is missing): give the folder serve --data-dir used")
    return ReviewStore(folder)


@review_app.command("list")
@user_errors
def review_list_cmd(data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP),
                    as_json: bool = typer.Option(False, "--json", help="One JSON list instead of a table.")) -> None:
    """Every sample, newest first: ID, date, status, version, cells."""
    samples = _review_store(data_dir).samples()
    if as_json:
        typer.echo(json.dumps(samples, indent=2))
        return
    for s in samples:
        typer.echo(f"{s['sample_id']}\t{s['date']}\t{s['status']} v{s['version']}\t{s['cells']} cells\t{s['note']}")


@review_app.command("export")
@user_errors
def review_export_cmd(
    samples: List[str] = typer.Argument(None, help="Sample IDs (default: every signed-off sample)."),
    out: Path = typer.Option(..., "--out", help="New folder: one sub-folder per label, and labels.csv (path,label,group)."),
    labels: str = typer.Option("all", "--labels", help="all: every label; model: only the classes of --model (fine-tune the same classes)."),
    model: Optional[Path] = typer.Option(None, "--model", help="With --labels model: the model whose classes to keep (default: the bundled one)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP),
) -> None:
    """Export the cells a person labelled or confirmed (all counted cells of a signed-off sample) as training data:
    `bloodcell train configs/finetune.yaml --data OUT/labels.csv` fine-tunes on them, each sample one group."""
    from bloodcell.review.export import write_export

    if labels not in ("all", "model"):
        raise DataError(f"--labels must be 'all' or 'model', got '{labels}'")
    store = _review_store(data_dir)
    ids = samples or [s["sample_id"] for s in store.samples() if s["status"] == "signed"]
    keep = None
    if labels == "model":
        from bloodcell.infer import Predictor

        keep = Predictor.load(model).class_names
    result = write_export(store, ids, out, keep)
    typer.echo(f"exported {result['cells']} cells of {len(ids)} samples to {result['folder']} "
               f"({', '.join(f'{k} {v}' for k, v in sorted(result['per_label'].items()))}); CSV: {result['csv']}")


@review_app.command("backup")
@user_errors
def review_backup_cmd(target: Path = typer.Argument(..., help="New file for the copy."),
                      data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP)) -> None:
    """A consistent copy of the review database, safe to take while the server runs."""
    typer.echo(f"backed up to {_review_store(data_dir).backup(target)}")


# ---------------------------------------------------------------------------------------------- model: seal / verify

model_app = typer.Typer(no_args_is_help=True, help="A model folder's seal (SEAL.json: the SHA-256 of every file the "
                        "loader reads, checked at every load): verify it, or re-seal a folder edited on purpose.")
app.add_typer(model_app, name="model")


def _model_folder(folder: str) -> Path:
    if folder == "default":
        from bloodcell.models.metadata import bundled_model_dir

        return bundled_model_dir()
    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"model folder not found: {path}" if not path.exists() else f"{path} is not a folder (pass the model's folder)")
    return path


@model_app.command("verify")
@user_errors
def model_verify_cmd(folder: str = typer.Argument(..., help="A model or detector folder ('default': the bundled model).")) -> None:
    """Check a model folder against its seal: OK, or one line naming the first file that differs (exit 2)."""
    from bloodcell.models.seal import verify

    path = _model_folder(folder)
    manifest = verify(path)
    typer.echo(f"OK {path}: {len(manifest['files'])} files match the seal ({manifest.get('sealed_by', 'unknown version')})")


@model_app.command("seal")
@user_errors
def model_seal_cmd(folder: str = typer.Argument(..., help="The model or detector folder to (re-)seal.")) -> None:
    """Seal a model folder as it is now (after a deliberate edit) and print what changed since the last seal."""
    from bloodcell.models.seal import reseal

    path = _model_folder(folder)
    manifest, found = reseal(path)
    for c in found:
        old = f"{c['old'][:12]}" if c["old"] else "-"
        new = f"{c['new'][:12]}" if c["new"] else "-"
        typer.echo(f"{c['change']:8} {c['file']}  sha256 {old} -> {new}")
    what = f"{len(found)} file{'s' if len(found) != 1 else ''} changed" if found else "nothing changed"
    typer.echo(f"sealed {path}: {len(manifest['files'])} files ({what})")

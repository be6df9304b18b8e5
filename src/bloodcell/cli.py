"""The `bloodcell` command line: a thin layer over functions users can import.

Heavy modules (torch, matplotlib) are imported inside each command so `--help` stays fast.
Errors a user can act on (BloodcellError) print as one line `error: ...` and exit with status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer

from bloodcell.errors import BloodcellError

app = typer.Typer(
    help="Classify images of single peripheral blood cells.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Inspect, validate and plot an image dataset.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def user_errors(fn: Callable) -> Callable:
    """Turn BloodcellError into a one-line message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BloodcellError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
) -> None:
    if version:
        from bloodcell import __version__

        typer.echo(__version__)
        raise typer.Exit()


# --------------------------------------------------------------------------- data


@data_app.command("inspect")
@user_errors
def data_inspect(
    root: Path = typer.Argument(..., help="Dataset folder: one sub-folder per class (ImageFolder layout)."),
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
    root: Path = typer.Argument(..., help="Dataset folder (ImageFolder layout)."),
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


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""`bloodcell data`: inspect an image dataset and plot its figures."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bloodcell.cli.common import user_errors

# Heavy modules (torch, lightning, fastapi, the models, rich) are imported inside the commands: --help stays fast.

data_app = typer.Typer(help="Inspect, validate and plot an image dataset.", no_args_is_help=True)


@data_app.command("inspect")
@user_errors
def data_inspect(
    root: Path = typer.Argument(
        ...,
        readable=False,
        help="Dataset folder (one sub-folder per class, ImageFolder layout) or CSV of path,label[,group].",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    max_pixels: int = typer.Option(
        None,
        help="Images with more pixels than this are skipped as possible decompression bombs.",
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

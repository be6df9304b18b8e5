"""`bloodcell predict` and `bloodcell explain`: a model's answers on images and smear photographs, and why."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from bloodcell.cli.common import DEVICE_HELP, MODEL_HELP, app, user_errors
from bloodcell.errors import BloodcellError

# Heavy modules (torch, lightning, fastapi, the models, rich) are imported inside the commands: --help stays fast.

EXIT_UNREADABLE = 3  # predict: answered, but some inputs could not be read


@app.command("predict")
@user_errors
def predict_cmd(
    paths: List[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively for images)."),
    model: Optional[Path] = typer.Option(None, "--model", help=MODEL_HELP),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    fmt: str = typer.Option(
        "table",
        "--format",
        help="table, summary (the table without a row per image), csv (one row per image) or json.",
    ),
    out: Optional[Path] = typer.Option(
        None,
        "--out",
        help="Write the output to this file (atomically) instead of stdout.",
    ),
    threshold: Optional[float] = typer.Option(
        None,
        "--threshold",
        help="Review threshold: flag cells whose calibrated confidence is below it (default: the model's).",
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    input_kind: str = typer.Option(
        "auto",
        "--input",
        help="auto (decide per image), cell (each image is one cell crop) or field (a smear photograph).",
    ),
    detector: Optional[Path] = typer.Option(
        None,
        "--detector",
        help="Detector folder or its .onnx for fields (default: the bundled one).",
    ),
    annotate: Optional[Path] = typer.Option(
        None,
        "--annotate",
        help="Write each field photograph with its cells drawn here (PNG).",
    ),
    allow_unreadable: bool = typer.Option(
        False,
        "--allow-unreadable",
        help="Exit 0 although some inputs could not be read (they are still listed on stderr).",
    ),
) -> None:
    """Classify cell images and read smear photographs: per cell its class, probabilities, review and OOD flags;
    per photograph every cell found with its box and the counts; the differential over everything given.

    Every input that could not be read (not an image, truncated, too large, too small to hold a cell) is named on stderr with its reason, one line each; the readable ones are still answered.

    Exit status: 0 all inputs read; 3 some inputs unreadable (0 with --allow-unreadable); 2 an error, or no input readable.
    """  # noqa: E501 (typer keeps a help paragraph's line breaks: these lines are printed as they are)
    from bloodcell.infer import Predictor
    from bloodcell.infer.fields import INPUT_KINDS, annotate_fields, predict_paths_mixed
    from bloodcell.infer.report import FORMATS

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
        typer.echo(
            f"wrote {len(written)} annotated photograph(s) to {annotate}"
            if written
            else f"--annotate: no field photograph among the inputs, nothing written to {annotate}",
            err=True,
        )
    unreadable = result["unreadable"]
    for u in unreadable:
        typer.echo(f"unreadable: {u['path']}: {u['reason']}", err=True)
    _show_predictions(result, fmt, out, predictor.review_threshold)
    if unreadable and not allow_unreadable:
        typer.echo(
            f"{len(unreadable)} input(s) unreadable: exit status {EXIT_UNREADABLE} (--allow-unreadable: 0)", err=True
        )
        raise typer.Exit(EXIT_UNREADABLE)


def _show_predictions(result: dict, fmt: str, out: Optional[Path], review_threshold: float) -> None:
    """`predict`'s answer in --format: on stdout, or written to --out (atomically) with one line on stderr."""
    from bloodcell.infer.report import tables, to_csv, to_json

    unreadable = result["unreadable"]
    if fmt in ("table", "summary"):
        import io

        from rich.console import Console

        console = Console() if out is None else Console(file=io.StringIO(), record=True, width=120)
        # on the terminal, predict_cmd's lines on stderr name the unreadable inputs; a written report keeps them
        shown = result if out is not None else {**result, "unreadable": []}
        for item in tables(shown, review_threshold, per_image=fmt == "table"):
            console.print(item)
        text = console.export_text() if out is not None else ""
    else:
        text = to_json(result) if fmt == "json" else to_csv(result)
        if out is None:
            typer.echo(text, nl=False)
    if out is not None:
        from bloodcell.io import write_text

        write_text(out, text)
        typer.echo(
            f"wrote {out} ({len(result['predictions'])} cells, {len(result['fields'])} fields, "
            f"{len(unreadable)} unreadable)",
            err=True,
        )


@app.command("explain")
@user_errors
def explain_cmd(
    images: List[Path] = typer.Argument(..., help="Image files and/or folders."),
    model: Optional[Path] = typer.Option(
        None,
        "--model",
        help="Run directory (a PyTorch model; not .onnx). Default: the bundled model.",
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    out: Path = typer.Option(..., "--out", help="Folder for the Grad-CAM PNGs (<image>.gradcam.png)."),
) -> None:
    """Grad-CAM overlays: which part of each image drove the predicted class."""
    from bloodcell.extras import require
    from bloodcell.infer import Predictor
    from bloodcell.infer.explain import explain_paths

    require("torch", "Grad-CAM")  # before the model loads: the light install would load its ONNX model for nothing
    predictor = Predictor.load(model, device=device)
    skipped: list = []
    written = explain_paths(predictor, images, out, skipped=skipped)
    for u in skipped:
        typer.echo(f"unreadable: {u['path']}: {u['reason']}", err=True)
    if not written:
        raise BloodcellError("no readable image to explain")
    for path in written:
        typer.echo(str(path))

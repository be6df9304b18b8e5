"""The commands about a model rather than its answers: the zoo (`models`), `adapt` to a new lab, `export` to ONNX,
its `card`, and its seal (`model verify`, `model seal`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from bloodcell.cli.common import DEVICE_HELP, MODEL_HELP, app, user_errors, writable_folder
from bloodcell.errors import BloodcellError, DataError

# Heavy modules (torch, lightning, fastapi, the models, rich) are imported inside the commands: --help stays fast.


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


@app.command("adapt")
@user_errors
def adapt_cmd(
    folder: Path = typer.Argument(
        ...,
        readable=False,
        help="Folder of the new lab's cell images, searched recursively; no labels needed.",
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        help="Folder for the adapted model (model.safetensors, model.json, ood.safetensors).",
    ),
    model: Optional[str] = typer.Option(
        None,
        "--model",
        help="The model to adapt: a run directory, its model.safetensors, or 'default' (the bundled model).",
    ),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    force: bool = typer.Option(
        False,
        "--force",
        help="Write into --out although it holds files (its model files are replaced).",
    ),
    onnx: bool = typer.Option(
        False,
        "--onnx",
        help="Also write model.onnx (checked against PyTorch) for installs without PyTorch.",
    ),
    tent: bool = typer.Option(
        False,
        "--tent/--no-tent",
        help="After AdaBN, minimise the prediction entropy on the folder (Tent): trains the norm layers' scale and "
        "shift.",
    ),
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
    readable = report["images_found"] - len(report["unreadable"])
    sampled = f" (a seeded sample of the {report['images_found']} found)" if report["images"] < readable else ""
    typer.echo(
        f"adapted on {report['images']} images{sampled}{skipped}: {report['norm_layers']} BatchNorm layers re-estimated"
    )
    if report["ood_before"] is not None:
        typer.echo(
            f"flagged OOD: {100 * report['ood_before']:.1f} % of the images before, "
            f"{100 * report['ood_after']:.1f} % after "
            "(before: the source model's OOD check; "
            "after: refitted on this folder's cells, flagging what looks unlike them)"
        )
    predicted = sorted(report["predicted_after"].items(), key=lambda kv: -kv[1])
    shares = (f"{c} {k} ({100 * k / report['images']:.0f} %)" for c, k in predicted if k)
    typer.echo("predicted after: " + ", ".join(shares))
    typer.echo(f"wrote {out} (bloodcell predict IMAGES --model {out})")


@app.command("export")
@user_errors
def export_cmd(
    run_dir: Path = typer.Argument(..., help="Run directory (model.safetensors + model.json)."),
    onnx: Path = typer.Option(..., "--onnx", help="Output .onnx file; metadata goes beside it as <file>.onnx.json."),
    opset: int = typer.Option(
        18,
        "--opset",
        help="ONNX opset version (below 18 the deprecated TorchScript exporter writes it).",
    ),
    check: List[Path] = typer.Option(
        [],
        "--check-image",
        help="Image(s) for the parity check (default: the embedded sample).",
    ),
    quantize: Optional[str] = typer.Option(
        None,
        "--quantize",
        help="'int8': write the int8 static quantization (smaller, faster on CPU; docs/inference.md).",
    ),
    calibration_images: Optional[int] = typer.Option(
        None,
        "--calibration-images",
        help="With --quantize: how many images calibrate it (default 256).",
    ),
    calibration_dir: Optional[Path] = typer.Option(
        None,
        "--calibration-dir",
        help="With --quantize: calibrate on images of this folder instead of the model's validation part.",
    ),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        help="With --quantize: the training data folder, when not where model.json says.",
    ),
    min_agreement: Optional[float] = typer.Option(
        None,
        "--min-agreement",
        help="With --quantize: refuse unless int8 and fp32 agree on this share of check images (default 0.98).",
    ),
) -> None:
    """Export a trained model to ONNX (dynamic batch) and check it against PyTorch with onnxruntime."""
    from bloodcell.infer.export import PARITY_TOLERANCE, export_onnx

    if onnx.is_dir():
        raise BloodcellError(f"--onnx {onnx}: is a folder; name the .onnx file to write, e.g. {onnx / 'model.onnx'}")
    writable_folder(onnx.parent, "--onnx folder")
    report = export_onnx(
        run_dir,
        onnx,
        opset=opset,
        check_images=check or None,
        quantize=quantize,
        calibration_images=calibration_images,
        calibration_dir=calibration_dir,
        data_root=data,
        min_agreement=min_agreement,
    )
    typer.echo(
        f"wrote {report.path}, {report.sidecar} and its model card ({report.exporter} exporter, opset {report.opset})"
    )
    typer.echo(
        f"largest difference vs PyTorch (relative to the outputs' size when above 1) "
        f"on {report.images} {report.image_source}: "
        f"{report.max_abs_diff:.3g} (tolerance {PARITY_TOLERANCE:g})",
    )
    if report.quantization:
        qz, c = report.quantization, report.quantization["check"]
        typer.echo(
            f"int8: calibrated on {qz['calibration']}; "
            f"{qz['int8_bytes'] / 1e3:,.0f} kB instead of {qz['fp32_bytes'] / 1e3:,.0f} kB"
        )
        ood = f", OOD flags {100 * c['ood_flag_agreement']:.1f} %" if "ood_flag_agreement" in c else ""
        typer.echo(
            f"int8 agrees with fp32 on {c['on']}: top-1 {100 * c['top1_agreement']:.1f} %{ood} "
            f"(minimum {100 * c['min_agreement']:g} %)"
        )


@app.command("card")
@user_errors
def card_cmd(
    model: Optional[Path] = typer.Option(None, "--model", help=MODEL_HELP),
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


# --------------------------------------------------------------------------- model: seal / verify

model_app = typer.Typer(
    no_args_is_help=True,
    help="A model folder's seal (SEAL.json: the SHA-256 of every file the "
    "loader reads, checked at every load): verify it, or re-seal a folder edited on purpose.",
)


def _model_folder(folder: str) -> Path:
    """The folder a `model` command works on ('default': the bundled model's); a missing one is a one-line error."""
    if folder == "default":
        from bloodcell.models.metadata import bundled_model_dir

        return bundled_model_dir()
    path = Path(folder)
    if not path.is_dir():
        raise DataError(
            f"model folder not found: {path}"
            if not path.exists()
            else f"{path} is not a folder (pass the model's folder)"
        )
    return path


@model_app.command("verify")
@user_errors
def model_verify_cmd(
    folder: str = typer.Argument(..., help="A model or detector folder ('default': the bundled model)."),
) -> None:
    """Check a model folder against its seal: OK, or one line naming the first file that differs (exit 2)."""
    from bloodcell.models.seal import verify

    path = _model_folder(folder)
    manifest = verify(path)
    sealed_by = manifest.get("sealed_by", "unknown version")
    typer.echo(f"OK {path}: {len(manifest['files'])} files match the seal ({sealed_by})")


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

"""`bloodcell detector`: the detectors that find cells in smear photographs."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from bloodcell.cli.common import user_errors, writable_folder

# Heavy modules (torch, lightning, fastapi, the models, rich) are imported inside the commands: --help stays fast.

detector_app = typer.Typer(
    no_args_is_help=True, help="Detectors that find cells in smear photographs: train, evaluate, list."
)


@detector_app.command("train")
@user_errors
def detector_train_cmd(
    config: Path = typer.Argument(..., help="Detector run config (YAML), e.g. configs/detector-classical.yaml."),
    overrides: List[str] = typer.Option([], "--set", help="Override a key: --set train.epochs=5 (repeatable)."),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        help="Annotated photographs, a Pascal VOC or YOLO folder (sets data.root).",
    ),
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
    """One line per cell class (AP, precision, recall, count error), then the photographs and the time per one."""
    for cls, m in test["classes"].items():
        typer.echo(
            f"{cls:9s} AP@{test['match_iou']:.1f} {m['ap']:.3f}  "
            f"precision {m['precision']:.3f}  recall {m['recall']:.3f}  "
            f"count error {m['count_mae']:.2f} / photo ({100 * m['count_rel_error']:.1f} %)"
        )
    typer.echo(f"{test['photos']} photographs, {seconds:.3f} s per photograph")


@detector_app.command("evaluate")
@user_errors
def detector_evaluate_cmd(
    detector: str = typer.Argument("default", help="Detector folder (or 'default', the bundled one)."),
    data: Path = typer.Option(
        ...,
        "--data",
        help="Annotated photographs: a Pascal VOC folder or a YOLO folder (images/, labels/, data.yaml).",
    ),
    split: str = typer.Option(
        "test",
        "--split",
        help="The split to measure on (VOC: ImageSets/Main/<split>.txt; YOLO: images/<split>/).",
    ),
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
    detector: str = typer.Argument(
        "default",
        help="Detector folder or its detector.json (or 'default', the bundled one).",
    ),
) -> None:
    """Print a detector's card (markdown): training data, per-source test figures, a lab it never saw, known limits."""
    from bloodcell.errors import ModelError
    from bloodcell.infer.card import detector_card_for
    from bloodcell.detect.registry import bundled_detector_dir

    source = bundled_detector_dir() if detector == "default" else Path(detector)
    try:
        typer.echo(detector_card_for(source))
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise ModelError(f"cannot read the detector.json of {source}: {why}") from None


@detector_app.command("list")
@user_errors
def detector_list_cmd() -> None:
    """The registered detectors."""
    from bloodcell.detect.registry import list_detectors

    for name in list_detectors():
        typer.echo(name)

"""`bloodcell review`: the review workstation's samples, outside the server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from bloodcell.cli.common import user_errors
from bloodcell.errors import DataError

# Heavy modules (torch, lightning, fastapi, the models, rich) are imported inside the commands: --help stays fast.

review_app = typer.Typer(
    no_args_is_help=True,
    help="The review workstation's samples (bloodcell serve): list, export corrected cells for training, back up.",
)
_DATA_DIR_HELP = (
    "The workstation's folder (as given to serve --data-dir; default: $BLOODCELL_DATA_DIR or the user's data folder)."
)


def _review_store(data_dir: Optional[Path]):
    """The workstation's store in `data_dir` (default: where serve keeps it); one line if it has no database."""
    from bloodcell.review.records import DATABASE_FILE, default_data_dir
    from bloodcell.review.store import ReviewStore

    folder = data_dir or default_data_dir()
    if not (folder / DATABASE_FILE).is_file():
        raise DataError(
            f"no review database in {folder} ({DATABASE_FILE} is missing): give the folder serve --data-dir used"
        )
    return ReviewStore(folder)


@review_app.command("list")
@user_errors
def review_list_cmd(
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON list instead of a table."),
) -> None:
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
    out: Path = typer.Option(
        ...,
        "--out",
        help="New folder: one sub-folder per label, and labels.csv (path,label,group).",
    ),
    labels: str = typer.Option(
        "all",
        "--labels",
        help="all: every label; model: only the classes of --model (fine-tune the same classes).",
    ),
    model: Optional[Path] = typer.Option(
        None,
        "--model",
        help="With --labels model: the model whose classes to keep (default: the bundled one).",
    ),
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
    typer.echo(
        f"exported {result['cells']} cells of {len(ids)} samples to {result['folder']} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(result['per_label'].items()))}); CSV: {result['csv']}"
    )


@review_app.command("backup")
@user_errors
def review_backup_cmd(
    target: Path = typer.Argument(..., help="New file for the copy."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help=_DATA_DIR_HELP),
) -> None:
    """A consistent copy of the review database, safe to take while the server runs."""
    typer.echo(f"backed up to {_review_store(data_dir).backup(target)}")

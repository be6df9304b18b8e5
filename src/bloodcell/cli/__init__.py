"""The `bloodcell` command line: a thin layer over functions users can import.

One module per command group; `common` holds the root app and what the groups share. Importing a group's module
registers its commands on `app`.
"""

from bloodcell.cli import data, detector, evaluate, model, predict, review, serve, train  # noqa: F401 (registers)
from bloodcell.cli.common import app

# `bloodcell --help` lists commands in the order they were registered: keep the order users know, whichever module
# defines a command (a new command must be placed here).
COMMAND_ORDER = (
    "train",
    "evaluate",
    "ensemble",
    "study",
    "models",
    "predict",
    "adapt",
    "export",
    "card",
    "explain",
    "serve",
)
app.registered_commands.sort(key=lambda command: COMMAND_ORDER.index(command.name))
app.add_typer(data.data_app, name="data")
app.add_typer(detector.detector_app, name="detector")
app.add_typer(review.review_app, name="review")
app.add_typer(model.model_app, name="model")


def main() -> None:  # pragma: no cover - entry point
    app()


__all__ = ["app", "main"]

"""The root `bloodcell` app and what its command groups share: one-line errors, the early check of an output folder,
the help of options several commands take, and a run's result as printed after training or evaluating it.

Every command module imports its heavy modules (torch, lightning, fastapi, the models, even rich) inside the command,
so that `bloodcell --help` and the light install's commands do not pay for them.
Errors a user can act on (BloodcellError) print as one line `error: ...` and exit with status 2.
Dataset folders are declared `readable=False` so that click does not pre-check them with a multi-line usage error:
the scan itself reports an unreadable folder in one line, naming it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import typer

from bloodcell.errors import BloodcellError
from bloodcell.extras import needs_train_extra

app = typer.Typer(
    help="Classify images of single peripheral blood cells.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
)

MODEL_HELP = "Run directory, its model.safetensors, or an exported .onnx (default: the model bundled with bloodcell)."
DEVICE_HELP = "Where the classifier runs: auto (CUDA when present), cpu, cuda or cuda:N."


def user_errors(fn: Callable) -> Callable:
    """Turn BloodcellError into a one-line message and exit status 2; so is a command that needs the [train] extra
    in the light inference install: `error: 'bloodcell CMD' needs PyTorch and the training install (...)`, the
    command named from the function's name (`detector_train_cmd` is `bloodcell detector train`)."""
    command = "bloodcell " + fn.__name__.removesuffix("_cmd").replace("_", " ")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with needs_train_extra(f"'{command}'"):
                return fn(*args, **kwargs)
        except BloodcellError as exc:  # MissingExtra included
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def writable_folder(folder: Path, option: str = "--out") -> Path:
    """Check, before any work, that `folder` can be made and written in: a read-only folder, a file in the way or a
    permission denied is a one-line error naming the folder, not a traceback at the end. Folders the check had to
    make are removed again: a run that then fails on its data leaves nothing behind.

    Args:
        folder: the folder a command will write to; made if missing (and removed again after the check).
        option: how the error names it, e.g. "--out" or "--onnx folder".
    """
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
        probe_prefix = str(folder / ".bloodcell-write-check")
        if exc.filename and Path(exc.filename) != folder and not str(exc.filename).startswith(probe_prefix):
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
    version: bool = typer.Option(
        False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
    ),
) -> None:
    pass


def print_result(out: Path, result: dict) -> None:
    """A run's test figures (or mean +- SD per metric over seeds / folds) and its folder, after `train` or `evaluate`.

    Args:
        out: the run directory, printed last.
        result: the metrics `run_config` or `evaluate_run` returned: `test` and `train` of one run, or `summary`
            (mean, sd, n, ci95 per metric) of several.
    """
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
            c.print(
                f"test accuracy {t['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}), macro F1 {t['f1_macro']:.4f}, "
                f"ECE {t['ece']:.4f} -> {t['ece_calibrated']:.4f} calibrated; "
                f"train accuracy {result['train']['accuracy']:.4f}"
            )
    c.print(f"run directory: {out}")

"""The root of the `bloodcell` command line: --version, and help when no command is given."""

from __future__ import annotations

from typer.testing import CliRunner

from bloodcell import __version__
from bloodcell.cli import app

runner = CliRunner()


def test_version_prints_the_version_and_exits_0():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0, res.output
    assert res.stdout == f"bloodcell {__version__}\n"


def test_no_arguments_still_print_help():
    res = runner.invoke(app, [])
    assert "Usage:" in res.output and "predict" in res.output and "Missing command" not in res.output

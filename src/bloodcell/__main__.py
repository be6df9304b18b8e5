"""`python -m bloodcell`: the same command line as `bloodcell`, for environments without the script on PATH."""

from bloodcell.cli import app

app(prog_name="bloodcell")

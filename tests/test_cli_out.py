"""An --out that cannot be written (a file in the way, a folder that cannot hold one, permission denied) is one line
`error: ...` naming the folder and exit 2, before any work, for every command that writes one (issue 27, item 6)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bloodcell.cli import app

from conftest import REPO, SAMPLE

runner = CliRunner()

COMMANDS = {
    "train": lambda out: ["train", str(REPO / "configs/train/cnn.yaml"), "--data", str(SAMPLE), "--out", str(out)],
    "study": lambda out: ["study", str(REPO / "configs/demo.yaml"), "--out", str(out)],
    "detector train": lambda out: [
        "detector",
        "train",
        str(REPO / "configs/detector-classical.yaml"),
        "--out",
        str(out),
    ],
    "evaluate --out": lambda out: ["evaluate", str(SAMPLE), "--model", "default", "--out", str(out)],
    "export --onnx": lambda out: ["export", str(REPO / "no-such-run"), "--onnx", str(out / "model.onnx")],
}


def one_line_error(result, folder: Path) -> str:
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "\n" not in text and text.startswith("error: ") and "Traceback" not in text, text
    assert str(folder) in text, text
    return text


@pytest.mark.parametrize("command", COMMANDS)
def test_an_out_under_a_file_is_one_line(tmp_path, command):
    (tmp_path / "file.txt").write_text("in the way")
    out = tmp_path / "file.txt" / "out"
    text = one_line_error(runner.invoke(app, COMMANDS[command](out)), out)
    assert "cannot write there" in text


@pytest.mark.parametrize("command", COMMANDS)
def test_an_out_that_is_a_file_is_one_line(tmp_path, command):
    out = tmp_path / "out"
    out.write_text("a file")
    if command == "export --onnx":
        out = tmp_path / "dir"
        (out / "model.onnx").mkdir(parents=True)  # the file to write is a folder
        one_line_error(runner.invoke(app, COMMANDS[command](out)), out / "model.onnx")
        return
    assert "it is a file" in one_line_error(runner.invoke(app, COMMANDS[command](out)), out)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
@pytest.mark.parametrize("command", COMMANDS)
def test_an_out_where_no_folder_can_be_made_is_one_line(command):
    out = Path("/proc/bloodcell-out")
    one_line_error(runner.invoke(app, COMMANDS[command](out)), out)


@pytest.mark.parametrize("command", COMMANDS)
def test_permission_denied_is_one_line(tmp_path, monkeypatch, command):
    """As root, chmod does not stop writes: the refusal is simulated where every folder is made."""
    real_mkdir = os.mkdir

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    out = tmp_path / "ro" / "out"
    assert "Permission denied" in one_line_error(runner.invoke(app, COMMANDS[command](out)), out)

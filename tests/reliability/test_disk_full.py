"""Disk full while a checkpoint is written: the run stops with one line naming the file, nothing half-written is left
under a final name, the previous checkpoint still loads, and --resume once there is room ends exactly like an
uninterrupted run. A torn or truncated checkpoint is refused by the loader, never loaded."""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from bloodcell import io
from bloodcell.cli import app
from bloodcell.errors import ModelError
from bloodcell.train.checkpoint_io import SafetensorsCheckpointIO, read_checkpoint

from conftest import SAMPLE
from run_checks import checkpoint_epoch, outcome
from test_train import BLOODCELL, cli_env, write_cfg

runner = CliRunner()

RUN = {
    "model": {"name": "cnn"},
    "data": {"input_size": 32},
    "train": {"epochs": 3, "batch_size": 16, "lr": 0.002},
    "eval": {"bootstrap": 20, "grid_images": 0},
}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("disk-ref")
    cfg = write_cfg(base / "run.yaml", RUN)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLOODCELL_CACHE", str(base / "cache"))
        result = runner.invoke(app, ["train", str(cfg), "--data", str(SAMPLE), "--out", str(base / "run")])
    assert result.exit_code == 0, result.output
    return {"config": cfg, "outcome": outcome(base / "run")}


def checkpoint_files(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def assert_previous_checkpoint_intact(run: Path, epochs: int) -> None:
    """Only the committed pair of epoch `epochs` is left, whole, and it loads."""
    assert not list(run.rglob("*.tmp")), "temporary files left behind"
    names = checkpoint_files(run)
    assert len(names) == 2 and names[0] == "last.ckpt" and fnmatch.fnmatch(names[1], "last.ckpt.*.safetensors"), names
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] + 1 == epochs


def fill_up_on(pattern: str, nth: int):
    """A bloodcell.io.write_bytes whose `nth` write to a file named like `pattern` runs out of space halfway."""
    real = io.write_bytes
    calls = []

    def write_bytes(path, data):
        if fnmatch.fnmatch(Path(path).name, pattern):
            calls.append(path)
            if len(calls) == nth:
                with io.atomic_path(path) as tmp:
                    with open(tmp, "wb") as fh:
                        fh.write(data[: len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)

    return write_bytes


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["last.ckpt.*.safetensors", "last.ckpt"], ids=["tensor-file", "json-file"])
def test_disk_full_while_writing_a_checkpoint_keeps_the_previous_one_and_resume_works(
    tmp_path, monkeypatch, reference_run, pattern
):
    run = tmp_path / "run"
    args = ["train", str(reference_run["config"]), "--data", str(SAMPLE), "--out", str(run)]
    with monkeypatch.context() as mp:
        mp.setattr(io, "write_bytes", fill_up_on(pattern, nth=2))  # epoch 2's checkpoint
        failed = runner.invoke(app, args)
    assert failed.exit_code == 2, failed.output
    lines = failed.output.strip().splitlines()
    assert len(lines) == 1, failed.output
    ckpt = run / "checkpoints" / "last.ckpt"
    named = f"{ckpt}:" if pattern == "last.ckpt" else f"{ckpt}."
    assert lines[0].startswith(f"error: cannot write {named}") and ": No space left on device; " in lines[0], lines[0]
    assert lines[0].endswith(
        f"the checkpoint of epoch 1, the last good one, is kept: {ckpt}; a resumed run continues from it"
    )
    assert_previous_checkpoint_intact(run, epochs=1)

    resumed = runner.invoke(app, args + ["--resume"])  # room again
    assert resumed.exit_code == 0, resumed.output
    assert outcome(run) == reference_run["outcome"]


def _mount_tmpfs(where: Path, size_mb: int) -> None:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root on Linux (mount -t tmpfs)")
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(where)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {proc.stderr.strip()}")


@pytest.mark.slow
def test_real_full_tmpfs_while_writing_a_checkpoint(tmp_path, reference_run):
    """The run directory lives on a small tmpfs. Once epoch 1's checkpoint is on it, the process is stopped and the
    disk filled to leave half a checkpoint of room, so epoch 2's checkpoint hits ENOSPC for real."""
    disk = tmp_path / "disk"
    _mount_tmpfs(disk, size_mb=32)
    try:
        run = disk / "run"
        args = ["train", str(reference_run["config"]), "--data", str(SAMPLE), "--out", str(run)]
        proc = subprocess.Popen(
            BLOODCELL + args,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            t0 = time.time()
            while checkpoint_epoch(run) < 1:
                assert proc.poll() is None, f"training ended before its first checkpoint: {proc.stderr.read()}"
                assert time.time() - t0 < 120
                time.sleep(0.002)
            proc.send_signal(signal.SIGSTOP)
            tensor_file = next((run / "checkpoints").glob("last.ckpt.*.safetensors"))
            stat = os.statvfs(disk)
            room = stat.f_bavail * stat.f_frsize - tensor_file.stat().st_size // 2
            with open(disk / "filler", "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, room)
            proc.send_signal(signal.SIGCONT)
            stdout, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 2, stdout + stderr
        assert "Traceback" not in stdout + stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {run / 'checkpoints' / 'last.ckpt'}."), (
            stderr
        )
        assert (
            "No space left on device" in errors[0]
            and "the checkpoint of epoch 1, the last good one, is kept" in errors[0]
        )
        assert_previous_checkpoint_intact(run, epochs=1)

        (disk / "filler").unlink()  # free the space, then continue
        resumed = runner.invoke(app, args + ["--resume"])
        assert resumed.exit_code == 0, resumed.output
        assert outcome(run) == reference_run["outcome"]
    finally:  # lazily: an in-process run may still hold a file there; never leave the mount behind
        subprocess.run(["umount", "-l", str(disk)], check=False)


# ----------------------------------------------------------------------------- torn pairs never load


def _saved(tmp_path: Path, name: str = "last.ckpt", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    path = tmp_path / name
    SafetensorsCheckpointIO().save_checkpoint({"epoch": 1, "state_dict": {"w": torch.randn(64, 64)}}, path)
    return path


def _tensor_file(path: Path) -> Path:
    return path.with_name(json.loads(path.read_text())["tensors_file"])


def _json_missing(path: Path) -> None:
    path.unlink()


def _tensors_missing(path: Path) -> None:
    _tensor_file(path).unlink()


def _tensors_truncated(path: Path) -> None:
    tensors = _tensor_file(path)
    tensors.write_bytes(tensors.read_bytes()[:1000])


def _tensors_from_another_save(path: Path) -> None:
    other = _saved(path.parent, "other.ckpt", seed=1)
    os.replace(_tensor_file(other), _tensor_file(path))


def _json_truncated(path: Path) -> None:
    path.write_text(path.read_text()[:50])


def _json_points_outside(path: Path) -> None:
    meta = json.loads(path.read_text())
    (path.parent.parent / "x.safetensors").write_bytes(_tensor_file(path).read_bytes())
    meta["tensors_file"] = "../x.safetensors"
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "tear, message",
    [
        (_json_missing, "cannot read checkpoint"),
        (_tensors_missing, "is incomplete"),
        (_tensors_truncated, "is incomplete"),
        (_tensors_from_another_save, "is incomplete"),
        (_json_truncated, "cannot read checkpoint"),
        (_json_points_outside, "names an invalid tensor file"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_torn_or_truncated_checkpoint_is_refused_by_the_loader(tmp_path, tear, message):
    (tmp_path / "checkpoints").mkdir()
    path = _saved(tmp_path / "checkpoints")
    assert read_checkpoint(path)["epoch"] == 1
    tear(path)
    with pytest.raises(ModelError, match=message) as refused:
        read_checkpoint(path)
    assert str(path) in str(refused.value)


@pytest.mark.slow
def test_resume_from_a_truncated_checkpoint_warns_and_starts_over_exactly(tmp_path, monkeypatch, reference_run):
    """A truncated tensor file (e.g. a disk that lied about a write) is never loaded: --resume says so in one line and
    trains from epoch 1, which still ends exactly like the uninterrupted run."""
    run = tmp_path / "run"
    args = ["train", str(reference_run["config"]), "--data", str(SAMPLE), "--out", str(run)]
    with monkeypatch.context() as mp:
        mp.setattr(io, "write_bytes", fill_up_on("last.ckpt.*.safetensors", nth=3))  # stop after epoch 2
        assert runner.invoke(app, args).exit_code == 2
    _tensors_truncated(run / "checkpoints" / "last.ckpt")
    resumed = runner.invoke(app, args + ["--resume"])
    assert resumed.exit_code == 0, resumed.output
    warning = f"warning: checkpoint {run / 'checkpoints' / 'last.ckpt'} is incomplete"
    assert [line for line in resumed.output.splitlines() if line.startswith("warning:")][0].startswith(warning), (
        resumed.output
    )
    assert outcome(run) == reference_run["outcome"]

"""What the training fault tests compare: a finished run's outcome, and how far a run in progress has got."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file

from test_train import read_history


def outcome(run: Path) -> dict:
    """Everything a run produces that must not depend on being interrupted (wall times left out)."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["provenance"].pop("train_seconds")
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in read_history(run)]
    # tensor by tensor: the file's bytes are not reproducible (safetensors writes its metadata in hash-map order)
    weights = {name: hashlib.sha256(t.numpy().tobytes()).hexdigest() for name, t in load_file(run / "model.safetensors").items()}
    return {"metrics": metrics, "history": history, "weights": weights}


def assert_finished_cleanly(run: Path) -> None:
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert not (run / "checkpoints").exists()
    assert not list(run.rglob("*.tmp")), "temporary files left behind"


def checkpoint_epoch(run: Path) -> int:
    """Epochs saved in checkpoints/last.ckpt (0 if none); the JSON is replaced atomically, so a read sees a whole one."""
    try:
        return json.loads((run / "checkpoints" / "last.ckpt").read_text())["tree"]["__dict__"]["epoch"] + 1
    except (OSError, ValueError, KeyError):
        return 0

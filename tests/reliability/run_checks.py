"""What the training fault tests compare: a finished run's outcome, and how far a run in progress has got."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file

from test_train import checkpoint_epoch, read_history  # noqa: F401 - checkpoint_epoch re-exported for the fault tests


def outcome(run: Path) -> dict:
    """Everything a run produces that must not depend on being interrupted (wall times left out)."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["provenance"].pop("train_seconds")
    history = [{k: v for k, v in row.items() if k != "seconds"} for row in read_history(run)]
    # tensor by tensor: the file's bytes are not reproducible (safetensors writes its metadata in hash-map order)
    weights = {
        name: hashlib.sha256(t.numpy().tobytes()).hexdigest()
        for name, t in load_file(run / "model.safetensors").items()
    }
    return {"metrics": metrics, "history": history, "weights": weights}


def assert_finished_cleanly(run: Path) -> None:
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert not (run / "checkpoints").exists()
    assert not list(run.rglob("*.tmp")), "temporary files left behind"

"""What a run is doing, as JSON lines, for whoever watches it from outside (a scheduler, a dashboard, a test).

Off unless BLOODCELL_EVENTS names a file. Each event is one line appended with a single write, so lines from
several processes (DDP ranks, study workers) do not interleave:
    {"event": "batch", "pid": 4242, "time": 1764412345.1, "epoch": 1, "batch": 3, "rank": 0}
    {"event": "wrote", "pid": 4242, "time": 1764412346.9, "path": "/runs/cnn/history.csv"}
Events: `batch` (a training batch starts; epochs count from 1, batches from 0) and `wrote` (a file became
visible under its name: every artefact bloodcell writes goes through io.atomic_path).
"""

from __future__ import annotations

import json
import os
import time

ENV = "BLOODCELL_EVENTS"


def emit(event: str, **fields) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "time": round(time.time(), 3), **fields}, default=str) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
    finally:
        os.close(fd)


def read(path: str | os.PathLike) -> list[dict]:
    """The events written so far; a last line still being written is left out."""
    try:
        text = open(path, encoding="utf-8").read()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line]

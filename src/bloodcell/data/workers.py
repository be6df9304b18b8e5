"""Worker processes that end with their parent.

A process-pool worker blocked on its task queue never sees EOF when the parent is killed with SIGKILL (its
siblings hold the queue's other end), so it would sleep forever. Each worker watches its parent instead.
"""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(poll_seconds: float = 1.0) -> None:
    """Call in a worker's initializer: the worker exits as soon as its parent process is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:  # re-parented: the parent died
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()

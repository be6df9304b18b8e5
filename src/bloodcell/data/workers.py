"""Worker processes that are fork-safe and end with their parent.

Fork-safe: every pool and data loader worker of bloodcell is started with the "spawn" method (`pool_context`), a
fresh interpreter, never fork(). A forked child copies only the thread that forked, with every lock as it was at
that moment; a process with threads (numpy's OpenBLAS pool from its import on, torch's OpenMP threads after a run,
a study worker's pipe watcher) can hand the child a lock that no thread will ever release, and the child then
sleeps on it forever: a kill -9'd study once left such a copy of itself (parent 1, 620 MB, both threads on a
futex) for minutes. Spawn costs a worker about 0.2-0.3 s to start (it imports numpy, PIL and the module of its
task); measured in docs/reliability.md.

End with the parent: a pool worker blocked on its task queue never sees EOF when the parent is killed with
SIGKILL (its siblings hold the queue's other end), so it would sleep forever. Each worker asks the kernel for
SIGKILL when its parent dies (PR_SET_PDEATHSIG, Linux), which works even in a worker that is stuck, and also
watches its parent's pid from a thread (elsewhere, and as a fallback).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time

START_METHOD = "spawn"
_PR_SET_PDEATHSIG = 1


def pool_context():
    """The multiprocessing context of every pool and data loader worker: spawn (see the module's docstring)."""
    return multiprocessing.get_context(START_METHOD)


def _parent_pid() -> int:
    """The process that started this worker: multiprocessing's record of it (right even if it already died), else
    the OS parent."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid else os.getppid()


def _die_with_parent_signal() -> bool:
    """PR_SET_PDEATHSIG(SIGKILL): the kernel kills this process when the thread that created it ends. Linux only."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_with_parent(poll_seconds: float = 1.0) -> None:
    """Call first in a worker's initializer: the worker is killed with its parent (PR_SET_PDEATHSIG on Linux) and,
    as a fallback, exits within `poll_seconds` of seeing itself re-parented."""
    parent = _parent_pid()
    _die_with_parent_signal()
    if os.getppid() != parent:  # the parent died before the request above: nothing will signal us
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent:  # re-parented: the parent died
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def loader_worker_init(worker_id: int, rank: int = 0) -> None:
    """worker_init_fn of the training data loaders: die with the trainer, then seed as Lightning would have
    (seed_everything(workers=True) adds its own worker_init_fn only where a loader has none)."""
    exit_with_parent()
    if int(os.environ.get("PL_SEED_WORKERS", "0")):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id, rank=rank)

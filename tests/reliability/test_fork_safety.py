"""kill -9 of a process whose scan or cache-build pool is at work leaves nothing behind, even when the process has a
thread holding a lock at that moment (issue 27, item 5).

A forked pool worker inherits every lock in the state it was in, held by threads it does not have: a kill -9'd study
once left a forked copy of itself asleep on a futex for minutes. Here a thread of the process is blocked reading
stdin (it holds the stdin buffer's lock, as a study worker's pipe watcher once did): a forked worker then hangs for
good as it starts (multiprocessing closes stdin in a new child), before anything could make it watch its parent.
Spawned workers do not inherit the lock, and die with their parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import SAMPLE, processes_running

pytestmark = pytest.mark.slow

DRIVER = """
import sys, threading, time
threading.Thread(target=sys.stdin.read, daemon=True).start()  # holds the stdin buffer's lock while it waits
time.sleep(0.2)
from bloodcell.data import discover
from bloodcell.data import cache as cache_module
from bloodcell.data.cache import build_cache
what, sample, cache, marker = sys.argv[1:5]
if what == "scan":
    discover._PARALLEL_MIN_FILES = 1  # the sample is small: check it in the pool too
    while True:  # scan after scan: the pool is at work whenever the kill comes
        discover.scan(sample, workers=2, progress=False, cache_dir=None)
inv = discover.scan(sample, workers=2, progress=False, cache_dir=None)
cache_module._PARALLEL_MIN_IMAGES = 1
for size in range(16, 4096):  # build after build
    build_cache(inv, size, "nearest", cache, workers=2, progress=False)
"""


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("what", ["scan", "cache"])
def test_a_killed_process_leaves_no_pool_worker_behind(tmp_path, what):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc")
    marker = (
        f"fork-safety-{what}-{os.getpid()}-{tmp_path.name}"  # on the command line of the process and any fork of it
    )
    env = dict(os.environ, BLOODCELL_PROGRESS="0")
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, what, str(SAMPLE), str(tmp_path / "cache"), marker],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    workers: set[int] = set()
    try:
        t0 = time.time()
        while True:  # the pool's workers are there (a scan's pool: the whole scan; a build's: build after build)
            assert proc.poll() is None, (
                f"the process ended (rc {proc.returncode}) before its pool started: "
                f"{proc.stderr.read().decode()[-2000:]}"
            )
            workers |= (
                {
                    pid
                    for pid in children_of(proc.pid)
                    if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                }
                if alive(proc.pid)
                else set()
            )
            if len(workers) >= 2:
                break
            assert time.time() - t0 < 60, "timed out waiting for the pool's workers"
            time.sleep(0.005)
        time.sleep(0.3)  # into their start-up (a forked worker is stuck by now, a spawned one importing or at work)
        workers |= set(children_of(proc.pid))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5  # PDEATHSIG is immediate; a worker still starting up sees it is orphaned within 1 s
        while (
            left := sorted({p for p in workers if alive(p)} | set(processes_running(marker)))
        ) and time.time() < deadline:
            time.sleep(0.05)
        assert left == [], (
            "left behind after kill -9 of the process: "
            f"{[Path(f'/proc/{p}/cmdline').read_bytes()[:120] for p in left if alive(p)]}"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.stdin.close()
        proc.stderr.close()

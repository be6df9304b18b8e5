"""`bloodcell study --parallel 2` interrupted: Ctrl-C in a process that lives on, SIGTERM, kill -9 of the study,
kill -9 of one worker; then a re-run completes the study with exactly the sequential study's results.

The interruptions land on events the workers report (BLOODCELL_EVENTS), not after sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bloodcell import events
from bloodcell.study.experiment import is_complete, read_status
from bloodcell.study.runner import run_study

from conftest import processes_running
from run_checks import outcome
from test_study_parallel import GOOD, spec, study
from test_train import BLOODCELL, cli_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> Path:
    """The two runs one after the other: the result every interrupted parallel study must end with."""
    base = tmp_path_factory.mktemp("sequential")
    with pytest.MonkeyPatch.context() as mp:  # module fixtures run outside the per-test cache of conftest
        mp.setenv("BLOODCELL_CACHE", str(base / "cache"))
        study(spec(base / "par.yaml", broken=False), base / "out")
    return base / "out"


def spawn(cfg: Path, out: Path, log: Path) -> subprocess.Popen:
    env = dict(cli_env(), **{events.ENV: str(log)})
    return subprocess.Popen(
        BLOODCELL + ["study", str(cfg), "--out", str(out), "--parallel", "2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def workers_at_work(log: Path, parent: int, n: int = 2, ended=lambda: None) -> list[int]:
    """Wait until n worker processes of the study process `parent` have reported an event (the first: a run's
    config.yaml is written, before it trains); their pids. Kills land there, not after sleeps, and well before a
    run can be complete. `ended()` says why the study ended early, or None while it runs."""
    t0 = time.time()
    while len(pids := sorted({e["pid"] for e in events.read(log)} - {parent})) < n:
        assert (why := ended()) is None, why
        assert time.time() - t0 < 240, "timed out waiting for the workers"
        time.sleep(0.02)
    return pids


def at_work(log: Path, proc: subprocess.Popen, n: int = 2) -> list[int]:
    return workers_at_work(
        log,
        proc.pid,
        n,
        lambda: None if proc.poll() is None else f"the study ended (rc {proc.returncode}): {proc.stdout.read()}",
    )


def gone(out: Path, timeout: float = 15) -> list[int]:
    deadline = time.time() + timeout
    while (left := processes_running(str(out))) and time.time() < deadline:
        time.sleep(0.05)
    return left


def children_running(out: Path, parent: int) -> list[int]:
    """The live processes of `out` whose parent is `parent` (the workers themselves, not what they forked)."""

    def ppid(pid: int) -> int:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return -1

    return [pid for pid in processes_running(str(out)) if ppid(pid) == parent]


# What a worker forked (a cache build's pool) dies with it by PDEATHSIG, a moment later: allowed this long.
FORKED_GRACE_SECONDS = 5


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_stopped_killed_and_crashed_parallel_studies_resume_to_the_sequential_result(tmp_path, sequential, monkeypatch):
    cfg, out = spec(tmp_path / "par.yaml", broken=False), tmp_path / "out"
    # Ctrl-C in a process that lives on (Python, a notebook): run_study stops its workers before it raises
    monkeypatch.setenv(events.ENV, str(tmp_path / "int.jsonl"))
    # Ctrl-C as Python answers it by default. Code run earlier in this process may have left SIGINT ignored (Lightning
    # ignores it for good once a fit is interrupted), and then the kill below is lost: twice in fresh-clone suites.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    watcher_failed: list[BaseException] = []

    def interrupt_at_work():
        try:
            workers_at_work(tmp_path / "int.jsonl", os.getpid())
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException as exc:  # a watcher that dies must fail the test, not leave the study to finish
            watcher_failed.append(exc)

    threading.Thread(target=interrupt_at_work, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_study(cfg, out, parallel=2, progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
        assert not watcher_failed, f"the watcher failed: {watcher_failed[0]!r}"
    assert children_running(out, os.getpid()) == [], "workers outlived the interrupted study"
    assert gone(out, timeout=FORKED_GRACE_SECONDS) == [], "what the workers forked outlived them"
    assert all(read_status(out / "runs" / k).get("state") != "failed" for k in GOOD)
    monkeypatch.delenv(events.ENV)
    # SIGTERM to the study: it stops its workers and exits 143; the runs stay resumable (not failed)
    proc = spawn(cfg, out, tmp_path / "term.jsonl")
    try:
        at_work(tmp_path / "term.jsonl", proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert gone(out, timeout=FORKED_GRACE_SECONDS) == [], "workers outlived the study"
        assert all(read_status(out / "runs" / k).get("state") != "failed" for k in GOOD)
        # kill -9 of the study: its workers see their stdin close and exit by themselves
        proc = spawn(cfg, out, tmp_path / "kill.jsonl")
        at_work(tmp_path / "kill.jsonl", proc, n=1)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert gone(out) == [], "orphaned workers kept training"
        assert not any(is_complete(out / "runs" / k) for k in GOOD), "orphaned workers finished their runs"
        # kill -9 of one worker: its run is marked failed, the other completes, the study ends normally
        proc = spawn(cfg, out, tmp_path / "crash.jsonl")
        victim = next(p for p in at_work(tmp_path / "crash.jsonl", proc) if str(out / "runs" / GOOD[0]) in cmdline(p))
        os.kill(victim, signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output
        assert f"runs complete: 1 of 2; failed: {GOOD[0]}" in output, output
        status = json.loads((out / "runs" / GOOD[0] / "status.json").read_text())
        assert status["state"] == "failed" and "WorkerDied" in status["error"] and "SIGKILL" in status["error"], status
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    done = (out / "runs" / GOOD[1] / "metrics.json").stat().st_mtime_ns
    result = study(cfg, out, "--parallel", "2")  # the re-run trains the failed run again, skips the finished one
    assert "runs complete: 2 of 2" in result.output
    assert (out / "runs" / GOOD[1] / "metrics.json").stat().st_mtime_ns == done
    for key in GOOD:
        assert outcome(out / "runs" / key) == outcome(sequential / "runs" / key), key
        assert not list((out / "runs" / key).rglob("*.tmp")) and not (out / "runs" / key / "checkpoints").exists()

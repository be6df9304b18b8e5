"""Several study runs at once (`bloodcell study --parallel K`): K worker processes, one device each.

Study runs are independent, so K of them can train at once. Every run gets a fresh process
(`python -m bloodcell.study.parallel`) whose environment is set before Python starts, so torch sees it from its
first import: on a CUDA machine worker slot i sees only GPU i (CUDA_VISIBLE_DEVICES; slots share GPUs round-robin
when K exceeds them), and every worker gets T // K torch threads (at least 1), T being the parent's torch thread
count (the machine's cores unless OMP_NUM_THREADS or torch.set_num_threads says fewer), so K workers do not
oversubscribe the CPU. A worker trains one run exactly as the sequential study does (the same function, resumed
from its checkpoint if it was interrupted) and writes its output into out/logs/<run>.log.

A run that raises is marked failed by its worker; a worker that dies (killed, out of memory) is marked failed by
the parent; either way the study goes on. Ctrl-C or SIGTERM stops every worker (SIGTERM, then SIGKILL after a
grace period) and leaves the interrupted runs to be resumed. A worker whose parent dies (kill -9) notices that its
stdin closed and exits at once, so a resumed study never races an orphan for the same run directory.

Runs that ask for several devices (DDP: train.devices > 1, train.num_nodes > 1) cannot share the machine this way
and are refused when K > 1.
"""

from __future__ import annotations

import os
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from bloodcell import io
from bloodcell.errors import ConfigError

# torch, lightning (study.experiment) and what trains are imported where they are used: the light install's CLI
# imports this module for parse_parallel, and has none of them.

GRACE_SECONDS = 10.0  # a stopped worker gets this long to exit after SIGTERM before SIGKILL
POLL_SECONDS = 0.1

Parallel = Union[int, str]


def parse_parallel(value: Parallel | None) -> int | str:
    """`--parallel` as given: a whole number >= 1, or 'auto'. Anything else is a one-line ConfigError."""
    if value is None:
        return 1
    text = str(value).strip()
    if text.lower() == "auto" and not isinstance(value, bool):
        return "auto"
    if isinstance(value, bool) or not re.fullmatch(r"[0-9]+", text) or int(text) < 1:
        raise ConfigError(
            "--parallel: expected how many runs to train at once (a whole number, 1 or more) or 'auto', "
            f"got {str(value)!r}"
        )
    return int(text)


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries (indices or UUIDs); [] without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        return [str(i) for i in range(count)]
    return [d.strip() for d in given.split(",") if d.strip()][:count]


def _trains_on_cuda(cfg) -> bool:
    return cfg.train.accelerator in ("auto", "gpu", "cuda")


def resolve_parallel(value: Parallel | None, runs: list) -> int:
    """How many runs at once: the number asked for, or for 'auto' the visible CUDA devices when the runs train on
    CUDA (1 on a machine without CUDA)."""
    k = parse_parallel(value)
    if k == "auto":
        gpus = visible_gpus() if any(_trains_on_cuda(r.config) for r in runs) else []
        return max(1, len(gpus))
    return k


# train.devices values that mean one device inside a worker, which sees exactly one GPU (or is one CPU process)
_ONE_DEVICE = {"auto", "1", "-1", "[0]", "0,"}


def check_single_device(runs: list, k: int) -> None:
    """With K > 1 every run trains on one device: refuse a run that asks for several (DDP), naming the key."""
    for run in runs:
        t = run.config.train
        if t.num_nodes > 1:
            raise ConfigError(
                f"--parallel {k}: run {run.key} sets train.num_nodes: {t.num_nodes} (multi-node DDP); "
                "a parallel study trains each run on one device: run it with --parallel 1"
            )
        devices = t.devices
        shown = str(devices).replace(" ", "")
        if shown not in _ONE_DEVICE:
            raise ConfigError(
                f"--parallel {k}: run {run.key} sets train.devices: {shown}; a parallel study gives each run "
                "one device (its own GPU, seen as device 0): set train.devices: auto or 1, or use --parallel 1"
            )


@dataclass
class Slot:
    """One worker place: the GPU its runs see (None on CPU) and their torch threads."""

    index: int
    gpu: str | None
    threads: int

    def describe(self) -> str:
        where = f"GPU {self.gpu}" if self.gpu is not None else "CPU"
        return f"worker {self.index}: {where}, {self.threads} torch thread{'s' * (self.threads != 1)}"


def plan_slots(k: int, gpus: list[str], threads: int) -> list[Slot]:
    """K worker places: GPUs round-robin (none on CPU), threads // K torch threads each (at least 1)."""
    return [Slot(i, gpus[i % len(gpus)] if gpus else None, max(1, threads // k)) for i in range(k)]


def slot_warnings(k: int, gpus: list[str], threads: int, on_cuda: bool) -> list[str]:
    """Warnings when K workers must share GPUs or cores; [] when each has its own.

    Args:
        k: The number of workers (--parallel).
        gpus: The visible CUDA devices, as CUDA_VISIBLE_DEVICES entries (see visible_gpus).
        threads: Torch threads of this process, shared out among the workers.
        on_cuda: Whether any run trains on CUDA.
    """
    notes = []
    if on_cuda and gpus and k > len(gpus):
        notes.append(
            f"--parallel {k} with {len(gpus)} visible GPU(s): workers share GPUs round-robin (their memory too)"
        )
    if k > threads:
        notes.append(
            f"--parallel {k} with {threads} torch thread(s) here: "
            "each worker gets 1 thread and the workers share the cores"
        )
    return notes


def worker_env(slot: Slot) -> dict:
    env = dict(os.environ)
    # this process's import path, in its order (as multiprocessing's spawn does): a worker runs the bloodcell this
    # process runs (a checkout on PYTHONPATH, say), not another install
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(slot.threads)
    if slot.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = slot.gpu
    env["BLOODCELL_PROGRESS"] = "0"  # the parent shows the study's bar; a worker's bars would only fill its log
    return env


def log_path(out: Path, key: str) -> Path:
    return out / "logs" / f"{key}.log"


@dataclass
class _Live:
    proc: subprocess.Popen
    run: object
    run_dir: Path
    slot: Slot
    log: Path
    t0: float


def run_parallel(jobs: list, out: Path, k: int, *, on_start: Callable, on_done: Callable) -> None:
    """Train `jobs` ((RunSpec, run directory) pairs, in study order) K at a time, each in a fresh worker process.

    on_start(run, slot) when a run is handed to a worker; on_done(run, record) when it ends, with record the
    sequential study's result record ({"state": "complete"|"failed", ...}).

    Args:
        jobs: (RunSpec, run directory) pairs, in study order.
        out: The study's output folder (each worker's log goes to out/logs/<run key>.log).
        k: Workers at once (at most len(jobs)); GPUs are shared out round-robin.
        on_start: Called as on_start(run, slot) when a run is handed to a worker.
        on_done: Called as on_done(run, record) when its worker ends.
    """
    import torch

    k = min(k, len(jobs))
    if k == 0:
        return
    on_cuda = any(_trains_on_cuda(run.config) for run, _ in jobs)
    gpus = visible_gpus() if on_cuda else []
    threads = torch.get_num_threads()
    slots = plan_slots(k, gpus, threads)
    for note in slot_warnings(k, gpus, threads, on_cuda):
        print(f"warning: {note}", file=sys.stderr)
    pending = deque(jobs)
    free = deque(slots)
    live: list[_Live] = []
    previous = _stop_on_sigterm()
    try:
        while pending or live:
            while pending and free:
                run, run_dir = pending.popleft()
                live.append(_start(run, run_dir, free.popleft(), out))
                on_start(run, live[-1].slot)
            time.sleep(POLL_SECONDS)
            for w in [w for w in live if w.proc.poll() is not None]:
                live.remove(w)
                free.append(w.slot)
                _close(w.proc)
                on_done(w.run, _outcome(w))
    except BaseException:
        _stop(live)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _start(run, run_dir: Path, slot: Slot, out: Path) -> _Live:
    log = log_path(out, run.key)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {run.key}, {slot.describe()}\n".encode())
        fh.flush()
        # the run key and directory on the command line: `ps` tells which worker trains what
        proc = subprocess.Popen(
            [sys.executable, "-m", "bloodcell.study.parallel", run.key, str(run_dir)],
            stdin=subprocess.PIPE,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=worker_env(slot),
        )
    # the job; stdin then stays open until the worker ends: its closing tells the worker that this process is gone
    # JSON, as the run's config.yaml is: the resolved config describes the run, and no pickle crosses the pipe
    job = json.dumps(
        {"key": run.key, "config": run.config.model_dump(mode="json"), "run_dir": str(run_dir), "threads": slot.threads}
    ).encode()
    try:
        proc.stdin.write(len(job).to_bytes(8, "big") + job)
        proc.stdin.flush()
    except BrokenPipeError:  # the worker died as it started: the loop finds it ended and fails the run, naming the log
        pass
    return _Live(proc, run, run_dir, slot, log, time.perf_counter())


def _outcome(w: _Live) -> dict:
    """What a finished worker left: the run complete, failed (the worker wrote why), or the worker died."""
    from bloodcell.study.experiment import is_complete, read_status, remove_stale_checkpoints

    seconds = round(time.perf_counter() - w.t0, 1)
    if is_complete(w.run_dir):  # (killed, if at all, after marking it complete: its resume checkpoint may be left)
        remove_stale_checkpoints(w.run_dir)
        return {"state": "complete", "seconds": seconds}
    status = read_status(w.run_dir)
    if w.proc.returncode == 0 and status.get("state") == "failed":
        return status
    rc = w.proc.returncode
    how = (
        f"was killed by {signal.Signals(-rc).name}"
        if rc < 0 and -rc in signal.valid_signals()
        else f"exited with status {rc}"
    )
    record = {
        "state": "failed",
        "error": f"WorkerDied: the worker process training this run {how}; its output is in {w.log}",
        "traceback": "",
        "seconds": seconds,
    }
    io.write_json(w.run_dir / "status.json", record)
    return record


def _stop_on_sigterm():
    """SIGTERM stops the study as Ctrl-C does (the workers are stopped, then the process exits 143)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, handler)


def _stop(live: list[_Live]) -> None:
    """SIGTERM every worker, SIGKILL those still there after GRACE_SECONDS; their runs stay resumable."""
    for w in live:
        if w.proc.poll() is None:
            w.proc.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for w in live:
        try:
            w.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            w.proc.kill()
            w.proc.wait()
        _close(w.proc)


def _close(proc: subprocess.Popen) -> None:
    try:
        proc.stdin.close()
    except OSError:  # a job left unsent in the buffer of a worker that died
        pass


# ----------------------------------------------------------------------------- the worker process


def _read_job(fd: int) -> dict:
    """The job the parent wrote: its length (8 bytes), then its JSON; read with os.read, nothing read ahead."""

    def exactly(n: int) -> bytes:
        chunks = b""
        while len(chunks) < n:
            chunk = os.read(fd, n - len(chunks))
            if not chunk:
                raise SystemExit("bloodcell.study.parallel: the study process went away before sending a job")
            chunks += chunk
        return chunks

    return json.loads(exactly(int.from_bytes(exactly(8), "big")))


def _exit_when_parent_goes(fd: int) -> None:
    while os.read(fd, 4096):  # returns b"" at EOF: the study process closed the pipe, or died
        pass
    os._exit(3)


def worker_main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    # The pipe from the parent moves off stdin, which becomes /dev/null: processes forked from here (a cache
    # build's pool, data loader workers) close sys.stdin as they start, and that would block on the buffer's lock
    # if a thread of ours were reading it.
    pipe = os.dup(0)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    job = _read_job(pipe)
    threading.Thread(target=_exit_when_parent_goes, args=(pipe,), daemon=True).start()
    import torch

    torch.set_num_threads(job["threads"])
    from bloodcell.config import RunConfig
    from bloodcell.study.runs import train_run

    record = train_run(RunConfig.model_validate(job["config"]), Path(job["run_dir"]), progress=False)
    print(
        f"{job['key']}: {record['state']}" + (f": {record['error']}" if record["state"] == "failed" else ""), flush=True
    )
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())

"""Benchmark (not a test): latency of `bloodcell serve` under concurrent uploads on 127.0.0.1.

    .venv/bin/python benchmarks/serve_load.py                              # 100 uploads, 16 at a time
    .venv/bin/python benchmarks/serve_load.py --requests 100 --concurrency 100
    .venv/bin/python benchmarks/serve_load.py --model runs/cnn --files-per-request 8

Starts the real server (`python -m bloodcell.cli serve`, uvicorn, one process) on a free port,
waits for /health, sends one warm-up request, then all uploads at once from an httpx.AsyncClient
whose connection pool and a semaphore both allow at most --concurrency requests in flight. Each
request carries --files-per-request images of the embedded sample (examples/pbc-sample), cycling.
Latency is measured per request from the moment it holds a slot until the whole answer is read, so
it includes queueing inside the server but not waiting for a free slot in the client.
An answer counts as correct when it is 200, every file comes back classified (counts add up to the
number of files sent) and nothing is unreadable. Prints the machine, versions, date and command,
then a Markdown table. tests/reliability/test_serve_load.py runs the same code and checks labels.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "pbc-sample"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextlib.contextmanager
def running_server(*serve_args: str, startup_timeout: float = 120.0):
    """`bloodcell serve --port 0` in a subprocess on 127.0.0.1: the system picks a free port and the server prints it;
    stopped (SIGTERM) on exit."""
    import httpx

    import bloodcell

    env = dict(os.environ, BLOODCELL_PROGRESS="0")
    # the child imports the same bloodcell as this process, installed or not
    src = str(Path(bloodcell.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "server.log"
        # the review workstation's database in the temporary folder, never the user's (unless --data-dir is given)
        data_dir = () if "--data-dir" in serve_args else ("--data-dir", str(Path(tmp) / "review"))
        cmd = [
            sys.executable,
            "-m",
            "bloodcell.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *data_dir,
            *serve_args,
        ]
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        server = Server("", proc, log)
        try:
            deadline = time.monotonic() + startup_timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with code {proc.returncode}:\n{server.log_tail()}")
                if not server.url:  # "bloodcell: model cnn (torch) on http://127.0.0.1:PORT/"
                    found = re.search(r" on (http://127\.0\.0\.1:\d+)/", log.read_text(errors="replace"))
                    server.url = found.group(1) if found else ""
                try:
                    if server.url and httpx.get(server.url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not up after {startup_timeout:.0f} s:\n{server.log_tail()}")
                time.sleep(0.2)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def sample_images(limit: int | None = None) -> list[tuple[str, bytes]]:
    """(class/file name, bytes) of the embedded sample, sorted; the class folder makes names unique."""
    files = sorted(SAMPLE.glob("*/*.jpg"))[:limit]
    return [(f"{f.parent.name}/{f.name}", f.read_bytes()) for f in files]


@dataclass
class Answer:
    sent: list[str]
    status: int | None  # None: no HTTP answer (transport error)
    seconds: float
    body: dict | None = None
    error: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_answer(answer: Answer) -> None:
    """Fill answer.problems: what is wrong with it, if anything."""
    if answer.status != 200:
        answer.problems.append(f"status {answer.status} {answer.error}".strip())
        return
    body = answer.body or {}
    got = [p["path"] for p in body.get("predictions", [])]
    if got != [Path(n).name for n in answer.sent]:
        answer.problems.append(f"predicted files {got} != sent {answer.sent}")
    # the counts leave out images flagged OOD: they add up to the counted images, and those plus the OOD ones to all
    counted, ood = body.get("counted"), body.get("ood_count", 0)
    if sum(body.get("counts", {}).values()) != counted or counted + ood != len(answer.sent):
        answer.problems.append(
            f"counts {body.get('counts')} (counted {counted}, OOD {ood}) do not add up to {len(answer.sent)}"
        )
    if body.get("unreadable"):
        answer.problems.append(f"unreadable: {body['unreadable']}")


async def upload_all(
    url: str, uploads: list[list[tuple[str, bytes]]], concurrency: int, timeout: float = 120.0
) -> list[Answer]:
    """POST every upload to url/predict at once, at most `concurrency` in flight; answers in order."""
    import httpx

    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def one(client: httpx.AsyncClient, files: list[tuple[str, bytes]]) -> Answer:
        sent = [name for name, _ in files]
        parts = [("files", (Path(name).name, data, "image/jpeg")) for name, data in files]
        async with slots:
            t0 = time.perf_counter()
            try:
                r = await client.post(url + "/predict", files=parts)
                seconds = time.perf_counter() - t0
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
                answer = Answer(sent, r.status_code, seconds, body, "" if r.status_code == 200 else r.text[:200])
            except httpx.HTTPError as exc:
                answer = Answer(sent, None, time.perf_counter() - t0, error=f"{type(exc).__name__}: {exc}")
        check_answer(answer)
        return answer

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        return list(await asyncio.gather(*(one(client, files) for files in uploads)))


def make_uploads(
    images: list[tuple[str, bytes]], requests: int, files_per_request: int
) -> list[list[tuple[str, bytes]]]:
    """`requests` uploads of `files_per_request` images each, cycling through `images`."""
    n = len(images)
    return [[images[(r * files_per_request + k) % n] for k in range(files_per_request)] for r in range(requests)]


def summary(answers: list[Answer], wall_seconds: float) -> dict:
    ms = np.array([a.seconds for a in answers]) * 1000
    files = sum(len(a.sent) for a in answers)
    return {
        "requests": len(answers),
        "errors": sum(not a.ok for a in answers),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
        "requests_per_s": len(answers) / wall_seconds,
        "images_per_s": files / wall_seconds,
        "wall_s": wall_seconds,
    }


def run_load(url: str, uploads: list[list[tuple[str, bytes]]], concurrency: int) -> tuple[list[Answer], dict]:
    t0 = time.perf_counter()
    answers = asyncio.run(upload_all(url, uploads, concurrency))
    return answers, summary(answers, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="run directory or .onnx file (default: the bundled model)")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=16, help="most requests in flight at once")
    ap.add_argument("--files-per-request", type=int, default=1)
    args = ap.parse_args()

    import fastapi
    import httpx
    import torch
    import uvicorn

    from bloodcell import __version__
    from bloodcell.evaluate.machine import cpu_line

    images = sample_images()
    uploads = make_uploads(images, args.requests, args.files_per_request)
    serve_args = ["--model", args.model] if args.model else []
    with running_server(*serve_args) as server:
        warm = asyncio.run(upload_all(server.url, uploads[:1], 1))
        if not warm[0].ok:
            sys.exit(f"warm-up request failed: {warm[0].problems}\n{server.log_tail()}")
        answers, s = run_load(server.url, uploads, args.concurrency)

    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    print(f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print(f"machine: {cpu_line()}, {os.cpu_count()} cores, {mem_gb:.0f} GB, {platform.platform()}")
    print(
        f"versions: bloodcell {__version__}, python {platform.python_version()}, torch {torch.__version__}, "
        f"fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}, httpx {httpx.__version__}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"model: {args.model or 'bundled model'}; server: one uvicorn process on 127.0.0.1; client: httpx.AsyncClient"
    )
    print()
    print(
        "| requests | concurrency | files/request | errors | "
        "p50 ms | p90 ms | p99 ms | max ms | requests/s | images/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {s['requests']} | {args.concurrency} | {args.files_per_request} | {s['errors']} | {s['p50_ms']:.0f} | "
        f"{s['p90_ms']:.0f} | {s['p99_ms']:.0f} | {s['max_ms']:.0f} | "
        f"{s['requests_per_s']:.1f} | {s['images_per_s']:.1f} |"
    )
    for a in answers:
        if not a.ok:
            print(f"error: {a.sent}: {'; '.join(a.problems)}", file=sys.stderr)
    sys.exit(1 if s["errors"] else 0)


if __name__ == "__main__":
    main()

"""Benchmark (not a test): the abuse trial of issue 27 against the real server, each case with its figures.

    .venv/bin/python benchmarks/serve_abuse.py                   # every case
    .venv/bin/python benchmarks/serve_abuse.py --cases fields,stalled

Starts `bloodcell serve` (one uvicorn process, the bundled model, default limits, a temporary --data-dir) through
benchmarks/serve_load.py's helper, and measures the server process itself (/proc/PID/status: VmRSS, VmHWM):

- pixels: one 1 MB request of 200 PNGs declaring 3990 x 3990 px each (under the per-image limit of 16 Mpx): answer
  and seconds (the trial: 200 x 39.7 Mpx, 86 s of work);
- fields: 8 concurrent requests of one 12 Mpx smear photograph each (a BCCD photograph scaled up when ../shared is
  there, else a generated one): answers, the server's peak RSS and its RSS 10 s after (the trial: 4.6 GB peak, 1.7-1.9
  GB for good);
- stalled: 1,000 connections that send part of their headers and stop: how many the server closed, and when;
- bodies: 30 clients that send 15 MB of a 20 MB body and stop: RSS while they hang, answers, and when they were closed;
- hosts: Host: evil.example.com, a cross-origin POST, a same-origin POST;
- throughput: single-cell requests at 8 clients (serve_load's code), requests/s.

Prints the machine (CPU model and flags), versions, date and a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import resource
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402  (benchmarks/serve_load.py: starts the server, sends uploads)

REPO = Path(__file__).resolve().parents[1]
BCCD_PHOTO = REPO.parent / "shared" / "data" / "bccd" / "BCCD" / "JPEGImages" / "BloodImage_00002.jpg"


def status_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def png_declaring(side: int) -> bytes:
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, "PNG")
    return out.getvalue()


def big_photo() -> tuple[bytes, str]:
    size = (4000, 3000)
    if BCCD_PHOTO.is_file():
        img, what = (
            Image.open(BCCD_PHOTO).convert("RGB").resize(size, Image.Resampling.BICUBIC),
            "BCCD BloodImage_00002 scaled to 4000x3000",
        )
    else:
        rng = np.random.default_rng(0)
        arr = np.full((size[1], size[0], 3), (236, 226, 232), np.uint8)
        for _ in range(400):
            x, y, r = rng.integers(0, size[0]), rng.integers(0, size[1]), rng.integers(60, 110)
            arr[max(0, y - r) : y + r, max(0, x - r) : x + r] = (214, 140, 150)
        img, what = Image.fromarray(arr), "generated 4000x3000 field"
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue(), what


def case_pixels(url: str, pid: int) -> list[str]:
    files = [("files", (f"p{i}.png", png_declaring(3990), "image/png")) for i in range(200)]
    size = sum(len(f[1][1]) for f in files)
    t0 = time.perf_counter()
    r = httpx.post(url + "/predict?input=cell", files=files, timeout=300)
    body = r.json()
    said = (
        body["detail"][:90] + "..."
        if "detail" in body
        else f"{len(body['predictions'])} classified, {len(body['unreadable'])} unreadable"
    )
    return [
        f"| 200 PNGs declaring 3990 x 3990 px in one request ({size / 1e6:.2f} MB) | {r.status_code}: {said} | "
        f"{time.perf_counter() - t0:.2f} s |"
    ]


def case_fields(url: str, pid: int) -> list[str]:
    photo, what = big_photo()
    before = status_mb(pid)["VmRSS"]

    async def burst():
        async with httpx.AsyncClient(timeout=600) as client:
            return await asyncio.gather(
                *(
                    client.post(url + "/predict?input=field", files={"files": ("f.jpg", photo, "image/jpeg")})
                    for _ in range(8)
                )
            )

    peak = [0.0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], status_mb(pid)["VmRSS"])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    answers = asyncio.run(burst())
    seconds = time.perf_counter() - t0
    stop.set()
    watcher.join()
    time.sleep(10)
    after = status_mb(pid)["VmRSS"]
    codes = sorted(a.status_code for a in answers)
    return [
        f"| 8 concurrent field requests, {what} ({len(photo) / 1e6:.1f} MB) | answers {codes} in {seconds:.1f} s | "
        f"RSS {before:.0f} MB before, peak {peak[0]:.0f} MB, {after:.0f} MB 10 s after |"
    ]


def case_stalled(url: str, pid: int, n: int = 1000) -> list[str]:
    host, port = url.removeprefix("http://").split(":")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, n + 200)), hard))
    conns = []
    for _ in range(n):
        c = socket.create_connection((host, int(port)))
        c.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        c.setblocking(False)
        conns.append(c)
    t0 = time.monotonic()
    closed_at: dict[int, float] = {}
    while len(closed_at) < n and time.monotonic() - t0 < 60:
        for i, c in enumerate(conns):
            if i in closed_at:
                continue
            try:
                if c.recv(4096) == b"":
                    closed_at[i] = time.monotonic() - t0
            except BlockingIOError:
                pass
            except OSError:
                closed_at[i] = time.monotonic() - t0
        time.sleep(0.1)
    for c in conns:
        c.close()
    times = sorted(closed_at.values())
    return [
        f"| {n} connections sending part of their headers, then nothing | {len(times)} closed by the server "
        f"within 60 s | last closed {times[-1]:.1f} s after the last opened (--header-seconds 10) |"
        if times
        else f"| {n} stalled connections | none closed within 60 s | - |"
    ]


def case_bodies(url: str, pid: int, n: int = 30) -> list[str]:
    host, port = url.removeprefix("http://").split(":")
    head = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
        b"Content-Length: 20000000\r\n\r\n"
    )
    before = status_mb(pid)["VmRSS"]
    conns = []
    chunk = b"a" * 1_000_000
    for _ in range(n):
        c = socket.create_connection((host, int(port)))
        c.sendall(head)
        conns.append(c)
    for _ in range(15):
        for c in conns:
            c.sendall(chunk)
    t0 = time.monotonic()
    time.sleep(1)
    during = status_mb(pid)["VmRSS"]
    answers = []
    deadline = t0 + 40  # a server without a body deadline would hold them for ever
    for c in conns:
        got = b""
        try:
            c.settimeout(max(0.01, deadline - time.monotonic()))
            while part := c.recv(65536):
                got += part
            answers.append(got.split(b" ", 2)[1].decode() if got.startswith(b"HTTP/1.1") else "closed")
        except (socket.timeout, TimeoutError):
            answers.append("still open after 40 s")
        except OSError:
            answers.append("closed")
    seconds = time.monotonic() - t0
    for c in conns:
        c.close()
    time.sleep(2)
    after = status_mb(pid)["VmRSS"]
    return [
        f"| {n} clients send 15 MB of a 20 MB body and stop | answers {sorted(set(answers))} "
        f"{seconds:.1f} s after they stopped (--body-idle-seconds 10) | RSS {before:.0f} MB before, {during:.0f} MB "
        f"while they hang, {after:.0f} MB after the clients closed |"
    ]


def case_hosts(url: str, pid: int) -> list[str]:
    cell = serve_load.sample_images(1)[0]
    rows = []

    def said(r) -> str:
        detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else None
        return f"{r.status_code}: {detail[:70]}..." if isinstance(detail, str) else f"{r.status_code} (answered)"

    r = httpx.get(url + "/health", headers={"Host": "evil.example.com"})
    rows.append(f"| `Host: evil.example.com` (DNS rebinding) | {said(r)} | - |")
    r = httpx.post(url + "/predict", files={"files": cell}, headers={"Origin": "http://evil.example.com"})
    rows.append(f"| POST with `Origin: http://evil.example.com` | {said(r)} | - |")
    r = httpx.post(url + "/predict", files={"files": cell}, headers={"Origin": url})
    rows.append(f"| POST from the server's own page | {r.status_code} | - |")
    return rows


def case_throughput(url: str, pid: int) -> list[str]:
    uploads = serve_load.make_uploads(serve_load.sample_images(), 400, 1)
    serve_load.run_load(url, uploads[:8], 8)  # warm
    answers, s = serve_load.run_load(url, uploads, 8)
    return [
        f"| 400 single-cell requests, 8 clients | {s['errors']} errors, p50 {s['p50_ms']:.0f} ms | "
        f"{s['requests_per_s']:.1f} requests/s |"
    ]


CASES = {
    "pixels": case_pixels,
    "fields": case_fields,
    "stalled": case_stalled,
    "bodies": case_bodies,
    "hosts": case_hosts,
    "throughput": case_throughput,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    args = ap.parse_args()
    from bloodcell import __version__
    from bloodcell.evaluate.machine import cpu_line

    rows = []
    for name in args.cases.split(","):
        with serve_load.running_server() as server:  # a fresh server per case: one case's peak is not the next's
            rows += CASES[name](server.url, server.process.pid)
    print(f"date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    print(
        f"machine: {cpu_line()}, {os.cpu_count()} cores, {platform.platform()}; "
        f"bloodcell {__version__}, python {platform.python_version()}"
    )
    print("server: `bloodcell serve` with default limits, bundled model, one uvicorn process on 127.0.0.1\n")
    print("| case | answer | figures |\n|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""The server as a small shared service (issue 27): Host and Origin checks, the pixel budget, the bounded queue for
heavy work, body and header deadlines, and the small refusals (a repeated or oversized parameter, a long file name).

Fast cases run in process (TestClient); the deadlines need a real socket: uvicorn in a thread with the protocol
`bloodcell serve` uses (serve.server). The figures of the abuse trial are benchmarks/serve_abuse.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bloodcell.infer import Predictor
from bloodcell.serve.app import create_app
from bloodcell.serve.guards import host_name
from bloodcell.serve.limits import ServerLimits
from conftest import SAMPLE, FixedDetector, field_photo, toy_run

CELL = sorted((SAMPLE / "basophil").iterdir())[0]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.load(toy_run(tmp_path_factory.mktemp("run") / "run", seed=3))


def cell_upload(name: str = "cell.jpg") -> list:
    return [("files", (name, CELL.read_bytes(), "image/jpeg"))]


def png_declaring(width: int, height: int) -> bytes:
    """A small file whose header declares width x height: a 1-bit PNG of zeros compresses to almost nothing."""
    out = io.BytesIO()
    Image.new("1", (width, height)).save(out, "PNG")
    return out.getvalue()


# ---------------------------------------------------------------------- Host and Origin


@pytest.mark.parametrize(
    "value, name",
    [
        ("127.0.0.1:8000", "127.0.0.1"),
        ("[::1]:8000", "::1"),
        ("Lab-PC.local", "lab-pc.local"),
        ("[fe80::1]", "fe80::1"),
        ("::1", "::1"),
        ("", ""),
    ],
)
def test_host_names_are_read_with_and_without_port_and_ipv6_brackets(value, name):
    assert host_name(value) == name


def test_a_foreign_host_or_a_cross_origin_change_is_refused(predictor):
    app = create_app(predictor, limits=ServerLimits(allowed_hosts=("127.0.0.1", "localhost", "lab-pc")))
    local = TestClient(app, base_url="http://127.0.0.1:8000")
    assert local.get("/health").status_code == 200
    assert TestClient(app, base_url="http://lab-pc:8000").get("/health").status_code == 200
    evil = TestClient(app, base_url="http://evil.example.com")  # a DNS-rebinding page reaches us under its own name
    res = evil.get("/health")
    assert res.status_code == 400 and "Host 'evil.example.com' is not a name of this server" in res.json()["detail"]
    assert "--allow-host evil.example.com" in res.json()["detail"]
    # a page of another site posting to the server: refused before any work; our own page and scripts pass
    res = local.post("/predict", files=cell_upload(), headers={"Origin": "http://evil.example.com"})
    assert res.status_code == 403 and "cross-origin request refused" in res.json()["detail"]
    assert local.post("/predict", files=cell_upload(), headers={"Origin": "http://127.0.0.1:8000"}).status_code == 200
    assert local.post("/predict", files=cell_upload()).status_code == 200
    assert (
        local.get("/health", headers={"Origin": "http://evil.example.com"}).status_code == 200
    )  # reads change nothing
    assert local.post("/predict", files=cell_upload(), headers={"Origin": "null"}).status_code == 403


def test_serve_answers_to_its_local_names_and_allow_host():
    from bloodcell.cli.serve import _served_names

    assert _served_names("127.0.0.1", []) == ("127.0.0.1", "localhost", "::1")
    assert _served_names("127.0.0.1", ["lab-pc.example.org", " "]) == (
        "127.0.0.1",
        "localhost",
        "::1",
        "lab-pc.example.org",
    )
    every = _served_names("0.0.0.0", [])
    assert "0.0.0.0" not in every and socket.gethostname() in every


# ---------------------------------------------------------------------- pixels, queue


def test_a_request_over_the_pixel_budget_is_refused_before_anything_is_decoded(predictor, monkeypatch):
    limits = ServerLimits(max_pixels=4_000_000, max_request_pixels=10_000_000)
    client = TestClient(create_app(predictor, limits=limits))
    files = [("files", (f"big{i}.png", png_declaring(1900, 1900), "image/png")) for i in range(3)]  # 3.6 Mpx each
    assert sum(len(f[1][1]) for f in files) < 10_000

    import bloodcell.data.images as images

    decoded = []
    real_open = images.open_rgb
    monkeypatch.setattr(images, "open_rgb", lambda *a, **k: decoded.append(1) or real_open(*a, **k))
    res = client.post("/predict?input=cell", files=files)
    assert res.status_code == 413 and "10.8 million pixels together" in res.json()["detail"]
    assert "--max-request-pixels" in res.json()["detail"] and not decoded
    # images over the per-image limit are not decoded either, so they do not count: each is refused on its own
    res = client.post(
        "/predict?input=cell", files=[("files", ("huge.png", png_declaring(2100, 2100), "image/png"))] + cell_upload()
    )
    assert res.status_code == 200 and res.json()["unreadable"][0]["path"] == "huge.png"
    assert "too many pixels (2100x2100 > 4,000,000)" in res.json()["unreadable"][0]["reason"]


class SlowDetector(FixedDetector):
    """FixedDetector that takes `delay` seconds per photograph: heavy work the gate must bound."""

    delay = 1.5

    def detect_one(self, image):
        time.sleep(self.delay)
        return super().detect_one(image)


def test_heavy_work_is_bounded_and_the_rest_is_turned_away_with_retry_after(predictor, tmp_path):
    import httpx

    photo = field_photo(tmp_path / "field.jpg").read_bytes()
    app = create_app(predictor, detector=SlowDetector(), limits=ServerLimits(heavy_workers=1, heavy_queue=1))

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            fields = [
                client.post("/predict?input=auto", files={"files": ("field.jpg", photo, "image/jpeg")})
                for _ in range(3)
            ]
            cells = client.post("/predict?input=auto", files={"files": ("cell.jpg", CELL.read_bytes(), "image/jpeg")})
            started = time.monotonic()
            answers = await asyncio.gather(*fields, cells)
            return answers, time.monotonic() - started

    answers, seconds = asyncio.run(burst())
    statuses = sorted(a.status_code for a in answers[:3])
    assert statuses == [200, 200, 503], statuses  # one computed, one waited, one turned away
    busy = next(a for a in answers[:3] if a.status_code == 503)
    assert busy.headers["retry-after"] == "5" and "--heavy-workers 1" in busy.json()["detail"]
    assert answers[3].status_code == 200  # single cells never wait behind photographs
    assert seconds >= 2 * SlowDetector.delay * 0.9  # the two photographs ran one after the other


# ---------------------------------------------------------------------- deadlines, on a real socket


@contextlib.contextmanager
def real_server(app, limits: ServerLimits):
    import uvicorn

    from bloodcell.serve.server import protocol_with_header_deadline

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        log_level="warning",
        http=protocol_with_header_deadline(limits.header_seconds),
        limit_concurrency=limits.max_connections,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def closed_within(conn: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed `conn` within `seconds`, and what it sent before."""
    conn.settimeout(seconds)
    got = b""
    try:
        while chunk := conn.recv(65536):
            got += chunk
        return True, got
    except (socket.timeout, TimeoutError):
        return False, got
    except ConnectionResetError:
        return True, got


def test_connections_that_never_finish_their_headers_are_closed(predictor):
    limits = ServerLimits(header_seconds=1.0)
    with real_server(create_app(predictor, limits=limits), limits) as port:
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        partial = socket.create_connection(("127.0.0.1", port))
        partial.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
        started = time.monotonic()
        assert all(closed_within(c, 5)[0] for c in [*silent, partial])
        assert time.monotonic() - started < 4
        with socket.create_connection(("127.0.0.1", port)) as ok:  # a prompt client is served as before
            ok.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            closed, answer = closed_within(ok, 5)
        assert closed and answer.startswith(b"HTTP/1.1 200")
        for c in [*silent, partial]:
            c.close()


def test_a_body_that_stalls_is_refused_with_408_and_its_memory_freed(predictor):
    limits = ServerLimits(body_idle_seconds=1.0, body_seconds=30)
    with real_server(create_app(predictor, limits=limits), limits) as port:
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(
            b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 1000000\r\n\r\n" + b"a" * 100_000
        )
        started = time.monotonic()
        closed, answer = closed_within(conn, 5)
        assert closed and answer.startswith(b"HTTP/1.1 408") and b"request body too slow: 100,000 bytes" in answer
        assert time.monotonic() - started < 4
        conn.close()


# ---------------------------------------------------------------------- small refusals


def test_a_repeated_or_oversized_input_parameter_is_one_short_line(predictor):
    client = TestClient(create_app(predictor))
    res = client.post("/predict?input=cell&input=field", files=cell_upload())
    assert res.status_code == 422 and "input must be given once" in res.json()["detail"]
    res = client.post("/predict?input=" + "x" * 20_000, files=cell_upload())
    assert res.status_code == 422 and len(res.json()["detail"]) < 200


def test_a_file_name_of_9_kb_is_shortened_not_a_refusal_of_the_request(predictor):
    client = TestClient(create_app(predictor))
    res = client.post("/predict?input=cell", files=cell_upload("a" * 9000 + ".jpg") + cell_upload("b.jpg"))
    assert res.status_code == 200, res.text
    assert [len(p["path"]) for p in res.json()["predictions"]] == [200, 5]


@pytest.mark.slow
def test_the_abuse_benchmark_runs():
    """benchmarks/serve_abuse.py's quick cases against the real server: it must not rot (figures are not checked)."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_abuse.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--cases", "pixels,hosts"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| 200 PNGs declaring 3990 x 3990 px in one request" in out.stdout and "413" in out.stdout
    assert "| `Host: evil.example.com` (DNS rebinding) | 400" in out.stdout and "machine: " in out.stdout

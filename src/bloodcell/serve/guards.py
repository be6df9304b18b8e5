"""What keeps one client from tying up the server, and other sites from driving it (limits in serve.limits).

- HostOriginGuard: only the server's own names in the Host header (a DNS-rebinding page reaches the server under the
  attacker's name), and no state-changing request from a page of another origin (a cross-site form or fetch).
- HeavyGate: a bounded queue for smear photographs and Grad-CAM: at most `workers` at once, `queue` waiting, then
  503 with Retry-After; when the last heavy job ends, the memory its peak took is handed back to the system.
- declared_pixels: the pixels an upload's images will decode to, read from their headers before any is decoded.
- read_body: a request body within the byte limit, with no pause longer than the idle limit and within the total time.
"""

from __future__ import annotations

import asyncio
import ctypes
import io
import json
import sys
from typing import Iterable
from urllib.parse import urlsplit

import anyio
from fastapi import HTTPException
from PIL import Image

from bloodcell.errors import shown

_SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}


def host_name(value: str) -> str:
    """'Example.org:8000' -> 'example.org', '[::1]:8000' -> '::1' (a Host header or an origin's netloc)."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].split("]", 1)[0]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class HostOriginGuard:
    """Pure ASGI middleware: 400 for a Host the server does not answer to, 403 for a POST/PATCH/PUT/DELETE whose Origin
    header names another host. Requests without an Origin (curl, scripts) are not cross-site and pass."""

    def __init__(self, app, hosts: Iterable[str]) -> None:
        self.app = app
        self.hosts = {host_name(h) for h in hosts}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            host = host_name(headers.get("host", ""))
            if host not in self.hosts:
                return await _refuse(
                    send,
                    400,
                    f"Host {shown(host)} is not a name of this server: if it is, start it "
                    f"with --allow-host {shown(host, quote=False)}",
                )
            origin = headers.get("origin")
            if origin is not None and scope["method"] not in _SAFE_METHODS:
                if host_name(urlsplit(origin).netloc) not in self.hosts:
                    return await _refuse(
                        send,
                        403,
                        f"cross-origin request refused: a page of {shown(origin)} may not "
                        "change anything here (--allow-host names a trusted one)",
                    )
        await self.app(scope, receive, send)


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class HeavyGate:
    """At most `workers` heavy jobs at once and `queue` waiting; a request beyond that is refused at once (503)."""

    def __init__(self, workers: int, queue: int, retry_after: int = 5) -> None:
        self.workers, self.queue, self.retry_after = workers, queue, retry_after
        self.active = self.waiting = 0
        self._slots: asyncio.Semaphore | None = None

    async def __aenter__(self) -> "HeavyGate":
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        if self.active >= self.workers and self.waiting >= self.queue:
            raise HTTPException(
                503,
                f"busy: {self.active} smear photographs or Grad-CAM images are being computed and "
                f"{self.waiting} wait (server limits --heavy-workers {self.workers}, --heavy-queue "
                f"{self.queue}); try again in {self.retry_after} s",
                headers={"Retry-After": str(self.retry_after)},
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        return self

    async def __aexit__(self, *exc) -> None:
        self.active -= 1
        self._slots.release()
        if self.active == 0 and self.waiting == 0:
            await asyncio.to_thread(give_back_memory)


def give_back_memory() -> None:
    """Return the heap's free pages to the system (glibc's malloc_trim): a peak of a few photographs otherwise stays
    in the process for good. A no-op where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def declared_pixels(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an image's header, without decoding it; None when it is no image PIL knows."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except Exception:  # unreadable: the decoder says why later, per file
        return None


async def read_body(request, limit: int, idle_seconds: float, total_seconds: float) -> bytes:
    """The whole request body; 413 as soon as it passes `limit` bytes, 408 when it pauses or lasts too long.

    Args:
        request: The Starlette/FastAPI request whose body is streamed.
        limit: Largest body accepted, in bytes (a larger Content-Length is refused before reading).
        idle_seconds: Longest pause between two chunks, in seconds.
        total_seconds: Longest time for the whole body, in seconds.
    """
    mb = limit / (1024 * 1024)
    too_big = HTTPException(
        413, f"upload too large: more than {mb:.4g} MB in one request (server limit --max-upload-mb {mb:.4g})"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total_seconds
    chunks = request.stream().__aiter__()
    buf = bytearray()
    while True:
        wait = min(idle_seconds, deadline - loop.time())
        try:
            if wait <= 0:
                raise TimeoutError
            with anyio.fail_after(wait):  # a cancel scope: no task per chunk, as asyncio.wait_for would make
                chunk = await chunks.__anext__()
        except StopAsyncIteration:
            return bytes(buf)
        except TimeoutError:
            raise HTTPException(
                408,
                f"request body too slow: {len(buf):,} bytes received, then nothing for "
                f"{idle_seconds:g} s or not all within {total_seconds:g} s (server limits "
                "--body-idle-seconds, --body-seconds)",
                headers={"Connection": "close"},
            ) from None
        buf += chunk
        if len(buf) > limit:
            raise too_big

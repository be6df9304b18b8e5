"""Every limit of `bloodcell serve`, said once: its default, what it guards against, and the option that sets it.

The server is a small shared service on a lab's network: no request may tie up its CPU or memory for long, no
client may hold a connection open without sending, and only the names it is meant to answer to can drive it.
`bloodcell serve --help` lists these options with the texts below; docs/reliability.md has the measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServerLimits:
    """The limits one server runs with (defaults: `bloodcell serve` without options)."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_files: int = 500
    # A cell image the classifier needs is a few hundred pixels a side (PBC: 360 x 363); a smear photograph up to
    # 16 Mpx (infer.fields.DEFAULT_MAX_FIELD_PIXELS). Larger images are refused before they are decoded.
    max_pixels: int = 16_000_000
    # Decoded pixels of all the images of one request together, counted from their headers before any is decoded:
    # 500 PBC-size cells (65 Mpx) fit, 200 images declaring 39.7 Mpx each (a 1 MB request) do not.
    max_request_pixels: int = 100_000_000
    # Smear photographs and Grad-CAM cost 0.1-0.5 GB and up to seconds each: at most this many at once ...
    heavy_workers: int = 2
    # ... and this many waiting; beyond, 503 with Retry-After.
    heavy_queue: int = 4
    # A client must send its request line and headers within this many seconds of connecting (or of its last answer
    # on a kept-alive connection), and its body with no pause longer than body_idle_seconds and all of it within
    # body_seconds; otherwise the connection is closed (408 when a request was started).
    header_seconds: float = 10.0
    body_idle_seconds: float = 10.0
    body_seconds: float = 120.0
    # Names the server answers to (the Host header) and whose pages may post to it: `bloodcell serve` sets the local
    # names, the bound address and --allow-host NAME. None: no such check (an app embedded behind a proxy, tests).
    allowed_hosts: tuple[str, ...] | None = None
    # Connections (and requests) at once; more are answered 503 by uvicorn.
    max_connections: int = 256

    def retry_after(self) -> int:
        """Seconds a client turned away (503) should wait: about one heavy job."""
        return 5


HELP = {
    "max_upload_mb": "Largest request body (all files together), MB.",
    "max_files": "Most images in one request.",
    "max_pixels": "Largest image, in pixels (width x height from its header; refused before decoding).",
    "max_request_pixels": "Most pixels of all the images of one request together (from their headers).",
    "heavy_workers": "Smear photographs and Grad-CAM computed at once (each 0.1-0.5 GB).",
    "heavy_queue": "Such requests waiting beyond those; more get 503 with Retry-After.",
    "header_seconds": "Close a connection that has not sent its request headers within this time.",
    "body_seconds": "Refuse (408) a request whose body takes longer than this, "
    "or pauses longer than --body-idle-seconds.",
    "body_idle_seconds": "Longest pause while a request body is sent.",
    "allow_host": "Another name or address this server answers to (the Host header) and whose pages may post to it; "
    "repeatable. The local names and the bound address are always allowed.",
}

"""Faults: oversize uploads, decompression bombs and unreadable uploads sent to the real server.

The server is `bloodcell serve` with its default limits (20 MB per request, 40 million pixels per
image) in a subprocess; its peak memory during each bad upload is read from /proc (Linux only).
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageFile

from bloodcell.data.images import UnreadableImage, open_rgb
from bloodcell.serve.limits import ServerLimits
from bloodcell.serve.app import DEFAULT_MAX_UPLOAD_BYTES

from conftest import REPO, load_benchmark

serve_load = load_benchmark("serve_load")  # benchmarks/serve_load.py: starts the server, sends the uploads

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")

LIMIT_MB = DEFAULT_MAX_UPLOAD_BYTES // 2**20
# Bound on the server's peak RSS above its RSS just before a bad upload. A rejected body is held in
# memory at most up to the upload limit (20 MB); 20 MB more covers the parser, the threads and the
# allocator's slack. Decoding even the smallest bomb below would need 81 MB (9000x9000 grey), the
# others 100 MB to 2.7 GB, so staying under this bound shows that none of them was decoded.
MEMORY_BOUND_MB = LIMIT_MB + 20
CELL = sorted((REPO / "examples" / "pbc-sample" / "neutrophil").glob("*.jpg"))[0]


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height black pixels: width*height/1000 bytes on disk,
    width*height bytes once decoded by PIL (3x that in RGB). Written chunk by chunk with zlib because
    PIL can only write an image it holds whole in memory."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter type 0, then the packed pixels
    rows_per_block = max(1, 2**20 // len(row))
    z = zlib.compressobj(9)
    idat = bytearray()
    for start in range(0, height, rows_per_block):
        idat += z.compress(row * min(rows_per_block, height - start))
    idat += z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", bytes(idat)) + chunk(b"IEND", b"")


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to declare width x height."""
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 160, 200)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def test_bomb_generators_make_what_they_claim():
    small = Image.open(io.BytesIO(png_bomb(70, 45)))
    small.load()
    assert small.size == (70, 45) and small.getextrema() == (0, 0)
    bomb = png_bomb(30000, 30000)
    assert len(bomb) < 200_000  # ~110 KB for 900 million pixels
    for data in (bomb, jpeg_declaring(30000, 30000)):
        with pytest.raises(Image.DecompressionBombError):  # PIL reads the declared size
            Image.open(io.BytesIO(data))


@pytest.mark.parametrize("width, height", [(9000, 9000), (10000, 10000), (30000, 30000)])
def test_pixel_limit_is_checked_before_decoding(width, height, monkeypatch):
    """open_rgb refuses from the header alone: PIL's decoder (ImageFile.load) never runs."""
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    open_rgb(CELL.read_bytes())
    open_rgb(png_bomb(70, 45))
    assert set(decoded) == {Image.open(CELL).size, (70, 45)}  # the spy sees normal decodes, JPEG and PNG
    decoded.clear()
    with pytest.raises(UnreadableImage, match="too many pixels"):
        open_rgb(png_bomb(width, height))
    assert decoded == []


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@contextmanager
def peak_growth(pid: int):
    """Yields a dict; after the block, its "mb" is the process's peak RSS during the block minus its
    RSS just before. Writing 5 to clear_refs resets the kernel's high-water mark (VmHWM) to the
    current RSS; where that is refused ("exact" False) the old high-water mark is the baseline,
    which can only underestimate the growth."""
    before = _status_kb(pid, "VmRSS")
    result: dict = {"exact": True}
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        before = _status_kb(pid, "VmHWM")
        result["exact"] = False
    yield result
    result["peak_mb"] = _status_kb(pid, "VmHWM") / 1024
    result["mb"] = result["peak_mb"] - before / 1024


@pytest.fixture(scope="module")
def server():
    with serve_load.running_server() as srv:
        # warm up: the first prediction allocates the model's working memory
        r = httpx.post(srv.url + "/predict", files=[("files", (CELL.name, CELL.read_bytes()))], timeout=60)
        assert r.status_code == 200, r.text
        yield srv
        assert srv.process.poll() is None, "the server died"


def upload(name: str, data: bytes, field: str = "files"):
    return [(field, (name, data, "application/octet-stream"))]


@pytest.mark.slow
def test_oversize_upload_is_413_without_reading_it(server):
    body = b"\xff" * (DEFAULT_MAX_UPLOAD_BYTES + 2**20)
    with peak_growth(server.process.pid) as peak:
        r = httpx.post(server.url + "/predict", files=upload("big.jpg", body), timeout=60)
    assert r.status_code == 413
    assert (
        r.json()["detail"]
        == f"upload too large: more than {LIMIT_MB} MB in one request (server limit --max-upload-mb {LIMIT_MB})"
    )
    assert peak["mb"] < MEMORY_BOUND_MB - LIMIT_MB  # refused on its Content-Length: the body is never buffered
    print(
        f"\noversize upload ({len(body) / 2**20:.0f} MB, Content-Length): "
        f"server peak RSS {peak['peak_mb']:.0f} MB, +{peak['mb']:.1f} MB"
    )


@pytest.mark.slow
def test_oversize_upload_streamed_without_length_is_413(server):
    """No Content-Length (chunked): the server reads up to the limit, then stops and answers 413."""
    chunk = b"\xff" * 2**20

    def body():
        for _ in range(LIMIT_MB + 5):
            yield chunk

    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    with peak_growth(server.process.pid) as peak:
        r = httpx.post(server.url + "/predict", content=body(), headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["detail"].startswith(f"upload too large: more than {LIMIT_MB} MB")
    assert peak["mb"] < MEMORY_BOUND_MB
    print(
        f"\noversize upload ({LIMIT_MB + 5} MB, chunked): "
        f"server peak RSS {peak['peak_mb']:.0f} MB, +{peak['mb']:.1f} MB"
    )


BOMBS = {
    # the server's own limit (16 million pixels: the largest smear photograph it reads) stops it
    "bomb-9000.png": (
        lambda: png_bomb(9000, 9000),
        f"too many pixels (9000x9000 > {ServerLimits.max_pixels:,}); possible decompression bomb",
    ),
    # over PIL's MAX_IMAGE_PIXELS: PIL's DecompressionBombWarning, turned into an error, stops it in Image.open
    "bomb-10000.png": (
        lambda: png_bomb(10000, 10000),
        "too many pixels; possible decompression bomb "
        f"(Image size (100000000 pixels) exceeds limit of {Image.MAX_IMAGE_PIXELS} pixels",
    ),
    # over twice PIL's limit: PIL's DecompressionBombError stops it in Image.open
    "bomb-30000.png": (
        lambda: png_bomb(30000, 30000),
        "too many pixels; possible decompression bomb "
        f"(Image size (900000000 pixels) exceeds limit of {2 * Image.MAX_IMAGE_PIXELS} pixels",
    ),
    "bomb-30000.jpg": (
        lambda: jpeg_declaring(30000, 30000),
        "too many pixels; possible decompression bomb "
        f"(Image size (900000000 pixels) exceeds limit of {2 * Image.MAX_IMAGE_PIXELS} pixels",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BOMBS))
def test_decompression_bomb_is_422_and_not_decoded(server, name):
    make, reason = BOMBS[name]
    data = make()
    assert len(data) < 1_000_000
    with peak_growth(server.process.pid) as peak:
        r = httpx.post(server.url + "/predict", files=upload(name, data), timeout=60)
        assert r.status_code == 422
        assert r.json()["detail"].startswith(f"no readable image in the upload: '{name}': {reason}")
        r = httpx.post(server.url + "/explain", files=upload(name, data, field="file"), timeout=60)
        assert r.status_code == 422 and r.json()["detail"].startswith(f"'{name}': {reason}")
        # beside a good image: 200, the bomb listed under `unreadable`
        r = httpx.post(
            server.url + "/predict", files=upload(CELL.name, CELL.read_bytes()) + upload(name, data), timeout=60
        )
        assert r.status_code == 200
        assert [p["path"] for p in r.json()["predictions"]] == [CELL.name]
        [bad] = r.json()["unreadable"]
        assert bad["path"] == name and bad["reason"].startswith(reason)
    assert peak["mb"] < MEMORY_BOUND_MB
    print(f"\n{name} ({len(data) / 1000:.0f} KB): server peak RSS {peak['peak_mb']:.0f} MB, +{peak['mb']:.1f} MB")


@pytest.mark.slow
def test_memory_probe_sees_a_decoded_image(server):
    """Control: an image just under the pixel limit is decoded, and the probe above sees it."""
    data = png_bomb(
        3990, 3990
    )  # 15.9 million pixels, under the 16-million limit: 16 MB grey, 48 MB once converted to RGB
    with peak_growth(server.process.pid) as peak:
        r = httpx.post(server.url + "/predict", files=upload("big-but-allowed.png", data), timeout=60)
    assert (
        r.status_code == 200 and r.json()["counted"] + r.json()["ood_count"] == 1
    )  # classified (a flat grey field is OOD)
    if not peak["exact"]:
        pytest.skip("the kernel refused to reset the memory high-water mark (/proc/PID/clear_refs)")
    assert peak["mb"] > MEMORY_BOUND_MB
    print(f"\nbig-but-allowed.png (3990x3990, decoded): server peak RSS {peak['peak_mb']:.0f} MB, +{peak['mb']:.1f} MB")


UNREADABLE = {
    "not-an-image.jpg": (
        lambda: b"%PDF-1.4 this is a document, not a picture\n",
        "not an image (unrecognised content)",
    ),
    "empty.png": (lambda: b"", "empty file (0 bytes)"),
    "truncated.jpg": (lambda: CELL.read_bytes()[:2000], "truncated image data"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_upload_is_422_alone_and_listed_beside_a_good_one(server, name):
    make, reason = UNREADABLE[name]
    data = make()
    r = httpx.post(server.url + "/predict", files=upload(name, data), timeout=60)
    assert r.status_code == 422
    assert r.json()["detail"].startswith(f"no readable image in the upload: '{name}': {reason}")
    r = httpx.post(server.url + "/predict", files=upload(CELL.name, CELL.read_bytes()) + upload(name, data), timeout=60)
    assert r.status_code == 200
    body = r.json()
    assert [p["path"] for p in body["predictions"]] == [CELL.name] and sum(body["counts"].values()) == 1
    [bad] = body["unreadable"]
    assert bad["path"] == name and bad["reason"].startswith(reason)

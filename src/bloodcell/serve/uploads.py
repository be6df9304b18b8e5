"""Uploads out of a multipart/form-data body, parsed in memory: nothing a client sends becomes a file path, and a file
name is only cleaned to be echoed back."""

from __future__ import annotations

import functools
import inspect
import re

from fastapi import HTTPException

try:
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # python-multipart < 0.0.13 names its module `multipart`
    from multipart.multipart import MultipartParser, parse_options_header


def files_body_schema(content_type: str | None = None) -> dict:
    """OpenAPI's requestBody for one or more files in the multipart field `files` (FastAPI cannot infer it: the body
    is parsed by hand); `content_type` names what each part should be, e.g. "image/*"."""
    part = {
        "schema": {
            "type": "object",
            "required": ["files"],
            "properties": {"files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}},
        }
    }
    if content_type:
        part["encoding"] = {"files": {"contentType": content_type}}
    return {"required": True, "content": {"multipart/form-data": part}}


def parse_multipart(content_type: str, body: bytes, fields: tuple[str, ...], max_files: int) -> list[tuple[str, bytes]]:
    """(file name, content) of every part named in `fields`, in order; all in memory.

    Args:
        content_type: the request's Content-Type header (its boundary says where parts begin).
        body: the whole request body.
        fields: the form fields whose parts are uploads (others are skipped).
        max_files: more parts than this in `fields` is 413; parsing stops soon after this many parts of any field.

    Raises:
        HTTPException: 413 too many files, 400 a malformed body. A body that is not multipart gives [].
    """
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        return []
    parts = _PartCollector(max_files + 16)  # stop early; the exact count is checked below
    try:
        parser = MultipartParser(params[b"boundary"], parts.callbacks(), **_part_header_limit(MultipartParser))
        parser.write(body)
        parser.finalize()
    except _TooMany:
        raise HTTPException(413, f"too many files in one request (server limit {max_files})") from None
    except Exception as exc:  # python-multipart's MultipartParseError and friends
        raise HTTPException(400, f"malformed multipart body: {exc}") from None
    files = []
    for part in parts.parts:
        _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if name not in fields:
            continue
        filename = clean_name(disp.get(b"filename", b"").decode("utf-8", "replace")) or f"upload-{len(files) + 1}"
        files.append((filename, bytes(part["data"])))
    if len(files) > max_files:
        raise HTTPException(413, f"too many files: {len(files)} in one request (server limit {max_files})")
    return files


class _PartCollector:
    """python-multipart's callbacks, collecting each part's headers and data; _TooMany past `max_parts` parts."""

    def __init__(self, max_parts: int) -> None:
        self.max_parts = max_parts
        self.parts: list[dict] = []
        self._field = bytearray()
        self._value = bytearray()

    def callbacks(self) -> dict:
        return dict(
            on_part_begin=self.on_part_begin,
            on_header_field=self.on_header_field,
            on_header_value=self.on_header_value,
            on_header_end=self.on_header_end,
            on_part_data=self.on_part_data,
        )

    def on_part_begin(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise _TooMany()
        self.parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field.extend(data[start:end])

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value.extend(data[start:end])

    def on_header_end(self) -> None:
        self.parts[-1]["headers"][bytes(self._field).lower()] = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.parts[-1]["data"].extend(data[start:end])


@functools.lru_cache(maxsize=1)
def _part_header_limit(parser_class) -> dict:
    """A part's header holds the file name: python-multipart's 4 kB default refused a whole request over one long
    name (which clean_name cuts to 200 characters anyway). Older releases have no such limit and no such argument."""
    return {"max_header_size": 64 * 1024} if "max_header_size" in inspect.signature(parser_class).parameters else {}


class _TooMany(Exception):
    pass


def clean_name(name: str) -> str:
    """A file name fit to echo back: no control characters, at most 200 characters. Never a path."""
    return re.sub(r"[\x00-\x1f\x7f]", "", name).strip()[:200]

"""HTTP API and single-page UI around a Predictor (FastAPI).

    POST /predict   multipart field `files` (one or more images) -> the result object of Predictor
    POST /explain   multipart field `file` (or `files`), one image -> PNG Grad-CAM overlay
    GET  /health    status, model name, classes, whether the model has an OOD check, limits
    GET  /          the page (static/index.html); /static/* its script and style; /docs OpenAPI

Uploads are parsed in memory, never written to disk, and nothing a client sends becomes a file
path: file names are only echoed back. Content is judged by decoding it, never by name or type.

Status codes: 413 body over max_upload_bytes or more than max_files files; 422 no `files` field,
or no readable image among the uploads (the message names each file and why); 400 malformed
multipart body; 501 /explain on an ONNX model. When at least one upload is readable the answer is
200 and the others are listed under `unreadable`.
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from bloodcell.errors import shown
from bloodcell.serve.guards import HeavyGate, HostOriginGuard, declared_pixels, read_body
from bloodcell.serve.limits import ServerLimits

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = ServerLimits.max_upload_bytes
DEFAULT_MAX_FILES = ServerLimits.max_files
_MULTIPART_SCHEMA = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["files"],
                "properties": {"files": {"type": "array", "minItems": 1, "items": {"type": "string", "format": "binary"}}},
            },
            "encoding": {"files": {"contentType": "image/*"}},
        }
    },
}
_EXPLAIN_SCHEMA = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {"type": "object", "required": ["file"], "properties": {"file": {"type": "string", "format": "binary"}}},
            "encoding": {"file": {"contentType": "image/*"}},
        }
    },
}


class Prediction(BaseModel):
    path: str = Field(description="the uploaded file's name, echoed back (never used as a path)")
    label: str
    probabilities: dict[str, float] = Field(description="calibrated probability per class")
    confidence: float
    review: bool = Field(description="confidence below the model's review threshold")
    ood: bool | None = Field(
        description="the image looks unlike the cells the model was trained on (OOD score above the model's threshold) "
        "and is not counted; null when the model has no OOD score"
    )
    ood_score: float | None = Field(description="the OOD score (higher: less like the training cells); null without an OOD score")


class CellPrediction(Prediction):
    input: str | None = Field(None, description="'cell': the image was read as one cell crop")
    input_reason: str | None = Field(None, description="why it was read as a cell (auto decides per image)")


class FieldCell(BaseModel):
    kind: str = Field(description="rbc, wbc or platelet")
    box: list[float] = Field(description="x0, y0, x1, y1 in the photograph's pixels")
    score: float = Field(description="the detector's score for this box")
    path: str | None = Field(None, description="white cells: '<photograph>#wbc<k>'")
    label: str | None = Field(None, description="white cells: the classifier's class")
    probabilities: dict[str, float] | None = None
    confidence: float | None = None
    review: bool | None = None
    ood: bool | None = None
    ood_score: float | None = None
    crop_side: float | None = Field(None, description="side in pixels of the square the classifier saw")


class FieldProblem(BaseModel):
    code: str = Field(description="dark, overexposed, panorama, magnification, few_red_cells or no_cells")
    message: str = Field(description="one sentence: what was seen, with the measured number, and what to do")
    severe: bool = Field(description="the counts mean nothing and are withheld")
    value: float = Field(description="the number measured (median brightness, share of white, aspect, red-cell side...)")


class FieldResult(BaseModel):
    path: str
    input: str = Field(description="'field': read as a smear photograph")
    input_reason: str
    size: list[int] = Field(description="width, height in pixels")
    cells: list[FieldCell]
    counts: dict[str, int] | None = Field(description="cells found per kind: rbc, wbc, platelet; null when withheld")
    wbc_classes: dict[str, int] | None = Field(description="white cells per class (OOD ones left out); null when withheld")
    scale: str = Field(description="what set the crop size: the red cells' median size, or the white cells'")
    note: str = Field(description="'no cells found[: why]', or the severe problem that withheld the counts; '' otherwise")
    problems: list[FieldProblem] = Field(default_factory=list, description="what the checks found (docs/fields.md)")
    withheld: bool = Field(False, description="the counts were withheld: a severe problem makes them meaningless")


class FieldSummary(BaseModel):
    photos: int = Field(description="photographs counted (those withheld left out)")
    withheld: int = Field(0, description="photographs whose counts were withheld")
    totals: dict[str, int]
    per_photo: dict[str, float]
    wbc_counted: int
    wbc_ood: int
    wbc_review: int
    differential: dict[str, int]
    differential_percent: dict[str, float]
    flags: list[str]


class UnreadableUpload(BaseModel):
    path: str
    reason: str


class PredictResult(BaseModel):
    """The result object of Predictor.predict_images (docs/inference.md)."""

    predictions: list[CellPrediction]
    counted: int = Field(description="images the counts rest on: all classified images minus those flagged OOD")
    ood_count: int = Field(description="images flagged OOD and therefore not counted")
    ood_check: bool = Field(description="whether the model has an OOD score")
    counts: dict[str, int] = Field(description="cells per class, OOD images left out")
    percent: dict[str, float]
    wbc_percent: dict[str, float]
    flags: list[str]
    verdict: dict | None = Field(None, description="when most images look unlike every lab the model was trained on: kind, images, "
                                 "ood_count, ood_fraction, counted, advice, message (also the first flag); null otherwise")
    unreadable: list[UnreadableUpload]
    fields: list[FieldResult] = Field(default_factory=list, description="smear photographs: every cell found, with its box")
    field_summary: FieldSummary | None = Field(None, description="totals and WBC differential over all photographs")


class Health(BaseModel):
    status: str
    model: str
    backend: str
    classes: list[str]
    input_size: int
    temperature: float
    review_threshold: float
    ood_check: bool = Field(description="whether the model has an OOD score: images unlike its training cells are flagged and not counted")
    ood_threshold: float | None = Field(description="OOD score above which an image is flagged; null without an OOD score")
    explain: bool
    max_upload_bytes: int
    max_files: int
    max_pixels: int
    max_request_pixels: int
    version: str
    review: bool = Field(False, description="the review workstation is on: samples kept under /api (serve.review_api)")


class ErrorMessage(BaseModel):
    detail: str = Field(description="one line saying what is wrong, naming the file where there is one")


# The refusals the upload endpoints answer with (see the module docstring); documented so that
# clients, and schemathesis, can tell a refusal from a fault.
_UPLOAD_ERRORS = {
    400: {"model": ErrorMessage, "description": "malformed multipart body"},
    413: {"model": ErrorMessage, "description": "body over the upload limit, or too many files"},
    422: {"model": ErrorMessage, "description": "no upload in the expected field, or no readable image among them"},
}
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; connect-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def create_app(
    predictor,
    max_upload_bytes: int | None = None,
    max_pixels: int | None = None,
    max_files: int | None = None,
    detector=None,
    data_dir: str | Path | None = None,
    limits: ServerLimits | None = None,
):
    """A FastAPI app serving `predictor` (a bloodcell.infer.Predictor) within `limits` (serve.limits; the three
    limits named here, when given, replace those of `limits`).

    detector: a FieldDetector, its folder, or None for the bundled one (loaded on the first photograph).
    data_dir: the review workstation's folder (its SQLite database): then / is the workstation, /classify the
    one-off page, and /api the review API (serve.review_api). None: / is the one-off page, no workstation."""
    from bloodcell import __version__

    given = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_files": max_files}
    limits = replace(limits or ServerLimits(), **{k: v for k, v in given.items() if v is not None})
    max_upload_bytes, max_pixels, max_files = limits.max_upload_bytes, limits.max_pixels, limits.max_files
    heavy = HeavyGate(limits.heavy_workers, limits.heavy_queue, limits.retry_after())

    app = FastAPI(
        title="bloodcell",
        version=__version__,
        description="Classify images of single peripheral blood cells. "
        f"Model: {predictor.model_name} ({len(predictor.class_names)} classes).",
    )
    loaded: list = []
    lock = threading.Lock()

    def detector_source():
        """The detector, loaded once on the first photograph (a server of single cells never pays for it)."""
        from bloodcell.detect.base import FieldDetector
        from bloodcell.detect.registry import load_detector

        with lock:
            if not loaded:
                loaded.append(detector if isinstance(detector, FieldDetector) else load_detector(detector))
            return loaded[0]


    async def read_uploads(request: Request, fields: tuple[str, ...]) -> list[tuple[str, bytes]]:
        body = await read_body(request, max_upload_bytes, limits.body_idle_seconds, limits.body_seconds)
        files = _parse_multipart(request.headers.get("content-type", ""), body, fields, max_files)
        if not files:
            raise HTTPException(422, f"no files: send images as multipart/form-data in the field '{fields[0]}'")
        return files

    def within_pixel_budget(files: list[tuple[str, bytes]]) -> list[tuple[int, int] | None]:
        """Each file's declared size; 413 when those the server would decode hold more pixels than the budget."""
        sizes = [declared_pixels(data) for _, data in files]
        total = sum(w * h for w, h in filter(None, sizes) if w * h <= max_pixels)
        if total > limits.max_request_pixels:
            raise HTTPException(413, f"the images of this request hold {total / 1e6:.1f} million pixels together, over the "
                                     f"server's budget of {limits.max_request_pixels / 1e6:g} million per request "
                                     "(--max-request-pixels): send fewer or smaller images at once")
        return sizes

    def is_heavy(sizes: list[tuple[int, int] | None], input_kind: str) -> bool:
        """Smear photographs (read as fields) cost a detector pass and up to 0.5 GB: they go through the heavy gate."""
        from bloodcell.infer.fields import CROP_MAX_ASPECT

        if input_kind == "cell":
            return False
        if input_kind == "field":
            return True
        return any(s and max(s) > CROP_MAX_ASPECT * min(s) for s in sizes)

    async def classify_upload(files, input_kind: str, work, *args):
        """Run `work(files, input_kind, *args)` in a thread, through the heavy gate when it reads photographs."""
        sizes = within_pixel_budget(files)
        if is_heavy(sizes, input_kind):
            async with heavy:
                return await run_in_threadpool(work, files, input_kind, *args)
        return await run_in_threadpool(work, files, input_kind, *args)

    @app.get("/health")
    def health() -> Health:
        """Liveness plus what the page needs to know about the model and the limits."""
        return {
            "status": "ok",
            "model": predictor.model_name,
            "backend": predictor.backend,
            "classes": predictor.class_names,
            "input_size": predictor.input_size,
            "temperature": predictor.temperature,
            "review_threshold": predictor.review_threshold,
            "ood_check": predictor.has_ood,
            "ood_threshold": predictor.ood_threshold,
            "explain": predictor.model is not None,
            "max_upload_bytes": max_upload_bytes,
            "max_files": max_files,
            "max_pixels": max_pixels,
            "max_request_pixels": limits.max_request_pixels,
            "version": __version__,
            "review": data_dir is not None,
        }

    @app.post("/predict", openapi_extra={"requestBody": _MULTIPART_SCHEMA}, responses={
        **_UPLOAD_ERRORS, 503: {"model": ErrorMessage, "description": "input=field but the server has no usable field detector"}})
    async def predict(
        request: Request,
        input: str = Query("auto", json_schema_extra={"enum": ["auto", "cell", "field"]},
                           description="auto (decide per image), cell or field"),
    ) -> PredictResult:
        """Classify one or more images (multipart field `files`); see docs/inference.md for the result.

        input: auto (decide per image), cell (each image is one cell crop) or field (a smear photograph: every
        cell found with its box, the white ones classified, counts; docs/fields.md)."""
        from bloodcell.errors import ModelError
        from bloodcell.infer.fields import INPUT_KINDS, predict_mixed

        if input not in INPUT_KINDS or len(request.query_params.getlist("input")) > 1:  # our one-line 422
            raise HTTPException(422, f"input must be given once, one of {', '.join(INPUT_KINDS)}; got "
                                     f"{', '.join(shown(v) for v in request.query_params.getlist('input'))}")

        files = await read_uploads(request, ("files",))
        try:
            result = await classify_upload(files, input, lambda f, kind: predict_mixed(
                predictor, f, kind, detector_source, 32, False, max_pixels))
        except ModelError as exc:  # ?input=field on a server without a usable detector
            raise HTTPException(503, f"cannot read smear fields: {exc}") from None
        if not result["predictions"] and not result["fields"]:
            bad = "; ".join(f"'{u['path']}': {u['reason']}" for u in result["unreadable"])
            raise HTTPException(422, f"no readable image in the upload: {bad}")
        return result  # non-finite OOD scores leave as null (pydantic's JSON)

    @app.post("/explain", openapi_extra={"requestBody": _EXPLAIN_SCHEMA}, response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay (PNG)"}, **_UPLOAD_ERRORS,
                         501: {"model": ErrorMessage, "description": "the server runs an ONNX model: no Grad-CAM"}})
    async def explain(request: Request) -> Response:
        """Grad-CAM overlay of one image (multipart field `file`) as a PNG."""
        from bloodcell.data.images import UnreadableImage
        from bloodcell.infer.explain import explain_bytes

        if predictor.model is None:
            raise HTTPException(501, "Grad-CAM needs the PyTorch model: start the server with --model RUN_DIR, not an .onnx file")
        files = await read_uploads(request, ("file", "files"))
        if len(files) != 1:
            raise HTTPException(422, f"/explain takes exactly one image, got {len(files)}")
        name, data = files[0]
        try:
            within_pixel_budget(files)
            async with heavy:
                png = await run_in_threadpool(explain_bytes, predictor, data, max_pixels)
        except UnreadableImage as exc:
            raise HTTPException(422, f"'{name}': {exc}") from None
        return Response(png, media_type="image/png")

    def page(name: str):
        return lambda: HTMLResponse((STATIC_DIR / name).read_text(encoding="utf-8"), headers=_PAGE_HEADERS)

    if data_dir is None:
        app.get("/", response_class=HTMLResponse, include_in_schema=False)(page("index.html"))
    else:
        _mount_review(app, predictor, data_dir, read_uploads, detector_source, max_pixels, max_files, classify_upload)
        app.get("/", response_class=HTMLResponse, include_in_schema=False)(page("review.html"))
        app.get("/classify", response_class=HTMLResponse, include_in_schema=False)(page("index.html"))

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    if limits.allowed_hosts is not None:
        app.add_middleware(HostOriginGuard, hosts=limits.allowed_hosts)
    return app


async def _validation_error(request: Request, exc: RequestValidationError):
    """A request FastAPI cannot validate: one line naming each key (at most three), not pydantic's list."""
    from fastapi.responses import JSONResponse

    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}" + (f" (got {shown(error['input'])})" if error.get("input") is not None else ""))
    return JSONResponse({"detail": "; ".join(parts)}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException):
    """FastAPI's answer, except that a 405 lists every method of the path: Starlette names only those of the first
    route that matched it (GET and POST of /api/samples are two routes)."""
    from fastapi.exception_handlers import http_exception_handler
    from starlette.routing import Match

    if exc.status_code == 405:
        allowed = set()
        for route in request.app.routes:
            if getattr(route, "methods", None) and route.matches(request.scope)[0] != Match.NONE:
                allowed |= route.methods
        exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(allowed))}
    return await http_exception_handler(request, exc)


def _mount_review(app, predictor, data_dir, read_uploads, detector_source, max_pixels: int, max_files: int,
                  classify_upload) -> None:
    """The review workstation's API over a ReviewStore in `data_dir` (serve.review_api)."""
    import hashlib
    import json

    from bloodcell import __version__
    from bloodcell.review.ingest import classify_uploads
    from bloodcell.review.records import ReviewError
    from bloodcell.review.store import ReviewStore
    from bloodcell.serve.review_api import review_error_handler, review_router

    store = ReviewStore(data_dir, predictor.model_name, predictor.class_names)
    # the model's version: a digest of its model.json (which carries its weights' digests), shown on every report
    digest = hashlib.sha256(json.dumps(predictor.metadata, sort_keys=True, default=str).encode()).hexdigest()[:12]
    model = {"name": predictor.model_name, "version": digest, "bloodcell": __version__}

    async def classify(files, input_kind):
        return await classify_upload(files, input_kind, lambda f, kind: classify_uploads(
            predictor, f, kind, detector_source, max_pixels))

    app.state.review_store = store
    app.state.model_identity = model
    app.include_router(review_router(store, classify, model, max_files, lambda request: read_uploads(request, ("files",))))
    app.add_exception_handler(ReviewError, review_error_handler)


def _parse_multipart(content_type: str, body: bytes, fields: tuple[str, ...], max_files: int) -> list[tuple[str, bytes]]:
    """(file name, content) of every part named in `fields`, in order; all in memory."""
    try:
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:  # python-multipart < 0.0.13 names its module `multipart`
        from multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data" or not params.get(b"boundary"):
        return []
    parts: list[dict] = []
    field_name = bytearray()
    field_value = bytearray()

    def on_part_begin():
        if len(parts) >= max_files + 16:  # stop early; the exact count is checked below
            raise _TooMany()
        parts.append({"headers": {}, "data": bytearray()})

    def on_header_field(data, start, end):
        field_name.extend(data[start:end])

    def on_header_value(data, start, end):
        field_value.extend(data[start:end])

    def on_header_end():
        parts[-1]["headers"][bytes(field_name).lower()] = bytes(field_value)
        field_name.clear()
        field_value.clear()

    def on_part_data(data, start, end):
        parts[-1]["data"].extend(data[start:end])

    callbacks = dict(
        on_part_begin=on_part_begin,
        on_header_field=on_header_field,
        on_header_value=on_header_value,
        on_header_end=on_header_end,
        on_part_data=on_part_data,
    )
    try:
        parser = MultipartParser(params[b"boundary"], callbacks, **_part_header_limit(MultipartParser))
        parser.write(body)
        parser.finalize()
    except _TooMany:
        raise HTTPException(413, f"too many files in one request (server limit {max_files})") from None
    except Exception as exc:  # python-multipart's MultipartParseError and friends
        raise HTTPException(400, f"malformed multipart body: {exc}") from None
    files = []
    for part in parts:
        _, disp = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disp.get(b"name", b"").decode("utf-8", "replace")
        if name not in fields:
            continue
        filename = _clean_name(disp.get(b"filename", b"").decode("utf-8", "replace")) or f"upload-{len(files) + 1}"
        files.append((filename, bytes(part["data"])))
    if len(files) > max_files:
        raise HTTPException(413, f"too many files: {len(files)} in one request (server limit {max_files})")
    return files


@functools.lru_cache(maxsize=1)
def _part_header_limit(parser_class) -> dict:
    """A part's header holds the file name: python-multipart's 4 kB default refused a whole request over one long
    name (which _clean_name cuts to 200 characters anyway). Older releases have no such limit and no such argument."""
    import inspect

    return {"max_header_size": 64 * 1024} if "max_header_size" in inspect.signature(parser_class).parameters else {}


class _TooMany(Exception):
    pass


def _clean_name(name: str) -> str:
    """A file name fit to echo back: no control characters, at most 200 characters. Never a path."""
    return re.sub(r"[\x00-\x1f\x7f]", "", name).strip()[:200]

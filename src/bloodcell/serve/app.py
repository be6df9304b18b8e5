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

import hashlib
import json
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from bloodcell import __version__
from bloodcell.data.images import UnreadableImage
from bloodcell.errors import ModelError, shown
from bloodcell.infer.explain import explain_bytes
from bloodcell.infer.fields import CROP_MAX_ASPECT, INPUT_KINDS, predict_mixed
from bloodcell.infer.predictor import ONNX_SIDECAR_SUFFIX
from bloodcell.detect.base import FieldDetector
from bloodcell.detect.registry import load_detector
from bloodcell.models.metadata import METADATA_FILE
from bloodcell.models.seal import is_sealed, read_seal
from bloodcell.review.ingest import classify_uploads
from bloodcell.review.store import ReviewStore
from bloodcell.serve import review_api
from bloodcell.serve.guards import HeavyGate, HostOriginGuard, declared_pixels, read_body
from bloodcell.serve.limits import ServerLimits
from bloodcell.serve.schemas import ErrorMessage, Health, PredictResult
from bloodcell.serve.uploads import files_body_schema, parse_multipart

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_MAX_UPLOAD_BYTES = ServerLimits.max_upload_bytes
DEFAULT_MAX_FILES = ServerLimits.max_files
_MULTIPART_SCHEMA = files_body_schema("image/*")
_EXPLAIN_SCHEMA = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["file"],
                "properties": {"file": {"type": "string", "format": "binary"}},
            },
            "encoding": {"file": {"contentType": "image/*"}},
        }
    },
}

# The refusals the upload endpoints answer with (see the module docstring); documented so that
# clients, and schemathesis, can tell a refusal from a fault.
_UPLOAD_ERRORS = {
    400: {"model": ErrorMessage, "description": "malformed multipart body"},
    413: {"model": ErrorMessage, "description": "body over the upload limit, or too many files"},
    422: {"model": ErrorMessage, "description": "no upload in the expected field, or no readable image among them"},
}
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'",
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
    """A FastAPI app serving `predictor` within `limits`.

    Args:
        predictor: a bloodcell.infer.Predictor.
        max_upload_bytes, max_pixels, max_files: when given, replace those of `limits`.
        detector: a FieldDetector, its folder, or None for the bundled one (loaded on the first photograph).
        data_dir: the review workstation's folder (its SQLite database): then / is the workstation, /classify the
            one-off page, and /api the review API (serve.review_api). None: / is the one-off page, no workstation.
        limits: serve.limits.ServerLimits; None: its defaults.
    """
    given = {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_files": max_files}
    limits = replace(limits or ServerLimits(), **{k: v for k, v in given.items() if v is not None})
    app = FastAPI(
        title="bloodcell",
        version=__version__,
        description="Classify images of single peripheral blood cells. "
        f"Model: {predictor.model_name} ({len(predictor.class_names)} classes).",
    )
    app.state.service = service = Service(predictor, limits, detector, review=data_dir is not None)
    app.include_router(router)
    if data_dir is None:
        _add_page(app, "/", "index.html")
    else:
        _mount_review(app, service, data_dir)
        _add_page(app, "/", "review.html")
        _add_page(app, "/classify", "index.html")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    if limits.allowed_hosts is not None:
        app.add_middleware(HostOriginGuard, hosts=limits.allowed_hosts)
    return app


@dataclass
class Service:
    """What the routes of one app share: the predictor, the limits, the gate for heavy work and the field detector."""

    predictor: Any
    limits: ServerLimits
    detector: Any = None  # a FieldDetector, its folder, or None for the bundled one
    review: bool = False  # the review workstation is mounted
    heavy: HeavyGate = field(init=False)
    _field_detector: FieldDetector | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        self.heavy = HeavyGate(self.limits.heavy_workers, self.limits.heavy_queue, self.limits.retry_after())

    def field_detector(self) -> FieldDetector:
        """The detector, loaded once on the first photograph (a server of single cells never pays for it)."""
        with self._lock:
            if self._field_detector is None:
                given = self.detector
                self._field_detector = given if isinstance(given, FieldDetector) else load_detector(given)
            return self._field_detector

    async def read_uploads(self, request: Request, fields: tuple[str, ...] = ("files",)) -> list[tuple[str, bytes]]:
        """(name, bytes) of the uploads in the multipart `fields`, within the upload limits; 422 when there is none."""
        limits = self.limits
        body = await read_body(request, limits.max_upload_bytes, limits.body_idle_seconds, limits.body_seconds)
        files = parse_multipart(request.headers.get("content-type", ""), body, fields, limits.max_files)
        if not files:
            raise HTTPException(422, f"no files: send images as multipart/form-data in the field '{fields[0]}'")
        return files

    def within_pixel_budget(self, files: list[tuple[str, bytes]]) -> list[tuple[int, int] | None]:
        """Each file's declared size; 413 when those the server would decode hold more pixels than the budget."""
        sizes = [declared_pixels(data) for _, data in files]
        total = sum(w * h for w, h in filter(None, sizes) if w * h <= self.limits.max_pixels)
        budget = self.limits.max_request_pixels
        if total > budget:
            raise HTTPException(
                413,
                f"the images of this request hold {total / 1e6:.1f} million pixels together, over "
                f"the server's budget of {budget / 1e6:g} million per request "
                "(--max-request-pixels): send fewer or smaller images at once",
            )
        return sizes

    async def classify_upload(self, files, input_kind: str, work: Callable, *args):
        """Run `work(files, input_kind, *args)` in a thread, through the heavy gate when it reads photographs."""
        sizes = self.within_pixel_budget(files)
        if _is_heavy(sizes, input_kind):
            async with self.heavy:
                return await run_in_threadpool(work, files, input_kind, *args)
        return await run_in_threadpool(work, files, input_kind, *args)

    def predict(self, files, input_kind: str) -> dict:
        """/predict's answer (infer.fields.predict_mixed); run it through classify_upload."""
        return predict_mixed(self.predictor, files, input_kind, self.field_detector, 32, False, self.limits.max_pixels)

    async def classify_for_review(self, files, input_kind: str) -> tuple[list, list]:
        """(uploads, unreadable) for the review store (review.ingest.classify_uploads), within the limits."""
        return await self.classify_upload(
            files,
            input_kind,
            lambda f, kind: classify_uploads(self.predictor, f, kind, self.field_detector, self.limits.max_pixels),
        )


def _is_heavy(sizes: list[tuple[int, int] | None], input_kind: str) -> bool:
    """Smear photographs (read as fields) cost a detector pass and up to 0.5 GB: they go through the heavy gate."""
    if input_kind == "cell":
        return False
    if input_kind == "field":
        return True
    return any(s and max(s) > CROP_MAX_ASPECT * min(s) for s in sizes)


def _service(request: Request) -> Service:
    return request.app.state.service


router = APIRouter()


@router.get("/health")
def health(request: Request) -> Health:
    """Liveness plus what the page needs to know about the model and the limits."""
    service = _service(request)
    predictor, limits = service.predictor, service.limits
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
        "max_upload_bytes": limits.max_upload_bytes,
        "max_files": limits.max_files,
        "max_pixels": limits.max_pixels,
        "max_request_pixels": limits.max_request_pixels,
        "version": __version__,
        "review": service.review,
    }


@router.post(
    "/predict",
    openapi_extra={"requestBody": _MULTIPART_SCHEMA},
    responses={
        **_UPLOAD_ERRORS,
        503: {"model": ErrorMessage, "description": "input=field but the server has no usable field detector"},
    },
)
async def predict(
    request: Request,
    input: str = Query(
        "auto",
        json_schema_extra={"enum": ["auto", "cell", "field"]},
        description="auto (decide per image), cell or field",
    ),
) -> PredictResult:
    """Classify one or more images (multipart field `files`); see docs/inference.md for the result.

    input: auto (decide per image), cell (each image is one cell crop) or field (a smear photograph: every
    cell found with its box, the white ones classified, counts; docs/fields.md)."""
    if input not in INPUT_KINDS or len(request.query_params.getlist("input")) > 1:  # our one-line 422
        raise HTTPException(
            422,
            f"input must be given once, one of {', '.join(INPUT_KINDS)}; got "
            f"{', '.join(shown(v) for v in request.query_params.getlist('input'))}",
        )
    service = _service(request)
    files = await service.read_uploads(request, ("files",))
    try:
        result = await service.classify_upload(files, input, service.predict)
    except ModelError as exc:  # ?input=field on a server without a usable detector
        raise HTTPException(503, f"cannot read smear fields: {exc}") from None
    if not result["predictions"] and not result["fields"]:
        bad = "; ".join(f"'{u['path']}': {u['reason']}" for u in result["unreadable"])
        raise HTTPException(422, f"no readable image in the upload: {bad}")
    return result  # non-finite OOD scores leave as null (pydantic's JSON)


@router.post(
    "/explain",
    openapi_extra={"requestBody": _EXPLAIN_SCHEMA},
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}}, "description": "Grad-CAM overlay (PNG)"},
        **_UPLOAD_ERRORS,
        501: {"model": ErrorMessage, "description": "the server runs an ONNX model: no Grad-CAM"},
    },
)
async def explain(request: Request) -> Response:
    """Grad-CAM overlay of one image (multipart field `file`) as a PNG."""
    service = _service(request)
    if service.predictor.model is None:
        raise HTTPException(
            501, "Grad-CAM needs the PyTorch model: start the server with --model RUN_DIR, not an .onnx file"
        )
    files = await service.read_uploads(request, ("file", "files"))
    if len(files) != 1:
        raise HTTPException(422, f"/explain takes exactly one image, got {len(files)}")
    name, data = files[0]
    try:
        service.within_pixel_budget(files)
        async with service.heavy:
            png = await run_in_threadpool(explain_bytes, service.predictor, data, service.limits.max_pixels)
    except UnreadableImage as exc:
        raise HTTPException(422, f"'{name}': {exc}") from None
    return Response(png, media_type="image/png")


def _add_page(app: FastAPI, path: str, name: str) -> None:
    """GET `path`: static/`name`, read at each request (so an edited page shows on reload), with the page headers."""

    def page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / name).read_text(encoding="utf-8"), headers=_PAGE_HEADERS)

    app.get(path, response_class=HTMLResponse, include_in_schema=False)(page)


async def _validation_error(request: Request, exc: RequestValidationError):
    """A request FastAPI cannot validate: one line naming each key (at most three), not pydantic's list."""
    parts = []
    for error in exc.errors()[:3]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        got = f" (got {shown(error['input'])})" if error.get("input") is not None else ""
        parts.append(f"{where}: {error.get('msg', 'invalid')}{got}")
    return JSONResponse({"detail": "; ".join(parts)}, status_code=422)


async def _http_error(request: Request, exc: StarletteHTTPException):
    """FastAPI's answer, except that a 405 lists every method of the path: Starlette names only those of the first
    route that matched it (GET and POST of /api/samples are two routes)."""
    if exc.status_code == 405:
        exc.headers = {**(exc.headers or {}), "Allow": ", ".join(sorted(_allowed_methods(request.app, request.scope)))}
    return await http_exception_handler(request, exc)


_HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed_methods(app: FastAPI, scope: dict) -> set[str]:
    """The methods of every route of `app` whose path matches the request's."""
    allowed: set[str] = set()
    for route in app.routes:
        if getattr(route, "methods", None):
            if route.matches(scope)[0] != Match.NONE:
                allowed |= route.methods
        elif not isinstance(route, Mount):
            # an included router (FastAPI keeps it as one route, with no methods of its own): asked per method
            allowed |= {m for m in _HTTP_METHODS if route.matches({**scope, "method": m})[0] == Match.FULL}
    return allowed


def _mount_review(app: FastAPI, service: Service, data_dir: str | Path) -> None:
    """The review workstation's API over a ReviewStore in `data_dir` (serve.review_api)."""
    predictor = service.predictor
    store = ReviewStore(data_dir, predictor.model_name, predictor.class_names)
    model = {"name": predictor.model_name, "version": model_version(predictor), "bloodcell": __version__}
    app.state.review_store = store
    app.state.model_identity = model
    review_api.mount(app, review_api.ReviewContext(store, service.classify_for_review, model, service.read_uploads))


def model_version(predictor) -> str:
    """The model's version, shown on every report: the SHA-256 that its folder's SEAL.json records for the
    description it was read from (model.json, or an ONNX export's sidecar), so that one model has one identity
    wherever it is named. A predictor from no sealed folder (built in memory): 12 hex digits of a digest of its
    metadata."""
    if predictor.source:
        description = _description_file(Path(predictor.source))
        if is_sealed(description.parent):
            entry = read_seal(description.parent)["files"].get(description.name)
            if entry is not None:
                return entry["sha256"]
    return hashlib.sha256(json.dumps(predictor.metadata, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _description_file(source: Path) -> Path:
    """The file a predictor loaded from `source` read its description from, as infer.Predictor.load chooses it: an
    ONNX export's sidecar, a STEM.json beside STEM.safetensors, else the model.json of the folder."""
    if source.is_dir():
        return source / METADATA_FILE
    beside = (
        source.with_name(source.name + ONNX_SIDECAR_SUFFIX)
        if source.suffix.lower() == ".onnx"
        else source.with_suffix(".json")
    )
    return beside if beside.is_file() else source.parent / METADATA_FILE

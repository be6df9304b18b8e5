"""The review workstation's JSON API: samples, their uploads and cells, corrections, the count, sign-off, the printable
report and the export of corrected cells (bloodcell.review). Mounted by create_app under /api when the server has a
data folder; documented with the rest at /docs.

Every change names who makes it (`who`: the reviewer's name or initials; the page keeps it per browser) and, where
two tabs could collide, the revision it was made on (`rev`): a stale change is refused with 409 and what changed.
Errors are one line in `detail`: 404 no such sample or cell, 409 a stale change or a signed-off sample, 422 a bad
value (the message names the key), 507 the disk is full (the change was not saved; nothing saved before is lost).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Awaitable, Callable, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from bloodcell.review.export import export_zip
from bloodcell.review.ingest import THUMB_SIDE
from bloodcell.review.records import LAB_CLASS, MAX_NOTE, MAX_REASON, MAX_WHO, SAMPLE_ID, ReviewError, check_who
from bloodcell.review.report import render_report
from bloodcell.review.store import ReviewStore
from bloodcell.serve.uploads import files_body_schema


class ErrorDetail(BaseModel):
    detail: str = Field(description="one line: what is wrong, naming the key, sample or cell")


_ERRORS = {
    code: {"model": ErrorDetail, "description": what}
    for code, what in {
        400: "a body that cannot be parsed (not JSON; broken multipart)",
        404: "no such sample or cell",
        409: "changed since read, or signed off",
        422: "a bad value",
        507: "disk full: the change was not saved",
    }.items()
}
# Routes that answer HTML, a zip or an image still answer errors in JSON: said so explicitly, as FastAPI would
# document them in the route's own media type.
_ERRORS_IN_JSON = {
    code: {
        "description": r["description"],
        "content": {"application/json": {"schema": ErrorDetail.model_json_schema()}},
    }
    for code, r in _ERRORS.items()
}


# The store checks every value itself (review.records); the schema says the same, so that clients can see it.
_PRINTABLE = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*$"
Who_ = Annotated[str, Field(description="the reviewer's name or initials", max_length=MAX_WHO, pattern=_PRINTABLE)]
_DATE = r"^\d{4}-\d{2}-\d{2}$"
SampleId = Annotated[str, Path(description="the lab's sample ID", pattern=f"^{SAMPLE_ID.pattern}$")]


class Body(BaseModel):
    """A request body: values of the documented types only (no 0 for a date, no "1" for a number), no unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid")


class NewSample(Body):
    sample_id: str = Field(
        description="the lab's ID: 1-64 letters, digits, '.', '_' or '-'",
        examples=["H26-00417"],
        pattern=f"^{SAMPLE_ID.pattern}$",
    )
    who: Who_
    date: str | None = Field(
        None,
        description="the sample's date, YYYY-MM-DD (default: today)",
        pattern=_DATE,
        json_schema_extra={"format": "date"},
    )
    note: str = Field("", description="free text", max_length=MAX_NOTE)


class SampleEdit(Body):
    who: Who_
    note: str | None = Field(None, max_length=MAX_NOTE)
    date: str | None = Field(None, pattern=_DATE, json_schema_extra={"format": "date"})
    wbc_count: float | None = Field(
        None, gt=0, lt=1000, description="the analyser's white-cell count, 10^9/L: gives absolute counts"
    )
    clear_wbc_count: bool = False


class Relabel(Body):
    label: str = Field(
        description="a model class, unidentified, smudge, artefact or one of the lab's classes (GET /api/labels)"
    )
    who: Who_
    rev: int | None = Field(
        None, description="the cell's revision the change was made on; a stale one is refused (409)"
    )


class Who(Body):
    who: Who_


class SignOff(Body):
    who: Who_
    rev: int | None = Field(
        None, description="the sample's revision the reviewer saw; refused (409) when it changed since"
    )


class Reopen(Body):
    who: Who_
    reason: str = Field(
        description="why the signed-off sample is changed; kept with the new version",
        max_length=MAX_REASON,
        pattern=_PRINTABLE,
    )


class LabClass(Body):
    name: str = Field(
        description="1-40 letters, digits, spaces, '_' or '-'",
        examples=["reactive lymphocyte"],
        pattern=f"^{LAB_CLASS.pattern}$",
    )
    kind: Literal["wbc", "other"] = Field("wbc", description="wbc: counted as a white cell; other: listed, not counted")


class Sample(BaseModel):
    sample_id: str
    date: str
    note: str
    wbc_count: float | None
    status: Literal["open", "signed"]
    version: int
    rev: int = Field(description="changes with every change to the sample; the page polls it to see another tab's work")
    created: str
    created_by: str
    uploads: int
    cells: int
    reviewed: int = Field(description="cells a person labelled or confirmed")
    ood_unreviewed: int
    unsure_unreviewed: int


class Cell(BaseModel):
    id: int
    upload: int
    name: str
    predicted: str = Field(description="the model's class")
    label: str = Field(description="the label now, corrections applied")
    probabilities: dict[str, float]
    confidence: float
    review: bool = Field(description="the model was unsure (below its review threshold)")
    ood: bool = Field(description="unlike the model's training cells: not counted until a person labels it")
    ood_score: float | None
    box: list[float] | None = Field(description="x0, y0, x1, y1 in its photograph; null for a single-cell upload")
    reviewed: bool = Field(description="a person labelled or confirmed it")
    rev: int
    sample_rev: int | None = Field(None, description="after a change: the sample's revision it left")


_IMMUTABLE = {"Cache-Control": "private, max-age=86400, immutable"}  # an image never changes under its id


@dataclass(frozen=True)
class ReviewContext:
    """What the review routes of one app work on (app.state.review)."""

    store: ReviewStore
    # classify(files, input_kind) -> awaitable (uploads, unreadable): review.ingest.classify_uploads bound to the
    # server's predictor, within its limits
    classify: Callable[[list, str], Awaitable[tuple[list, list]]]
    model: dict  # {'name', 'version', 'bloodcell'}: shown on every report
    # read_uploads(request) -> awaitable [(name, bytes)] within the upload limits
    read_uploads: Callable[[Request], Awaitable[list[tuple[str, bytes]]]]


def mount(app: FastAPI, context: ReviewContext) -> None:
    """Serve the review API under /api in `app`, over `context`."""
    app.state.review = context
    app.include_router(router)
    app.add_exception_handler(ReviewError, review_error_handler)


async def _context(request: Request) -> ReviewContext:  # async: no thread for a lookup
    return request.app.state.review


# The app's ReviewContext, passed to each route (FastAPI's dependency injection; no parameter of the API).
Review = Annotated[ReviewContext, Depends(_context)]
router = APIRouter(prefix="/api", tags=["review"], responses=_ERRORS)


@router.get("/labels")
def labels(review: Review) -> dict:
    """Every label a cell may be given, in the order the page numbers them (keys 1-9): the model's classes,
    unidentified, smudge, artefact, then the lab's own classes."""
    store = review.store
    return {"labels": store.labels(), "model_classes": store.classes, "lab_classes": store.lab_classes()}


@router.post("/labels")
def add_label(body: LabClass, review: Review) -> dict:
    """Add a class of the lab's own (kept in the database)."""
    review.store.add_lab_class(body.name, body.kind)
    return labels(review)


@router.get("/samples")
def samples(review: Review) -> list[dict]:
    """Every sample, newest first."""
    return review.store.samples()


@router.post("/samples", status_code=201)
def create_sample(body: NewSample, review: Review) -> Sample:
    return review.store.create_sample(body.sample_id, body.who, body.date, body.note)


@router.get("/samples/{sample_id}")
def sample(sample_id: SampleId, review: Review) -> Sample:
    return review.store.sample(sample_id)


@router.patch("/samples/{sample_id}")
def edit_sample(sample_id: SampleId, body: SampleEdit, review: Review) -> Sample:
    """Change the note, the date or the analyser's white-cell count (not on a signed-off sample)."""
    return review.store.update_sample(sample_id, body.who, body.note, body.date, body.wbc_count, body.clear_wbc_count)


@router.post("/samples/{sample_id}/uploads", openapi_extra={"requestBody": files_body_schema()})
async def upload(
    sample_id: SampleId,
    request: Request,
    review: Review,
    who: str = Query(..., description="who uploads", max_length=MAX_WHO, pattern=_PRINTABLE),
    input: str = Query("auto", json_schema_extra={"enum": ["auto", "cell", "field"]}),
) -> dict:
    """Add images to the sample (multipart field `files`): single cells or smear photographs, classified and kept.
    Answers the new cells' ids and the files that could not be read."""
    check_who(who)
    review.store.require_open(sample_id)  # 404 / 409 before any work
    if input not in ("auto", "cell", "field"):
        raise HTTPException(422, "input must be one of auto, cell, field")
    files = await review.read_uploads(request)
    uploads, unreadable = await review.classify(files, input)
    if not uploads:
        bad = "; ".join(f"'{u['path']}': {u['reason']}" for u in unreadable)
        raise HTTPException(422, f"no readable image in the upload: {bad}")
    added = await run_in_threadpool(review.store.add_uploads, sample_id, uploads)  # the whole request, or none of it
    return {"cells": [i for a in added for i in a["cells"]], "uploads": len(uploads), "unreadable": unreadable}


@router.get("/samples/{sample_id}/uploads")
def uploads(sample_id: SampleId, review: Review) -> list[dict]:
    """The sample's uploads: name, kind (cell or field), size; photographs with their counts and checks."""
    return review.store.uploads(sample_id)


@router.get(
    "/samples/{sample_id}/uploads/{upload_id}/image",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}, **_ERRORS_IN_JSON},
)
def upload_image(sample_id: SampleId, upload_id: int, review: Review) -> Response:
    return Response(
        review.store.upload_data(sample_id, upload_id), media_type="application/octet-stream", headers=_IMMUTABLE
    )


@router.get("/samples/{sample_id}/cells")
def cells(sample_id: SampleId, review: Review) -> list[Cell]:
    return review.store.cells(sample_id)


@router.get(
    "/samples/{sample_id}/cells/{cell_id}/image",
    response_class=Response,
    responses={200: {"content": {"image/*": {}}}, **_ERRORS_IN_JSON},
)
def cell_image(
    sample_id: SampleId, cell_id: int, review: Review, thumb: bool = Query(False, description=f"a {THUMB_SIDE} px JPEG")
) -> Response:
    data, kind = review.store.cell_image(sample_id, cell_id, thumb)
    return Response(data, media_type=kind, headers=_IMMUTABLE)


@router.post("/samples/{sample_id}/cells/{cell_id}/label")
def relabel(sample_id: SampleId, cell_id: int, body: Relabel, review: Review) -> Cell:
    """Give the cell a label (its own label again: confirm it)."""
    return review.store.relabel(sample_id, cell_id, body.label, body.who, body.rev)


@router.post("/samples/{sample_id}/undo")
def undo(sample_id: SampleId, body: Who, review: Review) -> Cell:
    """Undo this reviewer's last change in the sample; answers the cell as it is again."""
    return review.store.undo(sample_id, body.who)


@router.get("/samples/{sample_id}/corrections")
def corrections(sample_id: SampleId, review: Review) -> list[dict]:
    """Every change of a label: cell, before, after, who, when, version; undos marked."""
    return review.store.corrections(sample_id)


@router.get("/samples/{sample_id}/count")
def sample_count(sample_id: SampleId, review: Review) -> dict:
    """The differential with every correction applied: rows in clinical order, totals, flags."""
    return review.store.count(sample_id)


@router.post("/samples/{sample_id}/signoff")
def sign_off(sample_id: SampleId, body: SignOff, review: Review) -> Sample:
    """Sign the count off: the sample is locked and the count kept with the sign-off."""
    return review.store.sign_off(sample_id, body.who, body.rev)


@router.post("/samples/{sample_id}/reopen")
def reopen(sample_id: SampleId, body: Reopen, review: Review) -> Sample:
    """Open a signed-off sample for a change, as a new version, with the reason."""
    return review.store.reopen(sample_id, body.who, body.reason)


@router.get("/samples/{sample_id}/history")
def history(sample_id: SampleId, review: Review) -> list[dict]:
    """Sign-offs and reopenings, each sign-off with the count it signed."""
    return review.store.history(sample_id)


@router.get("/samples/{sample_id}/report", response_class=HTMLResponse, responses=_ERRORS_IN_JSON)
def report(sample_id: SampleId, review: Review) -> HTMLResponse:
    """The printable report (HTML; print it from the browser, or save it as PDF there)."""
    return HTMLResponse(
        render_report(review.store, sample_id, review.model),
        headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:"},
    )


@router.get(
    "/samples/{sample_id}/export.zip",
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}}, **_ERRORS_IN_JSON},
)
def export(
    sample_id: SampleId,
    review: Review,
    labels: Literal["all", "model"] = Query(
        "all", description="all labels, or only the model's classes (for fine-tuning the same classes)"
    ),
) -> Response:
    """The sample's reviewed cells as training data: a folder per label and labels.csv (path,label,group)."""
    keep = review.store.classes if labels == "model" else None
    data = export_zip(review.store, sample_id, keep)
    return Response(
        data,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{sample_id}-cells.zip"'},
    )


def review_error_handler(request: Request, exc: ReviewError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=exc.status)

"""Uploaded files -> cells to review: classify them (cells and smear photographs alike, infer.fields.predict_mixed),
and keep with each cell the image a person reviews and a thumbnail for the gallery.

A single-cell upload keeps its own bytes when a browser can show them (PNG, JPEG, WebP, GIF, BMP), so an export
gives the fine-tuning the very file that was uploaded; other formats (TIFF...) are kept as PNG. A white cell found
in a photograph is kept as the square crop the classifier saw, before resizing.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any, Callable

import numpy as np
from PIL import Image

from bloodcell.data.fields import background_colour, crop_cell
from bloodcell.data.images import open_rgb
from bloodcell.infer.fields import predict_mixed
from bloodcell.review.records import NewCell, NewUpload

THUMB_SIDE = 96
_BROWSER_FORMATS = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}


def thumbnail(image: Image.Image) -> bytes:
    """A small JPEG of the cell for the gallery (THUMB_SIDE px on its long side)."""
    small = image.copy()
    small.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR)
    out = io.BytesIO()
    small.save(out, "JPEG", quality=82)
    return out.getvalue()


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def unique_names(files: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Two uploads may share a name (cell.png from two folders): the second becomes 'cell.png (2)'."""
    seen: Counter = Counter()
    out = []
    for name, data in files:
        seen[name] += 1
        out.append((name if seen[name] == 1 else f"{name} ({seen[name]})", data))
    return out


def _model_said(pred: dict) -> dict:
    return {
        "label": pred["label"],
        "probabilities": pred["probabilities"],
        "confidence": pred["confidence"],
        "review": bool(pred["review"]),
        "ood": bool(pred["ood"]),
        "ood_score": pred["ood_score"],
    }


def classify_uploads(
    predictor,
    files: list[tuple[str, bytes]],
    input_kind: str = "auto",
    detector: Any | Callable | None = None,
    max_pixels: int | None = None,
) -> tuple[list[NewUpload], list[dict]]:
    """Classify `files` and return (uploads with their cells, unreadable files with reasons).

    Args:
        predictor: a bloodcell.infer.Predictor.
        files: (name, bytes) of each upload; names made unique first (a second "a.jpg" becomes "a.jpg (2)").
        input_kind: auto (decide per image), cell or field (a smear photograph: its white cells are the cells).
        detector: the field detector (infer.fields.predict_mixed): a FieldDetector, a callable giving one, its
            folder, or None for the bundled one.
        max_pixels: the largest image to decode (default: the predictor's).
    """
    files = unique_names(files)
    data = dict(files)
    result = predict_mixed(predictor, files, input_kind, detector, 32, False, max_pixels)
    uploads = []
    for pred in result["predictions"]:
        raw = data[pred["path"]]
        image = open_rgb(raw, max_pixels or predictor.max_pixels)
        with Image.open(io.BytesIO(raw)) as probe:
            kind = _BROWSER_FORMATS.get(probe.format or "")
        stored, stored_type = (raw, kind) if kind else (png(image), "image/png")
        cell = NewCell(
            name=pred["path"], **_model_said(pred), image=stored, image_type=stored_type, thumb=thumbnail(image)
        )
        uploads.append(
            NewUpload(
                pred["path"],
                "cell",
                image.size[0],
                image.size[1],
                raw,
                [cell],
                {"input_reason": pred.get("input_reason") or ""},
            )
        )
    for field in result["fields"]:
        raw = data[field["path"]]
        image = open_rgb(raw, max_pixels or predictor.max_pixels)
        fill = background_colour(_array(image)) if field["cells"] else (255, 255, 255)
        cells = []
        for c in field["cells"]:
            if c["kind"] != "wbc":
                continue
            crop = crop_cell(image, c["box"], c["crop_side"], fill)
            cells.append(
                NewCell(
                    name=c["path"],
                    **_model_said(c),
                    image=png(crop),
                    image_type="image/png",
                    thumb=thumbnail(crop),
                    box=c["box"],
                )
            )
        info = {
            "counts": field["counts"],
            "note": field["note"],
            "withheld": field["withheld"],
            "problems": field["problems"],
            "input_reason": field["input_reason"],
        }
        uploads.append(NewUpload(field["path"], "field", field["size"][0], field["size"][1], raw, cells, info))
    return uploads, result["unreadable"]


def _array(image: Image.Image):
    return np.asarray(image)

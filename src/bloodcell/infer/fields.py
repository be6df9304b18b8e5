"""Smear-field photographs: find every cell, classify the white ones, count them.

A lab camera sees a field of a smear, not a cell cropped for the classifier. For a field:

    detect (the shipped detector: boxes for red cells, white cells, platelets)
    -> each white cell cropped square around its box centre at the scale the classifier was trained at
       (its field of view measured in red-cell diameters: the red cells of the same photograph are the ruler,
       so the crop does not depend on the camera's magnification), padded with the photograph's background
    -> the classifier's own preprocessing (Predictor.prepare) -> class, review and OOD flags as for any cell
    -> counts: red cells, platelets, white cells and each white-cell class
    -> checks (infer.field_checks): too dark, blown out, a stitched strip, another magnification; a severe problem
       withholds the counts and its one sentence is the answer (`note`), the rest are warnings (`problems`)

`--input auto` (the default) decides per image. A square-ish image (long side <= 1.15 x short side, as every
cell crop made for a classifier is) is answered exactly as before, as one cell. A rectangular image is shown to
the detector and is a field unless it finds no cells. The decision and its reason are in the output;
`--input field` reads a square photograph as a field. (The classifier's OOD score alone was tried first as the
gate: it let 26 of the 72 BCCD test photographs through as cells.)
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from bloodcell.data.fields import FIELD_CLASSES, background_colour, crop_cell, crop_side
from bloodcell.data.images import UnreadableImage, open_rgb
from bloodcell.errors import DataError, ModelError
from bloodcell.evaluate.annotate import draw_cells
from bloodcell.infer.field_checks import Problem, answer, check_field, detector_scale, withheld
from bloodcell.infer.predictor import Predictor, collect_images, summarize
from bloodcell.io import atomic_path
from bloodcell.models.description import ModelDescription, parse_description
from bloodcell.progress import progress_bar
from bloodcell.detect.base import Detections, FieldDetector
from bloodcell.detect.registry import load_detector

INPUT_KINDS = ("auto", "cell", "field")
# A photograph larger than this is refused (it would be a stitched scan or a camera far from BCCD's scale)
DEFAULT_MAX_FIELD_PIXELS = 16_000_000
# --input auto: an image whose long side is at most this times its short side is a single-cell crop
CROP_MAX_ASPECT = 1.15


def field_of_view(meta: dict | ModelDescription) -> dict:
    """How much of a smear the classifier saw per image: model.json `preprocess.field_of_view`, else PBC's
    (ModelDescription.preprocessing resolves it)."""
    description = meta if isinstance(meta, ModelDescription) else parse_description(meta)
    return dict(description.preprocessing.field_of_view)


@dataclass
class FieldReader:
    """A classifier plus a detector: reads smear-field photographs."""

    predictor: Predictor
    detector: FieldDetector
    max_field_pixels: int = DEFAULT_MAX_FIELD_PIXELS
    view: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.view = self.view or field_of_view(self.predictor.description or self.predictor.metadata)

    @classmethod
    def load(cls, predictor: Predictor, detector: str | os.PathLike | None = None) -> "FieldReader":
        return cls(predictor, load_detector(detector))

    # ------------------------------------------------------------------ geometry

    def crop_side(self, det: Detections) -> tuple[float, str]:
        """Side in pixels of the square the classifier should see, and how it was measured (data.fields.crop_side)."""
        return crop_side(det.of_class("rbc").boxes, det.of_class("wbc").boxes, self.view)

    def decide(self, det: Detections, size: tuple[int, int]) -> tuple[str, str]:
        """('cell' | 'field', reason) for a rectangular image (--input auto): a field when the detector finds cells."""
        if len(det) == 0:
            return "cell", "the detector found no cells in it"
        counts = det.counts()
        return (
            "field",
            f"the detector found {counts['wbc']} white, {counts['rbc']} red cells, {counts['platelet']} platelets",
        )

    @staticmethod
    def background(image: np.ndarray) -> tuple[int, int, int]:
        return background_colour(image)

    def crop(self, image: Image.Image, box: np.ndarray, side: float, fill: tuple[int, int, int]) -> Image.Image:
        """The square crop of one cell the classifier sees (data.fields.crop_cell).

        Args:
            image: The whole photograph.
            box: The cell's box, x1, y1, x2, y2 in the photograph's pixels; the crop is centred on it.
            side: Side of the square in pixels (at least 8), as crop_side measured it.
            fill: RGB colour for the parts outside the photograph (its background, see `background`).
        """
        return crop_cell(image, box, side, fill)

    # ------------------------------------------------------------------ one photograph

    def read(self, name: str, image: Image.Image, det: Detections | None = None, reason: str = "") -> dict:
        """The field result for one photograph (see docs/fields.md for its keys). A photograph with a severe
        problem (infer.field_checks) has its counts withheld: no cells, counts null, the problem as its note.

        Args:
            name: Echoed back as the result's `path`; white cells are named `<name>#wbc<i>`.
            image: The photograph (RGB); larger than max_field_pixels raises UnreadableImage.
            det: The detector's boxes for it when already found; None runs the detector.
            reason: Why it is read as a field (the result's `input_reason`); '' says --input field.
        """
        w, h = image.size
        check_field_size(image.size, self.max_field_pixels)
        arr = np.asarray(image)
        det = self.detector.detect([arr])[0] if det is None else det
        problems = self.check(arr, det)
        said = {
            "path": name,
            "input": "field",
            "input_reason": reason or "treated as a field (--input field)",
            "size": [w, h],
        }
        checked = {
            "note": answer(problems),
            "problems": [p.to_dict() for p in problems],
            "withheld": withheld(problems),
        }
        if checked["withheld"]:  # counts that mean nothing are not given, not even as zeros
            return {**said, "cells": [], "counts": None, "wbc_classes": None, "scale": "", **checked}
        side, ruler = self.crop_side(det)
        cells = self.classify_white_cells(name, image, arr, det.of_class("wbc"), side)
        for kind in ("rbc", "platelet"):
            sub = det.of_class(kind)
            cells += [
                {"kind": kind, "box": _box(b), "score": round(float(s), 4)} for b, s in zip(sub.boxes, sub.scores)
            ]
        wbc_classes = {c: 0 for c in self.predictor.class_names}
        for c in cells:
            if c["kind"] == "wbc" and not c.get("ood"):
                wbc_classes[c["label"]] += 1
        return {**said, "cells": cells, "counts": det.counts(), "wbc_classes": wbc_classes, "scale": ruler, **checked}

    def check(self, image: np.ndarray, det: Detections) -> list[Problem]:
        """What is wrong with the photograph for this detector (infer.field_checks), severe problems first."""
        long_side, cell_scale = detector_scale(self.detector)
        return check_field(image, det.boxes, det.labels, long_side, cell_scale)

    def classify_white_cells(
        self, name: str, image: Image.Image, arr: np.ndarray, wbc: Detections, side: float
    ) -> list[dict]:
        """Each white cell cropped at the classifier's scale and classified (class, review and OOD flags).

        Args:
            name: The photograph's name; each cell's `path` is `<name>#wbc<i>`, counted from 1.
            image: The photograph the cells are cropped from.
            arr: The same photograph as an H x W x 3 uint8 array (for the background colour).
            wbc: The white-cell detections only.
            side: Side in pixels of the square cropped around each cell (see crop_side).
        """
        if not len(wbc):
            return []
        fill = self.background(arr)
        crops = np.stack([self.predictor.prepare(self.crop(image, b, side, fill)) for b in wbc.boxes])
        logits, ood = self.predictor.outputs(crops)
        from bloodcell.evaluate.calibration import apply_temperature  # start-up time: it imports scipy.optimize

        probs = apply_temperature(logits, self.predictor.temperature)
        labels = [f"{name}#wbc{i + 1}" for i in range(len(wbc))]
        classified = summarize(
            labels,
            probs,
            self.predictor.class_names,
            self.predictor.review_threshold,
            [],
            ood,
            self.predictor.ood_threshold,
        )["predictions"]
        return [
            {"kind": "wbc", "box": _box(b), "score": round(float(s), 4), **pred, "crop_side": round(side, 1)}
            for b, s, pred in zip(wbc.boxes, wbc.scores, classified)
        ]


def _image_size(source: Any) -> tuple[int, int]:
    """Width and height from the image header (no decode); (1, 1) when unknown (it decoded once already)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as img:
            return img.size
    except Exception:  # noqa: BLE001 - it was readable a moment ago; treat as a crop
        return (1, 1)


def _squarish(size: tuple[int, int]) -> bool:
    return max(size) <= CROP_MAX_ASPECT * min(size)


def check_field_size(size: tuple[int, int], limit: int) -> None:
    w, h = size
    if w * h > limit:
        raise UnreadableImage(
            f"photograph of {w}x{h} px is larger than the {limit:,}-pixel limit for fields; "
            "crop it, or scale it to the magnification of a 640x480 field (red cells about 100 px wide)"
        )


def _box(b: np.ndarray) -> list[float]:
    return [round(float(v), 1) for v in b]


def field_summary(fields: Sequence[dict], predictor: Predictor) -> dict:
    """Totals over every field photograph with counts: red cells, platelets, white cells and the WBC differential.
    Photographs whose counts were withheld (field_checks) are left out of every figure and counted in `withheld`."""
    withheld_photos = sum(f["counts"] is None for f in fields)
    fields = [f for f in fields if f["counts"] is not None]
    wbc = [c for f in fields for c in f["cells"] if c["kind"] == "wbc"]
    names = [c["path"] for c in wbc]
    probs = np.array([[c["probabilities"][k] for k in predictor.class_names] for c in wbc]).reshape(
        len(wbc), len(predictor.class_names)
    )
    has_ood = predictor.has_ood
    scores = (
        np.array([np.nan if c["ood_score"] is None else c["ood_score"] for c in wbc], dtype=np.float64)
        if has_ood
        else None
    )
    diff = summarize(
        names, probs, predictor.class_names, predictor.review_threshold, [], scores, predictor.ood_threshold
    )
    totals = {k: sum(f["counts"][k] for f in fields) for k in FIELD_CLASSES}
    n = len(fields)
    return {
        "photos": n,
        "withheld": withheld_photos,
        "totals": totals,
        "per_photo": {k: round(v / n, 2) if n else 0.0 for k, v in totals.items()},
        "wbc_counted": diff["counted"],
        "wbc_ood": diff["ood_count"],
        "wbc_review": sum(c["review"] for c in wbc),
        "differential": diff["counts"],
        "differential_percent": diff["wbc_percent"],
        "flags": diff["flags"],
    }


def predict_mixed(
    predictor: Predictor,
    items: list[tuple[str, Any]],
    input_kind: str = "auto",
    detector: FieldDetector | str | os.PathLike | Callable[[], FieldDetector] | None = None,
    batch_size: int = 32,
    progress: bool = False,
    max_pixels: int | None = None,
    max_field_pixels: int = DEFAULT_MAX_FIELD_PIXELS,
) -> dict:
    """Classify cells and read fields among (name, path-or-bytes) items; see the module docstring.

    The result is `Predictor.predict_*`'s (for the single-cell images, each with `input` and `input_reason`)
    plus `fields` (one result per photograph) and `field_summary`.

    Args:
        predictor: The cell classifier.
        items: (name, path or encoded bytes) pairs; names are echoed back and may repeat.
        input_kind: One of INPUT_KINDS: 'cell' (all single-cell crops), 'field' (all photographs) or 'auto'
            (rectangular images the detector finds cells in are fields, the rest cells).
        detector: A FieldDetector, a zero-argument loader of one (called once, when first needed), or a path for
            load_detector; None or 'default': the bundled one. Without one, 'auto' reads every image as a cell.
        batch_size: Images per classifier batch.
        progress: Show progress bars.
        max_pixels: Largest image decoded, in pixels; None: the predictor's max_pixels.
        max_field_pixels: Largest photograph read as a field, in pixels (width x height); larger ones are a cell
            with 'auto' and unreadable with 'field'.
    """
    if input_kind not in INPUT_KINDS:
        raise DataError(f"--input must be one of {', '.join(INPUT_KINDS)}, got '{input_kind}'")
    if input_kind == "cell":
        result = predictor._predict(items, batch_size, progress, max_pixels)
        for p in result["predictions"]:
            p.update(input="cell", input_reason="--input cell")
        return {**result, "fields": [], "field_summary": None}
    reader = None

    def get_reader() -> FieldReader:
        nonlocal reader
        if reader is None:
            if isinstance(detector, FieldDetector):
                found = detector
            elif callable(detector):  # a loader: the server keeps one detector for all requests
                found = detector()
            else:
                found = load_detector(detector)
            reader = FieldReader(predictor, found)
        return reader

    # two uploads may share a name: items are tracked by position, names given back unchanged at the end
    items = [(f"{i}\x00{name}", source) for i, (name, source) in enumerate(items)]
    result = _predict_tagged(
        predictor, items, input_kind, get_reader, batch_size, progress, max_pixels, max_field_pixels
    )
    untag = lambda n: n.split("\x00", 1)[1]  # noqa: E731
    for group in (result["predictions"], result["unreadable"], result["fields"]):
        for entry in group:
            entry["path"] = untag(entry["path"])
    for f in result["fields"]:
        for c in f["cells"]:
            if c["kind"] == "wbc":
                c["path"] = f"{f['path']}#{c['path'].rsplit('#', 1)[1]}"
    if result["field_summary"]:
        result["field_summary"] = field_summary(result["fields"], predictor)
    return result


def _predict_tagged(
    predictor, items, input_kind, get_reader, batch_size, progress, max_pixels, max_field_pixels
) -> dict:
    limit = max_pixels or predictor.max_pixels
    fields: list[dict] = []
    unreadable: list[dict] = []
    cell_reasons: dict[str, str] = {}
    if input_kind == "field":
        candidates = items
    else:
        names, probs, ood, unreadable = predictor.classify(items, batch_size, progress, max_pixels)
        by_name = dict(items)  # names are unique here (tagged by position)
        # a crop made for a classifier is square-ish (PBC 360x363, Tecom 120x120), a camera field 4:3 or wider:
        # only rectangular images are shown to the detector (the classifier's OOD score alone let a third of the
        # BCCD photographs through as cells, benchmarks/fields.py)
        candidates = [(n, by_name[n]) for n in names if not _squarish(_image_size(by_name[n]))]
        cell_reasons = dict.fromkeys(
            names, "a square-ish image: read as a single-cell crop (use --input field for a square photograph)"
        )
    if candidates and input_kind == "auto":
        try:
            get_reader()
        except ModelError as exc:  # no detector installed: auto cannot read fields, every image stays a cell
            for name, _ in candidates:
                cell_reasons[name] = f"read as a cell: no field detector available ({exc})"
            candidates = []
    with progress_bar(len(candidates), "reading fields", enabled=progress and bool(candidates)) as advance:
        for name, source in candidates:
            try:
                image = open_rgb(source, max_pixels=limit)
                if input_kind == "auto" and image.size[0] * image.size[1] > max_field_pixels:
                    cell_reasons[name] = (
                        f"a rectangular image, but at {image.size[0]}x{image.size[1]} px too large to read as a field: "
                        "read as one cell"
                    )
                    advance()
                    continue
                check_field_size(image.size, max_field_pixels)
                r = get_reader()
                r.max_field_pixels = max_field_pixels
                arr = np.asarray(image)
                det = r.detector.detect([arr])[0]
                kind, reason = ("field", "--input field") if input_kind == "field" else r.decide(det, image.size)
                if kind == "field":
                    fields.append(r.read(name, image, det, reason))
                else:  # say why the detector may have found nothing (too dark, a strip...) when a check tells
                    hint = next((p.message for p in r.check(arr, det) if p.severe), "")
                    cell_reasons[name] = (
                        f"a rectangular image, but {reason}{f' ({hint})' if hint else ''}: read as one cell"
                    )
            except UnreadableImage as exc:
                unreadable.append({"path": name, "reason": str(exc)})
            except OSError as exc:
                unreadable.append({"path": name, "reason": f"cannot read file: {exc.strerror or exc}"})
            advance()
    if input_kind == "field":
        result = summarize(
            [],
            np.zeros((0, len(predictor.class_names))),
            predictor.class_names,
            predictor.review_threshold,
            unreadable,
            np.zeros(0) if predictor.has_ood else None,
            predictor.ood_threshold,
        )
    else:
        field_names = {f["path"] for f in fields}
        keep = [i for i, n in enumerate(names) if n not in field_names]
        result = summarize(
            [names[i] for i in keep],
            probs[keep],
            predictor.class_names,
            predictor.review_threshold,
            unreadable,
            None if ood is None else ood[keep],
            predictor.ood_threshold,
        )
        for p in result["predictions"]:
            p.update(input="cell", input_reason=cell_reasons.get(p["path"], ""))
    return {**result, "fields": fields, "field_summary": field_summary(fields, predictor) if fields else None}


def predict_paths_mixed(
    predictor: Predictor, paths, input_kind: str = "auto", detector=None, batch_size: int = 32, progress: bool = True
) -> dict:
    """predict_mixed on image files and folders (searched recursively for image files).

    Args:
        predictor: The cell classifier.
        paths: Image files and/or folders.
        input_kind: One of INPUT_KINDS ('auto', 'cell', 'field'); see predict_mixed.
        detector: A FieldDetector, a loader of one, or a path for load_detector; None: the bundled one.
        batch_size: Images per classifier batch.
        progress: Show progress bars.
    """
    files = collect_images(paths)
    return predict_mixed(predictor, [(str(p), p) for p in files], input_kind, detector, batch_size, progress)


def annotate_fields(result: dict, sources: dict[str, Any], out: str | os.PathLike) -> list[Path]:
    """Write each field photograph with its cells drawn (white cells labelled with class and confidence) as PNG."""

    out = Path(out)
    written = []
    used: set[str] = set()
    for f in result.get("fields") or []:
        image = open_rgb(sources.get(f["path"], f["path"]))
        cells = []
        for c in f["cells"]:
            label = None
            if c["kind"] == "wbc":
                label = f"{c['label']} {100 * c['confidence']:.0f}%" + (
                    " OOD" if c.get("ood") else " review" if c.get("review") else ""
                )
            cells.append(
                {"box": c["box"], "kind": c["kind"], "label": label, "flagged": bool(c.get("ood") or c.get("review"))}
            )
        stem = Path(f["path"]).stem
        name = stem
        k = 1
        while name in used:  # two photographs with the same name from different folders
            k += 1
            name = f"{stem}-{k}"
        used.add(name)
        target = out / f"{name}.annotated.png"
        with atomic_path(target) as tmp:
            draw_cells(image, cells).save(tmp, format="PNG")
        written.append(target)
    return written

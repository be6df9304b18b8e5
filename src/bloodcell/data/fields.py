"""Smear-field photographs with boxes: Pascal VOC folders (BCCD's layout) read into plain arrays.

A field is one photograph of a smear; every cell it shows has a box and one of FIELD_CLASSES. Boxes are
pixels, (x0, y0, x1, y1), x1/y1 exclusive as VOC's are inclusive integer corners (we keep VOC's numbers: a
box of one pixel has x1 == x0, so zero-area VOC boxes are dropped and counted, not guessed at).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bloodcell.errors import DataError

FIELD_CLASSES = ("rbc", "wbc", "platelet")
# The classifier's view, when its model.json does not say: the side of a PBC training crop is this many red-cell
# diameters (median red-cell box side), or this many white-cell box sides when a photograph shows too few red cells.
# Measured on PBC by benchmarks/field_of_view.py (see docs/fields.md).
DEFAULT_VIEW = {"rbc_diameters": 4.4, "wbc_sides": 2.7}
MIN_RULER_RBC = 3  # fewer red cells than this: the white cell's own box sets the scale
# label spellings seen in public smear sets -> our class; matched after lower-casing
LABEL_ALIASES = {
    "rbc": "rbc", "red blood cell": "rbc", "red_blood_cell": "rbc", "erythrocyte": "rbc",
    "wbc": "wbc", "white blood cell": "wbc", "white_blood_cell": "wbc", "leukocyte": "wbc",
    "platelets": "platelet", "platelet": "platelet", "plt": "platelet", "thrombocyte": "platelet",
}


@dataclass
class FieldAnnotation:
    """One photograph and its boxes. labels index FIELD_CLASSES."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 x0, y0, x1, y1 in pixels
    labels: np.ndarray  # (N,) int64
    dropped: int = 0  # boxes in the file that had no area (counted, not used)
    name: str = field(default="")

    def count(self, cls: str) -> int:
        return int((self.labels == FIELD_CLASSES.index(cls)).sum())


def field_class(label: str, source: str) -> int:
    key = label.strip().lower()
    if key not in LABEL_ALIASES:
        raise DataError(f"{source}: unknown cell label '{label}'; known: {', '.join(sorted(set(LABEL_ALIASES)))}")
    return FIELD_CLASSES.index(LABEL_ALIASES[key])


def read_voc(xml_path: str | Path, image_dir: str | Path) -> FieldAnnotation:
    """Read one Pascal VOC annotation file; the image is `image_dir/<filename>`."""
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise DataError(f"{xml_path}: not a readable Pascal VOC file ({exc})") from None
    name = (root.findtext("filename") or f"{xml_path.stem}.jpg").strip()
    try:
        width = int(float(root.findtext("size/width")))
        height = int(float(root.findtext("size/height")))
    except (TypeError, ValueError):
        raise DataError(f"{xml_path}: size/width and size/height are missing or not numbers") from None
    boxes, labels, dropped = [], [], 0
    for obj in root.iter("object"):
        label = obj.findtext("name") or ""
        try:
            x0, y0, x1, y1 = (float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise DataError(f"{xml_path}: an object '{label}' has no numeric bndbox") from None
        x0, x1 = np.clip([x0, x1], 0, width)
        y0, y1 = np.clip([y0, y1], 0, height)
        if x1 <= x0 or y1 <= y0:
            dropped += 1
            continue
        boxes.append((x0, y0, x1, y1))
        labels.append(field_class(label, str(xml_path)))
    return FieldAnnotation(
        path=Path(image_dir) / name,
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        labels=np.asarray(labels, dtype=np.int64),
        dropped=dropped,
        name=Path(name).stem,
    )


def voc_root(root: str | Path) -> Path:
    """The folder holding Annotations/ JPEGImages/ ImageSets/ (BCCD nests it one level down as BCCD/)."""
    root = Path(root)
    for candidate in (root, root / "BCCD"):
        if (candidate / "Annotations").is_dir() and (candidate / "JPEGImages").is_dir():
            return candidate
    raise DataError(f"{root}: not a Pascal VOC folder (needs Annotations/ and JPEGImages/)")


def load_voc(root: str | Path, split: str | None = None) -> list[FieldAnnotation]:
    """Every annotated photograph of a VOC folder, or those of ImageSets/Main/<split>.txt."""
    root = voc_root(root)
    if split is None:
        names = sorted(p.stem for p in (root / "Annotations").glob("*.xml"))
    else:
        listing = root / "ImageSets" / "Main" / f"{split}.txt"
        if not listing.is_file():
            known = sorted(p.stem for p in (root / "ImageSets" / "Main").glob("*.txt"))
            raise DataError(f"{listing}: no such split; known splits: {', '.join(known) or 'none'}")
        names = [line.split()[0] for line in listing.read_text().splitlines() if line.strip()]
    if not names:
        raise DataError(f"{root}: no annotated photographs" + (f" in split '{split}'" if split else ""))
    items = []
    for name in names:
        xml = root / "Annotations" / f"{name}.xml"
        if not xml.is_file():
            raise DataError(f"{xml}: listed in split '{split}' but missing")
        items.append(read_voc(xml, root / "JPEGImages"))
    return items


# ---------------------------------------------------------------------- the crop rule: a white cell as a classifier sees it
# One rule for every path that cuts a white cell out of a photograph (the field reader at inference, the labelled
# cells of another lab built for training and for the leave-one-lab-out protocol), so both see cells at one scale.


def crop_side(rbc_boxes: np.ndarray, wbc_boxes: np.ndarray, view: dict | None = None) -> tuple[float, str]:
    """Side in pixels of the square a white cell is cropped to, and how it was measured.

    The photograph's own red cells are the ruler (median box side x view["rbc_diameters"]), so the crop does not
    depend on the camera's magnification; with fewer than MIN_RULER_RBC red cells, the white cells' boxes set it.
    """
    view = {**DEFAULT_VIEW, **(view or {})}
    rbc = np.asarray(rbc_boxes, dtype=np.float64).reshape(-1, 4)
    if len(rbc) >= MIN_RULER_RBC:
        diameter = float(np.median(np.maximum(rbc[:, 2] - rbc[:, 0], rbc[:, 3] - rbc[:, 1])))
        return diameter * view["rbc_diameters"], f"{len(rbc)} red cells, median {diameter:.0f} px"
    wbc = np.asarray(wbc_boxes, dtype=np.float64).reshape(-1, 4)
    if len(wbc):
        side = float(np.median(np.maximum(wbc[:, 2] - wbc[:, 0], wbc[:, 3] - wbc[:, 1])))
        return side * view["wbc_sides"], f"white-cell boxes, median {side:.0f} px (fewer than {MIN_RULER_RBC} red cells)"
    return 0.0, "no cells"


def background_colour(image: np.ndarray) -> tuple[int, int, int]:
    """A smear's background colour (median of its brightest quarter): what a crop is padded with."""
    flat = image.reshape(-1, 3).astype(np.float32)
    bright = flat[flat.sum(1) >= np.percentile(flat.sum(1), 75)]
    return tuple(int(v) for v in np.median(bright, axis=0))


def crop_cell(image: Image.Image, box, side: float, fill: tuple[int, int, int]) -> Image.Image:
    """The square of `side` px centred on `box`; parts outside the photograph are `fill` (its background)."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = max(side, 8.0) / 2
    left, top = int(round(cx - half)), int(round(cy - half))
    size = int(round(2 * half))
    canvas = Image.new("RGB", (size, size), fill)
    x0, y0 = max(0, left), max(0, top)
    x1, y1 = min(image.size[0], left + size), min(image.size[1], top + size)
    canvas.paste(image.crop((x0, y0, max(x0, x1), max(y0, y1))), (max(0, -left), max(0, -top)))
    return canvas

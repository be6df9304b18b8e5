"""Smear-field photographs with boxes, read into plain arrays: Pascal VOC folders (BCCD's layout) and YOLO folders
(TXL-PBC's layout), and several such sets combined without a photograph crossing from an evaluation split into training.

A field is one photograph of a smear; every cell it shows has a box and one of FIELD_CLASSES. Boxes are
pixels, (x0, y0, x1, y1), x1/y1 exclusive as VOC's are inclusive integer corners (we keep VOC's numbers: a
box of one pixel has x1 == x0, so zero-area VOC boxes are dropped and counted, not guessed at).
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from bloodcell.errors import DataError

FIELD_CLASSES = ("rbc", "wbc", "platelet")
# a box of the same class overlapping an earlier one this much is that box again (TXL-PBC's PBC test labels list
# 36 boxes twice, in 2 photographs), not a second cell: read once, counted in FieldAnnotation.duplicates
DUPLICATE_IOU = 0.95
# The classifier's view, when its model.json does not say: the side of a PBC training crop is this many red-cell
# diameters (median red-cell box side), or this many white-cell box sides when a photograph shows too few red cells.
# Measured on PBC by benchmarks/field_of_view.py (see docs/fields.md).
DEFAULT_VIEW = {"rbc_diameters": 4.4, "wbc_sides": 2.7}
MIN_RULER_RBC = 3  # fewer red cells than this: the white cell's own box sets the scale
# label spellings seen in public smear sets -> our class; matched after lower-casing
LABEL_ALIASES = {
    "rbc": "rbc",
    "red blood cell": "rbc",
    "red_blood_cell": "rbc",
    "erythrocyte": "rbc",
    "wbc": "wbc",
    "white blood cell": "wbc",
    "white_blood_cell": "wbc",
    "leukocyte": "wbc",
    "platelets": "platelet",
    "platelet": "platelet",
    "plt": "platelet",
    "thrombocyte": "platelet",
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
    duplicates: int = (
        0  # boxes in the file repeating one before it (same class, IoU >= DUPLICATE_IOU): one cell, one box
    )
    name: str = field(default="")
    source: str = ""  # the lab or set the photograph comes from (TXL-PBC's sources.csv; a VOC set's name)
    # the same photograph in every set that holds it, e.g. "bccd:BloodImage_00370" (see combine_field_sets)
    identity: str = ""

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
    boxes, labels, duplicates = without_duplicates(
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)
    )
    return FieldAnnotation(
        path=Path(image_dir) / name,
        width=width,
        height=height,
        boxes=boxes,
        labels=labels,
        dropped=dropped,
        duplicates=duplicates,
        name=Path(name).stem,
    )


def without_duplicates(boxes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The boxes with every repeat of an earlier box of the same class (IoU >= DUPLICATE_IOU) left out, and how many."""
    if len(boxes) < 2:
        return boxes, labels, 0
    x0, y0, x1, y1 = boxes.T
    area = (x1 - x0) * (y1 - y0)
    iw = np.clip(np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None]), 0, None)
    ih = np.clip(np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None]), 0, None)
    inter = iw * ih
    iou = inter / (area[:, None] + area[None] - inter)
    repeat = np.triu((iou >= DUPLICATE_IOU) & (labels[:, None] == labels[None]), 1).any(0)
    return boxes[~repeat], labels[~repeat], int(repeat.sum())


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


# ---------------------------------------------------------------------- YOLO folders (TXL-PBC's layout)
# images/<split>/<name>.<ext> and labels/<split>/<name>.txt, a line per box: class cx cy w h, normalised to the
# image size; data.yaml names the classes in order. An optional sources.csv (columns image, source, and any
# `<set>_name`) says which lab each photograph comes from and which photograph of another set it is.

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def is_yolo_root(root: str | Path) -> bool:
    root = Path(root)
    return (root / "images").is_dir() and (root / "labels").is_dir()


def yolo_class_names(root: Path) -> list[str]:
    """Class names in label order, from data.yaml (`names:` as a list or an index -> name mapping)."""
    import yaml

    spec = root / "data.yaml"
    if not spec.is_file():
        raise DataError(f"{spec}: missing (a YOLO folder names its classes in data.yaml)")
    try:
        names = (yaml.safe_load(spec.read_text()) or {}).get("names")
    except (yaml.YAMLError, AttributeError) as exc:
        raise DataError(f"{spec}: not a YAML mapping with 'names' ({exc})") from None
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list) or not names:
        raise DataError(f"{spec}: 'names' must list the classes")
    return [str(n) for n in names]


def _yolo_sources(root: Path) -> dict[str, dict]:
    """sources.csv rows by image path relative to root (empty when the set has none)."""
    table = root / "sources.csv"
    if not table.is_file():
        return {}
    with table.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "image" not in rows[0]:
        raise DataError(f"{table}: needs an 'image' column (the image's path under {root})")
    return {r["image"]: r for r in rows}


def read_yolo(
    label_path: Path, image_path: Path, classes: list[int], size: tuple[int, int] | None = None
) -> FieldAnnotation:
    """One YOLO label file; `classes` maps its class numbers to FIELD_CLASSES indices; size (w, h) read from the
    image when not given.

    Args:
        label_path: the .txt labels, one 'class cx cy w h' line a box (fractions of the size); missing: no cells.
        image_path: the photograph; its size is read from it when `size` is None.
        classes: for each YOLO class number, its index in FIELD_CLASSES.
        size: the photograph's (width, height) in pixels; None: read from `image_path`.
    """
    if size is None:
        try:
            with Image.open(image_path) as im:
                size = im.size
        except (OSError, ValueError) as exc:
            raise DataError(f"{image_path}: cannot read the photograph ({exc})") from None
    width, height = size
    boxes, labels, dropped = [], [], 0
    text = label_path.read_text() if label_path.is_file() else ""  # no label file: a photograph without cells
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            k, cx, cy, w, h = line.split()[:5]
            k, (cx, cy, w, h) = int(k), (float(v) for v in (cx, cy, w, h))
        except ValueError:
            raise DataError(f"{label_path}:{n}: expected 'class cx cy w h', got {line.strip()!r}") from None
        if not 0 <= k < len(classes):
            raise DataError(f"{label_path}:{n}: class {k} is not in data.yaml's {len(classes)} names")
        x0, x1 = np.clip([(cx - w / 2) * width, (cx + w / 2) * width], 0, width)
        y0, y1 = np.clip([(cy - h / 2) * height, (cy + h / 2) * height], 0, height)
        if x1 <= x0 or y1 <= y0:
            dropped += 1
            continue
        boxes.append((x0, y0, x1, y1))
        labels.append(classes[k])
    boxes, labels, duplicates = without_duplicates(
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64)
    )
    return FieldAnnotation(
        path=image_path,
        width=int(width),
        height=int(height),
        boxes=boxes,
        labels=labels,
        dropped=dropped,
        duplicates=duplicates,
        name=image_path.stem,
    )


def load_yolo(root: str | Path, split: str, set_name: str = "") -> list[FieldAnnotation]:
    """Every photograph of images/<split>/ with its labels/<split>/ boxes; source and identity from sources.csv."""
    root = Path(root)
    images_dir = root / "images" / split
    if not images_dir.is_dir():
        known = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
        raise DataError(f"{images_dir}: no such split; known splits: {', '.join(known) or 'none'}")
    names = yolo_class_names(root)
    classes = [field_class(n, str(root / "data.yaml")) for n in names]
    sources = _yolo_sources(root)
    items = []
    for image in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        row = sources.get(f"images/{split}/{image.name}", {})
        size = (int(row["width"]), int(row["height"])) if row.get("width") and row.get("height") else None
        ann = read_yolo(root / "labels" / split / f"{image.stem}.txt", image, classes, size)
        ann.source = row.get("source") or set_name or root.name.lower()
        # a `<set>_name` column names this photograph in another set: both are one photograph
        same = [f"{col[:-5]}:{value}" for col, value in row.items() if col.endswith("_name") and value]
        ann.identity = same[0] if same else f"{set_name or root.name.lower()}:{image.stem}"
        items.append(ann)
    if not items:
        raise DataError(f"{images_dir}: no photographs")
    return items


def load_fields(root: str | Path, split: str | None, set_name: str = "") -> list[FieldAnnotation]:
    """Annotated photographs of one split of a VOC or a YOLO folder, told apart by their layout."""
    root = Path(root)
    if is_yolo_root(root):
        if split is None:
            raise DataError(f"{root}: a YOLO folder is read one split at a time (images/<split>/)")
        return load_yolo(root, split, set_name)
    items = load_voc(root, split)
    name = set_name or voc_root(root).name.lower()
    for ann in items:
        ann.source = ann.source or name
        ann.identity = ann.identity or f"{name}:{ann.name}"
    return items


@dataclass
class FieldSets:
    """Photographs of one or more sets combined: train and val pooled, test kept per set; what was left out, and why."""

    train: list[FieldAnnotation]
    val: list[FieldAnnotation]
    tests: dict[str, list[FieldAnnotation]]
    removed: dict[str, int]  # reason -> photographs


def combine_field_sets(sets: dict[str, dict], leave_out: str | None = None) -> FieldSets:
    """Several annotated sets as one: `sets` maps a set's name to {root, train_split, val_split, test_split,
    thresholds (bool: its val photographs choose the operating thresholds)}.

    One photograph can be in two sets under two splits (TXL-PBC holds BCCD's photographs, split its own way), so a
    photograph is known by its identity and an evaluation split wins: nothing in any set's test split is trained or
    tuned on, nothing in any val split is trained on, and a photograph in two train splits is kept once, from the set
    listed first. `leave_out` names a source kept out of train and val entirely (its photographs are only tested).
    """
    loaded = {
        name: {part: load_fields(spec["root"], spec[f"{part}_split"], name) for part in ("train", "val", "test")}
        for name, spec in sets.items()
    }
    tested = {a.identity for parts in loaded.values() for a in parts["test"]}
    removed: dict[str, int] = {}

    def pool(part: str, barred: set[str], use) -> list[FieldAnnotation]:
        out, seen = [], set()
        for name, parts in loaded.items():
            if not use(name):
                continue
            for ann in parts[part]:
                reason = (
                    "in an evaluation split"
                    if ann.identity in barred
                    else f"of left-out source {leave_out}"
                    if leave_out in (ann.source, name)
                    else "a duplicate"
                    if ann.identity in seen
                    else None
                )
                if reason:
                    key = f"{part}: {reason}"
                    removed[key] = removed.get(key, 0) + 1
                    continue
                seen.add(ann.identity)
                out.append(ann)
        return out

    val = pool("val", tested, lambda name: sets[name].get("thresholds", True))
    train = pool("train", tested | {a.identity for parts in loaded.values() for a in parts["val"]}, lambda name: True)
    if not train:
        raise DataError("no training photographs left after removing evaluation and left-out photographs")
    return FieldSets(train, val, {name: parts["test"] for name, parts in loaded.items()}, removed)


def by_source(items: list[FieldAnnotation]) -> dict[str, list[FieldAnnotation]]:
    groups: dict[str, list[FieldAnnotation]] = {}
    for ann in items:
        groups.setdefault(ann.source or "all", []).append(ann)
    return groups


# ------------------------------------------------------------ the crop rule: a white cell as a classifier sees it
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
        return side * view[
            "wbc_sides"
        ], f"white-cell boxes, median {side:.0f} px (fewer than {MIN_RULER_RBC} red cells)"
    return 0.0, "no cells"


def background_colour(image: np.ndarray) -> tuple[int, int, int]:
    """A smear's background colour (median of its brightest quarter): what a crop is padded with."""
    flat = image.reshape(-1, 3).astype(np.float32)
    bright = flat[flat.sum(1) >= np.percentile(flat.sum(1), 75)]
    return tuple(int(v) for v in np.median(bright, axis=0))


def crop_cell(image: Image.Image, box, side: float, fill: tuple[int, int, int]) -> Image.Image:
    """The square of `side` px centred on `box`; parts outside the photograph are `fill` (its background).

    Args:
        image: the whole photograph.
        box: the cell's (x0, y0, x1, y1) in pixels; the crop is centred on its centre.
        side: the crop's side in pixels (at least 8), e.g. from crop_side.
        fill: the RGB colour of the parts outside the photograph, e.g. background_colour's.
    """
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    half = max(side, 8.0) / 2
    left, top = int(round(cx - half)), int(round(cy - half))
    size = int(round(2 * half))
    canvas = Image.new("RGB", (size, size), fill)
    x0, y0 = max(0, left), max(0, top)
    x1, y1 = min(image.size[0], left + size), min(image.size[1], top + size)
    canvas.paste(image.crop((x0, y0, max(x0, x1), max(y0, y1))), (max(0, -left), max(0, -top)))
    return canvas

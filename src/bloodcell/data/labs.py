"""Labelled cells of other labs: what a run trains on besides its main dataset, and the labs it is measured on.

A lab is given by a `LabSource` (config: `data.labs`, `eval.labs`):

* a class-per-folder dataset or a `path,label[,group]` CSV (e.g. the Tecom cells): it has no split of its own,
  so a lab a run trains on is split by the run's split rule (same seed), and a held-out lab is read whole;
* a smear-photograph set in Pascal VOC layout with a `wbc_subtypes.csv` beside it (BCCD): its white cells are cut
  out of the photographs by the field path's crop rule (`data.fields.crop_cell`, the photograph's red cells as the
  ruler), so they are seen at the scale the field reader shows the classifier, and its own split is kept.

Cut cells are written once under the cache folder (keyed by the annotation files' content and the crop view) and
read as a class-per-folder dataset per part, so every later step (scan, cache, preprocessing) is the usual one.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bloodcell import io
from bloodcell.data.classes import resolve_class
from bloodcell.data.discover import Inventory, default_cache_dir, scan
from bloodcell.data.fields import (
    DEFAULT_VIEW,
    FIELD_CLASSES,
    background_colour,
    crop_cell,
    crop_side,
    load_voc,
    voc_root,
)
from bloodcell.data.images import UnreadableImage, open_rgb
from bloodcell.errors import DataError
from bloodcell.progress import progress_bar

PARTS = ("train", "val", "test")
SUBTYPES_FILE = "wbc_subtypes.csv"
CUT_VERSION = 1


@dataclass
class LabPart:
    """One part of one lab: its inventory and, per image, the index of its class among the model's classes."""

    lab: str
    part: str
    inventory: Inventory
    labels: np.ndarray  # (N,) int64 indices into the model's class names


def is_smear_set(root: str | os.PathLike) -> bool:
    """A Pascal VOC smear set with white-cell subtype labels beside it (BCCD's layout)."""
    root = Path(root)
    return (root / SUBTYPES_FILE).is_file() and any((c / "Annotations").is_dir() for c in (root, root / "BCCD"))


def cut_smear_cells(
    root: str | os.PathLike,
    *,
    view: dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Cut every labelled white cell of a smear set into `<folder>/<part>/<label>/<photo>.png`; return the folder.

    Each row of wbc_subtypes.csv (image, split, label, xmin, ymin, xmax, ymax) gives a photograph and its one white
    cell; the crop is the square the field reader would show the classifier (data.fields.crop_side with the
    photograph's annotated red cells as the ruler), padded with the photograph's background. Done once per
    content: a finished folder (its manifest.json) is reused.

    Args:
        root: the smear set (Pascal VOC, with wbc_subtypes.csv).
        view: overrides of data.fields.DEFAULT_VIEW (rbc_diameters, wbc_sides): how large a crop is.
        cache_dir: where the cut folder goes (under labs/); None: $BLOODCELL_CACHE, else ~/.cache/bloodcell.
        progress: show a progress bar.
    """
    root = Path(root)
    subtypes = root / SUBTYPES_FILE
    view = {**DEFAULT_VIEW, **(view or {})}
    try:
        rows = list(csv.DictReader(subtypes.read_text(encoding="utf-8-sig").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read {subtypes}: {getattr(exc, 'strerror', None) or exc}") from None
    needed = {"image", "split", "label", "xmin", "ymin", "xmax", "ymax"}
    if not rows or not needed <= set(rows[0]):
        raise DataError(f"{subtypes}: expected the columns {','.join(sorted(needed))}")
    voc = voc_root(root)
    digest = hashlib.sha256(f"v{CUT_VERSION}|{json.dumps(view, sort_keys=True)}".encode() + subtypes.read_bytes())
    for name in sorted({r["image"] for r in rows}):
        xml = voc / "Annotations" / f"{name}.xml"
        digest.update(xml.read_bytes() if xml.is_file() else b"-")
    out = Path(cache_dir or default_cache_dir()) / "labs" / f"{root.resolve().name}-{digest.hexdigest()[:20]}"
    if (out / "manifest.json").is_file():
        return out
    annotations = {a.name: a for a in load_voc(root)}
    written, skipped = 0, []
    with progress_bar(len(rows), f"cutting white cells of {root.name}", enabled=progress) as advance:
        for line, row in enumerate(rows, start=2):
            advance(1)
            part, label, name = row["split"].strip(), row["label"].strip(), row["image"].strip()
            if part not in PARTS:
                raise DataError(f"{subtypes}, line {line}: split '{part}' is not one of {', '.join(PARTS)}")
            ann = annotations.get(name)
            if ann is None:
                skipped.append(f"{name}: no annotation")
                continue
            try:
                image = open_rgb(ann.path)
                box = [float(row[k]) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (UnreadableImage, ValueError) as exc:
                skipped.append(f"{name}: {exc}")
                continue
            rbc = ann.boxes[ann.labels == FIELD_CLASSES.index("rbc")]
            side, _ = crop_side(rbc, np.asarray([box]), view)
            cell = crop_cell(image, box, side, background_colour(np.asarray(image)))
            target = out / part / label / f"{name}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            buf = _png_bytes(cell)
            io.write_bytes(target, buf)
            written += 1
    io.write_json(
        out / "manifest.json",
        {
            "source": str(root.resolve()),
            "rule": "bloodcell.data.fields.crop_cell",
            "view": view,
            "cells": written,
            "skipped": skipped,
        },
    )
    return out


def _png_bytes(img) -> bytes:
    import io as _io

    buf = _io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def lab_parts(
    name: str,
    root: str | os.PathLike,
    class_names: list[str],
    *,
    parts: list[str] | None = None,
    split_config=None,
    view: dict | None = None,
    progress: bool = True,
    max_pixels: int | None = None,
    classes: list[str] | None = None,
) -> list[LabPart]:
    """The lab's cells as LabParts, their labels matched to `class_names` (data.classes.resolve_class).

    A smear set keeps its own split; a folder or CSV with `split_config` is split by it (a lab a run trains on),
    and without one it is a single part, "all" (a held-out lab). `parts` keeps the named parts only, `classes`
    the images of the named classes only.

    Args:
        name: the lab's name, used in error messages and in each LabPart.
        root: the lab's smear set, class-per-folder dataset or CSV.
        class_names: the model's classes; every class of the lab must match one.
        parts: the parts kept (train, val, test); None: all.
        split_config: a data.split.SplitConfig splitting a folder or CSV; None: one part, "all".
        view: a smear set's crop view (cut_smear_cells); None: data.fields.DEFAULT_VIEW.
        progress: show progress bars.
        max_pixels: the scan's decompression bomb limit; None: the scan's default.
        classes: the lab's classes kept (matched by data.classes.resolve_class); None: all.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"lab '{name}': {root} does not exist")
    kwargs = {} if max_pixels is None else {"max_pixels": max_pixels}
    out: list[LabPart] = []
    if is_smear_set(root):
        cut = cut_smear_cells(root, view=view, progress=progress)
        for part in parts or PARTS:
            if (cut / part).is_dir():
                inv = _keep_classes(name, scan(cut / part, progress=False, **kwargs), classes)
                out.append(LabPart(name, part, inv, _labels(name, inv, class_names)))
        if not out:
            raise DataError(f"lab '{name}': {root} has no cells in the parts {', '.join(parts or PARTS)}")
        return out
    inv = _keep_classes(name, scan(root, progress=progress, **kwargs), classes)
    if not inv.records:
        raise DataError(f"lab '{name}': no readable images in {root}")
    labels = _labels(name, inv, class_names)
    if split_config is None:
        return [LabPart(name, "all", inv, labels)]
    from bloodcell.data.split import make_split

    split = make_split(inv, split_config)
    for part in parts or PARTS:
        idx = split.part(part)
        if idx:
            sub = Inventory(inv.root, inv.class_names, [inv.records[i] for i in idx], [], len(idx), csv=inv.csv)
            out.append(LabPart(name, part, sub, labels[np.asarray(idx, dtype=np.int64)]))
    return out


def _keep_classes(name: str, inv: Inventory, classes: list[str] | None) -> Inventory:
    if not classes:
        return inv
    keep = {c: resolve_class(c, inv.class_names) for c in classes}
    missing = [c for c, folder in keep.items() if folder is None]
    if missing:
        raise DataError(
            f"lab '{name}': {inv.root} has no class '{missing[0]}' (its classes: {', '.join(inv.class_names)})"
        )
    folders = sorted(set(keep.values()))
    records = [r for r in inv.records if r.label in folders]
    return Inventory(inv.root, folders, records, inv.skipped, len(records), csv=inv.csv, warnings=inv.warnings)


def _labels(name: str, inv: Inventory, class_names: list[str]) -> np.ndarray:
    mapping = {}
    for folder in inv.class_names:
        cls = resolve_class(folder, class_names)
        if cls is None:
            raise DataError(
                f"lab '{name}': class '{folder}' of {inv.root} matches no class of the model ({', '.join(class_names)})"
            )
        mapping[folder] = class_names.index(cls)
    return np.asarray([mapping[inv.class_names[label]] for label in inv.labels], dtype=np.int64)


@dataclass
class LabImages:
    """A lab's cells as a model sees them: uint8 (N, S, S, 3) through the usual cache, labels, paths, parts."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    relpaths: list[str]
    parts: np.ndarray  # (N,) the part each image comes from ("train", "val", "test" or "all")


def lab_images(
    source,
    class_names: list[str],
    *,
    size: int,
    interpolation: str,
    white_balance: str = "none",
    max_pixels: int,
    split_config=None,
    progress: bool = True,
) -> LabImages:
    """Every cell of `source` (a config LabSource) the model's way: cut, scanned, resized, balanced as in training.

    Args:
        source: a config.LabSource (name, root, parts, classes).
        class_names: the model's classes; the labels are indices into them.
        size: the side in pixels every cell is resized to (the model's input size).
        interpolation: a key of data.images.INTERPOLATIONS.
        white_balance: "none" or "background" (data.images.WHITE_BALANCES).
        max_pixels: a larger image (width x height) is skipped as a possible decompression bomb.
        split_config: a data.split.SplitConfig for a folder lab the run trains on; None: one part, "all".
        progress: show progress bars.
    """
    from bloodcell.data.cache import build_cache

    parts = lab_parts(
        source.name,
        source.root,
        class_names,
        parts=source.parts,
        split_config=split_config,
        progress=progress,
        max_pixels=max_pixels,
        classes=source.classes,
    )
    images, labels, relpaths, names = [], [], [], []
    for lp in parts:
        cache = build_cache(
            lp.inventory, size, interpolation, max_pixels=max_pixels, progress=progress, white_balance=white_balance
        )
        images.append(np.asarray(cache.images))
        labels.append(lp.labels)
        relpaths += [f"{source.name}:{lp.part}/{r.relpath}" for r in lp.inventory.records]
        names += [lp.part] * len(lp.labels)
    return LabImages(source.name, np.concatenate(images), np.concatenate(labels), relpaths, np.asarray(names))

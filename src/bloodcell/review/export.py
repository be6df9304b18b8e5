"""A sample's reviewed cells as training data: one folder per label, and `labels.csv` (`path,label,group`, group =
the sample ID) over the same files. `bloodcell train CONFIG --data OUT` reads the folders, `--data OUT/labels.csv`
the CSV with its groups (a sample's cells then never straddle a split); `bloodcell adapt OUT` and
`evaluate --model` read the folders too.

Which cells: those a person labelled or confirmed, and, once a sample is signed off, every cell its count rests on
(the sign-off vouches for them, and still does after a reopening). Cells the model flagged out-of-distribution that
nobody labelled are never exported: no person said what they are.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

from bloodcell.review.records import ReviewError
from bloodcell.review.store import ReviewStore

_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp", "image/gif": ".gif", "image/bmp": ".bmp"}


def exported_cells(
    store: ReviewStore, sample_id: str, labels: Sequence[str] | None = None
) -> Iterator[tuple[str, str, bytes]]:
    """(relative path, label, image bytes) of every cell to export from one sample (see the module docstring).

    labels: keep only these labels (e.g. the model's classes); None keeps all."""
    signed = any(h["action"] == "signed" for h in store.history(sample_id))  # a later version's reopening keeps it
    for cell, image, image_type in store.cell_images(sample_id):
        vouched = cell["reviewed"] or (signed and not cell["ood"])
        if not vouched or (labels is not None and cell["label"] not in labels):
            continue
        yield f"{cell['label']}/{sample_id}-cell{cell['id']}{_SUFFIX.get(image_type, '.png')}", cell["label"], image


def write_export(
    store: ReviewStore, sample_ids: Sequence[str], out: str | Path, labels: Sequence[str] | None = None
) -> dict:
    """Write the export of `sample_ids` to the new folder `out` (built beside it, then renamed: never half written).
    Returns {"folder", "csv", "cells", "per_label"}.

    Args:
        store: The review store the samples are read from.
        sample_ids: The lab's sample IDs to export (at least one).
        out: The folder to create; it must not exist yet.
        labels: Keep only cells with these labels (e.g. the model's classes); None keeps all.
    """
    out = Path(out)
    if out.exists():
        raise ReviewError(f"{out} exists: export into a new folder")
    if not sample_ids:
        raise ReviewError("no sample to export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rows = []
        for sid in sample_ids:
            for rel, label, data in exported_cells(store, sid, labels):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).write_bytes(data)
                rows.append((rel, label, sid))
        if not rows:
            raise ReviewError(
                f"nothing to export from {', '.join(sample_ids)}: no cell has been labelled or confirmed "
                "by a person, and no sample is signed off"
            )
        (tmp / "labels.csv").write_text(_csv(rows), encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ReviewError(f"cannot write the export to {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    per_label: dict[str, int] = {}
    for _, label, _ in rows:
        per_label[label] = per_label.get(label, 0) + 1
    return {"folder": str(out), "csv": str(out / "labels.csv"), "cells": len(rows), "per_label": per_label}


def export_zip(store: ReviewStore, sample_id: str, labels: Sequence[str] | None = None) -> bytes:
    """The same layout as write_export, as a zip archive in memory (the API's download)."""
    buf = io.BytesIO()
    rows = []
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # images are compressed already
        for rel, label, data in exported_cells(store, sample_id, labels):
            zf.writestr(f"{sample_id}/{rel}", data)
            rows.append((rel, label, sample_id))
        zf.writestr(f"{sample_id}/labels.csv", _csv(rows))
    return buf.getvalue()


def _csv(rows: list[tuple[str, str, str]]) -> str:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "label", "group"])
    writer.writerows(rows)
    return text.getvalue()

"""What the review database stores: the lab's own classes, samples, their uploads and the cells cut from them.

A sample (the lab's ID, a date, a note, the analyser's white-cell count) holds the cells of its uploads: each cell
keeps the image a person reviews, a thumbnail, what the model said (class, probabilities, review and OOD flags) and
its label now. Changing a label, counting and signing off are ReviewStore's (bloodcell.review.store).
"""

from __future__ import annotations

import json
import sqlite3
from datetime import date as Date
from typing import Iterator, Sequence

from bloodcell.data.classes import resolve_class
from bloodcell.review.counting import REVIEW_LABELS, role_of
from bloodcell.review.database import ReviewDatabase
from bloodcell.review.records import (
    LAB_CLASS,
    MAX_NOTE,
    Conflict,
    NewUpload,
    NotFound,
    ReviewError,
    check_date,
    check_sample_id,
    check_text,
    check_who,
    now,
    shown,
)


class SampleStore(ReviewDatabase):
    """The samples, uploads, cells and lab classes of one lab's review database (ReviewDatabase)."""

    # ------------------------------------------------------------------ classes

    def lab_classes(self) -> dict[str, str]:
        """The lab's own classes, name -> 'wbc' (counted as a white cell) or 'other', in the order added."""
        return {r["name"]: r["kind"] for r in self._read("SELECT name, kind FROM lab_classes ORDER BY rowid")}

    def add_lab_class(self, name: str, kind: str = "wbc") -> dict[str, str]:
        name = (name or "").strip()
        if not LAB_CLASS.fullmatch(name):
            raise ReviewError(f"class name {shown(name)} is not allowed: 1-40 letters, digits, spaces, '_' or '-'")
        if kind not in ("wbc", "other"):
            raise ReviewError(f"class kind must be 'wbc' (counted as a white cell) or 'other', got {shown(kind)}")
        if self.lab_classes().get(name) == kind:  # added already: nothing to do
            return self.lab_classes()
        same = resolve_class(name, [*self.classes, *REVIEW_LABELS, *self.lab_classes()])  # case and plural ignored
        if same is not None:
            raise Conflict(f"class {shown(name)} is already a class ({same!r})")
        with self._write() as c:
            c.execute("INSERT INTO lab_classes (name, kind, added) VALUES (?, ?, ?)", (name, kind, now()))
        return self.lab_classes()

    def labels(self) -> list[str]:
        """Every label a cell may be given: the model's classes in clinical order, then unidentified / smudge /
        artefact, then the lab's own."""
        model = sorted(self.classes, key=lambda c: role_of(c).order)  # clinical order: keys 1-9 follow it
        return [*model, *[r for r in REVIEW_LABELS if r not in self.classes], *self.lab_classes()]

    # ------------------------------------------------------------------ samples

    def create_sample(self, sample_id: str, who: str, sample_date: str | None = None, note: str = "") -> dict:
        """A new, empty sample; Conflict when the ID is taken.

        Args:
            sample_id: the lab's ID of the sample.
            who: the reviewer's name or initials.
            sample_date: YYYY-MM-DD (default: today).
            note: free text shown with the sample and on its report.
        """
        check_sample_id(sample_id)
        who = check_who(who)
        day = check_date(sample_date) if sample_date else Date.today().isoformat()
        try:
            with self._write() as c:
                c.execute(
                    "INSERT INTO samples (sample_id, sample_date, note, created, created_by) VALUES (?, ?, ?, ?, ?)",
                    (sample_id, day, check_text(note or "", "note", MAX_NOTE), now(), who),
                )
        except sqlite3.IntegrityError:
            raise Conflict(f"sample {shown(sample_id)} exists already") from None
        return self.sample(sample_id)

    def sample(self, sample_id: str) -> dict:
        row = self._sample_row(sample_id)
        stats = self._read(
            "SELECT COUNT(*) AS cells, SUM(reviewed) AS reviewed, SUM(ood AND NOT reviewed) AS ood, "
            "SUM(review AND NOT reviewed) AS unsure FROM cells WHERE sample = ?",
            (row["id"],),
        )[0]
        uploads = self._read("SELECT COUNT(*) FROM uploads WHERE sample = ?", (row["id"],))[0][0]
        return {
            "sample_id": row["sample_id"],
            "date": row["sample_date"],
            "note": row["note"],
            "wbc_count": row["wbc_count"],
            "status": row["status"],
            "version": row["version"],
            "rev": row["rev"],
            "created": row["created"],
            "created_by": row["created_by"],
            "uploads": uploads,
            "cells": stats["cells"],
            "reviewed": stats["reviewed"] or 0,
            "ood_unreviewed": stats["ood"] or 0,
            "unsure_unreviewed": stats["unsure"] or 0,
        }

    def samples(self) -> list[dict]:
        """Every sample, newest first, with its counts of cells."""
        rows = self._read(
            "SELECT s.sample_id, s.sample_date, s.note, s.status, s.version, s.created, "
            "COUNT(c.id) AS cells FROM samples s LEFT JOIN cells c ON c.sample = s.id "
            "GROUP BY s.id ORDER BY s.created DESC, s.id DESC"
        )
        return [
            {
                "sample_id": r["sample_id"],
                "date": r["sample_date"],
                "note": r["note"],
                "status": r["status"],
                "version": r["version"],
                "created": r["created"],
                "cells": r["cells"],
            }
            for r in rows
        ]

    def update_sample(
        self,
        sample_id: str,
        who: str,
        note: str | None = None,
        sample_date: str | None = None,
        wbc_count: float | None = None,
        clear_wbc_count: bool = False,
    ) -> dict:
        """Change a sample that is not signed off; None leaves a field as it is.

        Args:
            sample_id: the lab's ID of the sample.
            who: the reviewer's name or initials.
            note: the new note.
            sample_date: the new date, YYYY-MM-DD.
            wbc_count: the analyser's white-cell count, 10^9/L.
            clear_wbc_count: forget the analyser's count (wbc_count None alone leaves it).
        """
        row = self._open_sample(sample_id)
        check_who(who)
        if wbc_count is not None and not (0 < wbc_count < 1000):
            raise ReviewError(
                f"wbc_count: the analyser's white-cell count in 10^9/L, above 0 and below 1000, got {shown(wbc_count)}"
            )
        with self._write() as c:
            if note is not None:
                c.execute("UPDATE samples SET note = ? WHERE id = ?", (check_text(note, "note", MAX_NOTE), row["id"]))
            if sample_date is not None:
                c.execute("UPDATE samples SET sample_date = ? WHERE id = ?", (check_date(sample_date), row["id"]))
            if wbc_count is not None or clear_wbc_count:
                c.execute("UPDATE samples SET wbc_count = ? WHERE id = ?", (wbc_count, row["id"]))
            c.execute("UPDATE samples SET rev = rev + 1 WHERE id = ?", (row["id"],))
        return self.sample(sample_id)

    # ------------------------------------------------------------------ uploads and cells

    def add_upload(self, sample_id: str, upload: NewUpload) -> dict:
        """Store an upload and its cells; returns the upload's id and its cells' ids."""
        return self.add_uploads(sample_id, [upload])[0]

    def add_uploads(self, sample_id: str, uploads: Sequence[NewUpload]) -> list[dict]:
        """Store uploads and their cells in one transaction (all of a request, or none of it); each upload's id and
        its cells' ids."""
        labels = set(self.labels())
        for upload in uploads:
            for cell in upload.cells:
                if cell.label not in labels:
                    raise ReviewError(
                        f"cell {shown(cell.name)}: label {shown(cell.label)} is not a class of this server"
                    )
        with self._write() as c:
            row = self._locked_check(c, sample_id)
            added = [self._insert_upload(c, row, upload) for upload in uploads]
            self._bump(c, row["id"])
        return added

    def require_open(self, sample_id: str) -> dict:
        """The sample, if it may be changed (not signed off); NotFound or Conflict otherwise."""
        self._open_sample(sample_id)
        return self.sample(sample_id)

    def _insert_upload(self, c: sqlite3.Connection, row: sqlite3.Row, upload: NewUpload) -> dict:
        up = c.execute(
            "INSERT INTO uploads (sample, name, kind, width, height, info, data, created, model) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row["id"],
                upload.name,
                upload.kind,
                upload.width,
                upload.height,
                json.dumps(upload.info),
                upload.data,
                now(),
                self.model,
            ),
        ).lastrowid
        ids = []
        for cell in upload.cells:
            ids.append(
                c.execute(
                    "INSERT INTO cells (sample, upload, name, predicted, label, probabilities, confidence, review, "
                    "ood, ood_score, box, image, image_type, thumb) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        row["id"],
                        up,
                        cell.name,
                        cell.label,
                        cell.label,
                        json.dumps(cell.probabilities),
                        cell.confidence,
                        int(cell.review),
                        int(cell.ood),
                        cell.ood_score,
                        json.dumps(cell.box) if cell.box else None,
                        cell.image,
                        cell.image_type,
                        cell.thumb,
                    ),
                ).lastrowid
            )
        return {"upload": up, "cells": ids}

    def uploads(self, sample_id: str) -> list[dict]:
        row = self._sample_row(sample_id)
        return [
            {
                "id": r["id"],
                "name": r["name"],
                "kind": r["kind"],
                "width": r["width"],
                "height": r["height"],
                "created": r["created"],
                "model": r["model"],
                **json.loads(r["info"]),
            }
            for r in self._read(
                "SELECT id, name, kind, width, height, created, model, info FROM uploads WHERE sample = ? ORDER BY id",
                (row["id"],),
            )
        ]

    def upload_data(self, sample_id: str, upload_id: int) -> bytes:
        row = self._sample_row(sample_id)
        rows = self._read("SELECT data FROM uploads WHERE id = ? AND sample = ?", (upload_id, row["id"]))
        if not rows:
            raise NotFound(f"no upload {upload_id} in sample {row['sample_id']}")
        return rows[0]["data"]

    def cells(self, sample_id: str) -> list[dict]:
        """The cells of a sample without their images, in upload order."""
        row = self._sample_row(sample_id)
        return [
            _cell(r)
            for r in self._read(
                "SELECT id, upload, name, predicted, label, probabilities, confidence, review, ood, ood_score, box, "
                "reviewed, rev FROM cells WHERE sample = ? ORDER BY id",
                (row["id"],),
            )
        ]

    def cell(self, sample_id: str, cell_id: int) -> dict:
        row = self._sample_row(sample_id)
        rows = self._read(
            "SELECT id, upload, name, predicted, label, probabilities, confidence, review, ood, ood_score, "
            "box, reviewed, rev FROM cells WHERE id = ? AND sample = ?",
            (cell_id, row["id"]),
        )
        if not rows:
            raise NotFound(f"no cell {cell_id} in sample {row['sample_id']}")
        return _cell(rows[0])

    def cell_image(self, sample_id: str, cell_id: int, thumb: bool = False) -> tuple[bytes, str]:
        """A cell's image as stored, or its JPEG thumbnail (`thumb`), with its media type."""
        row = self._sample_row(sample_id)
        rows = self._read(
            f"SELECT {'thumb' if thumb else 'image'} AS data, image_type FROM cells WHERE id = ? AND sample = ?",
            (cell_id, row["id"]),
        )
        if not rows:
            raise NotFound(f"no cell {cell_id} in sample {row['sample_id']}")
        return rows[0]["data"], ("image/jpeg" if thumb else rows[0]["image_type"])

    def cell_images(self, sample_id: str) -> Iterator[tuple[dict, bytes, str]]:
        """Every cell with its image, one at a time (exports)."""
        row = self._sample_row(sample_id)
        for r in self._conn.execute(
            "SELECT id, upload, name, predicted, label, probabilities, confidence, review, ood, "
            "ood_score, box, reviewed, rev, image, image_type FROM cells WHERE sample = ? "
            "ORDER BY id",
            (row["id"],),
        ):
            yield _cell(r), r["image"], r["image_type"]


def _cell(r: sqlite3.Row) -> dict:
    return {
        "id": r["id"],
        "upload": r["upload"],
        "name": r["name"],
        "predicted": r["predicted"],
        "label": r["label"],
        "probabilities": json.loads(r["probabilities"]),
        "confidence": r["confidence"],
        "review": bool(r["review"]),
        "ood": bool(r["ood"]),
        "ood_score": r["ood_score"],
        "box": json.loads(r["box"]) if r["box"] else None,
        "reviewed": bool(r["reviewed"]),
        "rev": r["rev"],
    }

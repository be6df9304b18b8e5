"""Where a lab's reviewed samples live: one SQLite database in a folder (`--data-dir`).

A sample (the lab's ID, a date, a note, the analyser's white-cell count) holds the cells of its uploads: each cell
keeps the image a person reviews, a thumbnail, what the model said (class, probabilities, review and OOD flags) and
its label now. Every change of a label is a row of `corrections` (who, when, before, after), so it can be undone
and audited. A signed-off sample is locked; changing it needs a reason and opens a new version, and each sign-off
keeps the count it signed.

Why SQLite: one file, transactions, no server. It is opened in WAL mode with synchronous=FULL, so a change
acknowledged to the page survives a crash or a power cut, and every change is one transaction: a full disk or a
crash mid-change leaves the database as it was before that change. Two tabs on one sample cannot overwrite each
other silently: a change names the revision of the cell (or sample) it was made on, and a stale one is refused
(Conflict) with what changed and who changed it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from contextlib import contextmanager
from datetime import date as Date
from pathlib import Path
from typing import Iterator, Sequence

from bloodcell.data.classes import resolve_class
from bloodcell.review.counting import REVIEW_LABELS, CountedCell, count, role_of
from bloodcell.review.records import (
    DATABASE_FILE,
    LAB_CLASS,
    MAX_NOTE,
    MAX_REASON,
    SCHEMA,
    SCHEMA_VERSION,
    Conflict,
    NewUpload,
    NotFound,
    ReviewError,
    StoreDamaged,
    StoreFull,
    check_date,
    check_sample_id,
    check_text,
    check_who,
    now,
    shown,
)


class ReviewStore:
    """The samples of one lab in `folder`/review.sqlite3; safe to share between threads (one connection each).

    model: the name the server's model goes by (recorded with each upload); classes: its class names."""

    def __init__(self, folder: str | Path, model: str = "", classes: Sequence[str] = ()) -> None:
        self.folder = Path(folder)
        self.path = self.folder / DATABASE_FILE
        self.model = model
        self.classes = list(classes)
        self._local = threading.local()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReviewError(f"cannot create the review data folder {self.folder}: {exc.strerror or exc}") from None
        self._open()

    # ------------------------------------------------------------------ connection

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
            return conn
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None

    @property
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def _damaged(self, exc: Exception) -> StoreDamaged:
        return StoreDamaged(
            f"the review database {self.path} cannot be read ({exc}); it was left as it is: restore it "
            "from a backup, or move it aside to start an empty one"
        )

    def _open(self) -> None:
        """Create the schema on first use; refuse a file that is not a sound review database, never overwrite it."""
        conn = self._conn
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if version == 0 and not tables:
                conn.execute("PRAGMA journal_mode = WAL")
                with self._write() as c:
                    for statement in SCHEMA.split(";"):  # executescript would commit halfway
                        if statement.strip():
                            c.execute(statement)
                    c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION or "samples" not in tables:
                raise StoreDamaged(
                    f"{self.path} is not a bloodcell review database of this version (schema "
                    f"{version}, this bloodcell reads {SCHEMA_VERSION}); it was left as it is"
                )
            else:
                conn.execute("PRAGMA journal_mode = WAL")
        except sqlite3.OperationalError as exc:
            if "full" in str(exc) or "disk" in str(exc):
                raise StoreFull(f"cannot set up the review database {self.path}: {exc}") from None
            raise self._damaged(exc) from None
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction, taken with the write lock from its start; rolled back whole on any error."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise ReviewError(f"the review database is busy ({exc}): try again") from None
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and (
                "full" in str(exc) or "disk" in str(exc) or "I/O" in str(exc)
            ):
                raise StoreFull(
                    f"could not save to {self.path} ({exc}): this change was not saved; everything saved "
                    "before it is intact. Free some disk space and repeat it"
                ) from None
            if isinstance(exc, sqlite3.OperationalError) and "readonly" in str(exc).replace("-", "").replace(" ", ""):
                raise ReviewError(
                    f"cannot save to {self.path}: the file or its folder is read-only; nothing was "
                    "changed. Give the server a folder it may write (--data-dir)"
                ) from None
            if isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.IntegrityError):
                raise self._damaged(exc) from None
            raise

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        try:
            return self._conn.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def backup(self, target: str | Path) -> Path:
        """A consistent copy of the database (SQLite's online backup), safe while the server runs."""
        target = Path(target)
        if target.exists():
            raise ReviewError(f"{target} exists: choose a new file for the backup")
        out = sqlite3.connect(target)
        try:
            self._conn.backup(out)
        finally:
            out.close()
        return target

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
        """Every label a cell may be given: the model's classes in clinical order, then unidentified / smudge / artefact,
        then the lab's own."""
        model = sorted(self.classes, key=lambda c: role_of(c).order)  # clinical order: keys 1-9 follow it
        return [*model, *[r for r in REVIEW_LABELS if r not in self.classes], *self.lab_classes()]

    # ------------------------------------------------------------------ samples

    def _sample_row(self, sample_id: str) -> sqlite3.Row:
        rows = self._read("SELECT * FROM samples WHERE sample_id = ?", (check_sample_id(sample_id),))
        if not rows:
            raise NotFound(f"no sample {shown(sample_id)}")
        return rows[0]

    def create_sample(self, sample_id: str, who: str, sample_date: str | None = None, note: str = "") -> dict:
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

    def _open_sample(self, sample_id: str) -> sqlite3.Row:
        row = self._sample_row(sample_id)
        if row["status"] == "signed":
            raise _signed_off(row)
        return row

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
                    "INSERT INTO cells (sample, upload, name, predicted, label, probabilities, confidence, review, ood, "
                    "ood_score, box, image, image_type, thumb) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                "SELECT id, upload, name, predicted, label, probabilities, confidence, review, ood, ood_score, box, reviewed, "
                "rev FROM cells WHERE sample = ? ORDER BY id",
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

    # ------------------------------------------------------------------ corrections

    def relabel(self, sample_id: str, cell_id: int, label: str, who: str, rev: int | None = None) -> dict:
        """Give a cell a label (its own label again confirms it). `rev`: the cell's revision the change was made on;
        a stale one is refused (Conflict), so a second tab never overwrites a change it has not seen."""
        who = check_who(who)
        if label not in self.labels():
            raise ReviewError(f"label {shown(label)} is not a class here: one of {', '.join(self.labels())}")
        with self._write() as c:
            sample = self._locked_check(c, sample_id)
            cell = c.execute(
                "SELECT label, reviewed, rev FROM cells WHERE id = ? AND sample = ?", (cell_id, sample["id"])
            ).fetchone()
            if cell is None:
                raise NotFound(f"no cell {cell_id} in sample {sample['sample_id']}")
            if rev is not None and rev != cell["rev"]:
                raise self._stale(c, cell_id, cell)
            c.execute("UPDATE cells SET label = ?, reviewed = 1, rev = rev + 1 WHERE id = ?", (label, cell_id))
            c.execute(
                "INSERT INTO corrections (sample, cell, version, before, after, reviewed_before, rev_after, who, at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sample["id"],
                    cell_id,
                    sample["version"],
                    cell["label"],
                    label,
                    cell["reviewed"],
                    cell["rev"] + 1,
                    who,
                    now(),
                ),
            )
            sample_rev = self._bump(c, sample["id"])
        return {**self.cell(sample_id, cell_id), "sample_rev": sample_rev}

    def undo(self, sample_id: str, who: str) -> dict:
        """Undo `who`'s last change in this sample that is not undone yet; refused when the cell changed since."""
        who = check_who(who)
        with self._write() as c:
            sample = self._locked_check(c, sample_id)
            last = c.execute(
                "SELECT * FROM corrections WHERE sample = ? AND who = ? AND undo_of IS NULL AND undone = 0 "
                "AND version = ? ORDER BY id DESC LIMIT 1",
                (sample["id"], who, sample["version"]),
            ).fetchone()
            if last is None:
                raise Conflict(
                    f"nothing of {shown(who)} to undo in sample {sample['sample_id']} (version {sample['version']})"
                )
            cell = c.execute("SELECT label, reviewed, rev FROM cells WHERE id = ?", (last["cell"],)).fetchone()
            if cell["rev"] != last["rev_after"]:
                raise self._stale(c, last["cell"], cell)
            c.execute(
                "UPDATE cells SET label = ?, reviewed = ?, rev = rev + 1 WHERE id = ?",
                (last["before"], last["reviewed_before"], last["cell"]),
            )
            c.execute("UPDATE corrections SET undone = 1 WHERE id = ?", (last["id"],))
            c.execute(
                "INSERT INTO corrections (sample, cell, version, before, after, reviewed_before, rev_after, who, at, "
                "undo_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    sample["id"],
                    last["cell"],
                    sample["version"],
                    cell["label"],
                    last["before"],
                    cell["reviewed"],
                    cell["rev"] + 1,
                    who,
                    now(),
                    last["id"],
                ),
            )
            sample_rev = self._bump(c, sample["id"])
        return {**self.cell(sample_id, last["cell"]), "sample_rev": sample_rev}

    @staticmethod
    def _bump(c: sqlite3.Connection, sample: int) -> int:
        """Count a change of the sample; its new revision, read in the same transaction, tells the page that made the
        change not to reload for it (and to reload for anyone else's)."""
        c.execute("UPDATE samples SET rev = rev + 1 WHERE id = ?", (sample,))
        return c.execute("SELECT rev FROM samples WHERE id = ?", (sample,)).fetchone()[0]

    def corrections(self, sample_id: str) -> list[dict]:
        """Every change of a label in this sample, oldest first (undos included, marked)."""
        row = self._sample_row(sample_id)
        return [
            {
                "id": r["id"],
                "cell": r["cell"],
                "version": r["version"],
                "before": r["before"],
                "after": r["after"],
                "who": r["who"],
                "at": r["at"],
                "undo_of": r["undo_of"],
                "undone": bool(r["undone"]),
            }
            for r in self._read("SELECT * FROM corrections WHERE sample = ? ORDER BY id", (row["id"],))
        ]

    def _locked_check(self, c: sqlite3.Connection, sample_id: str) -> sqlite3.Row:
        sample = c.execute("SELECT * FROM samples WHERE sample_id = ?", (check_sample_id(sample_id),)).fetchone()
        if sample is None:
            raise NotFound(f"no sample {shown(sample_id)}")
        if sample["status"] == "signed":
            raise _signed_off(sample)
        return sample

    @staticmethod
    def _stale(c: sqlite3.Connection, cell_id: int, cell: sqlite3.Row) -> Conflict:
        last = c.execute(
            "SELECT who, at FROM corrections WHERE cell = ? ORDER BY id DESC LIMIT 1", (cell_id,)
        ).fetchone()
        by = f" by {last['who']} at {last['at']}" if last else ""
        return Conflict(
            f"cell {cell_id} was changed{by} since you saw it: it is now '{cell['label']}'; reload to see it"
        )

    # ------------------------------------------------------------------ count, sign-off

    def count(self, sample_id: str) -> dict:
        """The sample's differential with every correction applied (bloodcell.review.counting)."""
        row = self._sample_row(sample_id)
        cells = [
            CountedCell(r["label"], bool(r["ood"]), bool(r["reviewed"]), bool(r["review"]))
            for r in self._read("SELECT label, ood, reviewed, review FROM cells WHERE sample = ?", (row["id"],))
        ]
        return count(cells, self.lab_classes(), row["wbc_count"])

    def sign_off(self, sample_id: str, who: str, rev: int | None = None) -> dict:
        """Lock the sample and keep the count it was signed with. `rev`: the sample revision the reviewer saw."""
        who = check_who(who)
        with self._write() as c:
            sample = self._locked_check(c, sample_id)
            if rev is not None and rev != sample["rev"]:
                raise Conflict(
                    f"sample {sample['sample_id']} changed since you loaded it (revision {sample['rev']}, "
                    f"you saw {rev}): reload it and check before signing off"
                )
            cells = c.execute("SELECT COUNT(*) FROM cells WHERE sample = ?", (sample["id"],)).fetchone()[0]
            if not cells:
                raise Conflict(f"sample {sample['sample_id']} has no cells to sign off")
            snapshot = {"count": self.count(sample_id), "sample": self.sample(sample_id), "model": self.model}
            c.execute(
                "INSERT INTO signoffs (sample, version, action, who, at, snapshot) VALUES (?, ?, 'signed', ?, ?, ?)",
                (sample["id"], sample["version"], who, now(), json.dumps(snapshot)),
            )
            c.execute("UPDATE samples SET status = 'signed', rev = rev + 1 WHERE id = ?", (sample["id"],))
        return self.sample(sample_id)

    def reopen(self, sample_id: str, who: str, reason: str) -> dict:
        """Open a signed-off sample for a change: a new version, with the reason kept beside the signed one."""
        who = check_who(who)
        reason = check_text((reason or "").strip(), "reason", MAX_REASON)
        if not reason:
            raise ReviewError("reason: say why a signed-off sample is changed (it is kept with the new version)")
        with self._write() as c:
            sample = c.execute("SELECT * FROM samples WHERE sample_id = ?", (check_sample_id(sample_id),)).fetchone()
            if sample is None:
                raise NotFound(f"no sample {shown(sample_id)}")
            if sample["status"] != "signed":
                raise Conflict(f"sample {sample['sample_id']} is not signed off: change it directly")
            c.execute(
                "UPDATE samples SET status = 'open', version = version + 1, rev = rev + 1 WHERE id = ?", (sample["id"],)
            )
            c.execute(
                "INSERT INTO signoffs (sample, version, action, who, at, reason) VALUES (?, ?, 'reopened', ?, ?, ?)",
                (sample["id"], sample["version"] + 1, who, now(), reason),
            )
        return self.sample(sample_id)

    def history(self, sample_id: str) -> list[dict]:
        """Sign-offs and reopenings, oldest first; a sign-off carries the count it signed (`snapshot`)."""
        row = self._sample_row(sample_id)
        return [
            {
                "version": r["version"],
                "action": r["action"],
                "who": r["who"],
                "at": r["at"],
                "reason": r["reason"],
                "snapshot": json.loads(r["snapshot"]),
            }
            for r in self._read("SELECT * FROM signoffs WHERE sample = ? ORDER BY id", (row["id"],))
        ]


def _signed_off(sample: sqlite3.Row) -> Conflict:
    return Conflict(
        f"sample {sample['sample_id']} is signed off (version {sample['version']}): reopen it with a reason "
        "to change it"
    )


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

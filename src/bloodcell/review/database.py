"""The review database's file and its connections: one SQLite database in a folder (`--data-dir`).

Why SQLite: one file, transactions, no server. It is opened in WAL mode with synchronous=FULL, so a change
acknowledged to the page survives a crash or a power cut, and every change is one transaction: a full disk or a
crash mid-change leaves the database as it was before that change.

ReviewDatabase opens it (one connection per thread), runs each change as one transaction and turns SQLite's errors
into the review's own (StoreFull, StoreDamaged, ReviewError); it also holds the look-ups of a sample row that every
change starts with. What is stored is SampleStore's (bloodcell.review.samples), what a reviewer does with it
ReviewStore's (bloodcell.review.store).
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from bloodcell.review.records import (
    DATABASE_FILE,
    SCHEMA,
    SCHEMA_VERSION,
    Conflict,
    NotFound,
    ReviewError,
    StoreDamaged,
    StoreFull,
    check_sample_id,
    shown,
)


class ReviewDatabase:
    """The review database in `folder`/review.sqlite3; safe to share between threads (one connection each).

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

    # ------------------------------------------------------------------ the sample a change is made on

    def _sample_row(self, sample_id: str) -> sqlite3.Row:
        rows = self._read("SELECT * FROM samples WHERE sample_id = ?", (check_sample_id(sample_id),))
        if not rows:
            raise NotFound(f"no sample {shown(sample_id)}")
        return rows[0]

    def _open_sample(self, sample_id: str) -> sqlite3.Row:
        row = self._sample_row(sample_id)
        if row["status"] == "signed":
            raise _signed_off(row)
        return row

    def _locked_check(self, c: sqlite3.Connection, sample_id: str) -> sqlite3.Row:
        sample = c.execute("SELECT * FROM samples WHERE sample_id = ?", (check_sample_id(sample_id),)).fetchone()
        if sample is None:
            raise NotFound(f"no sample {shown(sample_id)}")
        if sample["status"] == "signed":
            raise _signed_off(sample)
        return sample

    @staticmethod
    def _bump(c: sqlite3.Connection, sample: int) -> int:
        """Count a change of the sample; its new revision, read in the same transaction, tells the page that made the
        change not to reload for it (and to reload for anyone else's)."""
        c.execute("UPDATE samples SET rev = rev + 1 WHERE id = ?", (sample,))
        return c.execute("SELECT rev FROM samples WHERE id = ?", (sample,)).fetchone()[0]


def _signed_off(sample: sqlite3.Row) -> Conflict:
    return Conflict(
        f"sample {sample['sample_id']} is signed off (version {sample['version']}): reopen it with a reason "
        "to change it"
    )

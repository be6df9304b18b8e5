"""What the review store keeps and refuses: its database schema, the records it takes, its errors and the checks of
every value a client sends (one line each, naming the key, quoting at most 60 characters of the value)."""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from datetime import date as Date
from datetime import datetime, timezone
from pathlib import Path

from bloodcell.errors import BloodcellError, shown

DATABASE_FILE = "review.sqlite3"
SCHEMA_VERSION = 1
SAMPLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
LAB_CLASS = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _-]{0,39}")
MAX_NOTE = 4000
MAX_WHO = 64
MAX_REASON = 1000

SCHEMA = """
CREATE TABLE samples (
    id INTEGER PRIMARY KEY,
    sample_id TEXT NOT NULL UNIQUE,
    sample_date TEXT NOT NULL,
    note TEXT NOT NULL DEFAULT '',
    wbc_count REAL,
    status TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'signed')),
    version INTEGER NOT NULL DEFAULT 1,
    rev INTEGER NOT NULL DEFAULT 0,
    created TEXT NOT NULL,
    created_by TEXT NOT NULL
);
CREATE TABLE uploads (
    id INTEGER PRIMARY KEY,
    sample INTEGER NOT NULL REFERENCES samples(id),
    name TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('cell', 'field')),
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    info TEXT NOT NULL DEFAULT '{}',
    data BLOB NOT NULL,
    created TEXT NOT NULL,
    model TEXT NOT NULL
);
CREATE TABLE cells (
    id INTEGER PRIMARY KEY,
    sample INTEGER NOT NULL REFERENCES samples(id),
    upload INTEGER NOT NULL REFERENCES uploads(id),
    name TEXT NOT NULL,
    predicted TEXT NOT NULL,
    label TEXT NOT NULL,
    probabilities TEXT NOT NULL,
    confidence REAL NOT NULL,
    review INTEGER NOT NULL,
    ood INTEGER NOT NULL,
    ood_score REAL,
    box TEXT,
    reviewed INTEGER NOT NULL DEFAULT 0,
    rev INTEGER NOT NULL DEFAULT 0,
    image BLOB NOT NULL,
    image_type TEXT NOT NULL,
    thumb BLOB NOT NULL
);
CREATE INDEX cells_by_sample ON cells(sample);
CREATE TABLE corrections (
    id INTEGER PRIMARY KEY,
    sample INTEGER NOT NULL REFERENCES samples(id),
    cell INTEGER NOT NULL REFERENCES cells(id),
    version INTEGER NOT NULL,
    before TEXT NOT NULL,
    after TEXT NOT NULL,
    reviewed_before INTEGER NOT NULL,
    rev_after INTEGER NOT NULL,
    who TEXT NOT NULL,
    at TEXT NOT NULL,
    undo_of INTEGER REFERENCES corrections(id),
    undone INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX corrections_by_sample ON corrections(sample);
CREATE TABLE signoffs (
    id INTEGER PRIMARY KEY,
    sample INTEGER NOT NULL REFERENCES samples(id),
    version INTEGER NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('signed', 'reopened')),
    who TEXT NOT NULL,
    at TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    snapshot TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE lab_classes (
    name TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('wbc', 'other')),
    added TEXT NOT NULL
);
"""


class ReviewError(BloodcellError):
    """A request the store cannot carry out; the message says why in one line."""

    status = 422


class NotFound(ReviewError):
    status = 404


class Conflict(ReviewError):
    """The sample or cell changed since the client read it, or it is signed off."""

    status = 409


class StoreFull(ReviewError):
    """The disk is full: this change was not saved; everything saved before is intact."""

    status = 507


class StoreDamaged(ReviewError):
    """The database file is not a database, or fails SQLite's check; it is left untouched."""

    status = 500


@dataclass
class NewCell:
    """A cell about to be stored: what the model said, and its image."""

    name: str
    label: str
    probabilities: dict[str, float]
    confidence: float
    review: bool
    ood: bool
    ood_score: float | None
    image: bytes
    image_type: str
    thumb: bytes
    box: list[float] | None = None


@dataclass
class NewUpload:
    """An uploaded file (a cell crop or a smear photograph) and the cells found in it."""

    name: str
    kind: str
    width: int
    height: int
    data: bytes
    cells: list[NewCell]
    info: dict = field(default_factory=dict)


def default_data_dir() -> Path:
    """Where `bloodcell serve` keeps its samples unless told (--data-dir): $BLOODCELL_DATA_DIR, else the user's data
    folder (Linux: $XDG_DATA_HOME or ~/.local/share; macOS: ~/Library/Application Support; Windows: %LOCALAPPDATA%)."""
    if os.environ.get("BLOODCELL_DATA_DIR"):
        return Path(os.environ["BLOODCELL_DATA_DIR"])
    if sys.platform == "win32":
        root = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        root = Path.home() / "Library" / "Application Support"
    else:
        root = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return root / "bloodcell"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_sample_id(sample_id: str) -> str:
    if not isinstance(sample_id, str) or not SAMPLE_ID.fullmatch(sample_id):
        raise ReviewError(
            f"sample ID {shown(sample_id)} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return sample_id


def check_who(who: str) -> str:
    who = (who or "").strip()
    if not who or len(who) > MAX_WHO or re.search(r"[\x00-\x1f\x7f]", who):
        raise ReviewError(
            f"who: give the reviewer's name or initials (1-{MAX_WHO} printable characters), got {shown(who)}"
        )
    return who


def check_text(value: str, name: str, limit: int) -> str:
    """`value` if it has at most `limit` characters; else a ReviewError naming the field `name`."""
    if len(value) > limit:
        raise ReviewError(f"{name}: at most {limit} characters, got {len(value)}")
    return value


def check_date(value: str) -> str:
    try:
        return Date.fromisoformat(str(value)).isoformat()
    except ValueError:
        raise ReviewError(f"date: use YYYY-MM-DD, got {shown(value)}") from None

"""Where a lab's reviewed samples live: one SQLite database in a folder (`--data-dir`).

A sample (the lab's ID, a date, a note, the analyser's white-cell count) holds the cells of its uploads: each cell
keeps the image a person reviews, a thumbnail, what the model said (class, probabilities, review and OOD flags) and
its label now. Every change of a label is a row of `corrections` (who, when, before, after), so it can be undone
and audited. A signed-off sample is locked; changing it needs a reason and opens a new version, and each sign-off
keeps the count it signed.

Every change is one SQLite transaction, saved before it is acknowledged (bloodcell.review.database). Two tabs on one
sample cannot overwrite each other silently: a change names the revision of the cell (or sample) it was made on,
and a stale one is refused (Conflict) with what changed and who changed it.

ReviewStore is built in three layers, one idea each: ReviewDatabase (the file, its connections and transactions),
SampleStore (bloodcell.review.samples: samples, uploads, cells, lab classes) and, here, what a reviewer does with
them: correct a label, undo it, count, sign off, reopen.
"""

from __future__ import annotations

import json
import sqlite3

from bloodcell.review.counting import CountedCell, count
from bloodcell.review.records import (
    MAX_REASON,
    Conflict,
    NotFound,
    ReviewError,
    check_sample_id,
    check_text,
    check_who,
    now,
    shown,
)
from bloodcell.review.samples import SampleStore


class ReviewStore(SampleStore):
    """The samples of one lab in `folder`/review.sqlite3; safe to share between threads (one connection each).

    model: the name the server's model goes by (recorded with each upload); classes: its class names."""

    # ------------------------------------------------------------------ corrections

    def relabel(self, sample_id: str, cell_id: int, label: str, who: str, rev: int | None = None) -> dict:
        """Give a cell a label (its own label again confirms it). `rev`: the cell's revision the change was made on;
        a stale one is refused (Conflict), so a second tab never overwrites a change it has not seen.

        Args:
            sample_id: The lab's sample ID; a signed-off sample is refused (reopen it first).
            cell_id: The cell's id within the sample.
            label: The new label: one of the store's labels().
            who: The reviewer's name or initials, recorded with the correction (1-MAX_WHO printable characters).
            rev: The cell's revision the change was made on; None skips the staleness check.
        """
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

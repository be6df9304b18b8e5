"""Render a prediction result (see Predictor) as CSV, JSON or rich tables."""

from __future__ import annotations

import csv
import io
import json
import math

from bloodcell.infer.predictor import WBC_CLASSES

FORMATS = ("table", "summary", "csv", "json")  # summary: the table without its row per image
# rich is imported in the two functions that draw tables: `predict --format csv / json`, what scripts run, does not
# pay for it at start-up.


def to_csv(result: dict) -> str:
    """One row per classified image: path,label,confidence,review,ood,ood_score,p_<class>... (the model's class
    order).

    ood is true / false, ood_score has 3 decimals; both are empty when the model has no OOD score.
    White cells found in field photographs get a row each too, named `<photo>#wbc<k>`, with two more columns at
    the end: input (cell / field) and box (x0 y0 x1 y1 in the photograph's pixels; empty for a cell image).
    """
    classes = list(result["counts"])
    fields = result.get("fields") or []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        ["path", "label", "confidence", "review", "ood", "ood_score"]
        + [f"p_{c}" for c in classes]
        + (["input", "box"] if fields else [])
    )
    rows = [(p, "cell", "") for p in result["predictions"]]
    rows += [
        (c, "field", " ".join(f"{v:.1f}" for v in c["box"])) for f in fields for c in f["cells"] if c["kind"] == "wbc"
    ]
    for p, kind, box in rows:
        ood, score = p.get("ood"), p.get("ood_score")
        w.writerow(
            [
                p["path"],
                p["label"],
                f"{p['confidence']:.6f}",
                str(p["review"]).lower(),
                "" if ood is None else str(ood).lower(),
                "" if score is None else f"{score:.3f}",
            ]
            + [f"{p['probabilities'][c]:.6f}" for c in classes]
            + ([kind, box] if fields else [])
        )
    return buf.getvalue()


def json_safe(result: dict) -> dict:
    """The result with non-finite OOD scores (nan / inf: such an image is flagged `ood`) as null, fit for strict
    JSON."""

    def fix(p: dict) -> dict:
        bad = isinstance(p.get("ood_score"), float) and not math.isfinite(p["ood_score"])
        return {**p, "ood_score": None} if bad else p

    out = {**result, "predictions": [fix(p) for p in result.get("predictions") or []]}
    if result.get("fields"):
        out["fields"] = [{**f, "cells": [fix(c) for c in f["cells"]]} for f in result["fields"]]
    return out


def to_json(result: dict) -> str:
    return json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n"


def ood_summary(result: dict) -> str | None:
    """One line on the images left out of the counts as OOD, or None when none is."""
    n, out = len(result["predictions"]), int(result.get("ood_count") or 0)
    if not out:
        return None
    if out == n:
        return (
            f"ALL {n} images look unlike the cells this model was trained on (OOD): no cell was counted. "
            "Check the image source (stain, magnification, camera) or use a model trained on such images."
        )
    return f"{out} of {n} images look unlike the cells this model was trained on (OOD): marked OOD and not counted"


def tables(result: dict, review_threshold: float | None = None, per_image: bool = True) -> list:
    """Rich renderables: one table of images (unless `per_image` is off), the differential count, the OOD line,
    flags and unreadable files.

    Images flagged OOD are marked (column "OOD", dimmed) and the count's title says how many cells it rests on;
    a model without an OOD score gets one line saying so.

    Args:
        result: a prediction result (Predictor).
        review_threshold: the calibrated confidence below which a cell needs review, named in the review line.
        per_image: whether to draw the table with one row per image.
    """
    from rich.text import Text

    out: list = []
    if result.get("fields"):
        out += field_tables(result)
        if not result["predictions"]:
            out += [Text(f"unreadable: {u['path']}: {u['reason']}", style="red") for u in result["unreadable"]]
            return out
    if per_image:
        out.append(_image_table(result))
    n = len(result["predictions"])
    ood_count = int(result.get("ood_count") or 0)
    verdict = result.get("verdict")
    if verdict:  # the folder as a whole is unlike the training labs: said first, before the count it undermines
        out.append(Text(verdict["message"], style="bold white on red"))
    out.append(_differential_table(result))

    line = None if verdict else ood_summary(result)
    if line:
        out.append(Text(line, style="bold white on red" if ood_count == n else "bold yellow"))
    elif not result.get("ood_check"):
        out.append(Text("no OOD check for this model: images unlike its training cells are counted too", style="dim"))
    review = sum(p["review"] for p in result["predictions"])
    if review:
        rule = f" (calibrated confidence below {100 * review_threshold:.0f}%)" if review_threshold else ""
        out.append(Text(f"{review} of {n} cells need review{rule}", style="yellow"))
    for flag in result["flags"]:
        if (ood_count and "(OOD)" in flag) or (verdict and flag == verdict["message"]):
            continue  # said above by ood_summary or the verdict
        out.append(Text(f"flag: {flag}", style="bold yellow"))
    for u in result["unreadable"]:
        out.append(Text(f"unreadable: {u['path']}: {u['reason']}", style="red"))
    return out


def _image_table(result: dict):
    """One row per image: its class, probability, runner-up, and its review and OOD marks (OOD rows dimmed)."""
    from rich.table import Table
    from rich.text import Text

    classes = list(result["counts"])
    image_table = Table(title="cells", title_justify="left")
    image_table.add_column("image", overflow="fold")
    image_table.add_column("class", no_wrap=True)
    image_table.add_column("probability", justify="right", no_wrap=True)
    image_table.add_column("runner-up", no_wrap=True)
    image_table.add_column("review", justify="center", no_wrap=True)
    ood_check = bool(result.get("ood_check"))
    if ood_check:
        image_table.add_column("OOD", justify="center", no_wrap=True)
    for p in result["predictions"]:
        ranked = sorted(classes, key=lambda c: -p["probabilities"][c])
        second = ranked[1] if len(ranked) > 1 else ""
        row = [
            p["path"],
            p["label"],
            f"{100 * p['confidence']:.1f}%",
            f"{second} {100 * p['probabilities'][second]:.1f}%" if second else "",
            Text("review", style="bold yellow") if p["review"] else "",
        ]
        if ood_check:
            row.append(Text("OOD", style="bold red") if p.get("ood") else "")
        image_table.add_row(*row, style="dim" if p.get("ood") else None)
    return image_table


def _differential_table(result: dict):
    """The differential count: cells and percentages per class, the title saying how many cells it rests on."""
    from rich.table import Table

    classes = list(result["counts"])
    n = len(result["predictions"])
    ood_count = int(result.get("ood_count") or 0)
    total = int(result.get("counted", n - ood_count))  # the cells the counts rest on
    title = f"{total} of {n} images; {ood_count} OOD not counted" if ood_count else f"{total} cells"
    title = f"differential count ({title})"
    diff = Table(title=title, title_justify="left", min_width=len(title))  # the title fits on one line
    for name, justify in (("class", "left"), ("cells", "right"), ("% of all", "right"), ("% of WBC", "right")):
        diff.add_column(name, justify=justify)
    for c in classes:
        wbc = result["wbc_percent"].get(c)
        diff.add_row(
            c,
            str(result["counts"][c]),
            f"{result['percent'][c]:.1f}",
            "-" if wbc is None else f"{wbc:.1f}",
            style=None if result["counts"][c] else "dim",
        )
    wbc_total = sum(result["counts"][c] for c in classes if c in WBC_CLASSES)
    diff.add_section()
    diff.add_row("total", str(total), "100.0" if total else "-", f"{wbc_total} WBC")
    return diff


def field_tables(result: dict) -> list:
    """Rich renderables for field photographs: one row per photograph, then the counts over all of them."""
    from rich.table import Table
    from rich.text import Text

    fields, summary = result["fields"], result["field_summary"]
    per_photo = Table(title="smear photographs (fields)", title_justify="left")
    for name, justify in (
        ("photograph", "left"),
        ("red cells", "right"),
        ("platelets", "right"),
        ("white cells", "left"),
    ):
        per_photo.add_column(name, justify=justify, overflow="fold")
    for f in fields:
        wbc = [c for c in f["cells"] if c["kind"] == "wbc"]
        said = ", ".join(
            f"{c['label']} {100 * c['confidence']:.0f}%"
            + (" OOD" if c.get("ood") else " review" if c["review"] else "")
            for c in wbc
        ) or (f["note"] or "none found")
        counts = f["counts"] or {}  # None: withheld (infer.field_checks), the note says why
        per_photo.add_row(
            f["path"],
            str(counts.get("rbc", "-")),
            str(counts.get("platelet", "-")),
            Text(said, style="bold red") if f.get("withheld") else said,
        )
    out: list = [per_photo]
    for f in fields:  # warnings that did not withhold the counts (the note above says the rest)
        out += [
            Text(f"warning: {f['path']}: {p['message']}", style="yellow")
            for p in f.get("problems") or []
            if not p["severe"] and p["code"] != "no_cells" and p["message"] not in f["note"]
        ]
    t = summary["totals"]
    n = summary["photos"]
    if summary.get("withheld"):
        out.append(
            Text(
                f"counts withheld for {summary['withheld']} photograph{'s' if summary['withheld'] != 1 else ''} "
                "(see above): left out of the figures below",
                style="bold red",
            )
        )
    if not n:
        return out
    title = (
        f"over {n} photograph{'s' if n != 1 else ''}: "
        f"{t['rbc']} red cells ({summary['per_photo']['rbc']:.1f} per photo), "
        f"{t['platelet']} platelets, {t['wbc']} white cells"
    )
    diff = Table(title=f"WBC differential ({summary['wbc_counted']} white cells counted)", title_justify="left")
    for name, justify in (("class", "left"), ("cells", "right"), ("% of WBC", "right")):
        diff.add_column(name, justify=justify)
    for c, k in summary["differential"].items():
        pct = summary["differential_percent"].get(c)
        diff.add_row(c, str(k), "-" if pct is None else f"{pct:.1f}", style=None if k else "dim")
    out += [Text(title, style="bold"), diff]
    if summary["wbc_ood"]:
        out.append(
            Text(
                f"{summary['wbc_ood']} white cells look unlike the classifier's training cells (OOD): not counted",
                style="bold yellow",
            )
        )
    if summary["wbc_review"]:
        out.append(Text(f"{summary['wbc_review']} white cells need review", style="yellow"))
    return out

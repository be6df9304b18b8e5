"""Render a prediction result (see Predictor) as CSV, JSON or rich tables."""

from __future__ import annotations

import csv
import io
import json

from bloodcell.infer.predictor import WBC_CLASSES

FORMATS = ("table", "csv", "json")


def to_csv(result: dict) -> str:
    """One row per classified image: path,label,confidence,review,p_<class>... (class order of the model)."""
    classes = list(result["counts"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "confidence", "review"] + [f"p_{c}" for c in classes])
    for p in result["predictions"]:
        w.writerow([p["path"], p["label"], f"{p['confidence']:.6f}", str(p["review"]).lower()]
                   + [f"{p['probabilities'][c]:.6f}" for c in classes])
    return buf.getvalue()


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2) + "\n"


def tables(result: dict, review_threshold: float | None = None) -> list:
    """Rich renderables: one table of images, the differential count, flags and unreadable files."""
    from rich.table import Table
    from rich.text import Text

    out: list = []
    classes = list(result["counts"])
    per_image = Table(title="cells", title_justify="left")
    per_image.add_column("image", overflow="fold")
    per_image.add_column("class", no_wrap=True)
    per_image.add_column("probability", justify="right", no_wrap=True)
    per_image.add_column("runner-up", no_wrap=True)
    per_image.add_column("review", justify="center", no_wrap=True)
    for p in result["predictions"]:
        ranked = sorted(classes, key=lambda c: -p["probabilities"][c])
        second = ranked[1] if len(ranked) > 1 else ""
        per_image.add_row(
            p["path"],
            p["label"],
            f"{100 * p['confidence']:.1f}%",
            f"{second} {100 * p['probabilities'][second]:.1f}%" if second else "",
            Text("review", style="bold yellow") if p["review"] else "",
        )
    out.append(per_image)

    total = len(result["predictions"])
    diff = Table(title=f"differential count ({total} cells)", title_justify="left")
    for name, justify in (("class", "left"), ("cells", "right"), ("% of all", "right"), ("% of WBC", "right")):
        diff.add_column(name, justify=justify)
    for c in classes:
        wbc = result["wbc_percent"].get(c)
        diff.add_row(c, str(result["counts"][c]), f"{result['percent'][c]:.1f}", "-" if wbc is None else f"{wbc:.1f}",
                     style=None if result["counts"][c] else "dim")
    wbc_total = sum(result["counts"][c] for c in classes if c in WBC_CLASSES)
    diff.add_section()
    diff.add_row("total", str(total), "100.0" if total else "-", f"{wbc_total} WBC")
    out.append(diff)

    review = sum(p["review"] for p in result["predictions"])
    if review:
        rule = f" (calibrated confidence below {100 * review_threshold:.0f}%)" if review_threshold else ""
        out.append(Text(f"{review} of {total} cells need review{rule}", style="yellow"))
    for flag in result["flags"]:
        out.append(Text(f"flag: {flag}", style="bold yellow"))
    for u in result["unreadable"]:
        out.append(Text(f"unreadable: {u['path']}: {u['reason']}", style="red"))
    return out

"""The printable report of a sample: one self-contained HTML page that prints cleanly on A4 or Letter.

A signed-off sample shows the count it was signed with (kept with its sign-off); an open one is marked DRAFT across
the page. The page says the model's name and version, the reviewer and every version's reason for a change.
"""

from __future__ import annotations

from html import escape

from bloodcell.intended_use import REPORT_NOTE
from bloodcell.review.store import ReviewStore

# A backslash that ends a line of the CSS joins it to the next: short lines here, the same CSS on the page.
_CSS = """
body { font: 11pt/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #111; margin: 2em auto; \
max-width: 46em; }
h1 { font-size: 16pt; margin: 0 0 .2em; } h2 { font-size: 12pt; margin: 1.2em 0 .3em; border-bottom: 1px solid #999; }
table { border-collapse: collapse; width: 100%; } th, td { text-align: left; padding: .15em .5em; \
border-bottom: 1px solid #ddd; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
.meta td:first-child { color: #555; width: 12em; } .flags li { font-weight: 600; }
.draft { color: #b00; font-weight: 700; border: 2px solid #b00; padding: .3em .6em; display: inline-block; }
.signed { color: #060; font-weight: 700; } .small { color: #555; font-size: 9pt; }
@media print { body { margin: 0; max-width: none; } h2 { break-after: avoid; } tr { break-inside: avoid; } }
@page { margin: 18mm; }
"""


def render_report(store: ReviewStore, sample_id: str, model: dict) -> str:
    """The report's HTML. model: {'name', 'version', 'bloodcell'} of the server that made the predictions."""
    sample = store.sample(sample_id)
    history = store.history(sample_id)
    result, status = _result_and_status(store, sample, history)
    fields = [u for u in store.uploads(sample_id) if u["kind"] == "field"]
    corrections = [
        c
        for c in store.corrections(sample_id)
        if not c["undone"] and c["undo_of"] is None and c["before"] != c["after"]
    ]
    parts = [
        *_heading(sample, status, result, fields),
        *_white_cells(result),
        *_not_in_the_differential(result),
        *_smear_photographs(fields),
        *_versions(history),
        f"<p class='small'>{len(corrections)} labels changed by a person. Model: {escape(model.get('name', '?'))} "
        f"(version {escape(str(model.get('version', '?')))}); "
        f"bloodcell {escape(str(model.get('bloodcell', '?')))}.</p>",
        f"<p class='small'>{escape(REPORT_NOTE)}</p></body></html>",
    ]
    return "".join(parts)


def _result_and_status(store: ReviewStore, sample: dict, history: list[dict]) -> tuple[dict, str]:
    """The count to show and the status line: the count signed with this version, else today's count as a draft."""
    signed = [h for h in history if h["action"] == "signed" and h["version"] == sample["version"]]
    if sample["status"] == "signed" and signed:
        status = (
            f'<span class="signed">Signed off by {escape(signed[-1]["who"])} at {escape(signed[-1]["at"])}</span> '
            f"(version {sample['version']})"
        )
        return signed[-1]["snapshot"]["count"], status
    return store.count(sample["sample_id"]), '<span class="draft">DRAFT: not signed off</span>'


def _heading(sample: dict, status: str, result: dict, fields: list[dict]) -> list[str]:
    """The page's head, title, status, the sample's details and the flags."""
    e = escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><link rel='icon' href='data:,'>"
        f"<title>Sample {e(sample['sample_id'])}: differential count</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Differential count: sample {e(sample['sample_id'])}</h1><p>{status}</p>",
        "<table class='meta'>",
        f"<tr><td>Sample date</td><td>{e(sample['date'])}</td></tr>",
        f"<tr><td>Note</td><td>{e(sample['note']) or '-'}</td></tr>",
        f"<tr><td>Cells</td><td>{sample['cells']} from {sample['uploads']} uploads ({len(fields)} smear photographs); "
        f"{sample['reviewed']} looked at by a person</td></tr>",
    ]
    if result["wbc_count"] is not None:
        parts.append(f"<tr><td>White-cell count (analyser)</td><td>{result['wbc_count']:g} x10<sup>9</sup>/L</td></tr>")
    if result["wbc_count_corrected"] is not None:
        parts.append(
            "<tr><td>Corrected for nucleated red cells</td>"
            f"<td>{result['wbc_count_corrected']:g} x10<sup>9</sup>/L</td></tr>"
        )
    parts.append("</table>")
    parts.append("<h2>Flags</h2>")
    parts.append(
        "<ul class='flags'>" + "".join(f"<li>{e(f)}</li>" for f in result["flags"]) + "</ul>"
        if result["flags"]
        else "<p>None.</p>"
    )
    return parts


def _white_cells(result: dict) -> list[str]:
    """The differential: each white-cell class's cells and percent (and absolute count, given the analyser's)."""
    absolute = result["wbc_count"] is not None
    parts = [
        "<h2>White cells</h2><table><thead><tr><th>Class</th><th class='n'>Cells</th><th class='n'>%</th>"
        + ("<th class='n'>x10<sup>9</sup>/L</th>" if absolute else "")
        + "</tr></thead><tbody>"
    ]
    for row in result["rows"]:
        if row["kind"] != "wbc":
            continue
        parts.append(
            f"<tr><td>{escape(row['display'])}</td><td class='n'>{row['cells']}</td>"
            f"<td class='n'>{row['percent']:.1f}</td>"
            + (f"<td class='n'>{row['absolute']:.2f}</td>" if absolute else "")
            + "</tr>"
        )
    parts.append(
        f"<tr><th>Total white cells</th><th class='n'>{result['wbc_total']}</th><th class='n'>100</th>"
        + ("<th></th>" if absolute else "")
        + "</tr></tbody></table>"
    )
    return parts


def _not_in_the_differential(result: dict) -> list[str]:
    """The cells counted beside the differential (nucleated red cells, platelets, ...) and unlabelled odd ones."""
    others = [r for r in result["rows"] if r["kind"] != "wbc"]
    if not others and not result["not_counted_ood"]:
        return []
    parts = ["<h2>Not in the differential</h2><table><tbody>"]
    for row in others:
        extra = (
            f" ({row['percent']} per 100 white cells)" if row["kind"] == "nrbc" and row["percent"] is not None else ""
        )
        parts.append(f"<tr><td>{escape(row['display'])}</td><td class='n'>{row['cells']}{extra}</td></tr>")
    if result["not_counted_ood"]:
        parts.append(
            f"<tr><td>Unlike the model's training cells, not labelled by a person</td>"
            f"<td class='n'>{result['not_counted_ood']}</td></tr>"
        )
    parts.append("</tbody></table>")
    return parts


def _smear_photographs(fields: list[dict]) -> list[str]:
    """What the smear photographs held beside the white cells."""
    if not fields:
        return []
    rbc = sum((u.get("counts") or {}).get("rbc", 0) for u in fields)
    plt = sum((u.get("counts") or {}).get("platelet", 0) for u in fields)
    withheld = sum(bool(u.get("withheld")) for u in fields)
    return [
        f"<h2>Smear photographs</h2><p>{len(fields)} photographs; found in them: {rbc} red cells, {plt} "
        f"platelets{f'; {withheld} withheld by the photograph checks' if withheld else ''}.</p>"
    ]


def _versions(history: list[dict]) -> list[str]:
    """Every sign-off and reopening, with its reason."""
    if not history:
        return []
    parts = ["<h2>Versions</h2><table><tbody>"]
    for h in history:
        what = "signed off" if h["action"] == "signed" else f"reopened: {escape(h['reason'])}"
        parts.append(
            f"<tr><td>version {h['version']}</td><td>{what}</td>"
            f"<td>{escape(h['who'])}</td><td>{escape(h['at'])}</td></tr>"
        )
    parts.append("</tbody></table>")
    return parts

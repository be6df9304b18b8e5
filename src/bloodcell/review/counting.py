"""The differential count as a lab writes it, from the labels of a reviewed sample.

Rows in clinical order: neutrophil, lymphocyte, monocyte, eosinophil, basophil, then immature granulocytes, then
blasts / other, then the lab's own white-cell classes; these are the white cells, and each row's percentage is of
them. Nucleated red cells (erythroblasts) are given per 100 white cells, as a manual count does, and are not white
cells. Platelets, smudge / broken cells, artefacts and unidentified cells are listed with their number and left out
of the differential. A cell the model flagged out-of-distribution is not counted until a person gives it a label.

A model's class names are matched to these rows by name (`role_of`): 'Neutrophils', 'NEUTROPHIL' and 'neutrophil'
are one row; a name that matches no row is a white cell of its own, after the known ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from bloodcell.data.classes import normalise_name

UNIDENTIFIED = "unidentified"
SMUDGE = "smudge"
ARTEFACT = "artefact"
# Labels a person may give that no classifier has: what a CellaVision reviewer files cells under besides the classes.
REVIEW_LABELS = (UNIDENTIFIED, SMUDGE, ARTEFACT)

# (row, display name, names that mean it); the white cells, in the order a differential is written.
WBC_ROWS = (
    (
        "neutrophil",
        "Neutrophils",
        ("neutrophil", "neutrophils", "segmented", "band", "bandneutrophil", "segmentedneutrophil"),
    ),
    ("lymphocyte", "Lymphocytes", ("lymphocyte", "lymphocytes")),
    ("monocyte", "Monocytes", ("monocyte", "monocytes")),
    ("eosinophil", "Eosinophils", ("eosinophil", "eosinophils")),
    ("basophil", "Basophils", ("basophil", "basophils")),
    (
        "ig",
        "Immature granulocytes",
        ("ig", "igs", "immaturegranulocyte", "immaturegranulocytes", "metamyelocyte", "myelocyte", "promyelocyte"),
    ),
    ("blast", "Blasts / other", ("blast", "blasts", "other", "others")),
)
NRBC_NAMES = ("erythroblast", "erythroblasts", "nrbc", "nucleatedredcell", "nucleatedredcells")
OTHER_ROWS = (
    ("platelet", "Platelets", ("platelet", "platelets", "thrombocyte", "thrombocytes")),
    (SMUDGE, "Smudge / broken cells", (SMUDGE, "smudgecell", "smudgecells", "broken", "brokencell")),
    (ARTEFACT, "Artefacts", (ARTEFACT, "artifact", "artefacts", "artifacts")),
    (UNIDENTIFIED, "Unidentified", (UNIDENTIFIED,)),
)
# A manual differential counts 100 white cells; on fewer, one cell moves a percentage by more than a point.
MIN_WBC = 100
# Share of cells the model flagged out-of-distribution (and nobody relabelled) above which the count is flagged.
OOD_FLAG_SHARE = 0.10


@dataclass(frozen=True)
class Role:
    """Where a label goes in the count: `kind` is 'wbc', 'nrbc' or 'other'; `row` its clinical row; `order` its
    place."""

    kind: str
    row: str
    display: str
    order: int


def role_of(label: str, lab_classes: Mapping[str, str] | None = None) -> Role:
    """The row a label is counted in. A lab's own class (`lab_classes`: name -> 'wbc' or 'other') or an unknown name
    is a row of its own: a white cell after the known ones, or with the 'other' rows."""
    lab = list(lab_classes or {})
    if label in lab:  # a lab's class is a row of its own, even when its name is near a known one ('band')
        kind = "other" if lab_classes[label] == "other" else "wbc"
        return Role(kind, label, label, (250 if kind == "other" else 50) + lab.index(label))
    key = normalise_name(label)
    for i, (row, display, names) in enumerate(WBC_ROWS):
        if key in names:
            return Role("wbc", row, display, i)
    if key in NRBC_NAMES:
        return Role("nrbc", "nrbc", "Nucleated red cells (per 100 WBC)", 100)
    for i, (row, display, names) in enumerate(OTHER_ROWS):
        if key in names:
            return Role("other", row, display, 200 + i)
    return Role("wbc", label, label, 50 + len(lab))  # a model class of no known row: a white cell, after the lab's


@dataclass(frozen=True)
class CountedCell:
    """What the count needs of a cell: its label now, and whether it may be counted."""

    label: str
    ood: bool = False  # the model's flag: unlike its training cells
    reviewed: bool = False  # a person gave or confirmed this label (overrides the OOD flag)
    review: bool = False  # the model was unsure


def count(
    cells: Iterable[CountedCell], lab_classes: Mapping[str, str] | None = None, wbc_count: float | None = None
) -> dict:
    """The differential of `cells` (see the module docstring) with its flags.

    wbc_count: the analyser's white-cell count (10^9/L); each white-cell row then gets an absolute count.
    Returns rows (label, display, kind, cells, percent, absolute, labels), cells, wbc_total, nrbc, nrbc_per_100_wbc,
    not_counted_ood (flagged, nobody labelled them), unreviewed_unsure (the model was unsure, nobody looked),
    wbc_count, wbc_count_corrected (for the nucleated red cells: WBC x 100 / (100 + NRBC per 100)), flags.
    """
    rows: dict[str, dict] = {}
    ood_uncounted = unsure_unreviewed = total = 0
    for cell in cells:
        total += 1
        if cell.ood and not cell.reviewed:
            ood_uncounted += 1
            continue
        if cell.review and not cell.reviewed:
            unsure_unreviewed += 1
        role = role_of(cell.label, lab_classes)
        entry = rows.setdefault(
            role.row,
            {
                "label": role.row,
                "display": role.display,
                "kind": role.kind,
                "order": role.order,
                "cells": 0,
                "labels": set(),
            },
        )
        entry["cells"] += 1
        entry["labels"].add(cell.label)
    wbc_total = sum(r["cells"] for r in rows.values() if r["kind"] == "wbc")
    nrbc = rows.get("nrbc", {}).get("cells", 0)
    nrbc_per_100 = round(100.0 * nrbc / wbc_total, 1) if wbc_total else None
    corrected = None
    if wbc_count is not None and nrbc_per_100:
        corrected = round(wbc_count * 100.0 / (100.0 + nrbc_per_100), 3)
    out_rows = []
    for r in sorted(rows.values(), key=lambda r: (r["order"], r["label"])):
        pct = round(100.0 * r["cells"] / wbc_total, 1) if r["kind"] == "wbc" and wbc_total else None
        if r["kind"] == "nrbc":
            pct = nrbc_per_100
        absolute = (
            round(wbc_count * pct / 100.0, 3)
            if wbc_count is not None and r["kind"] == "wbc" and pct is not None
            else None
        )
        out_rows.append(
            {
                "label": r["label"],
                "display": r["display"],
                "kind": r["kind"],
                "cells": r["cells"],
                "percent": pct,
                "absolute": absolute,
                "labels": sorted(r["labels"]),
            }
        )
    result = {
        "rows": out_rows,
        "cells": total,
        "wbc_total": wbc_total,
        "nrbc": nrbc,
        "nrbc_per_100_wbc": nrbc_per_100,
        "not_counted_ood": ood_uncounted,
        "unreviewed_unsure": unsure_unreviewed,
        "wbc_count": wbc_count,
        "wbc_count_corrected": corrected,
    }
    result["flags"] = flags(result, rows)
    return result


def flags(result: dict, rows: dict) -> list[str]:
    """What a haematologist must look at, most serious first."""
    out = []
    wbc = result["wbc_total"]

    def share(n: int) -> str:
        return f"{100.0 * n / wbc:.1f}% of white cells" if wbc else "no white cells counted"

    if rows.get("blast", {}).get("cells"):
        out.append(
            f"Blasts / other cells: {rows['blast']['cells']} ({share(rows['blast']['cells'])}): "
            "a haematologist must review the smear"
        )
    if rows.get("ig", {}).get("cells"):
        out.append(
            f"Immature granulocytes: {rows['ig']['cells']} ({share(rows['ig']['cells'])}): "
            "a haematologist must review the smear"
        )
    if result["nrbc"]:
        line = f"Nucleated red cells: {result['nrbc']} ({result['nrbc_per_100_wbc']} per 100 white cells)"
        if result["wbc_count_corrected"] is not None:
            line += f"; white-cell count corrected for them: {result['wbc_count_corrected']:g} x10^9/L"
        out.append(line + ": a haematologist must review the smear")
    if result["cells"] and result["not_counted_ood"] >= OOD_FLAG_SHARE * result["cells"]:
        n = result["not_counted_ood"]
        out.append(
            f"{n} of {result['cells']} cells ({100.0 * n / result['cells']:.0f}%) look unlike the cells the model was "
            "trained on and are not counted until a person labels them"
        )
    if wbc < MIN_WBC:
        out.append(
            f"The differential rests on {wbc} white cells (fewer than {MIN_WBC}): one cell moves a percentage by "
            f"more than a point"
        )
    if rows.get(UNIDENTIFIED, {}).get("cells"):
        out.append(f"Unidentified cells: {rows[UNIDENTIFIED]['cells']}")
    if result["unreviewed_unsure"]:
        out.append(f"{result['unreviewed_unsure']} cells the model was unsure of have not been looked at")
    return out

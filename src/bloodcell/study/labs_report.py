"""The leave-one-lab-out section of a study report: per held-out lab, every recipe that never saw it.

Read from each run's metrics.json `labs` (bloodcell.evaluate.labs): a lab the run never saw (`seen: false`) is a
held-out row; a lab it trained on is scored on its own test part only and shown apart. Figures are the mean over
seeds with a Student-t 95 % interval (n = seeds), or the bootstrap interval of a single run.
"""

from __future__ import annotations

from bloodcell.evaluate.stats import mean_sd_ci

COLUMNS = ["accuracy", "f1_macro", "kept_fraction", "accuracy_kept"]
KEPT_TARGET, KEPT_SHARE_TARGET = 0.95, 0.5


def _cell(values: list, single_ci=None) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    s = mean_sd_ci(vals)
    if s["ci95"]:  # a t-interval over 2-3 seeds can reach past 0 or 100 %: shown clipped to what a share can be
        lo, hi = max(0.0, s["ci95"][0]), min(1.0, s["ci95"][1])
        return f"{100 * s['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    if single_ci:
        return f"{100 * s['mean']:.1f} [{100 * single_ci[0]:.1f}, {100 * single_ci[1]:.1f}]"
    return f"{100 * s['mean']:.1f}"


def lab_rows(spec, by: dict) -> dict[tuple[str, bool], list[list[str]]]:
    """{(lab, seen): table rows}: one row per (experiment, protocol, variant) with that lab in its runs' metrics."""
    tables: dict[tuple[str, bool], list[list[str]]] = {}
    for exp in spec.experiments:
        for proto in exp.protocols:
            ms = [m for _, m in by.get((exp.name, proto), []) if m and "labs" in m]
            labs = sorted({name for m in ms for name in m["labs"]})
            for lab in labs:
                entries = [m["labs"][lab] for m in ms if lab in m["labs"]]
                seen = bool(entries[0].get("seen"))
                for variant in ("as_is", "adapted", "adapted_tent"):
                    blocks = [e[variant] for e in entries if variant in e]
                    if not blocks:
                        continue
                    label = (exp.row or exp.name) + ("" if proto == "default" else f" ({proto})")
                    label += {
                        "as_is": "",
                        "adapted": ", adapted (BatchNorm statistics of the lab)",
                        "adapted_tent": ", adapted + entropy minimisation (Tent)",
                    }[variant]
                    single = blocks[0].get("accuracy_ci95") if len(blocks) == 1 else None
                    row = [label, str(len(blocks)), str(blocks[0]["n"])]
                    row += [_cell([b.get(c) for b in blocks], single if c == "accuracy" else None) for c in COLUMNS]
                    kept = [b.get("accuracy_kept") for b in blocks]
                    share = [b.get("kept_fraction") for b in blocks]
                    ok = all(k is not None and k >= KEPT_TARGET for k in kept) and all(
                        s >= KEPT_SHARE_TARGET for s in share
                    )
                    row.append("yes" if ok else "no")
                    tables.setdefault((lab, seen), []).append(row)
    return tables


def labs_section(doc, spec, by: dict) -> None:
    """The report's leave-one-lab-out section (see the module docstring), added to `doc` (study.document.Doc).

    Args:
        doc: the report being written.
        spec: the study (its experiments and protocols).
        by: {(experiment name, protocol): [(RunSpec, metrics or None)]}, as study.report.write_report gathers them.
    """
    tables = lab_rows(spec, by)
    if not tables:
        return
    headers = [
        "Recipe",
        "seeds",
        "cells",
        "accuracy % (its classes)",
        "macro F1 %",
        "kept %",
        "kept right %",
        f"kept >= {KEPT_TARGET:.0%} right on >= {KEPT_SHARE_TARGET:.0%} kept",
    ]
    doc.h(2, "Cells from labs the model never saw (leave one lab out)")
    doc.p(
        "Each run is scored on every lab it did not train on: accuracy over the classes that lab has (the model's "
        "probabilities renormalised over them), macro F1, the share of cells neither flagged for review nor OOD "
        '(kept) and how many of those are right. "Adapted": the same model after its BatchNorm statistics were '
        "re-estimated on that lab's own images, without any of its labels (and its OOD check refitted on them); "
        '"+ Tent": then the prediction entropy minimised. Mean over seeds [Student-t 95 % CI, clipped to 0-100], '
        "or [bootstrap 95 % CI] for one run."
    )
    for (lab, seen), rows in sorted(tables.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if seen:
            continue
        doc.h(3, f"Held out: {lab}")
        doc.table(headers, rows)
    seen_tables = [(lab, rows) for (lab, seen), rows in sorted(tables.items()) if seen]
    if seen_tables:
        doc.h(3, "Labs trained on (their own test part)")
        for lab, rows in seen_tables:
            doc.p(f"**{lab}**")
            doc.table(headers, rows)

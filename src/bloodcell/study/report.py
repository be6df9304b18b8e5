"""The study report: report.md and a self-contained report.html (images embedded) built from the run directories.

Every number in it is read from a run's metrics.json / aggregate.json / predictions.csv; the paper's numbers are
read from the study config and always labelled as the paper's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bloodcell import io
from bloodcell.data.figures import plot_part_counts
from bloodcell.evaluate.plots import plot_protocol_curves
from bloodcell.intended_use import REPORT_NOTE
from bloodcell.study.compare import compare_section
from bloodcell.study.document import Doc
from bloodcell.study.experiment import lookup, read_status
from bloodcell.study.labs_report import labs_section
from bloodcell.study.results import (
    ci_text,
    mean_sd,
    metric_value,
    missing_note,
    pct,
    read_budget,
    run_metrics,
    run_seconds,
)
from bloodcell.study.runs import run_dir_for
from bloodcell.study.spec import RunSpec, StudySpec

_metrics = run_metrics  # the name tools/bundle_model.py reads a run's metrics by


def write_report(spec: StudySpec, runs: list[RunSpec], out: Path, summary: dict) -> Path:
    """Write out/report.md and out/report.html from the runs' folders; return the HTML's path.

    Args:
        spec: the study (its protocols, experiments and the paper's numbers).
        runs: every run of the study, finished or not (those not finished are shown as such).
        out: the study's folder (runs under out/runs, figures written to out/figures).
        summary: the study's status (study_status.json): runs, complete, parallel, git_commit.
    """
    out = Path(out)
    doc = Doc()
    by = {}  # (experiment, protocol) -> list of (run, metrics)
    for r in runs:
        by.setdefault((r.experiment.name, r.protocol), []).append((r, run_metrics(out, r)))
    done = [(r, m) for r, m in ((r, run_metrics(out, r)) for r in runs) if m]
    first = next((m for _, m in done if "provenance" in m), None)
    if first is None:
        first = next(
            (
                json.loads((run_dir_for(out, r) / "fold-0" / "metrics.json").read_text())
                for r, m in done
                if (run_dir_for(out, r) / "fold-0" / "metrics.json").exists()
            ),
            None,
        )
    prov = (first or {}).get("provenance", {})
    env = prov.get("environment", {})

    doc.h(1, f"bloodcell study: {spec.name}")
    doc.p(f"*{REPORT_NOTE}*")
    if spec.description:
        doc.p(spec.description)
    doc.p(
        f"**How these numbers were obtained.** Data: `{prov.get('data', '?')}` "
        f"(fingerprint `{str(prov.get('data_fingerprint', '?'))[:16]}`); "
        f"split seed = run seed; {_seeds_text(spec)}; "
        f"machine: {env.get('device', '?')} / {env.get('processor', '?')} ({env.get('cpus', '?')} CPUs). "
        f"Scale: {spec.scale or 'as configured'}. Runs complete: {summary['complete']} of {summary['runs']}. "
        f"{_wall_text(out, runs)}"
    )
    pretrained = {r.config.model.pretrained for r in runs}
    if pretrained <= {None, False}:
        doc.p(
            "**Every model was trained from scratch** (no ImageNet weights); "
            "the paper's transfer models used ImageNet weights."
        )

    compare_section(doc, spec, by, out)
    labs_section(doc, spec, by)
    _dataset_section(doc, out, prov)
    _paper_tables(doc, spec, by, out)
    _ablation_section(doc, spec, by, out)
    _paper_figures_section(doc, spec, by, out)
    _per_run_section(doc, spec, by, out)
    _environment_section(doc, out, runs, prov, summary)

    md = doc.to_markdown(out)
    io.write_text(out / "report.md", md)
    io.write_text(out / "report.html", doc.to_html(f"bloodcell study: {spec.name}"))
    return out / "report.html"


def _dataset_section(doc: Doc, out: Path, prov: dict) -> None:
    doc.h(2, "Dataset")
    ds = prov.get("dataset") or {}
    if not ds:
        doc.p("No finished run yet.")
        return
    skipped = ds.get("unreadable") or []
    dropped = ds.get("dropped_by_split") or []
    doc.p(
        f"{ds.get('images', '?'):,} readable images in {len(ds.get('classes', {}))} classes"
        + (f" out of {ds['files']:,} files" if "files" in ds else "")
        + f"; {len(skipped)} file(s) skipped; {ds.get('duplicate_groups', 0)} groups of byte-identical images "
        "kept on one side of every split; "
        f"{len(dropped)} image(s) dropped because identical copies carry different labels."
    )
    if ds.get("split_groups"):  # a CSV with a group column: patients (slides, smears) never straddle parts
        g = ds["split_groups"]
        doc.p(
            f"{ds.get('groups', '?'):,} groups (the CSV's `group` column: patient, slide or smear), "
            "each kept whole on one side of every split "
            f"and fold: {g['train']:,} in train, {g['val']:,} in validation, {g['test']:,} in test; "
            f"{g['in_more_than_one_part']} in more than one part."
        )
    for s in skipped[:10]:
        doc.p(f"Skipped `{s['path']}`: {s['reason']}.")
    for d in dropped[:10]:
        doc.p(f"Dropped `{d['path']}`: {d['reason']}.")
    counts = prov.get("split_counts")
    if counts:
        names = list(next(iter(counts.values())).keys())
        rows = [
            [n] + [f"{counts[p][n]:,}" for p in ("train", "val", "test")] + [f"{sum(counts[p][n] for p in counts):,}"]
            for n in names
        ]
        rows.append(
            ["total"]
            + [f"{sum(counts[p].values()):,}" for p in ("train", "val", "test")]
            + [f"{sum(sum(c.values()) for c in counts.values()):,}"]
        )
        doc.table(["class", "train", "val", "test", "all"], rows)
        fig = plot_part_counts(
            counts,
            names,
            out / "figures" / "class_distribution.png",
            "Class distribution per split (first run's split)",
        )
        doc.img(fig, "Class distribution in the training, validation and test parts (paper Fig. 2)")


def _paper_tables(doc: Doc, spec: StudySpec, by: dict, out: Path) -> None:
    tables = sorted({p.table for p in spec.protocols.values() if p.table})
    for t in tables:
        protos = [name for name, p in spec.protocols.items() if p.table == t]
        for proto in protos:
            p = spec.protocols[proto]
            doc.h(2, f"Table {t}: {p.title}")
            if p.note:
                doc.p(p.note)
            rows = []
            cv_rows = []
            for exp in spec.experiments:
                if proto not in exp.protocols:
                    continue
                entries = by.get((exp.name, proto), [])
                ms = [m for _, m in entries if m]
                paper = exp.paper.get(proto)
                if ms and "summary" in ms[0]:
                    cv_rows.append((exp, ms))
                    continue
                tr = [metric_value(m, "train.accuracy") for m in ms]
                te = [metric_value(m, "test.accuracy") for m in ms]
                single = lookup(ms[0], "test.ci95.accuracy") if len(ms) == 1 else None
                state = "" if ms else missing_note(out, entries)
                rows.append(
                    [
                        (exp.row or exp.name) + state,
                        mean_sd(tr),
                        mean_sd(te),
                        ci_text(te, single),
                        f"{paper[0]:.2f}" if paper else "–",
                        f"{paper[1]:.2f}" if paper else "–",
                        f"{100 * np.mean([v for v in te if v is not None]) - paper[1]:+.2f}"
                        if paper and any(v is not None for v in te)
                        else "–",
                    ]
                )
            if rows:
                doc.table(
                    [
                        "Model",
                        "Train acc % (ours)",
                        "Test acc % (ours)",
                        "95% CI test",
                        "Train % (paper)",
                        "Test % (paper)",
                        "Δ test (ours − paper)",
                    ],
                    rows,
                )
            for exp, ms in cv_rows:
                _cv_table(doc, spec, exp, ms)
            doc.p(
                "Ours: mean ± sd over seeds (one value when n=1). "
                "Precision / recall / F1 are weighted, as in the paper."
            )


def _cv_table(doc: Doc, spec: StudySpec, exp, ms: list[dict]) -> None:
    """A cross-validated experiment's table: each metric over its folds (and seeds) beside the paper's."""
    keys = [
        ("Training Accuracy", "train.accuracy"),
        ("Test Accuracy", "test.accuracy"),
        ("Precision", "test.precision_weighted"),
        ("Recall", "test.recall_weighted"),
        ("F1 Score", "test.f1_weighted"),
    ]
    paper_m = spec.paper_metrics.get(exp.name, {})
    crow = []
    for label, key in keys:
        per_fold = [v for m in ms for v in (m["per_run"].get(key) or [])]
        crow.append(
            [
                label,
                mean_sd(per_fold),
                ci_text(per_fold, None, "folds"),
                f"{paper_m[label]:.2f}" if label in paper_m else "–",
            ]
        )
    n_folds = len(ms[0]["runs"])
    doc.p(
        f"**{exp.row or exp.name}**: {n_folds}-fold cross-validation on the training part, "
        "each fold's model scored on the same held-out test part; "
        f"mean ± sd over folds{' and seeds' if len(ms) > 1 else ''}."
    )
    doc.table(["Metric", "Ours %", "95% CI", "Paper %"], crow)


def _seeds_text(spec: StudySpec) -> str:
    text = f"seeds: {', '.join(map(str, spec.seeds))} (n={len(spec.seeds)})"
    extra = {}
    for e in spec.experiments:
        if e.seeds and e.seeds != spec.seeds:
            extra.setdefault(tuple(e.seeds), []).append(e.row or e.name)
    for seeds, rows in extra.items():
        text += f"; {', '.join(dict.fromkeys(rows))}: seeds {', '.join(map(str, seeds))} (n={len(seeds)})"
    return text


def _wall_text(out: Path, runs: list[RunSpec]) -> str:
    """The sum of the finished runs' wall times (runs in parallel processes overlap), and the estimate made before
    they ran (budget.json)."""
    done = [s for s in (run_seconds(out, r) for r in runs) if s is not None]
    text = f"Sum of the finished runs' wall times: {sum(done) / 60:.0f} min" if done else ""
    budget = read_budget(out)
    if budget and text:
        text += (
            " (estimated beforehand from measured epoch rates: "
            f"{budget['total_seconds'] / 60:.0f} min for all runs, on {budget['machine']})"
        )
    return text + "." if text else ""


def _ablation_section(doc: Doc, spec: StudySpec, by: dict, out: Path) -> None:
    """Protocols that reproduce no table of the paper: each in its own section, beside the same model's Table runs."""
    reference = next(
        (name for name, p in spec.protocols.items() if p.table and name in (spec.compare or ("no_shuffle",))), None
    )
    for proto, p in spec.protocols.items():
        if p.table:
            continue
        exps = [e for e in spec.experiments if proto in e.protocols]
        if not exps:
            continue
        doc.h(2, p.title)
        if p.note:
            doc.p(p.note)
        rows = []
        for exp in exps:
            ms = [m for _, m in by.get((exp.name, proto), []) if m and "test" in m]
            if not ms:
                rows.append([exp.row or exp.name, "–", "–", "–", "–", missing_note(out, by.get((exp.name, proto), []))])
                continue
            m = ms[0]
            recalled = [k for k, v in m["test"]["per_class"].items() if v["recall"] > 0.5]
            ref = [
                mm["test"]["accuracy"]
                for e in spec.experiments
                if (e.row or e.name) == (exp.row or exp.name) and reference in e.protocols
                for _, mm in by.get((e.name, reference), [])
                if mm and "test" in mm
            ]
            rows.append(
                [
                    exp.row or exp.name,
                    mean_sd([x["train"]["accuracy"] for x in ms]),
                    mean_sd([x["test"]["accuracy"] for x in ms]),
                    mean_sd(ref) if ref else "–",
                    f"{len(recalled)} of {len(m['test']['per_class'])}"
                    + (f" ({', '.join(recalled)})" if recalled else ""),
                    "",
                ]
            )
        doc.table(
            [
                "Model",
                "Train acc %",
                "Test acc %",
                f"Test acc % under {reference}" if reference else "reference",
                "classes with recall > 50 %",
                "",
            ],
            rows,
        )


def _paper_figures_section(doc: Doc, spec: StudySpec, by: dict, out: Path) -> None:
    """The paper's run figures rebuilt from our runs: SupCon curves (Figs 7-9), the hybrid's predictions (Fig 14)."""
    doc.h(2, "The paper's figures, from these runs")
    doc.p(
        "Fig. 2 (class distribution) is in the Dataset section; "
        "every run's training curves and confusion matrix are under Per run."
    )
    figures = out / "figures"
    tables = [name for name, p in spec.protocols.items() if p.table and name != "cv"]
    for exp in spec.experiments:
        if exp.name.startswith("supcon") or (exp.row or "").lower().startswith("supervised contrastive"):
            histories = {}
            for proto in tables:
                runs = [r for r, m in by.get((exp.name, proto), []) if m]
                if runs and (run_dir_for(out, runs[0]) / "history.csv").exists():
                    histories[spec.protocols[proto].title.replace("Classification accuracies ", "")] = (
                        run_dir_for(out, runs[0]) / "history.csv"
                    )
            if histories:
                fig = plot_protocol_curves(
                    histories, figures / f"{exp.name}_curves.png", f"{exp.row or exp.name}: accuracy and loss per epoch"
                )
                doc.img(
                    fig,
                    f"{exp.row or exp.name} without and with shuffling: "
                    "accuracy (paper Figs 7 and 8) and loss (paper Fig. 9), first seed",
                )
        if exp.name.startswith("hybrid"):
            for proto in tables:
                runs = [r for r, m in by.get((exp.name, proto), []) if m]
                if runs:
                    doc.img(
                        run_dir_for(out, runs[0]) / "figures" / "predictions.png",
                        f"{exp.row or exp.name} ({spec.protocols[proto].title.lower()}): "
                        "test images with predicted and true labels (paper Fig. 14)",
                    )


def _per_run_section(doc: Doc, spec: StudySpec, by: dict, out: Path) -> None:
    doc.h(2, "Per run")
    for exp in spec.experiments:
        for proto in exp.protocols:
            entries = by.get((exp.name, proto), [])
            if not entries:
                continue
            doc.h(3, f"{exp.row or exp.name}: {spec.protocols[proto].title}")
            rows, failed = [], []
            fig_dir = None
            for r, m in entries:
                run_dir = run_dir_for(out, r)
                if not m:
                    st = read_status(run_dir)
                    failed.append((r, st))
                    continue
                single = m if "test" in m else None
                if single is None and (run_dir / "fold-0" / "metrics.json").exists():
                    single = json.loads((run_dir / "fold-0" / "metrics.json").read_text())
                    run_dir = run_dir / "fold-0"
                if single is None:
                    continue
                t = single["test"]
                rows.append(
                    [
                        f"seed {r.seed}" + (" (fold 0)" if run_dir.name == "fold-0" else ""),
                        pct(t["accuracy"]),
                        pct(t["precision_weighted"]),
                        pct(t["recall_weighted"]),
                        pct(t["f1_weighted"]),
                        pct(t["f1_macro"]),
                        f"{t['ece']:.3f} → {t.get('ece_calibrated', float('nan')):.3f}",
                        f"{read_status(run_dir_for(out, r)).get('seconds', '–')}",
                    ]
                )
                fig_dir = fig_dir or run_dir / "figures"
                per_class = t["per_class"]
            if rows:
                doc.table(
                    [
                        "run",
                        "test acc %",
                        "precision (w) %",
                        "recall (w) %",
                        "F1 (w) %",
                        "F1 (macro) %",
                        "ECE raw → calibrated",
                        "seconds",
                    ],
                    rows,
                )
                doc.table(
                    ["per-class recall %"] + list(per_class),
                    [["last run"] + [pct(v["recall"]) for v in per_class.values()]],
                )
            for r, st in failed:
                doc.p(
                    f"**Run {r.key} {st.get('state', 'not run')}**"
                    + (f": `{st.get('error')}`" if st.get("error") else ".")
                )
            if fig_dir is not None:
                doc.img(fig_dir / "curves.png", f"{exp.row or exp.name} ({proto}): accuracy and loss per epoch")
                doc.img(
                    fig_dir / "confusion.png", f"{exp.row or exp.name} ({proto}): confusion matrix on the test part"
                )


def _environment_section(doc: Doc, out: Path, runs: list[RunSpec], prov: dict, summary: dict) -> None:
    doc.h(2, "Environment")
    env = prov.get("environment", {})
    doc.table(
        ["", ""],
        [[k, str(v)] for k, v in env.items()]
        + [
            ["git commit", str(summary.get("git_commit"))],
            ["data fingerprint", str(prov.get("data_fingerprint"))],
            ["runs at once (--parallel)", str(summary.get("parallel", 1))],
        ],
    )
    estimated = {e["run"]: e["seconds"] for e in (read_budget(out) or {}).get("runs", [])}
    rows, total = [], 0.0
    for r in runs:
        st = read_status(run_dir_for(out, r))
        secs = run_seconds(out, r)
        if secs is not None:
            total += secs
        est = estimated.get(r.key)
        rows.append(
            [
                r.key,
                st.get("state", "not run"),
                f"{secs:.1f}" if secs is not None else "–",
                f"{est:.0f}" if est is not None else "–",
            ]
        )
    doc.table(["run", "state", "wall seconds", "estimated seconds (--estimate)"], rows)
    doc.p(
        f"Total wall time of finished runs: {total / 60:.1f} min. Estimates come from `bloodcell study --estimate`, "
        "which times two short epochs of each model on random images before anything runs."
    )

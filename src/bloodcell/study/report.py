"""The study report: report.md and a self-contained report.html (images embedded) built from the run directories.

Every number in it is read from a run's metrics.json / aggregate.json / predictions.csv; the paper's numbers are
read from the study config and always labelled as the paper's.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bloodcell import io
from bloodcell.evaluate.stats import mcnemar_test, mean_sd_ci, paired_difference_summary
from bloodcell.study.experiment import lookup, read_status
from bloodcell.study.runner import run_dir_for
from bloodcell.study.spec import RunSpec, StudySpec

# ------------------------------------------------------------------ a tiny document model, rendered twice


@dataclass
class Doc:
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(("table", headers, rows))

    def img(self, path: Path, caption: str) -> None:
        if path.exists():
            self.blocks.append(("img", path, caption))

    def to_markdown(self, base: Path) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append("| " + " | ".join(b[1]) + " |")
                out.append("|" + "---|" * len(b[1]))
                out += ["| " + " | ".join(r) + " |" for r in b[2]]
            elif b[0] == "img":
                out.append(f"![{b[2]}]({b[1].relative_to(base).as_posix()})")
            out.append("")
        return "\n".join(out)

    def to_html(self, title: str) -> str:
        parts = [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
        ]
        for b in self.blocks:
            if b[0] == "h":
                parts.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                parts.append(f"<p>{_inline(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{_inline(h)}</th>" for h in b[1])
                body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode()
                parts.append(f"<figure><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'><figcaption>{html.escape(b[2])}</figcaption></figure>")
        parts.append("</main></body></html>")
        return "\n".join(parts)


def _inline(text: str) -> str:
    """Escape, then the two bits of markdown the report uses: **bold** and `code`."""
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


_CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:#1d2330;background:#f6f7f9;margin:0}
main{max-width:1100px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:26px;border-bottom:3px solid #7b2d8b;padding-bottom:6px}h2{margin-top:34px;color:#5a1f66}h3{margin-top:22px}
table{border-collapse:collapse;margin:10px 0 18px;font-size:13.5px}th,td{border:1px solid #d9dce3;padding:4px 8px;text-align:right}
th{background:#f0edf3}td:first-child,th:first-child{text-align:left}tr:nth-child(even) td{background:#fafafc}
figure{margin:12px 0}img{max-width:100%;border:1px solid #e3e5ea}figcaption{font-size:12.5px;color:#5b6170}
code{background:#f1f1f4;padding:1px 4px;border-radius:3px}
"""

# ------------------------------------------------------------------ reading runs


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.2f}"


def _mean_sd(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{100 * vals[0]:.2f}"
    s = mean_sd_ci(vals)
    return f"{100 * s['mean']:.2f} ± {100 * s['sd']:.2f}"


def _ci(values: list[float], single_ci, unit: str = "seeds") -> str:
    vals = [v for v in values if v is not None]
    if len(vals) >= 2:
        lo, hi = mean_sd_ci(vals)["ci95"]
        return f"[{100 * lo:.2f}, {100 * hi:.2f}] (t, n={len(vals)} {unit})"
    if len(vals) == 1 and single_ci:
        return f"[{100 * single_ci[0]:.2f}, {100 * single_ci[1]:.2f}] (bootstrap)"
    return "–"


def _metrics(out: Path, run: RunSpec) -> dict | None:
    d = run_dir_for(out, run)
    if read_status(d).get("state") != "complete":
        return None
    for name in ("metrics.json", "aggregate.json"):
        if (d / name).exists():
            return json.loads((d / name).read_text())
    return None


def _value(m: dict, key: str):
    """A metric from a single run (metrics.json) or the mean over folds (aggregate.json)."""
    if "summary" in m:
        s = m["summary"].get(key)
        return None if s is None else s["mean"]
    return lookup(m, key)


def _predictions(run_dir: Path) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    f = run_dir / "predictions.csv"
    if not f.exists():
        return None
    with open(f) as fh:
        rows = list(csv.DictReader(fh))
    names = {n: i for i, n in enumerate(sorted({r["true"] for r in rows} | {r["pred"] for r in rows}))}
    return [r["path"] for r in rows], np.array([names[r["true"]] for r in rows]), np.array([names[r["pred"]] for r in rows])


# ------------------------------------------------------------------ the report


def write_report(spec: StudySpec, runs: list[RunSpec], out: Path, summary: dict) -> Path:
    out = Path(out)
    doc = Doc()
    by = {}  # (experiment, protocol) -> list of (run, metrics)
    for r in runs:
        by.setdefault((r.experiment.name, r.protocol), []).append((r, _metrics(out, r)))
    done = [(r, m) for r, m in ((r, _metrics(out, r)) for r in runs) if m]
    first = next((m for _, m in done if "provenance" in m), None)
    if first is None:
        first = next((json.loads((run_dir_for(out, r) / "fold-0" / "metrics.json").read_text()) for r, m in done if (run_dir_for(out, r) / "fold-0" / "metrics.json").exists()), None)
    prov = (first or {}).get("provenance", {})
    env = prov.get("environment", {})

    doc.h(1, f"bloodcell study: {spec.name}")
    if spec.description:
        doc.p(spec.description)
    doc.p(
        f"**How these numbers were obtained.** Data: `{prov.get('data', '?')}` (fingerprint `{str(prov.get('data_fingerprint', '?'))[:16]}`); "
        f"split seed = run seed; seeds: {', '.join(map(str, spec.seeds))} (n={len(spec.seeds)}); "
        f"machine: {env.get('device', '?')} / {env.get('processor', '?')} ({env.get('cpus', '?')} CPUs). "
        f"Scale: {spec.scale or 'as configured'}. Runs complete: {summary['complete']} of {summary['runs']}."
    )
    pretrained = {r.config.model.pretrained for r in runs}
    if pretrained <= {None, False}:
        doc.p("**Every model was trained from scratch** (no ImageNet weights); the paper's transfer models used ImageNet weights.")

    _dataset_section(doc, out, prov)
    _paper_tables(doc, spec, by, out)
    _shuffle_section(doc, spec, by, out)
    _per_run_section(doc, spec, by, out)
    _environment_section(doc, out, runs, prov, summary)

    md = doc.to_markdown(out)
    io.write_text(out / "report.md", md)
    io.write_text(out / "report.html", doc.to_html(f"bloodcell study: {spec.name}"))
    return out / "report.html"


def _dataset_section(doc: Doc, out: Path, prov: dict) -> None:
    from bloodcell.data.figures import plot_part_counts

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
        + f"; {len(skipped)} file(s) skipped; {ds.get('duplicate_groups', 0)} groups of byte-identical images kept on one side of every split; "
        f"{len(dropped)} image(s) dropped because identical copies carry different labels."
    )
    for s in skipped[:10]:
        doc.p(f"Skipped `{s['path']}`: {s['reason']}.")
    for d in dropped[:10]:
        doc.p(f"Dropped `{d['path']}`: {d['reason']}.")
    counts = prov.get("split_counts")
    if counts:
        names = list(next(iter(counts.values())).keys())
        rows = [[n] + [f"{counts[p][n]:,}" for p in ("train", "val", "test")] + [f"{sum(counts[p][n] for p in counts):,}"] for n in names]
        rows.append(["total"] + [f"{sum(counts[p].values()):,}" for p in ("train", "val", "test")] + [f"{sum(sum(c.values()) for c in counts.values()):,}"])
        doc.table(["class", "train", "val", "test", "all"], rows)
        fig = plot_part_counts(counts, names, out / "figures" / "class_distribution.png", "Class distribution per split (first run's split)")
        doc.img(fig, "Class distribution in the training, validation and test parts (paper Fig. 2)")


def _missing(out: Path, entries: list) -> str:
    """Why a row has no numbers: '(failed)', '(interrupted)' or '(not run yet)'."""
    states = {read_status(run_dir_for(out, r)).get("state") for r, _ in entries}
    if "failed" in states:
        return " (failed)"
    return " (interrupted)" if "running" in states else " (not run yet)"


def _paper_tables(doc: Doc, spec: StudySpec, by: dict, out: Path) -> None:
    tables = sorted({p.table for p in spec.protocols.values() if p.table})
    for t in tables:
        protos = [name for name, p in spec.protocols.items() if p.table == t]
        for proto in protos:
            p = spec.protocols[proto]
            doc.h(2, f"Table {t}: {p.title}")
            rows = []
            cv_rows = []
            for exp in spec.experiments:
                if proto not in exp.protocols:
                    continue
                entries = by.get((exp.name, proto), [])
                ms = [m for _, m in entries if m]
                paper = exp.paper.get(proto)
                if ms and "summary" in ms[0]:
                    cv_rows.append((exp, ms, paper))
                    continue
                tr = [_value(m, "train.accuracy") for m in ms]
                te = [_value(m, "test.accuracy") for m in ms]
                single = lookup(ms[0], "test.ci95.accuracy") if len(ms) == 1 else None
                state = "" if ms else _missing(out, entries)
                rows.append([
                    (exp.row or exp.name) + state,
                    _mean_sd(tr), _mean_sd(te), _ci(te, single),
                    f"{paper[0]:.2f}" if paper else "–", f"{paper[1]:.2f}" if paper else "–",
                    f"{100 * np.mean([v for v in te if v is not None]) - paper[1]:+.2f}" if paper and any(v is not None for v in te) else "–",
                ])
            if rows:
                doc.table(["Model", "Train acc % (ours)", "Test acc % (ours)", "95% CI test", "Train % (paper)", "Test % (paper)", "Δ test (ours − paper)"], rows)
            for exp, ms, paper in cv_rows:
                keys = [("Training Accuracy", "train.accuracy"), ("Test Accuracy", "test.accuracy"), ("Precision", "test.precision_weighted"), ("Recall", "test.recall_weighted"), ("F1 Score", "test.f1_weighted")]
                paper_m = spec.paper_metrics.get(exp.name, {})
                crow = []
                for label, key in keys:
                    per_fold = [v for m in ms for v in (m["per_run"].get(key) or [])]
                    crow.append([label, _mean_sd(per_fold), _ci(per_fold, None, "folds"), f"{paper_m[label]:.2f}" if label in paper_m else "–"])
                n_folds = len(ms[0]["runs"])
                doc.p(f"**{exp.row or exp.name}**: {n_folds}-fold cross-validation on the training part, each fold's model scored on the same held-out test part; mean ± sd over folds{' and seeds' if len(ms) > 1 else ''}.")
                doc.table(["Metric", "Ours %", "95% CI", "Paper %"], crow)
            doc.p("Ours: mean ± sd over seeds (one value when n=1). Precision / recall / F1 are weighted, as in the paper.")


def _p(p: float) -> str:
    return "< 1e-16" if p < 1e-16 else f"{p:.3g}"  # below double precision's resolution near 1


def _shuffle_section(doc: Doc, spec: StudySpec, by: dict, out: Path) -> None:
    pairs = [(e, "no_shuffle", "shuffle") for e in spec.experiments if {"no_shuffle", "shuffle"} <= set(e.protocols)]
    if not pairs:
        return
    doc.h(2, "Effect of shuffling")
    doc.p(
        "`no_shuffle`: the training part keeps dataset order (class, then file name), validation is its last 20 % "
        "(as Keras `validation_split` takes it) and batches are not reshuffled. `shuffle`: the training part is shuffled "
        "before a stratified validation part is carved out, and batches are reshuffled every epoch. Both protocols share "
        "the same test part for a given seed, so their test predictions are compared pairwise (McNemar's test)."
    )
    rows, sentences = [], []
    for exp, a, b in pairs:
        ra = {r.seed: (r, m) for r, m in by.get((exp.name, a), []) if m}
        rb = {r.seed: (r, m) for r, m in by.get((exp.name, b), []) if m}
        seeds = sorted(set(ra) & set(rb))
        if not seeds:
            continue
        acc_a = [lookup(ra[s][1], "test.accuracy") for s in seeds]
        acc_b = [lookup(rb[s][1], "test.accuracy") for s in seeds]
        pvals = []
        for s in seeds:
            pa, pb = _predictions(run_dir_for(out, ra[s][0])), _predictions(run_dir_for(out, rb[s][0]))
            if pa and pb and pa[0] == pb[0]:
                pvals.append(mcnemar_test(pa[1], pa[2], pb[2])["p_value"])
        diff = 100 * (np.mean(acc_b) - np.mean(acc_a))
        paired = paired_difference_summary(acc_b, acc_a) if len(seeds) >= 2 else None
        p_text = ", ".join(_p(p) for p in pvals) or "–"
        rows.append([exp.row or exp.name, _mean_sd(acc_a), _mean_sd(acc_b), f"{diff:+.2f}", p_text, _p(paired['p_value']) if paired and paired.get("p_value") is not None else "–", str(len(seeds))])
        beyond = pvals and all(p < 0.05 for p in pvals)
        verdict = "beyond noise" if beyond else "within noise"
        sentences.append(
            f"**{exp.row or exp.name}**: shuffling changed test accuracy by {diff:+.2f} points "
            f"({'McNemar p < 0.05 on every seed' if beyond else 'McNemar p ≥ 0.05 on at least one seed'}): the difference is {verdict}."
        )
    doc.table(["Model", "No shuffle test %", "Shuffle test %", "Δ (shuffle − no)", "McNemar p per seed", "paired t p (seeds)", "seeds"], rows)
    for s in sentences:
        doc.p(s)


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
                rows.append([f"seed {r.seed}" + (" (fold 0)" if run_dir.name == "fold-0" else ""), _pct(t["accuracy"]), _pct(t["precision_weighted"]), _pct(t["recall_weighted"]), _pct(t["f1_weighted"]), _pct(t["f1_macro"]),
                             f"{t['ece']:.3f} → {t.get('ece_calibrated', float('nan')):.3f}", f"{read_status(run_dir_for(out, r)).get('seconds', '–')}"])
                fig_dir = fig_dir or run_dir / "figures"
                per_class = t["per_class"]
            if rows:
                doc.table(["run", "test acc %", "precision (w) %", "recall (w) %", "F1 (w) %", "F1 (macro) %", "ECE raw → calibrated", "seconds"], rows)
                doc.table(["per-class recall %"] + list(per_class), [["last run"] + [_pct(v["recall"]) for v in per_class.values()]])
            for r, st in failed:
                doc.p(f"**Run {r.key} {st.get('state', 'not run')}**" + (f": `{st.get('error')}`" if st.get("error") else "."))
            if fig_dir is not None:
                doc.img(fig_dir / "curves.png", f"{exp.row or exp.name} ({proto}): accuracy and loss per epoch")
                doc.img(fig_dir / "confusion.png", f"{exp.row or exp.name} ({proto}): confusion matrix on the test part")
                doc.img(fig_dir / "predictions.png", f"{exp.row or exp.name} ({proto}): test images with predicted and true labels")


def _environment_section(doc: Doc, out: Path, runs: list[RunSpec], prov: dict, summary: dict) -> None:
    doc.h(2, "Environment")
    env = prov.get("environment", {})
    doc.table(["", ""], [[k, str(v)] for k, v in env.items()] + [["git commit", str(summary.get("git_commit"))], ["data fingerprint", str(prov.get("data_fingerprint"))]])
    rows, total = [], 0.0
    for r in runs:
        st = read_status(run_dir_for(out, r))
        secs = st.get("seconds")
        if isinstance(secs, (int, float)):
            total += secs
        rows.append([r.key, st.get("state", "not run"), f"{secs:.1f}" if isinstance(secs, (int, float)) else "–"])
    doc.table(["run", "state", "wall seconds"], rows)
    doc.p(f"Total wall time of finished runs: {total / 60:.1f} min.")

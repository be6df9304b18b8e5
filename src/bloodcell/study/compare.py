"""The report's first section: the protocol pair of a study's `compare` (the paper's shuffling question), each
seed's two models compared pairwise on the same test images."""

from __future__ import annotations

from pathlib import Path

from bloodcell.evaluate.stats import mcnemar_test, paired_difference_summary
from bloodcell.study.document import Doc
from bloodcell.study.results import mean_sd, p_text, read_predictions
from bloodcell.study.runs import run_dir_for
from bloodcell.study.spec import StudySpec


def paired_runs(by: dict, out: Path, exp, a: str, b: str) -> dict | None:
    """Seeds run under both protocols: accuracies, per-seed McNemar p-values and the paired difference b - a.

    Args:
        by: The study's runs grouped as {(experiment name, protocol): [(RunSpec, metrics or None), ...]}.
        out: The study's output folder (its runs' predictions are read for McNemar's test).
        exp: The experiment (its `name` is looked up in `by`).
        a: The first protocol's name (the reference of the difference).
        b: The second protocol's name.
    """
    ra = {r.seed: (r, m) for r, m in by.get((exp.name, a), []) if m and "test" in m}
    rb = {r.seed: (r, m) for r, m in by.get((exp.name, b), []) if m and "test" in m}
    seeds = sorted(set(ra) & set(rb))
    if not seeds:
        return None
    acc_a = [ra[s][1]["test"]["accuracy"] for s in seeds]
    acc_b = [rb[s][1]["test"]["accuracy"] for s in seeds]
    pvals = []
    for s in seeds:
        pa, pb = read_predictions(run_dir_for(out, ra[s][0])), read_predictions(run_dir_for(out, rb[s][0]))
        if pa and pb and pa[0] == pb[0]:  # the same test images in the same order: a paired test applies
            pvals.append(mcnemar_test(pa[1], pa[2], pb[2])["p_value"])
    diffs = [y - x for x, y in zip(acc_a, acc_b)]
    return {
        "seeds": seeds,
        "a": acc_a,
        "b": acc_b,
        "diffs": diffs,
        "mcnemar": pvals,
        "paired": paired_difference_summary(acc_b, acc_a) if len(seeds) >= 2 else None,
    }


def compare_section(doc: Doc, spec: StudySpec, by: dict, out: Path) -> None:
    """The protocol pair of `compare` (the paper's shuffling question), seed by seed, at the top of the report.

    Args:
        doc: The report being written; nothing is added when no experiment has runs under both protocols.
        spec: The study; its `compare` pair, else (no_shuffle, shuffle) when it defines both.
        by: The study's runs grouped as {(experiment name, protocol): [(RunSpec, metrics or None), ...]}.
        out: The study's output folder.
    """
    pair = spec.compare or (("no_shuffle", "shuffle") if {"no_shuffle", "shuffle"} <= set(spec.protocols) else None)
    if not pair:
        return
    a, b = pair
    ta, tb = spec.protocols[a], spec.protocols[b]
    found = [(e, paired_runs(by, out, e, a, b)) for e in spec.experiments if {a, b} <= set(e.protocols)]
    found = [(e, r) for e, r in found if r]
    if not found:
        return
    doc.h(2, f"The shuffling question: {ta.title.lower()} vs {tb.title.lower()}")
    doc.p(
        f"The paper reads the differences between its Tables {ta.table or '?'} and {tb.table or '?'} "
        "(1-8 points) as effects of "
        f"shuffling, from one run each. Here both protocols run with the same seeds; a seed fixes the test part, so "
        f"each seed's two models are scored on the same test images and compared pairwise (McNemar's test), and the "
        f"difference {b} − {a} is averaged over seeds with a t confidence interval."
    )
    rows, sentences = [], []
    for exp, r in found:
        n = len(r["seeds"])
        paired = r["paired"]
        ci = (
            f"{100 * paired['mean_difference']:+.2f} [{100 * paired['ci95'][0]:+.2f}, {100 * paired['ci95'][1]:+.2f}]"
            if paired
            else f"{100 * r['diffs'][0]:+.2f}"
        )
        paper_a, paper_b = exp.paper.get(a), exp.paper.get(b)
        paper_d = paper_b[1] - paper_a[1] if paper_a and paper_b else None
        n_sig = sum(p < 0.05 for p in r["mcnemar"])
        rows.append(
            [
                exp.row or exp.name,
                str(n),
                mean_sd(r["a"]),
                mean_sd(r["b"]),
                ci,
                f"{n_sig} of {len(r['mcnemar'])}" if r["mcnemar"] else "–",
                p_text(paired["p_value"]) if paired and paired.get("p_value") is not None else "–",
                f"{paper_d:+.2f}" if paper_d is not None else "–",
            ]
        )
        sentences.append(_verdict(exp.row or exp.name, r, paper_d))
    doc.table(
        [
            "Model",
            "seeds",
            f"{a} test % (mean ± sd)",
            f"{b} test % (mean ± sd)",
            f"Δ {b} − {a}, points [95% CI]",
            "McNemar p < 0.05",
            "paired t p",
            "paper Δ (one run each)",
        ],
        rows,
    )
    for text in sentences:
        doc.p(text)


def _verdict(name: str, r: dict, paper_d: float | None) -> str:
    """One plain sentence: is the difference beyond what another seed gives?"""
    n, diffs = len(r["seeds"]), [100 * d for d in r["diffs"]]
    sig = sum(p < 0.05 for p in r["mcnemar"])
    if n < 2:
        return (
            f"**{name}**: one seed only, a difference of {diffs[0]:+.2f} points "
            f"(McNemar p = {p_text(r['mcnemar'][0]) if r['mcnemar'] else '–'}); "
            "a single pair of runs cannot separate shuffling from chance."
        )
    paired = r["paired"]
    lo, hi = 100 * paired["ci95"][0], 100 * paired["ci95"][1]
    within = lo <= 0 <= hi
    spread = f"single-seed differences ranged from {min(diffs):+.2f} to {max(diffs):+.2f} points"
    text = (
        f"**{name}**: over {n} seeds shuffling changed test accuracy by {100 * paired['mean_difference']:+.2f} points "
        f"(95% CI {lo:+.2f} to {hi:+.2f}; McNemar p < 0.05 on {sig} of {len(r['mcnemar'])} seeds); "
        + ("no evidence of an effect: " if within else "an effect beyond seed-to-seed noise: ")
        + spread
    )
    if paper_d is not None:
        inside = min(diffs) <= paper_d <= max(diffs)
        text += f"; the paper's {paper_d:+.2f} points from one run each " + (
            "is inside that range." if inside else "is outside that range."
        )
    else:
        text += "."
    return text

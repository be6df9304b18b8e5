"""Score any model on any labelled folder: `bloodcell evaluate DIR --model M`.

The folder is ImageFolder style (one sub-folder per class). Its folder names are matched to the model's
classes (case, spaces / underscores / hyphens and a plural "s" / "es" ignored; `--map folder=class` wins),
every readable image is classified through the public `Predictor.predict_paths`, and the result is scored

* over all the model's classes ("full", e.g. 8-way): what the model does when it is used as shipped, and
* over the classes present in the folder only ("restricted"): the probabilities renormalised over those
  classes and the argmax taken among them; this is the number to compare with a paper that trained on
  just those classes (e.g. a 5-class white-cell set scored by an 8-class model).

Written to out_dir: metrics.json, predictions.csv, figures/confusion.png, figures/reliability.png
(plus figures/confusion_restricted.png when restricted) and report.md.
"""

from __future__ import annotations

import csv
import io as _io
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from bloodcell import io
from bloodcell.data.classes import normalise_name, resolve_class
from bloodcell.data.discover import scan
from bloodcell.errors import DataError
from bloodcell.evaluate.machine import environment
from bloodcell.evaluate.metrics import classification_metrics, restrict
from bloodcell.evaluate.plots import plot_confusion_matrix, plot_reliability_diagram
from bloodcell.intended_use import REPORT_NOTE


# ---------------------------------------------------------------------- folder -> class matching


def parse_mappings(items: Iterable[str]) -> dict[str, str]:
    """`--map folder=class` strings -> {folder: class}; a malformed one is a one-line DataError."""
    out: dict[str, str] = {}
    for item in items:
        folder, sep, target = str(item).partition("=")
        if not sep or not folder.strip() or not target.strip():
            raise DataError(f"--map takes FOLDER=CLASS, got '{item}'")
        out[folder.strip()] = target.strip()
    return out


def match_folders(
    folders: Sequence[str], class_names: Sequence[str], mapping: Mapping[str, str] | None = None
) -> dict[str, str]:
    """{folder name: model class} for every folder; explicit `mapping` entries win over name matching.

    Raises a one-line DataError for a folder no class matches (naming it, listing the model's classes and
    suggesting --map), for a --map target that is not a model class, and for a --map folder that is not in
    the dataset.
    """
    classes = ", ".join(class_names)
    explicit: dict[str, str] = {}
    for key, target in (mapping or {}).items():
        folder = key if key in folders else next((f for f in folders if normalise_name(f) == normalise_name(key)), None)
        if folder is None:
            raise DataError(
                f"--map {key}={target}: the folder has no class folder '{key}' (its folders: {', '.join(folders)})"
            )
        cls = resolve_class(target, class_names)
        if cls is None:
            raise DataError(f"--map {key}={target}: '{target}' is not a class of the model (its classes: {classes})")
        explicit[folder] = cls
    out: dict[str, str] = {}
    for folder in folders:
        cls = explicit.get(folder) or resolve_class(folder, class_names)
        if cls is None:
            raise DataError(
                f"class folder '{folder}' matches no class of the model (its classes: {classes}); "
                f"use --map '{folder}=CLASS'"
            )
        out[folder] = cls
    return out


# ---------------------------------------------------------------------- evaluation


def _restrict(probs: np.ndarray, present: list[int]) -> tuple[np.ndarray, int]:
    """evaluate.metrics.restrict, and how many rows had no mass over the `present` columns (made uniform)."""
    return restrict(probs, present), int((probs[:, present].sum(axis=1) <= 0).sum())


def _accuracy(correct: np.ndarray, keep: np.ndarray) -> float | None:
    return float(correct[keep].mean()) if keep.any() else None


def evaluate_folder(
    predictor: Any,
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    mapping: Mapping[str, str] | None = None,
    *,
    progress: bool = True,
    n_bootstrap: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
    model_source: str | None = None,
) -> dict:
    """Classify every image of a labelled folder with `predictor`, score it, write the outputs; return metrics.

    Args:
        predictor: a bloodcell.infer.Predictor (anything with class_names, model_name, source and predict_paths).
        folder: ImageFolder style, one sub-folder per class (or a labels.csv data.discover.scan reads).
        out_dir: where metrics.json, predictions.csv, figures/ and report.md are written.
        mapping: {folder name: model class}, winning over automatic name matching.
        n_bootstrap, seed: the bootstrap of the confidence intervals.
        model_source: what the provenance names as the model (default: predictor.source).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    names = [str(c) for c in predictor.class_names]
    inv = scan(folder, cache_dir=None, progress=progress)
    class_map = match_folders(inv.class_names, names, mapping)
    cells = _classify(predictor, inv, class_map, names, batch_size, progress)
    scores = _Scores.of(cells, names, n_bootstrap, seed)
    metrics: dict = {
        "folder": str(inv.root),
        "n": cells.n,
        "classes_present": scores.present_names,
        "full": scores.full,
        "restricted": scores.restricted,
        "review": _review_block(cells, scores, getattr(predictor, "review_threshold", None)),
        "ood": _ood_block(cells, scores) if cells.has_ood else None,
        **_predicted_as(scores, names, cells.n),
        "unreadable": cells.unreadable,
        "provenance": _provenance(predictor, inv, cells.n, class_map, mapping, model_source, n_bootstrap, seed),
    }
    _write_predictions(out_dir / "predictions.csv", cells, names, scores.pred_full, scores.pred_r)
    _figures(out_dir / "figures", metrics, cells.probs, cells.y, scores.present, names)
    metrics["provenance"]["evaluate_seconds"] = round(time.perf_counter() - t0, 2)
    io.write_json(out_dir / "metrics.json", metrics)
    io.write_text(out_dir / "report.md", report_markdown(metrics))
    return metrics


@dataclass
class _Cells:
    """The folder's classified images: where they are, their true class and what the model said."""

    relpaths: list[str]
    true_names: list[str]
    preds: list[dict]  # Predictor results, one per image
    y: np.ndarray  # true class indices into the model's classes
    probs: np.ndarray  # (n, k), rows summing to 1
    review: np.ndarray  # flagged for review
    ood: np.ndarray  # flagged out-of-distribution
    has_ood: bool  # the model has an OOD score at all
    unreadable: list[dict]  # {path, reason}: to the scan or to the model's decoder

    @property
    def n(self) -> int:
        return len(self.relpaths)


def _classify(predictor, inv, class_map: dict, names: list[str], batch_size: int, progress: bool) -> _Cells:
    """Every readable image of the inventory `inv` classified; a one-line DataError when none is."""
    unreadable = [{"path": s.path, "reason": s.reason} for s in inv.skipped]
    if not inv.records:
        raise DataError(f"no readable images in {inv.root} ({len(unreadable)} unreadable)")
    files = [inv.path(i) for i in range(len(inv.records))]
    rel_of = {str(p): r.relpath for p, r in zip(files, inv.records)}
    result = predictor.predict_paths(files, batch_size=batch_size, progress=progress)
    for u in result.get("unreadable", []):  # readable to the scan, not to the model's decoder
        unreadable.append({"path": rel_of.get(str(u["path"]), str(u["path"])), "reason": u["reason"]})
    by_path = {str(p["path"]): p for p in result["predictions"]}
    rows = [
        (rel_of[str(f)], class_map[r.label], by_path[str(f)]) for f, r in zip(files, inv.records) if str(f) in by_path
    ]
    if not rows:
        raise DataError(f"no image in {inv.root} could be classified ({len(unreadable)} unreadable)")
    preds = [r[2] for r in rows]
    probs = np.array([[float(p["probabilities"][c]) for c in names] for p in preds], dtype=np.float64)
    return _Cells(
        relpaths=[r[0] for r in rows],
        true_names=[r[1] for r in rows],
        preds=preds,
        y=np.array([names.index(r[1]) for r in rows], dtype=int),
        probs=probs / probs.sum(axis=1, keepdims=True),
        review=np.array([bool(p.get("review", False)) for p in preds]),
        ood=np.array([bool(p.get("ood", False)) for p in preds]),
        has_ood=any(p.get("ood") is not None for p in preds),  # None: the model has no OOD score
        unreadable=unreadable,
    )


@dataclass
class _Scores:
    """The cells scored over all the model's classes and over the classes present in the folder (restricted)."""

    full: dict
    pred_full: np.ndarray
    present: list[int]
    present_names: list[str]
    restricted: dict | None  # None: every class of the model is present
    pred_r: np.ndarray  # restricted predictions (model class indices); pred_full when not restricted

    @classmethod
    def of(cls, cells: _Cells, names: list[str], n_bootstrap: int, seed: int) -> "_Scores":
        full = classification_metrics(cells.y, cells.probs, names, n_bootstrap=n_bootstrap, seed=seed)
        pred_full = cells.probs.argmax(axis=1)
        present = sorted({names.index(t) for t in cells.true_names})
        present_names = [names[i] for i in present]
        if len(present) == len(names):
            return cls(full, pred_full, present, present_names, None, pred_full)
        probs_r, no_mass = _restrict(cells.probs, present)
        y_r = np.array([present.index(t) for t in cells.y], dtype=int)
        pred_r = np.array([present[j] for j in probs_r.argmax(axis=1)], dtype=int)
        if len(present) >= 2:
            restricted = classification_metrics(y_r, probs_r, present_names, n_bootstrap=n_bootstrap, seed=seed)
        else:  # one class: every restricted prediction is right by construction
            restricted = {
                "n": cells.n,
                "class_names": present_names,
                "accuracy": 1.0,
                "ci95": None,
                "note": "one class present: restricted accuracy is 1 by construction",
            }
        restricted["rows_without_mass"] = no_mass
        return cls(full, pred_full, present, present_names, restricted, pred_r)


def _review_block(cells: _Cells, scores: _Scores, threshold: float | None) -> dict:
    """How many cells the review threshold flags, and the accuracy of those it does not."""
    unflagged = ~cells.review
    return {
        "threshold": threshold,
        "fraction": float(cells.review.mean()),
        "n_flagged": int(cells.review.sum()),
        "accuracy_unflagged": _accuracy(scores.pred_full == cells.y, unflagged),
        "accuracy_unflagged_restricted": _accuracy(scores.pred_r == cells.y, unflagged)
        if scores.restricted is not None
        else None,
    }


def _ood_block(cells: _Cells, scores: _Scores) -> dict:
    """How many cells the OOD check flags, and the accuracy of those neither it nor the review threshold flags."""
    kept = ~cells.review & ~cells.ood
    found = [p.get("ood_score") for p in cells.preds if p.get("ood_score") is not None]
    return {
        "fraction": float(cells.ood.mean()),
        "n_flagged": int(cells.ood.sum()),
        "mean_score": float(np.mean(found)) if found else None,
        "kept_fraction": float(kept.mean()),
        "accuracy_kept": _accuracy(scores.pred_full == cells.y, kept),
        "accuracy_kept_restricted": _accuracy(scores.pred_r == cells.y, kept)
        if scores.restricted is not None
        else None,
    }


def _predicted_as(scores: _Scores, names: list[str], n: int) -> dict:
    """Cells per predicted class (all the model's classes), and how many fell on a class absent from the folder."""
    counts = Counter(names[i] for i in scores.pred_full)
    predicted_as = {c: int(counts.get(c, 0)) for c in names}
    outside = sum(v for c, v in predicted_as.items() if c not in scores.present_names)
    return {"predicted_as": predicted_as, "predicted_outside_present": {"n": int(outside), "fraction": outside / n}}


def _provenance(
    predictor,
    inv,
    n: int,
    class_map: dict,
    mapping: Mapping[str, str] | None,
    model_source: str | None,
    n_bootstrap: int,
    seed: int,
) -> dict:
    """What was scored, by which model, how the folders were matched, and on which machine."""
    return {
        "folder": str(inv.root),
        "model_source": model_source if model_source is not None else str(getattr(predictor, "source", "")),
        "model_name": str(getattr(predictor, "model_name", "unknown")),
        "backend": getattr(predictor, "backend", None),
        "model_classes": [str(c) for c in predictor.class_names],
        "temperature": getattr(predictor, "temperature", None),
        "n_images": n,
        "files": inv.files,
        "images_per_folder": dict(Counter(r.label for r in inv.records)),
        "class_mapping": class_map,
        "explicit_mapping": dict(mapping or {}),
        "ignored": [{"path": s.path, "reason": s.reason} for s in inv.ignored],
        "empty_folders": list(inv.empty_classes),
        "warnings": list(inv.warnings),
        "n_bootstrap": n_bootstrap,
        "seed": seed,
        "environment": environment(),
    }


def _write_predictions(path: Path, cells: _Cells, names: list[str], pred_full, pred_r) -> None:
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        ["path", "true", "pred", "pred_restricted", "confidence", "review", "ood", "ood_score"]
        + [f"p_{c}" for c in names]
    )
    for rel, true, p, row, a, b in zip(cells.relpaths, cells.true_names, cells.preds, cells.probs, pred_full, pred_r):
        ood = p.get("ood")
        score = p.get("ood_score")
        w.writerow(
            [
                rel,
                true,
                names[int(a)],
                names[int(b)],
                f"{row.max():.6f}",
                int(bool(p.get("review", False))),
                "" if ood is None else int(bool(ood)),
                "" if score is None else f"{float(score):.6f}",
            ]
            + [f"{v:.6f}" for v in row]
        )
    io.write_text(path, buf.getvalue())


def _figures(figures: Path, metrics: dict, probs, y, present, names) -> None:
    label = f"{metrics['provenance']['model_name']} on {Path(metrics['folder']).name}"
    plot_confusion_matrix(
        np.asarray(metrics["full"]["confusion_matrix"]),
        names,
        figures / "confusion.png",
        normalize="both",
        title=f"{label}: all {len(names)} classes",
    )
    plot_reliability_diagram(probs, y, figures / "reliability.png", title=label)
    r = metrics["restricted"]
    if r is not None and "confusion_matrix" in r:
        plot_confusion_matrix(
            np.asarray(r["confusion_matrix"]),
            r["class_names"],
            figures / "confusion_restricted.png",
            normalize="both",
            title=f"{label}: {len(present)} classes present",
        )


# ---------------------------------------------------------------------- text


def _ci(block: dict | None, key: str = "accuracy") -> str:
    ci = (block or {}).get("ci95") or {}
    lo_hi = ci.get(key)
    return f" (95% CI {lo_hi[0]:.4f}-{lo_hi[1]:.4f})" if lo_hi else ""


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def headline(metrics: dict) -> list[str]:
    """The few lines a person wants first (used by the CLI and report.md)."""
    full, r, rv, ood = metrics["full"], metrics["restricted"], metrics["review"], metrics["ood"]
    k = len(full["class_names"])
    lines = [
        f"{metrics['n']} images in {len(metrics['classes_present'])} classes; {len(metrics['unreadable'])} unreadable"
    ]
    lines.append(
        f"accuracy over all {k} model classes: {full['accuracy']:.4f}{_ci(full)}, macro F1 {full['f1_macro']:.4f}"
    )
    if r is not None:
        lines.append(
            f"accuracy restricted to the {len(r['class_names'])} classes present: {r['accuracy']:.4f}{_ci(r)}"
            + (f", macro F1 {r['f1_macro']:.4f}" if "f1_macro" in r else "")
        )
    out = metrics["predicted_outside_present"]
    if out["n"]:
        lines.append(f"predicted as a class absent from the folder: {out['n']} ({100 * out['fraction']:.1f}%)")
    text = (
        f"flagged for review: {100 * rv['fraction']:.1f}%; accuracy of the unflagged {_fmt(rv['accuracy_unflagged'])}"
    )
    if r is not None:
        text += f" ({_fmt(rv['accuracy_unflagged_restricted'])} restricted)"
    lines.append(text)
    if ood is not None:
        text = (
            f"flagged out-of-distribution: {100 * ood['fraction']:.1f}%; "
            "accuracy of cells neither review- nor OOD-flagged "
            f"({100 * ood['kept_fraction']:.1f}% kept) {_fmt(ood['accuracy_kept'])}"
        )
        if r is not None:
            text += f" ({_fmt(ood['accuracy_kept_restricted'])} restricted)"
        lines.append(text)
    return lines


def report_markdown(metrics: dict) -> str:
    prov = metrics["provenance"]
    full, r = metrics["full"], metrics["restricted"]
    lines = [
        f"# {prov['model_name']} on {Path(metrics['folder']).name}",
        "",
        f"*{REPORT_NOTE}*",
        "",
        f"- folder: `{metrics['folder']}`",
        f"- model: `{prov['model_source']}` ({prov['model_name']}, {len(prov['model_classes'])} classes)",
        "- class mapping: " + ", ".join(f"{f} -> {c}" for f, c in prov["class_mapping"].items()),
        "",
        "## Headline",
        "",
        *[f"- {line}" for line in headline(metrics)],
        "",
        "## Per class",
        "",
        "| class | images | recall (all classes) | recall (restricted) | F1 (all classes) |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in metrics["classes_present"]:
        pc = full["per_class"][c]
        rr = (r or {}).get("per_class", {}).get(c, {}).get("recall") if r is not None else pc["recall"]
        lines.append(
            f"| {c} | {pc['support']} | {pc['recall']:.3f} | {'n/a' if rr is None else f'{rr:.3f}'} | {pc['f1']:.3f} |"
        )
    lines += ["", "## Predicted as (all classes)", "", "| class | cells |", "|---|---:|"]
    lines += [f"| {c} | {v} |" for c, v in metrics["predicted_as"].items()]
    if metrics["unreadable"]:
        lines += ["", f"## Unreadable files ({len(metrics['unreadable'])})", ""]
        lines += [f"- `{u['path']}`: {u['reason']}" for u in metrics["unreadable"][:100]]
        if len(metrics["unreadable"]) > 100:
            lines.append(f"- ... and {len(metrics['unreadable']) - 100} more (metrics.json)")
    lines += [
        "",
        "Files: metrics.json, predictions.csv, figures/confusion.png, figures/reliability.png"
        + (", figures/confusion_restricted.png" if r is not None and "confusion_matrix" in r else ""),
        "",
    ]
    return "\n".join(lines)

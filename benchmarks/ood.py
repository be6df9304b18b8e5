"""Benchmark (not a test): how well a model's out-of-distribution score tells its own cells from everything else.

    .venv/bin/python benchmarks/ood.py                                   # the bundled model, ../shared data
    .venv/bin/python benchmarks/ood.py --model runs/x --limit 0          # a run, the whole PBC test part

In-distribution: the PBC test part of the model's own split (it never trained on it). Out: BCCD smear photographs,
generated non-cell images (text, noise, flat colour, and PBC test cells cut into 4 x 4 tiles shuffled into a
mosaic) and, separately, the Tecom cells from another lab. For the shipped Mahalanobis score and two logit
scores (energy, 1 - max softmax) it prints AUROC per out-set, the share of PBC test cells flagged at the model's
threshold (false alarms), and on Tecom the share flagged (OOD or review) and the accuracy of what is left.
"""

from __future__ import annotations

import argparse
import io
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
WBC = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")


def cpu_line() -> str:
    from bloodcell.evaluate.machine import cpu_line as line

    return line()


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def text_image(rng: np.random.Generator, size: int = 224) -> np.ndarray:
    img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, 3)))
    draw = ImageDraw.Draw(img)
    words = ["blood", "smear", "report", "patient", "lab", "2026", "WBC", "count", "cells", "total"]
    for row in range(0, size, 18):
        line = " ".join(rng.choice(words, 4))
        draw.text((int(rng.integers(0, 20)), row), line, fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
    return np.asarray(img)


def mosaic(cell: np.ndarray, rng: np.random.Generator, tiles: int = 4) -> np.ndarray:
    """The image cut into tiles x tiles pieces put back in a random order: the colours of a cell, not its shape."""
    h, w = (cell.shape[0] // tiles) * tiles, (cell.shape[1] // tiles) * tiles
    th, tw = h // tiles, w // tiles
    pieces = [cell[r * th : (r + 1) * th, c * tw : (c + 1) * tw] for r in range(tiles) for c in range(tiles)]
    order = rng.permutation(len(pieces))
    rows = [np.concatenate([pieces[order[r * tiles + c]] for c in range(tiles)], 1) for r in range(tiles)]
    return np.concatenate(rows, 0)


def generated_sets(cells: list[Path], n: int, seed: int) -> dict[str, list[tuple[str, bytes]]]:
    rng = np.random.default_rng(seed)
    sets: dict[str, list[tuple[str, bytes]]] = {"text": [], "noise": [], "flat colour": [], "mosaic": []}
    for i in range(n):
        sets["text"].append((f"text-{i}", png(text_image(rng))))
        sets["noise"].append((f"noise-{i}", png(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))))
        sets["flat colour"].append((f"flat-{i}", png(np.full((224, 224, 3), rng.integers(0, 256, 3), dtype=np.uint8))))
        cell = np.asarray(Image.open(cells[int(rng.integers(len(cells)))]).convert("RGB"))
        sets["mosaic"].append((f"mosaic-{i}", png(mosaic(cell, rng))))
    return sets


def score_items(predictor, items: list[tuple[str, bytes | Path]], batch: int = 64) -> dict[str, np.ndarray]:
    """Logits, Mahalanobis score (None without one) and the three scores for files or (name, bytes) items."""
    from bloodcell.evaluate.calibration import apply_temperature
    from bloodcell.evaluate.ood import energy_score, msp_score
    from bloodcell.progress import progress_bar

    logits, maha = [], []
    with progress_bar(len(items), "scoring") as advance:
        for s in range(0, len(items), batch):
            x = np.stack([predictor.decode(src) for _, src in items[s : s + batch]])
            lg, sc = predictor.outputs(x)
            logits.append(lg)
            maha.append(sc if sc is not None else np.full(len(x), np.nan))
            advance(len(x))
    lg = np.concatenate(logits)
    return {
        "logits": lg,
        "probs": apply_temperature(lg, predictor.temperature),
        "mahalanobis": np.concatenate(maha),
        "energy": energy_score(lg),
        "msp": msp_score(lg),
    }


def run(model: str | None, pbc: Path, bccd: Path, tecom: Path, limit: int, n_generated: int, seed: int) -> dict:
    from bloodcell.config import parse_config
    from bloodcell.data.prepare import split_files
    from bloodcell.evaluate.ood import auroc
    from bloodcell.infer import Predictor

    predictor = Predictor.load(model)
    cfg = parse_config(predictor.metadata["training_config"])
    files, _ = split_files(cfg, pbc, "test")
    rng = np.random.default_rng(seed)
    if limit and limit < len(files):
        files = [files[i] for i in np.sort(rng.choice(len(files), limit, replace=False))]
    in_scores = score_items(predictor, [(str(f), f) for f in files])
    out_sets: dict[str, list] = {}
    if bccd.is_dir():
        out_sets["BCCD photographs"] = [(p.name, p) for p in sorted(bccd.glob("*.jpg"))]
    out_sets.update(generated_sets(files, n_generated, seed))
    methods = ["mahalanobis", "energy", "msp"] if predictor.has_ood else ["energy", "msp"]
    result: dict = {"model": predictor.source, "pbc_test_images": len(files), "methods": methods, "auroc": {}, "n": {}}
    for name, items in out_sets.items():
        s = score_items(predictor, items)
        result["n"][name] = len(items)
        result["auroc"][name] = {m: auroc(in_scores[m], s[m]) for m in methods}
    if predictor.has_ood:
        result["pbc_false_alarm"] = float((in_scores["mahalanobis"] > predictor.ood_threshold).mean())
        result["ood_threshold"] = predictor.ood_threshold
    if tecom.is_dir():
        items, truth = [], []
        for c in WBC:
            for f in sorted((tecom / c).glob("*")):
                items.append((f.name, f))
                truth.append(predictor.class_names.index(c) if c in predictor.class_names else -1)
        s = score_items(predictor, items)
        truth = np.asarray(truth)
        right = s["probs"].argmax(1) == truth
        review = s["probs"].max(1) < predictor.review_threshold
        ood = s["mahalanobis"] > predictor.ood_threshold if predictor.has_ood else np.zeros(len(items), bool)
        kept = ~(review | ood)
        result["tecom"] = {
            "n": len(items),
            "accuracy": float(right.mean()),
            "ood_flagged": float(ood.mean()),
            "review_flagged": float(review.mean()),
            "kept": int(kept.sum()),
            "accuracy_kept": float(right[kept].mean()) if kept.any() else None,
            "wrong_flagged": float((review | ood)[~right].mean()) if (~right).any() else None,
            "auroc_vs_pbc": {m: auroc(in_scores[m], s[m]) for m in methods},
        }
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="run directory, .safetensors or .onnx (default: the bundled model)")
    ap.add_argument("--pbc", type=Path, default=SHARED / "pbc")
    ap.add_argument("--bccd", type=Path, default=SHARED / "bccd" / "BCCD" / "JPEGImages")
    ap.add_argument("--tecom", type=Path, default=SHARED / "external" / "tecom_zheng2018")
    ap.add_argument("--limit", type=int, default=2000, help="PBC test images (seeded subset; 0: all)")
    ap.add_argument("--generated", type=int, default=100, help="images per generated out-set")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)

    import torch

    r = run(args.model, args.pbc, args.bccd, args.tecom, args.limit, args.generated, args.seed)
    print(f"# OOD benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {cpu_line()}; torch {torch.__version__}; model {r['model']}")
    print(f"in-distribution: {r['pbc_test_images']} PBC test images (the model's own split, seed {args.seed} subset)\n")
    print("| out-set | n | " + " | ".join(f"AUROC {m}" for m in r["methods"]) + " |")
    print("|---|---:|" + "---:|" * len(r["methods"]))
    for name, a in r["auroc"].items():
        print(f"| {name} | {r['n'][name]} | " + " | ".join(f"{a[m]:.4f}" for m in r["methods"]) + " |")
    if "pbc_false_alarm" in r:
        print(
            f"\nPBC test cells flagged OOD at the model's threshold ({r['ood_threshold']:.1f}): "
            f"{100 * r['pbc_false_alarm']:.2f} %"
        )
    if "tecom" in r:
        t = r["tecom"]
        kept = "-" if t["accuracy_kept"] is None else f"{100 * t['accuracy_kept']:.1f} %"
        print(
            f"Tecom ({t['n']} cells, another lab): accuracy {100 * t['accuracy']:.1f} %; "
            f"flagged OOD {100 * t['ood_flagged']:.1f} %, "
            f"review {100 * t['review_flagged']:.1f} %; of the {t['kept']} neither flagged, {kept} right; "
            f"wrong cells flagged: {100 * (t['wrong_flagged'] or 0):.1f} %; AUROC vs PBC: "
            + ", ".join(f"{m} {v:.3f}" for m, v in t["auroc_vs_pbc"].items())
        )
    if args.json:
        from bloodcell.io import write_json

        write_json(args.json, r)
    return r


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

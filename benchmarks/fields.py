"""Benchmark (not a test): smear photographs end to end, and how `--input auto` decides.

    .venv/bin/python benchmarks/fields.py                         # bundled detector + classifier, ../shared data
    .venv/bin/python benchmarks/fields.py --detector runs/detector-classical --out fields.json

Prints, with the CPU model and flags:
1. the detector on the BCCD test split (never fitted or tuned on): per class precision / recall at IoU 0.5,
   AP at IoU 0.5 (torchmetrics), count error per photograph;
2. seconds per 640x480 photograph end to end (decode, detection, cropping and classifying every white cell),
   `predict --input field` on the test photographs, torch on the threads given (default 2);
3. `--input auto` on three sets: BCCD test photographs (should be fields), PBC test-part cells of the classifier's
   own split and the Tecom cells of another lab (both should stay single cells);
4. the classifier's field of view in red-cell diameters and white-cell box sides, measured on PBC cells by the
   detector (PBC crops are scaled to BCCD's magnification first): the numbers FieldReader crops by.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "src"))


def cpu_line() -> str:
    from bloodcell.detect.metrics import machine_line

    return machine_line()


def pbc_test_files(predictor, pbc: Path, limit: int, seed: int = 0) -> list[Path]:
    """PBC cells from the test part of the classifier's own split (from its training config), a seeded sample."""
    from bloodcell.config import parse_config
    from bloodcell.data.prepare import split_files

    files, _ = split_files(parse_config(predictor.metadata["training_config"]), pbc, "test")
    rng = np.random.default_rng(seed)
    return [Path(files[i]) for i in sorted(rng.choice(len(files), size=min(limit, len(files)), replace=False))]


def measure_view(detector, files: list[Path], scale: float) -> dict:
    """Median over PBC cells of (crop side / median red-cell side) and (crop side / white-cell side)."""
    from PIL import Image

    rbc_ratio, wbc_ratio = [], []
    for f in files:
        img = Image.open(f).convert("RGB")
        big = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BILINEAR)
        det = detector.detect([np.asarray(big)])[0]
        side = max(big.size)
        rbc = det.of_class("rbc")
        if len(rbc) >= 3:
            rbc_ratio.append(
                side / np.median(np.maximum(rbc.boxes[:, 2] - rbc.boxes[:, 0], rbc.boxes[:, 3] - rbc.boxes[:, 1]))
            )
        wbc = det.of_class("wbc")
        if len(wbc) == 1:
            b = wbc.boxes[0]
            wbc_ratio.append(side / max(b[2] - b[0], b[3] - b[1]))
    return {
        "rbc_diameters": float(np.median(rbc_ratio)) if rbc_ratio else None,
        "rbc_diameters_iqr": [float(np.percentile(rbc_ratio, 25)), float(np.percentile(rbc_ratio, 75))]
        if rbc_ratio
        else None,
        "wbc_sides": float(np.median(wbc_ratio)) if wbc_ratio else None,
        "wbc_sides_iqr": [float(np.percentile(wbc_ratio, 25)), float(np.percentile(wbc_ratio, 75))]
        if wbc_ratio
        else None,
        "cells_measured": {"rbc": len(rbc_ratio), "wbc": len(wbc_ratio), "of": len(files)},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default="default")
    ap.add_argument("--model", default=None, help="classifier (default: the bundled one)")
    ap.add_argument("--bccd", type=Path, default=SHARED / "bccd")
    ap.add_argument("--pbc", type=Path, default=SHARED / "pbc")
    ap.add_argument("--tecom", type=Path, default=SHARED / "external" / "tecom_zheng2018")
    ap.add_argument("--pbc-n", type=int, default=400, help="PBC test cells for the auto decision and the field of view")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from bloodcell.data.fields import load_voc
    from bloodcell.infer import Predictor
    from bloodcell.infer.fields import predict_mixed
    from bloodcell.infer.predictor import collect_images
    from bloodcell.detect.registry import load_detector
    from bloodcell.detect.runs import evaluate_detector

    print(f"machine: {cpu_line()}")
    out: dict = {"machine": cpu_line(), "detector": args.detector}
    metrics = evaluate_detector(args.detector, args.bccd, "test", progress=False)
    out["detection_test"] = metrics
    print(
        f"\n1. detector '{args.detector}' on BCCD test ({metrics['photos']} photographs), IoU {metrics['match_iou']}:"
    )
    for cls, m in metrics["classes"].items():
        print(
            f"   {cls:9s} precision {m['precision']:.3f} recall {m['recall']:.3f} AP {m['ap']:.3f}  "
            f"count error {m['count_mae']:.2f} / photo ({100 * m['count_rel_error']:.1f} %), "
            f"bias {m['count_bias']:+.2f}"
        )

    predictor = Predictor.load(args.model)
    detector = load_detector(args.detector)
    test = load_voc(args.bccd, "test")
    items = [(str(a.path), a.path) for a in test]
    predict_mixed(predictor, items[:2], "field", detector)  # warm-up: first-call allocations
    start = time.perf_counter()
    result = predict_mixed(predictor, items, "field", detector)
    per_photo = (time.perf_counter() - start) / len(items)
    out["seconds_per_photo_end_to_end"] = per_photo
    s = result["field_summary"]
    out["field_summary_test"] = s
    print(
        f"\n2. end to end (decode + detect + classify white cells), {len(items)} photographs, {args.threads} threads: "
        f"{per_photo:.3f} s per photograph"
    )
    print(
        f"   white cells found {s['totals']['wbc']}, counted {s['wbc_counted']}, "
        f"OOD {s['wbc_ood']}, review {s['wbc_review']}"
    )

    decisions = {}
    sets = {"bccd_test": [a.path for a in test], "pbc_test": pbc_test_files(predictor, args.pbc, args.pbc_n)}
    if args.tecom.is_dir():
        sets["tecom"] = collect_images(args.tecom)
    for name, files in sets.items():
        r = predict_mixed(predictor, [(str(p), p) for p in files], "auto", detector)
        n = len(r["predictions"]) + len(r["fields"])
        decisions[name] = {
            "images": n,
            "fields": len(r["fields"]),
            "cells": len(r["predictions"]),
            "cells_ood": sum(bool(p["ood"]) for p in r["predictions"]),
        }
    out["auto"] = decisions
    print("\n3. --input auto:")
    for name, d in decisions.items():
        print(
            f"   {name:10s} {d['images']:5d} images -> {d['fields']} fields, {d['cells']} single cells "
            f"({d['cells_ood']} of them OOD)"
        )

    view = measure_view(detector, pbc_test_files(predictor, args.pbc, args.pbc_n, seed=1), scale=2.5)
    out["pbc_field_of_view"] = view
    print(
        f"\n4. PBC crop side, measured on {view['cells_measured']} (x2.5 to BCCD's magnification): "
        f"{view['rbc_diameters']} red-cell diameters (IQR {view['rbc_diameters_iqr']}), "
        f"{view['wbc_sides']} white-cell sides (IQR {view['wbc_sides_iqr']})"
    )
    if args.out:
        from bloodcell.io import write_json

        write_json(args.out, out)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

"""Benchmark (not a test): smear photographs from every lab, end to end, against issue 25's targets.

    .venv/bin/python benchmarks/detector_labs.py [--detector DIR|default] [--model DIR] [--out labs.json]

For each source of TXL-PBC's test split and for BCCD's test split (BCCD's own, sparser labels), with the detector at
its own thresholds (chosen on validation photographs when it was fitted):
1. detection per cell kind at IoU 0.5 (precision, recall, AP) and the count error per photograph: the issue's
   figure, mean |counted - boxed| over the mean boxed count, with the bias;
2. end to end through `bloodcell predict --input field` (FieldReader: decode, detection, cropping and classifying
   every white cell with the bundled classifier): seconds per photograph, torch on --threads threads;
3. the bundle's size (the detector folder) and the targets, met or not.
Prints the CPU model and flags first. Needs ../shared/data (txl_pbc, bccd).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "src"))

TARGETS = {
    "rbc_count_error": 0.10,
    "wbc_recall": 0.98,
    "wbc_precision": 0.95,
    "wbc_exact": 0.95,
    "platelet_recall": 0.85,
    "seconds_per_photo": 0.3,
    "bundle_mb": 20.0,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default="default")
    ap.add_argument("--model", default=None, help="classifier for the end-to-end timing (default: the bundled one)")
    ap.add_argument("--txl", type=Path, default=SHARED / "txl_pbc")
    ap.add_argument("--bccd", type=Path, default=SHARED / "bccd")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from PIL import Image

    from bloodcell.data.fields import by_source, load_fields
    from bloodcell.detect.metrics import detection_metrics, machine_line, source_table
    from bloodcell.infer import Predictor
    from bloodcell.infer.fields import FieldReader
    from bloodcell.detect.registry import bundled_detector_dir, load_detector

    print(f"machine: {machine_line()}")
    detector = load_detector(args.detector)
    reader = FieldReader(Predictor.load(args.model), detector)
    groups = {f"txl_pbc/{s}": v for s, v in sorted(by_source(load_fields(args.txl, "test", "txl_pbc")).items())}
    groups["bccd (own labels)"] = load_fields(args.bccd, "test", "bccd")
    results = {
        "machine": machine_line(),
        "detector": str(args.detector),
        "threshold": detector.score_thresholds,
        "sources": {},
    }
    reader.read("warm-up", Image.open(groups["bccd (own labels)"][0].path).convert("RGB"))
    for label, photos in groups.items():
        raw, seconds, counted = [], [], []
        for ann in photos:
            start = time.perf_counter()
            image = Image.open(ann.path).convert("RGB")  # decode is part of end to end
            det = detector.raw([np.asarray(image)])[0]
            result = reader.read(ann.name, image, detector.apply_thresholds(det))
            seconds.append(time.perf_counter() - start)
            raw.append(det)
            counted.append(result.get("counts") or {})
        metrics = detection_metrics(raw, photos, detector.score_thresholds)
        results["sources"][label] = {
            **metrics,
            "seconds_end_to_end": float(np.mean(seconds)),
            "median_seconds": float(np.median(seconds)),
        }
        print(
            f"{label}: {len(photos)} photographs, {np.mean(seconds):.3f} s per photograph end to end "
            f"(median {np.median(seconds):.3f})"
        )
    print()
    print(source_table({"": results["sources"]}).replace("|  / ", "| "))
    folder = bundled_detector_dir() if args.detector == "default" else Path(args.detector)
    folder = folder if folder.is_dir() else folder.parent
    size = sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 1e6
    results["bundle_mb"] = size
    print(f"\ndetector folder {folder}: {size:.1f} MB")
    print("\ntargets (TXL-PBC sources; BCCD's own labels for the last row):")
    for label, m in results["sources"].items():
        c = m["classes"]
        checks = {
            f"red-cell count error {100 * c['rbc']['count_error_ratio']:.1f} % <= 10 %": c["rbc"]["count_error_ratio"]
            <= TARGETS["rbc_count_error"],
            f"white recall {c['wbc']['recall']:.3f} >= 0.98": c["wbc"]["recall"] >= TARGETS["wbc_recall"],
            f"white precision {c['wbc']['precision']:.3f} >= 0.95": c["wbc"]["precision"] >= TARGETS["wbc_precision"],
            f"white count exact {100 * c['wbc']['count_exact']:.0f} % >= 95 %": c["wbc"]["count_exact"]
            >= TARGETS["wbc_exact"],
            f"end to end {m['seconds_end_to_end']:.3f} s <= 0.3 s": m["seconds_end_to_end"]
            <= TARGETS["seconds_per_photo"],
        }
        if c["platelet"]["true_total"]:
            checks[f"platelet recall {c['platelet']['recall']:.3f} >= 0.85"] = (
                c["platelet"]["recall"] >= TARGETS["platelet_recall"]
            )
        m["targets"] = checks
        print(f"- {label}: " + "; ".join(("met: " if ok else "MISSED: ") + k for k, ok in checks.items()))
    print(f"- bundle {size:.1f} MB <= 20 MB: {'met' if size <= TARGETS['bundle_mb'] else 'MISSED'}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()

"""Benchmark (not a test): counting cells where they touch and overlap, per source, for one detector.

    .venv/bin/python benchmarks/detector_counting.py --detector runs/detector-lab [--nms 0.5 0.6 0.7] [--out counting.json]

Fits every count rule of bloodcell.detect.counting on the validation photographs of TXL-PBC (the thresholds are the
detector's own, chosen on validation when it was fitted), then prints the count error per class, rule and source on
TXL-PBC's test photographs and on BCCD's test split with BCCD's own labels. With --nms, the PyTorch detector is also
run with red-cell-friendly non-maximum suppression IoUs (its thresholds re-chosen on validation for each), since
NMS at IoU 0.5 can merge two overlapping red cells into one box. Prints the CPU model and flags first.
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "src"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", default="default")
    ap.add_argument("--txl", type=Path, default=SHARED / "txl_pbc")
    ap.add_argument("--bccd", type=Path, default=SHARED / "bccd")
    ap.add_argument(
        "--nms", type=float, nargs="*", default=[], help="also run at these NMS IoUs (PyTorch detector only)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from bloodcell.data.fields import by_source, combine_field_sets
    from bloodcell.detect.counting import COUNT_RULES, count_errors, fit_count_rules, predict_counts, true_counts
    from bloodcell.detect.metrics import choose_thresholds, machine_line, run_detector
    from bloodcell.detect.registry import load_detector

    print(f"machine: {machine_line()}")
    spec = dict(train_split="train", val_split="val", test_split="test")
    sets = combine_field_sets(
        {"txl_pbc": {"root": args.txl, **spec}, "bccd": {"root": args.bccd, **spec, "thresholds": False}}
    )
    groups = {f"txl_pbc/{s}": v for s, v in sorted(by_source(sets.tests["txl_pbc"]).items())} | {
        "bccd (own labels)": sets.tests["bccd"]
    }
    detector = load_detector(args.detector)
    settings = [None] + list(args.nms)
    results = {"machine": machine_line(), "detector": str(args.detector), "val_photos": len(sets.val), "variants": {}}
    for nms in settings:
        name = "as saved" if nms is None else f"NMS IoU {nms}"
        if nms is not None:
            if not hasattr(detector, "model"):
                raise SystemExit("--nms needs the PyTorch detector")
            detector.model.nms_thresh = nms
        raw_val, _ = run_detector(detector, sets.val, True, f"val ({name})")
        thresholds = detector.score_thresholds if nms is None else choose_thresholds(raw_val, sets.val)
        fitted = fit_count_rules(raw_val, sets.val, thresholds)
        rows = {}
        for label, photos in groups.items():
            raw, _ = run_detector(detector, photos, True, f"{label} ({name})")
            for cls in ("rbc", "wbc", "platelet"):
                truth = true_counts(photos, cls)
                for rule in COUNT_RULES:
                    rows.setdefault(cls, {}).setdefault(rule, {})[label] = count_errors(
                        predict_counts(raw, cls, thresholds[cls], rule, fitted[cls][rule]), truth
                    )
        results["variants"][name] = {"thresholds": thresholds, "factors": fitted, "test": rows}
        print(f"\n## {name}: thresholds {json.dumps({k: round(v, 3) for k, v in thresholds.items()})}")
        for cls in ("rbc", "wbc", "platelet"):
            print(
                f"\n{cls}: count error (mean |found - true| / mean true), bias per photograph; "
                f"factors fitted on {len(sets.val)} val photographs"
            )
            print("| rule (factor) | " + " | ".join(groups) + " |")
            print("|---|" + "---|" * len(groups))
            for rule in COUNT_RULES:
                cells = [f"{100 * m['error_ratio']:.1f} % ({m['bias']:+.1f})" for m in rows[cls][rule].values()]
                print(f"| {rule} ({fitted[cls][rule]:.3f}) | " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

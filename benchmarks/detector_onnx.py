"""Benchmark (not a test): the bundled detector's ONNX export (what the install without PyTorch runs) against the
PyTorch FCOS it was exported from, on BCCD photographs.

    .venv/bin/python benchmarks/detector_onnx.py                    # all 364 BCCD photographs, 2 threads
    .venv/bin/python benchmarks/detector_onnx.py --split test --out detector_onnx.json

Prints, with the CPU model and flags:
1. parity: per photograph, both detectors' boxes at the operating thresholds paired one-to-one by IoU; the lowest
   IoU of a pair, the largest score difference, label disagreements and photographs whose counts differ; the same
   for the raw detections (before the thresholds, down to min_score);
2. seconds per photograph, detection only (from the decoded photograph to boxes in its pixels), each backend on
   the same threads, after a warm-up, interleaved photograph by photograph so a busy neighbour slows both alike.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bccd", type=Path, default=SHARED / "bccd")
    ap.add_argument("--split", default="all", help="train, val, test or all")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()

    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    from bloodcell.data.fields import FIELD_CLASSES, load_voc
    from bloodcell.evaluate.machine import cpu_line
    from bloodcell.detect.registry import bundled_detector_dir, load_detector
    from bloodcell.detect.data import load_field_image
    from bloodcell.detect.fcos_onnx import DETECTOR_ONNX, agreement

    folder = bundled_detector_dir()
    torch_det = load_detector(folder)
    onnx_det = load_detector(folder / DETECTOR_ONNX)
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3
    onnx_det.session = onnxruntime.InferenceSession(
        str(folder / DETECTOR_ONNX), sess_options=opts, providers=["CPUExecutionProvider"]
    )
    splits = ("train", "val", "test") if args.split == "all" else (args.split,)
    photos = [a for s in splits for a in load_voc(args.bccd, s)]
    print(
        f"machine: {cpu_line()}; torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"{args.threads} threads"
    )

    for det in (torch_det, onnx_det):  # warm-up: first-call allocations
        det.raw([load_field_image(photos[0])])
    seconds = {"pytorch": [], "onnxruntime": []}
    kept = {
        "boxes": 0,
        "photos_with_other_counts": 0,
        "unpaired": 0,
        "label_mismatches": 0,
        "min_iou": 1.0,
        "max_score_diff": 0.0,
    }
    raw = dict(kept)
    per_class = {c: [0, 0] for c in FIELD_CLASSES}
    for ann in photos:
        image = load_field_image(ann)
        t0 = time.perf_counter()
        want = torch_det.raw([image])[0]
        t1 = time.perf_counter()
        got = onnx_det.raw([image])[0]
        t2 = time.perf_counter()
        seconds["pytorch"].append(t1 - t0)
        seconds["onnxruntime"].append(t2 - t1)
        for figures, a_det, b_det in (
            (raw, want, got),
            (kept, torch_det.apply_thresholds(want), onnx_det.apply_thresholds(got)),
        ):
            a = agreement(a_det, b_det)
            figures["boxes"] += a["boxes"]
            figures["unpaired"] += a["unpaired"]
            figures["label_mismatches"] += a["label_mismatches"]
            figures["photos_with_other_counts"] += int(a_det.counts() != b_det.counts())
            figures["min_iou"] = min(figures["min_iou"], a["min_iou"])
            figures["max_score_diff"] = max(figures["max_score_diff"], a["max_score_diff"])
        for c, n in torch_det.apply_thresholds(want).counts().items():
            per_class[c][0] += n
        for c, n in onnx_det.apply_thresholds(got).counts().items():
            per_class[c][1] += n
    out = {
        "machine": cpu_line(),
        "threads": args.threads,
        "photos": len(photos),
        "split": args.split,
        "at_thresholds": kept,
        "before_thresholds": raw,
        "counts_pytorch_onnx": per_class,
        "seconds_per_photo": {
            k: {"median": float(np.median(v)), "mean": float(np.mean(v))} for k, v in seconds.items()
        },
    }
    print(f"\n1. parity on {len(photos)} BCCD photographs ({args.split}):")
    for name, f in (("at the operating thresholds", kept), ("before the thresholds", raw)):
        print(
            f"   {name}: {f['boxes']} boxes, lowest IoU of a pair {f['min_iou']:.6f}, largest score difference "
            f"{f['max_score_diff']:.2g}, {f['label_mismatches']} label disagreements, {f['unpaired']} unpaired, "
            f"{f['photos_with_other_counts']} photographs with other counts"
        )
    print("   counts (pytorch / onnx): " + ", ".join(f"{c} {a} / {b}" for c, (a, b) in per_class.items()))
    print(f"\n2. seconds per photograph, detection only, {args.threads} threads:")
    for k, v in out["seconds_per_photo"].items():
        print(f"   {k:12s} median {v['median']:.3f} s, mean {v['mean']:.3f} s")
    if args.out:
        from bloodcell.io import write_json

        write_json(args.out, out)


if __name__ == "__main__":
    main()

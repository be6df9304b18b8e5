"""Measure a saved detector on BCCD: thresholds chosen on val, reported on test.

python tools/eval_fcos.py RUN_DIR --data /work/shared/data/bccd [--threads 2]
Writes RUN_DIR/eval.json and prints it. Per class precision/recall at IoU 0.5 (Hungarian matching), AP@0.5
(torchmetrics, on all boxes above the detector's floor), per-photo count errors, seconds per photo.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iou", type=float, default=0.5)
    ap.add_argument("--limit", type=int, default=0, help="only the first N photographs of each split (smoke runs)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from torchmetrics.detection import MeanAveragePrecision

    from bloodcell.data.fields import FIELD_CLASSES, load_voc
    from bloodcell.models.detector import load_detector
    from bloodcell.models.detector_fcos import choose_thresholds, load_field_image, match_boxes

    run = Path(args.run_dir)
    det = load_detector(run)
    raw = {}
    seconds = {}
    anns = {}
    for split in ("val", "test"):
        anns[split] = load_voc(args.data, split)[: args.limit or None]
        images = [load_field_image(a) for a in anns[split]]
        det.detect_one(images[0])  # warm-up
        t0 = time.perf_counter()
        raw[split] = [det.detect_one(im) for im in images]
        seconds[split] = (time.perf_counter() - t0) / len(images)
    thresholds = choose_thresholds(raw["val"], anns["val"], args.iou)
    report = {
        "run": str(run),
        "thresholds_from_val": thresholds,
        "thresholds_saved": det.score_thresholds,
        "seconds_per_photo": {k: round(v, 4) for k, v in seconds.items()},
        "threads": args.threads,
        "weights_mb": round((run / "detector.safetensors").stat().st_size / 1e6, 2),
    }
    for split in ("val", "test"):
        kept = [det.apply_thresholds(d, thresholds) for d in raw[split]]
        res = {}
        for ci, cls in enumerate(FIELD_CLASSES):
            tp = npred = ntrue = 0
            abs_err, rel_err = [], []
            for d, a in zip(kept, anns[split]):
                pb = d.boxes[d.labels == ci]
                gb = a.boxes[a.labels == ci]
                tp += match_boxes(pb, gb, args.iou)
                npred += len(pb)
                ntrue += len(gb)
                abs_err.append(abs(len(pb) - len(gb)))
                if len(gb):
                    rel_err.append(abs(len(pb) - len(gb)) / len(gb))
            res[cls] = {
                "precision": round(tp / max(1, npred), 4),
                "recall": round(tp / max(1, ntrue), 4),
                "true": ntrue,
                "predicted": npred,
                "matched": tp,
                "count_mae": round(float(np.mean(abs_err)), 3),
                "count_mean_rel_err": round(float(np.mean(rel_err)), 4) if rel_err else None,
            }
        metric = MeanAveragePrecision(iou_thresholds=[args.iou], class_metrics=True)
        metric.update(
            [{"boxes": torch.from_numpy(d.boxes), "scores": torch.from_numpy(d.scores), "labels": torch.from_numpy(d.labels)} for d in raw[split]],
            [{"boxes": torch.from_numpy(a.boxes), "labels": torch.from_numpy(a.labels)} for a in anns[split]],
        )
        m = metric.compute()
        classes = m["classes"].tolist()
        per_class = m["map_per_class"].tolist()
        for ci, cls in enumerate(FIELD_CLASSES):
            if ci in classes:
                res[cls]["ap50"] = round(per_class[classes.index(ci)], 4)
        res["map50"] = round(float(m["map"]), 4)
        report[split] = res
    meta = json.loads((run / "detector.json").read_text())
    report["training"] = meta.get("training") or meta.get("state", {}).get("fit")
    (run / "eval.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Quick measurement of a field detector on a BCCD split: per-class precision/recall at IoU 0.5, mAP@0.5,
count errors, seconds per photo.

    PYTHONPATH=src python benchmarks/detector_quick.py --detector DIR_OR_NAME --split val [--limit N] [--raw]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

BCCD = Path(__file__).resolve().parents[2] / "shared" / "data" / "bccd"
CLASSES = ("rbc", "wbc", "platelet")


def match(pred_boxes, true_boxes, iou=0.5):
    """Number of one-to-one matches with IoU >= iou (Hungarian on IoU)."""
    import torch
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_iou

    if len(pred_boxes) == 0 or len(true_boxes) == 0:
        return 0
    m = box_iou(torch.as_tensor(pred_boxes, dtype=torch.float32), torch.as_tensor(true_boxes, dtype=torch.float32)).numpy()
    r, c = linear_sum_assignment(-m)
    return int((m[r, c] >= iou).sum())


def per_class(dets, annos, iou=0.5):
    out = {}
    for k, cls in enumerate(CLASSES):
        tp = npred = ntrue = 0
        abs_err, rel_err = [], []
        for d, a in zip(dets, annos):
            pb = d.boxes[d.labels == k]
            tb = a.boxes[a.labels == k]
            tp += match(pb, tb, iou)
            npred += len(pb)
            ntrue += len(tb)
            abs_err.append(abs(len(pb) - len(tb)))
            if len(tb):
                rel_err.append(abs(len(pb) - len(tb)) / len(tb))
        p = tp / max(npred, 1)
        r = tp / max(ntrue, 1)
        out[cls] = {
            "precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-9), "n_pred": npred, "n_true": ntrue,
            "count_mae": float(np.mean(abs_err)), "count_rel": float(np.mean(rel_err)) if rel_err else float("nan"),
        }
    return out


def mean_ap(dets, annos):
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_thresholds=[0.5], class_metrics=True)
    preds = [dict(boxes=torch.as_tensor(d.boxes), scores=torch.as_tensor(d.scores), labels=torch.as_tensor(d.labels)) for d in dets]
    target = [dict(boxes=torch.as_tensor(a.boxes), labels=torch.as_tensor(a.labels)) for a in annos]
    metric.update(preds, target)
    res = metric.compute()
    classes = res["classes"].tolist()
    per = res["map_per_class"].tolist()
    per = per if isinstance(per, list) else [per]
    return {CLASSES[c]: float(v) for c, v in zip(classes, per)}


def choose_thresholds(raws, annos, detector):
    """Per class on these photographs: max F1 at IoU 0.5 (wbc, platelet); min mean relative count error (rbc);
    among equal scores the highest threshold."""
    from bloodcell.models.detector import Detections

    chosen = {}
    for k, cls in enumerate(CLASSES):
        cands = np.unique(np.concatenate([d.scores[d.labels == k] for d in raws] + [np.zeros(1, np.float32)]))
        best = None
        for t in cands:
            th = {c: (float(t) if c == cls else 0.0) for c in CLASSES}
            dets = [detector.apply_thresholds(d, th) for d in raws]
            if cls == "rbc":
                errs = [abs((d.labels == k).sum() - (a.labels == k).sum()) / (a.labels == k).sum() for d, a in zip(dets, annos) if (a.labels == k).sum()]
                score = -float(np.mean(errs))
            else:
                score = per_class(dets, annos)[cls]["f1"]
            if best is None or score >= best[0]:  # ties: the higher threshold
                best = (score, float(t))
        chosen[cls] = best[1]
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--detector", default="classical", help="a saved detector folder, or a registered name")
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--raw", action="store_true", help="no score thresholds")
    ap.add_argument("--choose-on", default=None, help="choose thresholds on this split first (e.g. val)")
    ap.add_argument("--save", default=None, help="save the detector (with chosen thresholds) here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch
    from skimage.io import imread

    from bloodcell.data.fields import load_voc
    from bloodcell.models.detector import create_detector, load_detector, save_detector

    torch.set_num_threads(args.threads)
    det = load_detector(args.detector) if Path(args.detector).exists() else create_detector(args.detector)
    report = {}
    if args.choose_on:
        ca = load_voc(BCCD, args.choose_on)[: args.limit]
        craw = det.raw([imread(a.path)[..., :3] for a in ca])
        det.score_thresholds = choose_thresholds(craw, ca, det)
        report["thresholds_from"] = args.choose_on
        if args.save:
            save_detector(det, args.save)
    annos = load_voc(BCCD, args.split)[: args.limit]
    images = [imread(a.path)[..., :3] for a in annos]
    t0 = time.perf_counter()
    raws = det.raw(images)
    secs = (time.perf_counter() - t0) / len(images)
    dets = raws if args.raw else [det.apply_thresholds(d) for d in raws]
    report.update(split=args.split, n=len(annos), thresholds=det.score_thresholds, sec_per_photo=secs,
                  per_class=per_class(dets, annos), map50=mean_ap(raws, annos))
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

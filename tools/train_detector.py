"""Train a detector from a DetectorRunConfig: python tools/train_detector.py CONFIG --out DIR [--resume] [--limit N]."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--out", required=True)
    ap.add_argument("--data", default=None, help="Pascal VOC folder (default: the config's data.root)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N train/val photographs (smoke runs)")
    ap.add_argument("--set", action="append", default=[], help="override a config key, e.g. train.epochs=2")
    args = ap.parse_args()

    from bloodcell.config import DetectorRunConfig, dump_config, load_config
    from bloodcell.data.fields import load_voc
    from bloodcell.models.detector import create_detector, save_detector

    cfg = load_config(args.config, args.set, schema=DetectorRunConfig)
    root = args.data or cfg.data.root
    if not root:
        raise SystemExit("no data: pass --data DIR or set data.root in the config")
    torch.set_num_threads(cfg.train.num_threads or torch.get_num_threads())
    torch.manual_seed(cfg.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    train, val = load_voc(root, cfg.data.train_split), load_voc(root, cfg.data.val_split)
    if args.limit:
        train, val = train[: args.limit], val[: args.limit]
    det = create_detector(cfg.detector.name, **cfg.detector.kwargs)
    t0 = time.time()
    summary = det.fit(train, val, cfg.train, out, args.resume, progress=False)
    summary["wall_seconds_this_call"] = round(time.time() - t0, 1)
    save_detector(det, out, {"training": summary})
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

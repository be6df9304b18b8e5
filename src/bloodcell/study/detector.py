"""One detector run from its config: fit on train, thresholds on val, report on test, all in the run directory.

run_dir/
  config.yaml        the resolved config (the run is fully described by it)
  detector.json      the detector (+ detector.safetensors when it learns weights): load with load_detector
  metrics.json       val and test metrics, seconds per photograph, fit time, machine
  report.md          the same as tables, with how every number was obtained
  examples.png       test photographs with found boxes (colour) over the true ones (thin white)
"""

from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch

from bloodcell import io
from bloodcell.config import DetectorRunConfig, dump_config
from bloodcell.data.fields import FIELD_CLASSES, load_voc
from bloodcell.errors import ConfigError
from bloodcell.evaluate.annotate import draw_cells
from bloodcell.evaluate.detect import choose_thresholds, detection_metrics, machine_line, metrics_table, run_detector
from bloodcell.intended_use import REPORT_NOTE
from bloodcell.models.detector import DETECTOR_METADATA, DETECTOR_WEIGHTS, create_detector, load_detector, save_detector

METRICS_FILE = "metrics.json"


def run_detector_config(cfg: DetectorRunConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    if cfg.data.root is None:
        raise ConfigError("data.root: no smear-photograph folder given (use --data DIR, a Pascal VOC folder)")
    config_file = out / "config.yaml"
    if config_file.exists():
        if not resume:
            raise ConfigError(f"{out} already holds a detector run: add --resume to continue it, or choose another --out")
        if config_file.read_text() != dump_config(cfg):
            raise ConfigError(f"{config_file}: the run in {out} was started with another config; choose another --out")
    io.write_text(config_file, dump_config(cfg))
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    train = load_voc(cfg.data.root, cfg.data.train_split)
    val = load_voc(cfg.data.root, cfg.data.val_split)
    test = load_voc(cfg.data.root, cfg.data.test_split)
    detector = create_detector(cfg.detector.name, **cfg.detector.kwargs)
    start = time.perf_counter()
    fit_summary = detector.fit(train, val, cfg.train, out, resume, progress)
    fit_seconds = time.perf_counter() - start

    iou = cfg.eval.match_iou
    raw_val, _ = run_detector(detector, val, progress, "detecting (val)")
    detector.score_thresholds = choose_thresholds(raw_val, val, iou)
    raw_test, seconds = run_detector(detector, test, progress, "detecting (test)")
    metrics = {
        "detector": cfg.detector.name,
        "val": detection_metrics(raw_val, val, detector.score_thresholds, iou),
        "test": detection_metrics(raw_test, test, detector.score_thresholds, iou),
        "seconds_per_photo": seconds,
        "fit_seconds_this_session": fit_seconds,
        "fit": fit_summary,
        "photos": {"train": len(train), "val": len(val), "test": len(test)},
        "machine": machine_line(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    save_detector(detector, out, metadata={
        "trained_on": {"root": str(cfg.data.root), "split": cfg.data.train_split, "photos": len(train)},
        "thresholds_from": {"split": cfg.data.val_split, "photos": len(val)},
        "test": {c: {k: metrics["test"]["classes"][c][k] for k in ("precision", "recall", "ap", "count_rel_error")}
                 for c in FIELD_CLASSES},
    })
    weights = out / DETECTOR_WEIGHTS
    metrics["size_mb"] = ((weights.stat().st_size if weights.exists() else 0) + (out / DETECTOR_METADATA).stat().st_size) / 1e6
    io.write_json(out / METRICS_FILE, metrics)
    _write_examples(out / "examples.png", detector, test[: cfg.eval.annotated_examples], raw_test)
    io.write_text(out / "report.md", report_text(cfg, metrics))
    return metrics


def _write_examples(path: Path, detector, photos, raw) -> None:
    from PIL import Image

    from bloodcell.data.images import open_rgb

    if not photos:
        return
    tiles = []
    for ann, det in zip(photos, raw):
        kept = detector.apply_thresholds(det)
        cells = [{"box": b, "kind": FIELD_CLASSES[l]} for b, l in zip(kept.boxes, kept.labels)]
        tiles.append(draw_cells(np.asarray(open_rgb(ann.path)), cells, truth=ann.boxes))
    w, h = tiles[0].size
    cols = min(3, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile.resize((w, h)), ((i % cols) * w, (i // cols) * h))
    with io.atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def report_text(cfg: DetectorRunConfig, metrics: dict) -> str:
    test, val = metrics["test"], metrics["val"]
    return "\n".join([
        f"# Detector run: {cfg.name or cfg.detector.name}",
        "",
        f"*{REPORT_NOTE}*",
        "",
        f"Detector `{cfg.detector.name}`, fitted on split `{cfg.data.train_split}` ({metrics['photos']['train']} photographs) of "
        f"`{cfg.data.root}`; score thresholds chosen on `{cfg.data.val_split}` ({metrics['photos']['val']}); "
        f"measured on `{cfg.data.test_split}` ({metrics['photos']['test']}), never fitted or tuned on. Seed {cfg.seed}.",
        f"A found box counts as a cell when its IoU with a true box of the same class is >= {cfg.eval.match_iou} "
        "(one-to-one matching); AP is COCO's, at that IoU, over all boxes (torchmetrics).",
        "Count error: |found - true| per photograph; relative: that over the true count, averaged over photographs having the class.",
        "",
        f"## Test ({test['photos']} photographs), mAP {test['map']:.3f}",
        "",
        metrics_table(test),
        "",
        f"## Validation ({val['photos']} photographs; thresholds chosen here), mAP {val['map']:.3f}",
        "",
        metrics_table(val),
        "",
        "## Cost",
        "",
        f"- {metrics['seconds_per_photo']:.3f} s per photograph (detection only, decode excluded), on {metrics['machine']}",
        f"- fit: {metrics['fit_seconds_this_session'] / 60:.1f} min in this session; {json.dumps(metrics['fit'])}",
        f"- saved detector: {metrics['size_mb']:.2f} MB",
        f"- Python {metrics['python']}, torch {metrics['torch']}",
        "",
        "![test photographs: found boxes in colour (red cells red, white cells blue, platelets green), true boxes thin white](examples.png)",
        "",
    ])


def evaluate_detector(detector_path: str | Path, root: str | Path, split: str = "test", match_iou: float = 0.5,
                      thresholds_split: str | None = None, progress: bool = True) -> dict:
    """Measure a saved detector on one split of a VOC folder, at its own thresholds (or ones chosen on thresholds_split)."""
    detector = load_detector(detector_path)
    photos = load_voc(root, split)
    if thresholds_split:
        tune = load_voc(root, thresholds_split)
        raw_tune, _ = run_detector(detector, tune, progress, f"detecting ({thresholds_split})")
        detector.score_thresholds = choose_thresholds(raw_tune, tune, match_iou)
    raw, seconds = run_detector(detector, photos, progress, f"detecting ({split})")
    out = detection_metrics(raw, photos, detector.score_thresholds, match_iou)
    out.update(seconds_per_photo=seconds, machine=machine_line(), split=split, root=str(root))
    return out

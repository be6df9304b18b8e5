"""One detector run from its config: fit on train, thresholds on val, report on test, all in the run directory.

run_dir/
  config.yaml        the resolved config (the run is fully described by it)
  detector.json      the detector (+ detector.safetensors when it learns weights): load with load_detector
  train_log.csv, checkpoints/   the fcos trainer's (bloodcell.detect.fcos_train)
  search.csv         the classical detector's search (bloodcell.detect.classical_fit)
  metrics.json       val and test metrics (pooled, and per set and source), seconds per photograph, fit time, machine
  report.md          the same as tables, with how every number was obtained
  examples.png       test photographs with found boxes (colour) over the true ones (thin white)
"""

from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from PIL import Image

from bloodcell import io
from bloodcell.config import dump_config
from bloodcell.data.fields import FIELD_CLASSES, FieldAnnotation, FieldSets, by_source, combine_field_sets, load_fields
from bloodcell.data.images import open_rgb
from bloodcell.detect.base import Detections, FieldDetector, cell_scale
from bloodcell.detect.classical_fit import fit_classical
from bloodcell.detect.config import DetectorRunConfig, DetectorTrainConfig
from bloodcell.detect.fcos_train import fit_fcos
from bloodcell.detect.metrics import (
    choose_thresholds,
    detection_metrics,
    machine_line,
    metrics_table,
    run_detector,
    source_table,
)
from bloodcell.detect.registry import DETECTOR_METADATA, DETECTOR_WEIGHTS, create_detector, load_detector, save_detector
from bloodcell.errors import ConfigError
from bloodcell.evaluate.annotate import draw_cells
from bloodcell.intended_use import REPORT_NOTE

METRICS_FILE = "metrics.json"
# The trainer of each built-in detector that learns, by its registered name; any other detector is used as built.
TRAINERS: dict[str, Callable[..., dict]] = {"classical": fit_classical, "fcos": fit_fcos}


def run_detector_config(cfg: DetectorRunConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Run `cfg` in the folder `out` (see the module docstring for what it leaves there); return its metrics.

    Args:
        out: the run's folder; one that holds another run is refused, and the same run only with `resume`.
        resume: continue a killed run of the same config (its trainer's last checkpoint, where it keeps one).
    """
    out = Path(out)
    sets = field_sets(cfg)
    _claim_folder(out, dump_config(cfg), resume)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    train, val = sets.train, sets.val
    # the first set's test split is the pooled test row; every set is also per source
    test = next(iter(sets.tests.values()))
    detector = create_detector(cfg.detector.name, **cfg.detector.kwargs)
    detector.cell_scale = cell_scale(train, detector.options.get("long_side"))
    start = time.perf_counter()
    fit_summary, raw_val = fit_detector(detector, train, val, cfg.train, out, resume, progress, cfg.eval.match_iou)
    fit_seconds = time.perf_counter() - start

    iou = cfg.eval.match_iou
    by_set, raw_sets, seconds = {}, {}, []
    for name, photos in sets.tests.items():
        raw_sets[name], sec = run_detector(detector, photos, progress, f"detecting ({name} test)")
        seconds.append((sec, len(photos)))
        by_set[name] = per_source_metrics(raw_sets[name], photos, detector.score_thresholds, iou)
    raw_test = next(iter(raw_sets.values()))
    metrics = {
        "detector": cfg.detector.name,
        "val": detection_metrics(raw_val, val, detector.score_thresholds, iou),
        "test": detection_metrics(raw_test, test, detector.score_thresholds, iou),
        "test_sets": by_set,
        "leave_out": cfg.data.leave_out,
        "seconds_per_photo": sum(s * n for s, n in seconds) / max(1, sum(n for _, n in seconds)),
        "fit_seconds_this_session": fit_seconds,
        "fit": fit_summary,
        "photos": {
            "train": len(train),
            "val": len(val),
            "test": {k: len(v) for k, v in sets.tests.items()},
            "train_by_source": _source_counts(train),
            "val_by_source": _source_counts(val),
            "removed": sets.removed,
        },
        "machine": machine_line(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    save_detector(detector, out, metadata=_detector_metadata(cfg, train, val, by_set, metrics["test"]))
    weights = out / DETECTOR_WEIGHTS
    weights_size = weights.stat().st_size if weights.exists() else 0
    metrics["size_mb"] = (weights_size + (out / DETECTOR_METADATA).stat().st_size) / 1e6
    io.write_json(out / METRICS_FILE, metrics)
    _write_examples(out / "examples.png", detector, test[: cfg.eval.annotated_examples], raw_test)
    io.write_text(out / "report.md", report_text(cfg, metrics))
    return metrics


def _claim_folder(out: Path, config_text: str, resume: bool) -> None:
    """Write the run's config.yaml into `out`; refuse a folder holding another run (or this one, unless resuming)."""
    config_file = out / "config.yaml"
    if config_file.exists():
        if not resume:
            raise ConfigError(
                f"{out} already holds a detector run: add --resume to continue it, or choose another --out"
            )
        if config_file.read_text() != config_text:
            raise ConfigError(f"{config_file}: the run in {out} was started with another config; choose another --out")
    io.write_text(config_file, config_text)


def _detector_metadata(cfg: DetectorRunConfig, train, val, by_set: dict, test: dict) -> dict:
    """What the saved detector says of itself: the photos it was trained and thresholded on, and its test scores."""
    return {
        "trained_on": {
            "sets": _set_roots(cfg),
            "photos": len(train),
            "by_source": _source_counts(train),
            "leave_out": cfg.data.leave_out,
        },
        "thresholds_from": {"photos": len(val), "by_source": _source_counts(val)},
        "test_by_source": {
            f"{name}/{src}" if len(groups) > 1 else name: _headline(m)
            for name, groups in by_set.items()
            for src, m in groups.items()
        },
        "test": {
            c: {k: test["classes"][c][k] for k in ("precision", "recall", "ap", "count_rel_error")}
            for c in FIELD_CLASSES
        },
    }


def fit_detector(
    detector: FieldDetector,
    train: Sequence[FieldAnnotation],
    val: Sequence[FieldAnnotation],
    settings: DetectorTrainConfig,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    match_iou: float = 0.5,
) -> tuple[dict, list[Detections]]:
    """Fit `detector` with its trainer (TRAINERS; none: used as built), then choose its operating thresholds on the
    `val` photographs (the one place they are chosen). Returns the fit's summary, which records the thresholds and how
    many photographs chose them, and the raw detections on `val`.

    Args:
        settings: the run's `train` section, for the trainer.
        run_dir: the run's folder (checkpoints, the trainer's log).
        resume: continue a killed fit from its last checkpoint, where the trainer keeps one.
        match_iou: a found box is the cell when IoU >= this, for choosing the thresholds.
    """
    trainer = TRAINERS.get(detector.name)
    summary = trainer(detector, train, settings, Path(run_dir), resume, progress) if trainer else {}
    raw_val, _ = run_detector(detector, val, progress, "detecting (val)")
    detector.score_thresholds = choose_thresholds(raw_val, val, match_iou)
    if val:
        summary.update(val_photographs=len(val), score_thresholds=dict(detector.score_thresholds))
    return summary, raw_val


def field_sets(cfg: DetectorRunConfig) -> FieldSets:
    """The run's photographs: data.sets combined (leak-free, see combine_field_sets), or the one folder of data.root."""
    if cfg.data.sets:
        missing = [name for name, spec in cfg.data.sets.items() if not spec.root]
        if missing:
            raise ConfigError(
                f"data.sets.{missing[0]}.root: no folder given (use --set data.sets.{missing[0]}.root=DIR)"
            )
        return combine_field_sets({name: spec.model_dump() for name, spec in cfg.data.sets.items()}, cfg.data.leave_out)
    if cfg.data.root is None:
        raise ConfigError("data.root: no smear-photograph folder given (use --data DIR, a Pascal VOC or YOLO folder)")
    spec = {
        "root": cfg.data.root,
        "train_split": cfg.data.train_split,
        "val_split": cfg.data.val_split,
        "test_split": cfg.data.test_split,
    }
    return combine_field_sets({Path(cfg.data.root).name.lower(): spec}, cfg.data.leave_out)


def per_source_metrics(raw, photos, thresholds: dict, iou: float) -> dict[str, dict]:
    """detection_metrics for each source of a set's photographs (one row, 'all', when they carry no source).

    Args:
        raw: each photograph's detections (every candidate box), in the order of `photos`.
        photos: the annotated photographs; each one's source groups it (data.fields.by_source).
        thresholds: the operating score threshold per FIELD_CLASSES name.
        iou: the IoU at which a box matches a true one.
    """
    groups = by_source(photos)
    index = {id(a): i for i, a in enumerate(photos)}
    return {
        src: detection_metrics([raw[index[id(a)]] for a in items], items, thresholds, iou)
        for src, items in sorted(groups.items())
    }


def _headline(m: dict) -> dict:
    keys = ("precision", "recall", "ap", "count_error_ratio", "count_exact")
    return {c: {k: m["classes"][c][k] for k in keys} for c in FIELD_CLASSES} | {"photos": m["photos"]}


def _source_counts(items) -> dict[str, int]:
    return {src: len(v) for src, v in sorted(by_source(items).items())}


def _set_roots(cfg: DetectorRunConfig) -> dict[str, str]:
    if cfg.data.sets:
        return {name: str(spec.root) for name, spec in cfg.data.sets.items()}
    return {Path(cfg.data.root).name.lower(): str(cfg.data.root)}


def _write_examples(path: Path, detector, photos, raw) -> None:
    if not photos:
        return
    tiles = []
    for ann, det in zip(photos, raw):
        kept = detector.apply_thresholds(det)
        cells = [{"box": b, "kind": FIELD_CLASSES[k]} for b, k in zip(kept.boxes, kept.labels)]
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
    test, val, photos = metrics["test"], metrics["val"], metrics["photos"]
    left_out = (
        f" Source `{cfg.data.leave_out}` was left out of training and tuning entirely: its rows say what a new "
        "lab can expect."
        if cfg.data.leave_out
        else ""
    )
    return "\n".join(
        [
            f"# Detector run: {cfg.name or cfg.detector.name}",
            "",
            f"*{REPORT_NOTE}*",
            "",
            f"Detector `{cfg.detector.name}`, fitted on {photos['train']} photographs "
            f"({_listing(photos['train_by_source'])}) "
            f"of {_listing(_set_roots(cfg))}; score thresholds chosen on {photos['val']} validation photographs "
            f"({_listing(photos['val_by_source'])}); measured on each set's test split, never fitted or tuned on. "
            f"Seed {cfg.seed}.",
            "Photographs left out so that none crosses from an evaluation split into training: "
            f"{_listing(photos['removed']) or 'none'}." + left_out,
            f"A found box counts as a cell when its IoU with a true box of the same class is >= {cfg.eval.match_iou} "
            "(one-to-one matching); AP is COCO's, at that IoU, over all boxes (torchmetrics).",
            "Count error: mean |found - true| per photograph over the mean true count; "
            "relative: |found - true| over the "
            "true count, averaged over photographs having the class; bias: mean found - true; "
            "exact: photographs counted "
            "exactly.",
            "",
            "## Test, per set and source",
            "",
            source_table(metrics["test_sets"], metrics.get("leave_out")),
            "",
            f"## Test, {next(iter(metrics['test_sets']))} pooled ({test['photos']} photographs), mAP {test['map']:.3f}",
            "",
            metrics_table(test),
            "",
            f"## Validation ({val['photos']} photographs; thresholds chosen here), mAP {val['map']:.3f}",
            "",
            metrics_table(val),
            "",
            "## Cost",
            "",
            f"- {metrics['seconds_per_photo']:.3f} s per photograph (detection only, decode excluded), "
            f"on {metrics['machine']}",
            f"- fit: {metrics['fit_seconds_this_session'] / 60:.1f} min in this session; {json.dumps(metrics['fit'])}",
            f"- saved detector: {metrics['size_mb']:.2f} MB",
            f"- Python {metrics['python']}, torch {metrics['torch']}",
            "",
            "![test photographs: found boxes in colour (red cells red, white cells blue, platelets green), "
            "true boxes thin white](examples.png)",
            "",
        ]
    )


def _listing(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def evaluate_detector(
    detector_path: str | Path,
    root: str | Path,
    split: str = "test",
    match_iou: float = 0.5,
    thresholds_split: str | None = None,
    progress: bool = True,
) -> dict:
    """Measure a saved detector on one split of a VOC or YOLO folder, at its own thresholds (or ones chosen on
    thresholds_split): the pooled metrics, and per source (`sources`) when the photographs say where they come from.

    Args:
        detector_path: a detector folder, its detector.json, or 'default' (the bundled one).
        root: a Pascal VOC or YOLO folder.
        match_iou: a found box is the cell when IoU >= this.
        thresholds_split: a split of `root` to choose the thresholds on instead of the detector's own.
    """
    detector = load_detector(detector_path)
    photos = load_fields(root, split)
    if thresholds_split:
        tune = load_fields(root, thresholds_split)
        raw_tune, _ = run_detector(detector, tune, progress, f"detecting ({thresholds_split})")
        detector.score_thresholds = choose_thresholds(raw_tune, tune, match_iou)
    raw, seconds = run_detector(detector, photos, progress, f"detecting ({split})")
    out = detection_metrics(raw, photos, detector.score_thresholds, match_iou)
    out.update(
        seconds_per_photo=seconds,
        machine=machine_line(),
        split=split,
        root=str(root),
        sources=per_source_metrics(raw, photos, detector.score_thresholds, match_iou),
    )
    return out

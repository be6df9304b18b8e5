"""Copy a finished detector run into the package as the bundled default detector.

    .venv/bin/python tools/bundle_detector.py runs/detector-lab src/bloodcell/assets/default_detector \
        [--loso runs/detector-loso-raabin runs/detector-loso-pbc ...]

Copies detector.json (+ detector.safetensors when the detector has weights) and adds where it came from: the
config, the test figures of its run (pooled, and per set and source), the machine, and with --loso the rows of
leave-one-source-out runs (each trained without one source: what a new lab can expect). Refuses a run without
metrics.json (unfinished) or a detector that does not load. An FCOS detector is then exported to detector.onnx (what an
install without PyTorch runs; bloodcell.detect.fcos_onnx), checked against PyTorch and described by detector.json's
`onnx` section, and its detector.safetensors removed (DETECTOR_CARD.md is written last, from the final detector.json):
the bundled folder keeps the weights once, as the graph's initializers, and the torch FCOS loads them from
detector.onnx. The section records the hashes of detector.onnx, of the weights it holds and of the run's
detector.safetensors it was exported from.

    .venv/bin/python tools/bundle_detector.py --refresh src/bloodcell/assets/default_detector

redoes only the ONNX export of the detector already there (from the weights in its detector.onnx, or its
detector.safetensors). `--check-photos DIR` checks the export on the photographs in DIR
(e.g. ../shared/data/bccd/BCCD/JPEGImages) instead of generated ones.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bloodcell import io
from bloodcell.detect.fcos_onnx import DETECTOR_ONNX
from bloodcell.detect.registry import DETECTOR_METADATA, DETECTOR_WEIGHTS, load_detector
from bloodcell.models.metadata import write_sealed_json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, nargs="?", help="the finished detector run (left out with --refresh)")
    ap.add_argument("dest", type=Path)
    ap.add_argument("--refresh", action="store_true", help="only redo the ONNX export of the detector in DEST")
    ap.add_argument(
        "--check-photos", type=Path, default=None, help="check the ONNX export on these photographs (a folder)"
    )
    ap.add_argument("--limit", type=int, default=24, help="at most this many of --check-photos, spread over the folder")
    ap.add_argument(
        "--loso", type=Path, nargs="*", default=[], help="finished leave-one-source-out runs (data.leave_out set)"
    )
    args = ap.parse_args()
    if not args.refresh:
        if args.run is None:
            sys.exit("error: give the run and the destination, or --refresh DEST")
        bundle(args.run, args.dest, args.loso)
    finish(args.dest, args.check_photos, args.limit)
    write_card(args.dest)


def write_card(dest: Path) -> None:
    """DETECTOR_CARD.md from the final detector.json (a test keeps the two equal)."""
    from bloodcell.infer.card import DETECTOR_CARD, detector_card_for

    io.write_text(dest / DETECTOR_CARD, detector_card_for(dest))
    print(f"wrote {dest / DETECTOR_CARD}")


HEADLINE = (
    "precision",
    "recall",
    "ap",
    "count_mae",
    "count_rel_error",
    "count_error_ratio",
    "count_bias",
    "count_exact",
)


def _headline(classes: dict) -> dict:
    return {c: {k: m[k] for k in HEADLINE if k in m} for c, m in classes.items()}


def by_source(metrics: dict) -> dict:
    """{"txl_pbc/raabin": {photos, classes: headline}, "bccd": ...} from a run's metrics.json."""
    return {
        f"{name}/{src}" if len(groups) > 1 else name: {"photos": m["photos"], "classes": _headline(m["classes"])}
        for name, groups in metrics.get("test_sets", {}).items()
        for src, m in groups.items()
    }


def left_out_rows(runs: list[Path]) -> dict:
    """Each leave-one-source-out run's rows for the source it never saw."""
    rows = {}
    for run in runs:
        metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
        if not metrics or not metrics.get("leave_out"):
            sys.exit(f"error: {run} is not a finished leave-one-source-out run (metrics.json with leave_out)")
        source = metrics["leave_out"]
        seen = {k: v for k, v in by_source(metrics).items() if k.split("/")[-1] == source}
        rows[source] = {
            "run": run.name,
            "test": seen,
            "train_photographs": metrics["photos"]["train"],
            "epochs": metrics["fit"].get("epochs"),
            "initial_weights": metrics["fit"].get("initial_weights"),
        }
    return rows


def bundle(run: Path, dest: Path, loso: list[Path] = ()) -> None:
    if not (run / "metrics.json").is_file():
        sys.exit(f"error: {run} is not a finished detector run (no metrics.json)")
    load_detector(run)  # refuses a broken folder before it ships
    metrics = json.loads((run / "metrics.json").read_text())
    meta = json.loads((run / DETECTOR_METADATA).read_text())
    meta.pop("onnx", None)  # describes an export of other weights, if any
    meta["bundled"] = {
        "run_config": (run / "config.yaml").read_text(),
        "test": _headline(metrics["test"]["classes"]),
        "test_photos": metrics["test"]["photos"],
        "test_by_source": by_source(metrics),
        "leave_one_source_out": left_out_rows(list(loso)),
        "seconds_per_photo": metrics["seconds_per_photo"],
        "machine": metrics["machine"],
        "retrain": "make detector TXL=/path/to/TXL-PBC BCCD=/path/to/BCCD_Dataset",
    }
    dest.mkdir(parents=True, exist_ok=True)
    for stale in (dest / DETECTOR_WEIGHTS, dest / DETECTOR_ONNX):  # a classical detector has neither
        if stale.exists() and not (run / DETECTOR_WEIGHTS).exists():
            stale.unlink()
    if (run / DETECTOR_WEIGHTS).exists():
        shutil.copyfile(run / DETECTOR_WEIGHTS, dest / DETECTOR_WEIGHTS)
    write_sealed_json(dest / DETECTOR_METADATA, meta)  # and seal dest (bloodcell.models.seal)
    load_detector(dest)
    print(f"bundled {run} -> {dest}")


def finish(dest: Path, check_photos: Path | None, limit: int) -> None:
    """An FCOS detector's folder becomes detector.json + detector.onnx (its weights kept once, in the graph)."""
    meta = json.loads((dest / DETECTOR_METADATA).read_text())
    if meta["detector"] != "fcos":
        print(f"no ONNX export: the '{meta['detector']}' detector needs none")
        return
    import numpy as np

    from PIL import Image

    from bloodcell.detect.export import export_bundled_detector

    photos, source = None, ""
    if check_photos is not None:
        files = sorted(p for p in check_photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            sys.exit(f"error: no photographs in {check_photos}")
        picked = [
            files[i] for i in np.unique(np.linspace(0, len(files) - 1, min(limit, len(files))).round().astype(int))
        ]
        photos = [np.array(Image.open(f).convert("RGB")) for f in picked]
        source = f"photographs of {check_photos.parent.name}/{check_photos.name}, evenly spread over its {len(files)}"
    section = export_bundled_detector(dest, photos, source)
    at = section["at_thresholds"]
    print(
        f"exported {dest / DETECTOR_ONNX} "
        f"({(dest / DETECTOR_ONNX).stat().st_size / 1e6:.1f} MB, {section['exporter']}), "
        f"checked on {section['checked_on']}: largest output difference vs PyTorch {section['max_abs_diff']:.2g}; "
        f"{at['boxes']} boxes at the thresholds, lowest IoU {at['min_iou']:.6f}, "
        f"largest score difference {at['max_score_diff']:.2g}; "
        f"{dest} holds {', '.join(sorted(p.name for p in dest.iterdir()))}"
    )


if __name__ == "__main__":
    main()

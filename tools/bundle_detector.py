"""Copy a finished detector run into the package as the bundled default detector.

    .venv/bin/python tools/bundle_detector.py runs/detector src/bloodcell/assets/default_detector

Copies detector.json (+ detector.safetensors when the detector has weights) and adds where it came from: the
config, the test figures of its run and the machine. Refuses a run without metrics.json (unfinished) or a
detector that does not load.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bloodcell import io
from bloodcell.models.detector import DETECTOR_METADATA, DETECTOR_WEIGHTS, load_detector


def main() -> None:
    run, dest = Path(sys.argv[1]), Path(sys.argv[2])
    if not (run / "metrics.json").is_file():
        sys.exit(f"error: {run} is not a finished detector run (no metrics.json)")
    load_detector(run)  # refuses a broken folder before it ships
    metrics = json.loads((run / "metrics.json").read_text())
    meta = json.loads((run / DETECTOR_METADATA).read_text())
    meta["bundled"] = {
        "run_config": (run / "config.yaml").read_text(),
        "test": {c: {k: m[k] for k in ("precision", "recall", "ap", "count_mae", "count_rel_error")}
                 for c, m in metrics["test"]["classes"].items()},
        "test_photos": metrics["test"]["photos"],
        "seconds_per_photo": metrics["seconds_per_photo"],
        "machine": metrics["machine"],
        "retrain": "make detector BCCD=/path/to/BCCD_Dataset",
    }
    dest.mkdir(parents=True, exist_ok=True)
    for stale in (dest / DETECTOR_WEIGHTS,):
        if stale.exists() and not (run / DETECTOR_WEIGHTS).exists():
            stale.unlink()
    if (run / DETECTOR_WEIGHTS).exists():
        shutil.copyfile(run / DETECTOR_WEIGHTS, dest / DETECTOR_WEIGHTS)
    io.write_json(dest / DETECTOR_METADATA, meta)
    load_detector(dest)
    print(f"bundled {run} -> {dest}")


if __name__ == "__main__":
    main()

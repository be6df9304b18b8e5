"""Copy a finished run's model into the package as the bundled default model.

    .venv/bin/python tools/bundle_model.py runs/default-model src/bloodcell/assets/default_model

Copies model.safetensors, ood.safetensors (its out-of-distribution statistics) and model.json (which already
carries classes, input size, normalisation, temperature, review and OOD thresholds, training config and test metrics)
and adds where the model came from, keeps the known limits measured for the model it replaces (edit them in model.json
when they change), exports it to model.onnx (checked against PyTorch; what the light install without PyTorch runs,
described by model.json's `onnx` section) and writes MODEL_CARD.md from all of it. Refuses an unfinished run.

    .venv/bin/python tools/bundle_model.py --refresh src/bloodcell/assets/default_model

redoes only the ONNX export and the card of the model already there.

    .venv/bin/python tools/bundle_model.py runs/default-model src/bloodcell/assets/default_model --labs-study runs/labs

also copies into the card the leave-one-lab-out study's held-out tables (configs/labs.yaml) that chose its recipe.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from bloodcell import io
from bloodcell.infer.card import BUNDLED_SOURCE, model_card
from bloodcell.infer.export import export_bundled
from bloodcell.models.checkpoint import load_checkpoint
from bloodcell.models.description import read_description, write_description


def protocol_rows(study: Path) -> list[dict]:
    """The held-out rows of a finished configs/labs.yaml study, as the card shows them."""
    from bloodcell.study.labs_report import lab_rows
    from bloodcell.study.report import _metrics
    from bloodcell.study.spec import expand_runs, load_study

    spec, base = load_study(study / "study.yaml")
    by: dict = {}
    for r in expand_runs(spec, base):
        by.setdefault((r.experiment.name, r.protocol), []).append((r, _metrics(study, r)))
    return [
        {"lab": lab, "recipe": row[0], "seeds": row[1], "accuracy": row[3], "kept": row[5], "kept_right": row[6]}
        for (lab, seen), rows in sorted(lab_rows(spec, by).items())
        if not seen
        for row in rows
    ]


def main() -> None:
    if sys.argv[1] == "--refresh":
        finish(Path(sys.argv[2]))
        return
    run, dest = Path(sys.argv[1]), Path(sys.argv[2])
    study = Path(sys.argv[sys.argv.index("--labs-study") + 1]) if "--labs-study" in sys.argv else None
    status = json.loads((run / "status.json").read_text())
    if status.get("state") != "complete":
        sys.exit(f"error: {run} is not a finished run (status {status.get('state')})")
    load_checkpoint(run)  # refuses a broken or mismatched pair before it ships
    metrics = json.loads((run / "metrics.json").read_text())
    description = read_description(run)
    test = metrics["test"]
    labs = [lab["name"] for lab in ((description.training_config or {}).get("data") or {}).get("labs") or []]
    bundled = {
        "trained_on": "PBC (Acevedo et al. 2020), training part of the default split"
        + (
            f"; and the train and validation parts of {', '.join(labs)}'s own split (white cells cut from its "
            "smear photographs by the field path's crop rule)"
            if labs
            else ""
        ),
        "split": {"seed": metrics["provenance"]["split_seed"], "test_size": 0.3, "val_size": 0.2, "dedup": True},
        "data_fingerprint": metrics["provenance"]["data_fingerprint"],
        "test_accuracy": test["accuracy"],
        "test_accuracy_ci95": test["ci95"]["accuracy"],
        "test_f1_macro": test["f1_macro"],
        "test_ece": test["ece"],
        "test_ece_calibrated": test["ece_calibrated"],
        "test_n": test["n"],
        "per_class_recall": {k: v["recall"] for k, v in test["per_class"].items()},
        "machine": metrics["provenance"]["environment"],
        "train_seconds": metrics["provenance"].get("train_seconds"),
        "retrain": "make default-model PBC=/path/to/PBC_dataset_normal_DIB",
    }
    if study is not None:
        bundled["lab_protocol"] = protocol_rows(study)
    if (dest / "model.json").exists():
        bundled["known_limits"] = (read_description(dest).bundled or {}).get("known_limits", [])
    description = description.replace(bundled=bundled)
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "ood.safetensors"):
        if name == "ood.safetensors" and description.ood is None:
            (dest / name).unlink(missing_ok=True)  # a model without an OOD score must not inherit the old one's
            continue
        with io.atomic_path(dest / name) as tmp:
            shutil.copyfile(run / name, tmp)
    write_description(dest, description)  # and seal dest (bloodcell.models.seal); export_bundled re-seals it
    finish(dest)
    size = (dest / "model.safetensors").stat().st_size / 1e6
    print(f"bundled {description.model_name} ({size:.1f} MB), test accuracy {test['accuracy']:.4f}, into {dest}")


def finish(dest: Path) -> None:
    """model.onnx beside the weights (recorded in model.json), then the card from the final model.json."""
    report = export_bundled(dest)
    print(
        f"exported {report.path} ({report.exporter}); largest logit difference vs PyTorch {report.max_abs_diff:.2g} "
        f"on {report.images} {report.image_source}"
    )
    io.write_text(dest / "MODEL_CARD.md", model_card(read_description(dest), source=BUNDLED_SOURCE))


if __name__ == "__main__":
    main()

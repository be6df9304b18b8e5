"""Model cards: what a model is for, what it was trained on, how well it did and where it is known to fail.

A card is written from the model's own metadata (model.json, plus the run's metrics.json when it is there), so it
cannot drift from the model it describes. `export` writes one beside each .onnx file; the bundled model carries
MODEL_CARD.md (rebuilt by tools/bundle_model.py; a test keeps it equal to what its model.json gives).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from bloodcell.intended_use import INTENDED_USE
from bloodcell.models.description import (
    METADATA_FILE,
    Adaptation,
    LabFigures,
    ModelDescription,
    parse_description,
    read_description,
    read_onnx_description,
)

GENERAL_LIMITS = [
    "It sees one cell per image, centred, as the training images show it; a photograph of a whole smear field is "
    "another task (bloodcell's field detector finds the cells first).",
    "Its accuracy is measured on the test part of its own dataset; another lab's microscope, camera or stain can "
    "lower it sharply. Measure it on your own labelled cells first (`bloodcell evaluate YOUR_CELLS --model M`).",
    "Classes it was not trained on (e.g. blasts, smudge cells, artefacts) are still given one of its classes; the "
    "out-of-distribution score and the review threshold catch some of them, not all.",
]


BUNDLED_SOURCE = "bundled with bloodcell"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * float(x):.2f} %"


def model_card(meta: dict | ModelDescription, metrics: dict | None = None, source: str = "") -> str:
    """The card (markdown) of a model from its description (model.json) and, if given, its run's metrics.json.

    Args:
        meta: the model's description, or model.json's object as a dict.
        metrics: the run's metrics.json, when there (test figures with CIs, per-class recall).
        source: what the title names in brackets (the bundled model, a folder or file name).
    """
    d = meta if isinstance(meta, ModelDescription) else parse_description(meta)
    pre = d.preprocessing
    lines = [f"# Model card: {d.model_name or '?'} at {pre.input_size} px" + (f" ({source})" if source else ""), ""]
    lines += ["## Intended use", "", INTENDED_USE, ""]
    lines += _training_lines(d, (metrics or {}).get("provenance") or {})
    lines += _metrics_lines(d, (metrics or {}).get("test") or {})
    lines += _calibration_lines(d)
    lines += _adaptation_lines(d.adaptation)
    lines += _labs_lines(d.labs or {}, (d.bundled or {}).get("lab_protocol") or [])
    lines += ["## Known limits", ""]
    lines += [f"- {x}" for x in ((d.bundled or {}).get("known_limits") or []) + GENERAL_LIMITS]
    lines.append("")
    return "\n".join(lines)


def _training_lines(d: ModelDescription, prov: dict) -> list[str]:
    """Training data, split, classes, training run, input and exports."""
    cfg = d.training_config or {}
    data, train, bundled = cfg.get("data") or {}, cfg.get("train") or {}, d.bundled or {}
    pre = d.preprocessing
    lines = ["## Training data", ""]
    split = bundled.get("split") or data.get("split") or {}
    fingerprint = d.data_fingerprint or bundled.get("data_fingerprint") or "not recorded"
    lines.append(
        f"- Data: {bundled.get('trained_on') or data.get('root') or data.get('npz') or 'not recorded'}; "
        f"fingerprint `{fingerprint[:16]}`."
    )
    groups = (prov.get("dataset") or {}).get("split_groups")
    seed = d.split_seed if d.split_seed is not None else split.get("seed")
    lines.append(
        f"- Split: seed {seed}, test {split.get('test_size', '?')}, validation {split.get('val_size', '?')} "
        f"of the rest, byte-identical images {'kept on one side' if split.get('dedup', True) else 'not grouped'}"
        + (f"; groups per part {groups}" if groups else "")
        + "."
    )
    lines.append(f"- Classes ({len(d.class_names or [])}): {', '.join(d.class_names or [])}.")
    pretrained = (cfg.get("model") or {}).get("pretrained")
    epochs = d.epochs_trained if d.epochs_trained is not None else train.get("epochs", "?")
    lines.append(
        f"- Training: {epochs} epochs from {pretrained or 'scratch'}, "
        f"{train.get('optimizer', '?')} at lr {train.get('lr', '?')}, batch {train.get('batch_size', '?')}, "
        f"{d.precision or '?'} on {d.accelerator or '?'}; bloodcell {d.bloodcell_version or '?'}."
    )
    lines.append(
        f"- Input: {pre.input_size} px, {pre.interpolation} resize, white balance {pre.white_balance}, {pre.normalise}."
    )
    if d.onnx is not None:
        onnx = d.onnx
        which = f"{onnx.file} (what an install without PyTorch runs)" if onnx.file else "This file"
        lines.append(
            f"- {which}: ONNX opset {onnx.opset}, largest difference from PyTorch "
            f"{onnx.max_abs_diff or 0:.2g} on {onnx.checked_on or '?'}."
        )
    if d.quantization is not None:
        quant, check = d.quantization, d.quantization.check or {}
        lines.append(
            f"- Quantized: {quant.mode}, calibrated on {quant.calibration}; top-1 agreement with fp32 "
            f"{_pct(check.get('top1_agreement'))} on {check.get('on', '?')}. The metrics below are the fp32 "
            "model's."
        )
    return lines + [""]


def _metrics_lines(d: ModelDescription, test: dict) -> list[str]:
    """The test part's accuracy (with its CI), F1 and recall per class: the bundled record, else metrics.json."""
    bundled, tm = d.bundled or {}, d.test_metrics or {}
    lines = ["## Metrics on its test part", ""]
    acc = bundled.get("test_accuracy", test.get("accuracy", tm.get("accuracy")))
    ci = bundled.get("test_accuracy_ci95") or (test.get("ci95") or {}).get("accuracy")
    n = bundled.get("test_n", test.get("n"))
    lines.append(
        f"- Accuracy: {_pct(acc)}"
        + (f" (95 % bootstrap CI {_pct(ci[0])} to {_pct(ci[1])})" if ci else "")
        + (f" on {n:,} images" if n else "")
        + "."
    )
    lines.append(f"- Macro F1: {_pct(tm.get('f1_macro'))}; weighted F1: {_pct(tm.get('f1_weighted'))}.")
    recall = bundled.get("per_class_recall") or {k: v.get("recall") for k, v in (test.get("per_class") or {}).items()}
    if recall:
        lines.append("- Recall per class: " + ", ".join(f"{k} {_pct(v)}" for k, v in recall.items()) + ".")
    return lines + [""]


def _calibration_lines(d: ModelDescription) -> list[str]:
    """Temperature, review threshold and the OOD score."""
    tm = d.test_metrics or {}
    temperature = 1.0 if d.temperature is None else d.temperature
    lines = ["## Calibration and review", ""]
    lines.append(
        f"- Temperature {temperature:.3f} (fitted on validation): expected calibration error "
        f"{_pct(tm.get('ece'))} before, {_pct(tm.get('ece_calibrated'))} after."
    )
    if d.review_threshold is not None:
        lines.append(
            f"- Review threshold {d.review_threshold:.2f}: answers less confident than this are flagged for a "
            "person (chosen on validation for 99 % accuracy among the rest)."
        )
    if d.ood is not None:
        ood = d.ood
        lines.append(
            f"- Out-of-distribution score: {ood.method} distance in feature space, threshold "
            f"{ood.threshold:.1f} (about {_pct(ood.false_alarm_target)} of its own validation cells flagged); "
            f"fitted on {ood.fitted_on or '?'}."
        )
    return lines + [""]


def _adaptation_lines(adaptation: Adaptation | None) -> list[str]:
    if adaptation is None:
        return []
    src = adaptation.source or {}
    return [
        "## Adapted to a lab",
        "",
        f"- {adaptation.method} on {adaptation.images} unlabelled images of `{adaptation.folder}` "
        f"({adaptation.date}), from {src.get('model')} ({src.get('model_name')}, weights sha256 "
        f"{str(src.get('weights_sha256'))[:12]}). Its OOD check was refitted on those cells. The metrics above "
        "are the source model's, on its own test part: measure this one on labelled cells of that lab.",
        *[f"- Warning: {w}" for w in adaptation.warnings],
        "",
    ]


def _labs_lines(labs: dict[str, LabFigures], protocol: list) -> list[str]:
    """Other labs' cells: this model on each lab it was scored on, and the leave-one-lab-out study behind its recipe."""
    if not labs and not protocol:
        return []
    lines = ["## Cells from other labs", ""]
    if labs:
        lines += [
            'Accuracy over the classes each lab has; kept = neither flagged for review nor OOD. "Adapted": after '
            "`bloodcell adapt` re-estimates its BatchNorm statistics on that lab's own unlabelled cells.",
            "",
            "| lab | trained on it | cells | accuracy | kept | kept right | adapted: accuracy | adapted: kept | "
            "adapted: kept right |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, v in labs.items():
            a, d = v.as_is or {}, v.adapted or {}
            seen = f"yes (scored on its {v.part} part)" if v.seen else "no (never seen)"
            figures = [
                _pct(a.get("accuracy")),
                _pct(a.get("kept_fraction")),
                _pct(a.get("accuracy_kept")),
                _pct(d.get("accuracy")),
                _pct(d.get("kept_fraction")),
                _pct(d.get("accuracy_kept")),
            ]
            lines.append(f"| {name} | {seen} | {a.get('n', '-')} | " + " | ".join(figures) + " |")
        lines.append("")
    if protocol:
        lines += [
            "The leave-one-lab-out study its recipe was chosen by (configs/labs.yaml; each lab held out is never "
            "seen, not even to choose the recipe):",
            "",
            "| held out | recipe | seeds | accuracy % | kept % | kept right % |",
            "|---|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['lab']} | {r['recipe']} | {r['seeds']} | {r['accuracy']} | {r['kept']} | {r['kept_right']} |"
            for r in protocol
        ]
        lines.append("")
    return lines


def card_for(model: str | os.PathLike) -> str:
    """The card of a run or model folder (model.json, and metrics.json when there) or of an exported .onnx."""
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        return model_card(read_onnx_description(path), source=path.name)
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():  # `bloodcell card` says so in one line, as for any unreadable file
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(meta_file))
    description = read_description(meta_file)
    metrics_file = path / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else None
    bundled = description.bundled and description.adaptation is None
    return model_card(description, metrics, source=BUNDLED_SOURCE if bundled else path.name)


# ---------------------------------------------------------------------------------------------- the detector's card

DETECTOR_CARD = "DETECTOR_CARD.md"  # beside the bundled detector's detector.json, rebuilt by tools/bundle_detector.py
DETECTOR_LIMITS = [
    "It knows the labs it was trained on (above). Another lab's microscope, magnification or stain can lower every "
    "figure here: the leave-one-source-out rows, where measured, say by how much for a lab it never saw. Measure it on "
    "a few of your own boxed photographs (`bloodcell detector evaluate DETECTOR --data FOLDER`).",
    "It expects red cells about as wide as those it learnt from (above); a photograph at twice or half that "
    "magnification is refused or warned about, not counted.",
    "Red cells are counted from boxes: where they pile up in thick areas of a smear, boxes merge and the count falls "
    "short. Count in the monolayer, as a lab would by eye.",
    "A figure against a set's own labels is only as complete as those labels: BCCD's leave many red cells unboxed, "
    "so against them it seems to count too many (the bccd row); TXL-PBC boxes the same photographs fully.",
    "It names three kinds: red cells, white cells, platelets. Nucleated red cells, giant platelets, clumps and "
    "artefacts get one of those names or none.",
]


def _ratio(x) -> str:
    return "-" if x is None or x != x else f"{100 * float(x):.1f} %"


def _fixed(x, digits: int = 3) -> str:
    return "-" if x is None or x != x else f"{float(x):.{digits}f}"


def _source_rows(rows: dict) -> list[str]:
    out = [
        "| set / source | photos | red cells: count error (bias / photo) | white P / R | white count exact "
        "| platelet recall | AP@0.5 red / white / platelet |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        c = row["classes"]
        r, w, p = c["rbc"], c["wbc"], c["platelet"]
        out.append(
            f"| {name} | {row['photos']} | {_ratio(r.get('count_error_ratio'))} "
            f"({float(r.get('count_bias', 0)):+.1f}) | "
            f"{_fixed(w['precision'])} / {_fixed(w['recall'])} | {_ratio(w.get('count_exact'))} "
            f"| {_fixed(p['recall'])} | "
            f"{_fixed(r['ap'])} / {_fixed(w['ap'])} / {_fixed(p['ap'])} |"
        )
    return out


def detector_card(meta: dict, source: str = "") -> str:
    """The card (markdown) of a saved detector from its detector.json."""
    bundled = meta.get("bundled") or {}
    lines = [f"# Detector card: {meta.get('detector', '?')}" + (f" ({source})" if source else ""), ""]
    lines += [
        "## What it does",
        "",
        "Finds and boxes every red cell, white cell and platelet in a photograph of a stained blood smear, so that "
        "`bloodcell predict --input field` can count them and classify each white cell. Research and decision "
        "support: not a diagnosis and not a medical device; counts are to be checked by a qualified person.",
        "",
    ]
    lines += _detector_training_lines(meta)
    rows = bundled.get("test_by_source") or meta.get("test_by_source")
    if rows:
        lines += [
            "## Test photographs, per source",
            "",
            "Never trained or tuned on. IoU 0.5, one-to-one matching. "
            "Red-cell count error: mean |counted - boxed| over the mean boxed count.",
            "",
        ]
        lines += _source_rows(rows) + [""]
    lines += _leave_one_source_out_lines(bundled.get("leave_one_source_out") or {})
    if bundled.get("seconds_per_photo"):
        lines += [
            "## Cost",
            "",
            f"- {float(bundled['seconds_per_photo']):.3f} s per photograph, detection only, "
            f"on {bundled.get('machine', '?')}.",
            "",
        ]
    lines += ["## Known limits", ""] + [f"- {x}" for x in DETECTOR_LIMITS] + [""]
    if bundled.get("retrain"):
        lines += ["## Retraining", "", f"`{bundled['retrain']}` (docs/fields.md).", ""]
    return "\n".join(lines)


def _detector_training_lines(meta: dict) -> list[str]:
    """The card's training data: sets and photographs, thresholds, the fit, the cell scale it learnt, its ONNX."""
    trained = meta.get("trained_on") or {}
    fit = (meta.get("state") or {}).get("fit") or {}
    scale = ((meta.get("state") or {}).get("cell_scale") or {}).get("rbc_side_px") or {}
    opts = meta.get("options") or {}
    lines = ["## Training data", ""]
    sets = trained.get("sets") or ({"data": trained["root"]} if trained.get("root") else {})
    lines.append(f"- Sets: {', '.join(f'{k} ({v})' for k, v in sets.items()) or 'not recorded'}.")
    if trained.get("by_source"):
        lines.append(
            f"- {trained.get('photos')} training photographs: "
            + ", ".join(f"{k} {v}" for k, v in trained["by_source"].items())
            + ". No photograph in any set's validation or test split was trained on "
            "(one photograph in two sets is one photograph)."
        )
    thr = meta.get("thresholds_from") or {}
    lines.append(
        f"- Score thresholds chosen on {thr.get('photos', '?')} validation photographs"
        + (f" ({', '.join(f'{k} {v}' for k, v in thr['by_source'].items())})" if thr.get("by_source") else "")
        + f": {', '.join(f'{k} {float(v):.2f}' for k, v in (meta.get('score_thresholds') or {}).items())}."
    )
    lines.append(
        f"- Training: {fit.get('epochs', '?')} epochs"
        + (f" starting from {fit['initial_weights']}" if fit.get("initial_weights") else " from scratch")
        + f", {fit.get('precision', '?')}; input long side {opts.get('long_side', '?')} px; "
        f"bloodcell {meta.get('bloodcell_version', '?')}."
    )
    if scale:
        lines.append(
            f"- Red cells as it learnt them: {scale.get('p05')}-{scale.get('p95')} px wide "
            f"(5th-95th percentile, median {scale.get('p50')}) "
            f"in the photograph resized to {opts.get('long_side', '?')} px."
        )
    onnx = meta.get("onnx") or {}
    if onnx:
        lines.append(
            f"- {onnx.get('file')}: what an install without PyTorch runs; "
            f"it finds the same cells (checked on {onnx.get('checked_on', '?')})."
        )
    return lines + [""]


def _leave_one_source_out_lines(loso: dict) -> list[str]:
    """The card's leave-one-source-out section: per left-out source, the run trained without it, on its photographs."""
    if not loso:
        return []
    starts = sorted({str(r["initial_weights"]) for r in loso.values() if r.get("initial_weights")})
    lines = [
        "## A lab it never saw: leave one source out",
        "",
        "Each row is a run trained without that source (neither trained nor tuned on it), "
        "measured on its test photographs"
        + (f"; each started from {', '.join(starts)}" if starts else "")
        + ". A source those starting weights learnt from is not left out.",
        "",
    ]
    flat = {
        f"{name} left out ({row.get('epochs', '?')} epochs)": v
        for name, row in loso.items()
        for v in row["test"].values()
    }
    return lines + _source_rows(flat) + [""]


def detector_card_for(path: str | os.PathLike) -> str:
    path = Path(path)
    meta_file = path / "detector.json" if path.is_dir() else path
    return detector_card(
        json.loads(meta_file.read_text()),
        source=BUNDLED_SOURCE if meta_file.parent.name == "default_detector" else str(meta_file.parent),
    )

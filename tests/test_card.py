"""Model cards: written from the model's own metadata, shipped beside the bundled model, printed by `bloodcell card`."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.infer.card import INTENDED_USE, card_for
from bloodcell.models.metadata import bundled_model_dir

from conftest import CLASS_NAMES, toy_run

runner = CliRunner()


def test_the_bundled_card_is_what_its_model_json_says():
    """Editing model.json (a retrained model, a new limit) without rebuilding MODEL_CARD.md fails here."""
    folder = bundled_model_dir()
    assert (folder / "MODEL_CARD.md").read_text() == card_for(folder)


def test_the_bundled_card_states_use_figures_and_the_other_lab():
    folder = bundled_model_dir()
    meta = json.loads((folder / "model.json").read_text())
    card = card_for(folder)
    b = meta["bundled"]
    assert INTENDED_USE in card and "not a diagnosis" in card
    assert (
        f"Accuracy: {100 * b['test_accuracy']:.2f} % "
        f"(95 % bootstrap CI {100 * b['test_accuracy_ci95'][0]:.2f} % to {100 * b['test_accuracy_ci95'][1]:.2f} %) "
        f"on {b['test_n']:,} images" in card
    )
    assert (
        f"Review threshold {meta['review_threshold']:.2f}" in card
        and f"threshold {meta['ood']['threshold']:.1f}" in card
    )
    assert all(limit in card for limit in b["known_limits"]) and "Tecom" in card


def test_a_runs_card_takes_its_figures_from_metrics_json(tmp_path):
    run = toy_run(tmp_path / "run")
    per_class = {name: {"recall": 0.5 + k / 100} for k, name in enumerate(CLASS_NAMES)}
    (run / "metrics.json").write_text(
        json.dumps({"test": {"accuracy": 0.8125, "n": 64, "ci95": {"accuracy": [0.7, 0.9]}, "per_class": per_class}})
    )
    card = card_for(run)
    assert "Accuracy: 81.25 % (95 % bootstrap CI 70.00 % to 90.00 %) on 64 images." in card
    assert "neutrophil 56.00 %" in card and "Review threshold 0.60" in card
    result = runner.invoke(app, ["card", "--model", str(run)])
    assert result.exit_code == 0 and result.output.strip() == card.strip()


def test_card_of_a_folder_without_a_model_is_one_line(tmp_path):
    result = runner.invoke(app, ["card", "--model", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: cannot read the metadata of {tmp_path}: No such file or directory"


def test_export_writes_the_card_beside_the_onnx_file(tmp_path):
    from bloodcell.infer.export import card_path, export_onnx

    run = toy_run(tmp_path / "run")
    report = export_onnx(run, tmp_path / "m.onnx")
    card = card_path(report.path).read_text()
    assert card == card_for(report.path) and "ONNX opset 18" in card and INTENDED_USE in card


def test_the_bundled_detector_card_is_what_its_detector_json_gives():
    """Retraining or re-exporting the detector without rebuilding DETECTOR_CARD.md (tools/bundle_detector.py) fails
    here."""
    from bloodcell.infer.card import DETECTOR_CARD, detector_card_for
    from bloodcell.detect.registry import bundled_detector_dir

    folder = bundled_detector_dir()
    card = (folder / DETECTOR_CARD).read_text()
    assert card == detector_card_for(folder)
    assert "## Test photographs, per source" in card and "| txl_pbc/raabin |" in card

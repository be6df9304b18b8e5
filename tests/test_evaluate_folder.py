"""`bloodcell evaluate DIR --model M`: folder-name matching, 8-way and restricted metrics, outputs, CLI.

Exact numbers come from a scripted predictor whose probabilities are set per file; the real pipeline is
checked with a tiny untrained cnn (Predictor.load of a saved checkpoint) against hand computations from
predictions.csv, and, when present, on the external Tecom folder with the bundled model.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.errors import DataError
from bloodcell.evaluate.folder import _restrict, evaluate_folder, match_folders, parse_mappings
from bloodcell.infer import Predictor, summarize

from conftest import CLASS_NAMES, REPO, toy_run, write_image

TECOM = REPO.parent / "shared" / "data" / "external" / "tecom_zheng2018"
runner = CliRunner()


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def p_matrix(rows: list[dict], classes=CLASS_NAMES) -> np.ndarray:
    return np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])


# ---------------------------------------------------------------------- matching


def test_folder_names_match_case_plural_and_separators():
    folders = ["Neutrophils", "LYMPHOCYTE", "IGs", "erythro-blasts", "Platelet_s", "eosinophil", "Band cells"]
    got = match_folders(folders, CLASS_NAMES, {"band CELLS": "Neutrophils"})
    assert got == {
        "Neutrophils": "neutrophil",
        "LYMPHOCYTE": "lymphocyte",
        "IGs": "ig",
        "erythro-blasts": "erythroblast",
        "Platelet_s": "platelet",
        "eosinophil": "eosinophil",
        "Band cells": "neutrophil",  # --map key matched ignoring case/space, target plural resolved
    }


def test_map_wins_over_name_matching():
    assert match_folders(["monocytes", "lymphocytes"], CLASS_NAMES, {"monocytes": "ig"}) == {
        "monocytes": "ig",
        "lymphocytes": "lymphocyte",
    }


def test_unknown_folder_is_one_line_error_listing_classes():
    with pytest.raises(DataError) as err:
        match_folders(["neutrophil", "smudge cells"], CLASS_NAMES)
    msg = str(err.value)
    assert "\n" not in msg and "'smudge cells'" in msg and "--map" in msg
    assert all(c in msg for c in CLASS_NAMES)


def test_bad_map_target_and_folder_and_syntax():
    with pytest.raises(DataError, match=r"'blast' is not a class of the model.*platelet"):
        match_folders(["x"], CLASS_NAMES, {"x": "blast"})
    with pytest.raises(DataError, match=r"no class folder 'y'"):
        match_folders(["x"], CLASS_NAMES, {"y": "ig"})
    with pytest.raises(DataError, match="FOLDER=CLASS"):
        parse_mappings(["noequals"])
    assert parse_mappings(["a b = ig", "c=platelet"]) == {"a b": "ig", "c": "platelet"}


def test_restrict_renormalises_and_handles_rows_without_mass():
    probs = np.array([[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]])
    r, empty = _restrict(probs, [1, 2])
    assert np.allclose(r, [[0.6, 0.4], [0.5, 0.5]]) and empty == 1


# ---------------------------------------------------------------------- exact numbers (scripted predictor)

# file -> (folder, {class: probability}); the rest of each row's mass is spread over nothing (rows sum to 1)
SCRIPT = {
    "n1": ("Neutrophils", {"neutrophil": 0.9, "ig": 0.1}),  # right, right
    "n2": ("Neutrophils", {"ig": 0.6, "neutrophil": 0.3, "lymphocyte": 0.1}),  # wrong, right
    "n3": ("Neutrophils", {"ig": 0.6, "lymphocyte": 0.3, "neutrophil": 0.1}),  # wrong, wrong
    "n4": ("Neutrophils", {"neutrophil": 0.5, "lymphocyte": 0.4, "ig": 0.1}),  # right, right
    "l1": ("LYMPHOCYTE", {"lymphocyte": 0.95, "monocyte": 0.05}),  # right, right
    "l2": ("LYMPHOCYTE", {"platelet": 0.7, "lymphocyte": 0.2, "neutrophil": 0.1}),  # wrong, right
    "l3": ("LYMPHOCYTE", {"platelet": 0.7, "neutrophil": 0.2, "lymphocyte": 0.1}),  # wrong, wrong
    "l4": ("LYMPHOCYTE", {"erythroblast": 0.99, "lymphocyte": 0.006, "neutrophil": 0.004}),  # wrong, right; OOD
}
THRESHOLD = 0.8  # flags n2 n3 n4 l2 l3


class ScriptedPredictor:
    """Predictor stand-in: fixed probabilities per file name, the public result format, plus ood fields."""

    class_names = CLASS_NAMES
    model_name = "scripted"
    source = "scripted"
    review_threshold = THRESHOLD
    temperature = 1.0

    def __init__(self):
        self.calls = 0

    def predict_paths(self, paths, batch_size=32, progress=True):
        self.calls += 1
        paths = [Path(p) for p in paths]
        probs = np.array([[SCRIPT[p.stem][1].get(c, 0.0) for c in CLASS_NAMES] for p in paths])
        result = summarize([str(p) for p in paths], probs, CLASS_NAMES, THRESHOLD)
        for pred in result["predictions"]:
            ood = Path(pred["path"]).stem == "l4"
            pred["ood"], pred["ood_score"] = ood, 5.0 if ood else 0.1
        return result


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    root = tmp_path_factory.mktemp("scripted")
    rng = np.random.default_rng(1)
    folder = root / "slides"
    for name, (sub, _) in SCRIPT.items():
        write_image(folder / sub / f"{name}.png", rng)
    (folder / "Neutrophils" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = root / "out"
    metrics = evaluate_folder(ScriptedPredictor(), folder, out, progress=False, n_bootstrap=200)
    return metrics, out


def test_scripted_numbers(scripted):
    m, _ = scripted
    assert m["n"] == 8 and m["classes_present"] == ["lymphocyte", "neutrophil"]
    assert m["provenance"]["class_mapping"] == {"LYMPHOCYTE": "lymphocyte", "Neutrophils": "neutrophil"}
    assert m["full"]["accuracy"] == pytest.approx(3 / 8)
    assert m["restricted"]["accuracy"] == pytest.approx(6 / 8)
    assert m["restricted"]["class_names"] == ["lymphocyte", "neutrophil"]
    assert np.array(m["restricted"]["confusion_matrix"]).tolist() == [[3, 1], [1, 3]]
    lo, hi = m["restricted"]["ci95"]["accuracy"]
    assert 0 <= lo <= 6 / 8 <= hi <= 1 and hi - lo > 0
    assert np.array(m["full"]["confusion_matrix"]).shape == (8, 8)
    assert m["predicted_as"] == {
        "basophil": 0,
        "eosinophil": 0,
        "erythroblast": 1,
        "ig": 2,
        "lymphocyte": 1,
        "monocyte": 0,
        "neutrophil": 2,
        "platelet": 2,
    }
    assert m["predicted_outside_present"]["n"] == 5
    rv = m["review"]
    assert rv["fraction"] == pytest.approx(5 / 8)
    assert rv["accuracy_unflagged"] == pytest.approx(2 / 3) and rv["accuracy_unflagged_restricted"] == pytest.approx(
        1.0
    )
    ood = m["ood"]
    assert ood["fraction"] == pytest.approx(1 / 8) and ood["kept_fraction"] == pytest.approx(2 / 8)
    assert ood["accuracy_kept"] == pytest.approx(1.0) and ood["accuracy_kept_restricted"] == pytest.approx(1.0)


def test_scripted_unreadable_reported_not_fatal(scripted):
    m, out = scripted
    assert [u["path"] for u in m["unreadable"]] == ["Neutrophils/broken.png"] and m["unreadable"][0]["reason"]
    assert "broken.png" not in (out / "predictions.csv").read_text()
    assert "broken.png" in (out / "report.md").read_text()


def test_scripted_outputs(scripted):
    m, out = scripted
    rows = read_csv(out / "predictions.csv")
    assert list(rows[0])[:8] == ["path", "true", "pred", "pred_restricted", "confidence", "review", "ood", "ood_score"]
    by = {Path(r["path"]).stem: r for r in rows}
    assert by["n2"]["pred"] == "ig" and by["n2"]["pred_restricted"] == "neutrophil"
    assert by["l4"]["pred"] == "erythroblast" and by["l4"]["pred_restricted"] == "lymphocyte"
    assert (by["l4"]["ood"], by["l4"]["ood_score"], by["n1"]["ood"]) == ("1", "5.000000", "0")
    assert by["n3"]["review"] == "1" and by["n1"]["review"] == "0"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["restricted"]["accuracy"] == m["restricted"]["accuracy"]
    assert saved["provenance"]["model_name"] == "scripted" and saved["provenance"]["n_images"] == 8
    assert "environment" in saved["provenance"] and saved["provenance"]["folder"].endswith("slides")
    for fig in ("confusion.png", "reliability.png", "confusion_restricted.png"):
        assert (out / "figures" / fig).stat().st_size > 1000
    report = (out / "report.md").read_text()
    assert "0.7500" in report and "0.3750" in report and "out-of-distribution: 12.5%" in report


def test_unknown_folder_writes_nothing(tmp_path):
    rng = np.random.default_rng(2)
    write_image(tmp_path / "ds" / "Smudge" / "n1.png", rng)
    predictor = ScriptedPredictor()
    with pytest.raises(DataError, match="'Smudge' matches no class"):
        evaluate_folder(predictor, tmp_path / "ds", tmp_path / "out", progress=False)
    assert predictor.calls == 0 and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- a real (tiny, untrained) model


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    run = toy_run(root / "run", size=32)
    rng = np.random.default_rng(3)
    folder = root / "cells"
    for sub, n in {"Neutrophils": 5, "LYMPHOCYTE": 4, "band cells": 3}.items():
        for i in range(n):
            write_image(folder / sub / f"{i}.jpg", rng, fmt="JPEG")
    (folder / "LYMPHOCYTE" / "empty.jpg").write_bytes(b"")
    return run, folder


def test_an_image_too_small_to_hold_a_cell_is_unreadable_not_scored(toy, tmp_path):
    run, folder = toy
    rng = np.random.default_rng(4)
    cells = tmp_path / "cells"
    for i in range(3):
        write_image(cells / "Neutrophils" / f"{i}.png", rng)
    write_image(cells / "Neutrophils" / "dot.png", rng, size=(1, 1))
    m = evaluate_folder(Predictor.load(run), cells, tmp_path / "out", progress=False, n_bootstrap=20)
    assert m["n"] == 3 and len(read_csv(tmp_path / "out" / "predictions.csv")) == 3
    assert m["unreadable"] == [
        {
            "path": "Neutrophils/dot.png",
            "reason": "too small to hold a blood cell: 1x1 px (a cell image needs at least 16 px a side)",
        }
    ]


def test_real_predictor_matches_hand_computation(toy, tmp_path):
    run, folder = toy
    predictor = Predictor.load(run)
    m = evaluate_folder(
        predictor, folder, tmp_path / "out", {"band cells": "neutrophil"}, progress=False, n_bootstrap=100
    )
    rows = read_csv(tmp_path / "out" / "predictions.csv")
    assert m["n"] == len(rows) == 12 and [u["path"] for u in m["unreadable"]] == ["LYMPHOCYTE/empty.jpg"]
    assert Counter(r["true"] for r in rows) == {"neutrophil": 8, "lymphocyte": 4}
    # the CSV probabilities are the predictor's own
    direct = predictor.predict_paths([folder / r["path"] for r in rows], progress=False)["predictions"]
    assert np.allclose(p_matrix(rows), [[d["probabilities"][c] for c in CLASS_NAMES] for d in direct], atol=1e-6)
    probs = p_matrix(rows)
    true = np.array([CLASS_NAMES.index(r["true"]) for r in rows])
    assert [r["pred"] for r in rows] == [CLASS_NAMES[i] for i in probs.argmax(1)]
    assert m["full"]["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == true))
    present = [CLASS_NAMES.index("lymphocyte"), CLASS_NAMES.index("neutrophil")]
    hand = [present[j] for j in probs[:, present].argmax(1)]
    assert [r["pred_restricted"] for r in rows] == [CLASS_NAMES[i] for i in hand]
    assert m["restricted"]["accuracy"] == pytest.approx(np.mean(np.array(hand) == true))
    assert m["review"]["fraction"] == pytest.approx(np.mean(probs.max(1) < predictor.review_threshold), abs=1e-9)
    assert m["ood"] is None and all(r["ood"] == "" for r in rows)
    assert sum(m["predicted_as"].values()) == 12


def test_cli_evaluate_folder(toy, tmp_path, monkeypatch):
    run, folder = toy
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app, ["evaluate", str(folder), "--model", str(run), "--map", "band cells=neutrophil", "--bootstrap", "50"]
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "runs" / "evaluate" / "cells-cnn"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["provenance"]["model_source"] == str(run) and metrics["provenance"]["n_bootstrap"] == 50
    assert f"restricted to the 2 classes present: {metrics['restricted']['accuracy']:.4f}" in result.stdout
    assert (
        "unreadable: LYMPHOCYTE/empty.jpg" in result.stdout
        and str(Path("runs") / "evaluate" / "cells-cnn") in result.stdout
    )

    unknown = runner.invoke(app, ["evaluate", str(folder), "--model", str(run), "--out", str(tmp_path / "o2")])
    assert unknown.exit_code == 2 and len(unknown.stderr.splitlines()) == 1
    assert (
        unknown.stderr.startswith("error: class folder 'band cells' matches no class") and "platelet" in unknown.stderr
    )
    bad = runner.invoke(app, ["evaluate", str(folder), "--model", str(run), "--map", "band cells=bands"])
    assert bad.exit_code == 2 and bad.stderr.splitlines() == [
        f"error: --map band cells=bands: 'bands' is not a class of the model (its classes: {', '.join(CLASS_NAMES)})"
    ]
    assert not (tmp_path / "o2").exists()


def test_cli_without_model_keeps_run_behaviour(tmp_path):
    result = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        f"error: {tmp_path} is not a run directory (no config.yaml)"
    ]
    result = runner.invoke(app, ["evaluate", str(tmp_path), "--map", "a=ig"])
    assert result.exit_code == 2 and "need --model" in result.stderr


# ---------------------------------------------------------------------- real external data


@pytest.mark.skipif(not TECOM.is_dir(), reason=f"external Tecom data not found at {TECOM}")
def test_tecom_with_bundled_model(tmp_path):
    from bloodcell.errors import ModelError

    try:
        predictor = Predictor.load(None)
    except ModelError:
        pytest.skip("no bundled model in this install")
    m = evaluate_folder(predictor, TECOM, tmp_path, progress=False, n_bootstrap=100)
    rows = read_csv(tmp_path / "predictions.csv")
    assert m["n"] == len(rows) == 300 and m["unreadable"] == []
    assert m["classes_present"] == ["basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    acc = m["restricted"]["accuracy"]
    assert 0 <= acc <= 1
    assert acc == pytest.approx(np.mean([r["pred_restricted"] == r["true"] for r in rows]))
    present = m["classes_present"]
    hand = [present[j] for j in p_matrix(rows, present).argmax(1)]  # argmax among the present classes' columns
    assert [r["pred_restricted"] for r in rows] == hand
    assert m["full"]["accuracy"] == pytest.approx(np.mean([r["pred"] == r["true"] for r in rows]))

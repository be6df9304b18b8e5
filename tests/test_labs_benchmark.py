"""benchmarks/labs.py: its scoring pieces on synthetic arrays, and one small real run checked against
`bloodcell evaluate`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import BCCD, PBC, REPO, load_benchmark

lb = load_benchmark("labs")

TECOM = REPO.parent / "shared" / "data" / "external" / "tecom_zheng2018"
NAMES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


# ---------------------------------------------------------------------------------------------- matching


def test_match_cell_takes_the_largest_iou_above_the_bar():
    labelled = [100, 100, 200, 200]
    cells = [
        {"box": [0, 0, 50, 50]},  # no overlap
        {"box": [120, 120, 220, 220]},  # IoU 6400 / 13600 = 0.47
        {"box": [105, 100, 205, 200]},
    ]  # IoU 9500 / 10500 = 0.905
    i, iou = lb.match_cell(labelled, cells)
    assert i == 2 and iou == pytest.approx(9500 / 10500)
    i, iou = lb.match_cell(labelled, cells[:2])
    assert i == 1 and iou == pytest.approx(6400 / 13600)


def test_match_cell_misses_below_the_bar_and_with_no_cells():
    labelled = [100, 100, 200, 200]
    i, iou = lb.match_cell(labelled, [{"box": [150, 150, 250, 250]}])  # IoU 2500 / 17500 = 0.14
    assert i is None and iou == pytest.approx(2500 / 17500)
    assert lb.match_cell(labelled, [{"box": [150, 150, 250, 250]}], min_iou=0.1)[0] == 0
    assert lb.match_cell(labelled, []) == (None, 0.0)


def test_verdict_text():
    assert lb.verdict(0.98, 0.98) == "met"
    assert lb.verdict(0.99, 0.98) == "met"
    assert lb.verdict(0.627, 0.80) == "missed by 17.3 points"
    assert lb.verdict(0.0, 0.5) == "missed by 50.0 points"
    assert lb.verdict(None, 0.95) == "missed (no cell kept)"


# ---------------------------------------------------------------------------------------------- scoring


def onehotish(rows: list[tuple[int, float]], k: int = len(NAMES)) -> np.ndarray:
    """Rows with `p` on class c and the rest spread evenly."""
    out = np.empty((len(rows), k))
    for i, (c, p) in enumerate(rows):
        out[i] = (1 - p) / (k - 1)
        out[i, c] = p
    return out


def test_score_cells_all_classes_restricted_kept():
    eo, ly, ig = NAMES.index("eosinophil"), NAMES.index("lymphocyte"), NAMES.index("ig")
    probs = onehotish([(eo, 0.9), (ly, 0.9), (ig, 0.6), (ly, 0.95)])
    probs[2, eo] = 0.3  # the 'ig' cell's runner-up is eosinophil: right once restricted to eosinophil and lymphocyte
    probs[2] /= probs[2].sum()
    y = np.asarray([eo, ly, eo, eo])
    review = np.asarray([False, False, False, True])
    ood = np.asarray([False, True, False, False])
    r = lb.score_cells(y, probs, review, ood, NAMES, n_bootstrap=200, seed=0)
    assert r["n"] == 4 and r["classes_present"] == ["eosinophil", "lymphocyte"]
    assert r["accuracy_all_classes"] == pytest.approx(2 / 4)
    assert r["accuracy"] == pytest.approx(3 / 4)  # cell 2 right once restricted, cell 3 wrong either way
    assert r["review_fraction"] == 0.25 and r["ood_fraction"] == 0.25
    assert r["kept_fraction"] == 0.5 and r["n_kept"] == 2  # cells 0 and 2
    assert (
        r["accuracy_kept"] == 1.0 and r["accuracy_kept_all_classes"] == 0.5
    )  # cell 2: right over its lab's classes only
    lo, hi = r["accuracy_ci95"]
    assert 0 <= lo <= r["accuracy"] <= hi <= 1
    assert r["predicted_as"] == {"eosinophil": 1, "ig": 1, "lymphocyte": 2}
    # no OOD score: none flagged OOD, and said so
    r = lb.score_cells(y, probs, review, None, NAMES, n_bootstrap=0)
    assert r["ood_fraction"] is None and r["kept_fraction"] == 0.75


def test_score_cells_with_every_class_present_is_not_restricted():
    y = np.arange(len(NAMES))
    probs = onehotish([(int(c), 0.9) for c in y])
    probs[0] = onehotish([(1, 0.5)])[0]
    r = lb.score_cells(y, probs, np.zeros(len(y), bool), np.zeros(len(y), bool), NAMES, n_bootstrap=0)
    assert r["accuracy"] == r["accuracy_all_classes"] == pytest.approx(7 / 8)
    assert r["accuracy_ci95"] is None  # no bootstrap asked


def field(cells: list[tuple[list[float], str, dict, bool, bool]]) -> dict:
    out = []
    for box, label, probs, review, ood in cells:
        p = {c: probs.get(c, 0.0) for c in NAMES}
        out.append({"kind": "wbc", "box": box, "label": label, "probabilities": p, "review": review, "ood": ood})
    out.append({"kind": "rbc", "box": [0, 0, 10, 10]})  # never matched: not a white cell
    return {"cells": out}


def test_score_photos_counts_misses_as_wrong_and_not_kept():
    fields = {
        # right over all classes, kept
        "a": field([([10, 10, 110, 110], "neutrophil", {"neutrophil": 0.95, "monocyte": 0.05}, False, False)]),
        # top class ig (wrong over all), neutrophil among the white-cell classes; flagged for review
        "b": field([([10, 10, 110, 110], "ig", {"ig": 0.6, "neutrophil": 0.3, "lymphocyte": 0.1}, True, False)]),
        # two white cells: the labelled one is the second; wrong but kept
        "c": field(
            [
                ([300, 300, 400, 400], "neutrophil", {"neutrophil": 1.0}, False, False),
                ([12, 8, 108, 112], "lymphocyte", {"lymphocyte": 0.97, "monocyte": 0.03}, False, False),
            ]
        ),
        # the only white cell found is elsewhere: a miss
        "d": field([([300, 300, 400, 400], "neutrophil", {"neutrophil": 1.0}, False, False)]),
        # the labelled rbc-only photograph: a miss
        "e": {"cells": [{"kind": "rbc", "box": [10, 10, 110, 110]}]},
    }
    labelled = [
        {"image": k, "label": lab, "box": [10, 10, 110, 110]}
        for k, lab in [
            ("a", "neutrophil"),
            ("b", "neutrophils"),
            ("c", "monocyte"),
            ("d", "eosinophil"),
            ("e", "neutrophil"),
        ]
    ]
    r = lb.score_photos(labelled, fields, NAMES)
    assert r["labelled"] == 5 and r["found"] == 3
    assert r["right"] == 1 and r["right_fraction"] == pytest.approx(0.2)
    assert r["right_wbc"] == 2  # b is a neutrophil among the white-cell classes
    assert r["kept"] == 2 and r["kept_fraction"] == pytest.approx(0.4)  # a and c
    assert r["kept_right"] == 1 and r["accuracy_kept"] == pytest.approx(0.5)
    by = {c["image"]: c for c in r["cells"]}
    assert by["c"]["label"] == "lymphocyte" and by["c"]["iou"] > 0.8
    assert not by["d"]["found"] and not by["d"]["kept"] and not by["d"]["right"]
    assert not by["e"]["found"] and by["e"]["iou"] == 0.0


def test_targets_follow_held_out_and_lab():
    cell = {"accuracy": 0.9, "accuracy_kept": 0.96, "kept_fraction": 0.4}
    labs = {
        "pbc": {**cell, "held_out": False},
        "bccd": {**cell, "held_out": False},
        "tecom": {**cell, "held_out": True},
        "photos": {"right_fraction": 0.85, "accuracy_kept": None, "kept_fraction": 0.0},
        "other": {"skipped": "not there"},
    }
    rows = lb.targets(labs)
    by = {(t["lab"], t["target"].split(" >=")[0]): t for t in rows}
    assert by[("pbc", "test part right")]["verdict"] == "missed by 8.0 points"
    assert ("bccd", "held out, zero-shot right over its classes") not in by  # trained on: no zero-shot target
    assert by[("tecom", "held out, zero-shot right over its classes")]["met"]
    assert (
        by[("tecom", "kept cells right")]["met"] and by[("tecom", "cells kept")]["verdict"] == "missed by 10.0 points"
    )
    assert by[("photos", "labelled white cells named right")]["met"]
    assert by[("photos", "kept cells right")]["verdict"] == "missed (no cell kept)"
    assert {t["lab"] for t in rows} == {"pbc", "bccd", "tecom", "photos"}
    assert len(rows) == 3 + 2 + 3 + 3


def test_lab_source_says_whether_a_model_trained_on_a_lab(tmp_path):
    bccd = tmp_path / "smear-set"  # a folder name that does not say which lab: found by its path
    (bccd / "BCCD").mkdir(parents=True)
    meta = lambda labs: {"training_config": {"data": {"labs": labs}}}  # noqa: E731
    assert lb.lab_source(meta([]), bccd, "bccd") is None
    assert lb.lab_source({}, bccd, "bccd") is None
    assert lb.lab_source(meta([{"name": "smears", "root": str(bccd)}]), bccd, "bccd")["name"] == "smears"
    assert lb.lab_source(meta([{"name": "smears", "root": str(bccd / "BCCD")}]), bccd, "bccd") is not None
    assert lb.lab_source(meta([{"name": "BCCD", "root": "/elsewhere/x"}]), bccd, "bccd") is not None
    assert lb.lab_source(meta([{"name": "tecom", "root": "/elsewhere/tecom_zheng2018"}]), bccd, "bccd") is None


def test_missing_data_is_one_line_per_lab_and_skipped(tmp_path, capsys):
    r = lb.main(
        [
            "--labs",
            "pbc",
            "bccd",
            "photos",
            "tecom",
            "--pbc",
            str(tmp_path / "no-pbc"),
            "--bccd",
            str(tmp_path / "no-bccd"),
            "--tecom",
            str(tmp_path / "no-tecom"),
            "--no-progress",
            "--json",
            str(tmp_path / "out.json"),
        ]
    )
    out = capsys.readouterr().out
    labs = r["models"]["bundled"]["labs"]
    assert set(labs) == {"pbc", "bccd", "photos", "tecom"} and all("skipped" in v for v in labs.values())
    assert sum(": skipped" in line for line in out.splitlines()) == 4
    assert r["models"]["bundled"]["verdicts"] == []
    assert len(r["models"]["bundled"]["sha256"]) == 64
    assert json.loads((tmp_path / "out.json").read_text())["models"]["bundled"]["labs"]["tecom"]["skipped"]


# ---------------------------------------------------------------------------------------------- one real run


def assert_same_as_evaluate(ev: dict, lab: dict) -> None:
    """metrics.json of `bloodcell evaluate DIR --model M` against the benchmark's figures for the same folder."""
    assert ev["n"] == lab["n"]
    assert ev["full"]["accuracy"] == pytest.approx(lab["accuracy_all_classes"])
    assert ev["restricted"]["accuracy"] == pytest.approx(lab["accuracy"])
    assert ev["restricted"]["f1_macro"] == pytest.approx(lab["f1_macro"])
    assert ev["restricted"]["ci95"]["accuracy"] == pytest.approx(lab["accuracy_ci95"])
    assert ev["review"]["fraction"] == pytest.approx(lab["review_fraction"])
    assert ev["ood"]["fraction"] == pytest.approx(lab["ood_fraction"])
    assert ev["ood"]["kept_fraction"] == pytest.approx(lab["kept_fraction"])
    kept = ev["ood"]["accuracy_kept_restricted"]
    assert (kept is None and lab["accuracy_kept"] is None) or kept == pytest.approx(lab["accuracy_kept"])


@pytest.mark.slow
@pytest.mark.pbc
@pytest.mark.skipif(
    not (PBC.is_dir() and (BCCD / "wbc_subtypes.csv").is_file() and TECOM.is_dir()),
    reason="needs ../shared/data (PBC, BCCD with wbc_subtypes.csv, Tecom)",
)
def test_real_run_on_small_parts_agrees_with_bloodcell_evaluate(tmp_path):
    from typer.testing import CliRunner

    from bloodcell.cli import app

    tecom = tmp_path / "tecom"  # a handful of Tecom cells: 3 per class (the one basophil)
    for cls in sorted(p for p in TECOM.iterdir() if p.is_dir()):
        (tecom / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:3]:
            shutil.copyfile(f, tecom / cls.name / f.name)
    # BCCD with only its test rows labelled: the same 64 test cells, without cutting the 277 others (40 s) into
    # this test's empty cache
    bccd = tmp_path / "bccd"
    bccd.mkdir()
    (bccd / "BCCD").symlink_to((BCCD / "BCCD").resolve(), target_is_directory=True)
    lines = (BCCD / "wbc_subtypes.csv").read_text().splitlines()
    (bccd / "wbc_subtypes.csv").write_text(
        "\n".join([lines[0]] + [line for line in lines[1:] if line.split(",")[1] == "test"]) + "\n"
    )

    out = tmp_path / "labs.json"
    r = lb.main(
        [
            "--limit",
            "48",
            "--photo-limit",
            "3",
            "--bccd",
            str(bccd),
            "--tecom",
            str(tecom),
            "--bootstrap",
            "200",
            "--no-progress",
            "--json",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert set(saved) >= {"machine", "date", "command", "data", "models", "targets", "seconds"}
    assert "avx" in saved["machine"]["cpu"] or "no AVX2/AVX-512 flags seen" in saved["machine"]["cpu"]
    m = saved["models"]["bundled"]
    from bloodcell.models.metadata import bundled_model_dir

    trained = [
        lab["name"]
        for lab in json.loads((bundled_model_dir() / "model.json").read_text())["training_config"]["data"]["labs"]
    ]
    assert trained == ["bccd"]  # the bundled model trains on PBC and BCCD's white cells, never on Tecom
    assert len(m["sha256"]) == 64 and m["trained_labs"] == trained
    labs = m["labs"]
    assert set(labs) == {"pbc", "bccd", "photos", "tecom"}
    for key in ("pbc", "bccd", "tecom"):
        lab = labs[key]
        for k in (
            "n",
            "accuracy",
            "accuracy_all_classes",
            "accuracy_ci95",
            "f1_macro",
            "review_fraction",
            "ood_fraction",
            "kept_fraction",
            "accuracy_kept",
            "status",
            "held_out",
        ):
            assert k in lab, (key, k)
        for k in ("accuracy", "accuracy_all_classes", "f1_macro", "review_fraction", "ood_fraction", "kept_fraction"):
            assert 0 <= lab[k] <= 1, (key, k)
        lo, hi = lab["accuracy_ci95"]
        assert 0 <= lo <= lab["accuracy"] <= hi <= 1
    assert labs["pbc"]["n"] == 48 and labs["pbc"]["test_part"] == 5130 and labs["pbc"]["status"] == "own test part"
    assert labs["pbc"]["accuracy"] > 0.85  # the bundled model on its own test part (98.0 % on all 5,130)
    assert labs["bccd"]["n"] == 64 and not labs["bccd"]["held_out"] and labs["bccd"]["parts"] == ["test"]
    assert labs["bccd"]["status"].startswith("seen")
    assert labs["tecom"]["n"] == 13 and labs["tecom"]["status"] == "held out"
    photos = labs["photos"]
    assert photos["photos"] == 3 and 1 <= photos["labelled"] <= 3 and 0 <= photos["found"] <= photos["labelled"]
    assert 0 <= photos["right"] <= photos["found"] and photos["kept"] <= photos["found"]
    assert set(photos["field_summary"]) >= {"totals", "flags", "differential"} and isinstance(photos["ig_alarm"], bool)
    assert len(m["verdicts"]) == 3 + 2 + 3 + 3  # pbc; bccd seen (no zero-shot target); tecom held out; photos
    assert all(t["verdict"] == "met" or t["verdict"].startswith("missed") for t in m["verdicts"])
    assert r["models"]["bundled"]["labs"]["tecom"]["accuracy"] == labs["tecom"]["accuracy"]

    # the same folders through `bloodcell evaluate DIR --model default`: the two paths give the same figures
    for key, folder in (("tecom", tecom), ("bccd", Path(labs["bccd"]["folder"]) / "test")):
        res = CliRunner().invoke(
            app, ["evaluate", str(folder), "--model", "default", "--out", str(tmp_path / key), "--bootstrap", "200"]
        )
        assert res.exit_code == 0, res.output
        assert_same_as_evaluate(json.loads((tmp_path / key / "metrics.json").read_text()), labs[key])


@pytest.mark.slow
def test_adapted_scores_an_adabn_copy_of_the_model_per_held_out_lab(tmp_path):
    """--adapted on a held-out 'Tecom' folder of 40 sample cells (no ../shared needed): a second model row, adapted
    on that folder's images, with its own weights and figures; the unadapted row is unchanged by it."""
    from conftest import SAMPLE

    folder = tmp_path / "lab"
    for cls in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        (folder / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[:5]:
            shutil.copyfile(f, folder / cls.name / f.name)
    args = ["--labs", "tecom", "--tecom", str(folder), "--bootstrap", "50", "--no-progress"]
    plain = lb.main(args)
    r = lb.main(args + ["--adapted"])
    assert set(r["models"]) == {"bundled", "bundled + AdaBN on tecom"}
    base, adapted = r["models"]["bundled"], r["models"]["bundled + AdaBN on tecom"]
    timeless = lambda labs: {k: {f: v for f, v in lab.items() if f != "seconds"} for k, lab in labs.items()}  # noqa: E731
    assert timeless(base["labs"]) == timeless(plain["models"]["bundled"]["labs"])
    assert adapted["adaptation"]["images"] == 40 and adapted["adaptation"]["norm_layers"] > 0
    assert len(adapted["sha256"]) == 64 and adapted["sha256"] != base["sha256"]
    assert adapted["labs"]["tecom"]["n"] == 40 and set(adapted["labs"]) == {"tecom"}
    assert len(adapted["verdicts"]) == 3

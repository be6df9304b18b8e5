"""The count's folder-level verdict (images as a whole unlike every training lab) and the few-cells caveat."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from bloodcell.infer import summarize
from bloodcell.infer.predictor import MANUAL_DIFFERENTIAL_CELLS, VERDICT_MIN_IMAGES, folder_verdict
from bloodcell.infer.report import tables, to_json

NAMES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]
TECOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "external" / "tecom_zheng2018"
VERDICT_START = "these images as a whole look unlike every lab this model was trained on"
OLD_OOD_FLAG = "look unlike the cells this model was trained on (OOD): not counted"


def result_for(labels: list[str], ood: list[bool] | None = None) -> dict:
    """summarize() of confident predictions `labels`; OOD scores 5 (flagged) or 0 (not) against a threshold of 1."""
    probs = np.eye(len(NAMES))[[NAMES.index(c) for c in labels]] * 0.93 + 0.01
    scores = None if ood is None else np.where(ood, 5.0, 0.0)
    return summarize(
        [f"{i}.jpg" for i in range(len(labels))], probs, NAMES, 0.5, [], scores, None if ood is None else 1.0
    )


def rendered(result: dict) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=400, record=True)
    for item in tables(result, 0.5, per_image=False):
        console.print(item)
    return console.export_text()


# ---------------------------------------------------------------------- the verdict


def test_half_the_images_ood_gives_one_verdict_first_with_what_to_do():
    r = result_for(["neutrophil"] * 8 + ["ig"] * 2, [True] * 5 + [False] * 5)
    v = r["verdict"]
    assert (
        v["kind"] == "unlike_training_labs" and v["ood_fraction"] == 0.5 and v["ood_count"] == 5 and v["counted"] == 5
    )
    assert (
        "bloodcell adapt FOLDER --out" in v["advice"] and "bloodcell train configs/finetune.yaml --data" in v["advice"]
    )
    assert "5 cells per class" in v["advice"]
    assert r["flags"][0] == v["message"] and v["message"].startswith(VERDICT_START)
    assert "5 of 10 (50%)" in v["message"] and "rests on the 5 others only" in v["message"]
    assert sum(VERDICT_START in f for f in r["flags"]) == 1
    assert not any(OLD_OOD_FLAG in f for f in r["flags"])  # the verdict replaces the per-folder OOD line
    assert [p["ood"] for p in r["predictions"]] == [True] * 5 + [False] * 5  # the per-image flags stay
    assert r["counted"] == 5 and r["counts"]["neutrophil"] == 3 and r["counts"]["ig"] == 2
    assert r["flags"][1].startswith("immature granulocytes present")  # the findings follow the verdict


def test_no_verdict_below_half_or_below_five_images():
    under_half = result_for(["lymphocyte"] * 10, [True] * 4 + [False] * 6)
    assert under_half["verdict"] is None and under_half["flags"][0] == f"4 of 10 images {OLD_OOD_FLAG}"
    assert VERDICT_MIN_IMAGES == 5
    few = result_for(["lymphocyte"] * 4, [True] * 4)
    assert few["verdict"] is None and few["flags"][0] == f"all images {OLD_OOD_FLAG}"
    assert result_for(["lymphocyte"] * 10)["verdict"] is None  # no OOD score at all: nothing to judge by
    assert folder_verdict(0, 0) is None


def test_verdict_when_nothing_was_counted_and_nan_scores_count_as_ood():
    probs = np.eye(len(NAMES))[[6] * 6]
    r = summarize(
        [f"{i}.jpg" for i in range(6)], probs, NAMES, 0.5, [], np.array([5.0, 5.0, np.nan, np.nan, np.inf, 9.0]), 1.0
    )
    assert r["verdict"]["ood_count"] == 6 and r["verdict"]["ood_fraction"] == 1.0 and r["counted"] == 0
    assert "no cell was counted" in r["verdict"]["message"]
    assert json.loads(to_json(r))["verdict"] == r["verdict"]  # the JSON output carries it as it is


def test_summary_table_says_the_verdict_once_before_the_count():
    r = result_for(["neutrophil"] * 8 + ["lymphocyte"] * 4, [True] * 9 + [False] * 3)
    text = " ".join(rendered(r).split())
    assert text.count(VERDICT_START) == 1
    assert text.index(VERDICT_START) < text.index("differential count")
    assert "look unlike the cells this model was trained on" not in text  # the OOD line is not said a second time


# ---------------------------------------------------------------------- fewer cells than a manual differential


def test_few_white_cells_flag_with_the_number_counted():
    r = result_for(["neutrophil"] * 30 + ["lymphocyte"] * 10 + ["platelet"] * 20, [False] * 55 + [True] * 5)
    assert r["flags"][-1] == "the differential rests on 40 white cells (fewer than 100): read the percentages with care"
    enough = result_for(["neutrophil"] * 70 + ["monocyte"] * MANUAL_DIFFERENTIAL_CELLS)
    assert not any("rests on" in f for f in enough["flags"])
    ood_left_out = result_for(["neutrophil"] * 120, [True] * 30 + [False] * 90)  # 90 counted of 120 white cells
    assert ood_left_out["flags"][-1].startswith("the differential rests on 90 white cells")


def test_no_few_cells_flag_for_one_image_or_no_white_cell():
    assert result_for(["neutrophil"])["flags"] == []  # one image is a question about one cell, not a count
    assert result_for(["neutrophil"] * 2)["flags"] == [
        "the differential rests on 2 white cells (fewer than 100): read the percentages with care"
    ]
    assert result_for(["platelet"] * 10)["flags"] == []  # no white cell counted: no differential to qualify
    assert result_for(["neutrophil"] * 10, [True] * 10)["flags"] == [
        result_for(["neutrophil"] * 10, [True] * 10)["verdict"]["message"]
    ]


# ---------------------------------------------------------------------- on another lab's real cells


@pytest.mark.skipif(not TECOM.is_dir(), reason=f"Tecom cells not found at {TECOM} (../shared beside the clone)")
def test_cli_summary_on_another_labs_cells_gives_the_verdict_once():
    from typer.testing import CliRunner

    from bloodcell.cli import app

    res = CliRunner().invoke(app, ["predict", str(TECOM), "--format", "summary", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    text = " ".join(res.stdout.split())  # rich wraps long lines
    assert text.count(VERDICT_START) == 1, text
    assert text.index(VERDICT_START) < text.index("differential count (")
    assert "bloodcell adapt FOLDER --out ADAPTED" in text and "configs/finetune.yaml" in text
    assert "look unlike the cells this model was trained on (OOD)" not in text

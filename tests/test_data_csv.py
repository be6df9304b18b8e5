"""A CSV of path,label[,group] as a dataset: read at the door with one-line errors, the same inventory and split as
the folder it lists, and groups (patients, slides) kept whole on one side of every split and fold."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from bloodcell.data.discover import scan
from bloodcell.data.split import SplitConfig, make_folds, make_split
from bloodcell.errors import DataError

from conftest import SAMPLE
from test_train import write_cfg


def sample_rows() -> list[tuple[str, str]]:
    return [(f"{c.name}/{f.name}", c.name) for c in sorted(SAMPLE.iterdir()) if c.is_dir() for f in sorted(c.iterdir())]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def sample_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("csvdata") / "sample"
    shutil.copytree(SAMPLE, root)
    return root


def patients(rows: list[tuple[str, str]], n: int = 20) -> list[list[str]]:
    """Each image to one of n patients, round robin within its class, so every patient has cells of many classes."""
    return [[path, label, f"patient-{i % n:02d}"] for i, (path, label) in enumerate(rows)]


def test_a_csv_listing_a_folder_gives_its_inventory_fingerprint_and_split(sample_copy):
    listed = scan(
        write_csv(sample_copy / "all.csv", ["path", "label"], [list(r) for r in sample_rows()]), progress=False
    )
    folder = scan(sample_copy, progress=False)
    assert [(r.relpath, r.label, r.sha256) for r in listed.records] == [
        (r.relpath, r.label, r.sha256) for r in folder.records
    ]
    assert listed.fingerprint() == folder.fingerprint() and listed.csv == sample_copy / "all.csv"
    a, b = make_split(listed, SplitConfig(seed=3)), make_split(folder, SplitConfig(seed=3))
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)


def test_csv_paths_may_be_absolute_and_missing_or_non_image_rows_are_skipped_with_the_line(sample_copy, tmp_path):
    rows = sample_rows()[:6]
    table = [[str(sample_copy / rows[0][0]), "neutrophil", "p1"]] + [[p, label, "p2"] for p, label in rows[1:]]
    table += [["gone/missing.jpg", "basophil", "p3"], ["notes.txt", "basophil", "p3"]]
    (tmp_path / "notes.txt").write_text("not an image")
    inv = scan(write_csv(tmp_path / "cells.csv", ["path", "label", "group"], table), progress=False)
    # relative rows resolve against the CSV's folder (tmp_path here): those five do not exist there
    reasons = {s.path: s.reason for s in inv.skipped}
    assert reasons["gone/missing.jpg"] == "listed on line 8 of the CSV, no such file"
    assert reasons["notes.txt"].startswith("not an image file type")
    assert [r.relpath for r in inv.records] == [(sample_copy / rows[0][0]).as_posix()]
    assert inv.records[0].label == "neutrophil" and inv.records[0].group == "p1"


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("file,label\na.jpg,x\n", "has no 'path' column"),
        ("path,class\na.jpg,x\n", "has no 'label' column"),
        ("path,label,patient\na.jpg,x,1\n", "unknown column 'patient'"),
        ("path,label\na.jpg,x,extra\n", "line 2: 3 fields, the header has 2"),
        ("path,label\na.jpg,\n", "line 2: empty label"),
        ("path,label\na.jpg,x\n\na.jpg,y\n", "line 4: a.jpg is listed again (first on line 2)"),
        ("path,label\n", "lists no images"),
    ],
)
def test_bad_csv_is_a_one_line_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        scan(path, progress=False)
    assert message in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_no_patient_has_cells_in_two_parts_or_two_folds(sample_copy):
    inv = scan(
        write_csv(sample_copy / "patients.csv", ["path", "label", "group"], patients(sample_rows())), progress=False
    )
    assert inv.has_groups
    group_of = {i: r.group for i, r in enumerate(inv.records)}
    for seed in (0, 1, 2):
        split = make_split(inv, SplitConfig(seed=seed, test_size=0.3, val_size=0.2))
        parts = {p: {group_of[i] for i in split.part(p)} for p in ("train", "val", "test")}
        assert (
            not parts["train"] & parts["val"]
            and not parts["train"] & parts["test"]
            and not parts["val"] & parts["test"]
        )
        assert all(parts.values()), "every part gets some patients"
        counts = split.group_counts()
        assert counts == {
            "train": len(parts["train"]),
            "val": len(parts["val"]),
            "test": len(parts["test"]),
            "in_more_than_one_part": 0,
        }
        assert split.to_dict()["groups"] == counts
        folds = make_folds(inv, split, 4)
        val_groups = [{group_of[i] for i in f.val} for f in folds]
        for k, f in enumerate(folds):
            assert not {group_of[i] for i in f.train} & val_groups[k]
        assert sum(len(g) for g in val_groups) == len(set().union(*val_groups)), "a patient in two folds' validation"


def test_a_copy_of_an_image_under_another_patient_binds_the_two_patients(sample_copy):
    rows = patients(sample_rows())
    dup = sample_copy / "copies"
    dup.mkdir(exist_ok=True)
    shutil.copy(sample_copy / rows[0][0], dup / "copy.jpg")  # patient-00's image, filed again under patient-07
    rows.append(["copies/copy.jpg", rows[0][1], "patient-07"])
    inv = scan(write_csv(sample_copy / "bound.csv", ["path", "label", "group"], rows), progress=False)
    group_of = {i: r.group for i, r in enumerate(inv.records)}
    for seed in range(4):
        split = make_split(inv, SplitConfig(seed=seed))
        side = {
            p for p in ("train", "val", "test") for i in split.part(p) if group_of[i] in ("patient-00", "patient-07")
        }
        assert len(side) == 1


def test_train_from_a_csv_records_the_groups_in_split_json_and_metrics(sample_copy, tmp_path):
    table = write_csv(sample_copy / "train.csv", ["path", "label", "group"], patients(sample_rows(), n=12))
    cfg = write_cfg(
        tmp_path / "run.yaml",
        {
            "model": {"name": "cnn"},
            "data": {"input_size": 16},
            "train": {"epochs": 1, "batch_size": 32, "precision": "32"},
            "eval": {"bootstrap": 0, "grid_images": 0},
        },
    )
    from typer.testing import CliRunner

    from bloodcell.cli import app

    result = CliRunner().invoke(app, ["train", str(cfg), "--data", str(table), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (
        split["groups"]["in_more_than_one_part"] == 0
        and sum(split["groups"][p] for p in ("train", "val", "test")) == 12
    )
    dataset = metrics["provenance"]["dataset"]
    assert dataset["kind"] == "csv" and dataset["groups"] == 12 and dataset["split_groups"] == split["groups"]

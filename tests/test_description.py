"""model.json's one owner (bloodcell.models.description): typed sections, round trips that keep what they do not
know, one-line errors naming the file and the key, updates that touch one section only, and one resolution of how a
model wants its images, so the card and the predictor cannot disagree."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from bloodcell.cli import app
from bloodcell.errors import ModelError
from bloodcell.infer import Predictor
from bloodcell.infer.card import card_for
from bloodcell.models.description import (
    ModelDescription,
    parse_description,
    read_description,
    read_onnx_description,
    update_description,
    write_description,
)
from bloodcell.models.metadata import bundled_model_dir, write_model_json

from conftest import SAMPLE, toy_run

runner = CliRunner()


def _block(value, indent: int = 2) -> str:
    """A top-level value as io.write_json lays it out inside the file."""
    return json.dumps(value, indent=2).replace("\n", "\n" + " " * indent)


def test_the_bundled_description_reads_typed_and_round_trips_to_the_same_bytes():
    folder = bundled_model_dir()
    text = (folder / "model.json").read_text()
    d = read_description(folder)
    assert isinstance(d, ModelDescription) and d.num_classes == len(d.names) == 8
    assert d.preprocessing.input_size == 96 and d.preprocessing.interpolation == "bilinear"
    assert d.ood is not None and d.ood.threshold > 0 and d.onnx is not None and d.onnx.file == "model.onnx"
    assert d.provenance.data_fingerprint == d.data_fingerprint and d.labs["tecom"].seen is False
    assert json.dumps(d.to_dict(), indent=2) + "\n" == text  # nothing reordered, reformatted or dropped
    assert read_onnx_description(folder / "model.onnx").to_dict() == d.to_dict()  # one description for both backends


def test_unknown_keys_survive_a_round_trip_and_an_update(tmp_path):
    meta = json.loads((bundled_model_dir() / "model.json").read_text())
    meta["lab_note"] = {"written_by": "a newer bloodcell", "n": 3}  # a key no section knows
    meta["preprocess"]["sharpen"] = 0.5  # and one inside a known section
    meta["ood"]["calibrated_on"] = "site B"
    folder = tmp_path / "m"
    folder.mkdir()
    write_description(folder, meta)
    back = read_description(folder)
    assert back.to_dict() == meta
    assert back.preprocess.model_extra == {"sharpen": 0.5}
    after = update_description(folder, temperature=0.75).to_dict()
    assert after["lab_note"] == meta["lab_note"] and after["preprocess"]["sharpen"] == 0.5
    assert after["ood"]["calibrated_on"] == "site B" and after["temperature"] == 0.75
    assert list(after) == list(meta)  # every key where it was


def test_an_update_of_one_section_leaves_every_other_byte_as_it_was(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copyfile(bundled_model_dir() / "model.json", folder / "model.json")
    before = (folder / "model.json").read_text()
    old = json.loads(before)["ood"]
    new = dict(old, threshold=900.5, fitted_on="refitted")
    update_description(folder, ood=new)
    after = (folder / "model.json").read_text()
    assert after != before and after == before.replace(_block(old), _block(new))
    assert (folder / "SEAL.json").is_file()  # written through the sealed writer
    update_description(folder, labs=None)  # None removes a section, and only it
    assert "labs" not in json.loads((folder / "model.json").read_text())
    assert read_description(folder).to_dict() == {k: v for k, v in json.loads(after).items() if k != "labs"}


@pytest.mark.parametrize(
    "key,value,problem",
    [
        ("ood.threshold", "high", "ood.threshold: Input should be a valid number"),
        ("ood.threshold", float("inf"), "ood.threshold: the ood threshold must be finite, got inf"),
        ("preprocess.white_balance", "magic", "preprocess.white_balance: unknown white_balance 'magic'"),
        ("preprocess.input_size", 0, "preprocess.input_size: Input should be greater than or equal to 1"),
        ("temperature", -1, "temperature: temperature must be > 0, got -1"),
        ("review_threshold", 1.5, "review_threshold: must be in (0, 1], got 1.5"),
        ("labs.tecom.seen", "maybe", "labs.tecom.seen: Input should be a valid boolean"),
    ],
)
def test_a_bad_section_is_one_line_naming_the_file_and_the_key(tmp_path, key, value, problem):
    meta = json.loads((bundled_model_dir() / "model.json").read_text())
    holder = meta
    *path, last = key.split(".")
    for part in path:
        holder = holder[part]
    holder[last] = value
    folder = tmp_path / "m"
    folder.mkdir()
    write_model_json(folder, meta)  # written unchecked, as a hand edit is; every read checks
    with pytest.raises(ModelError) as err:
        read_description(folder)
    message = str(err.value)
    assert message.startswith(f"checkpoint metadata {folder / 'model.json'}: {problem}") and "\n" not in message
    with pytest.raises(ModelError, match="^the model description: " + problem.split(":")[0]):
        parse_description(meta)
    with pytest.raises(ModelError):  # and nothing invalid is written by code
        write_description(tmp_path / "other", meta)
    assert not (tmp_path / "other").exists()


def test_a_bad_section_stops_predict_with_that_line(tmp_path):
    run = toy_run(tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    meta["preprocess"] = {"interpolation": "sinc"}
    write_model_json(run, meta)
    result = runner.invoke(app, ["predict", str(next(SAMPLE.rglob("*.jpg"))), "--model", str(run)])
    want = f"error: checkpoint metadata {run / 'model.json'}: preprocess.interpolation: unknown interpolation 'sinc'"
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(want), result.stderr


def test_an_old_model_json_is_resolved_once_so_card_and_predictor_agree(tmp_path):
    """A model.json from before the preprocess section (top-level input_size only): the card used to print '?' for
    its resize, which the predictor resolved to bilinear on its own."""
    run = toy_run(tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    assert "preprocess" not in meta and "training_config" not in meta and meta["input_size"] == 32
    predictor = Predictor.load(run)
    pre = read_description(run).preprocessing
    assert (predictor.input_size, predictor.interpolation, predictor.white_balance) == (32, "bilinear", "none")
    assert (pre.input_size, pre.interpolation, pre.white_balance) == (32, "bilinear", "none")
    card = card_for(run)
    assert (
        f"- Input: {predictor.input_size} px, {predictor.interpolation} resize, white balance "
        f"{predictor.white_balance}, ImageNet mean/std." in card
    )
    assert card.startswith(f"# Model card: cnn at {predictor.input_size} px")


def test_the_training_config_fills_in_what_an_older_preprocess_section_lacks(tmp_path):
    run = toy_run(tmp_path / "run")
    meta = json.loads((run / "model.json").read_text())
    meta["training_config"] = {"data": {"interpolation": "nearest", "white_balance": "background"}}
    meta["preprocess"] = {"field_of_view": {"wbc_sides": 3.5}}
    write_model_json(run, meta)
    predictor = Predictor.load(run)
    assert (predictor.interpolation, predictor.white_balance) == ("nearest", "background")
    view = predictor.description.preprocessing.field_of_view
    assert view["wbc_sides"] == 3.5 and view["rbc_diameters"] == 4.4  # PBC's for what the model does not say
    assert "nearest resize, white balance background" in card_for(run)

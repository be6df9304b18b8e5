"""Checkpoints: `model.safetensors` (weights) + `model.json` (how to rebuild the model).

Weights are never unpickled: `.pt`/`.pth`/`.ckpt`/pickle files are refused outright.
"""

from __future__ import annotations

import os
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from bloodcell import __version__
from bloodcell.data.classes import resolve_class
from bloodcell.errors import ModelError
from bloodcell.io import write_bytes
from bloodcell.models.base import BloodcellModel
from bloodcell.models.description import (  # the torch-free half of a checkpoint
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    ModelDescription,
    locate,
    read_description,
    write_description,
)
from bloodcell.models.metadata import bundled_model_dir, read_metadata  # noqa: F401 - read_metadata: its old home
from bloodcell.models import registry  # called as registry.create_model: tests replace it there
from bloodcell.models.seal import verify


def save_checkpoint(model: BloodcellModel, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write `directory/model.safetensors` and `directory/model.json` atomically; return directory.

    The facts needed to rebuild the model (name, classes, input size, normalisation, options) are filled in from the
    model itself and win over same-named keys in `metadata`; the whole is checked as a ModelDescription first.

    Args:
        model: the network to save (its weights go to model.safetensors).
        directory: the model folder, created if needed.
        metadata: the rest of model.json, JSON-able (class_names, preprocess, training_config, ...).
    """
    directory = Path(directory)
    meta: dict[str, Any] = dict(metadata or {})
    class_names = meta.get("class_names")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != model.num_classes:
            raise ModelError(
                f"cannot save '{model.model_name}' to {directory}: {len(class_names)} class_names "
                f"for a model with {model.num_classes} classes"
            )
    meta.update(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        model_name=model.model_name,
        num_classes=model.num_classes,
        class_names=class_names,
        input_size=model.input_size,
        mean=list(model.mean),
        std=list(model.std),
        model_kwargs=dict(model.model_kwargs),
        bloodcell_version=__version__,
    )
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # the header repeats what model.json must agree with, so a model.json swapped in from elsewhere is caught
    header = {
        "model_name": model.model_name,
        "num_classes": str(model.num_classes),
        "input_size": str(model.input_size),
    }
    write_bytes(directory / WEIGHTS_FILE, save(state, metadata=header))
    write_description(directory, meta)  # checked, and the folder sealed (bloodcell.models.seal)
    return directory


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[BloodcellModel, dict]:
    """Rebuild the model named in model.json, load its weights strictly; return (model, metadata as a dict).

    The model comes back in eval mode on `map_location`. The folder must match its seal (bloodcell.models.seal), and
    model.json's model_kwargs must be options the model takes, with plain values (registry.check_model_options).
    """
    model, description = load_described(path, map_location)
    return model, description.to_dict()


def load_described(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[BloodcellModel, ModelDescription]:
    """load_checkpoint, with the model's description typed (bloodcell.models.description)."""
    weights_path, meta_path = locate(Path(path))
    verify(weights_path.parent)
    description = read_description(path)
    if not weights_path.is_file():
        raise ModelError(f"checkpoint weights not found: {weights_path}")
    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            header = fh.metadata() or {}
        state = load_file(str(weights_path), device="cpu")
    except Exception as exc:  # safetensors has its own error types for broken headers/data
        if _is_pickle(weights_path):
            raise ModelError(
                f"refusing to load {weights_path}: it holds a pickle (torch.save) file, not safetensors; "
                f"pickle-based files can run code when loaded"
            ) from None
        raise ModelError(f"checkpoint weights {weights_path} are truncated or corrupt ({exc})") from None

    name = description.model_name
    saved_from = header.get("model_name")
    if saved_from and saved_from != name:
        raise ModelError(f"{meta_path} names model '{name}' but {weights_path.name} holds weights of '{saved_from}'")
    saved_size = header.get("input_size")  # absent in checkpoints written before it was recorded
    if saved_size and str(description.input_size) != saved_size:
        raise ModelError(
            f"{meta_path} says input size {description.input_size} but {weights_path.name} was saved from a model "
            f"at {saved_size} px; the two files come from different checkpoints"
        )
    options = registry.check_model_options(name, description.model_kwargs, f"{meta_path} model_kwargs")
    model = registry.create_model(
        name, num_classes=description.num_classes, input_size=description.input_size, **options
    )
    _check_fit(model, state, weights_path)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), description


def init_from_model(
    model: BloodcellModel, source: Any, class_names: list[str], input_size: int, white_balance: str = "none"
) -> dict:
    """Start `model` from a trained bloodcell model: every weight, and the output rows of the classes both share.

    A lab fine-tuning on its own cells keeps what the model knows of each class it names the same way; a class the
    source lacks starts from random rows. Returns the source's metadata. Refuses another architecture, input size or
    white balance with one line naming both.

    Args:
        model: the freshly built model (its model_name and model_kwargs must be the source's); changed in place.
        source: 'default' (the bundled model) or a run / model folder.
        class_names: the classes of `model`'s outputs, matched to the source's by data.classes.resolve_class.
        input_size: the config's input size in pixels; must be the source's.
        white_balance: the config's white balance ("none" or "background"); must be the source's.
    """
    folder = bundled_model_dir() if source == "default" else Path(source)
    base, described = load_described(folder)
    kwargs = dict(described.model_kwargs or {})
    if described.model_name != model.model_name or kwargs != dict(model.model_kwargs):
        raise ModelError(
            f"model.pretrained {source}: it is a '{described.model_name}' with options {kwargs}, "
            f"the config builds '{model.model_name}' with {model.model_kwargs or {}}: set model.name to match"
        )
    pre = described.preprocessing
    if pre.input_size != int(input_size):
        raise ModelError(
            f"model.pretrained {source} was trained at {pre.input_size} px: set data.input_size={pre.input_size}"
        )
    if pre.white_balance != white_balance:
        raise ModelError(
            f"model.pretrained {source} was trained with white balance '{pre.white_balance}': "
            f"set data.white_balance={pre.white_balance}"
        )
    src_state, state = base.state_dict(), model.state_dict()
    logits_layer = [n for n, m in model.head.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    out_keys = {f"head.{logits_layer}.weight", f"head.{logits_layer}.bias"}
    src_names = list(described.class_names or [])
    with torch.no_grad():
        for key, value in state.items():
            if key in out_keys:
                for row, name in enumerate(class_names):
                    same = resolve_class(name, src_names)
                    if same is not None:
                        value[row] = src_state[key][src_names.index(same)]
            else:
                value.copy_(src_state[key])
    return described.to_dict()


def _is_pickle(path: Path) -> bool:
    """True for torch.save output (a zip holding data.pkl) and plain pickles; inspects the bytes, runs nothing.

    pickletools.genops only walks the opcodes (it builds no object), so it is safe on hostile files.
    """
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("data.pkl") for name in archive.namelist())
        except (OSError, zipfile.BadZipFile):
            return False
    last = None
    try:
        with open(path, "rb") as fh:
            for opcode, _, _ in pickletools.genops(fh):  # stops after the first STOP
                last = opcode.name
    except Exception:  # not a well-formed pickle stream: some other corrupt file
        return False
    return last == "STOP"


def _check_fit(model: BloodcellModel, state: dict, weights_path: Path) -> None:
    """Explain, in one line, why weights do not fit the model rebuilt from model.json."""
    expected = model.state_dict()
    logits_layer = [n for n, m in model.head.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    logits_weight = f"head.{logits_layer}.weight"
    if logits_weight in state and state[logits_weight].shape[0] != model.num_classes:
        raise ModelError(
            f"checkpoint {weights_path.parent}: model.json says {model.num_classes} classes but "
            f"the weights have {state[logits_weight].shape[0]} outputs"
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        examples = (missing + unexpected + wrong)[:2]
        raise ModelError(
            f"weights {weights_path} do not fit model '{model.model_name}' named in model.json: "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} of other shape "
            f"(e.g. {', '.join(examples)})"
        )

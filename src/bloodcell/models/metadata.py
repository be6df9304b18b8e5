"""A checkpoint's metadata without PyTorch: the bundled model's folder, and model.json as plain dicts (the faces code
written before bloodcell.models.description, model.json's one owner, still imports from here).

The weights half (load_checkpoint, save_checkpoint) lives in bloodcell.models.checkpoint and needs torch.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from bloodcell.errors import ModelError
from bloodcell.models.description import (  # noqa: F401 - re-exported: their import path before description.py
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    WEIGHTS_FILE,
    ModelDescription,
    locate as _locate,
    parse_description,
    read_description,
    read_json_object,
    write_sealed_json,
)

BUNDLED_MODEL = ("assets", "default_model")


def bundled_model_dir() -> Path:
    """The model shipped inside the package (bloodcell/assets/default_model), if this install has one."""
    node = resources.files("bloodcell").joinpath(*BUNDLED_MODEL)
    try:
        path = Path(os.fspath(node))  # a regular install: a real folder
    except TypeError:
        path = None
    if path is None or not path.is_dir() or not any((path / f).is_file() for f in ("model.json", "model.onnx.json")):
        raise ModelError("no bundled model in this install: pass --model RUN_DIR")
    return path


def is_bloodcell_model(source: Any) -> bool:
    """True for 'default' (the bundled model) and for a folder holding a bloodcell model.json."""
    if isinstance(source, str) and source == "default":
        return True
    return isinstance(source, (str, os.PathLike)) and Path(source).is_dir() and (Path(source) / METADATA_FILE).is_file()


def read_metadata(path: str | os.PathLike) -> dict:
    """The model.json of a checkpoint (folder or .safetensors path), checked, as a dict."""
    return read_description(path).to_dict()


def write_model_json(folder: str | os.PathLike, meta: dict) -> Path:
    """Write folder/model.json as given, unchecked, and re-seal the folder: what `bloodcell model seal` does to a file
    edited by hand (tests make damaged models so). Code writes through description.write_description, which checks
    first; every read checks."""
    return write_sealed_json(Path(folder) / METADATA_FILE, meta)


def preprocessing(meta: dict | ModelDescription) -> dict:
    """How a model wants its images, as a dict (ModelDescription.preprocessing)."""
    description = meta if isinstance(meta, ModelDescription) else parse_description(meta)
    pre = description.preprocessing
    return {
        "input_size": pre.input_size,
        "interpolation": pre.interpolation,
        "white_balance": pre.white_balance,
        "mean": list(pre.mean),
        "std": list(pre.std),
    }

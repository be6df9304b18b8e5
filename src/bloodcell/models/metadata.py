"""A checkpoint's metadata without PyTorch: the bundled model's folder, and the old import path of model.json's
readers and writers, which live in bloodcell.models.description (the one owner of model.json).

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
    locate as _locate,
    preprocessing,
    read_json_object,
    read_metadata,
    write_model_json,
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

"""Lightning checkpoints stored as safetensors + JSON instead of pickles.

Lightning decides when to checkpoint and what goes in (weights, optimizer and scheduler state, loop progress,
callback state); this plugin decides the format. Tensors go to `<path>.<digest>.safetensors`, a new file per
save named by its content; the rest of the nested dict goes to `<path>` as JSON, with each tensor replaced by a
reference. The JSON is written last and names the tensor file and its sha256: it is the one commit point, so a
crash or a full disk at any moment leaves the previous pair whole, and a torn or truncated pair is refused.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only
from safetensors.torch import load_file, save

from bloodcell import io
from bloodcell.errors import ModelError
from bloodcell.progress import console

FORMAT = "bloodcell-lightning-checkpoint/1"


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _encode(v, tensors) for k, v in obj.items()}}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), tensors)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"checkpoint value of type {type(obj).__name__} cannot be stored without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__dict__" in obj:
        return {k: _decode(v, tensors) for k, v in obj["__dict__"].items()}
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__float__" in obj:
        return float(obj["__float__"])
    raise ModelError(f"unknown entry in checkpoint: {sorted(obj)}")


def _tensor_files(path: Path) -> list[Path]:
    """Every tensor file written for the checkpoint at `path` (the current one and leftovers of earlier saves)."""
    legacy = path.with_name(path.name + ".safetensors")  # one fixed name, before files were named by content
    return sorted(path.parent.glob(f"{glob.escape(path.name)}.*.safetensors")) + ([legacy] if legacy.exists() else [])


def _current_tensor_file(path: Path) -> Path | None:
    """The tensor file the JSON at `path` names, if there is a readable one."""
    try:
        meta = json.loads(path.read_text())
        return path.with_name(Path(meta.get("tensors_file", path.name + ".safetensors")).name)
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _remove_tensor_files(path: Path, keep: Path | None) -> None:
    for stale in _tensor_files(path):
        if stale != keep:
            stale.unlink(missing_ok=True)


class SafetensorsCheckpointIO(CheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        tensors: dict[str, torch.Tensor] = {}
        tree = _encode(checkpoint, tensors)
        data = save(tensors)
        digest = hashlib.sha256(data).hexdigest()
        tensor_file = path.with_name(f"{path.name}.{digest[:16]}.safetensors")
        current = _current_tensor_file(path)
        _remove_tensor_files(path, keep=current)  # leftovers of a save that was killed: room for this one
        io.write_bytes(tensor_file, data)
        try:
            io.write_text(
                path,
                json.dumps(
                    {"format": FORMAT, "tensors_file": tensor_file.name, "tensors_sha256": digest, "tree": tree}
                ),
            )
        except BaseException:
            if tensor_file != current:
                tensor_file.unlink(missing_ok=True)
            raise
        _remove_tensor_files(path, keep=tensor_file)  # only now is the previous pair no longer needed

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict[str, Any]:
        return read_checkpoint(path, map_location)

    def remove_checkpoint(self, path) -> None:
        path = Path(path)
        path.unlink(missing_ok=True)
        _remove_tensor_files(path, keep=None)


def read_checkpoint(path, map_location=None) -> dict[str, Any]:
    path = Path(path)
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelError(f"{path} is not a bloodcell training checkpoint")
    name = meta.get("tensors_file", path.name + ".safetensors")
    if not isinstance(name, str) or Path(name).name != name or not name.startswith(path.name + "."):
        raise ModelError(f"{path} names an invalid tensor file: {name!r}")
    tensor_file = path.with_name(name)
    if not tensor_file.exists() or io.file_sha256(tensor_file) != meta.get("tensors_sha256"):
        raise ModelError(f"checkpoint {path} is incomplete: {tensor_file.name} is missing or does not match")
    tensors = load_file(
        str(tensor_file), device=str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    )
    return _decode(meta["tree"], tensors)


def resumable_checkpoint(path: Path) -> str | None:
    """`path` if it holds a whole checkpoint; None (train from the start) if there is none or it is unusable."""
    if not path.exists():
        return None
    try:
        read_checkpoint(path)
    except ModelError as exc:
        if rank_zero_only.rank == 0:
            console().print(
                f"warning: {exc}; training starts again from epoch 1", markup=False, highlight=False, soft_wrap=True
            )
        return None
    return str(path)

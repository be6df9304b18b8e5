"""The two ways a Predictor runs its model: PyTorch (TorchBackend) and ONNX Runtime (OnnxBackend).

Each loads a model folder or file with its description (bloodcell.models.description) and turns a normalised batch
(float32, N x 3 x S x S) into raw logits and, for a model with an OOD score, the scores. What comes before (decoding,
resizing, normalising) and after (temperature, review, counts) is the Predictor's, the same for both.

Nothing here imports PyTorch at module level: the light install (no PyTorch) imports this module and loads
OnnxBackend only; TorchBackend imports the [train] extra's modules when it loads a model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from bloodcell.errors import ModelError
from bloodcell.extras import needs_train_extra
from bloodcell.models.description import ModelDescription, locate, onnx_sidecar, read_onnx_description
from bloodcell.models.onnx_runtime import onnx_session
from bloodcell.models.seal import member, verify

DEFAULT_OOD_FILE = "ood.safetensors"  # models.ood.OOD_FILE, which needs torch


class TorchBackend:
    """A BloodcellModel in PyTorch, with its OOD scorer when the model has one (ScoredModel: one pass for both)."""

    name = "pytorch"
    session = None

    def __init__(self, model: Any, scored_model: Any = None, device: str = "cpu") -> None:
        self.model = model
        self.scored_model = scored_model
        self.device = device
        self.lock = threading.Lock()  # one forward (or Grad-CAM pass, bloodcell.infer.explain) at a time

    @classmethod
    def load(cls, path: Path, device: str) -> tuple["TorchBackend", ModelDescription]:
        """A run / model folder or its .safetensors file, on `device` (cpu, cuda, cuda:N, auto)."""
        with needs_train_extra(f"{path} (a PyTorch model; its ONNX export, from `bloodcell export`, runs without)"):
            from bloodcell.models.checkpoint import load_described
            from bloodcell.models.ood import ScoredModel, load_ood, ood_feature_dim
            import torch

        device = chosen_device(device, torch.cuda.is_available(), "no CUDA device is visible to PyTorch here")
        net, description = load_described(path)  # checks the folder's seal first
        net = net.to(device)
        scored = None
        if description.ood is not None:
            folder = path if path.is_dir() else path.parent
            ood_file = member(folder, description.ood.file or DEFAULT_OOD_FILE, "ood.file", locate(path)[1])
            scorer = load_ood(ood_file, net.num_classes, ood_feature_dim(net))
            scored = ScoredModel(net, scorer).to(device).eval()
        return cls(net, scored, device), description

    @property
    def scores_ood(self) -> bool:
        return self.scored_model is not None

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (N, K), OOD scores (N,) or None) of a normalised float32 batch."""
        import torch  # the [train] extra: this module is imported by the light install too

        with self.lock, torch.inference_mode():
            batch = torch.from_numpy(x).to(self.device)
            if self.scored_model is not None:
                logits, scores = self.scored_model(batch)
                return logits.float().cpu().numpy(), scores.float().cpu().numpy()
            return self.model(batch).float().cpu().numpy(), None


class OnnxBackend:
    """An exported .onnx graph in ONNX Runtime: `input` -> `logits` (and `ood_score` where exported with one)."""

    name = "onnxruntime"
    model = None
    scored_model = None

    def __init__(self, session: Any, device: str = "cpu") -> None:
        self.session = session
        self.device = device
        self.lock = threading.Lock()

    @classmethod
    def load(cls, path: Path, device: str) -> tuple["OnnxBackend", ModelDescription]:
        """An .onnx file described by its `.onnx.json` sidecar (or the model.json beside it), on `device`."""
        verify(path.parent)  # the .onnx, its sidecar and the rest of the folder are what was sealed
        description = read_onnx_description(path)
        device = onnx_device(device)
        session = onnx_session(path, device)
        check_onnx_shapes(session, description, path)
        return cls(session, device), description

    @property
    def scores_ood(self) -> bool:
        return "ood_score" in [o.name for o in self.session.get_outputs()]

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits (N, K), OOD scores (N,) or None) of a normalised float32 batch."""
        got = self.session.run(None, {self.session.get_inputs()[0].name: x})
        scores = np.asarray(got[1], dtype=np.float32) if len(got) > 1 else None
        return np.asarray(got[0], dtype=np.float32), scores


def check_onnx_shapes(session: Any, description: ModelDescription, path: Path) -> None:
    """The sidecar must describe this graph: its input size and class count (catches a sidecar of another export)."""
    in_shape = list(session.get_inputs()[0].shape)
    out_shape = list(session.get_outputs()[0].shape)
    size = description.preprocessing.input_size
    # static dimensions are ints; dynamic ones (the batch) are names or None
    if len(in_shape) != 4 or any(isinstance(d, int) and d != want for d, want in zip(in_shape[1:], (3, size, size))):
        raise ModelError(f"{onnx_sidecar(path)} says input 3 x {size} x {size} but {path.name} takes {in_shape[1:]}")
    k = description.num_classes
    if len(out_shape) != 2 or (isinstance(out_shape[1], int) and out_shape[1] != k):
        raise ModelError(f"{onnx_sidecar(path)} lists {k} classes but {path.name} outputs {out_shape[1:]}")


def onnx_device(device: str) -> str:
    import onnxruntime as ort  # start-up time: imported when an ONNX model is loaded, as models.onnx_runtime does

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    return chosen_device(device, has_cuda, "this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")


def chosen_device(device: str, has_cuda: bool, why_not: str) -> str:
    """`device` checked against what the backend has: auto -> cuda when it has one; a missing CUDA is an error."""
    if not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise ModelError(f"--device must be cpu, cuda, cuda:N or auto, got '{device}'")
    if device == "auto":
        return "cuda" if has_cuda else "cpu"
    if device.startswith("cuda") and not has_cuda:
        raise ModelError(f"--device {device}: {why_not}; use --device cpu")
    return device

"""Run an ONNX graph with ONNX Runtime: the one place a session is opened (classifier, detector, export checks).

No PyTorch: the light install runs every bundled model through here.
"""

from __future__ import annotations

import os

from bloodcell.errors import ModelError


def onnx_session(path: str | os.PathLike, device: str = "cpu"):
    """An ONNX Runtime session for `path` on the CPU, or CUDA for device "cuda[:N]"; a file it cannot load is one
    line."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if device.startswith("cuda"):
        providers = [
            ("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}),
            "CPUExecutionProvider",
        ]
    else:
        providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load ONNX model {path}: {first}") from None

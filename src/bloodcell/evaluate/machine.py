"""The machine a figure was measured on: CPU model and speed-relevant flags, versions. No PyTorch needed."""

from __future__ import annotations

import os
import platform
from pathlib import Path

from bloodcell import __version__
from bloodcell.extras import has_torch


def environment() -> dict:
    env = {
        "machine": platform.machine(),
        "processor": cpu_name(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "bloodcell": __version__,
        "device": "cpu",
    }
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if has_torch():  # the light install has none
        import torch

        env["torch"] = torch.__version__
        env["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        env["torch_threads"] = torch.get_num_threads()  # CPU results can differ in the last digits with another count
        try:
            import lightning, timm  # noqa: E401

            env["lightning"], env["timm"] = lightning.__version__, timm.__version__
        except ImportError:
            pass
    return env


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_line() -> str:
    """The CPU model, the flags that change speed (AVX2, AVX-512, VNNI for int8, bf16, AMX) and any cap that makes
    it run as an older CPU (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA): every benchmark prints it."""
    try:
        flags = set(
            next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
        )
    except (OSError, StopIteration):
        flags = set()
    wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile") if f in flags]
    line = f"{cpu_name()} ({', '.join(wanted) or 'no AVX2/AVX-512 flags seen'})"
    caps = [f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if os.environ.get(k)]
    if caps:
        line += f", capped: {' '.join(caps)}"
        if has_torch():
            import torch

            line += f" (torch kernels {torch.backends.cpu.get_cpu_capability()})"
    return line

"""What this machine runs well: the accelerator, the precision and the memory layout a run trains with, from the
config's `auto` settings and probes of the CPU (AVX-512, native bf16) and of CUDA.
"""

from __future__ import annotations

import os

import torch

from bloodcell.config import RunConfig
from bloodcell.errors import ConfigError


def cpu_kernels_below_avx512() -> bool:
    """torch's CPU kernels are AVX2 or older: an older CPU, or a newer one capped (ATEN_CPU_CAPABILITY=avx2)."""
    return torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AMX")


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) under which bf16 convolutions still run natively
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "ALL")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 convolutions run natively (1.6-2.2x fp32 on this project's EPYC); elsewhere they are
    emulated. A capped ISA (ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2: how an older CPU is emulated, or a
    workaround for a kernel bug) counts as the CPU it emulates."""
    try:
        hardware = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # torch without these probes: stay with fp32
        return False
    onednn_cap = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    return hardware and not cpu_kernels_below_avx512() and onednn_cap.startswith(_ONEDNN_BF16_ISAS)


def resolve_precision(cfg: RunConfig, accelerator: str) -> str:
    """`auto`: bf16 autocast where the hardware runs bf16 natively (CUDA with bf16, or such a CPU), else fp32."""
    p = cfg.train.precision
    if p != "auto":
        return {"32": "32-true"}.get(p, p)
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    if accelerator == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"


# Measured (docs/benchmarks.md): channels_last is faster for every zoo model on AVX-512 CPUs, and for every one but
# VGG-16 on CPUs with AVX2 alone, where a bare VGG-16 step ran 0.87x contiguous at 224 px (whole epochs 0.86-0.96x).
CONTIGUOUS_ON_AVX2_CPUS = {"vgg16"}


def resolve_channels_last(cfg: RunConfig, accelerator: str) -> bool:
    """`train.channels_last` for this machine: off where it was measured slower (VGG-16 on an AVX2-only CPU)."""
    if not cfg.train.channels_last:
        return False
    return not (accelerator == "cpu" and cpu_kernels_below_avx512() and cfg.model.name in CONTIGUOUS_ON_AVX2_CPUS)


def resolve_accelerator(cfg: RunConfig) -> str:
    """`train.accelerator` for this machine: `auto` is the GPU where CUDA has one, else the CPU."""
    a = cfg.train.accelerator
    if a == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if a in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.accelerator is '{a}' but no CUDA device is available")
    return "gpu" if a == "cuda" else a

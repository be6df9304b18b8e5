"""What this install can do.

`pip install bloodcell` is the inference install: predict, serve, the differential count, smear-field photographs and
`evaluate --model` on a labelled folder, all on ONNX Runtime (the bundled model ships as model.onnx too, the bundled
field detector as detector.onnx), with no PyTorch. Training, studies, export, Grad-CAM and field detectors without an ONNX
export need PyTorch: `pip install 'bloodcell[train]'`.
"""

from __future__ import annotations

TRAIN_EXTRA = "bloodcell[train]"
INSTALL_TRAIN = f"pip install '{TRAIN_EXTRA}'"

# Top-level modules that only the [train] extra installs (pyproject.toml lists the same packages).
TRAIN_MODULES = frozenset(
    {
        "torch",
        "torchvision",
        "timm",
        "huggingface_hub",
        "lightning",
        "pytorch_lightning",
        "torchmetrics",
        "pycocotools",
        "skimage",
        "imblearn",
        "safetensors",
        "onnx",
        "onnxscript",
        "pytorch_grad_cam",
    }
)


def has_torch() -> bool:
    """True when PyTorch can be imported here (the full install)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def missing_train_module(exc: BaseException) -> str | None:
    """The missing module's name when `exc` says a module of the [train] extra is not installed, else None."""
    if isinstance(exc, ModuleNotFoundError) and exc.name and exc.name.split(".")[0] in TRAIN_MODULES:
        return exc.name.split(".")[0]
    return None

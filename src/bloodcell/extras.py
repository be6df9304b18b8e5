"""What this install can do.

`pip install bloodcell` is the inference install: predict, serve, the differential count, smear-field photographs and
`evaluate --model` on a labelled folder, all on ONNX Runtime (the bundled model ships as model.onnx too, the bundled
field detector as detector.onnx), with no PyTorch. Training, studies, export, Grad-CAM and field detectors without an
ONNX export need PyTorch: `pip install 'bloodcell[train]'`.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from bloodcell.errors import MissingExtra

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


def optional(module: str) -> ModuleType | None:
    """`module` imported, or None where this install lacks it: for what is only left out without it (a version in a
    report, a faster path). A module that is there but fails to import still raises."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.split(".")[0] == exc.name.split(".")[0]:
            return None
        raise


def require(module: str, feature: str) -> ModuleType:
    """`module` imported, or a one-line MissingExtra naming `feature` and the install that has it.

    Args:
        module: a dotted module name, e.g. "torch" or "onnxruntime.quantization".
        feature: what needs it, as the user would name it ("Grad-CAM", "the FCOS detector").
    """
    with needs_train_extra(feature):
        return importlib.import_module(module)


@contextlib.contextmanager
def needs_train_extra(feature: str) -> Iterator[None]:
    """Turn a ModuleNotFoundError for a [train]-extra module inside the block into a one-line MissingExtra naming
    `feature`; any other missing module is a packaging bug and is raised as it is."""
    try:
        yield
    except MissingExtra:
        raise
    except ModuleNotFoundError as exc:
        missing = missing_train_module(exc)
        if missing is None:
            raise
        raise MissingExtra(
            f"{feature} needs PyTorch and the training install ({missing} is not installed): {INSTALL_TRAIN}"
        ) from None


def lazy_face(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A package face's module-level `__getattr__` (PEP 562) that imports each exported name from its module on first
    use, so importing the package costs nothing and its light parts work without the [train] extra.

    Args:
        package: the package's dotted name, for the AttributeError.
        exports: exported name -> the dotted module that defines it.
    """

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module '{package}' has no attribute '{name}'")

    return __getattr__

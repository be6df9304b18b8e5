"""The built-in detectors register themselves here (imported on first use of the detector registry).

`fcos-onnx` needs no PyTorch. Without the [train] extra, a detector whose module needs it stays a known name, and
creating it raises the ModuleNotFoundError that load_detector turns into one line naming the extra.
"""

import importlib

import bloodcell.models.detector_onnx  # noqa: F401
from bloodcell.extras import missing_train_module
from bloodcell.models.detector_base import register_detector


def _needs(exc: ModuleNotFoundError):
    def factory(**options):
        raise ModuleNotFoundError(str(exc), name=exc.name)

    return factory


for _name, _module in (("classical", "bloodcell.models.detector_classical"), ("fcos", "bloodcell.models.detector_fcos")):
    try:
        importlib.import_module(_module)
    except ModuleNotFoundError as _exc:
        if missing_train_module(_exc) is None:
            raise
        register_detector(_name)(_needs(_exc))

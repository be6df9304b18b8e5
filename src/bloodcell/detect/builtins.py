"""The built-in detectors register themselves here (imported on first use of the detector registry).

`fcos-onnx` needs no PyTorch. Without the [train] extra, a detector whose module needs it stays a known name, and
creating it raises the MissingExtra that load_detector turns into one line naming the extra.
"""

import importlib
from typing import Callable

import bloodcell.detect.fcos_onnx  # noqa: F401  (registers fcos-onnx)
from bloodcell.detect.base import register_detector
from bloodcell.errors import MissingExtra
from bloodcell.extras import needs_train_extra


def _unavailable(exc: MissingExtra) -> Callable:
    def factory(**options):
        raise exc

    return factory


for _name, _module in (("classical", "bloodcell.detect.classical"), ("fcos", "bloodcell.detect.fcos")):
    try:
        with needs_train_extra(f"the '{_name}' detector"):
            importlib.import_module(_module)
    except MissingExtra as _exc:
        register_detector(_name)(_unavailable(_exc))

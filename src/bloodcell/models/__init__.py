"""The model zoo: every model of the paper behind one registry and one nn.Module face.

Names are imported on first use, so `bloodcell.models.metadata` (model.json, no PyTorch) stays importable in the
light inference install; the rest needs `bloodcell[train]`.
"""

from importlib import import_module

_EXPORTS = {
    "BloodcellModel": "bloodcell.models.base",
    "load_checkpoint": "bloodcell.models.checkpoint",
    "save_checkpoint": "bloodcell.models.checkpoint",
    "supcon_loss": "bloodcell.models.losses",
    "ModelInfo": "bloodcell.models.registry",
    "create_model": "bloodcell.models.registry",
    "list_models": "bloodcell.models.registry",
    "model_info": "bloodcell.models.registry",
    "register_model": "bloodcell.models.specs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'bloodcell.models' has no attribute '{name}'")

"""The model zoo: every model of the paper behind one registry and one nn.Module face.

Names are imported on first use, so `bloodcell.models.metadata` (model.json, no PyTorch) stays importable in the
light inference install; the rest needs `bloodcell[train]`.
"""

from bloodcell.extras import lazy_face

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

__getattr__ = lazy_face("bloodcell.models", _EXPORTS)

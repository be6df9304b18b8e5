"""The model zoo: every model of the paper behind one registry and one nn.Module face."""

from bloodcell.models.base import BloodcellModel
from bloodcell.models.checkpoint import load_checkpoint, save_checkpoint
from bloodcell.models.losses import supcon_loss
from bloodcell.models.registry import ModelInfo, create_model, list_models, model_info, register_model

__all__ = [
    "BloodcellModel",
    "ModelInfo",
    "create_model",
    "list_models",
    "load_checkpoint",
    "model_info",
    "register_model",
    "save_checkpoint",
    "supcon_loss",
]

"""Out-of-distribution score that travels with a model: Mahalanobis distance of its features.

Lee et al. (2018): fit one mean per class and one shared covariance on the training part's features; an image's
score is the squared Mahalanobis distance to the nearest class mean. Cells like the training cells score low; a
smear photograph, a text scan or a cell from an unlike microscope scores high. The features (`ood_features`) are
the pooled feature map, the pooled centre of the map (a single-cell crop has its cell there: a mosaic of cell
pieces or a blank field does not) and the per-channel mean and spread of the input (a flat or washed-out image
is far from every cell in those, whatever the network makes of it).

The statistics are stored beside the weights in `ood.safetensors` (means, precision) and the threshold in
model.json's `ood` section; `ScoredModel` computes logits and the score in one pass, in PyTorch and in the ONNX
graph alike, so every path that runs a model reports the same score. Fitting lives in bloodcell.evaluate.ood.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from bloodcell.errors import ModelError
from bloodcell.io import write_bytes

OOD_FILE = "ood.safetensors"
CENTRE_MAX_CHANNELS = 512  # above this many feature channels the map's centre is left out of the OOD features
METHOD = "mahalanobis"


class MahalanobisScore(nn.Module):
    """Squared Mahalanobis distance of features (N, D) to the nearest of K class means, shared precision (D, D)."""

    def __init__(self, means: torch.Tensor, precision: torch.Tensor) -> None:
        super().__init__()
        # precision = L L^T: whitening by L turns the distance into a plain one, N x D x D work instead of N x K x D x D
        whiten = torch.linalg.cholesky(torch.as_tensor(precision, dtype=torch.float64))
        self.register_buffer("whiten", whiten.float())
        self.register_buffer("means_white", (torch.as_tensor(means, dtype=torch.float64) @ whiten).float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = features.float() @ self.whiten
        diff = z[:, None, :] - self.means_white[None]  # (N, K, D): exact where the expanded form cancels
        return (diff * diff).sum(dim=2).min(dim=1).values


def ood_features(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, OOD features) of a normalised batch, in one pass through the network."""
    stats = torch.cat([x.float().mean(dim=(2, 3)), x.float().std(dim=(2, 3))], dim=1)
    fmap = model.forward_feature_map(x) if hasattr(model, "forward_feature_map") else None
    if fmap is None:
        pooled = model.forward_features(x)
        return model.forward_head(pooled), torch.cat([pooled.float(), stats], dim=1)
    pooled = fmap.mean(dim=(2, 3))
    if fmap.shape[1] > CENTRE_MAX_CHANNELS:  # wide backbones: the covariance fit grows with the cube of the size
        return model.forward_head(pooled), torch.cat([pooled.float(), stats], dim=1)
    h, w = fmap.shape[2], fmap.shape[3]
    centre = fmap[:, :, h // 4 : h - h // 4, w // 4 : w - w // 4].mean(dim=(2, 3))
    return model.forward_head(pooled), torch.cat([pooled.float(), centre.float(), stats], dim=1)


def ood_feature_dim(model: nn.Module) -> int:
    centre = hasattr(model, "forward_feature_map") and model.num_features <= CENTRE_MAX_CHANNELS
    return int(model.num_features) * (2 if centre else 1) + 6


class ScoredModel(nn.Module):
    """A BloodcellModel plus its OOD score: x -> (logits, ood_score); what predict runs and ONNX exports."""

    def __init__(self, model: nn.Module, scorer: MahalanobisScore) -> None:
        super().__init__()
        self.model, self.scorer = model, scorer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = ood_features(self.model, x)
        return logits, self.scorer(features)


def save_ood(directory: str | os.PathLike, means, precision) -> Path:
    from safetensors.torch import save

    path = Path(directory) / OOD_FILE
    tensors = {
        "means": torch.as_tensor(means, dtype=torch.float32).contiguous(),
        "precision": torch.as_tensor(precision, dtype=torch.float32).contiguous(),
    }
    write_bytes(path, save(tensors, metadata={"method": METHOD}))
    return path


def load_ood(path: str | os.PathLike, num_classes: int, num_features: int) -> MahalanobisScore:
    """num_features: the OOD feature size, `ood_feature_dim(model)`."""
    """Read ood.safetensors and check it fits the model (K class means of D features, a D x D precision)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
        means, precision = tensors["means"], tensors["precision"]
    except FileNotFoundError:
        raise ModelError(f"{path} not found, but model.json has an 'ood' section: copy it with the model") from None
    except KeyError as exc:
        raise ModelError(f"{path} lacks the tensor {exc}") from None
    except Exception as exc:  # safetensors' own errors for broken files
        raise ModelError(f"{path} is truncated or corrupt ({exc})") from None
    if tuple(means.shape) != (num_classes, num_features) or tuple(precision.shape) != (num_features, num_features):
        raise ModelError(
            f"{path} holds statistics for {tuple(means.shape)} means / {tuple(precision.shape)} precision; "
            f"the model has {num_classes} classes and {num_features} features"
        )
    if not (torch.isfinite(means).all() and torch.isfinite(precision).all()):
        raise ModelError(f"{path} holds inf or nan")
    try:
        return MahalanobisScore(means, precision)
    except RuntimeError:  # torch.linalg.cholesky: not positive definite
        raise ModelError(
            f"{path}: the precision matrix is not positive definite; re-evaluate the run to refit it"
        ) from None

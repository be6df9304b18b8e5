"""A trained network's outputs on cached images: logits and the OOD features, in the model's normalisation."""

from __future__ import annotations

import numpy as np
import torch

from bloodcell.models.ood import ood_feature_dim, ood_features
from bloodcell.progress import progress_bar


@torch.inference_mode()
def predict_outputs(
    model: torch.nn.Module,
    images: np.ndarray,
    index: np.ndarray,
    batch_size: int = 128,
    device: str | None = None,
    progress: bool = False,
    desc: str = "predicting",
) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, K), OOD features (N, D)) of `model` on images[index]; uint8 (N, H, W, 3) in, normalised with the
    model's mean/std.

    Args:
        model: the network; its mean and std (on a 0-1 scale) normalise the images.
        images: (M, H, W, 3) uint8, e.g. a memory-mapped cache.
        index: (N,) the rows of `images` to predict; the outputs are in this order.
        batch_size: images a forward pass.
        device: a torch device; None: cuda when available, else cpu.
        progress: show a progress bar.
        desc: the progress bar's label.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device).eval()
    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1) * 255
    logits, features = [], []
    with progress_bar(len(index), desc, enabled=progress) as advance:
        for start in range(0, len(index), batch_size):
            idx = np.sort(index[start : start + batch_size])
            order = np.argsort(np.argsort(index[start : start + batch_size]))  # back to the caller's order
            x = torch.from_numpy(np.asarray(images[idx])).to(device).permute(0, 3, 1, 2).float()
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            z, f = ood_features(model, x)
            logits.append(z.float().cpu().numpy()[order])
            features.append(f.float().cpu().numpy()[order])
            advance(len(idx))
    if not logits:
        return np.zeros((0, model.num_classes), np.float32), np.zeros((0, ood_feature_dim(model)), np.float32)
    return np.concatenate(logits), np.concatenate(features)


def predict_logits(model: torch.nn.Module, images: np.ndarray, index: np.ndarray, **kwargs) -> np.ndarray:
    """Logits (N, K) of `model` on images[index] (see predict_outputs)."""
    return predict_outputs(model, images, index, **kwargs)[0]

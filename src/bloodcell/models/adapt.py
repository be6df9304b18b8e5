"""Unlabelled adaptation to a lab: re-estimate a network's normalisation statistics on that lab's own cells.

BatchNorm layers hold the mean and variance of the training lab's activations; another lab's stain and camera
move those (Tsutsui et al. 2023 find this is what breaks first under a lab change). Re-estimating them on the new
lab's unlabelled images (AdaBN, Li et al. 2016) changes no learned weight. GroupNorm / LayerNorm networks have no
such statistics and are left as they are.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

MIN_ADAPT_IMAGES = 32  # fewer images than this give statistics noisier than the training lab's


def norm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_norm_statistics(
    model: nn.Module, images: np.ndarray, *, batch_size: int = 64, device: str | None = None
) -> int:
    """Replace every BatchNorm layer's running mean and variance by their average over `images`; return how many.

    The batches are equal-sized (the last short one is dropped unless it is all there is), so each batch's
    statistics weigh the same. The model is left in eval mode.

    Args:
        model: the network, changed in place; its mean and std (on a 0-1 scale) normalise the images.
        images: uint8 (N, S, S, 3), preprocessed as the model's input (size, white balance).
        batch_size: images a batch (fewer when there are fewer images).
        device: a torch device; None: the device of the model's parameters.
    """
    layers = norm_layers(model)
    if not layers or len(images) == 0:
        return 0
    device = device or next(model.parameters()).device.type
    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1) * 255
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches, not an exponential one
    model.eval()
    for m in layers:
        m.train()
    n = len(images)
    size = min(batch_size, n)
    try:
        for start in range(0, n - size + 1, size):
            x = torch.from_numpy(np.asarray(images[start : start + size])).to(device).permute(0, 3, 1, 2).float()
            model(((x - mean) / std).contiguous(memory_format=torch.channels_last))
    finally:
        for m, momentum in zip(layers, saved):
            m.momentum = momentum
        model.eval()
    return len(layers)


def minimise_entropy(
    model: nn.Module,
    images: np.ndarray,
    *,
    epochs: int = 3,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    device: str | None = None,
) -> int:
    """Tent (Wang et al. 2021) after AdaBN: the normalisation layers' scale and shift learn to make the model's
    predictions on the lab's own images confident; every other weight stays. Returns the optimiser steps taken.

    Entropy alone, without SHOT's diversity term: that term assumes every class equally common, and a lab's white
    cells are mostly neutrophils while the model also knows platelets and erythroblasts. Run
    recompute_norm_statistics first: the statistics stay fixed here (eval mode), only the affine parameters move.

    Args:
        model: the network, changed in place; its mean and std (on a 0-1 scale) normalise the images.
        images: uint8 (N, S, S, 3), preprocessed as the model's input (size, white balance).
        epochs: passes over the images.
        lr: Adam's learning rate.
        batch_size: images an optimiser step.
        seed: the order the images are shuffled into each epoch.
        device: a torch device; None: the device of the model's parameters.
    """
    params = [
        p
        for m in model.modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
        for p in m.parameters()
    ]
    if not params or len(images) == 0:
        return 0
    device = device or next(model.parameters()).device.type
    mean = torch.tensor(model.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(model.std, device=device).view(1, 3, 1, 1) * 255
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    model.eval()
    steps = 0
    try:
        with torch.enable_grad():
            for _ in range(epochs):
                order = rng.permutation(len(images))
                for start in range(0, len(order), batch_size):
                    idx = np.sort(order[start : start + batch_size])
                    x = torch.from_numpy(np.asarray(images[idx])).to(device).permute(0, 3, 1, 2).float()
                    logits = model(((x - mean) / std).contiguous(memory_format=torch.channels_last))
                    entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
                    optimiser.zero_grad()
                    entropy.backward()
                    optimiser.step()
                    steps += 1
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.eval()
    return steps

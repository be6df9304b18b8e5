"""Batched augmentation for single-cell images, on whatever device the batch is on.

One call transforms a whole (B, 3, H, W) float batch in [0, 1] with per-sample random parameters drawn from a
seeded generator: flips, 90-degree turns, a small affine (rotation, translation, scale) and colour jitter.
No per-image Python, so it runs at GPU speed, and a (seed, epoch) generator makes resumed runs repeat exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bloodcell.config import AugmentConfig


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g, device="cpu") * (hi - lo) + lo).to(device)


def _rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` turns (per sample) with the YIQ rotation: cheap and differentiable."""
    theta = shift * 2 * math.pi
    cos, sin = torch.cos(theta), torch.sin(theta)
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device, dtype=x.dtype)
    to_rgb = torch.linalg.inv(to_yiq)
    b = x.shape[0]
    rot = torch.zeros(b, 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    m = to_rgb @ rot @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)


def augment_batch(x: torch.Tensor, cfg: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """Augment a (B, 3, H, W) float batch in [0, 1]; random numbers come from CPU generator `g`."""
    b, device = x.shape[0], x.device
    if cfg.hflip:
        mask = (torch.rand(b, generator=g) < 0.5).to(device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    if cfg.vflip:
        mask = (torch.rand(b, generator=g) < 0.5).to(device)
        x = torch.where(mask[:, None, None, None], x.flip(2), x)
    if cfg.rot90 and x.shape[2] == x.shape[3]:
        turns = torch.randint(0, 4, (b,), generator=g).to(device)
        out = x
        for k in (1, 2, 3):
            out = torch.where((turns == k)[:, None, None, None], torch.rot90(x, k, dims=(2, 3)), out)
        x = out
    if cfg.degrees > 0 or cfg.translate > 0 or cfg.scale != (1.0, 1.0):
        angle = _uniform(b, -cfg.degrees, cfg.degrees, g, device) * math.pi / 180
        scale = _uniform(b, cfg.scale[0], cfg.scale[1], g, device)
        tx = _uniform(b, -cfg.translate, cfg.translate, g, device) * 2
        ty = _uniform(b, -cfg.translate, cfg.translate, g, device) * 2
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1).to(x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Reflection keeps the smear background instead of black corners.
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if cfg.brightness > 0:
        x = x * _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, g, device)[:, None, None, None].to(x.dtype)
    if cfg.contrast > 0:
        f = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, g, device)[:, None, None, None].to(x.dtype)
        mean = _rgb_to_gray(x).mean(dim=(2, 3), keepdim=True)
        x = (x - mean) * f + mean
    if cfg.saturation > 0:
        f = _uniform(b, 1 - cfg.saturation, 1 + cfg.saturation, g, device)[:, None, None, None].to(x.dtype)
        gray = _rgb_to_gray(x)
        x = (x - gray) * f + gray
    if cfg.hue > 0:
        x = _hue_shift(x, _uniform(b, -cfg.hue, cfg.hue, g, device).to(x.dtype))
    return x.clamp(0, 1)

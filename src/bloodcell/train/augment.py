"""Batched augmentation for single-cell images, on whatever device the batch is on.

One call transforms a whole (B, 3, H, W) float batch in [0, 1] with per-sample random parameters drawn from a
seeded generator: flips, 90-degree turns, an affine (rotation, translation, scale) and colour jitter, and, for
cells from other labs, stain and white-balance shifts, colour mixing, gamma, grayscale, blur and noise.
No per-image Python, so it runs at GPU speed, and a (seed, epoch) generator makes resumed runs repeat exactly.

The stain shift follows Tellez et al. (2018): colour deconvolution into haematoxylin / eosin / DAB amounts with
scikit-image's matrices, a per-sample scale and offset of each amount, and back to RGB.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from skimage.color.colorconv import hed_from_rgb, rgb_from_hed

from bloodcell.config import AugmentConfig

_LOG_FLOOR = math.log(1e-6)  # scikit-image's separate_stains / combine_stains clamp and scale by this


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=g, device="cpu") * (hi - lo) + lo).to(device)


def _rgb_to_gray(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` turns (per sample) with the YIQ rotation: cheap and differentiable."""
    theta = shift * 2 * math.pi
    cos, sin = torch.cos(theta), torch.sin(theta)
    to_yiq = torch.tensor(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], device=x.device, dtype=x.dtype
    )
    to_rgb = torch.linalg.inv(to_yiq)
    b = x.shape[0]
    rot = torch.zeros(b, 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    m = to_rgb @ rot @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


def _stain_shift(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """RGB -> stain amounts (scikit-image's HED deconvolution) * scale + bias -> RGB; scale, bias: (B, 3)."""
    to_hed = torch.as_tensor(hed_from_rgb, dtype=x.dtype, device=x.device)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=x.dtype, device=x.device)
    od = torch.log(x.clamp_min(1e-6)) / _LOG_FLOOR  # (B, 3, H, W), >= 0
    hed = torch.einsum("bchw,cs->bshw", od, to_hed).clamp_min(0)
    hed = hed * scale[:, :, None, None] + bias[:, :, None, None]
    return torch.exp(torch.einsum("bshw,sc->bchw", hed.clamp_min(0), to_rgb) * _LOG_FLOOR)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (pixels); sigma 0 leaves a sample unchanged."""
    b, c, h, w = x.shape
    radius = max(1, min(int(math.ceil(3 * float(sigma.max()))), (min(h, w) - 1) // 2))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    s = sigma.to(x.dtype).clamp_min(1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, 2r+1); a tiny sigma gives a delta
    k = k.repeat_interleave(c, 0)  # one kernel per (sample, channel)
    y = F.pad(x.reshape(1, b * c, h, w), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


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
    # --- shifts between labs: stain, camera white balance and response, optics, sensor
    if cfg.stain > 0 or cfg.stain_bias > 0:
        scale = _uniform(3 * b, 1 - cfg.stain, 1 + cfg.stain, g, device).view(b, 3).to(x.dtype)
        bias = _uniform(3 * b, -cfg.stain_bias, cfg.stain_bias, g, device).view(b, 3).to(x.dtype)
        x = _stain_shift(x.clamp(0, 1), scale, bias)
    if cfg.white_balance > 0:
        gains = _uniform(3 * b, 1 - cfg.white_balance, 1 + cfg.white_balance, g, device).view(b, 3).to(x.dtype)
        x = x * gains[:, :, None, None]
    if cfg.color_matrix > 0:
        mix = _uniform(9 * b, -cfg.color_matrix, cfg.color_matrix, g, device).view(b, 3, 3).to(x.dtype)
        mix = mix * (1 - torch.eye(3, device=device, dtype=x.dtype)) + torch.eye(3, device=device, dtype=x.dtype)
        mix = mix / mix.sum(2, keepdim=True)  # rows sum to 1: grey stays grey in brightness
        x = torch.einsum("bij,bjhw->bihw", mix, x)
    if cfg.gamma > 0:
        x = x.clamp(0, 1) ** _per_sample(torch.exp(_uniform(b, -cfg.gamma, cfg.gamma, g, device))).to(x.dtype)
    if cfg.grayscale > 0:
        mask = (torch.rand(b, generator=g) < cfg.grayscale).to(device)
        x = torch.where(_per_sample(mask), _rgb_to_gray(x).expand_as(x), x)
    if cfg.blur > 0:
        sigma = _uniform(b, 0, cfg.blur, g, device) * (torch.rand(b, generator=g) < 0.5).to(device)
        if bool((sigma > 0).any()):
            x = _gaussian_blur(x, sigma)
    if cfg.noise > 0:
        sd = _per_sample(_uniform(b, 0, cfg.noise, g, device)).to(x.dtype)
        noise = torch.randn(x.shape, generator=g).to(device=device, dtype=x.dtype)
        x = x + sd * noise
    return x.clamp(0, 1)

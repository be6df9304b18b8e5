"""timm backbones without their classifiers, and loading ImageNet weights into them."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from bloodcell.errors import ModelError

# Keys a timm (or torchvision) state dict holds for the classifier we replace: ignored on load.
CLASSIFIER_PREFIXES = ("fc.", "classifier.", "head.", "pre_logits.", "last_linear.", "AuxLogits.")

_UNPICKLING_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"}


def create_backbone(arch: str, pretrained: Any, model_name: str) -> nn.Module:
    """A timm model that returns unpooled feature maps from `forward_features`.

    pretrained: False, True (timm's published ImageNet weights) or a local weights file.
    """
    import timm

    backbone = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
    if arch.startswith("vgg"):
        # timm keeps VGG's 4096-wide ConvMlp "pre_logits" (119M params) even with num_classes=0;
        # we pool the 512-channel conv features instead, as Keras' include_top=False does.
        backbone.pre_logits = nn.Identity()
    if pretrained is True:
        load_imagenet_weights(backbone, arch, model_name)
    elif pretrained:
        load_backbone_weights(backbone, pretrained, model_name)
    return backbone


# legacy_xception taps its features at the first ReLU *inside* the next block ("block2.rep.0"),
# and registers each block's skip branch before its main branch, so tap positions would split
# blocks in two. Its stages end at these whole modules instead (output strides 2, 4, 8, 16, 32).
_STAGE_ENDS = {"legacy_xception": ["bn2", "block1", "block2", "block11", "bn4"]}


def stage_groups(backbone: nn.Module, prefix: str) -> list[list[str]]:
    """Parameter names of a timm backbone grouped by feature stage (timm's `feature_info`).

    A stage owns every parameter registered after the previous stage's module and up to the end
    of its own module; parameters after the last stage (e.g. a final norm) join the last one.
    """
    module_names = [name for name, _ in backbone.named_modules()]
    order = {name: i for i, name in enumerate(module_names)}
    arch = (getattr(backbone, "pretrained_cfg", None) or {}).get("architecture", "")
    taps = _STAGE_ENDS.get(arch) or [info["module"] for info in backbone.feature_info]
    ends = []
    for stage in taps:
        ends.append(max(order[n] for n in module_names if n == stage or n.startswith(stage + ".")))
    groups: list[list[str]] = [[] for _ in ends]
    for name, _ in backbone.named_parameters():
        position = order[name.rsplit(".", 1)[0] if "." in name else ""]
        index = next((i for i, end in enumerate(ends) if position <= end), len(ends) - 1)
        groups[index].append(prefix + name)
    return [g for g in groups if g]


def backbone_mean_std(backbone: nn.Module) -> tuple[tuple, tuple]:
    """Normalisation the backbone's published weights expect (ImageNet defaults for most)."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    from bloodcell.models.base import IMAGENET_MEAN, IMAGENET_STD

    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


# ---------------------------------------------------------------------- local weight files


def read_state_dict(path: str | os.PathLike, model_name: str) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file, or a state dict via torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file for '{model_name}' not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise ModelError(f"weights file {path} is truncated or not a safetensors file ({exc})") from None
    try:
        # weights_only: plain tensors and containers only, never arbitrary pickled objects
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"weights file {path} could not be read as a plain state dict (weights_only=True): "
            f"{str(exc).splitlines()[0]}; convert it to .safetensors"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):  # common wrappers around the weights
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights file {path} does not hold a state dict of tensors")
    return obj


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike, model_name: str) -> None:
    """Load a file whose keys are timm's names for this backbone; classifier keys are ignored."""
    state = read_state_dict(path, model_name)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    expected = backbone.state_dict()
    matched = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    missing = [k for k in expected if k not in matched]
    unexpected = [k for k in state if k not in expected and not k.startswith(CLASSIFIER_PREFIXES)]
    if missing or unexpected:
        wrong_shape = [k for k in state if k in expected and state[k].shape != expected[k].shape]
        details = []
        if missing:
            details.append(f"missing e.g. {missing[0]}")
        if wrong_shape:
            details.append(f"{len(wrong_shape)} of other shape e.g. {wrong_shape[0]}")
        if unexpected:
            details.append(f"{len(unexpected)} unknown e.g. {unexpected[0]}")
        raise ModelError(
            f"weights file {path} does not fit the backbone of '{model_name}': "
            f"{len(matched)} of {len(expected)} tensors matched ({'; '.join(details)})"
        )
    backbone.load_state_dict(matched, strict=True)


# ---------------------------------------------------------------------- published weights


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the host of `url`? Fails in milliseconds with no DNS."""
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_weight_file(cfg: dict) -> str | None:
    """The local copy of timm's published weights, if an earlier download left one."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        for filename in (cfg.get("hf_hub_filename"), "model.safetensors", "pytorch_model.bin"):
            if filename:
                found = try_to_load_from_cache(hub_id, filename, cache_dir=constants.HF_HUB_CACHE)
                if isinstance(found, str):
                    return found
    url = cfg.get("url")
    if url:
        candidate = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
        if candidate.is_file():
            return str(candidate)
    return None


def load_imagenet_weights(backbone: nn.Module, arch: str, model_name: str) -> None:
    """timm's published ImageNet weights: from the local cache, else downloaded by timm.

    Without a network, huggingface_hub retries for about a minute before giving up, so we
    look at the cache first and probe the host before handing over to timm.
    """
    import timm

    cfg = dict(backbone.pretrained_cfg)
    hint = (
        f"could not fetch ImageNet weights for '{model_name}' (offline?): pass pretrained='path/to/weights.safetensors'"
    )
    cached = _cached_weight_file(cfg)
    if cached:
        load_backbone_weights(backbone, cached, model_name)
        return
    host = "https://huggingface.co" if cfg.get("hf_hub_id") else cfg.get("url", "")
    if cfg.get("hf_hub_id"):
        host = os.environ.get("HF_ENDPOINT", host)
    if _offline() or not host or not _reachable(host):
        raise ModelError(hint)
    try:
        source = timm.create_model(arch, pretrained=True, num_classes=0, global_pool="")
    except Exception as exc:
        raise ModelError(f"{hint} [{type(exc).__name__}: {str(exc).splitlines()[0][:200]}]") from None
    state = {k: v for k, v in source.state_dict().items() if not k.startswith(CLASSIFIER_PREFIXES)}
    backbone.load_state_dict(state, strict=True)

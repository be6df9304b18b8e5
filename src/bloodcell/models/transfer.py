"""ImageNet backbones from timm with the paper's heads: single, hybrid, and SupCon."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bloodcell.errors import ModelError
from bloodcell.models.backbones import backbone_mean_std, create_backbone, stage_groups
from bloodcell.models.base import BloodcellModel, make_head


class TimmClassifier(BloodcellModel):
    """timm backbone -> global average pooling -> head (see `make_head`)."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        input_size: int,
        pretrained: Any = False,
        head_hidden: int = 256,
        head_dropout: float = 0.5,
        model_name: str = "",
    ) -> None:
        backbone = create_backbone(arch, pretrained, model_name or arch)
        mean, std = backbone_mean_std(backbone)
        super().__init__(num_classes, backbone.num_features, input_size, mean, std)
        self.arch = arch
        self.backbone = backbone
        self.head = make_head(backbone.num_features, num_classes, head_hidden, head_dropout)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_feature_map(x).mean(dim=(2, 3))

    def backbone_blocks(self) -> list[list[str]]:
        return stage_groups(self.backbone, "backbone.")


HYBRID_PARTS = ("inception", "xception")


def split_hybrid_pretrained(pretrained: Any) -> dict[str, Any]:
    """One `pretrained` value per hybrid backbone, from True/False, a dict, a pair or "a,b"."""
    if isinstance(pretrained, bool) or pretrained is None:
        return {part: bool(pretrained) for part in HYBRID_PARTS}
    if isinstance(pretrained, dict):
        unknown = set(pretrained) - set(HYBRID_PARTS)
        if unknown:
            raise ModelError(
                f"model 'hybrid': pretrained dict keys must be {', '.join(HYBRID_PARTS)}, got {sorted(unknown)}"
            )
        return {part: pretrained.get(part, False) for part in HYBRID_PARTS}
    if isinstance(pretrained, (str, os.PathLike)):
        pretrained = [p.strip() for p in str(pretrained).split(",")]
    if isinstance(pretrained, (list, tuple)) and len(pretrained) == 2:
        return dict(zip(HYBRID_PARTS, pretrained))
    raise ModelError(
        "model 'hybrid' needs one weights file per backbone: pretrained="
        "'inception.safetensors,xception.safetensors' or {'inception': ..., 'xception': ...}"
    )


class HybridClassifier(BloodcellModel):
    """Inception-V3 and Xception on the same image; pooled features concatenated -> head."""

    def __init__(
        self,
        num_classes: int,
        input_size: int,
        pretrained: Any = False,
        head_hidden: int = 512,
        head_dropout: float = 0.5,
        model_name: str = "hybrid",
    ) -> None:
        weights = split_hybrid_pretrained(pretrained)
        inception = create_backbone("inception_v3", weights["inception"], f"{model_name} (inception)")
        xception = create_backbone("legacy_xception", weights["xception"], f"{model_name} (xception)")
        mean, std = backbone_mean_std(inception)  # both published weights use the same (0.5, 0.5)
        super().__init__(num_classes, inception.num_features + xception.num_features, input_size, mean, std)
        self.inception = inception
        self.xception = xception
        self.head = make_head(self.num_features, num_classes, head_hidden, head_dropout)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        a = self.inception.forward_features(x).mean(dim=(2, 3))
        b = self.xception.forward_features(x).mean(dim=(2, 3))
        return torch.cat([a, b], dim=1)

    def backbone_blocks(self) -> list[list[str]]:
        # block k of the hybrid is block k of both backbones, so freezing stays symmetric
        a = stage_groups(self.inception, "inception.")
        b = stage_groups(self.xception, "xception.")
        return [a[i] + b[i] for i in range(min(len(a), len(b)))] + a[len(b) :] + b[len(a) :]


class SupConModel(TimmClassifier):
    """ResNet50V2 encoder + projection head (stage one) + linear classifier (stage two).

    `embed(x)` gives the L2-normalised projection trained with `supcon_loss`; `forward(x)` gives
    class logits from the pooled encoder features, trained once the encoder is frozen.
    """

    def __init__(
        self,
        num_classes: int,
        input_size: int,
        pretrained: Any = False,
        projection_hidden: int = 512,
        projection_dim: int = 128,
        head_hidden: int = 0,
        head_dropout: float = 0.0,
        model_name: str = "supcon",
    ) -> None:
        super().__init__("resnetv2_50", num_classes, input_size, pretrained, head_hidden, head_dropout, model_name)
        self.projection = nn.Sequential(
            nn.Linear(self.num_features, projection_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(projection_hidden, projection_dim),
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-length projection of the encoder features, shape (B, projection_dim)."""
        return F.normalize(self.projection(self.forward_features(x)), dim=1)

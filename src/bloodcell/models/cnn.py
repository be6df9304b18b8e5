"""The paper's plain Sequential CNN: conv blocks then dense layers."""

from __future__ import annotations

import torch
from torch import nn

from bloodcell.models.base import BloodcellModel, group_by_prefix, make_head


# The normalisation layer of each block. BatchNorm (the paper's) keeps the training lab's activation statistics,
# which another lab's stain moves; GroupNorm and LayerNorm (one group) normalise each image by its own statistics
# (Tsutsui et al. 2023: GroupNorm holds far better under a lab change).
NORMS = ("batch", "group", "layer")


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


def conv_block(in_channels: int, out_channels: int, norm: str = "batch") -> nn.Sequential:
    """Conv3x3 (same padding) -> norm -> ReLU -> MaxPool 2x2: halves the map."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        norm_layer(norm, out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class SequentialCNN(BloodcellModel):
    """4 conv blocks (32-64-128-128 filters) -> global average pooling -> dense head.

    Global average pooling instead of Keras' Flatten keeps the model valid at any input size
    >= 16 px (four 2x2 poolings) and keeps the dense layer small.
    """

    def __init__(
        self,
        num_classes: int,
        input_size: int,
        widths: tuple[int, ...] = (32, 64, 128, 128),
        head_hidden: int = 256,
        head_dropout: float = 0.5,
        norm: str = "batch",
    ) -> None:
        super().__init__(num_classes, num_features=widths[-1], input_size=input_size)
        if norm not in NORMS:
            raise ValueError(f"model.kwargs.norm must be one of {', '.join(NORMS)}, got {norm!r}")
        channels = (3, *widths)
        self.features = nn.Sequential(*[conv_block(a, b, norm) for a, b in zip(channels, channels[1:])])
        self.head = make_head(widths[-1], num_classes, head_hidden, head_dropout)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_feature_map(x).mean(dim=(2, 3))

    def backbone_blocks(self) -> list[list[str]]:
        return group_by_prefix(self, [[f"features.{i}"] for i in range(len(self.features))])

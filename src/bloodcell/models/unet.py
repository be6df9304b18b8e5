"""A U-Net encoder-decoder used as a classifier (the paper's U-Net row, run at 128 px)."""

from __future__ import annotations

import torch
from torch import nn

from bloodcell.errors import ModelError
from bloodcell.models.base import BloodcellModel, group_by_prefix, make_head


def double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    """Two Conv3x3 -> BatchNorm -> ReLU, as in Ronneberger et al. but with same padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNetClassifier(BloodcellModel):
    """Encoder 32-64-128-256, bottleneck 512, decoder with skip connections back to 32
    channels at full resolution -> global average pooling -> dense head.

    Four 2x2 poolings mean the input side must be a multiple of 16 so that each upsampled map
    matches its skip connection.
    """

    size_multiple = 16

    def __init__(
        self,
        num_classes: int,
        input_size: int,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        bottleneck: int = 512,
        head_hidden: int = 128,
        head_dropout: float = 0.5,
    ) -> None:
        super().__init__(num_classes, num_features=widths[0], input_size=input_size)
        channels = (3, *widths)
        self.encoders = nn.ModuleList(double_conv(a, b) for a, b in zip(channels, channels[1:]))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = double_conv(widths[-1], bottleneck)
        ups, decoders = [], []
        below = bottleneck
        for width in reversed(widths):
            ups.append(nn.ConvTranspose2d(below, width, kernel_size=2, stride=2))
            decoders.append(double_conv(2 * width, width))  # upsampled + skip, concatenated
            below = width
        self.ups = nn.ModuleList(ups)
        self.decoders = nn.ModuleList(decoders)
        self.head = make_head(widths[0], num_classes, head_hidden, head_dropout)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Full-resolution decoder map (B, widths[0], H, W)."""
        if x.shape[-1] % self.size_multiple or x.shape[-2] % self.size_multiple:
            raise ModelError(
                f"model '{self.model_name}' needs image sides that are multiples of "
                f"{self.size_multiple} px, got {tuple(x.shape[-2:])}"
            )
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, decoder, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = decoder(torch.cat([up(x), skip], dim=1))
        return x

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_feature_map(x).mean(dim=(2, 3))

    def backbone_blocks(self) -> list[list[str]]:
        levels = len(self.encoders)
        groups = [[f"encoders.{i}"] for i in range(levels)] + [["bottleneck"]]
        groups += [[f"ups.{i}", f"decoders.{i}"] for i in range(levels)]
        return group_by_prefix(self, groups)

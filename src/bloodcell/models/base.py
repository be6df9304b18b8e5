"""The face every bloodcell model shows: features, head, logits, freezing."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from bloodcell.errors import ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_head(in_features: int, num_classes: int, hidden: int = 0, dropout: float = 0.0) -> nn.Sequential:
    """Classifier head: [Linear(hidden) -> ReLU] -> [Dropout] -> Linear(num_classes).

    The last module is always the Linear that produces the logits; checkpoints rely on that.

    Args:
        in_features: the width of the pooled features the head reads.
        num_classes: the number of logits.
        hidden: the hidden Linear's width; 0: none (a linear classifier, with optional dropout in front).
        dropout: the dropout rate before the last Linear; 0: no Dropout module.
    """
    layers: list[nn.Module] = []
    width = in_features
    if hidden:
        layers += [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
        width = hidden
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class BloodcellModel(nn.Module):
    """Base class: `forward(x) = forward_head(forward_features(x))`.

    Subclasses build `self.head` (an nn.Sequential ending in the logits Linear), set
    `num_features` and implement `forward_features` (pooled features, shape (B, num_features))
    and `backbone_blocks` (parameter names grouped by stage, input side first).
    """

    def __init__(
        self,
        num_classes: int,
        num_features: int,
        input_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.num_features = int(num_features)
        self.input_size = int(input_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.model_name = type(self).__name__  # create_model overwrites with the registry name
        self.model_kwargs: dict = {}  # options create_model needs to rebuild this model

    # ------------------------------------------------------------------ forward

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # Models with a spatial feature map also define `forward_feature_map(x) -> (B, C, h, w)` whose mean over
    # (h, w) is `forward_features(x)`; the OOD score then also sees the map's centre (bloodcell.models.ood).

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def default_cfg(self) -> dict:
        """Preprocessing a caller needs: input size (C, H, W), normalisation, class count."""
        return {
            "model_name": self.model_name,
            "input_size": (3, self.input_size, self.input_size),
            "mean": self.mean,
            "std": self.std,
            "num_classes": self.num_classes,
        }

    # ------------------------------------------------------------------ freezing

    def backbone_blocks(self) -> list[list[str]]:
        """Parameter names grouped by backbone block (stage), input side first."""
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        return len(self.backbone_blocks())

    def freeze(self, blocks: int | None = None, prefixes: Iterable[str] | None = None) -> list[str]:
        """Stop gradients to part of the model; return the names of the parameters frozen.

        - `blocks=N`: the first N backbone blocks (see `backbone_blocks`); never the head.
        - `prefixes=[...]`: every parameter whose name starts with one of the prefixes.
        - neither: the whole backbone (all blocks), leaving the head trainable.

        Frozen BatchNorm layers also stay in eval mode while the model trains (as Keras does
        for `trainable=False`), so fine-tuning does not drift their running statistics.
        """
        groups = self.backbone_blocks()
        names: set[str] = set()
        if blocks is None and prefixes is None:
            blocks = len(groups)
        if blocks is not None:
            if not 0 <= blocks <= len(groups):
                raise ModelError(
                    f"model '{self.model_name}' has {len(groups)} backbone blocks: "
                    f"freeze(blocks=...) takes 0 to {len(groups)}, got {blocks}"
                )
            for group in groups[:blocks]:
                names.update(group)
        if prefixes is not None:
            if isinstance(prefixes, str):  # a lone string would otherwise freeze by each letter
                prefixes = [prefixes]
            all_names = [n for n, _ in self.named_parameters()]
            for prefix in prefixes:
                hits = [n for n in all_names if n.startswith(prefix)]
                if not hits:
                    raise ModelError(
                        f"model '{self.model_name}' has no parameter starting with '{prefix}'; "
                        f"top-level names: {', '.join(sorted({n.split('.')[0] for n in all_names}))}"
                    )
                names.update(hits)
        for name, param in self.named_parameters():
            if name in names:
                param.requires_grad_(False)
        self.train(self.training)  # re-apply the BatchNorm rule to the new frozen set
        return sorted(names)

    def unfreeze(self) -> None:
        """Make every parameter trainable again."""
        for param in self.parameters():
            param.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "BloodcellModel":
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    params = list(module.parameters(recurse=False))
                    if params and not any(p.requires_grad for p in params):
                        module.eval()
        return self


def group_by_prefix(model: nn.Module, prefixes: Sequence[Sequence[str]]) -> list[list[str]]:
    """Parameter names of `model` grouped by lists of module prefixes (one list per block)."""
    names = [n for n, _ in model.named_parameters()]
    return [[n for n in names if any(n.startswith(p + ".") for p in group)] for group in prefixes]

"""The table of models by name, and the decorator that fills it.

Nothing here imports a model: the zoo (bloodcell.models.zoo) registers itself with `register_model`, and the factory
(bloodcell.models.registry: get_spec, list_models, create_model) imports the zoo before its first look-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

_REGISTRY: dict[str, "ModelSpec"] = {}


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model and what it needs."""

    name: str
    builder: Callable[..., Any]
    paper_row: str
    default_input_size: int
    min_input_size: int
    input_multiple: int
    timm_backbones: tuple[str, ...]
    head: str


def register_model(
    name: str,
    *,
    paper_row: str,
    default_input_size: int = 224,
    min_input_size: int = 32,
    input_multiple: int = 1,
    timm_backbones: tuple[str, ...] = (),
    head: str = "",
) -> Callable:
    """Decorator: register `builder(num_classes, input_size, pretrained, **options)` as `name`.

    Args:
        name: the model's name (bloodcell models, model.name); registering it twice is a ValueError.
        paper_row: the row(s) of the paper's Table 2 the model stands for.
        default_input_size: the square input side in pixels when the config gives none.
        min_input_size: the smallest input side in pixels the model accepts.
        input_multiple: the input side must be a multiple of this (1: any).
        timm_backbones: the timm architectures whose ImageNet weights the model loads (empty: none).
        head: the classifier head, in words, as `bloodcell models` describes it.
    """

    def decorate(builder: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"model name '{name}' registered twice")
        _REGISTRY[name] = ModelSpec(
            name=name,
            builder=builder,
            paper_row=paper_row,
            default_input_size=default_input_size,
            min_input_size=min_input_size,
            input_multiple=input_multiple,
            timm_backbones=tuple(timm_backbones),
            head=head,
        )
        return builder

    return decorate

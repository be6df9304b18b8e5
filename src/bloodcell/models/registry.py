"""Model registry: names -> builder functions plus what the paper and the CLI need to know.

The table and `register_model` live in bloodcell.models.specs, which imports no model; this module is the factory
that looks models up, and it imports the zoo (the built-in models) before its first look-up.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass
from typing import Any, Callable

from bloodcell.errors import ModelError
from bloodcell.models.specs import _REGISTRY, ModelSpec, register_model  # noqa: F401  (register_model: its old home)


@dataclass(frozen=True)
class ModelInfo:
    """What `bloodcell models` shows for one model (params counted for 8 classes)."""

    name: str
    paper_row: str
    params: int
    input_size: int
    min_input_size: int
    input_multiple: int
    pretrained_available: bool
    timm_backbones: tuple[str, ...]
    head: str

    def to_dict(self) -> dict:
        out = asdict(self)
        out["timm_backbones"] = list(self.timm_backbones)
        return out


def _specs() -> dict[str, ModelSpec]:
    import bloodcell.models.zoo  # noqa: F401  (registers the built-in models on first use)

    return _REGISTRY


def get_spec(name: str) -> ModelSpec:
    specs = _specs()
    if name not in specs:
        raise ModelError(f"unknown model '{name}'; known models: {', '.join(specs)}")
    return specs[name]


def list_models() -> list[str]:
    """Registered model names, in registration (paper table) order."""
    return list(_specs())


def check_input_size(spec: ModelSpec, input_size: Any) -> int:
    """Return a valid square input size for `spec` or raise ModelError."""
    if isinstance(input_size, bool) or not isinstance(input_size, int):
        raise ModelError(f"model '{spec.name}': input_size must be an integer (pixels), got {input_size!r}")
    if input_size < spec.min_input_size:
        raise ModelError(f"model '{spec.name}' needs input_size >= {spec.min_input_size} px, got {input_size}")
    if input_size % spec.input_multiple:
        raise ModelError(
            f"model '{spec.name}' needs input_size to be a multiple of {spec.input_multiple} px "
            f"(its decoder joins encoder maps of matching size), got {input_size}"
        )
    return input_size


# The model options a model.json may carry (its model_kwargs), each with the plain values it may take. A model folder
# is data: nothing in it may name a file, a URL or weights to fetch (pretrained, checkpoint_path, ...), so an option
# is accepted only when the model's builder takes it AND it is listed here with a value of the listed kind.
def _int(lo: int, hi: int):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _float(lo: float, hi: float):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi  # nan fails both


MODEL_OPTIONS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "head_hidden": (_int(0, 65536), "an integer 0..65536"),
    "head_dropout": (_float(0.0, 1.0), "a number 0..1"),
    "projection_hidden": (_int(1, 65536), "an integer 1..65536"),
    "projection_dim": (_int(1, 65536), "an integer 1..65536"),
    "norm": (lambda v: v in ("batch", "group", "layer"), "one of batch, group, layer"),
    "widths": (
        lambda v: isinstance(v, (list, tuple)) and 1 <= len(v) <= 8 and all(_int(1, 4096)(w) for w in v),
        "a list of 1..8 integers 1..4096",
    ),
}


def check_model_options(name: str, options: Any, where: str) -> dict:
    """`options` (a model.json's model_kwargs) checked before anything is built: a dict whose keys the builder of model
    `name` takes and MODEL_OPTIONS lists, with plain values of the listed kind; else a one-line ModelError naming
    `where` and the key. Never passes on pretrained / checkpoint_path / file / url or any other key."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ModelError(f"{where} must be an object of model options, got {type(options).__name__}")
    spec = get_spec(name)
    takes = {
        k
        for k, p in inspect.signature(spec.builder).parameters.items()
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
    allowed = sorted((takes & set(MODEL_OPTIONS)))
    for key, value in options.items():
        if key not in allowed:
            raise ModelError(
                f"{where}: '{key}' is not an option a model folder may set for '{name}' "
                f"(allowed: {', '.join(allowed) or 'none'})"
            )
        ok, kind = MODEL_OPTIONS[key]
        if not ok(value):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ModelError(f"{where}: '{key}' must be {kind}, got {shown}")
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in options.items()}


def create_model(
    name: str,
    num_classes: int = 8,
    pretrained: Any = False,
    input_size: int | None = None,
    **kwargs: Any,
):
    """Build a registered model.

    Args:
        name: a registered model's name (list_models).
        num_classes: the number of output classes (a positive integer).
        pretrained: False; True for timm's published ImageNet weights (needs internet or a warm
            cache); or a path to a local weights file (safetensors, or a state dict read with
            `torch.load(weights_only=True)`) whose keys are timm's names for the backbone.
        input_size: the square input side in pixels, checked against the model's minimum and multiple;
            None: the model's default.
        kwargs: model options (e.g. `head_hidden`, `head_dropout`), see docs/models.md.
    """
    spec = get_spec(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"model '{name}': num_classes must be a positive integer, got {num_classes!r}")
    input_size = check_input_size(spec, spec.default_input_size if input_size is None else input_size)
    options = inspect.signature(spec.builder).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in options.values())
    known = [k for k in options if k not in ("num_classes", "input_size", "pretrained")]
    unknown = [k for k in kwargs if k not in known]
    if unknown and not accepts_any:
        raise ModelError(
            f"model '{name}' has no option {', '.join(map(repr, unknown))}; its options: {', '.join(known) or 'none'}"
        )
    model = spec.builder(num_classes=num_classes, input_size=input_size, pretrained=pretrained, **kwargs)
    model.model_name = name
    model.model_kwargs = dict(kwargs)
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=None)
def model_info(name: str) -> ModelInfo:
    """Facts about a model; builds it once (no weights) to count its parameters for 8 classes."""
    import timm

    spec = get_spec(name)
    model = create_model(name, num_classes=8)
    available = bool(spec.timm_backbones) and all(timm.is_model_pretrained(b) for b in spec.timm_backbones)
    return ModelInfo(
        name=name,
        paper_row=spec.paper_row,
        params=count_params(model),
        input_size=spec.default_input_size,
        min_input_size=spec.min_input_size,
        input_multiple=spec.input_multiple,
        pretrained_available=available,
        timm_backbones=spec.timm_backbones,
        head=spec.head,
    )

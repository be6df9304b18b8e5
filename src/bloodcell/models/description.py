"""The one owner of a model's description: model.json, and the `.onnx.json` sidecar of an exported model.

Like torchvision's `Weights` and timm's `pretrained_cfg` + `resolve_data_config`: one typed description of a model,
read, written and updated here only. Without PyTorch (the light install reads it): pydantic, json and pathlib.

The file keeps its flat layout (what bloodcell has always written; old model folders and the bundled ones load
unchanged). Its keys group into sections, each typed below:

    identity       format, format_version, model_name, num_classes, class_names, input_size, mean, std, model_kwargs
    preprocess     Preprocess: input_size, interpolation, white_balance, normalise, field_of_view
    calibration    temperature, review_threshold, test_metrics
    ood            OodSection: the out-of-distribution score's method, file and threshold
    onnx           OnnxSection: the exported graph (a sidecar, or model.json when the folder ships model.onnx)
    quantization   Quantization: an int8 export's calibration and check
    provenance     training_config, data_fingerprint, split_seed, epochs_trained, accelerator, precision,
                   bloodcell_version, bundled
    labs           per lab: figures as is and adapted
    adaptation     Adaptation: `bloodcell adapt`'s record

A key no section knows (a newer writer's, a lab's own note) is kept as it was on every round trip, and an update of
one section leaves every other key's bytes as they were. How a model wants its images is resolved once, here
(`ModelDescription.preprocessing`), so no reader carries a fallback of its own. A bad value is a one-line ModelError
naming the file and the key.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from bloodcell.data.fields import DEFAULT_VIEW
from bloodcell.data.images import INTERPOLATIONS, WHITE_BALANCES
from bloodcell.errors import ModelError
from bloodcell.io import write_json
from bloodcell.models.seal import member, seal

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "model.json"
ONNX_SIDECAR_SUFFIX = ".json"  # model.onnx -> model.onnx.json
FORMAT = "bloodcell-checkpoint"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".bin", ".tar"}

DEFAULT_INTERPOLATION = "bilinear"
DEFAULT_WHITE_BALANCE = "none"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CHECKPOINT_REQUIRED = ("model_name", "num_classes")  # what rebuilds the network
SIDECAR_REQUIRED = ("num_classes", "input_size")  # what an ONNX session needs beside the graph


# ---------------------------------------------------------------------------------------------- the sections


class Section(BaseModel):
    """A section: its known keys typed; any other key is allowed and kept as it was."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())


def _finite(value: float | None, key: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {value}")
    return value


class Preprocess(Section):
    """What every path that feeds the model must do to an image (model.json `preprocess`)."""

    input_size: int | None = Field(default=None, ge=1)
    interpolation: str | None = None
    white_balance: str | None = None
    normalise: str | None = None
    field_of_view: dict[str, float] | None = None

    @field_validator("interpolation")
    @classmethod
    def _known_interpolation(cls, value: str | None) -> str | None:
        if value is not None and value not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation '{value}'; choose one of {', '.join(INTERPOLATIONS)}")
        return value

    @field_validator("white_balance")
    @classmethod
    def _known_white_balance(cls, value: str | None) -> str | None:
        if value is not None and value not in WHITE_BALANCES:
            raise ValueError(f"unknown white_balance '{value}'; choose one of {', '.join(WHITE_BALANCES)}")
        return value


class OodSection(Section):
    """The out-of-distribution score (bloodcell.models.ood): an image scoring above `threshold` is flagged."""

    method: str | None = None
    file: str | None = None  # the statistics, beside model.json (default ood.safetensors)
    threshold: float
    false_alarm_target: float | None = None
    fitted_on: str | None = None

    @field_validator("threshold")
    @classmethod
    def _finite_threshold(cls, value: float) -> float:
        return _finite(value, "the ood threshold")


class OnnxSection(Section):
    """An ONNX export of the model: how it was made and how far it is from PyTorch."""

    file: str | None = None  # set when model.json describes a model.onnx in its own folder
    opset: int | None = None
    exporter: str | None = None
    exported_from: str | dict[str, str] | None = None  # the run folder, or the weights' SHA-256 by file name
    fallback_reason: str | None = None
    input: str | None = None
    input_layout: str | None = None
    output: str | None = None
    outputs: list[str] | None = None
    max_abs_diff: float | None = None
    checked_on: str | None = None


class Quantization(Section):
    """An int8 export's calibration and its agreement with fp32 (bloodcell.infer.quantize)."""

    mode: str | None = None
    calibration: str | None = None
    check: dict[str, Any] | None = None


class Adaptation(Section):
    """What `bloodcell adapt` did to the source model (bloodcell.infer.adapt)."""

    method: str | None = None
    folder: str | None = None
    images: int | None = None
    images_found: int | None = None
    unreadable: int | None = None
    norm_layers: int | None = None
    date: str | None = None
    source: dict[str, Any] | None = None
    weights_sha256: str | None = None
    ood_fraction_before: float | None = None
    ood_fraction_after: float | None = None
    predicted_after: dict[str, int] | None = None
    warnings: list[str] = Field(default_factory=list)
    bloodcell_version: str | None = None


class LabFigures(Section):
    """One lab's headline figures (bloodcell.evaluate.labs.lab_summary)."""

    seen: bool | None = None
    part: str | None = None
    as_is: dict[str, Any] | None = None
    adapted: dict[str, Any] | None = None


SECTIONS: dict[str, type[Section]] = {
    "preprocess": Preprocess,
    "ood": OodSection,
    "onnx": OnnxSection,
    "quantization": Quantization,
    "adaptation": Adaptation,
}


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its images, resolved once: preprocess section, else the training config, else defaults."""

    input_size: int
    interpolation: str
    white_balance: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    normalise: str
    field_of_view: dict[str, float]


class Provenance(Section):
    """Where a model came from: top-level keys of model.json, read as one section (see `provenance`)."""

    training_config: dict[str, Any] | None = None
    data_fingerprint: str | None = None
    split_seed: int | None = None
    epochs_trained: int | None = None
    accelerator: str | None = None
    precision: str | int | None = None
    bloodcell_version: str | None = None


# ---------------------------------------------------------------------------------------------- the description


class ModelDescription(Section):
    """A model's description, typed; `to_dict()` gives the file's object back, unknown keys and order kept."""

    format: str | None = None
    format_version: int | None = None
    model_name: str | None = None
    num_classes: int = Field(ge=1)
    class_names: list[str] | None = None
    input_size: int | None = Field(default=None, ge=1)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    model_kwargs: Any = None  # checked by models.registry.check_model_options, which knows each model's options
    temperature: float | None = None
    review_threshold: float | None = None
    test_metrics: dict[str, Any] | None = None
    preprocess: Preprocess | None = None
    ood: OodSection | None = None
    onnx: OnnxSection | None = None
    quantization: Quantization | None = None
    adaptation: Adaptation | None = None
    labs: dict[str, LabFigures] | None = None
    bundled: dict[str, Any] | None = None
    training_config: dict[str, Any] | None = None
    data_fingerprint: str | None = None
    split_seed: int | None = None
    epochs_trained: int | None = None
    accelerator: str | None = None
    precision: str | int | None = None
    bloodcell_version: str | None = None

    _raw: dict = PrivateAttr(default_factory=dict)
    _source: str = PrivateAttr(default="")

    @model_validator(mode="before")
    @classmethod
    def _empty_sections_are_absent(cls, data: Any) -> Any:
        """`"ood": {}` or null has always meant "no OOD score"; likewise for the other sections."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if not (k in SECTIONS and not v)}
        return data

    @field_validator("class_names", mode="before")
    @classmethod
    def _names_as_text(cls, value: Any) -> Any:
        return [str(v) for v in value] if isinstance(value, list) else value

    @field_validator("temperature")
    @classmethod
    def _positive_temperature(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"temperature must be > 0, got {value}")
        return value

    @field_validator("review_threshold")
    @classmethod
    def _threshold_in_range(cls, value: float | None) -> float | None:
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"must be in (0, 1], got {value}")
        return value

    # ------------------------------------------------------------------ views

    @property
    def source(self) -> str:
        """The file this description was read from ('' for one built in memory)."""
        return self._source

    @property
    def names(self) -> list[str]:
        """The class names, or class_0 ... for a model saved without them."""
        return list(self.class_names) if self.class_names else [f"class_{i}" for i in range(self.num_classes)]

    @property
    def preprocessing(self) -> Preprocessing:
        """How the model wants its images (the one place that resolves it, like timm's resolve_data_config)."""
        pre = self.preprocess or Preprocess()
        data = (self.training_config or {}).get("data") or {}
        size = self.input_size if self.input_size is not None else pre.input_size
        if size is None:
            raise ModelError(f"{self._where()}lacks input_size")
        return Preprocessing(
            input_size=int(size),
            interpolation=pre.interpolation or data.get("interpolation") or DEFAULT_INTERPOLATION,
            white_balance=pre.white_balance or data.get("white_balance") or DEFAULT_WHITE_BALANCE,
            mean=tuple(self.mean or IMAGENET_MEAN),
            std=tuple(self.std or IMAGENET_STD),
            normalise=pre.normalise or "ImageNet mean/std",
            field_of_view={**DEFAULT_VIEW, **(pre.field_of_view or {})},  # PBC's, unless the model says
        )

    @property
    def provenance(self) -> Provenance:
        return Provenance(**{key: getattr(self, key) for key in Provenance.model_fields})

    def to_dict(self) -> dict:
        """The description as the file holds it (a copy): every key, known or not, in its order."""
        return copy.deepcopy(self._raw)

    def replace(self, **sections: Any) -> "ModelDescription":
        """A new description with these top-level keys set (None removes one); the rest kept as they are.

        Args:
            **sections: key -> value as the file holds it (a dict for a section, a Section, or a plain value).
        """
        raw = self.to_dict()
        for key, value in sections.items():
            if value is None:
                raw.pop(key, None)
            else:
                raw[key] = value.model_dump(mode="json", exclude_unset=True) if isinstance(value, BaseModel) else value
        return parse_description(raw, self._source)

    def _where(self) -> str:
        return f"{self._source}: " if self._source else ""


def parse_description(data: Any, source: str | os.PathLike = "", required: tuple[str, ...] = ()) -> ModelDescription:
    """`data` (a model.json object) checked and typed; a one-line ModelError naming `source` and the key otherwise.

    Args:
        data: the JSON object as read (kept as it is for writing back).
        source: what to name in errors: the file, or 'checkpoint metadata FILE'.
        required: top-level keys that must be there (e.g. CHECKPOINT_REQUIRED), checked first.
    """
    name = str(source) or "the model description"
    if not isinstance(data, dict) or any(key not in data for key in required):
        raise ModelError(f"{name} lacks {' / '.join(required)}")
    try:
        description = ModelDescription.model_validate(data)
    except ValidationError as exc:
        raise ModelError(f"{name}: {_first_problem(exc)}") from None
    names = description.class_names
    if names is not None and len(names) != description.num_classes:
        raise ModelError(f"{name} lists {len(names)} class_names but num_classes is {description.num_classes}")
    description._raw = copy.deepcopy(data)
    description._source = str(source)
    return description


def provenance(meta: dict | ModelDescription, source: str | os.PathLike = "") -> Provenance:
    """Where a model came from, from its description or from a dict holding only those keys (a partial model.json)."""
    if isinstance(meta, ModelDescription):
        return meta.provenance
    try:
        return Provenance.model_validate({key: meta[key] for key in Provenance.model_fields if key in meta})
    except ValidationError as exc:
        raise ModelError(f"{source or 'the model description'}: {_first_problem(exc)}") from None


def _first_problem(exc: ValidationError) -> str:
    """'key.sub: what is wrong' of pydantic's first error, on one line."""
    error = exc.errors()[0]
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{key}: {message}".replace("\n", " ")


# ---------------------------------------------------------------------------------------------- files


def locate(path: Path) -> tuple[Path, Path]:
    """(weights file, metadata file) for a checkpoint folder or its .safetensors file."""
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise ModelError(
            f"refusing to load {path}: pickle-based files can run code when loaded; "
            f"bloodcell checkpoints are a folder with {WEIGHTS_FILE} + {METADATA_FILE}"
        )
    if path.is_dir():
        return path / WEIGHTS_FILE, path / METADATA_FILE
    if path.suffix == ".safetensors":
        beside = path.with_suffix(".json")
        return path, beside if beside.is_file() else path.parent / METADATA_FILE
    if not path.exists():
        raise ModelError(f"checkpoint not found: {path}")
    raise ModelError(f"{path} is not a checkpoint: expected a folder with {WEIGHTS_FILE} + {METADATA_FILE}")


def read_json_object(path: Path, required: tuple[str, ...], what: str = "") -> dict:
    """The JSON object in `path`, holding the `required` keys, or a one-line ModelError naming the file."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{what}{path} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or any(key not in meta for key in required):
        raise ModelError(f"{what}{path} lacks {' / '.join(required)}")
    return meta


def read_description(path: str | os.PathLike) -> ModelDescription:
    """The description of a checkpoint: a model folder, its .safetensors file, or a model.json file itself."""
    path = Path(path)
    meta_path = path if path.suffix == ".json" else locate(path)[1]
    if not meta_path.is_file():
        raise ModelError(f"checkpoint metadata not found: {meta_path} (written by save_checkpoint)")
    what = "checkpoint metadata "
    data = read_json_object(meta_path, CHECKPOINT_REQUIRED, what)
    return parse_description(data, f"{what}{meta_path}", CHECKPOINT_REQUIRED)


def onnx_sidecar(path: str | os.PathLike) -> Path:
    """The sidecar of an .onnx file: `<file>.onnx.json`."""
    path = Path(path)
    return path.with_name(path.name + ONNX_SIDECAR_SUFFIX)


def onnx_description_file(path: str | os.PathLike) -> Path:
    """The file describing the .onnx `path`: its sidecar, else the model.json beside it (a folder shipping both
    backends, like the bundled one, describes itself once)."""
    path = Path(path)
    sidecar = onnx_sidecar(path)
    if not sidecar.is_file() and path.with_name(METADATA_FILE).is_file():
        return path.with_name(METADATA_FILE)
    return sidecar


def read_onnx_description(path: str | os.PathLike) -> ModelDescription:
    """The description of an exported .onnx file: its `<file>.onnx.json`, else the model.json beside it when that
    names this file in its `onnx` section."""
    path = Path(path)
    described_by = onnx_description_file(path)
    if not described_by.is_file():
        raise ModelError(f"{path}: metadata sidecar {onnx_sidecar(path)} not found (written by 'bloodcell export')")
    description = parse_description(read_json_object(described_by, SIDECAR_REQUIRED), described_by, SIDECAR_REQUIRED)
    for key, section in (("onnx", description.onnx), ("ood", description.ood)):
        if section is not None and section.file not in (None, ""):
            member(path.parent, section.file, f"{key}.file", described_by)
    if described_by.name == METADATA_FILE and (description.onnx is None or description.onnx.file != path.name):
        raise ModelError(
            f"{path}: no sidecar {onnx_sidecar(path).name}, and {described_by} does not describe it "
            f"(no onnx.file '{path.name}')"
        )
    return description


def write_sealed_json(path: str | os.PathLike, meta: dict) -> Path:
    """Write a model folder's description (model.json, detector.json, an .onnx.json sidecar) and re-seal the folder
    (bloodcell.models.seal): every writer of a model folder goes through here, so no written model is left unsealed."""
    path = Path(path)
    write_json(path, meta)
    seal(path.parent)
    return path


def write_description(path: str | os.PathLike, description: ModelDescription | dict) -> Path:
    """Check and write a description, then re-seal its folder.

    Args:
        path: a model folder (its model.json is written) or the .json file itself (an .onnx.json sidecar).
        description: a ModelDescription, or the file's object as a dict (checked before anything is written).
    """
    target = _description_file(path)
    if not isinstance(description, ModelDescription):
        description = parse_description(description, target)
    return write_sealed_json(target, description.to_dict())


def update_description(path: str | os.PathLike, **sections: Any) -> ModelDescription:
    """Set some top-level keys of a model's description (None removes one) and write it back, re-sealed; every
    other key keeps its bytes. Returns the new description.

    Args:
        path: a model folder or its model.json.
        **sections: e.g. ood={...}, temperature=0.8, labs=None.
    """
    target = _description_file(path)
    description = read_description(target).replace(**sections)
    write_sealed_json(target, description.to_dict())
    return description


def _description_file(path: str | os.PathLike) -> Path:
    """A .json path as it is; a model folder's model.json (the folder may not exist yet)."""
    path = Path(path)
    return path if path.suffix == ".json" else path / METADATA_FILE

"""Run configuration: YAML validated by pydantic. A resolved config fully describes a run.

Unknown keys and wrong types are errors naming the key (`ConfigError`), and `--set a.b=c` overrides any key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bloodcell import io
from bloodcell.errors import ConfigError


def _fits_float32(lr: float) -> float:
    # optimizers keep the learning rate in float32 state: a larger one would fail inside torch with a traceback
    if lr > 3.4e38:
        raise ValueError(f"{lr:g} is beyond float32's range (at most 3.4e+38)")
    return lr


LearningRate = Annotated[float, AfterValidator(_fits_float32)]


class StrictSection(BaseModel):
    """A config section: unknown keys and wrong types are errors (the detector's sections too:
    bloodcell.detect.config)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_Strict = StrictSection


class ModelConfig(_Strict):
    name: str = "cnn"
    # None/False: trained from scratch. True: timm's ImageNet weights (needs internet). A path: a local file.
    pretrained: Union[bool, str, None] = None
    kwargs: dict[str, Any] = Field(default_factory=dict)


class SplitSection(_Strict):
    seed: Optional[int] = None  # None: the run's seed
    test_size: float = Field(0.3, ge=0.0, lt=1.0)
    val_size: float = Field(0.2, ge=0.0, lt=1.0)
    dedup: bool = True
    # how the training part is ordered and validation carved out; see bloodcell.data.split for each
    order: Literal["stratified", "keras", "keras_shuffled", "sorted"] = "stratified"

    @model_validator(mode="before")
    @classmethod
    def _legacy_shuffle(cls, raw):
        # configs written before `order` existed said `shuffle: true|false`
        if isinstance(raw, dict) and "shuffle" in raw:
            raw = dict(raw)
            shuffle = raw.pop("shuffle")
            if not isinstance(shuffle, bool):
                raise ValueError(f"shuffle must be true or false (or use order), got {shuffle!r}")
            raw.setdefault("order", "stratified" if shuffle else "sorted")
        return raw


class LabSource(_Strict):
    """Labelled cells of one lab (bloodcell.data.labs): a class-per-folder dataset or CSV, or a smear-photograph set
    in Pascal VOC layout with wbc_subtypes.csv beside it (BCCD), whose white cells are cut out by the field path's
    crop rule and whose own split is kept."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    root: str
    parts: Optional[list[Literal["train", "val", "test"]]] = None  # None: all; a folder has parts only when trained on
    classes: Optional[list[str]] = (
        None  # keep these classes only (e.g. the white-cell classes a model knows); None: all
    )


class DataConfig(_Strict):
    root: Optional[str] = None  # a class-per-folder dataset, or a CSV of path,label[,group]; `--data` sets it
    npz: Optional[str] = None  # or a MedMNIST .npz (its own train/val/test parts are used)
    input_size: int = Field(224, ge=8, le=1024)
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "area"] = "nearest"
    # "background": each image's colour cast is removed by scaling its channels so its background is white
    # (bloodcell.data.images.balance_background), in training and in every path that feeds the model
    white_balance: Literal["none", "background"] = "none"
    split: SplitSection = Field(default_factory=SplitSection)
    max_pixels: int = 40_000_000
    # More labs trained on: each is split (its own split, or the run's rule); its train and val parts join ours and
    # its test part is scored on its own (metrics.json: labs.<name>), never mixed into the main test part.
    labs: list[LabSource] = Field(default_factory=list)


class AugmentConfig(_Strict):
    """Augmentation for single-cell images, applied in batches on the training device. Off by default (the paper had
    none)."""

    enabled: bool = False
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True  # cells have no up: 0/90/180/270 degree turns are all valid
    degrees: float = Field(10.0, ge=0, le=180)
    translate: float = Field(0.05, ge=0, le=0.5)
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = Field(0.1, ge=0, le=1)
    contrast: float = Field(0.1, ge=0, le=1)
    saturation: float = Field(0.1, ge=0, le=1)
    hue: float = Field(0.02, ge=0, le=0.5)
    # Shifts between labs (microscope, camera, stain); all off by default. See bloodcell.train.augment.
    stain: float = Field(0.0, ge=0, le=1)  # haematoxylin / eosin / DAB amounts scaled by U(1 - s, 1 + s) per sample
    stain_bias: float = Field(0.0, ge=0, le=1)  # ... and shifted by U(-b, b)
    white_balance: float = Field(0.0, ge=0, le=1)  # per-channel gains U(1 - w, 1 + w)
    color_matrix: float = Field(0.0, ge=0, le=1)  # RGB mixed by I + U(-m, m) off the diagonal
    gamma: float = Field(0.0, ge=0, le=2)  # x ** exp(U(-g, g))
    grayscale: float = Field(0.0, ge=0, le=1)  # probability of dropping colour altogether
    blur: float = Field(0.0, ge=0, le=8)  # Gaussian blur sigma U(0, blur) pixels at input size, on half the samples
    noise: float = Field(0.0, ge=0, le=0.5)  # Gaussian pixel noise, sd U(0, noise)

    @field_validator("scale")
    @classmethod
    def _scale_order(cls, v):
        if not 0 < v[0] <= v[1]:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {list(v)}")
        return v


class SmoteConfig(_Strict):
    enabled: bool = False
    size: int = Field(128, ge=8, le=512)  # images are flattened at this size (the paper: 128 px)
    k_neighbors: int = Field(5, ge=1)
    max_memory_gb: Optional[float] = None  # refuse beyond this; default: half of physical memory


class StageConfig(_Strict):
    """One stage of a staged schedule. Unset fields inherit from `train`."""

    epochs: int = Field(ge=1)
    lr: Optional[LearningRate] = Field(None, gt=0)
    optimizer: Optional[Literal["adam", "adamw", "sgd", "rmsprop"]] = None
    objective: Literal["ce", "supcon"] = "ce"
    freeze_blocks: Optional[int] = Field(None, ge=0)
    freeze_prefixes: Optional[list[str]] = None
    freeze_encoder: bool = False  # SupCon stage 2: everything but the classifier head is frozen
    schedule: Optional[Literal["none", "step", "cosine"]] = None


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)  # per process: under DDP each of the world-size processes takes this many
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    lr: LearningRate = Field(1e-3, gt=0)
    # `linear`: lr x world size under DDP (the global batch grows with the processes; Goyal et al. 2017)
    lr_scaling: Literal["none", "linear"] = "none"
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # Exponential moving average of the weights, updated after every optimizer step (e.g. 0.999); validation, the
    # saved model and everything after training use the averaged weights.
    ema_decay: Optional[float] = Field(None, gt=0, lt=1)
    class_weights: Literal["none", "balanced"] = "none"
    schedule: Literal["none", "step", "cosine"] = "none"
    step_size: int = Field(10, ge=1)  # epochs between decays for `step`
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)
    early_stopping_patience: Optional[int] = Field(None, ge=1)  # on validation loss
    epoch_shuffle: bool = True  # reshuffle training batches every epoch
    freeze_blocks: Optional[int] = Field(None, ge=0)
    freeze_prefixes: list[str] = Field(default_factory=list)
    stages: Optional[list[StageConfig]] = None  # staged schedule; `epochs` is then their sum
    supcon_temperature: float = Field(0.1, gt=0)
    # Lightning: where and how to run
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "auto"
    devices: Union[int, str, list[int]] = "auto"
    num_nodes: int = Field(1, ge=1)
    strategy: str = "auto"
    precision: Literal["auto", "32", "32-true", "bf16-mixed", "16-mixed"] = "auto"
    channels_last: bool = True  # where measured faster: every zoo model, but not VGG-16 on a CPU with AVX2 alone
    compile: bool = False
    workers: Optional[int] = Field(None, ge=0)  # data loader worker processes; None: automatic
    # Keep the whole uint8 image array in accelerator memory and gather batches there (no per-image Python).
    device_cache: Literal["auto", "on", "off"] = "auto"
    # A Lightning logger beside history.csv (which is always written): csv under <run>/logs, tensorboard, mlflow
    logger: Literal["none", "csv", "tensorboard", "mlflow"] = "none"

    @model_validator(mode="after")
    def _stage_objectives(self) -> "TrainConfig":
        if self.stages:
            self.__dict__["epochs"] = sum(s.epochs for s in self.stages)
        return self

    def resolved_stages(self) -> list[StageConfig]:
        if self.stages:
            return list(self.stages)
        return [StageConfig(epochs=self.epochs)]


class CVConfig(_Strict):
    folds: Optional[int] = Field(None, ge=2)


class EvalConfig(_Strict):
    bootstrap: int = Field(1000, ge=0)
    grid_images: int = Field(16, ge=0)
    review_threshold: Optional[float] = Field(None, gt=0, lt=1)  # None: chosen on validation data
    # Share of ordinary (validation) cells the out-of-distribution flag may raise; sets its threshold.
    ood_false_alarm: float = Field(0.01, gt=0, lt=0.5)
    # Labs the run never sees, scored after training (metrics.json: labs.<name>; labs/<name>/ in the run):
    # accuracy over their classes, macro F1, the kept fraction and its accuracy; as is and after re-estimating the
    # normalisation statistics on the lab's own unlabelled images (`adapt`).
    labs: list[LabSource] = Field(default_factory=list)
    adapt: bool = True


class RunConfig(_Strict):
    name: Optional[str] = None
    seed: int = 42
    seeds: Optional[list[int]] = None  # several seeds: one run per seed in sub-folders
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    smote: SmoteConfig = Field(default_factory=SmoteConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v):
        if v is not None and (len(v) == 0 or len(set(v)) != len(v)):
            raise ValueError("seeds must be a non-empty list of distinct integers")
        return v

    @property
    def split_seed(self) -> int:
        return self.seed if self.data.split.seed is None else self.data.split.seed


def _format_validation_error(exc: ValidationError, source: str) -> str:
    first = sorted(exc.errors(), key=lambda err: err["type"] != "extra_forbidden")[0]  # a typo explains most
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {key}: {first['msg']}{shown}{more}"


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to a raw config dict; values are parsed as YAML (`3`, `true`, `[1,2]`)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.epochs=5")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty key part")
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
            node = node.setdefault(p, {})
        try:
            node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            node[parts[-1]] = value
    return raw


def parse_config(raw: dict, source: str = "config", schema: type[BaseModel] = RunConfig):
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(
    path: str | os.PathLike | None, overrides: list[str] | None = None, schema: type[BaseModel] = RunConfig
):
    """Read a YAML config (or start from defaults when path is None), apply overrides, validate."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source, schema)


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: BaseModel, path: str | os.PathLike) -> None:
    io.write_text(path, dump_config(cfg))

"""A detector run's config (`bloodcell detector train CONFIG`, configs/detector-*.yaml), validated as strictly as a
classifier run's (bloodcell.config: unknown keys and wrong types are errors naming the key, `--set a.b=c` overrides).
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from bloodcell.config import LearningRate, StrictSection


class DetectorSection(StrictSection):
    name: str = "classical"  # a registered detector: `bloodcell detector list`
    kwargs: dict[str, Any] = Field(default_factory=dict)


class FieldSetConfig(StrictSection):
    root: Optional[str] = None  # a Pascal VOC folder or a YOLO folder (images/, labels/, data.yaml[, sources.csv])
    train_split: str = "train"
    val_split: str = "val"
    test_split: str = "test"
    thresholds: bool = True  # its val photographs choose the operating thresholds (false where its labels miss cells)


class FieldDataConfig(StrictSection):
    # one set: a Pascal VOC folder (Annotations/, JPEGImages/, ImageSets/Main/) or a YOLO folder; `--data DIR` sets it
    root: Optional[str] = None
    train_split: str = "train"
    val_split: str = "val"  # operating thresholds are chosen here
    test_split: str = "test"  # reported, never trained or tuned on
    # several sets by name, combined by data.fields.combine_field_sets (root and the splits above then unused);
    # `--set data.sets.<name>.root=DIR` points one at its folder
    sets: dict[str, FieldSetConfig] = Field(default_factory=dict)
    # a source never trained or tuned on: its test photographs say what a new lab can expect
    leave_out: Optional[str] = None


class DetectorTrainConfig(StrictSection):
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: LearningRate = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: int = Field(2, ge=0)
    # long side of the photograph as the network sees it (BCCD: 640 -> 320 keeps platelets ~20 px wide)
    long_side: int = Field(320, ge=64, le=4096)
    num_threads: Optional[int] = Field(None, ge=1)  # None: torch's default
    init: Optional[str] = None  # start from a saved detector's weights (a folder, or 'default': the bundled one)


class DetectorEvalConfig(StrictSection):
    match_iou: float = Field(0.5, gt=0, lt=1)  # a found box counts as the cell when IoU >= this
    annotated_examples: int = Field(6, ge=0)


class DetectorRunConfig(StrictSection):
    """A detector run: `bloodcell detector train CONFIG` (configs/detector-*.yaml)."""

    name: Optional[str] = None
    seed: int = 0
    detector: DetectorSection = Field(default_factory=DetectorSection)
    data: FieldDataConfig = Field(default_factory=FieldDataConfig)
    train: DetectorTrainConfig = Field(default_factory=DetectorTrainConfig)
    eval: DetectorEvalConfig = Field(default_factory=DetectorEvalConfig)

"""Study configs: a list of experiments (model x protocol x seed), each a run config plus overrides.

```yaml
name: paper
scale: "224 px, paper epochs"          # said in the report
base: {data: {input_size: 224}}        # applied over every experiment config
seeds: [42]
protocols:                              # named sets of overrides
  no_shuffle: {table: 2, title: "Without shuffling", set: {data.split.order: keras}, note: "why, in a sentence"}
  sorted: {title: "Class-sorted (ablation)", set: {data.split.order: sorted}}   # no table: an ablation section
compare: [no_shuffle, shuffle]          # the protocol pair compared seed by seed at the top of the report
experiments:
  - name: cnn
    row: CNN                            # the paper's row name
    config: configs/train/cnn.yaml      # relative to this file; optional
    set: {train.epochs: 10}             # overrides for this experiment
    protocols: [no_shuffle, shuffle]
    seeds: [42, 1, 2, 3, 4]             # optional: this experiment's seeds instead of the study's
    paper: {no_shuffle: [97.15, 86.60]} # the paper's (train, test) accuracy per protocol, in %
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bloodcell.config import RunConfig, apply_overrides, parse_config
from bloodcell.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Protocol(_Strict):
    title: str
    table: Optional[int] = None  # the paper's table number this protocol reproduces; None: an ablation
    set: dict[str, Any] = Field(default_factory=dict)
    note: str = ""  # how the protocol reads the paper, printed under its table


class Experiment(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    row: Optional[str] = None
    config: Optional[str] = None
    set: dict[str, Any] = Field(default_factory=dict)
    protocols: list[str] = Field(default_factory=lambda: ["default"])
    seeds: Optional[list[int]] = None  # None: the study's seeds
    paper: dict[str, list[float]] = Field(default_factory=dict)  # protocol -> [train %, test %] (or more)


class StudySpec(_Strict):
    name: str
    description: str = ""
    scale: str = ""
    base: dict[str, Any] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [42])
    protocols: dict[str, Protocol] = Field(default_factory=lambda: {"default": Protocol(title="Default")})
    experiments: list[Experiment]
    compare: Optional[tuple[str, str]] = None  # (a, b): b - a per seed for every experiment that runs both
    # the paper's reported numbers beyond train/test accuracy, shown beside ours (e.g. Table 1)
    paper_metrics: dict[str, dict[str, float]] = Field(default_factory=dict)


@dataclass
class RunSpec:
    experiment: Experiment
    protocol: str
    seed: int
    config: RunConfig

    @property
    def key(self) -> str:
        return f"{self.experiment.name}/{self.protocol}/seed-{self.seed}"


def _flat_overrides(d: dict[str, Any]) -> list[str]:
    return [
        f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}" for k, v in d.items()
    ]


def load_study(path: str | os.PathLike) -> tuple[StudySpec, Path]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"study config not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    try:
        spec = StudySpec.model_validate(raw or {})
    except ValidationError as exc:
        e = sorted(exc.errors(), key=lambda err: err["type"] != "extra_forbidden")[0]  # a typo explains most
        key = ".".join(str(p) for p in e["loc"])
        msg = f"unknown key '{key}'" if e["type"] == "extra_forbidden" else f"{key}: {e['msg']}"
        raise ConfigError(f"{path}: {msg}") from None
    names = [e.name for e in spec.experiments]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: experiment names must be unique")
    for e in spec.experiments:
        for p in e.protocols:
            if p not in spec.protocols:
                raise ConfigError(f"{path}: experiment '{e.name}' names unknown protocol '{p}'")
    for name in spec.compare or ():
        if name not in spec.protocols:
            raise ConfigError(f"{path}: compare names unknown protocol '{name}'")
    return spec, path.parent


def expand_runs(
    spec: StudySpec, base_dir: Path, overrides: list[str] | None = None, only: list[str] | None = None
) -> list[RunSpec]:
    """Every (experiment, protocol, seed) as a validated RunConfig; `only` keeps the named experiments.

    Args:
        spec: The loaded study.
        base_dir: The study file's folder: experiments' relative config paths are read from it (else from the
            working directory).
        overrides: `key=value` overrides (dotted keys), applied last, over the protocol's and experiment's `set`.
        only: Names of the experiments to keep; an unknown name raises ConfigError. None keeps all.
    """
    if only:
        unknown = sorted(set(only) - {e.name for e in spec.experiments})
        if unknown:
            raise ConfigError(
                f"--only: unknown experiment(s) {', '.join(unknown)}; "
                f"known: {', '.join(e.name for e in spec.experiments)}"
            )
    runs = []
    for exp in spec.experiments:
        if only and exp.name not in only:
            continue
        raw: dict = {}
        if exp.config:
            cfg_path = (base_dir / exp.config) if not Path(exp.config).is_absolute() else Path(exp.config)
            if not cfg_path.exists():
                cfg_path = Path(exp.config)  # relative to the working directory as a fallback
            try:
                raw = yaml.safe_load(cfg_path.read_text()) or {}
            except FileNotFoundError:
                raise ConfigError(f"experiment '{exp.name}': config file not found: {exp.config}") from None
        raw = _merge(raw, spec.base)
        for proto in exp.protocols:
            for seed in exp.seeds or spec.seeds:
                r = yaml.safe_load(yaml.safe_dump(raw))  # deep copy
                apply_overrides(r, _flat_overrides(spec.protocols[proto].set))
                apply_overrides(r, _flat_overrides(exp.set))
                apply_overrides(r, list(overrides or []))
                r["seed"] = seed
                r["seeds"] = None
                r["name"] = f"{exp.name}-{proto}-seed{seed}"
                runs.append(RunSpec(exp, proto, seed, parse_config(r, f"experiment '{exp.name}' ({proto})")))
    return runs


def _merge(a: dict, b: dict) -> dict:
    """b over a, recursively (b wins)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

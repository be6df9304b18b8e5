"""Create, save and load field detectors: the registry's look-ups and the one file format.

The table of detectors and their face live in bloodcell.detect.base, which imports no detector; this module imports
the built-ins (bloodcell.detect.builtins) before its first look-up.

A detector takes RGB photographs (H x W x 3 uint8) and returns boxes, a class from FIELD_CLASSES and a score
per box. Every detector is saved as `detector.json` (name, options, fitted settings, operating thresholds)
plus `detector.safetensors` when it has learned weights; nothing is unpickled. An FCOS detector can also carry its
ONNX export (`detector.onnx`, described by detector.json's `onnx` section), which runs without PyTorch; a bundled one
keeps its weights only there (the graph's initializers, `onnx.state_dict: "initializers"`), and the torch FCOS loads
them from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from bloodcell import __version__
from bloodcell.data.fields import FIELD_CLASSES
from bloodcell.detect.base import DETECTORS, FieldDetector
from bloodcell.detect.fcos_onnx import ONNX_STATE_DICT
from bloodcell.errors import MissingExtra, ModelError
from bloodcell.extras import INSTALL_TRAIN, has_torch
from bloodcell.io import write_bytes
from bloodcell.models.metadata import write_sealed_json
from bloodcell.models.seal import member, verify

DETECTOR_WEIGHTS = "detector.safetensors"
DETECTOR_METADATA = "detector.json"
DETECTOR_FORMAT = "bloodcell-detector"


def _registry() -> dict[str, Callable[..., FieldDetector]]:
    # on first use, not at import: the built-ins import PyTorch, which a caller that never looks a detector up skips
    import bloodcell.detect.builtins  # noqa: F401  (registers the built-in detectors)

    return DETECTORS


def list_detectors() -> list[str]:
    return list(_registry())


def create_detector(name: str, **options: Any) -> FieldDetector:
    """A new detector of the registered `name`, built with `options`; a one-line ModelError for an unknown name or
    option."""
    registry = _registry()
    if name not in registry:
        raise ModelError(f"unknown detector '{name}'; known detectors: {', '.join(registry)}")
    try:
        detector = registry[name](**options)
    except TypeError as exc:
        raise ModelError(f"detector '{name}': {exc}") from None
    detector.name = name
    return detector


def save_detector(detector: FieldDetector, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write detector.json (+ detector.safetensors when it has weights) atomically and seal the folder; return it.

    Args:
        metadata: more keys for detector.json (a run's `trained_on`, `test` figures); the format's own keys win.
    """
    from safetensors.torch import save  # the [train] extra: the light install loads detectors, never saves them

    directory = Path(directory)
    meta = dict(metadata or {})
    tensors = {k: v.detach().cpu().contiguous() for k, v in detector.tensors().items()}
    meta.update(
        format=DETECTOR_FORMAT,
        format_version=1,
        detector=detector.name,
        classes=list(FIELD_CLASSES),
        options=detector.options,
        state=detector.state(),
        score_thresholds=detector.score_thresholds,
        weights=DETECTOR_WEIGHTS if tensors else None,
        bloodcell_version=__version__,
    )
    if tensors:
        write_bytes(directory / DETECTOR_WEIGHTS, save(tensors, metadata={"detector": detector.name}))
    write_sealed_json(directory / DETECTOR_METADATA, meta)  # and seal the folder (bloodcell.models.seal)
    return directory


def bundled_detector_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "default_detector"


def load_detector(path: str | os.PathLike | None = None) -> FieldDetector:
    """A saved detector: its folder, detector.json, or an .onnx file its detector.json describes; None or 'default':
    the one bundled with bloodcell.

    Without PyTorch (the light install), a folder whose detector.json has an `onnx` section (the bundled one has)
    loads as that ONNX export (`fcos-onnx`, bloodcell.detect.fcos_onnx), which finds the same cells. With PyTorch,
    a folder without a weights file whose `onnx` section says `"state_dict": "initializers"` (the bundled one) loads
    the torch detector's weights from that ONNX graph."""
    if path is None or str(path) == "default":
        path = bundled_detector_dir()
    path = Path(path)
    onnx_file = path if path.suffix.lower() == ".onnx" else None
    meta_file = path.with_name(DETECTOR_METADATA) if onnx_file else path / DETECTOR_METADATA if path.is_dir() else path
    if not meta_file.is_file():
        if onnx_file:
            raise ModelError(
                f"{path}: no {DETECTOR_METADATA} beside it (an ONNX detector is described by the "
                f"{DETECTOR_METADATA} of its folder)"
            )
        raise ModelError(
            f"{path}: no {DETECTOR_METADATA} (a detector folder holds {DETECTOR_METADATA} and maybe "
            f"{DETECTOR_WEIGHTS} or detector.onnx)"
        )
    verify(meta_file.parent)
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{meta_file}: not readable as JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != DETECTOR_FORMAT:
        raise ModelError(f"{meta_file}: not a bloodcell detector (format '{DETECTOR_FORMAT}' expected)")
    for key in ("detector", "options", "score_thresholds"):
        if key not in meta:
            raise ModelError(f"{meta_file}: missing key '{key}'")
    section = meta.get("onnx") if isinstance(meta.get("onnx"), dict) else None
    if section and section.get("file") is not None:
        member(meta_file.parent, section["file"], "onnx.file", meta_file)
    if meta.get("weights") is not None:
        member(meta_file.parent, meta["weights"], "weights", meta_file)
    if onnx_file is None and section and not has_torch():  # the light install runs the same detector's ONNX export
        onnx_file = meta_file.parent / str(section.get("file"))
    if onnx_file is not None and (not section or section.get("file") != onnx_file.name or not section.get("detector")):
        raise ModelError(
            f"{onnx_file}: {meta_file} does not describe it (no onnx section with file '{onnx_file.name}')"
        )
    name = section["detector"] if onnx_file else meta["detector"]
    try:
        detector = create_detector(name, **meta["options"])
    except MissingExtra:
        raise ModelError(
            f"the field detector ({meta['detector']}, {path}) runs on PyTorch, which this install lacks: "
            f"{INSTALL_TRAIN}"
        ) from None
    detector.load_state(meta.get("state") or {})
    thresholds = meta["score_thresholds"]
    if set(thresholds) != set(FIELD_CLASSES):
        raise ModelError(f"{meta_file}: score_thresholds must name {', '.join(FIELD_CLASSES)}")
    detector.score_thresholds = {c: float(thresholds[c]) for c in FIELD_CLASSES}
    if onnx_file is not None:
        detector.load_onnx(onnx_file, section)
    elif meta.get("weights"):
        weights = meta_file.parent / meta["weights"]
        if not weights.is_file():
            raise ModelError(f"{meta_file}: names weights {weights.name} but the file is missing")
        from safetensors.torch import load_file  # the [train] extra: weights files are for the torch detectors

        try:
            detector.load_tensors(load_file(str(weights)))
        except Exception as exc:  # safetensors raises its own types for torn files
            raise ModelError(f"{weights}: cannot load detector weights ({exc})") from None
    elif section and section.get("state_dict") == ONNX_STATE_DICT:  # weights kept once, in the ONNX export
        detector.load_onnx_weights(meta_file.parent / str(section.get("file")))
    detector.metadata = meta
    detector.source = str(meta_file.parent)
    return detector

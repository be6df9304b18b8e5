"""int8 static quantization of an exported classifier with ONNX Runtime, calibrated on images the model was not
tested on.

Calibration measures the range of every activation on real inputs, fed exactly as Predictor feeds them (decode,
resize, white balance, normalise: `Predictor.decode` then `Predictor.normalise`). The images come from either

- the validation part of the model's own split: the training data folder recorded in model.json (or `data_root`),
  checked against model.json's data fingerprint, split again with the recorded split options, so no test image
  of the model's reported figures is ever used; or
- a folder of images given by the user (`calibration_dir`), for someone without the training data.

The shuffled images (seed: the split seed, else 0) are cut in two: the first `n` calibrate, the next ones (up to
`check`) are the guard's check images. The guard runs the fp32 and the int8 graphs on the check images and
refuses the int8 model (ModelError, nothing written) when their top-1 labels, or their OOD flags, agree on fewer
than `min_agreement` of them.

Nodes the logits do not depend on (the OOD score: input statistics, whitening, distances) stay fp32: the OOD
score is a squared distance in the hundreds, and rounding its matrix product to 8 bits would move the flags.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import onnx
import onnxruntime
from onnxruntime import quantization as ortq  # called as ortq.quantize_static: tests spy on it there

from bloodcell.config import parse_config
from bloodcell.data.images import UnreadableImage
from bloodcell.data.prepare import split_files
from bloodcell.errors import DataError, ModelError
from bloodcell.evaluate.calibration import apply_temperature
from bloodcell.infer.predictor import collect_images
from bloodcell.models.description import ModelDescription, provenance
from bloodcell.models import onnx_runtime  # called as onnx_runtime.onnx_session: tests wrap it there

MODES = ("int8",)
DEFAULT_CALIBRATION_IMAGES = 256  # 32 images moved the OOD flags of the bundled model (benchmarks/quantize.py)
DEFAULT_CHECK_IMAGES = 256
MIN_AGREEMENT = 0.98


@dataclass(frozen=True)
class QuantSettings:
    """How quantize_static is called; the defaults are what `bloodcell export --quantize int8` ships."""

    fmt: str = "QDQ"  # ONNX Runtime's recommended format on CPU; "QOperator" the older one
    per_channel: bool = True
    # 7-bit weights: CPUs without VNNI (most AVX2 laptops) multiply u8 x s8 pairs into int16 with
    # vpmaddubsw, which saturates with full 8-bit weights; 7 bits cannot saturate there
    reduce_range: bool = True
    method: str = "MinMax"  # or "Entropy", "Percentile"
    activations: str = "uint8"  # u8 activations x s8 weights is the fast pair on x86; "int8" is slower there

    def check(self) -> None:
        choices = {
            "fmt": ("QDQ", "QOperator"),
            "method": ("MinMax", "Entropy", "Percentile"),
            "activations": ("uint8", "int8"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ModelError(f"quantization {key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")


@dataclass
class CalibrationSet:
    calibration: list[Path]
    check: list[Path]
    description: str  # e.g. "256 validation images of split seed 42 (data /x/pbc, fingerprint 5a3497ac)"
    check_description: str


def calibration_set(
    meta: ModelDescription | dict,
    source: str,
    n: int = DEFAULT_CALIBRATION_IMAGES,
    calibration_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    check: int = DEFAULT_CHECK_IMAGES,
) -> CalibrationSet:
    """The calibration and check images for a model.

    Args:
        meta: the model's description (or a dict with its training_config and data_fingerprint).
        source: what names the model in errors.
        n: how many images calibrate.
        calibration_dir: calibrate on images of this folder instead of the model's validation part.
        data_root: the training data folder, when not where model.json says.
        check: how many other images the guard compares fp32 and int8 on.
    """
    if n < 1 or check < 1:
        raise ModelError(
            f"--calibration-images must be >= 1, got {n}" if n < 1 else f"check images must be >= 1, got {check}"
        )
    if calibration_dir is not None and data_root is not None:
        raise ModelError(
            "give --calibration-dir (any images) or --data (the training data, for its validation part), not both"
        )
    if calibration_dir is not None:
        root = Path(calibration_dir)
        if not root.is_dir():
            raise DataError(f"--calibration-dir {root} is not a folder")
        files, seed = collect_images(root), 0
        where = f"images from {root} (--calibration-dir)"
    else:
        files, seed, where = _validation_part(meta, source, data_root)
    order = np.random.default_rng(seed).permutation(len(files))
    files = [files[int(i)] for i in order]
    calib, rest = files[:n], files[n : n + check]
    described = f"{len(calib)} {where}"
    if rest:
        checked = f"{len(rest)} other {where}"
    else:  # too few images to hold some out: the guard then sees the calibration images
        rest, checked = calib, f"the {len(calib)} calibration images (no others left)"
    return CalibrationSet(calib, rest, described, checked)


def _validation_part(meta: ModelDescription | dict, source: str, data_root) -> tuple[list[Path], int, str]:
    hint = "pass --data DIR (the training data) or --calibration-dir DIR (images like the ones it will classify)"
    recorded = provenance(meta, f"model.json of {source}")
    trained = recorded.training_config
    if not isinstance(trained, dict):
        raise ModelError(
            f"model.json of {source} records no training_config, so no validation part to calibrate on: {hint}"
        )
    cfg = parse_config(trained, source=f"training_config of {source}")
    if data_root is None:
        if cfg.data.npz or not cfg.data.root:
            raise ModelError(
                f"model.json of {source} records no training data folder (training_config.data.root): {hint}"
            )
        data_root = cfg.data.root
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"the training data of {source} is not at {root.resolve()} (training_config.data.root or --data): {hint}"
        )
    fingerprint = recorded.data_fingerprint
    if not fingerprint:
        raise ModelError(
            f"model.json of {source} has no data_fingerprint, "
            f"so its validation part cannot be told apart from its test part: {hint}"
        )
    files, _ = split_files(cfg, root, "val", fingerprint=fingerprint)
    if not files:
        raise DataError(f"the split of {source} has no validation part (val_size 0): pass --calibration-dir DIR")
    return (
        files,
        cfg.split_seed,
        f"validation images of split seed {cfg.split_seed} ({root.resolve()}, data fingerprint {fingerprint[:8]})",
    )


def decode_all(predictor, files: Sequence[Path]) -> tuple[np.ndarray, int]:
    """(uint8 images as Predictor decodes them, how many were unreadable and left out)."""

    def one(path):
        try:
            return predictor.decode(path)
        except (UnreadableImage, OSError):
            return None

    with ThreadPoolExecutor(predictor.workers) as pool:
        arrays = [a for a in pool.map(one, files) if a is not None]
    s = predictor.input_size
    return (np.stack(arrays) if arrays else np.zeros((0, s, s, 3), np.uint8)), len(files) - len(arrays)


def fp32_only_nodes(model_path: str | os.PathLike, output: str = "logits") -> list[str]:
    """Names of the nodes `output` does not depend on (the OOD score's own computation)."""
    graph = onnx.load(str(model_path)).graph
    needed, used = {output}, set()
    for node in reversed(graph.node):  # ONNX nodes are topologically sorted
        if any(o in needed for o in node.output):
            used.add(node.name)
            needed.update(node.input)
    return [node.name for node in graph.node if node.name not in used]


def quantize_file(
    predictor,
    fp32_path: Path,
    out_path: Path,
    images: np.ndarray,
    settings: QuantSettings,
    keep_fp32: Sequence[str] | None = None,
) -> None:
    """Write the int8 graph of `fp32_path` to `out_path`, calibrated on uint8 `images` normalised by `predictor`.

    keep_fp32: names of nodes left in fp32 (default: `fp32_only_nodes`, the OOD score's own nodes).

    Args:
        predictor: The model's Predictor; its `normalise` turns the images into the graph's input.
        fp32_path: The fp32 ONNX file to quantize.
        out_path: Where the int8 ONNX file is written.
        images: Calibration images, uint8 (N, S, S, 3), fed one a batch.
        settings: How quantize_static is called (format, per-channel, reduced range, method, activation type).
        keep_fp32: Node names left in fp32; None: fp32_only_nodes(fp32_path).
    """
    settings.check()

    class Batches(ortq.CalibrationDataReader):
        # one image a batch: the Entropy and Percentile calibrators of onnxruntime 1.32 fail on a shorter last batch
        def __init__(self) -> None:
            self._batches: Iterator = (predictor.normalise(images[i : i + 1]) for i in range(len(images)))

        def get_next(self):
            x = next(self._batches, None)
            return None if x is None else {"input": x}

    # quantize_static advises pre-processing through logging and prints calibration progress to stdout:
    # neither means anything to a user of `bloodcell export` (pre-processing changed nothing here)
    with _quiet():
        try:
            ortq.quantize_static(
                str(fp32_path),
                str(out_path),
                Batches(),
                quant_format=getattr(ortq.QuantFormat, settings.fmt),
                per_channel=settings.per_channel,
                reduce_range=settings.reduce_range,
                activation_type=ortq.QuantType.QUInt8 if settings.activations == "uint8" else ortq.QuantType.QInt8,
                weight_type=ortq.QuantType.QInt8,
                nodes_to_exclude=fp32_only_nodes(fp32_path) if keep_fp32 is None else list(keep_fp32),
                calibrate_method=getattr(ortq.CalibrationMethod, settings.method),
            )
        except Exception as exc:  # onnxruntime raises its own types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"int8 quantization of {fp32_path.name} failed: {first}") from None


@contextlib.contextmanager
def _quiet():
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def compare(predictor, fp32_session, int8_session, images: np.ndarray) -> dict:
    """Agreement of two graphs' top-1 labels, review flags and OOD flags, and their largest logit difference, on uint8
    `images`.

    Args:
        predictor: The model's Predictor: its normalisation, temperature, review and OOD thresholds.
        fp32_session: ONNX Runtime session of the fp32 graph (the reference).
        int8_session: ONNX Runtime session of the int8 graph.
        images: Check images, uint8 (N, S, S, 3), run 64 at a time.
    """

    def run(session):
        name = session.get_inputs()[0].name
        outs = [session.run(None, {name: predictor.normalise(images[i : i + 64])}) for i in range(0, len(images), 64)]
        return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]

    ref, got = run(fp32_session), run(int8_session)
    confidence = [apply_temperature(r[0], predictor.temperature).max(1) for r in (ref, got)]
    review = [c < predictor.review_threshold for c in confidence]
    out = {
        "images": int(len(images)),
        "top1_agreement": float((ref[0].argmax(1) == got[0].argmax(1)).mean()),
        "max_abs_logit_diff": float(np.abs(ref[0] - got[0]).max()),
        "review_flag_agreement": float(
            (review[0] == review[1]).mean()
        ),  # reported, not guarded: flags sit on a threshold
    }
    if predictor.ood_threshold is not None and len(ref) > 1:
        t = predictor.ood_threshold
        out["ood_flag_agreement"] = float(((ref[1] > t) == (got[1] > t)).mean())
        out["ood_score_median_rel_diff"] = float(np.median(np.abs(got[1] - ref[1]) / np.maximum(np.abs(ref[1]), 1e-6)))
    return out


def check_min_agreement(min_agreement: float) -> None:
    if not 0.0 < min_agreement <= 1.0:
        raise ModelError(f"--min-agreement must be in (0, 1], got {min_agreement}")


def quantize_checked(
    predictor,
    fp32_path: Path,
    out_path: Path,
    calib: CalibrationSet,
    settings: QuantSettings,
    min_agreement: float,
    source: str,
) -> dict:
    """Quantize, run the guard, and return the sidecar's `quantization` section; ModelError when the guard refuses.

    Args:
        predictor: The model's Predictor (decodes and normalises the images).
        fp32_path: The fp32 ONNX file to quantize.
        out_path: Where the int8 ONNX file is written.
        calib: The calibration images and the separate check images, with their descriptions.
        settings: How quantize_static is called.
        min_agreement: Share in (0, 1] of check images on which int8 must agree with fp32 (top-1 labels and OOD
            flags), else ModelError.
        source: The model's name, for the refusal's message.
    """
    check_min_agreement(min_agreement)
    images, bad = decode_all(predictor, calib.calibration)
    if not len(images):
        raise DataError(f"none of the {len(calib.calibration)} calibration images ({calib.description}) could be read")
    quantize_file(predictor, fp32_path, out_path, images, settings)
    check_images, _ = decode_all(predictor, calib.check)
    if not len(check_images):
        raise DataError(f"none of the {len(calib.check)} check images ({calib.check_description}) could be read")
    sessions = onnx_runtime.onnx_session(fp32_path), onnx_runtime.onnx_session(out_path)
    result = compare(predictor, *sessions, check_images)
    for key, what in (("top1_agreement", "top-1 labels"), ("ood_flag_agreement", "OOD flags")):
        if key in result and result[key] < min_agreement:
            raise ModelError(
                f"int8 model of {source} agrees with fp32 on {what} for only {100 * result[key]:.1f} % of "
                f"{calib.check_description} (minimum {100 * min_agreement:g} %, --min-agreement): nothing written"
            )
    return {
        "mode": "int8-static",
        "calibration": calib.description + (f" ({bad} unreadable, left out)" if bad else ""),
        "settings": asdict(settings),
        "kept_fp32": "nodes the logits do not depend on (the OOD score from the int8 features)",
        "check": {"on": calib.check_description, "min_agreement": min_agreement, **result},
        "fp32_bytes": fp32_path.stat().st_size,
        "int8_bytes": out_path.stat().st_size,
        "onnxruntime": onnxruntime.__version__,
    }

"""Export a trained model to ONNX and prove the export computes what PyTorch computes.

The .onnx file takes the normalised image batch `input` (float32, N x 3 x S x S, N free) and returns `logits` (N x K)
and, for a model with an out-of-distribution score, `ood_score` (N) computed in the graph. Preprocessing, temperature
and class names live in the sidecar `<file>.onnx.json` (model.json plus an `onnx` section), which
`Predictor.load("<file>.onnx")` reads. With `quantize="int8"` the file holds the int8 graph of the checked fp32 one
(bloodcell.infer.quantize) and the sidecar a `quantization` section.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import torch

from bloodcell.data.images import UnreadableImage
from bloodcell.errors import ModelError
from bloodcell.infer import quantize as q
from bloodcell.infer.card import model_card
from bloodcell.infer.predictor import BUNDLED_ONNX, Predictor
from bloodcell.io import atomic_path, file_sha256, write_text
from bloodcell.models.description import (
    METADATA_FILE,
    WEIGHTS_FILE,
    onnx_sidecar,
    read_description,
    read_onnx_description,
    update_description,
    write_description,
)
from bloodcell.models import onnx_runtime  # called as onnx_runtime.onnx_session: tests wrap it there
from bloodcell.models.seal import member

PARITY_TOLERANCE = 1e-4
DYNAMO_MIN_OPSET = (
    18  # torch's dynamo exporter writes opset 18 and up (lower: a version conversion that fails on ReduceMean)
)
DEFAULT_OPSET = DYNAMO_MIN_OPSET
SAMPLE_DIR = Path(__file__).resolve().parents[3] / "examples" / "pbc-sample"  # in a source checkout


@dataclass
class ExportReport:
    path: Path
    sidecar: Path
    max_abs_diff: float
    images: int  # how many images the parity check ran on
    image_source: str  # "sample images", "given images" or "random images"
    exporter: str  # "dynamo", or "torchscript" where dynamo could not export (fallback_reason says why)
    quantization: dict | None = None  # the sidecar's `quantization` section of an int8 export
    fallback_reason: str | None = None
    opset: int | None = None  # the opset the file declares


def export_onnx(
    model: str | os.PathLike,
    out: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    check_images: Sequence[str | os.PathLike] | None = None,
    tolerance: float = PARITY_TOLERANCE,
    quantize: str | None = None,
    calibration_images: int | None = None,
    calibration_dir: str | os.PathLike | None = None,
    data_root: str | os.PathLike | None = None,
    min_agreement: float | None = None,
    settings=None,
) -> ExportReport:
    """Export the run / model directory `model` to `out` (.onnx) plus `out.onnx.json` and its card.

    The parity check runs PyTorch and onnxruntime at batch 1 and at the full batch and raises ModelError when an
    output differs by more than `tolerance` (see `output_difference`). Nothing is written unless it passes.

    Args:
        model: the run / model folder (PyTorch weights).
        out: the .onnx file to write; its sidecar is `<out>.json`, its card `<out>.card.md`.
        opset: the ONNX opset (below DYNAMO_MIN_OPSET the deprecated TorchScript exporter writes it).
        check_images: images for the parity check (default: up to 8 of the embedded sample, else seeded random pixels).
        tolerance: the largest output difference accepted.
        quantize: "int8" writes the int8 static quantization of the checked fp32 graph instead
            (bloodcell.infer.quantize), refused unless it agrees with fp32 on `min_agreement` of held-out images.
        calibration_images: with int8, how many validation images of the model's split calibrate it.
        calibration_dir: with int8, calibrate on images of this folder instead.
        data_root: with int8, the training data folder, when not where model.json says.
        min_agreement: with int8, the share of check images on which int8 and fp32 must agree.
        settings: with int8, a quantize.QuantSettings (default: what `bloodcell export` ships).
    """
    out = Path(out)
    _check_request(model, out, quantize, calibration_images, calibration_dir, data_root, min_agreement)
    predictor = Predictor.load(model)
    calib = None
    if quantize:  # find the calibration images first: a missing folder should fail before minutes of work
        wanted = q.DEFAULT_CALIBRATION_IMAGES if calibration_images is None else calibration_images
        calib = q.calibration_set(predictor.description, str(model), wanted, calibration_dir, data_root)
    net = (predictor.scored_model or predictor.model).eval()
    outputs = ["logits", "ood_score"] if predictor.scored_model is not None else ["logits"]
    images, source = _check_batch(predictor, check_images)
    x = predictor.normalise(images)
    dummy = torch.zeros(1, 3, predictor.input_size, predictor.input_size)

    with atomic_path(out) as final, tempfile.TemporaryDirectory(prefix="bloodcell-export-") as work:
        tmp = Path(work) / "fp32.onnx" if quantize else final  # int8: the checked fp32 graph is quantized into `final`
        exporter, fallback_reason = _export(net, dummy, tmp, opset, outputs)
        session = onnx_runtime.onnx_session(tmp)
        diff = _parity(net, session, x, outputs, model)
        if not np.isfinite(diff) or diff > tolerance:
            raise ModelError(
                f"ONNX export of {model} differs from PyTorch by up to {diff:.3g} on {len(x)} {source} "
                f"(tolerance {tolerance:g}); nothing written"
            )
        section = {
            "exported_from": str(model),
            "opset": file_opset(tmp),
            "exporter": exporter,
            **({"fallback_reason": fallback_reason} if fallback_reason else {}),
            "input": session.get_inputs()[0].name,
            "input_layout": "N x 3 x H x W float32, normalised with mean/std",
            "output": session.get_outputs()[0].name,
            "outputs": [o.name for o in session.get_outputs()],
            "max_abs_diff": diff,
            "checked_on": f"{len(x)} {source}",
        }
        quantization = None
        if quantize:
            limit = q.MIN_AGREEMENT if min_agreement is None else min_agreement
            quantization = q.quantize_checked(
                predictor, tmp, final, calib, settings or q.QuantSettings(), limit, str(model)
            )
    sidecar = onnx_sidecar(out)
    description = predictor.description.replace(onnx=section, quantization=quantization)
    write_description(sidecar, description)  # and seal out's folder: the .onnx and its sidecar (bloodcell.models.seal)
    write_text(card_path(out), model_card(description, source=out.name))  # the card travels with the file
    return ExportReport(out, sidecar, diff, len(x), source, exporter, quantization, fallback_reason, section["opset"])


def _check_request(model, out: Path, quantize, calibration_images, calibration_dir, data_root, min_agreement) -> None:
    """Refuse what cannot be exported before any work: the target's name, an ONNX source, int8 options."""
    if out.suffix.lower() != ".onnx":
        raise ModelError(f"export target {out} must end in .onnx")
    if Path(model).suffix.lower() == ".onnx":
        raise ModelError(f"{model} is already an ONNX model: export takes a run directory")
    if quantize is not None and quantize not in q.MODES:
        raise ModelError(f"--quantize must be one of {', '.join(q.MODES)}, got {quantize!r}")
    if quantize is None and any(v is not None for v in (calibration_images, calibration_dir, data_root, min_agreement)):
        raise ModelError(
            "--calibration-images / --calibration-dir / --data / --min-agreement only apply with --quantize int8"
        )
    if min_agreement is not None:  # a bad value fails before the export, as a missing folder does
        q.check_min_agreement(min_agreement)


def _parity(net, session: Any, x: np.ndarray, outputs: Sequence[str], model) -> float:
    """The largest output_difference between PyTorch and onnxruntime on `x`, at the full batch and at batch 1."""
    name = session.get_inputs()[0].name
    with torch.inference_mode():
        expected = net(torch.from_numpy(x))
    expected = [t.float().numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
    got_full = session.run(None, {name: x})
    got_single = [session.run(None, {name: x[i : i + 1]}) for i in range(len(x))]
    diff = 0.0
    for k, (out_name, want) in enumerate(zip(outputs, expected)):
        full, single = got_full[k], np.concatenate([g[k] for g in got_single])
        if full.shape != want.shape:
            raise ModelError(f"ONNX export of {model} gives {out_name} of shape {full.shape}, PyTorch {want.shape}")
        # np.max, not max(): max(0.0, nan) is 0.0, so a NaN output would pass as a perfect match
        diff = float(np.max([diff, output_difference(want, full), output_difference(want, single)]))
    return diff


def output_difference(want: np.ndarray, got: np.ndarray) -> float:
    """The largest difference between two versions of one output, relative to the output's size when that exceeds 1.

    float32 rounding grows with the values: a deep network's logits in the tens, or the OOD score's squared distances
    in the hundreds, differ between two correct runtimes by more than 1e-4 in absolute terms, and so were refused."""
    return float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max()))


def card_path(onnx_file: str | os.PathLike) -> Path:
    return Path(f"{onnx_file}.card.md")


def dynamo_unavailable() -> str | None:
    """Why the dynamo exporter cannot run here (its onnxscript is missing), or None when it can."""
    try:
        found = importlib.util.find_spec("onnxscript") is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a half-removed package
        found = False
    return None if found else "onnxscript is not installed (pip install onnxscript)"


def file_opset(path: str | os.PathLike) -> int:
    """The default-domain opset an .onnx file declares."""
    imports = onnx.load(str(path), load_external_data=False).opset_import
    return next(int(o.version) for o in imports if o.domain in ("", "ai.onnx"))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _export(net, dummy, path: Path, opset: int, outputs: Sequence[str] = ("logits",)) -> tuple[str, str | None]:
    """torch.onnx.export with a dynamic batch axis: (exporter, why dynamo was not used or None).

    The dynamo exporter (torch.export + onnxscript) is used unless onnxscript is missing, the opset asked is below
    the one it writes, or it fails on this model; then the deprecated TorchScript exporter writes the file, and the
    reason is returned and printed as one warning line on stderr.
    """
    common = dict(input_names=["input"], output_names=list(outputs), opset_version=opset)
    reason = dynamo_unavailable()
    if reason is None and opset < DYNAMO_MIN_OPSET:
        reason = f"opset {opset} asked; the dynamo exporter writes opset {DYNAMO_MIN_OPSET} or later"
    if reason is None:
        try:
            batch = torch.export.Dim("batch", min=1)
            # verbose=False: no progress lines on stdout; a warning it gives still shows
            torch.onnx.export(
                net,
                (dummy,),
                str(path),
                dynamo=True,
                external_data=False,
                verbose=False,
                dynamic_shapes=({0: batch},),
                **common,
            )
            written = file_opset(path)
            if written != opset:
                raise ModelError(f"it wrote opset {written}, not the {opset} asked")
            return "dynamo", None
        except Exception as exc:  # anything torch.export or onnxscript raises: the TorchScript exporter below
            reason = f"dynamo exporter failed: {_first_line(exc)}"
            Path(path).unlink(missing_ok=True)
    print(f"warning: ONNX export falls back to the deprecated TorchScript exporter: {reason}", file=sys.stderr)
    try:
        with warnings.catch_warnings():
            # its deprecation notices (its own, and one of its internals calling another): the line above says so once
            warnings.filterwarnings(
                "ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning
            )
            warnings.filterwarnings(
                "ignore",
                "The feature will be removed",
                DeprecationWarning,
                r"torch\.onnx\._internal\.torchscript_exporter",
            )
            # the tracer's note on every `if x.shape...` of our models (unet's size check, ood's channel count): a
            # shape fixed by the model and its input size, so the traced branch is right for every batch
            warnings.filterwarnings(
                "ignore", "Converting a tensor to a Python boolean", torch.jit.TracerWarning, r"bloodcell\.models\."
            )
            torch.onnx.export(
                net,
                (dummy,),
                str(path),
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, **{o: {0: "batch"} for o in outputs}},
                **common,
            )
    except Exception as exc:
        raise ModelError(f"ONNX export failed: {_first_line(exc)} (dynamo not used: {reason})") from None
    return "torchscript", reason


def _check_batch(predictor, check_images) -> tuple[np.ndarray, str]:
    if check_images:
        arrays = []
        for p in check_images:
            try:
                arrays.append(predictor.decode(p))
            except (UnreadableImage, OSError) as exc:
                raise ModelError(f"cannot use {p} to check the export: {exc}") from None
        return np.stack(arrays), "given images"
    if SAMPLE_DIR.is_dir():
        files = [
            sorted(d.glob("*.jpg"))[0] for d in sorted(SAMPLE_DIR.iterdir()) if d.is_dir() and any(d.glob("*.jpg"))
        ]
        if files:
            return np.stack([predictor.decode(f) for f in files[:8]]), "sample images"
    rng = np.random.default_rng(0)
    s = predictor.input_size
    return rng.integers(0, 256, (4, s, s, 3), dtype=np.uint8), "random images"


def export_bundled(folder: str | os.PathLike, opset: int = DEFAULT_OPSET) -> ExportReport:
    """Export a model folder (model.safetensors + model.json) to `folder/model.onnx`, checked as `export_onnx` checks,
    and describe it in the folder's own model.json (`onnx` section, with the hashes of the weights it was made from),
    so the light install runs the same model and no second copy of its metadata exists."""
    folder = Path(folder)
    with tempfile.TemporaryDirectory(prefix="bloodcell-bundle-") as work:
        report = export_onnx(folder, Path(work) / BUNDLED_ONNX, opset=opset)
        section = read_onnx_description(report.path).to_dict()["onnx"]  # as written, in its order
        with atomic_path(folder / BUNDLED_ONNX) as tmp:
            shutil.copyfile(report.path, tmp)
    own = read_description(folder)
    weights = [WEIGHTS_FILE] + ([own.ood.file or "ood.safetensors"] if own.ood is not None else [])
    section.update(
        file=BUNDLED_ONNX,
        exported_from={name: file_sha256(member(folder, name, "ood.file")) for name in weights},
    )
    update_description(folder, onnx=section)  # and re-seal: model.onnx is new
    return ExportReport(
        folder / BUNDLED_ONNX,
        folder / METADATA_FILE,
        report.max_abs_diff,
        report.images,
        report.image_source,
        report.exporter,
        None,
        report.fallback_reason,
        report.opset,
    )

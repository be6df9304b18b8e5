"""Use a trained classifier: load it once, classify image files, folders or uploaded bytes.

`Predictor.load(model)` takes a run / model directory (model.safetensors + model.json), the
.safetensors file itself, an exported `.onnx` file (with its `.onnx.json` sidecar), or None for the
model bundled with the package. Every prediction goes through the same steps as training:

    decode (open_rgb: any format, any mode -> RGB; truncated / bomb / non-image / under 16 px a side -> "unreadable")
    -> resize to the model's input size (interpolation recorded at training, else bilinear)
    -> white balance, when the model was trained with it (model.json: preprocess)
    -> normalise with the model's mean/std -> logits -> softmax(logits / temperature)

and a cell is flagged for review when its calibrated top probability is below the review threshold
stored with the model (see bloodcell.evaluate.run.choose_review_threshold). Models trained by this version also
carry an out-of-distribution score (bloodcell.models.ood): an image whose score is above the model's threshold is
flagged `ood` (it looks unlike the cells the model was trained on) and left out of the counts, which say so.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from bloodcell.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_SUFFIXES,
    UnreadableImage,
    check_cell_size,
    is_image_name,
    open_rgb,
    prepare_array,
)
from bloodcell.errors import DataError, ModelError
from bloodcell.extras import has_torch
from bloodcell.infer.backends import OnnxBackend, TorchBackend
from bloodcell.models.description import (  # noqa: F401 - ONNX_SIDECAR_SUFFIX, onnx_sidecar: their old home
    DEFAULT_INTERPOLATION,
    ONNX_SIDECAR_SUFFIX,
    ModelDescription,
    onnx_sidecar,
)
from bloodcell.models.metadata import bundled_model_dir
from bloodcell.progress import progress_bar

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_TEMPERATURE = 1.0
DEFAULT_REVIEW_THRESHOLD = 0.9
BUNDLED_ONNX = "model.onnx"  # beside the bundled model.safetensors; described by model.json's `onnx` section

# The white cells of a differential count; platelets, erythroblasts (nucleated red cells) and
# anything else a model may know are counted but left out of the "% of WBC" column.
WBC_CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
# Cells that do not belong in normal peripheral blood: their presence is spelled out in `flags`.
FLAG_CLASSES = {
    "ig": "immature granulocytes",
    "erythroblast": "erythroblasts (nucleated red cells)",
}
# The folder-level verdict (folder_verdict): at least this many images, at least this share of them OOD.
VERDICT_MIN_IMAGES = 5
VERDICT_OOD_SHARE = 0.5
ADAPT_COMMAND = "bloodcell adapt FOLDER --out ADAPTED"
FINETUNE_COMMAND = "bloodcell train configs/finetune.yaml --data LABELLED_FOLDER"
# A manual differential counts 100 white cells; on fewer, one cell moves a percentage by more than a point.
MANUAL_DIFFERENTIAL_CELLS = 100


@dataclass
class Predictor:
    """A loaded classifier plus everything needed to preprocess and calibrate its inputs.

    The model runs in `engine`, a TorchBackend or an OnnxBackend (bloodcell.infer.backends); `model`, `session`,
    `scored_model` and `device` are the engine's.
    """

    class_names: list[str]
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    temperature: float = DEFAULT_TEMPERATURE
    review_threshold: float = DEFAULT_REVIEW_THRESHOLD
    interpolation: str = DEFAULT_INTERPOLATION
    white_balance: str = "none"
    metadata: dict = field(default_factory=dict, repr=False)  # model.json as a dict; typed: `description`
    source: str = ""
    engine: TorchBackend | OnnxBackend | None = field(default=None, repr=False)
    description: ModelDescription | None = field(default=None, repr=False)
    max_pixels: int = DEFAULT_MAX_PIXELS
    ood_threshold: float | None = None  # None: this model has no OOD score
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 1))

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        model: str | os.PathLike | None = None,
        *,
        review_threshold: float | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        device: str = "cpu",
    ) -> "Predictor":
        """Load a run directory, a .safetensors file, an .onnx file or (None) the bundled model.

        Args:
            model: what to load; None is the bundled model (its ONNX export where this install has no PyTorch).
            review_threshold: overrides the threshold stored with the model (0 < t <= 1).
            max_pixels: the largest image decoded (a decompression bomb is refused as unreadable).
            device: "cpu", "cuda", "cuda:N", or "auto" (CUDA when this machine has it); a CUDA device that is not
                there is an error, not a silent fallback.
        """
        path = _model_path(model)
        backend = OnnxBackend if path.suffix.lower() == ".onnx" else TorchBackend
        engine, description = backend.load(path, device)
        predictor = cls.from_description(description, str(path), engine)
        predictor.max_pixels = int(max_pixels)
        if review_threshold is not None:
            predictor.review_threshold = _check_threshold(review_threshold, "--threshold")
        return predictor

    @classmethod
    def from_description(cls, description: ModelDescription, source: str, engine: Any) -> "Predictor":
        """A Predictor for a loaded engine (TorchBackend / OnnxBackend) and its model's description."""
        pre = description.preprocessing
        threshold = description.review_threshold
        return cls(
            class_names=description.names,
            input_size=pre.input_size,
            mean=pre.mean,
            std=pre.std,
            temperature=DEFAULT_TEMPERATURE if description.temperature is None else description.temperature,
            review_threshold=DEFAULT_REVIEW_THRESHOLD if threshold is None else threshold,
            interpolation=pre.interpolation,
            white_balance=pre.white_balance,
            metadata=description.to_dict(),
            source=source,
            engine=engine,
            description=description,
            ood_threshold=description.ood.threshold if description.ood is not None and engine.scores_ood else None,
        )

    @property
    def model_name(self) -> str:
        return str(self.metadata.get("model_name", "unknown"))

    @property
    def backend(self) -> str:
        return self.engine.name

    @property
    def model(self) -> Any:  # the PyTorch model (a BloodcellModel), or None on ONNX Runtime
        return self.engine.model

    @property
    def session(self) -> Any:  # the onnxruntime.InferenceSession, or None on PyTorch
        return self.engine.session

    @property
    def scored_model(self) -> Any:
        """PyTorch: the model and its OOD scorer in one pass (ScoredModel), or None."""
        return self.engine.scored_model

    @scored_model.setter
    def scored_model(self, value: Any) -> None:  # bloodcell.infer.adapt refits the OOD score of an adapted model
        self.engine.scored_model = value

    @property
    def device(self) -> str:  # where the model runs: cpu, or cuda (PyTorch, or ONNX Runtime's CUDA provider)
        return self.engine.device

    @property
    def _lock(self) -> Any:  # one PyTorch pass at a time: a forward or Grad-CAM (bloodcell.infer.explain)
        return self.engine.lock

    # ------------------------------------------------------------------ the pipeline

    def decode(self, source: str | os.PathLike | bytes, max_pixels: int | None = None) -> np.ndarray:
        """One single-cell image -> uint8 (input_size, input_size, 3); raises UnreadableImage with a reason, also for an
        image too small to hold a cell (shorter side under data.images.MIN_CELL_SIDE px)."""
        image = open_rgb(source, max_pixels=max_pixels or self.max_pixels)
        check_cell_size(image.size)
        return self.prepare(image)

    def prepare(self, image: "Image.Image") -> np.ndarray:
        """A decoded RGB image (a cell cut from a photograph) -> uint8 (input_size, input_size, 3), as decode does."""
        return prepare_array(image, self.input_size, self.interpolation, self.white_balance)

    def normalise(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), normalised exactly as in training."""
        x = np.asarray(images, dtype=np.float32).transpose(0, 3, 1, 2)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(1, 3, 1, 1) * 255
        std = np.asarray(self.std, dtype=np.float32).reshape(1, 3, 1, 1) * 255
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)

    @property
    def has_ood(self) -> bool:
        return self.ood_threshold is not None

    def outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(raw logits (N, K) float32, OOD scores (N,) or None) of uint8 images (N, input_size, input_size, 3)."""
        logits, scores = self.engine.outputs(self.normalise(images))
        return logits, scores if self.has_ood else None

    def logits(self, images: np.ndarray) -> np.ndarray:
        """Raw logits (N, K) float32 of uint8 images (N, input_size, input_size, 3)."""
        return self.outputs(images)[0]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, K) float64: softmax(logits / temperature)."""
        from bloodcell.evaluate.calibration import apply_temperature  # start-up time: it imports scipy.optimize

        return apply_temperature(self.logits(images), self.temperature)

    # ------------------------------------------------------------------ public API

    def predict_paths(
        self, paths: str | os.PathLike | Sequence[str | os.PathLike], batch_size: int = 32, progress: bool = True
    ) -> dict:
        """Classify image files and folders (searched recursively for image files); see `summarize`."""
        files = collect_images(paths)
        return self._predict([(str(p), p) for p in files], batch_size, progress)

    def predict_images(
        self, images: Iterable[tuple[str, bytes]], batch_size: int = 32, max_pixels: int | None = None
    ) -> dict:
        """Classify in-memory images given as (name, bytes); the name is only echoed back."""
        return self._predict(list(images), batch_size, progress=False, max_pixels=max_pixels)

    def _predict(
        self, items: list[tuple[str, Any]], batch_size: int, progress: bool, max_pixels: int | None = None
    ) -> dict:
        names, p, ood, unreadable = self.classify(items, batch_size, progress, max_pixels)
        return summarize(names, p, self.class_names, self.review_threshold, unreadable, ood, self.ood_threshold)

    def classify(
        self, items: list[tuple[str, Any]], batch_size: int = 32, progress: bool = False, max_pixels: int | None = None
    ) -> tuple[list[str], np.ndarray, np.ndarray | None, list[dict]]:
        """(names, calibrated probabilities, OOD scores or None, unreadable) of (name, path-or-bytes) items.

        Args:
            items: (name, path or encoded bytes) pairs; the name is only echoed back.
            batch_size: Images per model batch (at least 1).
            progress: Show a progress bar.
            max_pixels: Largest image decoded, in pixels (width x height); None: this predictor's max_pixels.
        """
        from bloodcell.evaluate.calibration import apply_temperature  # start-up time: it imports scipy.optimize

        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")

        names: list[str] = []
        probs: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        unreadable: list[dict] = []
        decode = functools.partial(_decode_item, self, max_pixels=max_pixels)
        # decode a window of images in parallel (PIL releases the GIL), then run the model on it;
        # the window bounds memory for folders of any size
        window = batch_size * max(1, self.workers) * 2
        with (
            progress_bar(len(items), "classifying", enabled=progress) as advance,
            ThreadPoolExecutor(self.workers) as pool,
        ):
            for start in range(0, len(items), window):
                decoded = list(pool.map(decode, items[start : start + window]))
                ok = [(n, a) for n, a, err in decoded if err is None]
                unreadable += [{"path": n, "reason": err} for n, _, err in decoded if err is not None]
                for b in range(0, len(ok), batch_size):
                    chunk = ok[b : b + batch_size]
                    logits, ood = self.outputs(np.stack([a for _, a in chunk]))
                    probs.append(apply_temperature(logits, self.temperature))
                    if ood is not None:
                        scores.append(ood)
                    names += [n for n, _ in chunk]
                    advance(len(chunk))
                advance(len(decoded) - len(ok))
        p = np.concatenate(probs) if probs else np.zeros((0, len(self.class_names)))
        ood = (np.concatenate(scores) if scores else np.zeros(0)) if self.has_ood else None
        return names, p, ood, unreadable


# ---------------------------------------------------------------------- results


def summarize(
    names: Sequence[str],
    probs: np.ndarray,
    class_names: Sequence[str],
    review_threshold: float,
    unreadable: list[dict] | None = None,
    ood_scores: np.ndarray | None = None,
    ood_threshold: float | None = None,
) -> dict:
    """The result object of `predict_*` (documented in docs/inference.md).

    With OOD scores, an image scoring above `ood_threshold` is flagged `ood` and not counted: `counts` and the
    percentages rest on the `counted` images, and `ood_count` says how many were left out. When most images of a
    folder are OOD, `verdict` (folder_verdict) says so once, as the first flag too; otherwise it is None.

    Args:
        names: One name per image, echoed back as each prediction's `path`.
        probs: Calibrated probabilities, (len(names), len(class_names)).
        class_names: The model's classes, in the order of probs' columns.
        review_threshold: An image whose top probability is below this is flagged `review`.
        unreadable: The {"path", "reason"} entries of images that could not be read, passed through.
        ood_scores: One OOD score per image (higher: less like the training cells; NaN counts as OOD); None: no
            OOD check.
        ood_threshold: Scores above this are OOD and not counted; None: no OOD check.
    """
    probs = np.asarray(probs, dtype=np.float64).reshape(len(names), len(class_names))
    has_ood = ood_scores is not None and ood_threshold is not None
    if has_ood:
        ood_scores = np.asarray(ood_scores, dtype=np.float64).reshape(len(names))
    predictions = []
    counts = {c: 0 for c in class_names}
    for i, (name, p) in enumerate(zip(names, probs)):
        top = int(p.argmax())
        label = class_names[top]
        ood = bool(has_ood and not ood_scores[i] <= ood_threshold)  # nan counts as unlike the training cells
        if not ood:
            counts[label] += 1
        predictions.append(
            {
                "path": name,
                "label": label,
                "probabilities": {c: round(float(v), 6) for c, v in zip(class_names, p)},
                "confidence": round(float(p[top]), 6),
                "review": bool(p[top] < review_threshold),
                "ood": ood if has_ood else None,
                "ood_score": round(float(ood_scores[i]), 3) if has_ood and np.isfinite(ood_scores[i]) else None,
            }
        )
    ood_count = sum(bool(p["ood"]) for p in predictions)
    total = len(predictions) - ood_count
    wbc = [c for c in class_names if c in WBC_CLASSES]
    wbc_total = sum(counts[c] for c in wbc)
    percent = {c: _pct(counts[c], total) for c in class_names}
    wbc_percent = {c: _pct(counts[c], wbc_total) for c in wbc}
    flags = [
        f"{text} present: {counts[c]} of {total} cells ({100.0 * counts[c] / total:.1f}%)"
        for c, text in FLAG_CLASSES.items()
        if counts.get(c)
    ]
    verdict = folder_verdict(len(predictions), ood_count)
    if verdict:
        flags.insert(0, verdict["message"])  # one verdict on the whole folder, instead of the line on its OOD images
    elif ood_count:
        which = "all" if ood_count == len(predictions) else f"{ood_count} of {len(predictions)}"
        flags.insert(0, f"{which} images look unlike the cells this model was trained on (OOD): not counted")
    # a differential read from a sample of images: say when it rests on fewer cells than a manual one counts. One image
    # is a question about that cell, not a count, so the line needs at least two classified images.
    if len(predictions) >= 2 and 0 < wbc_total < MANUAL_DIFFERENTIAL_CELLS:
        flags.append(
            f"the differential rests on {wbc_total} white cells (fewer than {MANUAL_DIFFERENTIAL_CELLS}): "
            "read the percentages with care"
        )
    return {
        "predictions": predictions,
        "counted": total,
        "ood_count": ood_count,
        "ood_check": bool(has_ood),
        "counts": counts,
        "percent": percent,
        "wbc_percent": wbc_percent,
        "flags": flags,
        "verdict": verdict,
        "unreadable": list(unreadable or []),
    }


def folder_verdict(images: int, ood_count: int) -> dict | None:
    """The folder-level verdict when the images as a whole look unlike the training cells, else None.

    At least VERDICT_MIN_IMAGES images of which VERDICT_OOD_SHARE or more are flagged OOD: then the folder, not a
    few odd cells, is unlike every lab the model was trained on (another stain, camera or magnification), its count
    rests on few cells or none, and the answer is to adapt the model to that lab or fine-tune it on a few of its
    cells. The message carries no "(OOD)" tag: pages that say the OOD share in a note of their own keep this line.
    """
    if images < VERDICT_MIN_IMAGES or ood_count < VERDICT_OOD_SHARE * images:
        return None
    share = ood_count / images
    counted = images - ood_count
    count = (
        "no cell was counted"
        if counted == 0
        else f"the count leaves them out and rests on the {counted} other{'s' if counted > 1 else ''} only"
    )
    advice = (
        f"adapt the model to this lab's unlabelled cells ({ADAPT_COMMAND}, then predict with --model ADAPTED), "
        f"or label about 5 cells per class and fine-tune ({FINETUNE_COMMAND})"
    )
    message = (
        f"these images as a whole look unlike every lab this model was trained on: {ood_count} of {images} "
        f"({100 * share:.0f}%) are out of distribution, so {count}. Next: {advice}"
    )
    return {
        "kind": "unlike_training_labs",
        "images": images,
        "ood_count": ood_count,
        "ood_fraction": round(share, 4),
        "counted": counted,
        "advice": advice,
        "message": message,
    }


def _pct(n: int, total: int) -> float:
    return round(100.0 * n / total, 2) if total else 0.0


# ---------------------------------------------------------------------- helpers


def _decode_item(predictor: Predictor, item: tuple[str, Any], max_pixels: int | None) -> tuple[str, Any, str | None]:
    """(name, decoded image or None, why it is unreadable or None) of a (name, path-or-bytes) item."""
    name, source = item
    try:
        return name, predictor.decode(source, max_pixels), None
    except UnreadableImage as exc:
        return name, None, str(exc)
    except OSError as exc:  # vanished or unreadable on disk
        return name, None, f"cannot read file: {exc.strerror or exc}"


def collect_images(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Files given explicitly (any name: content decides) plus image files found under folders."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and is_image_name(p) and not p.name.startswith(".")
            )
            if not found:
                raise DataError(f"no image files found in {path} (looked for {' '.join(sorted(IMAGE_SUFFIXES))})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"image or folder not found: {path}")
    if not files:
        raise DataError("no images given")
    return files


def _model_path(model: str | os.PathLike | None) -> Path:
    """The file or folder to load: the bundled model (its ONNX export without PyTorch), or `model` checked."""
    if model is None:
        path = bundled_model_dir()
        return path if has_torch() else path / BUNDLED_ONNX  # the same model, shipped as ONNX (model.json says so)
    path = Path(model)
    if not path.exists():
        raise ModelError(f"model not found: {path} (pass a run directory, its model.safetensors, or an .onnx file)")
    if path.is_dir() and not (path / "model.safetensors").exists() and (path / BUNDLED_ONNX).is_file():
        return path / BUNDLED_ONNX  # a folder holding only an exported model
    return path


def _check_threshold(value: Any, what: str) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ModelError(f"{what} must be a number between 0 and 1, got {value!r}") from None
    if not 0.0 < t <= 1.0:
        raise ModelError(f"{what} must be in (0, 1], got {t}")
    return t

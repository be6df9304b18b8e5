"""Adapt a model to a new lab without labels: `bloodcell adapt FOLDER --out MODEL_DIR`.

A model's BatchNorm layers hold the mean and variance of its training lab's activations; another lab's stain and
camera move them. `adapt_model` reads a folder of the new lab's unlabelled cells through the model's own
preprocessing, re-estimates those statistics on them (AdaBN, bloodcell.models.adapt) and writes a complete model
folder (model.safetensors, model.json with an `adaptation` section, ood.safetensors) that predict, evaluate, serve
and card take as any other. No learned weight changes; the OOD statistics and thresholds are the source model's.

What it refuses, in one line: fewer than MIN_ADAPT_IMAGES readable images, a model without BatchNorm layers, an
output folder that is the source model's or the package's, or one that holds files (unless force). What it warns of,
and records in model.json (`adaptation.warnings`): a folder of one kind of cell, a folder that mixes labs, a folder
the model already reads as its training cells, and cells the adapted model still flags as unlike its training cells.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bloodcell import __version__, io
from bloodcell.data.images import UnreadableImage
from bloodcell.errors import DataError, ModelError
from bloodcell.evaluate.ood import fit_mahalanobis_unlabelled
from bloodcell.evaluate.outputs import predict_outputs
from bloodcell.infer.export import export_bundled
from bloodcell.infer.lab_mix import background_colours, mixed_labs
from bloodcell.infer.predictor import BUNDLED_ONNX, Predictor, collect_images
from bloodcell.models.adapt import MIN_ADAPT_IMAGES, minimise_entropy, norm_layers, recompute_norm_statistics  # torch
from bloodcell.models.checkpoint import save_checkpoint
from bloodcell.models.description import METADATA_FILE, WEIGHTS_FILE, locate, update_description
from bloodcell.models.metadata import bundled_model_dir
from bloodcell.models.ood import OOD_FILE, MahalanobisScore, ScoredModel, save_ood
from bloodcell.models.seal import SEAL_FILE, sealed_names
from bloodcell.progress import progress_bar

METHOD = "batchnorm statistics re-estimated (AdaBN)"
METHOD_TENT = (
    "batchnorm statistics re-estimated (AdaBN), then entropy minimisation of the norm layers' scale and shift (Tent)"
)
# Statistics settle long before this many cells; a larger folder is subsampled (seeded) so memory stays bounded
# (5,000 images at 224 px are 750 MB).
MAX_ADAPT_IMAGES = 5000
# One kind of cell: this share of the folder in one class (see one_kind_of_cell).
ONE_CLASS_SHARE = 0.9
# The folder already looks like the training cells when fewer than this share is flagged OOD before adapting.
ALREADY_LIKE_TRAINING = 0.10


def _dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


_DIR_MODE = _dir_mode()  # mkdtemp makes 0700 folders; the model folder gets the mode mkdir would give it

ONE_KIND_WARNING = (
    "{what}: statistics re-estimated from one kind of cell shift every class; "
    "adapt on a folder of mixed cells as a smear gives them"
)


def adapt_model(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str | os.PathLike | None = None,
    device: str = "cpu",
    progress: bool = True,
    force: bool = False,
    onnx: bool = False,
    batch_size: int = 64,
    max_images: int = MAX_ADAPT_IMAGES,
    tent: bool = False,
) -> dict:
    """Re-estimate `model`'s BatchNorm statistics on the images under `folder`; write the adapted model to `out_dir`.

    Args:
        folder: the new lab's unlabelled cells (searched recursively).
        out_dir: where the adapted model folder goes (not the source's, not inside the package).
        model: None or "default" (the bundled model), a run / model folder or its model.safetensors.
        device: cpu, cuda, cuda:N or auto.
        progress: show progress bars.
        force: write into an `out_dir` that holds files (its model files are replaced; a model.onnx or MODEL_CARD.md
            there, which would describe other weights, is removed).
        onnx: also write model.onnx (bloodcell.infer.export, checked against PyTorch) and describe it in model.json,
            for installs without PyTorch.
        batch_size: images per forward pass.
        max_images: a larger folder is subsampled (seeded) to this many images.
        tent: after AdaBN, also train the norm layers' scale and shift to make the predictions on the folder
            confident (models.adapt.minimise_entropy; docs/labs.md has what it adds in the leave-one-lab-out study).

    Returns:
        {"out", "images", "images_found", "unreadable" (list of {path, reason}), "norm_layers", "ood_before",
        "ood_after" (shares flagged OOD; None without an OOD score), "predicted_after" (class -> images),
        "warnings" (one line each), "adaptation" (the section written into model.json)}.
    """
    folder, out_dir = Path(folder), Path(out_dir)
    source = _source_folder(model)
    _check_out_dir(out_dir, source, force)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}" if not folder.exists() else f"{folder} is not a folder")
    predictor = _adaptable(source, model, device)
    found, images, unreadable = _read_folder(predictor, folder, max_images, progress)

    warnings = _mixed_labs_warning(folder, images)
    labels_before, ood_before = _score(predictor, images, batch_size, progress, "scoring (source model)")
    layers, ood_stats = _adapt(predictor, images, batch_size, tent)
    labels_after, ood_after = _score(predictor, images, batch_size, progress, "scoring (adapted model)")
    warnings += _result_warnings(folder, model, predictor, labels_before, ood_before, labels_after)

    adaptation = _adaptation_record(
        predictor,
        folder,
        model,
        source,
        tent=tent,
        counts=(len(images), len(found), len(unreadable), layers),
        ood=(ood_before, ood_after),
        labels_after=labels_after,
        warnings=warnings,
    )
    _write_adapted(predictor, adaptation, ood_stats, out_dir, onnx, f"{len(images)} unlabelled cells of {folder.name}")
    return {
        "out": str(out_dir),
        "images": int(len(images)),
        "images_found": int(len(found)),
        "unreadable": unreadable,
        "norm_layers": int(layers),
        "ood_before": adaptation["ood_fraction_before"],
        "ood_after": adaptation["ood_fraction_after"],
        "predicted_after": adaptation["predicted_after"],
        "warnings": warnings,
        "adaptation": adaptation,
    }


def _adaptation_record(
    predictor: Predictor,
    folder: Path,
    model: str | os.PathLike | None,
    source: Path,
    *,
    tent: bool,
    counts: tuple[int, int, int, int],
    ood: tuple[np.ndarray | None, np.ndarray | None],
    labels_after: np.ndarray,
    warnings: list[str],
) -> dict[str, Any]:
    """model.json's `adaptation`: how, on what (`counts`: images used, found, unreadable; norm layers), from which
    weights, and the OOD shares and predicted classes it left (`ood`: flags before and after)."""
    images, found, unreadable, layers = counts
    ood_before, ood_after = ood
    predicted = np.bincount(labels_after, minlength=len(predictor.class_names))
    return {
        "method": METHOD_TENT if tent else METHOD,
        "folder": str(folder.resolve()),
        "images": int(images),
        "images_found": int(found),
        "unreadable": int(unreadable),
        "norm_layers": int(layers),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "model": _name(model),
            "model_name": predictor.model_name,
            "weights_sha256": io.file_sha256(locate(source)[0]),
        },
        "ood_fraction_before": None if ood_before is None else round(float(ood_before.mean()), 4),
        "ood_fraction_after": None if ood_after is None else round(float(ood_after.mean()), 4),
        "predicted_after": {c: int(k) for c, k in zip(predictor.class_names, predicted)},
        "warnings": warnings,
        "bloodcell_version": __version__,
    }


def _adapt(predictor: Predictor, images: np.ndarray, batch_size: int, tent: bool) -> tuple[int, tuple | None]:
    """AdaBN (then Tent) on the lab's images, and the OOD score refitted: (norm layers, OOD statistics or None)."""
    layers = recompute_norm_statistics(predictor.model, images, batch_size=batch_size, device=predictor.device)
    if tent:
        minimise_entropy(predictor.model, images, batch_size=batch_size, device=predictor.device)
    # The adapted model reads this lab's cells, every one of which differs from the training lab's stain and camera:
    # its OOD check is refitted to flag what looks unlike *them* (the lab's own cells, named by the model's
    # predictions, no labels), or it would leave every cell of the lab out of the count.
    ood_stats = _refit_ood(predictor, images, batch_size) if predictor.has_ood else None
    if ood_stats is not None:
        predictor.scored_model = _scored(predictor.model, ood_stats).to(predictor.device).eval()
        predictor.ood_threshold = ood_stats[2]
    return layers, ood_stats


def _adaptable(source: Path, model: str | os.PathLike | None, device: str) -> Predictor:
    """The source model, loaded on PyTorch; a one-line ModelError when it has no BatchNorm layer to adapt."""
    predictor = Predictor.load(source, device=device)
    if not norm_layers(predictor.model):
        kwargs = predictor.description.model_kwargs or {}
        raise ModelError(
            f"{_label(model)}: a '{predictor.model_name}'{f' with {kwargs}' if kwargs else ''} has no BatchNorm "
            "layers (GroupNorm / LayerNorm normalise each image by itself): nothing to adapt"
        )
    return predictor


def _read_folder(predictor: Predictor, folder: Path, max_images: int, progress: bool) -> tuple[list, np.ndarray, list]:
    """(the images found, the readable ones decoded (at most max_images, seeded), the unreadable with reasons)."""
    found = collect_images(folder)
    files = found
    if len(found) > max_images:
        keep = np.sort(np.random.default_rng(0).choice(len(found), max_images, replace=False))
        files = [found[i] for i in keep]
    images, unreadable = _decode_all(predictor, files, progress)
    if len(images) < MIN_ADAPT_IMAGES:
        raise DataError(
            f"{folder}: {len(images)} readable images ({len(unreadable)} unreadable); adaptation needs at least "
            f"{MIN_ADAPT_IMAGES} of the new lab's cells, fewer give statistics noisier than the training lab's"
        )
    return found, images, unreadable


def _mixed_labs_warning(folder: Path, images: np.ndarray) -> list[str]:
    lab_split = mixed_labs(background_colours(images))
    if not lab_split:
        return []
    return [
        f"{folder} looks like more than one lab or stain: its backgrounds form two groups "
        f"({lab_split[0]} and {lab_split[1]} images, colours {lab_split[2]} and {lab_split[3]}); "
        "adapt on each lab's cells separately"
    ]


def _result_warnings(
    folder: Path,
    model,
    predictor: Predictor,
    labels_before: np.ndarray,
    ood_before: np.ndarray | None,
    labels_after: np.ndarray,
) -> list[str]:
    """One kind of cell in the folder; a folder that already looked like the training cells."""
    warnings = []
    one_kind = one_kind_of_cell(labels_before, ood_before, labels_after, len(predictor.class_names))
    if one_kind:
        warnings.append(ONE_KIND_WARNING.format(what=f"{folder}: {one_kind}"))
    if ood_before is not None and ood_before.mean() < ALREADY_LIKE_TRAINING:
        changed = float((labels_before != labels_after)[~ood_before].mean())
        warnings.append(
            f"{folder}: {100 * (1 - ood_before.mean()):.0f} % of its images already look like the training "
            f"cells of {_label(model)}: adapting is not needed, "
            f"and it changed the class of {100 * changed:.0f} % of them"
        )
    return warnings


def _write_adapted(
    predictor: Predictor, adaptation: dict, ood_stats: tuple | None, out_dir: Path, onnx: bool, cells: str
) -> None:
    """The adapted model folder: weights, model.json (the source's, with `adaptation` and the refitted `ood`),
    ood.safetensors and, with `onnx`, model.onnx.

    The folder is built beside out_dir and moved in file by file, model.json last: an interrupted run leaves no
    folder, or one without model.json, never new weights under the old description."""
    # the source's onnx and quantization sections described its model.onnx, which is not copied
    meta = predictor.description.replace(onnx=None, quantization=None, adaptation=adaptation).to_dict()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.adapt-", dir=out_dir.parent))
    try:
        os.chmod(work, _DIR_MODE)
        save_checkpoint(predictor.model, work, meta)
        adaptation["weights_sha256"] = io.file_sha256(work / WEIGHTS_FILE)
        sections: dict[str, Any] = {"adaptation": adaptation}
        if ood_stats is not None:
            save_ood(work, ood_stats[0], ood_stats[1])
            sections["ood"] = {
                **(meta.get("ood") or {}),
                "file": OOD_FILE,
                "threshold": ood_stats[2],
                "fitted_on": f"{cells} after adaptation (classes as the adapted model names them; "
                "statistics on one half, threshold on the other)",
            }
        update_description(work, **sections)  # and re-seal (bloodcell.models.seal)
        if onnx:
            export_bundled(work)  # model.onnx, checked, and model.json's `onnx` section with the new weights' hashes
        _move_into(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------- the checks


def one_kind_of_cell(
    labels_before: np.ndarray, ood_before: np.ndarray | None, labels_after: np.ndarray, classes: int
) -> str | None:
    """Why the folder looks like one kind of cell, or None.

    Two signs, either enough. (1) The source model reads at least half the folder as cells like its training cells
    and calls ONE_CLASS_SHARE of those one class: on its own lab it is right (97 % on PBC), so the folder is one
    kind. (2) The adapted model calls ONE_CLASS_SHARE of the folder one class. Measured with the bundled model on 200
    PBC cells of each class: sign (1) caught all 8 one-class folders (94-100 % one class) and none of the mixed or
    smear-like ones (14-58 %); sign (2) caught none of them (26-82 %: statistics of one kind of cell scatter the
    classes rather than gather them). A folder of one kind of cell from a lab the model does not know (all OOD) is
    caught by neither.

    Args:
        labels_before: The class index the source model gives each image, one per image.
        ood_before: The source model's OOD flag per image (True: unlike its training cells); None counts every image
            as known.
        labels_after: The class index the adapted model gives each image.
        classes: The number of classes (minlength of the class counts).
    """
    known = np.ones(len(labels_before), bool) if ood_before is None else ~ood_before
    if known.sum() >= max(1, len(labels_before) / 2):
        counts = np.bincount(labels_before[known], minlength=classes)
        if counts.max() >= ONE_CLASS_SHARE * known.sum():
            return f"the source model calls {100 * counts.max() / known.sum():.0f} % of the cells it knows one class"
    counts = np.bincount(labels_after, minlength=classes)
    if counts.max() >= ONE_CLASS_SHARE * len(labels_after):
        return f"the adapted model calls {100 * counts.max() / len(labels_after):.0f} % of the images one class"
    return None


# ---------------------------------------------------------------------- helpers


def _name(model: str | os.PathLike | None) -> str:
    return "default" if model is None or str(model) == "default" else str(model)


def _label(model: str | os.PathLike | None) -> str:
    return "the bundled model" if _name(model) == "default" else str(model)


def _source_folder(model: str | os.PathLike | None) -> Path:
    """The folder of the model to adapt (its model.safetensors + model.json)."""
    if model is None or str(model) == "default":
        return bundled_model_dir()
    path = Path(model)
    if path.suffix.lower() == ".onnx":
        raise ModelError(
            f"{path} is an ONNX export: adapting needs the PyTorch weights (the run directory with {WEIGHTS_FILE})"
        )
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not path.is_dir():
        raise ModelError(f"model not found: {path} (pass a run directory, its {WEIGHTS_FILE}, or 'default')")
    if not (path / WEIGHTS_FILE).is_file():
        raise ModelError(f"{path} holds no {WEIGHTS_FILE}: adapting needs the PyTorch weights")
    return path


def _check_out_dir(out_dir: Path, source: Path, force: bool) -> None:
    """Refuse to write over the source model or the package's models; refuse a folder holding files unless force."""
    target = out_dir.resolve()
    assets = bundled_model_dir().resolve().parent if _has_bundled() else None
    if target == source.resolve():
        raise DataError(f"--out {out_dir} is the model being adapted: write the adapted model to another folder")
    if assets is not None and (target == assets or assets in target.parents):
        raise DataError(f"--out {out_dir} is inside the package's assets ({assets}): write the adapted model elsewhere")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--out {out_dir} is a file, not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise DataError(
            f"--out {out_dir} exists and holds files: "
            "choose an empty or new folder, or add --force to replace its model"
        )


def _has_bundled() -> bool:
    try:
        bundled_model_dir()
    except ModelError:
        return False
    return True


def _move_into(work: Path, out_dir: Path) -> None:
    """Move the finished folder `work` to `out_dir`: a rename when out_dir is new, else file by file, model.json and
    then its seal last (until the seal lands, the folder fails its check instead of passing with old files)."""
    if not out_dir.exists():
        os.replace(work, out_dir)
        return
    (out_dir / METADATA_FILE).unlink(missing_ok=True)  # until the new one lands, the folder is no model at all
    for stale in (
        BUNDLED_ONNX,
        "MODEL_CARD.md",
        *sealed_names(out_dir),
    ):  # would describe other weights, or be unsealed
        if not (work / stale).exists():
            (out_dir / stale).unlink(missing_ok=True)
    for item in sorted(work.iterdir(), key=lambda p: (p.name == SEAL_FILE, p.name == METADATA_FILE)):
        os.replace(item, out_dir / item.name)


def _decode_all(predictor: Predictor, files: list[Path], progress: bool) -> tuple[np.ndarray, list[dict]]:
    """The readable files as the model's input (uint8 N x S x S x 3) and the unreadable ones with reasons."""

    def decode(path: Path):
        try:
            return predictor.decode(path), None
        except UnreadableImage as exc:
            return None, str(exc)
        except OSError as exc:
            return None, f"cannot read file: {exc.strerror or exc}"

    arrays, unreadable = [], []
    with (
        progress_bar(len(files), "reading images", enabled=progress) as advance,
        ThreadPoolExecutor(predictor.workers) as pool,
    ):
        for path, (array, reason) in zip(files, pool.map(decode, files)):
            if array is None:
                unreadable.append({"path": str(path), "reason": reason})
            else:
                arrays.append(array)
            advance()
    s = predictor.input_size
    return (np.stack(arrays) if arrays else np.zeros((0, s, s, 3), np.uint8)), unreadable


def _refit_ood(predictor: Predictor, images: np.ndarray, batch_size: int) -> tuple:
    """(means, precision, threshold) of the Mahalanobis score on the adapted model's features of the lab's cells."""
    logits, features = predict_outputs(
        predictor.model, images, np.arange(len(images)), batch_size=batch_size, device=predictor.device
    )
    false_alarm = float(predictor.description.ood.false_alarm_target or 0.01)
    return fit_mahalanobis_unlabelled(features, logits, false_alarm)


def _scored(net, stats: tuple):
    return ScoredModel(net, MahalanobisScore(stats[0], stats[1]))


def _score(
    predictor: Predictor, images: np.ndarray, batch_size: int, progress: bool, what: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """(predicted class per image, OOD flag per image or None) of decoded images."""
    labels, flags = [], []
    with progress_bar(len(images), what, enabled=progress) as advance:
        for start in range(0, len(images), batch_size):
            logits, scores = predictor.outputs(images[start : start + batch_size])
            labels.append(logits.argmax(axis=1))
            if scores is not None:
                flags.append(~(scores <= predictor.ood_threshold))  # nan counts as unlike, as in predict
            advance(len(logits))
    return np.concatenate(labels), (np.concatenate(flags) if flags and predictor.has_ood else None)

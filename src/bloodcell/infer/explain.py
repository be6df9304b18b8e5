"""Grad-CAM overlays: which part of the cell image drove the predicted class.

The target layer is found generically: a dummy forward pass records every sub-module that outputs a
4-D feature map, and the last one to fire (the last convolutional stage before global pooling) is
used. Models with parallel backbones (the hybrid) get the last stage of each backbone; a model can
also name its own layers with a `gradcam_target_layers()` method.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from bloodcell.data.images import UnreadableImage, open_rgb
from bloodcell.errors import ModelError
from bloodcell.extras import needs_train_extra
from bloodcell.infer.predictor import collect_images
from bloodcell.io import write_bytes

# torch, pytorch-grad-cam and the models are imported in the functions that use them: the server imports this module
# in the light install, which has none of them (a server of an ONNX model answers /explain with 501).

DISPLAY_SIZE = 256  # pixels per panel in the written PNG


def target_layers(model) -> list:
    """The modules whose activations Grad-CAM weighs (see the module docstring)."""
    custom = getattr(model, "gradcam_target_layers", None)
    if callable(custom):
        return list(custom())
    from bloodcell.models.transfer import HybridClassifier

    branches = [model.inception, model.xception] if isinstance(model, HybridClassifier) else [model]
    return [_last_feature_map_module(model, branch) for branch in branches]


def _last_feature_map_module(model, within):
    import torch

    fired: list = []

    def hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            fired.append(module)

    handles = [m.register_forward_hook(hook) for m in within.modules() if m is not within and m is not model]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, model.input_size, model.input_size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    if not fired:
        raise ModelError(
            f"model '{getattr(model, 'model_name', type(model).__name__)}' "
            "has no convolutional feature map for Grad-CAM"
        )
    return fired[-1]


def _require_torch(predictor):
    if predictor.model is None:
        raise ModelError(f"Grad-CAM needs the PyTorch model (a run directory), not the ONNX export {predictor.source}")


def gradcam(predictor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cams (N, S, S) in [0, 1], calibrated probabilities (N, K)) for uint8 images (N, S, S, 3)."""
    _require_torch(predictor)
    with needs_train_extra("Grad-CAM"):
        import torch
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    probs = predictor.probabilities(images)
    x = torch.from_numpy(predictor.normalise(images)).to(predictor.device)
    model = predictor.model
    with predictor._lock, torch.enable_grad():
        layers = target_layers(model)
        with GradCAM(model=model, target_layers=layers) as cam:
            maps = cam(input_tensor=x, targets=[ClassifierOutputTarget(int(k)) for k in probs.argmax(1)])
        model.zero_grad(set_to_none=True)
    return np.nan_to_num(np.asarray(maps, dtype=np.float32)), probs


def render_overlay(image, cam: np.ndarray, title: str) -> bytes:
    """PNG bytes: the cell beside its Grad-CAM overlay, with `title` above."""
    # matplotlib here, not at the top: a server that never draws an overlay does not pay for it at start-up
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    with needs_train_extra("Grad-CAM"):
        from pytorch_grad_cam.utils.image import show_cam_on_image

    shown = np.asarray(image.convert("RGB").resize((DISPLAY_SIZE, DISPLAY_SIZE)), dtype=np.float32) / 255.0
    heat = np.asarray(Image.fromarray(cam.astype(np.float32)).resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.BILINEAR))
    overlay = show_cam_on_image(shown, np.clip(heat, 0, 1), use_rgb=True, image_weight=0.55)
    fig = Figure(figsize=(6.0, 3.4), dpi=100)
    for k, (img, name) in enumerate(((shown, "cell"), (overlay, "Grad-CAM"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.imshow(img)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=12, fontweight="bold")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _title(predictor, p: np.ndarray) -> str:
    k = int(p.argmax())
    text = f"{predictor.class_names[k]} {100 * p[k]:.1f}%"
    if p[k] < predictor.review_threshold:
        text += f"  (review: below {100 * predictor.review_threshold:.0f}%)"
    return text


def explain_bytes(predictor, data: bytes, max_pixels: int | None = None) -> bytes:
    """One encoded image in memory -> PNG overlay; raises UnreadableImage for bad content."""
    _require_torch(predictor)
    img = open_rgb(data, max_pixels=max_pixels or predictor.max_pixels)
    arr = predictor.decode(data, max_pixels)
    cams, probs = gradcam(predictor, arr[None])
    return render_overlay(img, cams[0], _title(predictor, probs[0]))


def explain_paths(
    predictor,
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    batch_size: int = 8,
    skipped: list | None = None,
) -> list[Path]:
    """Write `<stem>.gradcam.png` per image into out_dir (atomically); return the paths written.

    Folders are searched recursively like `predict`. Unreadable files are skipped and, when
    `skipped` is a list, appended to it as {"path", "reason"}.

    Args:
        predictor: A Predictor with the PyTorch weights loaded (Grad-CAM needs torch; an ONNX one raises).
        paths: Image files and/or folders (searched recursively).
        out_dir: Folder the overlays are written into.
        batch_size: Images per Grad-CAM forward/backward pass.
        skipped: A list to append the unreadable files to; None drops them silently.
    """
    _require_torch(predictor)
    out_dir = Path(out_dir)
    loaded = []
    for f in collect_images(paths):
        try:
            loaded.append((f, open_rgb(f, max_pixels=predictor.max_pixels), predictor.decode(f)))
        except (UnreadableImage, OSError) as exc:
            if skipped is not None:
                skipped.append({"path": str(f), "reason": str(exc)})
    written: list[Path] = []
    used: set[str] = set()
    for start in range(0, len(loaded), batch_size):
        chunk = loaded[start : start + batch_size]
        cams, probs = gradcam(predictor, np.stack([a for _, _, a in chunk]))
        for (f, img, _), cam, p in zip(chunk, cams, probs):
            name, k = f"{f.stem}.gradcam.png", 2
            while name in used:  # same file name in two folders
                name, k = f"{f.stem}-{k}.gradcam.png", k + 1
            used.add(name)
            target = out_dir / name
            write_bytes(target, render_overlay(img, cam, _title(predictor, p)))
            written.append(target)
    return written

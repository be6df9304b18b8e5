"""Decoding one image safely: any format PIL reads, any mode, converted to 8-bit RGB.

Everything that can go wrong with a single file becomes an `UnreadableImage` carrying a short reason,
so callers can skip it and report it instead of crashing.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

# Suffixes we treat as images; anything else inside a class folder is reported, never decoded.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
# A PBC original is 360x363 (~0.13 MP); 40 MP is far beyond any single-cell image but below what would
# exhaust memory, so anything larger is treated as a possible decompression bomb.
DEFAULT_MAX_PIXELS = 40_000_000
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "area": Image.Resampling.BOX,
}

# The shortest side an image classified as one cell may have: a PBC crop is about 360 px, a Tecom one 120 px; below
# 16 px (a 1x1 upload, an icon, a thumbnail's corner) there is no cell to see, and upscaling it only invents one.
MIN_CELL_SIDE = 16

# How a model may ask for its input's colour cast to be removed before anything else (model.json: preprocess).
WHITE_BALANCES = ("none", "background")
BACKGROUND_PERCENTILE = 95  # a smear's background is its brightest large area: 5 % of pixels may be brighter

# A truncated JPEG must fail, not decode with grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class UnreadableImage(Exception):
    """One file cannot be used as an image; str(exc) is the reason shown to the user."""


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Transparency is flattened onto white (a smear's background is light)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert('RGB') clips these to 0..255 instead of scaling; scale by the type's range.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        if img.mode == "I" and arr.max() <= 255:
            top = 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def open_rgb(source: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode fully and return an RGB image, or raise UnreadableImage with a one-line reason."""
    try:
        if isinstance(source, (bytes, bytearray)):
            if len(source) == 0:
                raise UnreadableImage("empty file (0 bytes)")
            fh = io.BytesIO(source)
        else:
            path = Path(source)
            if path.stat().st_size == 0:
                raise UnreadableImage("empty file (0 bytes)")
            fh = open(path, "rb")
        with fh:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fh)
                w, h = img.size
                if w * h > max_pixels:
                    raise UnreadableImage(f"too many pixels ({w}x{h} > {max_pixels:,}); possible decompression bomb")
                img.load()  # full decode: catches truncated and corrupt data
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            return _to_rgb(img)
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"too many pixels; possible decompression bomb ({exc})") from None
    except Image.UnidentifiedImageError:
        raise UnreadableImage("not an image (unrecognised content)") from None
    except OSError as exc:
        msg = str(exc) or type(exc).__name__
        if "truncated" in msg.lower() or "premature end" in msg.lower():
            raise UnreadableImage(f"truncated image data ({msg})") from None
        raise UnreadableImage(f"cannot decode: {msg}") from None
    except (ValueError, SyntaxError, MemoryError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(f"cannot decode: {exc}") from None


def check_cell_size(size: tuple[int, int]) -> None:
    """Raise UnreadableImage when an image of `size` (width, height) is too small to be classified as one cell."""
    w, h = size
    if min(w, h) < MIN_CELL_SIDE:
        raise UnreadableImage(
            f"too small to hold a blood cell: {w}x{h} px (a cell image needs at least {MIN_CELL_SIDE} px a side)"
        )


def balance_background(arr: np.ndarray) -> np.ndarray:
    """Von Kries white balance: scale each channel so the image's bright background becomes white.

    Another lab's lamp, camera and stain tint the whole field (the Tecom set's background is yellow, PBC's pale
    pink); dividing by the background colour removes that cast and keeps each cell's colour relative to it.
    """
    ref = np.percentile(arr.reshape(-1, 3), BACKGROUND_PERCENTILE, axis=0).clip(min=1.0)
    return np.clip(arr.astype(np.float32) * (255.0 / ref) + 0.5, 0, 255).astype(np.uint8)


def load_array(
    source: str | Path | bytes,
    size: int | None = None,
    interpolation: str = "nearest",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    white_balance: str = "none",
) -> np.ndarray:
    """Decode to a uint8 (H, W, 3) array, resized to size x size when `size` is given, then white-balanced.

    Args:
        source: a file path or the file's bytes.
        size: the side in pixels of the square output; None: the image's own size.
        interpolation: a key of INTERPOLATIONS (nearest, bilinear, bicubic, lanczos, area).
        max_pixels: a larger image (width x height) is an UnreadableImage (possible decompression bomb).
        white_balance: "none", or "background" (balance_background, after resizing).
    """
    return prepare_array(open_rgb(source, max_pixels=max_pixels), size, interpolation, white_balance)


def prepare_array(
    img: Image.Image, size: int | None = None, interpolation: str = "nearest", white_balance: str = "none"
) -> np.ndarray:
    """An RGB image as a model sees it: resized to size x size when `size` is given, then white-balanced.

    Args:
        img: an RGB image (e.g. open_rgb's).
        size: the side in pixels of the square output; None: the image's own size.
        interpolation: a key of INTERPOLATIONS (nearest, bilinear, bicubic, lanczos, area).
        white_balance: "none", or "background" (balance_background, after resizing); anything else is a ValueError.
    """
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), INTERPOLATIONS[interpolation])
    arr = np.asarray(img, dtype=np.uint8)
    if white_balance == "background":
        arr = balance_background(arr)
    elif white_balance != "none":
        raise ValueError(f"unknown white_balance '{white_balance}'; choose one of {', '.join(WHITE_BALANCES)}")
    return arr

"""Photographs with their cells drawn: boxes coloured by kind, a label above each white cell."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# red cells, white cells, platelets; a flagged white cell (review or OOD) is drawn in orange
KIND_COLOURS = {"rbc": (220, 40, 40), "wbc": (30, 90, 230), "platelet": (20, 150, 60)}
FLAG_COLOUR = (240, 140, 0)
TRUTH_COLOUR = (255, 255, 255)


def draw_cells(image: np.ndarray | Image.Image, cells: Sequence[dict], truth: np.ndarray | None = None) -> Image.Image:
    """cells: dicts with `box` (x0 y0 x1 y1), `kind`, optional `label` (text) and `flagged`.
    truth: optional (N, 4) true boxes, drawn thin and dashed-white underneath for comparison."""
    img = (image if isinstance(image, Image.Image) else Image.fromarray(image)).convert("RGB").copy()
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 320))
    font = ImageFont.load_default(size=max(11, round(max(img.size) / 45)))
    for box in [] if truth is None else truth:
        draw.rectangle([float(v) for v in box], outline=TRUTH_COLOUR, width=1)
    # white cells last so their labels sit on top
    for cell in sorted(cells, key=lambda c: c["kind"] == "wbc"):
        colour = FLAG_COLOUR if cell.get("flagged") else KIND_COLOURS.get(cell["kind"], (0, 0, 0))
        x0, y0, x1, y1 = (float(v) for v in cell["box"])
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width if cell["kind"] != "rbc" else max(1, width - 1))
        text = cell.get("label")
        if text:
            left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
            ty = y0 - (bottom - top) - 4 if y0 - (bottom - top) - 4 >= 0 else y1 + 2
            tx = min(max(0.0, x0), img.size[0] - (right - left) - 4)
            draw.rectangle([tx, ty, tx + right - left + 4, ty + bottom - top + 4], fill=colour)
            draw.text((tx + 2, ty + 2 - top), text, fill=(255, 255, 255), font=font)
    return img

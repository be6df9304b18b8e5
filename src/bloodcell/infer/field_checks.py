"""Checks on a smear photograph that say when its counts cannot be trusted, in one plain sentence each.

The detector answers any image with boxes. On a photograph it was not made for (too dark, blown out, a stitched
strip, another magnification) it finds few or no cells, and the counts are wrong without a sign. These checks look
at the photograph and at the boxes kept, and return a list of problems, severe ones first. FieldReader withholds the
counts of a photograph with a severe problem and answers with its sentence. numpy only: the light install runs them.

    code            measured on                                          severe (counts withheld)
    dark            median luminance of the photograph, before detection  below 73; a warning (dim) below 125
    overexposed     share of blown-out white pixels (luminance >= 250)     from 80 %; a warning from 5 %
    panorama        long side / short side                                 above 2.5
    magnification   median red-cell box side (sqrt of the area) in the     outside 0.72-1.8 x the p50 of the
                    detector's pixels (long side 384 for FCOS)             photographs it was trained on
    few_red_cells   fewer than 3 red cells: no magnification verdict       no (a warning)
    no_cells        nothing found: "no cells found", with the likely       no (it is the answer)
                    reason when another check points to one

How the thresholds were set: benchmarks/field_checks.py, the bundled detector (its ONNX export), on 2 shared cores
of an AMD EPYC (AVX2, AVX-512, no GPU). Good photographs: TXL-PBC val + test (432, four labs) and every BCCD
photograph (364). Spoiled: 25 val/test photographs per lab (BCCD's own test split for BCCD), 100 per kind.
- dark: real photographs have a median luminance of 92 or more, darkened x0.25 ones 58 or less: 73 lies between.
  Below 125 the detector misses red cells: on TXL-PBC's own photographs it finds 1 of 176 labelled below 110 and
  15 % from 110 to 125, against 46 % above 160 (it misses half of TXL-PBC's red cells anyway: it was trained on BCCD's
  labels, which leave many out). Darkened x0.5, no red cell is found at all.
- overexposed: real photographs have at most 0.1 % of blown-out pixels. Brightened photographs (x1.5, x2, clipped)
  keep a median 89 % of their red cells with 60-80 % white, 30 % with 80-90 % and 11 % above: the counts are
  withheld from 80 %.
- panorama: real photographs are 4:3 or squarer (a camera's 16:9 is 1.78); two 4:3 fields side by side are 2.67.
- magnification: the detector boxes cells at the sizes it learned, so a change of scale shows weakened. Cells half
  the size (2 x 2 photographs at half size) read 45.6-54.4 px; the smallest median of a real photograph is 54.4
  (1,726 photographs with 3+ red cells, training ones included): the bound, 0.72 x 74.3 = 53.5, lies just below
  it. At twice the size it finds fewer red cells (medians 56-84 px, inside the real range, whose largest is 99.6),
  so cells too large show as few_red_cells, not as a verdict. The upper bound, 1.8 x p50, is set by the labelled
  boxes (their largest photograph median is 1.71 x their p50) for a detector that boxes large cells as large.
- Fallback reference (a detector without `cell_scale` in its state, as the BCCD-only detector bundled before this one):
  FALLBACK_CELL_SCALE, every red-cell box the bundled detector keeps on BCCD train + TXL-PBC train (1,213 photographs,
  9,263 boxes): p05 57.9, p50 74.3, p95 93.8 px at its 384 px scale. The labelled boxes of the same photographs
  (detect.base.cell_scale) give p50 67.1.

Figures (benchmarks/field_checks.py):
- good photographs: none withheld (0 of 796); warnings on 21 of the 432 TXL-PBC ones (few_red_cells on 20, dim on
  9; all Raabin or bcd), none on BCCD's;
- darkened x0.25: 100 of 100 caught, withheld; darkened x0.5: 100 caught (17 withheld, 83 dim warnings);
- brightened x2: 100 caught (68 withheld); x1.5: 93 caught (16 withheld);
- 1 x 4 strips: 100 caught, withheld;
- cells half the size: 88 caught, withheld (BCCD 16 of 25, bcd 24, PBC 25, Raabin 23); 9 others get few_red_cells,
  3 nothing (medians 53.5-54.4, at the bound);
- cells twice the size: none caught as magnification; 63 get few_red_cells (11 of them also dim), 1 no_cells, 36
  nothing: the detector does not box cells larger than it learned (see above);
- the whole photograph resized x2 or x0.5 (the same field in more or fewer pixels): the detector sees the same image;
  99 of 100 get the same problems as their original (none for 96).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Luminance weights of ITU-R BT.601, as PIL's convert("L")
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# The exposure statistics are taken on at most about this many pixels: a 16-million-pixel photograph is subsampled
EXPOSURE_PIXELS = 1_000_000

# Each threshold is justified by a measurement in the docstring above
DARK_MEDIAN = 73.0  # between darkened photographs (58 or less) and real ones (92 or more)
DIM_MEDIAN = 125.0  # below it the detector finds a third of the red cells it finds in brighter photographs, or none
WHITE_LEVEL = 250.0  # luminance of a blown-out pixel
OVEREXPOSED_WARN = 0.05  # 50 times the most that real photographs show (0.1 %)
OVEREXPOSED_SEVERE = 0.80  # from here the detector keeps under a third of the red cells
PANORAMA_ASPECT = 2.5  # above a camera's 16:9 (1.78), below two 4:3 fields side by side (2.67)
MIN_RED_CELLS = 3  # as the crop ruler (data.fields.crop_side): a median of fewer says little

# The red-cell box sides (sqrt of the area, in the detector's pixels) of the bundled detector's photographs, used
# where the detector's state has no `cell_scale` of its own: every red-cell box the bundled detector keeps on the
# training photographs of BCCD (train, 205) and TXL-PBC (train, 1,008), as detect.base.cell_scale writes it
FALLBACK_CELL_SCALE = {
    "rbc_side_px": {"p05": 57.9, "p50": 74.3, "p95": 93.8},
    "long_side": 384,
    "photos": 1213,
    "boxes": 9263,
}
# A photograph's median red-cell side is accepted from BAND_LOW to BAND_HIGH times the reference's p50. The p50, not
# p05 / p95: those of single boxes are set by cells cut by the photograph's edge (p05 39 px as labelled, where the
# smallest photograph median is 51).
BAND_LOW = 0.72
BAND_HIGH = 1.8


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a photograph: a short code, one sentence (what was seen, what to do), the number."""

    code: str
    message: str
    severe: bool  # the counts mean nothing: withheld
    value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------ the photograph itself


def luminance(image: np.ndarray) -> np.ndarray:
    """Luminance (0-255, float32) of an H x W x 3 uint8 photograph, on a regular subsample of at most ~1 M pixels."""
    h, w = image.shape[:2]
    step = max(1, int(np.ceil(np.sqrt(h * w / EXPOSURE_PIXELS))))
    return image[::step, ::step].astype(np.float32) @ LUMA


def exposure(image: np.ndarray) -> dict[str, float]:
    """Median luminance and the share of blown-out white pixels (luminance >= WHITE_LEVEL)."""
    y = luminance(image)
    return {"median_luminance": float(np.median(y)), "white_fraction": float((y >= WHITE_LEVEL).mean())}


def exposure_problems(seen: dict[str, float]) -> list[Problem]:
    """`dark` when the median luminance is below DARK_MEDIAN (a warning below DIM_MEDIAN); `overexposed` when much
    of it is blown-out white (`seen`: what exposure() measured)."""
    y, white = seen["median_luminance"], seen["white_fraction"]
    if y < DARK_MEDIAN:
        return [
            Problem(
                "dark",
                f"too dark to count: median brightness {y:.0f} of 255, below {DARK_MEDIAN:.0f}; "
                "retake it with more light or a longer exposure",
                True,
                round(y, 1),
            )
        ]
    if y < DIM_MEDIAN:
        return [
            Problem(
                "dark",
                f"dim: median brightness {y:.0f} of 255; below {DIM_MEDIAN:.0f} the detector misses "
                "red cells, so the counts may be low: use more light next time",
                False,
                round(y, 1),
            )
        ]
    if white >= OVEREXPOSED_SEVERE:
        return [
            Problem(
                "overexposed",
                f"overexposed: {100 * white:.0f}% of the photograph is blown-out white, which "
                "washes the cells out; retake it with less light or a shorter exposure",
                True,
                round(white, 3),
            )
        ]
    if white >= OVEREXPOSED_WARN:
        return [
            Problem(
                "overexposed",
                f"partly overexposed: {100 * white:.0f}% of the photograph is blown-out white; "
                "counts given, but red cells may be missed: use less light next time",
                False,
                round(white, 3),
            )
        ]
    return []


def check_shape(width: int, height: int) -> list[Problem]:
    """`panorama` for an image far longer than one camera field is wide."""
    aspect = max(width, height) / max(1, min(width, height))
    if aspect <= PANORAMA_ASPECT:
        return []
    return [
        Problem(
            "panorama",
            f"a stitched panorama or strip, not one field: {width}x{height} px is {aspect:.1f} "
            f"times as long as wide (one camera field is at most {PANORAMA_ASPECT}); "
            "give each field of view as its own photograph",
            True,
            round(aspect, 2),
        )
    ]


# ------------------------------------------------------------------ the cells found


def detector_scale(detector: Any) -> tuple[int | None, dict | None]:
    """(long side the detector resizes photographs to, or None when it reads them at their own size;
    its `cell_scale` state, or None when it has none)."""
    long_side = (getattr(detector, "options", None) or {}).get("long_side")
    state = detector.state() if callable(getattr(detector, "state", None)) else {}
    return (int(long_side) if long_side else None), (state or {}).get("cell_scale")


def red_cell_side(
    boxes: np.ndarray, labels: np.ndarray, size: tuple[int, int], long_side: int | None
) -> tuple[float | None, int]:
    """Median red-cell box side in the detector's pixels (the photograph's when it does not resize) and how many
    red cells it rests on; None when there are none. Labels index FIELD_CLASSES (red cells are 0).

    Args:
        boxes: The boxes kept, (N, 4) as x1, y1, x2, y2 in the photograph's pixels.
        labels: The FIELD_CLASSES index of each box (N,).
        size: The photograph's (width, height) in pixels.
        long_side: The long side the detector resizes photographs to (sides are scaled to it); None: no scaling.
    """
    rbc = np.asarray(boxes, np.float64).reshape(-1, 4)[np.asarray(labels) == 0]
    if not len(rbc):
        return None, 0
    sides = np.sqrt((rbc[:, 2] - rbc[:, 0]) * (rbc[:, 3] - rbc[:, 1]))  # as detect.base.cell_scale measures them
    scale = long_side / max(size) if long_side else 1.0
    return float(np.median(sides) * scale), len(rbc)


def magnification_band(cell_scale: dict) -> tuple[float, float]:
    """The median red-cell sides accepted: BAND_LOW to BAND_HIGH times those the detector was trained on (p50)."""
    p50 = float(cell_scale["rbc_side_px"]["p50"])
    return p50 * BAND_LOW, p50 * BAND_HIGH


def check_magnification(
    boxes: np.ndarray, labels: np.ndarray, size: tuple[int, int], long_side: int | None, cell_scale: dict | None
) -> list[Problem]:
    """`magnification` when the red cells are far smaller or larger than the detector knows; `few_red_cells` (no
    verdict) when too few were found to tell. Nothing when there is no reference to compare with: a detector
    without `cell_scale` that does not resize photographs to a fixed long side (the fallback is in that scale).

    Args:
        boxes: The boxes kept, (N, 4) as x1, y1, x2, y2 in the photograph's pixels.
        labels: The FIELD_CLASSES index of each box (N,); red cells are 0.
        size: The photograph's (width, height) in pixels.
        long_side: The long side the detector resizes photographs to; None when it reads them at their own size.
        cell_scale: The detector's `cell_scale` state (red-cell side percentiles); None uses FALLBACK_CELL_SCALE when
            long_side is set, else the check is skipped.
    """
    if cell_scale is None:
        if long_side is None:
            return []
        cell_scale = FALLBACK_CELL_SCALE
    side, n = red_cell_side(boxes, labels, size, long_side)
    if n < MIN_RED_CELLS:
        return [
            Problem(
                "few_red_cells",
                f"only {n} red cell{'' if n == 1 else 's'} found, too few to check the "
                f"magnification (at least {MIN_RED_CELLS} needed); if it shows more, it may be "
                "blurred, dim or magnified more than the detector reads",
                False,
                float(n),
            )
        ]
    lo, hi = magnification_band(cell_scale)
    if lo <= side <= hi:
        return []
    small = side < lo
    # the red-cell side the detector knows best, as a share of the photograph's long side: what to aim for
    share = (long_side or max(size)) / float(cell_scale["rbc_side_px"]["p50"])
    return [
        Problem(
            "magnification",
            f"wrong magnification: the red cells measure {side:.0f} px at the detector's scale "
            f"(median of {n}), where it reads {lo:.0f}-{hi:.0f} px, so they look too "
            f"{'small' if small else 'large'}; photograph at a {'higher' if small else 'lower'} "
            f"magnification (a red cell about 1/{share:.0f} of the photograph's long side)",
            True,
            round(side, 1),
        )
    ]


# ------------------------------------------------------------------ all of them


def check_field(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    long_side: int | None = None,
    cell_scale: dict | None = None,
) -> list[Problem]:
    """Every problem of one photograph (H x W x 3 uint8) and the boxes kept in it, severe ones first.

    Args:
        image: The photograph, H x W x 3 uint8 RGB.
        boxes: The boxes kept, (N, 4) as x1, y1, x2, y2 in the photograph's pixels.
        labels: The FIELD_CLASSES index of each box (N,); red cells are 0.
        long_side: The long side the detector resizes photographs to (see detector_scale); None: its own size.
        cell_scale: The detector's `cell_scale` state; None: FALLBACK_CELL_SCALE (see check_magnification).
    """
    h, w = image.shape[:2]
    return field_problems((w, h), exposure(image), boxes, labels, long_side, cell_scale)


def field_problems(
    size: tuple[int, int],
    seen: dict[str, float],
    boxes: np.ndarray,
    labels: np.ndarray,
    long_side: int | None,
    cell_scale: dict | None,
) -> list[Problem]:
    """check_field from the photograph's size (width, height) and exposure() instead of its pixels.

    Args:
        size: The photograph's (width, height) in pixels.
        seen: What exposure() measured on it (median_luminance, white_fraction).
        boxes: The boxes kept, (N, 4) as x1, y1, x2, y2 in the photograph's pixels.
        labels: The FIELD_CLASSES index of each box (N,); empty adds `no_cells`.
        long_side: The long side the detector resizes photographs to; None when it reads them at their own size.
        cell_scale: The detector's `cell_scale` state; None: FALLBACK_CELL_SCALE (see check_magnification).
    """
    found = check_shape(*size) + exposure_problems(seen)
    if not any(p.code == "panorama" for p in found):  # a strip's cells look small because it is a strip
        found += check_magnification(boxes, labels, size, long_side, cell_scale)
    if not len(labels):
        found = [p for p in found if p.code != "few_red_cells"]
        found.append(Problem("no_cells", no_cells_sentence(found), False, 0))
    return sorted(found, key=lambda p: not p.severe)


def no_cells_sentence(problems: list[Problem]) -> str:
    """'no cells found', with the likely reason when another check points to one."""
    reason = next((p.message for p in problems if p.code != "few_red_cells"), "")
    return f"no cells found: {reason}" if reason else "no cells found"


def withheld(problems: list[Problem]) -> bool:
    return any(p.severe for p in problems)


def answer(problems: list[Problem]) -> str:
    """The one sentence a photograph's result leads with: no cells, else the first severe problem, else ''."""
    first = next((p for p in problems if p.code == "no_cells"), None) or next((p for p in problems if p.severe), None)
    return first.message if first else ""

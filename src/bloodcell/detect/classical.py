"""A classical smear-field detector: stain thresholds, morphology, distance transform + watershed.

Pipeline (at 1/`downscale` resolution; boxes are returned in the photograph's pixels):

1. Stain maps. Giemsa colours nuclei and platelets purple-blue: blue high, green low. `stain = B / (G + 1)`
   (after a light blur) is ~1.0 on background and red cells and 1.5-2.5 on nuclei; `purple = B / (R + 1)`
   separates the paler platelets from red-cell rims better.
2. White cells. `stain > nucleus_threshold` pixels, closed with a disk of `lobe_merge` px so the lobes of a
   neutrophil nucleus join; groups of at least `wbc_min_area` px are white cells. The box is the nucleus box
   grown to the whole cell: side = `wbc_grow` * nucleus side + `wbc_pad` (fitted on train photographs); boxes
   that overlap much (two nucleus groups of one big cell) merge.
3. Platelets. `purple > platelet_threshold` groups of `platelet_min_area`..`platelet_max_area` px away from the
   white cells; box side max(`platelet_size`, extent * 1.6) around the blob's centre.
4. Red cells. Foreground = green below `rbc_level` * the background's green (90th percentile), minus the white
   cells, closed (`rbc_close`), pale centres (holes up to `rbc_hole_max` px) filled, opened; the distance
   transform's peaks (at least `rbc_min_distance` px apart) seed a watershed that splits touching cells; regions
   under `rbc_min_area` px are dropped, and a region much larger than one cell is cut into
   round(area / `rbc_split_area`) parts by k-means on its pixel coordinates.

Every box has a score in [0, 1] ranking how much it looks like its class (size and stain fit), so score
thresholds and mAP are meaningful. Its fit (bloodcell.detect.classical_fit) tunes the thresholds on train photographs
by coordinate search.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage as ndi

from bloodcell.data.fields import FIELD_CLASSES
from bloodcell.errors import DataError, ModelError
from bloodcell.detect.base import Detections, FieldDetector, register_detector

RBC, WBC, PLT = (FIELD_CLASSES.index(c) for c in ("rbc", "wbc", "platelet"))

DEFAULTS: dict[str, Any] = {
    "downscale": 2,  # work at 1/2 resolution (640x480 -> 320x240)
    "blur_sigma": 1.0,
    "nucleus_threshold": 1.4,  # stain ratio B/(G+1) of white-cell nuclei
    "lobe_merge": 5,  # closing radius (working px) joining the lobes of one nucleus
    "wbc_min_area": 900,  # working px of nucleus per white cell
    "wbc_grow": 1.03,  # cell side = wbc_grow * nucleus side + wbc_pad (working px)
    "wbc_pad": 20.13,
    "platelet_threshold": 1.2,  # blue/red ratio of platelets
    # platelet mean green below platelet_dark * background green (glints in red cells are bright)
    "platelet_dark": 0.88,
    "platelet_min_area": 8,
    "platelet_max_area": 500,
    "platelet_size": 19.0,  # smallest platelet box side (working px)
    "rbc_level": 0.9,  # foreground: green < rbc_level * background green (90th percentile of green)
    "rbc_close": 2,  # closing radius (working px) that shuts the rims around pale centres
    "rbc_hole_max": 600,  # working px: larger enclosed gaps are background between cells, not pale centres
    "rbc_min_distance": 30,  # working px between red-cell centres
    "rbc_min_area": 1000,  # working px
    "rbc_split_area": 0.0,  # working px per cell when cutting an unsplit clump (0: never cut)
    "rbc_typical_area": 1872.54,  # working px; score peaks here
}


def _disk(radius: int) -> np.ndarray:
    r = max(int(round(radius)), 0)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


@register_detector("classical")
class ClassicalDetector(FieldDetector):
    name = "classical"

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ModelError(
                f"classical detector: unknown option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}"
            )
        merged = {**DEFAULTS, **options}
        if int(merged["downscale"]) < 1:
            raise ModelError(f"classical detector: downscale must be an integer >= 1, got {merged['downscale']}")
        super().__init__(**merged)
        self.params: dict[str, Any] = dict(merged)
        self.fitted: dict[str, Any] = {}
        self.score_thresholds = {"rbc": 0.2, "wbc": 0.3, "platelet": 0.3}

    # -- state
    def state(self) -> dict[str, Any]:
        return {**super().state(), "params": dict(self.params), "fitted": dict(self.fitted)}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
        params = state.get("params") or {}
        unknown = sorted(set(params) - set(DEFAULTS))
        if unknown:
            raise ModelError(f"classical detector state: unknown parameter(s) {', '.join(unknown)}")
        self.params.update(params)
        self.fitted = dict(state.get("fitted") or {})

    # -- pipeline pieces (cached separately by its fit, bloodcell.detect.classical_fit)
    def prepare(self, image: np.ndarray) -> dict[str, np.ndarray]:
        p = self.params
        f = int(p["downscale"])
        img = image.astype(np.float32)
        h, w = img.shape[:2]
        if f > 1:
            hh, ww = h // f * f, w // f * f
            if hh == 0 or ww == 0:
                raise DataError(f"a detector photograph of {w}x{h} px is smaller than downscale {f}")
            img = img[:hh, :ww].reshape(hh // f, f, ww // f, f, 3).mean(axis=(1, 3))
        if p["blur_sigma"] > 0:
            img = ndi.gaussian_filter(img, sigma=(p["blur_sigma"], p["blur_sigma"], 0))
        g = img[..., 1]
        stain = img[..., 2] / (g + 1.0)
        purple = img[..., 2] / (img[..., 0] + 1.0)
        background = float(np.percentile(g, 90)) if g.size else 0.0
        return {
            "green": g,
            "stain": stain,
            "purple": purple,
            "background": np.array(background),
            "shape": np.array([h, w]),
        }

    def white_and_platelets(
        self, prep: dict[str, np.ndarray], platelets: bool = True, groups: list | None = None
    ) -> tuple[list, list, np.ndarray]:
        """(white cells, platelets, white-cell exclusion mask); cells are (box in working px, score)."""
        p = self.params
        H, W = prep["stain"].shape
        whites, exclude = [], np.zeros((H, W), bool)
        for area, cx, cy, nw, nh, strength in nucleus_groups(self, prep) if groups is None else groups:
            if area < p["wbc_min_area"] * 0.5:
                continue
            side_w = max(p["wbc_grow"] * nw + p["wbc_pad"], nw)
            side_h = max(p["wbc_grow"] * nh + p["wbc_pad"], nh)
            box = np.array([cx - side_w / 2, cy - side_h / 2, cx + side_w / 2, cy + side_h / 2])
            box = np.clip(box, 0, [W, H, W, H])
            size_fit = 1.0 / (1.0 + np.exp(-(area / p["wbc_min_area"] - 1.0) * 4.0))
            stain_fit = float(np.clip((strength - 1.0) / (p["nucleus_threshold"] - 0.9), 0, 1))
            whites.append((box, float(size_fit * (0.5 + 0.5 * stain_fit))))
            x0, y0 = np.floor(box[:2]).astype(int)
            x1, y1 = np.ceil(box[2:]).astype(int)
            yy, xx = np.ogrid[y0:y1, x0:x1]
            ry, rx = max(side_h / 2, 1), max(side_w / 2, 1)
            exclude[y0:y1, x0:x1] |= ((yy + 0.5 - cy) / ry) ** 2 + ((xx + 0.5 - cx) / rx) ** 2 <= 1.0
        return _merge_overlapping(whites), (self.find_platelets(prep, exclude) if platelets else []), exclude

    def find_platelets(self, prep: dict[str, np.ndarray], exclude: np.ndarray) -> list:
        """Small purple blobs outside the white cells, darker than the background."""
        p = self.params
        purple = prep["purple"]
        H, W = purple.shape
        plt = (purple > p["platelet_threshold"]) & ~exclude
        lab, n = ndi.label(plt)
        found = []
        if not n:
            return found
        idx = np.arange(1, n + 1)
        area = ndi.sum(plt, lab, index=idx)
        peak = ndi.maximum(purple, lab, index=idx)
        mean_green = ndi.mean(prep["green"], lab, index=idx)
        dark_limit = p["platelet_dark"] * float(prep["background"])
        for i, sl in enumerate(ndi.find_objects(lab)):
            if not p["platelet_min_area"] <= area[i] <= p["platelet_max_area"] or mean_green[i] > dark_limit:
                continue
            ys, xs = sl
            side = max(p["platelet_size"], 1.6 * max(ys.stop - ys.start, xs.stop - xs.start))
            cy, cx = (ys.start + ys.stop) / 2, (xs.start + xs.stop) / 2
            box = np.clip(np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]), 0, [W, H, W, H])
            contrast = float(np.clip((peak[i] - p["platelet_threshold"]) / 0.3, 0, 1))
            sized = float(np.clip(area[i] / (4 * p["platelet_min_area"]), 0, 1))
            found.append((box, 0.2 + 0.8 * contrast * (0.5 + 0.5 * sized)))
        return found

    def foreground(self, prep: dict[str, np.ndarray], exclude: np.ndarray) -> np.ndarray:
        p = self.params
        g = prep["green"]
        level = float(prep["background"]) * p["rbc_level"]
        fg = (g < level) & ~exclude
        fg = ndi.binary_closing(fg, structure=_disk(p["rbc_close"]), border_value=1) if p["rbc_close"] > 0 else fg
        # fill the pale centres, not the background between a ring of touching cells
        holes = ndi.binary_fill_holes(fg) & ~fg
        if holes.any():
            lab, n = ndi.label(holes)
            small = np.concatenate([[False], ndi.sum(holes, lab, index=np.arange(1, n + 1)) <= p["rbc_hole_max"]])
            fg |= small[lab]
        fg = ndi.binary_opening(fg, structure=_disk(2))
        return fg

    def rbc_regions(self, fg: np.ndarray) -> tuple[np.ndarray, int]:
        """Watershed of the foreground's distance transform from peaks at least rbc_min_distance apart."""
        # here, not at the top: every first look-up of a detector imports this module, and skimage takes a second
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed

        if not fg.any():
            return np.zeros(fg.shape, np.int32), 0
        dist = ndi.gaussian_filter(ndi.distance_transform_edt(fg), 1.0)
        md = max(int(self.params["rbc_min_distance"]), 1)
        peaks = peak_local_max(
            dist, min_distance=md, threshold_abs=md * 0.5, labels=ndi.label(fg)[0], exclude_border=False
        )
        if len(peaks) == 0:
            return np.zeros(fg.shape, np.int32), 0
        markers = np.zeros(fg.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        return watershed(-dist, markers, mask=fg).astype(np.int32), len(peaks)

    def red_cells(self, fg: np.ndarray, regions: tuple[np.ndarray, int] | None = None) -> list:
        """(box, score, area) per red cell, working px. A watershed region much larger than one cell (a clump
        the distance transform could not split) is cut into round(area / rbc_split_area) parts by k-means on
        its pixel coordinates."""
        p = self.params
        H, W = fg.shape
        labels, n = self.rbc_regions(fg) if regions is None else regions
        if n == 0:
            return []
        split = float(p["rbc_split_area"])
        typical = p["rbc_typical_area"]
        reds = []
        for i, sl in enumerate(ndi.find_objects(labels)):
            if sl is None:
                continue
            ys, xs = np.nonzero(labels[sl] == i + 1)
            area = len(ys)
            if area < p["rbc_min_area"]:
                continue
            k = max(1, int(round(area / split))) if split > 0 else 1
            parts = (
                _kmeans_parts(np.stack([ys + sl[0].start, xs + sl[1].start], axis=1), k)
                if k > 1
                else [np.stack([ys + sl[0].start, xs + sl[1].start], axis=1)]
            )
            for pts in parts:
                a = len(pts)
                if a < p["rbc_min_area"] * (0.6 if k > 1 else 1.0):
                    continue
                y0, x0 = pts.min(axis=0)
                y1, x1 = pts.max(axis=0) + 1
                fill = a / max((y1 - y0) * (x1 - x0), 1)  # a disc fills ~0.785 of its box
                on_border = y0 == 0 or x0 == 0 or y1 == H or x1 == W
                size_fit = float(np.exp(-0.5 * (np.log(a / typical) / 0.6) ** 2))
                if on_border:
                    size_fit = max(size_fit, 0.6)
                shape_fit = float(np.clip(1.0 - abs(fill - 0.78) / 0.5, 0, 1))
                score = size_fit * (0.4 + 0.6 * shape_fit) * (0.85 if k > 1 else 1.0)
                reds.append((np.array([x0, y0, x1, y1], float), score, float(a)))
        return reds

    def assemble(self, prep, whites, platelets, reds) -> Detections:
        """Every cell found as one Detections in the photograph's pixels, scores clipped to [0, 1].

        Args:
            prep: prepare's output; its "shape" (the photograph's height, width) clips the boxes.
            whites: white cells, (box in working px, score, ...) each, as white_and_platelets returns them.
            platelets: platelets, (box in working px, score, ...) each.
            reds: red cells, (box in working px, score, area) each, as red_cells returns them.
        """
        f = float(self.params["downscale"])
        boxes, labels, scores = [], [], []
        for cls, cells in ((RBC, reds), (WBC, whites), (PLT, platelets)):
            for box, score, *_ in cells:
                boxes.append(box * f)
                labels.append(cls)
                scores.append(score)
        if not boxes:
            return Detections.empty()
        h, w = (int(v) for v in prep["shape"])
        out = np.clip(np.asarray(boxes, np.float32), 0, [w, h, w, h]).astype(np.float32)
        return Detections(out, np.asarray(labels, np.int64), np.clip(np.asarray(scores, np.float32), 0, 1))

    def detect_one(self, image: np.ndarray) -> Detections:
        prep = self.prepare(image)
        whites, platelets, exclude = self.white_and_platelets(prep)
        reds = self.red_cells(self.foreground(prep, exclude))
        return self.assemble(prep, whites, platelets, reds)


# ---------------------------------------------------------------- helpers


def _merge_overlapping(cells: list, share: float = 0.3) -> list:
    """One box per white cell: boxes sharing more than `share` of the smaller one's area (two nucleus groups of
    one big cell) become their union, with the higher score."""
    cells = sorted(cells, key=lambda c: -c[1])
    merged: list = []
    for box, score in cells:
        for j, (other, other_score) in enumerate(merged):
            inter = np.prod(np.clip(np.minimum(box[2:], other[2:]) - np.maximum(box[:2], other[:2]), 0, None))
            smaller = min(np.prod(box[2:] - box[:2]), np.prod(other[2:] - other[:2]))
            if smaller > 0 and inter / smaller > share:
                union = np.concatenate([np.minimum(box[:2], other[:2]), np.maximum(box[2:], other[2:])])
                merged[j] = (union, other_score)
                break
        else:
            merged.append((box, score))
    return merged


def _kmeans_parts(points: np.ndarray, k: int, iterations: int = 8) -> list[np.ndarray]:
    """Split pixel coordinates (N, 2) into k compact parts: farthest-point start, then Lloyd iterations."""
    pts = points.astype(np.float32)
    centres = [pts.mean(axis=0)]
    far = np.full(len(pts), np.inf, np.float32)
    for _ in range(k):
        far = np.minimum(far, ((pts - centres[-1]) ** 2).sum(axis=1))
        centres.append(pts[int(np.argmax(far))])
    centres = np.asarray(centres[1:], np.float32)
    for _ in range(iterations):
        assign = np.argmin(((pts[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
        for j in range(k):
            if np.any(assign == j):
                centres[j] = pts[assign == j].mean(axis=0)
    assign = np.argmin(((pts[:, None, :] - centres[None]) ** 2).sum(axis=2), axis=1)
    return [points[assign == j] for j in range(k) if np.any(assign == j)]


def nucleus_groups(det: ClassicalDetector, prep: dict[str, np.ndarray]) -> list[tuple]:
    """Stained nucleus groups (lobes joined by closing): (area, cx, cy, width, height, mean stain), working px."""
    p = det.params
    stain = prep["stain"]
    nuc = stain > p["nucleus_threshold"]
    if not nuc.any():
        return []
    joined = ndi.binary_closing(nuc, structure=_disk(p["lobe_merge"]), border_value=0) | nuc
    lab, n = ndi.label(joined)
    idx = np.arange(1, n + 1)
    area = ndi.sum(nuc, lab, index=idx)
    strength = ndi.mean(stain, lab, index=idx)
    groups = []
    for i, sl in enumerate(ndi.find_objects(lab)):
        if area[i] < 2:
            continue
        ys, xs = sl
        groups.append(
            (
                float(area[i]),
                (xs.start + xs.stop) / 2,
                (ys.start + ys.stop) / 2,
                float(xs.stop - xs.start),
                float(ys.stop - ys.start),
                float(strength[i]),
            )
        )
    return groups

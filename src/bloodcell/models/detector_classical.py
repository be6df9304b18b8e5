"""A classical smear-field detector: stain thresholds, morphology, distance transform + watershed.

Pipeline (at 1/`downscale` resolution; boxes are returned in the photograph's pixels):

1. Stain maps. Giemsa colours nuclei and platelets purple-blue: blue high, green low. `stain = B / (G + 1)`
   (after a light blur) is ~1.0 on background and red cells and 1.5-2.5 on nuclei; `purple = B / (R + 1)`
   separates the paler platelets from red-cell rims better.
2. White cells. `stain > nucleus_threshold` pixels, closed with a disk of `lobe_merge` px so the lobes of a
   neutrophil nucleus join; groups of at least `wbc_min_area` px are white cells. The box is the nucleus box
   grown to the whole cell: side = `wbc_grow` * nucleus side + `wbc_pad` (fitted on train photographs).
3. Platelets. `purple > platelet_threshold` groups of `platelet_min_area`..`platelet_max_area` px away from the
   white cells; box side max(`platelet_size`, extent * 1.6) around the blob's centre.
4. Red cells. Foreground = green below (Otsu threshold of the photograph's green) * `rbc_level`, minus the white
   cells, pale centres filled, opened; the distance transform's peaks (at least `rbc_min_distance` px apart)
   seed a watershed that splits touching cells; regions under `rbc_min_area` px are dropped.

Every box has a score in [0, 1] ranking how much it looks like its class (size and stain fit), so score
thresholds and mAP are meaningful. `fit` tunes the thresholds on train photographs by coordinate search.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from bloodcell.data.fields import FIELD_CLASSES
from bloodcell.errors import DataError, ModelError
from bloodcell.models.detector import Detections, FieldDetector, register_detector

RBC, WBC, PLT = (FIELD_CLASSES.index(c) for c in ("rbc", "wbc", "platelet"))

DEFAULTS: dict[str, Any] = {
    "downscale": 2,  # work at 1/2 resolution (640x480 -> 320x240)
    "blur_sigma": 1.0,
    "nucleus_threshold": 1.4,  # stain ratio B/(G+1) of white-cell nuclei
    "lobe_merge": 6,  # closing radius (working px) joining the lobes of one nucleus
    "wbc_min_area": 250,  # working px of nucleus per white cell
    "wbc_grow": 1.0,  # cell side = wbc_grow * nucleus side + wbc_pad (working px)
    "wbc_pad": 30.0,
    "platelet_threshold": 1.2,  # blue/red ratio of platelets
    "platelet_dark": 0.88,  # platelet mean green below platelet_dark * background green (glints in red cells are bright)
    "platelet_min_area": 6,
    "platelet_max_area": 150,
    "platelet_size": 20.0,  # smallest platelet box side (working px)
    "rbc_level": 1.0,  # foreground: green < Otsu(green) * rbc_level
    "rbc_min_distance": 12,  # working px between red-cell centres
    "rbc_min_area": 250,  # working px
    "rbc_typical_area": 1700.0,  # working px; score peaks here
}


def _disk(radius: int) -> np.ndarray:
    r = max(int(round(radius)), 0)
    y, x = np.ogrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=128)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres)
    mu0 = m / np.maximum(w0, 1)
    mu1 = (m[-1] - m) / np.maximum(w1, 1)
    between = w0 * w1 * (mu0 - mu1) ** 2
    return float(centres[int(np.argmax(between))])


@register_detector("classical")
class ClassicalDetector(FieldDetector):
    name = "classical"

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(DEFAULTS))
        if unknown:
            raise ModelError(f"classical detector: unknown option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
        merged = {**DEFAULTS, **options}
        if int(merged["downscale"]) < 1:
            raise ModelError(f"classical detector: downscale must be an integer >= 1, got {merged['downscale']}")
        super().__init__(**merged)
        self.params: dict[str, Any] = dict(merged)
        self.fitted: dict[str, Any] = {}
        self.score_thresholds = {"rbc": 0.2, "wbc": 0.3, "platelet": 0.3}

    # -- state
    def state(self) -> dict[str, Any]:
        return {"params": dict(self.params), "fitted": dict(self.fitted)}

    def load_state(self, state: dict[str, Any]) -> None:
        params = state.get("params") or {}
        unknown = sorted(set(params) - set(DEFAULTS))
        if unknown:
            raise ModelError(f"classical detector state: unknown parameter(s) {', '.join(unknown)}")
        self.params.update(params)
        self.fitted = dict(state.get("fitted") or {})

    # -- pipeline pieces (cached separately by fit)
    def _prepare(self, image: np.ndarray) -> dict[str, np.ndarray]:
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
        return {"green": g, "stain": stain, "purple": purple, "background": np.array(background), "shape": np.array([h, w])}

    def _white_and_platelets(self, prep: dict[str, np.ndarray]) -> tuple[list, list, np.ndarray]:
        """(white cells, platelets, white-cell exclusion mask); cells are (box in working px, score)."""
        p = self.params
        stain = prep["stain"]
        H, W = stain.shape
        nuc = stain > p["nucleus_threshold"]
        joined = ndi.binary_closing(nuc, structure=_disk(p["lobe_merge"]), border_value=0) | nuc
        lab, n = ndi.label(joined)
        whites, exclude = [], np.zeros_like(nuc)
        if n:
            area = ndi.sum(nuc, lab, index=np.arange(1, n + 1))
            strength = ndi.mean(stain, lab, index=np.arange(1, n + 1))
            for i, sl in enumerate(ndi.find_objects(lab)):
                if area[i] < p["wbc_min_area"] * 0.5:
                    continue
                ys, xs = sl
                nh, nw = ys.stop - ys.start, xs.stop - xs.start
                side_w = p["wbc_grow"] * nw + p["wbc_pad"]
                side_h = p["wbc_grow"] * nh + p["wbc_pad"]
                cy, cx = (ys.start + ys.stop) / 2, (xs.start + xs.stop) / 2
                box = np.array([cx - side_w / 2, cy - side_h / 2, cx + side_w / 2, cy + side_h / 2])
                box = np.clip(box, 0, [W, H, W, H])
                size_fit = 1.0 / (1.0 + np.exp(-(area[i] / p["wbc_min_area"] - 1.0) * 4.0))
                stain_fit = float(np.clip((strength[i] - 1.0) / (p["nucleus_threshold"] - 0.9), 0, 1))
                whites.append((box, float(size_fit * (0.5 + 0.5 * stain_fit))))
                x0, y0, x1, y1 = box.astype(int)
                yy, xx = np.ogrid[y0:y1, x0:x1]
                ry, rx = max((y1 - y0) / 2, 1), max((x1 - x0) / 2, 1)
                exclude[y0:y1, x0:x1] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        # platelets: small stained blobs outside the white cells
        purple = prep["purple"]
        plt = (purple > p["platelet_threshold"]) & ~exclude
        lab, n = ndi.label(plt)
        platelets = []
        if n:
            idx = np.arange(1, n + 1)
            area = ndi.sum(plt, lab, index=idx)
            peak = ndi.maximum(purple, lab, index=idx)
            darkest = ndi.mean(prep["green"], lab, index=idx)
            dark_limit = p["platelet_dark"] * float(prep["background"])
            for i, sl in enumerate(ndi.find_objects(lab)):
                if not p["platelet_min_area"] <= area[i] <= p["platelet_max_area"] or darkest[i] > dark_limit:
                    continue
                ys, xs = sl
                side = max(p["platelet_size"], 1.6 * max(ys.stop - ys.start, xs.stop - xs.start))
                cy, cx = (ys.start + ys.stop) / 2, (xs.start + xs.stop) / 2
                box = np.clip(np.array([cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2]), 0, [W, H, W, H])
                contrast = float(np.clip((peak[i] - p["platelet_threshold"]) / 0.4, 0, 1))
                sized = float(np.clip(area[i] / (4 * p["platelet_min_area"]), 0, 1))
                platelets.append((box, 0.2 + 0.8 * contrast * (0.5 + 0.5 * sized)))
        return whites, platelets, exclude

    def _foreground(self, prep: dict[str, np.ndarray], exclude: np.ndarray) -> np.ndarray:
        p = self.params
        g = prep["green"]
        level = _otsu(g) * p["rbc_level"]
        fg = (g < level) & ~exclude
        fg = ndi.binary_fill_holes(fg)
        fg = ndi.binary_opening(fg, structure=_disk(2))
        return fg

    def _red_cells(self, fg: np.ndarray) -> list:
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed

        p = self.params
        H, W = fg.shape
        if not fg.any():
            return []
        dist = ndi.distance_transform_edt(fg)
        dist = ndi.gaussian_filter(dist, 1.0)
        md = max(int(p["rbc_min_distance"]), 1)
        peaks = peak_local_max(dist, min_distance=md, threshold_abs=md * 0.5, labels=ndi.label(fg)[0], exclude_border=False)
        if len(peaks) == 0:
            return []
        markers = np.zeros(fg.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        regions = watershed(-dist, markers, mask=fg)
        idx = np.arange(1, len(peaks) + 1)
        areas = ndi.sum(fg, regions, index=idx)
        reds = []
        typical = p["rbc_typical_area"]
        for i, sl in enumerate(ndi.find_objects(regions)):
            if sl is None or areas[i] < p["rbc_min_area"]:
                continue
            ys, xs = sl
            bh, bw = ys.stop - ys.start, xs.stop - xs.start
            fill = areas[i] / max(bh * bw, 1)  # a disc fills ~0.785 of its box
            on_border = ys.start == 0 or xs.start == 0 or ys.stop == H or xs.stop == W
            size_fit = np.exp(-0.5 * (np.log(areas[i] / typical) / 0.6) ** 2)
            if on_border:
                size_fit = max(size_fit, 0.6 * float(areas[i] >= p["rbc_min_area"]))
            shape_fit = float(np.clip(1.0 - abs(fill - 0.78) / 0.5, 0, 1))
            reds.append((np.array([xs.start, ys.start, xs.stop, ys.stop], float), float(size_fit * (0.4 + 0.6 * shape_fit))))
        return reds

    def _assemble(self, prep, whites, platelets, reds) -> Detections:
        f = float(self.params["downscale"])
        boxes, labels, scores = [], [], []
        for cls, cells in ((RBC, reds), (WBC, whites), (PLT, platelets)):
            for box, score in cells:
                boxes.append(box * f)
                labels.append(cls)
                scores.append(score)
        if not boxes:
            return Detections.empty()
        h, w = (int(v) for v in prep["shape"])
        out = np.clip(np.asarray(boxes, np.float32), 0, [w, h, w, h]).astype(np.float32)
        return Detections(out, np.asarray(labels, np.int64), np.clip(np.asarray(scores, np.float32), 0, 1))

    def detect_one(self, image: np.ndarray) -> Detections:
        prep = self._prepare(image)
        whites, platelets, exclude = self._white_and_platelets(prep)
        reds = self._red_cells(self._foreground(prep, exclude))
        return self._assemble(prep, whites, platelets, reds)

    # -- fitting
    def fit(self, train: Sequence, val: Sequence, settings: Any, run_dir: Path, resume: bool, progress: bool) -> dict:
        from bloodcell.models.detector_classical_fit import coordinate_search

        return coordinate_search(self, train, run_dir, progress=progress)

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
   cells, closed (`rbc_close`), pale centres (holes up to `rbc_hole_max` px) filled, opened; the distance transform's peaks (at least `rbc_min_distance` px apart)
   seed a watershed that splits touching cells; regions under `rbc_min_area` px are dropped, and a region much
   larger than one cell is cut into round(area / `rbc_split_area`) parts by k-means on its pixel coordinates.

Every box has a score in [0, 1] ranking how much it looks like its class (size and stain fit), so score
thresholds and mAP are meaningful. `fit` tunes the thresholds on train photographs by coordinate search.
"""

from __future__ import annotations

import csv
import itertools
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from bloodcell.data.fields import FIELD_CLASSES
from bloodcell.errors import DataError, ModelError
from bloodcell.models.detector_base import Detections, FieldDetector, matched, register_detector

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
    "platelet_dark": 0.88,  # platelet mean green below platelet_dark * background green (glints in red cells are bright)
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
        return {**super().state(), "params": dict(self.params), "fitted": dict(self.fitted)}

    def load_state(self, state: dict[str, Any]) -> None:
        super().load_state(state)
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

    def _white_and_platelets(self, prep: dict[str, np.ndarray], platelets: bool = True, groups: list | None = None) -> tuple[list, list, np.ndarray]:
        """(white cells, platelets, white-cell exclusion mask); cells are (box in working px, score)."""
        p = self.params
        H, W = prep["stain"].shape
        whites, exclude = [], np.zeros((H, W), bool)
        for area, cx, cy, nw, nh, strength in _nucleus_groups(self, prep) if groups is None else groups:
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
        return _merge_overlapping(whites), (self._platelets(prep, exclude) if platelets else []), exclude

    def _platelets(self, prep: dict[str, np.ndarray], exclude: np.ndarray) -> list:
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

    def _foreground(self, prep: dict[str, np.ndarray], exclude: np.ndarray) -> np.ndarray:
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

    def _rbc_regions(self, fg: np.ndarray) -> tuple[np.ndarray, int]:
        """Watershed of the foreground's distance transform from peaks at least rbc_min_distance apart."""
        from skimage.feature import peak_local_max
        from skimage.segmentation import watershed

        if not fg.any():
            return np.zeros(fg.shape, np.int32), 0
        dist = ndi.gaussian_filter(ndi.distance_transform_edt(fg), 1.0)
        md = max(int(self.params["rbc_min_distance"]), 1)
        peaks = peak_local_max(dist, min_distance=md, threshold_abs=md * 0.5, labels=ndi.label(fg)[0], exclude_border=False)
        if len(peaks) == 0:
            return np.zeros(fg.shape, np.int32), 0
        markers = np.zeros(fg.shape, np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        return watershed(-dist, markers, mask=fg).astype(np.int32), len(peaks)

    def _red_cells(self, fg: np.ndarray, regions: tuple[np.ndarray, int] | None = None) -> list:
        """(box, score, area) per red cell, working px. A watershed region much larger than one cell (a clump
        the distance transform could not split) is cut into round(area / rbc_split_area) parts by k-means on
        its pixel coordinates."""
        p = self.params
        H, W = fg.shape
        labels, n = self._rbc_regions(fg) if regions is None else regions
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
            parts = _kmeans_parts(np.stack([ys + sl[0].start, xs + sl[1].start], axis=1), k) if k > 1 else [
                np.stack([ys + sl[0].start, xs + sl[1].start], axis=1)]
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

    def _assemble(self, prep, whites, platelets, reds) -> Detections:
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
        prep = self._prepare(image)
        whites, platelets, exclude = self._white_and_platelets(prep)
        reds = self._red_cells(self._foreground(prep, exclude))
        return self._assemble(prep, whites, platelets, reds)

    # -- fitting
    def fit(self, train: Sequence, val: Sequence, settings: Any, run_dir: Path, resume: bool, progress: bool) -> dict:
        """Coordinate search of the key thresholds on the train photographs; log in run_dir/search.csv."""
        return _search(self, list(train), Path(run_dir) if run_dir is not None else None, progress)


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
                merged[j] = (np.concatenate([np.minimum(box[:2], other[:2]), np.maximum(box[2:], other[2:])]), other_score)
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


def _nucleus_groups(det: ClassicalDetector, prep: dict[str, np.ndarray]) -> list[tuple]:
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
        groups.append((float(area[i]), (xs.start + xs.stop) / 2, (ys.start + ys.stop) / 2,
                       float(xs.stop - xs.start), float(ys.stop - ys.start), float(strength[i])))
    return groups


SEARCH_GRID: dict[str, list] = {
    "nucleus_threshold": [1.3, 1.4, 1.5, 1.6],
    "lobe_merge": [5, 8, 11],
    "wbc_min_area": [450, 650, 900, 1200],
    "platelet_threshold": [1.15, 1.2, 1.25, 1.3],
    "platelet_dark": [0.8, 0.88, 0.95],
    "platelet_min_area": [1, 2, 3, 5, 8],
    "platelet_max_area": [150, 300, 500],
    "platelet_size": [15.0, 17.0, 19.0, 21.0],
    "rbc_level": [0.87, 0.9, 0.93],
    "rbc_close": [2, 6],
    "rbc_hole_max": [600],
    "rbc_min_distance": [18, 22, 26, 30],
    "rbc_split_area": [1500.0, 1800.0, 2200.0, 0.0],
    "rbc_min_area": [600, 800, 1000, 1200],
}


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _f1(tp: int, npred: int, ntrue: int) -> float:
    return 2.0 * tp / max(npred + ntrue, 1)


def _boxes(cells: list, min_score: float = 0.0) -> np.ndarray:
    kept = [b for b, s in cells if s >= min_score]
    return np.asarray(kept, float).reshape(-1, 4)


def _search(det: ClassicalDetector, train: list, run_dir: Path | None, progress: bool) -> dict:
    from skimage.io import imread

    if not train:
        raise DataError("classical detector fit: no training photographs")
    t0 = time.perf_counter()
    f = float(det.params["downscale"])
    preps, truths = [], []
    for a in train:
        img = imread(a.path)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        preps.append(det._prepare(np.ascontiguousarray(img[..., :3])))
        truths.append([a.boxes[a.labels == k] / f for k in range(len(FIELD_CLASSES))])
    log: list[dict] = []

    def record(stage: str, params: dict, metrics: dict) -> None:
        log.append({"stage": stage, **params, **{k: round(v, 4) for k, v in metrics.items()}})

    def report(stage: str, chosen: dict) -> None:
        if progress:
            print(f"[classical fit] {stage}: {chosen} ({time.perf_counter() - t0:.0f} s)", flush=True)

    # typical red-cell area (working px) for the score
    rbc_true = np.concatenate([t[RBC] for t in truths]) if truths else np.zeros((0, 4))
    if len(rbc_true):
        det.params["rbc_typical_area"] = float(np.median(np.prod(rbc_true[:, 2:] - rbc_true[:, :2], axis=1)) * 0.72)

    # stage A: white cells. For each threshold/merge radius the growth (side = a * nucleus side + b) is a
    # least-squares fit of the true boxes' sides on the nucleus groups' sides; then the minimum area.
    best_a = None
    for nt in SEARCH_GRID["nucleus_threshold"]:
        for lm in SEARCH_GRID["lobe_merge"]:
            det.params.update(nucleus_threshold=nt, lobe_merge=lm, wbc_grow=1.0, wbc_pad=0.0, wbc_min_area=2)
            groups = [_nucleus_groups(det, prep) for prep in preps]
            xs, ys = [], []
            for g, t in zip(groups, truths):
                for box in t[WBC]:
                    inside = [n for n in g if box[0] <= n[1] <= box[2] and box[1] <= n[2] <= box[3]]
                    if inside:
                        n = max(inside, key=lambda q: q[0])
                        xs += [n[3], n[4]]
                        ys += [box[2] - box[0], box[3] - box[1]]
            xs_, ys_ = np.asarray(xs, float), np.asarray(ys, float)
            if len(xs) >= 4 and xs_.std() >= 2.0:
                grow, pad = np.polyfit(xs_, ys_, 1)
                grow, pad = float(np.clip(grow, 0.3, 3.0)), float(np.clip(pad, -20, 120))
            elif len(xs):  # nuclei all of one size: only the margin can be fitted
                grow, pad = 1.0, float(np.clip(np.mean(ys_ - xs_), -20, 120))
            else:
                grow, pad = DEFAULTS["wbc_grow"], DEFAULTS["wbc_pad"]
            det.params.update(wbc_grow=grow, wbc_pad=pad)
            for ma in SEARCH_GRID["wbc_min_area"]:
                det.params["wbc_min_area"] = ma
                tp = npred = ntrue = 0
                for prep, g, t in zip(preps, groups, truths):
                    whites = _boxes(det._white_and_platelets(prep, platelets=False, groups=g)[0], 0.5)
                    tp += matched(whites, t[WBC], 0.5)
                    npred += len(whites)
                    ntrue += len(t[WBC])
                m = {"wbc_f1": _f1(tp, npred, ntrue), "wbc_recall": tp / max(ntrue, 1)}
                record("wbc", {"nucleus_threshold": nt, "lobe_merge": lm, "wbc_min_area": ma, "wbc_grow": grow, "wbc_pad": pad}, m)
                key = (m["wbc_f1"], m["wbc_recall"])
                if best_a is None or key > best_a[0]:
                    best_a = (key, dict(nucleus_threshold=nt, lobe_merge=lm, wbc_min_area=ma, wbc_grow=grow, wbc_pad=pad))
    det.params.update(best_a[1])
    report("white cells", best_a[1])

    # stage B: platelets (one parameter at a time, two passes), with the white cells fixed
    excl = [det._white_and_platelets(prep, platelets=False)[2] for prep in preps]

    def platelet_f1() -> dict:
        tp = npred = ntrue = 0
        for prep, ex, t in zip(preps, excl, truths):
            found = _boxes(det._platelets(prep, ex), 0.0)
            tp += matched(found, t[PLT], 0.5)
            npred += len(found)
            ntrue += len(t[PLT])
        return {"platelet_f1": _f1(tp, npred, ntrue), "platelet_recall": tp / max(ntrue, 1)}

    for _ in range(2):
        for key in ("platelet_threshold", "platelet_dark", "platelet_min_area", "platelet_max_area", "platelet_size"):
            best = None
            for value in SEARCH_GRID[key]:
                det.params[key] = value
                m = platelet_f1()
                record("platelet", {key: value}, m)
                if best is None or m["platelet_f1"] > best[0]:
                    best = (m["platelet_f1"], value)
            det.params[key] = best[1]

    report("platelets", {k: det.params[k] for k in ("platelet_threshold", "platelet_dark", "platelet_min_area", "platelet_max_area", "platelet_size")})

    # stage C: red cells. C1: foreground level, closing and hole size (distance fixed); C2: peak distance. Within each,
    # the watershed is cached and the clump split area and the minimum area are searched on it.
    best_c = None

    def rbc_search(stage_params: dict, fgs: list) -> None:
        nonlocal best_c
        regions = [det._rbc_regions(fg) for fg in fgs]
        for split in SEARCH_GRID["rbc_split_area"]:
            det.params.update(rbc_split_area=split, rbc_min_area=min(SEARCH_GRID["rbc_min_area"]) * 0.6)
            cells = [det._red_cells(fg, r) for fg, r in zip(fgs, regions)]
            for ma in SEARCH_GRID["rbc_min_area"]:
                tp = npred = ntrue = 0
                rel = []
                for c, t in zip(cells, truths):
                    found = np.asarray([b for b, _, area in c if area >= ma], float).reshape(-1, 4)
                    tp += matched(found, t[RBC], 0.5)
                    npred += len(found)
                    ntrue += len(t[RBC])
                    if len(t[RBC]):
                        rel.append(abs(len(found) - len(t[RBC])) / len(t[RBC]))
                m = {"rbc_count_rel": float(np.mean(rel)) if rel else 0.0, "rbc_f1": _f1(tp, npred, ntrue)}
                chosen = {**stage_params, "rbc_split_area": split, "rbc_min_area": ma}
                record("rbc", chosen, m)
                objective = m["rbc_count_rel"] + 0.3 * (1.0 - m["rbc_f1"])
                if best_c is None or objective < best_c[0]:
                    best_c = (objective, chosen, m)

    det.params["rbc_min_distance"] = DEFAULTS["rbc_min_distance"]
    for level, close, hole in itertools.product(*(SEARCH_GRID[k] for k in ("rbc_level", "rbc_close", "rbc_hole_max"))):
        det.params.update(rbc_level=level, rbc_close=close, rbc_hole_max=hole)
        rbc_search({"rbc_level": level, "rbc_close": close, "rbc_hole_max": hole, "rbc_min_distance": det.params["rbc_min_distance"]},
                   [det._foreground(prep, ex) for prep, ex in zip(preps, excl)])
    det.params.update({k: best_c[1][k] for k in ("rbc_level", "rbc_close", "rbc_hole_max")})
    fgs = [det._foreground(prep, ex) for prep, ex in zip(preps, excl)]
    for md in SEARCH_GRID["rbc_min_distance"]:
        if md == DEFAULTS["rbc_min_distance"]:
            continue
        det.params["rbc_min_distance"] = md
        rbc_search({k: det.params[k] for k in ("rbc_level", "rbc_close", "rbc_hole_max")} | {"rbc_min_distance": md}, fgs)
    det.params.update(best_c[1])
    report("red cells", best_c[1])

    seconds = time.perf_counter() - t0
    det.fitted = {"photos": len(train), "seconds": round(seconds, 1)}
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        columns = sorted({k for row in log for k in row}, key=lambda k: (k != "stage", k))
        with open(run_dir / "search.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(log)
    best_wbc = max((r for r in log if r["stage"] == "wbc"), key=lambda r: (r["wbc_f1"], r["wbc_recall"]))
    best_plt = max((r for r in log if r["stage"] == "platelet"), key=lambda r: r["platelet_f1"])
    return {
        "fit_seconds": round(seconds, 1),
        "train_wbc_f1": best_wbc["wbc_f1"],
        "train_platelet_f1": best_plt["platelet_f1"],
        "train_rbc_count_rel": best_c[2]["rbc_count_rel"],
        "train_rbc_f1": best_c[2]["rbc_f1"],
        "params": dict(det.params),
    }

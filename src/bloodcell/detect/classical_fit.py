"""The classical detector's fit: a coordinate search of its key thresholds on the training photographs, stage by stage
(white cells, then platelets with the white cells fixed, then red cells), each candidate scored by how well it finds
and counts that class; every candidate tried is logged in run_dir/search.csv.
"""

from __future__ import annotations

import csv
import itertools
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from skimage.io import imread

from bloodcell.data.fields import FIELD_CLASSES, FieldAnnotation
from bloodcell.detect.classical import DEFAULTS, PLT, RBC, WBC, ClassicalDetector, nucleus_groups
from bloodcell.detect.metrics import matched
from bloodcell.errors import DataError

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
PLATELET_KEYS = ("platelet_threshold", "platelet_dark", "platelet_min_area", "platelet_max_area", "platelet_size")
RBC_SHAPE_KEYS = ("rbc_level", "rbc_close", "rbc_hole_max")


def fit_classical(
    detector: ClassicalDetector,
    train: Sequence[FieldAnnotation],
    settings: Any = None,
    run_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict:
    """Search `detector`'s thresholds on the `train` photographs (in place); return the fit's summary.

    Args:
        settings: the run's `train` section; unused (the search has no epochs or learning rate).
        run_dir: where search.csv goes; None: nowhere.
        resume: unused: the search takes minutes and keeps no checkpoints, so a resumed run searches again.
    """
    if not train:
        raise DataError("classical detector fit: no training photographs")
    search = _Search(detector, list(train), progress)
    search.typical_red_area()
    search.white_cells()
    search.platelets()
    search.red_cells()
    seconds = time.perf_counter() - search.t0
    detector.fitted = {"photos": len(train), "seconds": round(seconds, 1)}
    if run_dir is not None:
        search.write_log(Path(run_dir))
    return search.summary(seconds)


def _f1(tp: int, npred: int, ntrue: int) -> float:
    return 2.0 * tp / max(npred + ntrue, 1)


def _boxes(cells: list, min_score: float = 0.0) -> np.ndarray:
    kept = [b for b, s in cells if s >= min_score]
    return np.asarray(kept, float).reshape(-1, 4)


def _growth(groups: list[list[tuple]], truths: list[list[np.ndarray]]) -> tuple[float, float]:
    """White-cell box side = grow * nucleus side + pad: a least-squares fit of the true boxes' sides on the sides of
    the largest nucleus group inside each."""
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
        return float(np.clip(grow, 0.3, 3.0)), float(np.clip(pad, -20, 120))
    if len(xs):  # nuclei all of one size: only the margin can be fitted
        return 1.0, float(np.clip(np.mean(ys_ - xs_), -20, 120))
    return DEFAULTS["wbc_grow"], DEFAULTS["wbc_pad"]


class _Search:
    """The search's state: the training photographs prepared once, their true boxes in working px per class, the
    white-cell exclusion masks once the white cells are fixed, the log of every candidate and the best red-cell one."""

    def __init__(self, det: ClassicalDetector, train: list[FieldAnnotation], progress: bool) -> None:
        self.det, self.progress, self.t0 = det, progress, time.perf_counter()
        f = float(det.params["downscale"])
        self.preps, self.truths = [], []
        for a in train:
            img = imread(a.path)
            if img.ndim == 2:
                img = np.repeat(img[..., None], 3, axis=2)
            self.preps.append(det.prepare(np.ascontiguousarray(img[..., :3])))
            self.truths.append([a.boxes[a.labels == k] / f for k in range(len(FIELD_CLASSES))])
        self.excl: list[np.ndarray] = []
        self.log: list[dict] = []
        self.best_red: tuple | None = None  # (objective, chosen parameters, metrics)

    def record(self, stage: str, params: dict, metrics: dict) -> None:
        self.log.append({"stage": stage, **params, **{k: round(v, 4) for k, v in metrics.items()}})

    def report(self, stage: str, chosen: dict) -> None:
        if self.progress:
            print(f"[classical fit] {stage}: {chosen} ({time.perf_counter() - self.t0:.0f} s)", flush=True)

    def typical_red_area(self) -> None:
        """The typical red-cell area (working px) a red cell's score peaks at."""
        rbc_true = np.concatenate([t[RBC] for t in self.truths]) if self.truths else np.zeros((0, 4))
        if len(rbc_true):
            areas = np.prod(rbc_true[:, 2:] - rbc_true[:, :2], axis=1)
            self.det.params["rbc_typical_area"] = float(np.median(areas) * 0.72)

    # -- stage A: white cells
    def white_cells(self) -> None:
        """For each nucleus threshold and merge radius the growth is fitted (_growth), then the minimum area searched;
        best white-cell F1, recall breaking ties."""
        det, best = self.det, None
        for nt in SEARCH_GRID["nucleus_threshold"]:
            for lm in SEARCH_GRID["lobe_merge"]:
                det.params.update(nucleus_threshold=nt, lobe_merge=lm, wbc_grow=1.0, wbc_pad=0.0, wbc_min_area=2)
                groups = [nucleus_groups(det, prep) for prep in self.preps]
                grow, pad = _growth(groups, self.truths)
                det.params.update(wbc_grow=grow, wbc_pad=pad)
                for ma in SEARCH_GRID["wbc_min_area"]:
                    det.params["wbc_min_area"] = ma
                    m = self._white_scores(groups)
                    chosen = {
                        "nucleus_threshold": nt,
                        "lobe_merge": lm,
                        "wbc_min_area": ma,
                        "wbc_grow": grow,
                        "wbc_pad": pad,
                    }
                    self.record("wbc", chosen, m)
                    key = (m["wbc_f1"], m["wbc_recall"])
                    if best is None or key > best[0]:
                        best = (key, chosen)
        det.params.update(best[1])
        self.report("white cells", best[1])
        self.excl = [det.white_and_platelets(prep, platelets=False)[2] for prep in self.preps]

    def _white_scores(self, groups: list[list[tuple]]) -> dict:
        tp = npred = ntrue = 0
        for prep, g, t in zip(self.preps, groups, self.truths):
            whites = _boxes(self.det.white_and_platelets(prep, platelets=False, groups=g)[0], 0.5)
            tp += matched(whites, t[WBC], 0.5)
            npred += len(whites)
            ntrue += len(t[WBC])
        return {"wbc_f1": _f1(tp, npred, ntrue), "wbc_recall": tp / max(ntrue, 1)}

    # -- stage B: platelets
    def platelets(self) -> None:
        """One parameter at a time, two passes, the white cells fixed; best platelet F1."""
        for _ in range(2):
            for key in PLATELET_KEYS:
                best = None
                for value in SEARCH_GRID[key]:
                    self.det.params[key] = value
                    m = self._platelet_scores()
                    self.record("platelet", {key: value}, m)
                    if best is None or m["platelet_f1"] > best[0]:
                        best = (m["platelet_f1"], value)
                self.det.params[key] = best[1]
        self.report("platelets", {k: self.det.params[k] for k in PLATELET_KEYS})

    def _platelet_scores(self) -> dict:
        tp = npred = ntrue = 0
        for prep, ex, t in zip(self.preps, self.excl, self.truths):
            found = _boxes(self.det.find_platelets(prep, ex), 0.0)
            tp += matched(found, t[PLT], 0.5)
            npred += len(found)
            ntrue += len(t[PLT])
        return {"platelet_f1": _f1(tp, npred, ntrue), "platelet_recall": tp / max(ntrue, 1)}

    # -- stage C: red cells
    def red_cells(self) -> None:
        """C1: foreground level, closing and hole size (peak distance fixed); C2: peak distance. Within each, the
        watershed is cached and the clump split area and the minimum area are searched on it (_red_search)."""
        det = self.det
        det.params["rbc_min_distance"] = DEFAULTS["rbc_min_distance"]
        for level, close, hole in itertools.product(*(SEARCH_GRID[k] for k in RBC_SHAPE_KEYS)):
            det.params.update(rbc_level=level, rbc_close=close, rbc_hole_max=hole)
            self._red_search(
                {
                    "rbc_level": level,
                    "rbc_close": close,
                    "rbc_hole_max": hole,
                    "rbc_min_distance": det.params["rbc_min_distance"],
                },
                self._foregrounds(),
            )
        det.params.update({k: self.best_red[1][k] for k in RBC_SHAPE_KEYS})
        fgs = self._foregrounds()
        for md in SEARCH_GRID["rbc_min_distance"]:
            if md == DEFAULTS["rbc_min_distance"]:
                continue
            det.params["rbc_min_distance"] = md
            self._red_search({k: det.params[k] for k in RBC_SHAPE_KEYS} | {"rbc_min_distance": md}, fgs)
        det.params.update(self.best_red[1])
        self.report("red cells", self.best_red[1])

    def _foregrounds(self) -> list[np.ndarray]:
        return [self.det.foreground(prep, ex) for prep, ex in zip(self.preps, self.excl)]

    def _red_search(self, stage_params: dict, fgs: list[np.ndarray]) -> None:
        """Split area and minimum area on one watershed per photograph; the objective is the relative count error
        plus 0.3 * (1 - F1), lowest kept in best_red."""
        det = self.det
        regions = [det.rbc_regions(fg) for fg in fgs]
        for split in SEARCH_GRID["rbc_split_area"]:
            det.params.update(rbc_split_area=split, rbc_min_area=min(SEARCH_GRID["rbc_min_area"]) * 0.6)
            cells = [det.red_cells(fg, r) for fg, r in zip(fgs, regions)]
            for ma in SEARCH_GRID["rbc_min_area"]:
                m = self._red_scores(cells, ma)
                chosen = {**stage_params, "rbc_split_area": split, "rbc_min_area": ma}
                self.record("rbc", chosen, m)
                objective = m["rbc_count_rel"] + 0.3 * (1.0 - m["rbc_f1"])
                if self.best_red is None or objective < self.best_red[0]:
                    self.best_red = (objective, chosen, m)

    def _red_scores(self, cells: list[list], min_area: float) -> dict:
        tp = npred = ntrue = 0
        rel = []
        for c, t in zip(cells, self.truths):
            found = np.asarray([b for b, _, area in c if area >= min_area], float).reshape(-1, 4)
            tp += matched(found, t[RBC], 0.5)
            npred += len(found)
            ntrue += len(t[RBC])
            if len(t[RBC]):
                rel.append(abs(len(found) - len(t[RBC])) / len(t[RBC]))
        return {"rbc_count_rel": float(np.mean(rel)) if rel else 0.0, "rbc_f1": _f1(tp, npred, ntrue)}

    # -- the outcome
    def write_log(self, run_dir: Path) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        columns = sorted({k for row in self.log for k in row}, key=lambda k: (k != "stage", k))
        with open(run_dir / "search.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.log)

    def summary(self, seconds: float) -> dict:
        best_wbc = max((r for r in self.log if r["stage"] == "wbc"), key=lambda r: (r["wbc_f1"], r["wbc_recall"]))
        best_plt = max((r for r in self.log if r["stage"] == "platelet"), key=lambda r: r["platelet_f1"])
        return {
            "fit_seconds": round(seconds, 1),
            "train_wbc_f1": best_wbc["wbc_f1"],
            "train_platelet_f1": best_plt["platelet_f1"],
            "train_rbc_count_rel": self.best_red[2]["rbc_count_rel"],
            "train_rbc_f1": self.best_red[2]["rbc_f1"],
            "params": dict(self.det.params),
        }

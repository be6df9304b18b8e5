"""Benchmark (not a test): the field checks (bloodcell.infer.field_checks) on real and spoiled smear photographs.

    .venv/bin/python benchmarks/field_checks.py                      # detect (cached), then the figures
    .venv/bin/python benchmarks/field_checks.py --cache /tmp/fc.jsonl --per-source 25

Detection runs once per photograph and variant and is kept in --cache (JSON lines: size, exposure, boxes);
a second run only recomputes the checks, so thresholds can be tried without the detector. Prints, with the machine:
1. scale: red-cell box sides (sqrt of the area, in the detector's pixels) on the training photographs (BCCD train,
   TXL-PBC train), as the detector finds them and as labelled (detect.base.cell_scale): the fallback cell_scale;
2. good photographs (TXL-PBC val + test, all BCCD photographs): how many get each problem, severe or not;
3. spoiled versions of a seeded sample per source (TXL-PBC val/test per lab, BCCD's own test split for BCCD):
   darkened x0.25 and x0.5, brightened x2 and x1.5 (clipped), zoomed in x2 (the centre half enlarged to the full
   size), zoomed out x0.5 (2 x 2 photographs of the same lab at half size), the whole photograph resized x2 and
   x0.5 (the same field in more or fewer pixels: the detector sees the same image), and 4 photographs side by side
   (a 1 x 4 strip): how many are caught, by which code, and how many have their counts withheld;
4. what exposure does to the detector: red cells found in the darkened and brightened versions against their
   original, by median brightness and by share of blown-out white;
5. the same on real photographs: red cells found over those labelled in TXL-PBC, by median brightness.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO / "src"))

VARIANTS = ("dark25", "dark50", "bright2", "bright15", "zoom2", "zoom05", "resize2", "resize05", "strip")
# what each spoiled version should be caught as (resized photographs are the same field: nothing to catch)
EXPECTED = {
    "dark25": "dark",
    "dark50": "dark",
    "bright2": "overexposed",
    "bright15": "overexposed",
    "zoom2": "magnification",
    "zoom05": "magnification",
    "resize2": None,
    "resize05": None,
    "strip": "panorama",
}


def rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def resized(a: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((w, h), Image.BILINEAR))


def spoiled(a: np.ndarray, others: list[np.ndarray], kind: str) -> np.ndarray:
    """One spoiled version of photograph `a` (`others`: 3 more photographs of its lab, for mosaics and strips)."""
    h, w = a.shape[:2]
    if kind.startswith("dark"):
        return (a * {"dark25": 0.25, "dark50": 0.5}[kind]).astype(np.uint8)
    if kind.startswith("bright"):
        return np.clip(a.astype(np.float32) * {"bright2": 2.0, "bright15": 1.5}[kind], 0, 255).astype(np.uint8)
    if kind == "zoom2":
        return resized(a[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2], w, h)
    if kind == "zoom05":
        half = [resized(b, w // 2, h // 2) for b in [a] + others]
        return np.concatenate([np.concatenate(half[:2], 1), np.concatenate(half[2:], 1)], 0)
    if kind == "resize2":
        return resized(a, 2 * w, 2 * h)
    if kind == "resize05":
        return resized(a, w // 2, h // 2)
    if kind == "strip":
        return np.concatenate([a] + [resized(b, w, h) for b in others], 1)
    raise ValueError(kind)


def photographs() -> list[tuple[str, str, Path]]:
    """(set, lab, path): TXL-PBC train / val / test (lab from sources.csv) and every BCCD photograph (its split)."""
    txl = SHARED / "txl_pbc"
    out = [(f"txl_{r['split']}", r["source"], txl / r["image"]) for r in csv.DictReader(open(txl / "sources.csv"))]
    bccd = SHARED / "bccd" / "BCCD"
    split = {n: s for s in ("train", "val", "test") for n in (bccd / "ImageSets/Main" / f"{s}.txt").read_text().split()}
    out += [(f"bccd_{split.get(p.stem, 'none')}", "bccd", p) for p in sorted((bccd / "JPEGImages").glob("*.jpg"))]
    return out


def record(detector, a: np.ndarray, **keys) -> dict:
    from bloodcell.infer.field_checks import exposure

    det = detector.detect([np.ascontiguousarray(a)])[0]
    return {
        **keys,
        "size": [a.shape[1], a.shape[0]],
        **exposure(a),
        "boxes": np.round(det.boxes, 1).tolist(),
        "labels": det.labels.tolist(),
    }


def detect_all(detector, cache: Path, per_source: int, seed: int) -> list[dict]:
    """Every photograph and spoiled version, detected once; what the cache holds is not redone."""
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.is_file() else []
    seen = {(r["set"], r["name"], r["variant"]) for r in done}
    photos = photographs()
    with cache.open("a") as out:

        def keep(r: dict) -> None:
            done.append(r)
            out.write(json.dumps(r) + "\n")
            out.flush()

        for group, lab, p in photos:
            if (group, p.name, "good") not in seen:
                keep(record(detector, rgb(p), set=group, lab=lab, name=p.name, variant="good"))
        for lab, pick in sample(photos, per_source, seed).items():
            for k, p in enumerate(pick):
                todo = [v for v in VARIANTS if ("sample", p.name, v) not in seen]
                if not todo:
                    continue
                a = rgb(p)
                others = [rgb(pick[(k + j) % len(pick)]) for j in (1, 2, 3)]
                for v in todo:
                    keep(record(detector, spoiled(a, others, v), set="sample", lab=lab, name=p.name, variant=v))
    return done


def sample(photos, per_source: int, seed: int) -> dict[str, list[Path]]:
    """A seeded sample of evaluation photographs per lab: TXL-PBC val/test (its BCCD ones aside), BCCD's test split."""
    pools = defaultdict(list)
    for group, lab, p in photos:
        if (group in ("txl_val", "txl_test") and lab != "bccd") or group == "bccd_test":
            pools[lab].append(p)
    rng = np.random.default_rng(seed)
    return {
        lab: [pool[i] for i in sorted(rng.choice(len(pool), min(per_source, len(pool)), replace=False))]
        for lab, pool in sorted(pools.items())
    }


def sides(r: dict) -> np.ndarray:
    """Red-cell box sides (sqrt of the area) in the detector's pixels (long side 384)."""
    b = np.asarray(r["boxes"], np.float64).reshape(-1, 4)[np.asarray(r["labels"]) == 0]
    return np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) * 384 / max(r["size"])


def scale_report(rows: list[dict]) -> None:
    from bloodcell.data.fields import load_fields
    from bloodcell.infer.field_checks import MIN_RED_CELLS
    from bloodcell.detect.base import cell_scale

    train = [r for r in rows if r["variant"] == "good" and r["set"] in ("txl_train", "bccd_train")]
    found = np.concatenate([sides(r) for r in train])
    q = np.percentile(found, [5, 50, 95]).round(1)
    print(f"1. training photographs: {len(train)} (BCCD train + TXL-PBC train)")
    print(f"   red-cell sides found by the detector, every box ({len(found)}): p05 {q[0]}, p50 {q[1]}, p95 {q[2]}")
    medians = [np.median(sides(r)) for r in train if len(sides(r)) >= MIN_RED_CELLS]
    print(
        f"   per photograph, median of {MIN_RED_CELLS}+ red cells ({len(medians)} photographs): "
        f"min {min(medians):.1f}, p05 {np.percentile(medians, 5):.1f}, "
        f"p95 {np.percentile(medians, 95):.1f}, max {max(medians):.1f}"
    )
    labelled = load_fields(SHARED / "txl_pbc", "train") + load_fields(SHARED / "bccd", "train")
    print(f"   as labelled (detect.base.cell_scale): {cell_scale(labelled, 384)}")
    print(f"   BCCD train only, as labelled: {cell_scale(load_fields(SHARED / 'bccd', 'train'), 384)}")


def problems_of(r: dict, cell_scale: dict | None):
    from bloodcell.infer.field_checks import field_problems

    return field_problems(
        tuple(r["size"]), r, np.asarray(r["boxes"]).reshape(-1, 4), np.asarray(r["labels"]), 384, cell_scale
    )


def good_report(rows: list[dict], cell_scale: dict | None) -> None:
    good = [
        r
        for r in rows
        if r["variant"] == "good" and r["set"] in ("txl_val", "txl_test", "bccd_train", "bccd_val", "bccd_test")
    ]
    flagged, severe = Counter(), Counter()
    for r in good:
        for p in problems_of(r, cell_scale):
            (severe if p.severe else flagged)[(r["set"].split("_")[0], p.code)] += 1
    n = Counter(r["set"].split("_")[0] for r in good)
    print(f"2. good photographs: {dict(n)}")
    print(f"   severe (counts withheld): {dict(severe) or 'none'}")
    print(f"   warnings (counts given): {dict(flagged) or 'none'}")


def bad_report(rows: list[dict], cell_scale: dict | None) -> None:
    print(
        "3. spoiled photographs: caught as expected (resized: the same problems as the original) / withheld / "
        "codes, per lab"
    )
    original = {r["name"]: [p.code for p in problems_of(r, cell_scale)] for r in rows if r["variant"] == "good"}
    by = defaultdict(list)
    for r in rows:
        if r["set"] == "sample":
            by[r["variant"]].append(r)
    for v in VARIANTS:
        want = EXPECTED[v]
        caught, withheld, codes = Counter(), Counter(), Counter()
        for r in by[v]:
            found = problems_of(r, cell_scale)
            caught[r["lab"]] += (
                any(p.code == want for p in found) if want else [p.code for p in found] == original[r["name"]]
            )
            withheld[r["lab"]] += any(p.severe for p in found)
            codes.update(p.code for p in found)
        n = Counter(r["lab"] for r in by[v])
        total = f"{sum(caught.values())}/{len(by[v])}"
        print(
            f"   {v:8s} {'as ' + want if want else 'as the original':20s} {total:8s} "
            f"withheld {sum(withheld.values())}/{len(by[v])}  "
            + " ".join(f"{lab} {caught[lab]}/{n[lab]}" for lab in sorted(n))
            + f"  codes {dict(codes)}"
        )


def exposure_report(rows: list[dict]) -> None:
    """Red cells found in the darkened / brightened versions over those found in their original (median, p10)."""
    original = {r["name"]: len(sides(r)) for r in rows if r["variant"] == "good"}
    spoilt = [r for r in rows if r["set"] == "sample" and r["variant"].startswith(("dark", "bright"))]
    print("4. red cells found against the original photograph (median ratio, p10), by exposure of the spoiled version")
    bins = (
        ("dark", "median_luminance", (0, 73, 92, 125, 256)),
        ("bright", "white_fraction", (0, 0.05, 0.6, 0.8, 0.9, 1.01)),
    )
    for kind, key, edges in bins:
        for lo, hi in zip(edges[:-1], edges[1:]):
            ratio = [
                len(sides(r)) / max(1, original[r["name"]])
                for r in spoilt
                if r["variant"].startswith(kind) and lo <= r[key] < hi
            ]
            if ratio:
                print(
                    f"   {key} {lo}-{hi}: {len(ratio)} photographs, "
                    f"ratio {np.median(ratio):.2f} (p10 {np.percentile(ratio, 10):.2f})"
                )


def dim_report(rows: list[dict]) -> None:
    """Red cells found over those labelled on TXL-PBC's own photographs (train, val, test), by median brightness."""
    labelled = {Path(r["image"]).name: int(r["rbc"]) for r in csv.DictReader(open(SHARED / "txl_pbc" / "sources.csv"))}
    txl = [r for r in rows if r["variant"] == "good" and r["set"].startswith("txl")]
    print("5. real TXL-PBC photographs: red cells found / labelled, by median brightness")
    for lo, hi in ((0, 110), (110, 125), (125, 140), (140, 160), (160, 256)):
        sel = [r for r in txl if lo <= r["median_luminance"] < hi]
        if sel:
            found, true = sum(len(sides(r)) for r in sel), sum(labelled[r["name"]] for r in sel)
            print(
                f"   {lo}-{hi}: {len(sel)} photographs ({dict(Counter(r['lab'] for r in sel))}), "
                f"{found}/{true} = {found / true:.2f}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--detector",
        default=str(REPO / "src/bloodcell/assets/default_detector/detector.onnx"),
        help="detector folder or .onnx (default: the bundled one's ONNX export, which finds the same cells)",
    )
    ap.add_argument("--cache", type=Path, default=Path("/tmp/bloodcell-field-checks.jsonl"))
    ap.add_argument("--per-source", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import os

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from bloodcell.detect.metrics import machine_line
    from bloodcell.infer.field_checks import detector_scale
    from bloodcell.detect.registry import load_detector

    detector = load_detector(args.detector)
    long_side, cell_scale = detector_scale(detector)
    assert long_side == 384, "the figures below assume a detector that sees photographs at a 384 px long side"
    rows = detect_all(detector, args.cache, args.per_source, args.seed)
    print(machine_line())
    print(f"detector {args.detector}; its cell_scale: {cell_scale or 'none (the fallback is used)'}")
    scale_report(rows)
    good_report(rows, cell_scale)
    bad_report(rows, cell_scale)
    exposure_report(rows)
    dim_report(rows)


if __name__ == "__main__":
    main()

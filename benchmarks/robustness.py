"""Benchmark (not a test): accuracy under controlled image shifts, one column per model, on the PBC test part.

    PYTHONPATH=src .venv/bin/python benchmarks/robustness.py --model default --name bundled-v3
    PYTHONPATH=src .venv/bin/python benchmarks/robustness.py --model default --name old --model runs/new --name new \\
        --limit 0 --json robustness.json --save-examples shifts.png

Test images: the test part of the bundled model's split, remade exactly as training makes it (scan the data
folder, then make_split with the split options of the bundled model's training_config: seed 42, test 0.3,
val 0.2, dedup). When the folder is the data the bundled model was trained on (same fingerprint), the test part
must have the recorded 5,130 images, or the script stops. `--limit N` (default 1000) takes a stratified,
seeded subset of it; `--limit 0` keeps all.

Every shift (the SHIFTS dict below: name -> function(image, rng) -> image) is applied to the decoded RGB image
at its stored resolution, before any model's preprocessing. The shifted image is encoded as PNG (lossless) and
classified with `Predictor.predict_images`, which decodes, resizes and normalises exactly as in production, so
each model sees the shift through its own pipeline. The JPEG shift round-trips the image through JPEG (PIL,
quality 20) inside its function; the PNG sent on holds exactly the pixels PIL decodes from that JPEG, so the
model sees what it would see from the JPEG bytes. Randomness (only the noise shift) comes from a generator
seeded with (--seed, image index): the same run gives the same pixels whatever the order or subset.

Prints the machine, versions, date, subset and seed, then a Markdown table: accuracy % with its 95% bootstrap
interval per shift and model, and the change against "none". `--json OUT` writes the raw numbers,
`--save-examples PNG` a montage of one test image under every shift.
"""

from __future__ import annotations

import argparse
import io as _io
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("BLOODCELL_PBC", REPO.parent / "shared" / "data" / "pbc"))

Shift = Callable[[np.ndarray, np.random.Generator], np.ndarray]


# ---------------------------------------------------------------------------------------------- the shifts
# Each takes and returns a uint8 (H, W, 3) image of the same shape; `rng` is only used by random shifts.


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Float image in [0, 1] -> uint8, clipped (skimage's img_as_ubyte refuses values outside [0, 1])."""
    from skimage.util import img_as_ubyte

    return img_as_ubyte(np.clip(image, 0.0, 1.0))


def rescale(image: np.ndarray, s: float, pad_mode: str = "reflect") -> np.ndarray:
    """Zoom by `s` about the centre, same output size. s > 1: centre crop of side W/s resized back to W (the cell
    looks s times larger). s < 1: resized to s*W and padded back to W with numpy `pad_mode` padding (the cell looks
    smaller among a similar background). Reflect padding mirrors the outer (1-s)/(2s) of each side: at s = 0.5 that
    reaches the centre, so mirrored copies of the cell appear in the border. pad_mode="background" pads with one
    colour instead, the per-channel median of the shrunk image's outermost pixels: no copies, a flat border."""
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    if s >= 1:
        ch, cw = max(1, round(h / s)), max(1, round(w / s))
        top, left = (h - ch) // 2, (w - cw) // 2
        return np.asarray(pil.crop((left, top, left + cw, top + ch)).resize((w, h), Image.Resampling.BICUBIC))
    sh, sw = max(1, round(h * s)), max(1, round(w * s))
    small = np.asarray(pil.resize((sw, sh), Image.Resampling.BICUBIC))
    top, left = (h - sh) // 2, (w - sw) // 2
    widths = ((top, h - sh - top), (left, w - sw - left))
    if pad_mode == "background":
        border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
        colour = np.median(border, axis=0)
        return np.stack(
            [np.pad(small[..., c], widths, mode="constant", constant_values=colour[c]) for c in range(3)], axis=-1
        )
    return np.pad(small, widths + ((0, 0),), mode=pad_mode)


def stain(
    image: np.ndarray, h_scale: float, e_scale: float, h_offset: float = 0.0, e_offset: float = 0.0
) -> np.ndarray:
    """Haematoxylin / eosin shift by colour deconvolution (skimage rgb2hed -> scale and offset H, E -> hed2rgb)."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(image)
    hed[..., 0] = hed[..., 0] * h_scale + h_offset
    hed[..., 1] = hed[..., 1] * e_scale + e_offset
    return _to_uint8(hed2rgb(hed))


def hue(image: np.ndarray, turns: float) -> np.ndarray:
    """Rotate the hue by `turns` of the colour wheel (skimage rgb2hsv / hsv2rgb)."""
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(image)
    hsv[..., 0] = np.mod(hsv[..., 0] + turns, 1.0)
    return _to_uint8(hsv2rgb(hsv))


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of `sigma` pixels at the stored resolution (skimage.filters.gaussian)."""
    from skimage.filters import gaussian

    return _to_uint8(gaussian(image, sigma=sigma, channel_axis=-1))


def noise(image: np.ndarray, sd: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise of standard deviation `sd` (on the 0..1 scale), clipped (skimage random_noise)."""
    from skimage.util import random_noise

    return _to_uint8(random_noise(image, mode="gaussian", var=sd**2, rng=rng, clip=True))


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Round trip through a JPEG of this quality (PIL, default 4:2:0 subsampling)."""
    buf = _io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    with Image.open(buf) as img:
        return np.asarray(img.convert("RGB"))


# A yellowish background like another lab's microscope: less blue, slightly more red and green.
YELLOW_GAINS = (1.05, 1.03, 0.6)


def white_balance(image: np.ndarray, gains: tuple[float, float, float] = YELLOW_GAINS) -> np.ndarray:
    """Multiply each channel by its gain and clip: a different illuminant / white balance."""
    return np.clip(image.astype(np.float32) * np.asarray(gains, dtype=np.float32), 0, 255).round().astype(np.uint8)


SHIFTS: dict[str, Shift] = {
    "none": lambda im, rng: im.copy(),
    "rescale 0.5x": lambda im, rng: rescale(im, 0.5),
    "rescale 0.5x (flat pad)": lambda im, rng: rescale(im, 0.5, pad_mode="background"),
    "rescale 0.75x": lambda im, rng: rescale(im, 0.75),
    "rescale 1.5x": lambda im, rng: rescale(im, 1.5),
    "rescale 2x": lambda im, rng: rescale(im, 2.0),
    "stain mild (H x1.15, E x0.85)": lambda im, rng: stain(im, 1.15, 0.85),
    "stain strong (H x1.4, E x0.6, +H)": lambda im, rng: stain(im, 1.4, 0.6, h_offset=0.01),
    "hue -0.05": lambda im, rng: hue(im, -0.05),
    "hue +0.05": lambda im, rng: hue(im, 0.05),
    "hue +0.1": lambda im, rng: hue(im, 0.1),
    "blur sigma 1": lambda im, rng: blur(im, 1.0),
    "blur sigma 2": lambda im, rng: blur(im, 2.0),
    "noise sd 0.05": lambda im, rng: noise(im, 0.05, rng),
    "jpeg q20": lambda im, rng: jpeg(im, 20),
    "yellow background": lambda im, rng: white_balance(im),
    "tecom-like (2x + yellow)": lambda im, rng: white_balance(rescale(im, 2.0)),
}


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for image `index` (its position in the test part): independent of order and subset."""
    return np.random.default_rng([seed, index])


def png_bytes(image: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- data


def load_test_part(data_root: Path, split_meta: dict, progress: bool) -> tuple[list[Path], list[str], dict]:
    """(paths, class names, info) of the test part, made as training makes it from `split_meta`'s training_config."""
    from bloodcell.config import parse_config
    from bloodcell.data.discover import require_trainable, scan
    from bloodcell.data.prepare import _split_config
    from bloodcell.data.split import make_split

    cfg = parse_config(split_meta["training_config"], source="bundled model training_config")
    inv = scan(data_root, max_pixels=cfg.data.max_pixels, progress=progress)
    require_trainable(inv)
    split = make_split(inv, _split_config(cfg))
    paths = [inv.path(i) for i in split.test]
    labels = [inv.records[i].label for i in split.test]
    info = {
        "root": str(inv.root),
        "images": len(inv.records),
        "fingerprint": inv.fingerprint(),
        "test": len(paths),
        "split": {k: getattr(_split_config(cfg), k) for k in ("seed", "test_size", "val_size", "dedup", "order")},
    }
    expected = (split_meta.get("bundled") or {}).get("test_n")
    if expected and inv.fingerprint() == split_meta.get("data_fingerprint") and len(paths) != expected:
        raise SystemExit(
            f"the test part of {inv.root} has {len(paths)} images, the bundled model's has {expected}: "
            "the split is not reproduced"
        )
    info["matches_bundled"] = bool(expected and inv.fingerprint() == split_meta.get("data_fingerprint"))
    return paths, labels, info


def subset(labels: list[str], limit: int, seed: int) -> np.ndarray:
    """Indices of a stratified, seeded subset of `limit` items (all when limit is 0 or >= the number of items)."""
    n = len(labels)
    if limit <= 0 or limit >= n:
        return np.arange(n)
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(np.arange(n), train_size=limit, stratify=labels, random_state=seed)
    return np.sort(keep)


# ---------------------------------------------------------------------------------------------- output


def table(results: dict, models: list[str]) -> str:
    head = ["shift"] + [c for m in models for c in (f"{m} acc % [95% CI]", f"{m} vs none")]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for shift, row in results.items():
        cells = [shift]
        for m in models:
            r = row[m]
            base = results["none"][m]["accuracy"] if "none" in results else None
            cells.append(f"{100 * r['accuracy']:.1f} [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]")
            cells.append("" if base is None or shift == "none" else f"{100 * (r['accuracy'] - base):+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_montage(path: Path, image: np.ndarray, seed: int, index: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = -(-len(SHIFTS) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, (name, fn) in zip(np.ravel(axes), SHIFTS.items()):
        ax.imshow(fn(image, image_rng(seed, index)))
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model",
        action="append",
        default=None,
        help="run dir, .safetensors, .onnx or 'default' (repeatable; default: default)",
    )
    ap.add_argument(
        "--name",
        action="append",
        default=None,
        help="column header of each --model, in order (default: the model path's name)",
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"class-per-folder data (default: {DEFAULT_DATA})")
    ap.add_argument(
        "--limit", type=int, default=1000, help="stratified seeded subset of the test part (0: all; default 1000)"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the subset, the noise and the bootstrap (default 0)")
    ap.add_argument(
        "--shifts", nargs="+", default=None, help="only these shifts (names as in the table; 'none' is always run)"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=256, help="images shifted and encoded at a time (bounds memory)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples per cell (default 1000)")
    ap.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    ap.add_argument(
        "--save-examples", type=Path, default=None, metavar="PNG", help="montage of one test image under every shift"
    )
    args = ap.parse_args(argv)

    import torch

    from bloodcell import io
    from bloodcell.data.images import load_array
    from bloodcell.evaluate.metrics import bootstrap_ci
    from bloodcell.evaluate.machine import cpu_line
    from bloodcell.infer import Predictor
    from bloodcell.progress import enabled_by_default, progress_bar

    specs = args.model or ["default"]
    names = list(args.name or [])
    if len(names) > len(specs):
        ap.error(f"{len(names)} --name for {len(specs)} --model")
    names += [("bundled" if m == "default" else Path(m).name) for m in specs[len(names) :]]
    if len(set(names)) != len(names):
        ap.error(f"column names must differ, got {names}: pass --name")
    shifts = dict(SHIFTS)
    if args.shifts:
        unknown = [s for s in args.shifts if s not in SHIFTS]
        if unknown:
            ap.error(f"unknown shift(s) {unknown}; known: {list(SHIFTS)}")
        shifts = {k: v for k, v in SHIFTS.items() if k == "none" or k in args.shifts}

    predictors = {n: Predictor.load(None if m == "default" else m) for n, m in zip(names, specs)}
    bundled = Predictor.load(None).metadata  # its training_config defines the split, whatever models are compared
    progress = enabled_by_default()
    paths, labels, info = load_test_part(args.data, bundled, progress)
    keep = subset(labels, args.limit, args.seed)
    for n, p in predictors.items():
        missing = sorted(set(labels) - set(p.class_names))
        if missing:
            raise SystemExit(f"model {n} ({p.source}) has no class {missing}: it cannot be scored on {info['root']}")

    print(f"# Robustness to image shifts on the {'PBC ' if info['matches_bundled'] else ''}test part")
    print()
    print(
        f"- machine: {cpu_line()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )
    print(f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"- command: {' '.join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))}")
    print(
        f"- data: {info['root']} ({info['images']:,} images); "
        f"test part of the split {info['split']}: {info['test']:,} images"
        + (" (= the bundled model's recorded test part)" if info["matches_bundled"] else "")
    )
    sub = (
        f"a stratified subset of {len(keep):,} (seed {args.seed})" if len(keep) < len(labels) else f"all {len(keep):,}"
    )
    print(
        f"- images scored: {sub}; noise seeded per image with (seed {args.seed}, index); "
        f"95% CI: percentile bootstrap, {args.bootstrap} resamples"
    )
    for n, p in predictors.items():
        print(f"- model {n}: {p.source} ({p.model_name}, input {p.input_size} px, {p.backend})")
    print(flush=True)

    truth = {n: np.asarray([p.class_names.index(labels[i]) for i in keep]) for n, p in predictors.items()}
    preds = {s: {n: np.full(len(keep), -1) for n in predictors} for s in shifts}
    t0 = time.perf_counter()
    with progress_bar(
        len(shifts) * len(keep),
        f"{len(shifts)} shifts x {len(keep)} images x {len(predictors)} model(s)",
        enabled=progress,
    ) as advance:
        for start in range(0, len(keep), args.chunk):
            idx = keep[start : start + args.chunk]
            images = [load_array(paths[i]) for i in idx]  # stored resolution, RGB
            for s, fn in shifts.items():
                items = [
                    (str(k), png_bytes(fn(im, image_rng(args.seed, int(i)))))
                    for k, (i, im) in enumerate(zip(idx, images))
                ]
                for n, p in predictors.items():
                    out = p.predict_images(items, batch_size=args.batch_size)
                    if out["unreadable"]:
                        raise SystemExit(
                            f"shift {s!r}: {len(out['unreadable'])} shifted image(s) unreadable, "
                            f"e.g. {out['unreadable'][0]}"
                        )
                    for r in out["predictions"]:
                        preds[s][n][start + int(r["path"])] = p.class_names.index(r["label"])
                advance(len(idx))
    seconds = time.perf_counter() - t0

    results: dict = {}
    for s in shifts:
        results[s] = {}
        for n, p in predictors.items():
            y, yhat = truth[n], preds[s][n]
            lo, hi = bootstrap_ci(y, yhat, "accuracy", n=args.bootstrap, seed=args.seed, n_classes=len(p.class_names))
            counts = np.bincount(yhat, minlength=len(p.class_names))
            results[s][n] = {
                "accuracy": float(np.mean(y == yhat)),
                "ci95": [lo, hi],
                "n": int(len(y)),
                "correct": int(np.sum(y == yhat)),
                "predicted": {c: int(k) for c, k in zip(p.class_names, counts)},
            }
    for s in shifts:
        for n in predictors:
            results[s][n]["drop_vs_none"] = results["none"][n]["accuracy"] - results[s][n]["accuracy"]

    print(table(results, list(predictors)))
    print()
    print(
        f"{len(shifts)} shifts x {len(keep):,} images x {len(predictors)} model(s) in {seconds:.0f} s. "
        "'vs none' is the change in accuracy points against the unshifted images (same images, same model)."
    )

    report = {
        "machine": {
            "cpu": cpu_line(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": info,
        "subset": {"n": int(len(keep)), "limit": args.limit, "seed": args.seed, "stratified": True},
        "models": {
            n: {"source": p.source, "model_name": p.model_name, "input_size": p.input_size, "backend": p.backend}
            for n, p in predictors.items()
        },
        "shifts": list(shifts),
        "bootstrap": args.bootstrap,
        "seconds": seconds,
        "results": results,
    }
    if args.json:
        io.write_json(args.json, report)
        print(f"raw numbers: {args.json}")
    if args.save_examples:
        first = int(keep[0])
        save_montage(
            args.save_examples,
            load_array(paths[first]),
            args.seed,
            first,
            f"{Path(paths[first]).parent.name}/{Path(paths[first]).name} under every shift",
        )
        print(f"examples: {args.save_examples}")
    return report


if __name__ == "__main__":
    main()

"""Benchmark (not a test): int8 static quantization (ONNX Runtime) of the bundled classifier against its fp32 ONNX export.

    PYTHONPATH=src .venv/bin/python benchmarks/quantize.py                      # everything (about 10 minutes on 1 core)
    PYTHONPATH=src .venv/bin/python benchmarks/quantize.py --grid none --avx2-images 0   # the shipped settings only

Data: the bundled model's own split of PBC, remade from its model.json (training_config: seed 42, test 0.3, val 0.2,
dedup) after checking the folder's fingerprint against model.json's; the script stops unless the test part has the
recorded 5,130 images. Calibration: `--calibration-images` validation images of that split, picked as
`bloodcell export --quantize int8` picks them (bloodcell.infer.quantize.calibration_set); no test image is used
for anything but the figures.

Accuracy: every test image through the fp32 graph and each int8 graph, preprocessed as Predictor does. Per graph:
accuracy, its change against fp32 in points, how many test cells int8 fixed / broke, and agreement with fp32 on the
top-1 label, the review flag (calibrated confidence below the model's review threshold) and the OOD flag.

Speed: normalise + forward (`Predictor.logits`) on real test images at batch 1 and 32, with `--threads` intra-op
threads for both graphs. Interleaved: every round times fp32 and int8 back to back (which goes first alternates),
each `--iters` runs after 2 warm-up runs, median per round; the table gives the median over `--rounds` rounds of
the per-round medians and of the per-round ratios (a background job slows both graphs of a round alike). The
method grid is timed the same way with 3 rounds. A last row times `predict_paths` (decode + resize + forward) on
the 200 sample JPEGs.

ISA: onnxruntime picks its kernels from CPUID when it starts and has no option to limit the instruction set, so
"as on an AVX2 laptop" cannot be timed here. `--avx2-images N` instead runs the int8 graphs on N test images
(a seeded random subset) under QEMU user-mode emulation of a Haswell CPU (AVX2 + FMA, no AVX-512, no VNNI), when
`qemu-x86_64` is installed: that shows what the AVX2 kernels compute (without VNNI, u8 x s8 products are summed in
16 bits and can saturate), not how fast (emulated time means nothing).
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("BLOODCELL_PBC", REPO.parent / "shared" / "data" / "pbc"))
SAMPLE = REPO / "examples" / "pbc-sample"

# the method grid: (label, QuantSettings overrides, calibration images (None: --calibration-images),
# OOD score quantized too)
GRID = [
    ("QDQ, per-tensor, 7-bit weights", dict(per_channel=False), None, False),
    ("QDQ, per-channel, 8-bit weights", dict(reduce_range=False), None, False),
    ("QDQ, per-tensor, 8-bit weights", dict(per_channel=False, reduce_range=False), None, False),
    ("QDQ, per-channel, 7-bit, Entropy", dict(method="Entropy"), None, False),
    ("QDQ, per-channel, 7-bit, Percentile", dict(method="Percentile"), None, False),
    ("QOperator, per-channel, 7-bit", dict(fmt="QOperator"), None, False),
    ("QOperator, per-tensor, 8-bit weights", dict(fmt="QOperator", per_channel=False, reduce_range=False), None, False),
    ("QDQ, per-channel, 7-bit, int8 activations", dict(activations="int8"), None, False),
    ("shipped, 32 calibration images", {}, 32, False),
    ("shipped, 1024 calibration images", {}, 1024, False),
    ("shipped, OOD score quantized too", {}, None, True),
]

# runs under QEMU: numpy and onnxruntime only (no torch), inputs already normalised
EMULATED = """
import sys, numpy as np, onnxruntime as ort
x = np.load(sys.argv[1]); out = {}
opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
for k, path in enumerate(sys.argv[3:]):
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    got = [s.run(None, {"input": x[i:i + 64]}) for i in range(0, len(x), 64)]
    out[f"logits{k}"] = np.concatenate([g[0] for g in got]); out[f"ood{k}"] = np.concatenate([g[1] for g in got])
np.savez(sys.argv[2], **out)
"""


def session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def outputs(predictor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    got = [predictor.outputs(images[i : i + 256]) for i in range(0, len(images), 256)]
    return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])


def median_ms(fn, batch: np.ndarray, iters: int) -> float:
    for _ in range(2):
        fn(batch)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def interleaved(a, b, batch: np.ndarray, rounds: int, iters: int) -> tuple[float, float, float]:
    """(median ms of a, median ms of b, median of the per-round ratios a / b); a and b alternate going first."""
    ta, tb = [], []
    for r in range(rounds):
        first, second = (a, b) if r % 2 == 0 else (b, a)
        t1, t2 = median_ms(first.logits, batch, iters), median_ms(second.logits, batch, iters)
        ta.append(t1 if r % 2 == 0 else t2)
        tb.append(t2 if r % 2 == 0 else t1)
    return statistics.median(ta), statistics.median(tb), statistics.median(x / y for x, y in zip(ta, tb))


def figures(y: np.ndarray, ref: tuple, got: tuple, predictor) -> dict:
    from bloodcell.evaluate.calibration import apply_temperature

    (l0, o0), (l1, o1) = ref, got
    right0, right1 = l0.argmax(1) == y, l1.argmax(1) == y
    review = [apply_temperature(lg, predictor.temperature).max(1) < predictor.review_threshold for lg in (l0, l1)]
    t = predictor.ood_threshold
    return {
        "accuracy": float(right1.mean()),
        "delta_points": float(100 * (right1.mean() - right0.mean())),
        "fixed": int((right1 & ~right0).sum()),
        "broken": int((right0 & ~right1).sum()),
        "top1_agreement": float((l0.argmax(1) == l1.argmax(1)).mean()),
        "review_agreement": float((review[0] == review[1]).mean()),
        "review_rate": float(review[1].mean()),
        "ood_agreement": float(((o0 > t) == (o1 > t)).mean()),
        "ood_rate": float((o1 > t).mean()),
    }


def emulate_avx2(paths: list[Path], x: np.ndarray, work: Path) -> dict | None:
    """Outputs of the graphs at `paths` on normalised `x` under QEMU's Haswell CPU; None without qemu-x86_64."""
    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        return None
    np.save(work / "x.npy", x)
    (work / "emulated.py").write_text(EMULATED)
    cmd = [
        qemu,
        "-cpu",
        "Haswell",
        sys.executable,
        str(work / "emulated.py"),
        str(work / "x.npy"),
        str(work / "out.npz"),
        *map(str, paths),
    ]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    got = np.load(work / "out.npz")
    return {k: got[k] for k in got.files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the PBC folder the bundled model was trained on")
    ap.add_argument("--calibration-images", type=int, default=None, help="default: what export uses (256)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for every timed graph")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--grid", choices=("all", "none"), default="all", help="also try the other quantization settings")
    ap.add_argument("--avx2-images", type=int, default=512, help="test images run under QEMU's AVX2 CPU (0: skip)")
    ap.add_argument("--json", type=Path, help="write the raw figures here")
    args = ap.parse_args()

    import onnxruntime as ort

    from bloodcell import __version__
    from bloodcell.config import parse_config
    from bloodcell.data.prepare import split_files
    from bloodcell.evaluate.machine import cpu_line
    from bloodcell.infer import Predictor
    from bloodcell.infer import quantize as q
    from bloodcell.infer.export import export_onnx
    from bloodcell.models.description import read_description
    from bloodcell.models.metadata import bundled_model_dir

    model = bundled_model_dir()
    meta = read_description(model)
    n_calib = args.calibration_images or q.DEFAULT_CALIBRATION_IMAGES
    print(
        f"machine: {cpu_line()}, {os.cpu_count()} logical cores, {platform.system()} {platform.machine()}; "
        f"onnxruntime intra-op threads {args.threads}; load average at start {os.getloadavg()[0]:.1f}"
    )
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"versions: python {platform.python_version()}, onnxruntime {ort.__version__}, bloodcell {__version__}")
    print("ISA: onnxruntime selects its kernels from CPUID and has no setting to limit them (no AVX2-only timing here)")

    cfg = parse_config(meta.training_config)
    files, names = split_files(cfg, args.data, "test", fingerprint=meta.data_fingerprint)
    if len(files) != meta.bundled["test_n"]:
        raise SystemExit(
            f"the test part of {args.data} has {len(files)} images, the bundled model's {meta.bundled['test_n']}"
        )
    y = np.asarray([meta.names.index(c) for c in names])

    result: dict = {"machine": cpu_line(), "threads": args.threads, "onnxruntime": ort.__version__}
    with tempfile.TemporaryDirectory(prefix="bloodcell-quantize-") as tmp:
        work = Path(tmp)
        fp32 = export_onnx(model, work / "fp32.onnx").path
        t0 = time.perf_counter()
        shipped = export_onnx(
            model, work / "int8.onnx", quantize="int8", calibration_images=n_calib, data_root=args.data
        )
        export_s = time.perf_counter() - t0
        qz = shipped.quantization
        print(
            f"model: bundled {meta.model_name} at {meta.preprocessing.input_size} px; "
            f"data {args.data.resolve()}, split seed "
            f"{cfg.split_seed}, test part {len(files):,} images; calibration: {qz['calibration']}"
        )
        print(
            f"export --quantize int8: {export_s:.1f} s including the fp32 export; guard on {qz['check']['on']}: top-1 "
            f"{100 * qz['check']['top1_agreement']:.1f} %, OOD flags {100 * qz['check']['ood_flag_agreement']:.1f} %"
        )
        ref = Predictor.load(fp32)
        ref.session = session(fp32, args.threads)
        images, bad = q.decode_all(ref, files)
        assert bad == 0 and len(images) == len(files)
        ref_out = outputs(ref, images)
        acc0 = float((ref_out[0].argmax(1) == y).mean())
        recorded = meta.bundled["test_accuracy"]
        print(
            f"fp32 ONNX: accuracy {100 * acc0:.2f} % on the test part ({recorded * 100:.2f} % recorded), "
            f"{fp32.stat().st_size / 1e3:,.0f} kB"
        )
        print()

        # ---- accuracy and quick speed of every setting
        calib = q.calibration_set(meta, str(model), n_calib, data_root=args.data)
        variants = [("shipped: QDQ, per-channel, 7-bit weights, MinMax, u8 activations", work / "int8.onnx")]
        if args.grid == "all":
            for k, (label, over, n, ood_too) in enumerate(GRID):
                c = calib if n is None else q.calibration_set(meta, str(model), n, data_root=args.data)
                cal_images, _ = q.decode_all(ref, c.calibration)
                path = work / f"grid{k}.onnx"
                q.quantize_file(ref, fp32, path, cal_images, q.QuantSettings(**over), keep_fp32=[] if ood_too else None)
                variants.append((label, path))
        print(
            "| int8 setting | size kB | accuracy % | change, points | fixed / broken | top-1 agreement % | "
            "review-flag agreement % | OOD flags % (agreement %) | speed-up b1 | speed-up b32 |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        print(
            f"| fp32 ONNX (reference) | {fp32.stat().st_size / 1e3:,.0f} | {100 * acc0:.2f} | - | - | - | - | "
            f"{100 * (ref_out[1] > ref.ood_threshold).mean():.2f} | 1 | 1 |"
        )
        rows = []
        batches = {bs: images[:bs] for bs in (1, 32)}
        for label, path in variants:
            p = Predictor.load(fp32)  # the fp32 sidecar: grid files have none, and the preprocessing is the same
            p.session = session(path, args.threads)
            f = figures(y, ref_out, outputs(p, images), ref)
            f["speedup"] = {bs: interleaved(ref, p, b, 3, args.iters)[2] for bs, b in batches.items()}
            f.update(label=label, kB=path.stat().st_size / 1e3)
            rows.append(f)
            print(
                f"| {label} | {f['kB']:,.0f} | {100 * f['accuracy']:.2f} | {f['delta_points']:+.2f} | "
                f"{f['fixed']} / {f['broken']} | "
                f"{100 * f['top1_agreement']:.2f} | {100 * f['review_agreement']:.2f} | "
                f"{100 * f['ood_rate']:.2f} ({100 * f['ood_agreement']:.2f}) | "
                f"{f['speedup'][1]:.2f}x | {f['speedup'][32]:.2f}x |",
                flush=True,
            )
        result["variants"] = rows

        # ---- the shipped int8 against fp32, timed carefully
        int8 = Predictor.load(work / "int8.onnx")
        int8.session = session(work / "int8.onnx", args.threads)
        print()
        print(
            f"Speed, shipped int8 vs fp32 ONNX Runtime "
            f"({args.rounds} interleaved rounds of {args.iters} runs, medians):"
        )
        print()
        print("| batch | fp32 ms | int8 ms | fp32 img/s | int8 img/s | int8 speed-up |")
        print("|---:|---:|---:|---:|---:|---:|")
        result["speed"] = {}
        for bs, b in batches.items():
            a, c, ratio = interleaved(ref, int8, b, args.rounds, args.iters)
            result["speed"][bs] = {"fp32_ms": a, "int8_ms": c, "speedup": ratio}
            print(
                f"| {bs} | {a:.2f} | {c:.2f} | {1000 * bs / a:,.0f} | {1000 * bs / c:,.0f} | {ratio:.2f}x |", flush=True
            )
        if SAMPLE.is_dir():
            jpegs = sorted(SAMPLE.rglob("*.jpg"))
            rates: dict[str, list[float]] = {"fp32": [], "int8": []}
            for r in range(3):
                for name, p in (("fp32", ref), ("int8", int8)) if r % 2 == 0 else (("int8", int8), ("fp32", ref)):
                    t0 = time.perf_counter()
                    p.predict_paths(jpegs, batch_size=32, progress=False)
                    rates[name].append(len(jpegs) / (time.perf_counter() - t0))
            a, c = statistics.median(rates["fp32"]), statistics.median(rates["int8"])
            result["speed"]["predict_paths"] = {"fp32_img_s": a, "int8_img_s": c}
            print(
                f"| predict_paths, {len(jpegs)} sample JPEGs "
                f"(decode + resize + forward, {ref.workers} decode threads) | "
                f"- | - | {a:,.0f} | {c:,.0f} | {c / a:.2f}x |"
            )

        # ---- what the AVX2 kernels compute
        if args.avx2_images:
            # the shipped 7-bit weights against full 8-bit ones, where saturation would show
            nodes = [variants[0]] + [v for v in variants if v[0] == "QDQ, per-channel, 8-bit weights"]
            # the test part is ordered by class: a seeded random subset keeps every class in
            pick = np.sort(np.random.default_rng(0).permutation(len(images))[: args.avx2_images])
            x = ref.normalise(images[pick])
            emulated = emulate_avx2([path for _, path in nodes], x, work)
            print()
            if emulated is None:
                print("AVX2 emulation: qemu-x86_64 not found; skipped")
            else:
                n = len(x)
                print(
                    f"Under QEMU's Haswell CPU (AVX2, no AVX-512, no VNNI), "
                    f"{n} test images (seeded random subset), 1 thread:"
                )
                print()
                print(
                    "| int8 setting | max abs logit diff vs same file on this CPU | top-1 agreement with fp32 % | "
                    "accuracy % (this CPU) | accuracy % (AVX2) |"
                )
                print("|---|---:|---:|---:|---:|")
                result["avx2"] = []
                for k, (label, path) in enumerate(nodes):
                    p = Predictor.load(fp32)
                    p.session = session(path, args.threads)
                    here = outputs(p, images[pick])[0]
                    there = emulated[f"logits{k}"]
                    row = {
                        "label": label,
                        "images": n,
                        "max_abs_diff": float(np.abs(there - here).max()),
                        "top1_agreement": float((there.argmax(1) == ref_out[0][pick].argmax(1)).mean()),
                        "accuracy_here": float((here.argmax(1) == y[pick]).mean()),
                        "accuracy_avx2": float((there.argmax(1) == y[pick]).mean()),
                    }
                    result["avx2"].append(row)
                    print(
                        f"| {label} | {row['max_abs_diff']:.3g} | {100 * row['top1_agreement']:.2f} | "
                        f"{100 * row['accuracy_here']:.2f} | {100 * row['accuracy_avx2']:.2f} |"
                    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()

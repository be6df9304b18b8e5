"""Benchmark (not a test): export every registered classifier and the bundled model to ONNX, and say how it went.

    PYTHONPATH=src .venv/bin/python benchmarks/export_zoo.py                       # every model, the exporter export picks
    PYTHONPATH=src .venv/bin/python benchmarks/export_zoo.py --models cnn bundled --exporter torchscript --int8

Each zoo model is built untrained (random weights, no download) at a small input size (`--size`, raised to the
model's minimum and multiple; Inception-V3 and the hybrid need 75 px), its last layer scaled by 25 so that its logits
are spread as a trained model's are, and given an OOD score fitted on the first 80 of the embedded sample images (its
threshold flags 2 of the 200, as tests/test_quantize.py's does), so that the exported graph has both outputs
(`logits`, `ood_score`) as the bundled model's has. `bundled` is the model that ships in the package (80 px, trained,
with its own OOD score). Untrained networks are a poor stand-in for the figures that depend on the weights: with the
initial batch-norm statistics (`--init default`) Inception-V3's logits reach 1e6 at 75 px, so float32 rounding alone
exceeds the parity tolerance; with statistics of sample images (`--init bn-stats`) the logits are sane but the deeper
networks' rounding still reaches 1e-4 to 1e-3, and their near-random top-1 labels flip under int8. Compare exporters
on the same `--init`, not a model against the tolerance.

Per model: which exporter wrote the file (and, for a fallback, the first line of why dynamo could not), the seconds
torch.onnx.export took and the seconds of the whole export_onnx call (export + onnxruntime session + parity check),
the parity figure export_onnx measured (largest |ONNX - PyTorch| on the 8 sample images at batch 1 and at batch 8,
the OOD score relative to its size), the largest difference between batch 5 and five batch-1 runs of the same
graph, and the opset in the file. `--int8` also writes the int8 export (calibrated on 64 sample images, checked on
the other 136) and gives its top-1 and OOD-flag agreement with fp32. `--exporter torchscript` forces the legacy
exporter, for comparison. Timings depend on the machine and on whatever else runs on it: say which, and whether
it was idle, beside any figure taken from here.
"""  # noqa: E501

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "pbc-sample"
CLASSES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def machine() -> str:
    from bloodcell.detect.metrics import machine_line

    return machine_line()


def small_size(spec, size: int) -> int:
    s = max(size, spec.min_input_size)
    return -(-s // spec.input_multiple) * spec.input_multiple


def zoo_run(name: str, directory: Path, size: int, bn_stats: bool = False) -> tuple[Path, int]:
    """An untrained `name` at a small size with sharpened logits and an OOD score, saved as a run directory.

    bn_stats: batch-norm statistics of sample images instead of the initial ones (see --init).
    """
    import torch

    from bloodcell.evaluate.ood import fit_mahalanobis
    from bloodcell.infer import Predictor
    from bloodcell.models import create_model, save_checkpoint
    from bloodcell.models.ood import ood_features, save_ood
    from bloodcell.models.registry import get_spec

    s = small_size(get_spec(name), size)
    torch.manual_seed(0)
    model = create_model(name, num_classes=len(CLASSES), input_size=s)
    files = sorted(SAMPLE.rglob("*.jpg"))
    if bn_stats:
        save_checkpoint(model, directory, {"class_names": CLASSES})
        p = Predictor.load(directory)
        x = torch.from_numpy(p.normalise(np.stack([p.decode(f) for f in files[::3]])))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # a plain average over the batches below
        model.train()
        with torch.no_grad():
            for i in range(0, len(x), 16):
                model(x[i : i + 16])
        model.eval()
    with torch.no_grad():
        model.head[-1].weight.mul_(25)  # the logits Linear of every BloodcellModel: logits spread as a trained model's
    save_checkpoint(model, directory, {"class_names": CLASSES, "temperature": 1.0, "review_threshold": 0.6})
    p = Predictor.load(
        directory
    )  # OOD features fitted on the first 80 sample images, as tests/conftest.py's with_ood does
    x = p.normalise(np.stack([p.decode(f) for f in files]))
    with torch.no_grad():
        feats = ood_features(p.model, torch.from_numpy(x))[1].numpy()
    means, precision = fit_mahalanobis(
        feats[:80], np.asarray([CLASSES.index(f.parent.name) for f in files[:80]]), len(CLASSES)
    )
    save_ood(directory, means, precision)
    from bloodcell.evaluate.ood import mahalanobis_score

    # the threshold flags 2 of the 200 sample images, as tests/test_quantize.py's does (a real one flags about 1 %)
    scores = np.sort(mahalanobis_score(feats, means, precision))
    from bloodcell.models.description import update_description

    ood = {"method": "mahalanobis", "file": "ood.safetensors", "threshold": float(scores[-3] + scores[-2]) / 2}
    update_description(directory, ood=ood)  # and re-seal the folder
    return directory, s


def batch_consistency(path: Path, predictor) -> float:
    """Largest difference between batch 5 and five batch-1 runs of the exported graph, over every output."""
    from bloodcell.models.onnx_runtime import onnx_session

    session = onnx_session(path)
    files = [sorted((SAMPLE / c).glob("*.jpg"))[0] for c in CLASSES[:5]]
    x = predictor.normalise(np.stack([predictor.decode(f) for f in files]))
    five = session.run(None, {"input": x})
    ones = [session.run(None, {"input": x[i : i + 1]}) for i in range(5)]
    diff = 0.0
    for k, full in enumerate(five):
        assert full.shape[0] == 5, full.shape
        scale = 1.0 if k == 0 else max(1.0, float(np.abs(full).max()))
        diff = max(diff, float(np.abs(full - np.concatenate([o[k] for o in ones])).max()) / scale)
    return diff


def main() -> int:
    from bloodcell.models.registry import list_models

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=list_models() + ["bundled"])
    parser.add_argument(
        "--size", type=int, default=32, help="input size of the zoo models (raised to each one's minimum)"
    )
    parser.add_argument(
        "--init",
        choices=("default", "bn-stats"),
        default="default",
        help="bn-stats: batch-norm statistics of sample images instead of the initial mean 0, variance 1",
    )
    parser.add_argument("--exporter", choices=("auto", "torchscript"), default="auto")
    parser.add_argument("--opset", type=int, default=None, help="default: export_onnx's default")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-2,
        help="parity tolerance given to export_onnx (each row still says whether it is within PARITY_TOLERANCE)",
    )
    parser.add_argument("--int8", action="store_true", help="also export int8 and give its agreement with fp32")
    parser.add_argument("--json", type=Path, help="write the rows here too")
    args = parser.parse_args()

    import bloodcell
    from bloodcell.infer import Predictor
    from bloodcell.infer import export as ex
    from bloodcell.models.description import read_onnx_description

    timed = {}
    real_export = ex._export

    def timing_export(*a, **k):
        t = time.perf_counter()
        try:
            timed["exporter"], timed["reason"] = real_export(*a, **k)
            return timed["exporter"], timed["reason"]
        finally:
            timed["export_s"] = time.perf_counter() - t

    ex._export = timing_export
    if args.exporter == "torchscript":
        ex.dynamo_unavailable = lambda: "forced by benchmarks/export_zoo.py --exporter torchscript"

    print(machine(), flush=True)
    print(f"exporter: {args.exporter}; dynamo {ex.dynamo_unavailable() or 'available'}; init {args.init}", flush=True)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="export-zoo-") as work:
            work = Path(work)
            if name == "bundled":
                run, size = Path(bloodcell.__file__).parent / "assets" / "default_model", 80
            else:
                run, size = zoo_run(name, work / "run", args.size, args.init == "bn-stats")
            predictor = Predictor.load(run)
            row = {"model": name, "size": size}
            # a loose tolerance so that every model's figure is measured; the row says whether it is within export's own
            kwargs = {"tolerance": args.tolerance} | ({} if args.opset is None else {"opset": args.opset})
            t = time.perf_counter()
            timed.clear()
            try:
                report = ex.export_onnx(run, work / "m.onnx", **kwargs)
            except Exception as exc:  # noqa: BLE001 - a benchmark reports every failure and goes on
                if "exporter" in timed:  # written, then refused by the parity check
                    row.update(
                        exporter=timed["exporter"],
                        fallback_reason=timed["reason"],
                        export_s=round(timed["export_s"], 1),
                    )
                row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                print(json.dumps(row), flush=True)
                rows.append(row)
                continue
            side = read_onnx_description(report.path).to_dict()["onnx"]
            row.update(
                exporter=report.exporter,
                fallback_reason=side.get("fallback_reason"),
                opset=side["opset"],
                outputs=side["outputs"],
                export_s=round(timed["export_s"], 1),
                export_onnx_s=round(time.perf_counter() - t, 1),
                parity=report.max_abs_diff,
                parity_ok=report.max_abs_diff <= ex.PARITY_TOLERANCE,
                batch5_vs_1=batch_consistency(report.path, predictor),
                mb=round(report.path.stat().st_size / 1e6, 2),
            )
            if args.int8:
                t = time.perf_counter()
                try:
                    q = ex.export_onnx(
                        run, work / "q.onnx", quantize="int8", calibration_images=64, calibration_dir=SAMPLE, **kwargs
                    )
                    c = q.quantization["check"]
                    row.update(
                        int8_exporter=q.exporter,
                        int8_top1=c["top1_agreement"],
                        int8_ood=c.get("ood_flag_agreement"),
                        int8_s=round(time.perf_counter() - t, 1),
                    )
                except Exception as exc:  # noqa: BLE001
                    row.update(int8_error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": machine(), "exporter": args.exporter, "init": args.init, "rows": rows}, indent=1)
        )
    return 1 if any("error" in r or "int8_error" in r or not r.get("parity_ok") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

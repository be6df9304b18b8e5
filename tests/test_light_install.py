"""The inference install (`pip install bloodcell`, no PyTorch): predict, serve, the count and `evaluate --model` run the
bundled model's ONNX export with the PyTorch path's results, smear-field photographs run the bundled detector's ONNX
export with the PyTorch detector's cells, and a command that needs training says which extra to install, in one line.

Most tests run bloodcell in a subprocess where every module of the [train] extra fails to import (a start-up hook),
which is what the light install looks like to bloodcell; one slow test builds the real thing: a fresh venv with
`pip install .` and no torch at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from bloodcell.extras import TRAIN_MODULES
from bloodcell.infer import Predictor
from bloodcell.detect.registry import bundled_detector_dir
from bloodcell.models.metadata import bundled_model_dir
from bloodcell.models.seal import seal

from conftest import REPO, SAMPLE, env_with_startup_hook, field_photo

BLOODCELL = [sys.executable, "-m", "bloodcell"]
INSTALL_HINT = "pip install 'bloodcell[train]'"

# Start-up hook: every module of the [train] extra is "not installed"; at exit, the names of any that got imported.
BLOCK_TRAIN_MODULES = f"""
import atexit, importlib.abc, json, os, sys
BLOCKED = {sorted(TRAIN_MODULES)!r}
class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named '{{name}}'", name=name)
        return None
sys.meta_path.insert(0, _NotInstalled())
@atexit.register
def _report():
    with open(os.environ["IMPORTED_LOG"], "a") as fh:
        fh.write(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)) + "\\n")
"""


@pytest.fixture()
def torchless(tmp_path):
    """Run a command as the light install would: returns (run, imported) where imported() lists train modules seen."""
    log = tmp_path / "imported.jsonl"
    env = env_with_startup_hook(tmp_path, BLOCK_TRAIN_MODULES, IMPORTED_LOG=str(log))

    def run(*args: str, code: str | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-c", code] if code is not None else BLOODCELL + list(args)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)

    def imported() -> list[str]:
        return sorted({m for line in log.read_text().splitlines() for m in json.loads(line)})

    return run, imported


@pytest.fixture(scope="module")
def pytorch_result():
    """The bundled model's answer on the 200-image sample through PyTorch (the full install)."""
    predictor = Predictor.load(None)
    assert predictor.backend == "pytorch"
    return predictor.predict_paths([SAMPLE], progress=False)


def assert_same_answers(got: dict, want: dict) -> None:
    """Same labels, review and OOD flags and counts; probabilities within 1e-4, OOD scores within 1e-4 relative."""
    g = {p["path"]: p for p in got["predictions"]}
    w = {p["path"]: p for p in want["predictions"]}
    assert set(g) == set(w) and len(g) == 200
    for path, want_p in w.items():
        got_p = g[path]
        assert (got_p["label"], got_p["review"], got_p["ood"]) == (want_p["label"], want_p["review"], want_p["ood"]), (
            path
        )
        diff = max(abs(got_p["probabilities"][c] - v) for c, v in want_p["probabilities"].items())
        assert diff < 1e-4, (path, diff)
        assert abs(got_p["ood_score"] - want_p["ood_score"]) <= 1e-4 * max(1.0, abs(want_p["ood_score"])) + 1e-3, path
    assert got["counts"] == want["counts"] and got["ood_count"] == want["ood_count"]


def test_bundled_onnx_is_the_bundled_model():
    """model.onnx was exported from these very weights (hashes in model.json) and computes what PyTorch computes."""
    folder = bundled_model_dir()
    section = json.loads((folder / "model.json").read_text())["onnx"]
    for name, digest in section["exported_from"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, (
            f"{name} changed since model.onnx was made: tools/bundle_model.py --refresh"
        )
    onnx = Predictor.load(folder / "model.onnx")
    assert onnx.backend == "onnxruntime" and onnx.has_ood
    assert onnx.metadata["class_names"] == Predictor.load(None).class_names


def test_onnx_path_of_the_bundled_model_matches_pytorch_in_process(pytorch_result):
    onnx = Predictor.load(bundled_model_dir() / "model.onnx")
    assert_same_answers(onnx.predict_paths([SAMPLE], progress=False), pytorch_result)


def test_predict_without_pytorch_gives_the_pytorch_answers(torchless, pytorch_result, tmp_path):
    run, imported = torchless
    out = tmp_path / "result.json"
    proc = run("predict", str(SAMPLE), "--format", "json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert imported() == []  # nothing of the [train] extra was even imported
    result = json.loads(out.read_text())
    assert result["fields"] == []
    assert_same_answers(result, pytorch_result)


def test_summary_count_card_and_data_inspect_without_pytorch(torchless):
    run, imported = torchless
    proc = run("predict", str(SAMPLE / "neutrophil"), "--format", "summary")
    assert proc.returncode == 0, proc.stderr
    assert "neutrophil" in proc.stdout and "%" in proc.stdout
    card = run("card")
    assert card.returncode == 0, card.stderr
    assert "model.onnx (what an install without PyTorch runs)" in card.stdout
    inspect = run("data", "inspect", str(SAMPLE))
    assert inspect.returncode == 0 and "224x224 (200)" in inspect.stdout, inspect.stderr
    assert imported() == []


def test_the_seal_is_checked_without_pytorch(torchless, tmp_path):
    """The light install checks the bundled model's seal (hashlib only) and refuses an edited copy in one line."""
    run, imported = torchless
    ok = run("model", "verify", "default")
    assert ok.returncode == 0 and ok.stdout.startswith("OK "), ok.stderr
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("model.json", "model.onnx", "SEAL.json"):
        (copy / name).write_bytes((bundled_model_dir() / name).read_bytes())
    meta = json.loads((copy / "model.json").read_text())
    meta["class_names"][0], meta["class_names"][1] = meta["class_names"][1], meta["class_names"][0]
    (copy / "model.json").write_text(json.dumps(meta))
    proc = run("predict", str(SAMPLE / "neutrophil"), "--model", str(copy / "model.onnx"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and "model.json changed since it was sealed" in proc.stderr
    assert imported() == []


def test_evaluate_a_labelled_folder_without_pytorch(torchless, pytorch_result, tmp_path):
    run, imported = torchless
    out = tmp_path / "eval"
    proc = run("evaluate", str(SAMPLE), "--model", "default", "--out", str(out), "--bootstrap", "50")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    want = sum(p["label"] == Path(p["path"]).parent.name for p in pytorch_result["predictions"]) / 200
    assert metrics["full"]["accuracy"] == pytest.approx(want)
    assert metrics["provenance"]["environment"].get("torch") is None  # measured without PyTorch, and says so
    assert imported() == []


def test_evaluate_a_folder_of_fewer_classes_than_the_model_without_pytorch(torchless, tmp_path):
    """The restricted scores (the classes present only) are numpy: they once came from a module that imports torch."""
    run, imported = torchless
    folder = tmp_path / "two"
    for cls in ("neutrophil", "lymphocyte"):
        (folder / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / cls).glob("*.jpg"))[:3]:
            (folder / cls / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "eval"
    proc = run("evaluate", str(folder), "--model", "default", "--out", str(out), "--bootstrap", "20")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["restricted"]["class_names"]) == ["lymphocyte", "neutrophil"] and metrics["n"] == 6
    assert imported() == []


def test_serve_without_pytorch(torchless):
    run, imported = torchless
    image = sorted((SAMPLE / "eosinophil").iterdir())[0]
    code = f"""
import json
from fastapi.testclient import TestClient
from bloodcell.infer import Predictor
from bloodcell.serve.app import create_app
client = TestClient(create_app(Predictor.load(None)))
health = client.get("/health").json()
with open({str(image)!r}, "rb") as fh:
    pred = client.post("/predict", files={{"files": ("cell.jpg", fh.read(), "image/jpeg")}}).json()
explain = client.post("/explain", files={{"file": ("cell.jpg", b"x", "image/jpeg")}})
print(json.dumps([health["backend"], health["explain"], pred["predictions"][0]["label"], explain.status_code]))
"""
    proc = run(code=code)
    assert proc.returncode == 0, proc.stderr
    backend, can_explain, label, explain_status = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (backend, can_explain, explain_status) == ("onnxruntime", False, 501)
    assert label == Predictor.load(None).predict_paths([image], progress=False)["predictions"][0]["label"]
    assert imported() == []


def test_the_review_workstation_without_pytorch(torchless, tmp_path):
    """A lab on the light install reviews a sample: upload, relabel, count, sign off, report, export."""
    run, imported = torchless
    images = [str(p) for p in sorted((SAMPLE / "lymphocyte").iterdir())[:3]]
    code = f"""
import json, zipfile, io
from fastapi.testclient import TestClient
from bloodcell.infer import Predictor
from bloodcell.serve.app import create_app
client = TestClient(create_app(Predictor.load(None), data_dir={str(tmp_path / "lab")!r}))
client.post("/api/samples", json={{"sample_id": "L1", "who": "AB"}})
files = [("files", (p.rsplit("/", 1)[1], open(p, "rb").read(), "image/jpeg")) for p in {images!r}]
added = client.post("/api/samples/L1/uploads?who=AB", files=files).json()["cells"]
client.post(f"/api/samples/L1/cells/{{added[0]}}/label", json={{"label": "smudge", "who": "AB"}})
client.post("/api/samples/L1/signoff", json={{"who": "AB"}})
names = zipfile.ZipFile(io.BytesIO(client.get("/api/samples/L1/export.zip").content)).namelist()
print(json.dumps([client.get("/api/samples/L1/count").json()["wbc_total"], client.get("/api/samples/L1/report").status_code,
                  sorted(n.split("/")[1] for n in names if n.count("/") == 2)]))
"""  # noqa: E501
    proc = run(code=code)
    assert proc.returncode == 0, proc.stderr
    wbc_total, report_status, folders = json.loads(proc.stdout.strip().splitlines()[-1])
    assert wbc_total == 2 and report_status == 200 and "smudge" in folders
    assert imported() == []


@pytest.mark.parametrize(
    "args",
    [
        ["train", "configs/demo-cnn.yaml", "--data", str(SAMPLE)],
        ["study", "configs/demo.yaml"],
        ["export", "RUN", "--onnx", "x.onnx"],
        ["explain", str(SAMPLE / "basophil"), "--out", "cams"],
        ["models"],
        ["detector", "train", "configs/detector.yaml", "--data", "bccd"],
        ["ensemble", "RUN", "RUN", "--out", "ens"],
    ],
    ids=["train", "study", "export", "explain", "models", "detector-train", "ensemble"],
)
def test_a_command_that_needs_pytorch_names_the_extra_in_one_line(torchless, args):
    run, _ = torchless
    args = [str(REPO / a) if a.startswith("configs/") else a for a in args]
    if args[0] == "export":
        args[1] = str(bundled_model_dir())
    proc = run(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and INSTALL_HINT in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def assert_same_fields(got: dict, want: dict) -> None:
    """Same counts and white-cell classes; every cell paired with one of the same kind (IoU > 0.99 of the boxes as the
    JSON rounds them to 0.1 px), scores within 1e-3, white cells with the same label and flags."""
    from bloodcell.detect.fcos_onnx import box_iou

    assert got["counts"] == want["counts"] and got["wbc_classes"] == want["wbc_classes"]
    assert len(got["cells"]) == len(want["cells"])
    for kind in ("rbc", "wbc", "platelet"):
        g = [c for c in got["cells"] if c["kind"] == kind]
        w = [c for c in want["cells"] if c["kind"] == kind]
        if not w:
            continue
        iou = box_iou(np.array([c["box"] for c in w]), np.array([c["box"] for c in g]))
        pair = iou.argmax(axis=1)
        assert len(set(pair.tolist())) == len(w) and iou.max(axis=1).min() > 0.99, kind
        for wc, j in zip(w, pair):
            assert abs(g[j]["score"] - wc["score"]) < 1e-3 + 1e-4, (kind, wc, g[j])  # + the JSON's rounding
            assert (g[j].get("label"), g[j].get("review"), g[j].get("ood")) == (
                wc.get("label"),
                wc.get("review"),
                wc.get("ood"),
            )


def test_fields_without_pytorch_find_the_cells_pytorch_finds(torchless, tmp_path):
    """predict --input field (and auto, and serve ?input=field) read a smear photograph with the bundled detector's ONNX
    export: the same cells and counts as the PyTorch detector, and nothing of the [train] extra imported."""
    from bloodcell.infer.fields import predict_paths_mixed

    run, imported = torchless
    photo = field_photo(tmp_path / "smear.jpg")
    want = predict_paths_mixed(Predictor.load(None), [photo], "field")["fields"]
    assert len(want) == 1 and sum(want[0]["counts"].values()) > 5  # the PyTorch detector finds cells in it
    forced = run("predict", str(photo), "--input", "field", "--format", "json")
    assert forced.returncode == 0, forced.stderr
    auto = run("predict", str(photo), "--format", "json")
    assert auto.returncode == 0, auto.stderr
    code = f"""
import json
from fastapi.testclient import TestClient
from bloodcell.infer import Predictor
from bloodcell.serve.app import create_app
client = TestClient(create_app(Predictor.load(None)))
with open({str(photo)!r}, "rb") as fh:
    print(json.dumps(client.post("/predict?input=field", files={{"files": ("smear.jpg", fh.read(), "image/jpeg")}}).json()))
"""  # noqa: E501
    served = run(code=code)
    assert served.returncode == 0, served.stderr
    for proc in (forced, auto, served):
        result = json.loads(proc.stdout.strip().splitlines()[-1] if proc is served else proc.stdout)
        assert result["predictions"] == [] and len(result["fields"]) == 1
        assert_same_fields(result["fields"][0], want[0])
    assert json.loads(auto.stdout)["fields"][0]["input"] == "field"
    assert imported() == []


def test_a_detector_without_an_onnx_export_needs_pytorch_and_says_so(torchless, tmp_path):
    """A saved FCOS detector without an `onnx` section: --input field fails in one line naming the extra; auto reads
    the photograph as a cell and says why."""
    run, _ = torchless
    folder = tmp_path / "detector"
    folder.mkdir()
    meta = json.loads((bundled_detector_dir() / "detector.json").read_text())
    meta.pop("onnx")
    meta["weights"] = (
        "detector.safetensors"  # as a training run saves it (the bundled folder keeps its weights in the ONNX)
    )
    (folder / "detector.json").write_text(json.dumps(meta))
    seal(folder)
    photo = field_photo(tmp_path / "smear.jpg")
    forced = run("predict", str(photo), "--input", "field", "--format", "json", "--detector", str(folder))
    assert forced.returncode == 2 and INSTALL_HINT in forced.stderr and len(forced.stderr.strip().splitlines()) == 1, (
        forced.stderr
    )
    auto = run("predict", str(photo), "--format", "json", "--detector", str(folder))
    assert auto.returncode == 0, auto.stderr
    result = json.loads(auto.stdout)
    assert result["fields"] == [] and len(result["predictions"]) == 1
    assert "no field detector available" in json.dumps(result) and INSTALL_HINT in json.dumps(result)


def test_a_pytorch_run_directory_without_pytorch_is_one_line(torchless, tmp_path):
    run, _ = torchless
    proc = run("predict", str(SAMPLE / "basophil"), "--model", str(bundled_model_dir() / "model.safetensors"))
    assert proc.returncode == 2 and INSTALL_HINT in proc.stderr and "bloodcell export" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_real_install_without_torch(tmp_path, pytorch_result):
    """`pip install .` into a fresh venv (PyPI, or pip's cache): no torch arrives, and predict gives the same
    answers."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(REPO)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format", "json"], env=env, capture_output=True, text=True, check=True
    )
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not names & {"torch", "torchvision", "timm", "lightning", "nvidia-cudnn-cu12", "triton"}, names
    detector = next(env_dir.rglob("bloodcell/assets/default_detector"))
    assert sorted(p.name for p in detector.iterdir()) == [
        "DETECTOR_CARD.md",
        "SEAL.json",
        "detector.json",
        "detector.onnx",
    ]  # the weights once
    out = tmp_path / "result.json"
    proc = subprocess.run(
        [str(env_dir / "bin" / "bloodcell"), "predict", str(SAMPLE), "--format", "json", "--out", str(out)],
        env=dict(env, BLOODCELL_PROGRESS="0"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert_same_answers(json.loads(out.read_text()), pytorch_result)
    train = subprocess.run(
        [str(env_dir / "bin" / "bloodcell"), "train", str(REPO / "configs" / "demo-cnn.yaml")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert train.returncode == 2 and INSTALL_HINT in train.stderr, train.stderr
    size = sum(f.stat().st_size for f in env_dir.rglob("*") if f.is_file())
    print(f"light install: {size / 1e6:.0f} MB in the venv")

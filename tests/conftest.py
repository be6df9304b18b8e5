"""Shared fixtures: generated image trees and the locations of the real data."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bloodcell.data.fields import FIELD_CLASSES
from bloodcell.detect.base import Detections, FieldDetector

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "pbc-sample"
PBC = Path(os.environ.get("BLOODCELL_PBC", REPO.parent / "shared" / "data" / "pbc"))
BCCD = REPO.parent / "shared" / "data" / "bccd"


def cli_env() -> dict:
    """The environment of a `bloodcell` subprocess: this checkout's source, no progress bars, one thread."""
    return dict(os.environ, BLOODCELL_PROGRESS="0", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))


def env_with_startup_hook(tmp_path: Path, code: str, **extra: str) -> dict:
    """cli_env() in which every Python process (each DDP rank too) runs `code` at start-up, as sitecustomize."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(code)
    return dict(cli_env(), PYTHONPATH=f"{hook}{os.pathsep}{cli_env()['PYTHONPATH']}", **extra)


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module, loaded once: tests reuse a benchmark's code instead of copying it."""
    return _load_script(REPO / "benchmarks" / f"{name}.py")


def load_tool(name: str):
    """tools/<name>.py as a module, loaded once (tools/headless_chromium.py starts the tests' browser)."""
    return _load_script(REPO / "tools" / f"{name}.py")


def _load_script(path: Path):
    if path.stem not in sys.modules:
        spec = importlib.util.spec_from_file_location(path.stem, path)
        sys.modules[path.stem] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[path.stem])
    return sys.modules[path.stem]


os.environ.setdefault("BLOODCELL_PROGRESS", "0")

# The only skips CI accepts, each with why. Under CI=true any other skip (a missing Chromium, PBC copy, setpriv...)
# fails the test instead: a tool that did not install must not turn into a quietly green run.
CI_ALLOWED_SKIPS = {
    "mount -t tmpfs is not permitted here": (
        "a container without CAP_SYS_ADMIN cannot mount; the disk-full test then has no real full disk"
    ),
    "the kernel refused to reset the memory high-water mark": "some kernels and containers forbid /proc/PID/clear_refs",
    "not root: the permission tests above already run": "without root the chmod 000 tests above already cover it",
}


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (on_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not any(allowed in reason for allowed in CI_ALLOWED_SKIPS):
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, and this skip is not in conftest.CI_ALLOWED_SKIPS: {reason}"


def processes_running(text: str) -> list[int]:
    """PIDs of live processes whose command line contains `text` (a /proc scan: no procps needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:  # gone while we looked
                pass
    return found


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """CI has two busy cores: one torch thread per process is faster there, and runs stay comparable."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CLASS_NAMES = ["basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"]


def toy_run(directory: Path, seed: int = 0, size: int = 32) -> Path:
    """An untrained cnn with sharpened logits saved as a run directory (temperature 1.3, review below 0.6)."""
    import torch

    from bloodcell.models import create_model
    from bloodcell.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    model = create_model("cnn", num_classes=8, input_size=size)
    with torch.no_grad():
        model.head[-1].weight.mul_(25)
    return save_checkpoint(model, directory, {"class_names": CLASS_NAMES, "temperature": 1.3, "review_threshold": 0.6})


def with_ood(run: Path, threshold: float | None = None) -> Path:
    """Give a toy run an OOD score fitted on sample images (its 'training cells'): ood.safetensors + model.json `ood`.

    threshold: the OOD threshold written to model.json (default: the median score of the fitted images, so
    that about half the sample images are flagged); see set_ood_threshold to flag chosen images.
    """
    import json

    import torch

    from bloodcell.evaluate.ood import fit_mahalanobis, mahalanobis_score
    from bloodcell.infer import Predictor
    from bloodcell.models.metadata import write_model_json
    from bloodcell.models.ood import ood_features, save_ood

    p = Predictor.load(run)
    files = sorted(SAMPLE.rglob("*.jpg"))[:80]
    x = p.normalise(np.stack([p.decode(f) for f in files]))
    with torch.no_grad():
        feats = ood_features(p.model, torch.from_numpy(x))[1].numpy()
    labels = np.asarray([CLASS_NAMES.index(f.parent.name) for f in files])
    means, precision = fit_mahalanobis(feats, labels, len(CLASS_NAMES))
    save_ood(run, means, precision)
    scores = mahalanobis_score(feats, means, precision)
    meta = json.loads((run / "model.json").read_text())
    meta["ood"] = {
        "method": "mahalanobis",
        "file": "ood.safetensors",
        "threshold": float(threshold if threshold is not None else np.median(scores)),
    }
    write_model_json(run, meta)  # and re-seal, as every writer of a model folder does
    return run


def set_ood_threshold(run: Path, files, flagged: int) -> float:
    """Set the OOD threshold of a run made by `with_ood` so that exactly the `flagged` highest-scoring `files`
    are OOD."""
    import json

    from bloodcell.infer import Predictor
    from bloodcell.models.metadata import write_model_json

    scores = sorted(q["ood_score"] for q in Predictor.load(run).predict_paths(files, progress=False)["predictions"])
    cut = len(scores) - flagged
    assert 0 <= cut <= len(scores) and (flagged == 0 or cut == 0 or scores[cut - 1] < scores[cut]), scores
    if flagged == 0:
        t = scores[-1] + 1.0
    elif cut == 0:
        t = scores[0] - 1.0
    else:
        t = (scores[cut - 1] + scores[cut]) / 2
    meta = json.loads((run / "model.json").read_text())
    meta["ood"]["threshold"] = float(t)
    write_model_json(run, meta)
    return t


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own cache root and review data folder: no test reads or writes another's, or the user's."""
    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("BLOODCELL_DATA_DIR", str(tmp_path_factory.mktemp("review-data")))


def write_image(
    path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 36), mode: str = "RGB", fmt: str | None = None
) -> Path:
    """A random image (unique content) of the given mode; the format follows the suffix unless given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
    img.save(path, format=fmt)
    return path


def make_tree(root: Path, counts: dict[str, int], seed: int = 0, size=(40, 36), suffix: str = ".png") -> Path:
    rng = np.random.default_rng(seed)
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            write_image(root / name / f"{name}_{k:04d}{suffix}", rng, size)
    return root


@pytest.fixture
def tree(tmp_path) -> Path:
    return make_tree(tmp_path / "ds", {"alpha": 12, "beta": 9, "gamma": 7})


class FixedDetector(FieldDetector):
    """Stand-in for a trained detector (none is bundled yet): fixed boxes scaled to the photograph.

    One white cell in the middle, four red cells near the corners, one platelet, all scored 0.9, plus one faint
    red cell scored 0.3 that the operating threshold (0.5) drops; nothing at all in a blank (flat) image. Its red
    cells are a fifth of the short side, so `input=auto` reads a square PBC crop as a single cell (the white cell
    fills the classifier's view) and a 4:3 photograph as a field.
    """

    name = "fixed"
    BOXES = [  # kind, x0 and y0 as shares of width and height (None: centred), side as a share of the short side, score
        ("wbc", None, None, 0.25, 0.9),
        ("rbc", 0.03, 0.04, 0.2, 0.9),
        ("rbc", 0.76, 0.04, 0.2, 0.9),
        ("rbc", 0.03, 0.72, 0.2, 0.9),
        ("rbc", 0.76, 0.72, 0.2, 0.9),
        ("platelet", 0.5, 0.06, 0.04, 0.9),
        ("rbc", 0.3, 0.75, 0.2, 0.3),
    ]

    def detect_one(self, image: np.ndarray) -> Detections:
        if float(image.reshape(-1, 3).std(axis=0).max()) < 3.0:  # a blank (flat) photograph: no cells
            return Detections.empty()
        h, w = image.shape[:2]
        s = min(w, h)
        boxes, labels, scores = [], [], []
        for kind, fx, fy, side, score in self.BOXES:
            d = side * s
            x0, y0 = ((w - d) / 2, (h - d) / 2) if fx is None else (fx * w, fy * h)
            boxes.append([x0, y0, x0 + d, y0 + d])
            labels.append(FIELD_CLASSES.index(kind))
            scores.append(score)
        return Detections(np.asarray(boxes, np.float32), np.asarray(labels, np.int64), np.asarray(scores, np.float32))


FIXED_COUNTS = {"rbc": 4, "wbc": 1, "platelet": 1}  # what FixedDetector keeps in a photograph that is not blank


@pytest.fixture
def fixed_detector():
    """A FieldDetector returning fixed boxes (see FixedDetector); name 'fixed', not registered."""
    return FixedDetector()


def field_photo(path: Path, size: tuple[int, int] = (640, 480), seed: int = 0, blank: bool = False) -> Path:
    """A generated smear-like JPEG: pale background, pink discs, one purple blob in the middle (or flat, blank)."""
    from PIL import ImageDraw

    w, h = size
    img = Image.new("RGB", size, (236, 226, 232))
    if not blank:
        rng = np.random.default_rng(seed)
        draw = ImageDraw.Draw(img)
        for _ in range(40):
            x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.06, 0.10) * min(w, h)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(214, 140, 150))
        r = 0.1 * min(w, h)
        draw.ellipse([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], fill=(110, 60, 150))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=90)
    return path


def needs_pbc():
    return pytest.mark.skipif(not PBC.is_dir(), reason=f"real PBC data not found at {PBC}")


def needs_bccd():
    return pytest.mark.skipif(not BCCD.is_dir(), reason=f"real BCCD photographs not found at {BCCD}")

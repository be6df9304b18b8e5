"""tools/gpu_check.sh, the one command for a lent GPU machine, run end to end at toy scale on the CPU (--dry-run).

A lent GPU session has minutes and no second try, so every step of the script (environment, carried wheels, the
WebP pack unzipped, the throughput benchmark, a recipe training) must already work here; the GPU only changes
the scale. The pack is made here with device_pack.py's layout: <class>/<name>.webp, stored, in one zip.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO, SAMPLE

STEPS = ["env", "deps", "unpack", "throughput", "train"]
MODELS = ["resnet50", "mobilenetv2", "densenet201", "hybrid"]


def webp_pack(path: Path, per_class: int = 12) -> Path:
    """A small pack as ../shared/tools/device_pack.py makes one: images re-encoded as WebP, zip stored."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for class_dir in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
            for f in sorted(class_dir.glob("*.jpg"))[:per_class]:
                buf = io.BytesIO()
                Image.open(f).convert("RGB").save(buf, "WEBP", quality=75)
                zf.writestr(f"{class_dir.name}/{f.stem}.webp", buf.getvalue())
    return path


def run_check(out: Path, *args: str, script: Path = REPO / "tools" / "gpu_check.sh") -> subprocess.CompletedProcess:
    env = dict(os.environ, PY=sys.executable, OMP_NUM_THREADS="1", TMPDIR=str(out.parent))
    env.pop("OUT", None)  # the device tool's variable must not redirect a test's output
    return subprocess.run(
        ["bash", str(script), "--dry-run", *args, str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )


def step_table(summary: str) -> dict[str, tuple[str, int]]:
    """step -> (exit code cell, seconds) from summary.md's steps table."""
    rows = re.findall(r"^\| (\w+) \| ([^|]+?) \| (\d+) \| \d+ \|$", summary, re.M)
    return {name: (rc, int(secs)) for name, rc, secs in rows}


@pytest.mark.slow
def test_dry_run_passes_every_step_and_writes_the_figures(tmp_path):
    pack = webp_pack(tmp_path / "pack.zip")
    out = tmp_path / "out"
    proc = run_check(out, "--zip", str(pack))
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + log[-3000:]

    summary = (out / "summary.md").read_text()
    steps = step_table(summary)
    assert list(steps) == STEPS, summary
    assert all(rc == "0" for rc, _ in steps.values()), summary
    assert summary.startswith("### GPU check, ")

    # the pack was the one unzipped: 12 per class, all WebP
    assert "images: 96 WebP" in log
    env = (out / "env.txt").read_text()
    assert "torch " in env and "PIL reads WebP: True" in env
    assert "nvidia-smi: absent" in env or "NVIDIA-SMI" in env

    table = [line for line in (out / "throughput.md").read_text().splitlines() if line.startswith("| ")]
    rows = {line.split("|")[1].strip().split(" ")[0]: line for line in table[1:]}
    assert list(rows) == MODELS
    for line in rows.values():
        rates = [float(c) for c in re.findall(r"\| ([\d.]+) (?=\|)", line)]
        assert len(rates) == 3 and all(r > 0 for r in rates), line
    assert all(line in summary for line in rows.values())

    metrics = json.loads((out / "train_metrics.json").read_text())
    assert 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert metrics["provenance"]["model"] == "resnet50"
    history = (out / "train_history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and len(history) == 2  # one epoch in a dry run
    assert re.search(r"\*\*test accuracy \d+\.\d\d %\*\*", summary)
    # nothing else: the device returns at most 8 files, two folders deep
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["env.txt", "gpu_check.log", "summary.md", "throughput.md", "train_history.csv", "train_metrics.json"]
    )
    assert not list(tmp_path.glob("gpu_check.*")), "the scratch folder is left behind"


def test_a_failing_step_is_recorded_and_the_next_steps_still_run(tmp_path):
    """A zip that is not a zip: unpack fails, the steps after it still run and are listed; the exit code says so."""
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    script = tmp_path / "tools" / "gpu_check.sh"
    # a copy whose slow steps do nothing, so this checks the bookkeeping alone, in seconds
    text = (REPO / "tools" / "gpu_check.sh").read_text()
    text = text.replace('cd "$(dirname "$0")/.."', f'cd "{REPO}"')
    for name in ("step_env", "step_deps", "step_throughput", "step_train"):
        text = text.replace(f"\n{name}() {{\n", f"\n{name}() {{\n  echo skipped; exit 0\n")
    script.parent.mkdir()
    script.write_text(text)
    out = tmp_path / "out"
    proc = run_check(out, "--zip", str(bad), script=script)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    steps = step_table((out / "summary.md").read_text())
    assert list(steps) == STEPS
    assert steps["unpack"][0] == "1" and all(steps[s][0] == "0" for s in STEPS if s != "unpack")
    assert "no result" in (out / "summary.md").read_text()

"""Benchmark (not a test): how big and how slow each install is, from this checkout into fresh venvs.

    .venv/bin/python benchmarks/install.py              # both: the inference install and .[train]
    .venv/bin/python benchmarks/install.py --only light

For each install: a new venv, `pip install <clone>[extra]` timed (wall), from a fresh clone of this checkout's HEAD
(a working tree's stale build/ folder would leak old files into the wheel), then the venv's size on disk, the largest
packages, and the time of a first `bloodcell predict` on the embedded sample. pip's cache is used when it has the
wheels (say so when you quote a time: a cold cache downloads several GB for [train]). Prints the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

from bloodcell.evaluate.machine import cpu_line

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "pbc-sample"
INSTALLS = {"light": "", "train": "[train]"}


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def measure(name: str, extra: str, root: Path, source: Path) -> dict:
    env_dir = root / name
    venv.create(env_dir, with_pip=True)
    py, env = (
        env_dir / "bin" / "python",
        {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")},
    )
    t0 = time.perf_counter()
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"{source}{extra}"],
        env=env,
        capture_output=True,
        text=True,
    )
    if pip.returncode:
        sys.exit(f"pip install {source}{extra} failed:\n{pip.stderr[-3000:]}")
    install_s = time.perf_counter() - t0
    site = next((env_dir / "lib").glob("python*/site-packages"))
    sizes = sorted(((folder_size(p) if p.is_dir() else p.stat().st_size, p.name) for p in site.iterdir()), reverse=True)
    t0 = time.perf_counter()
    subprocess.run(
        [str(env_dir / "bin" / "bloodcell"), "predict", str(SAMPLE), "--format", "summary"],
        env=dict(env, BLOODCELL_PROGRESS="0"),
        check=True,
        capture_output=True,
    )
    predict_s = time.perf_counter() - t0
    return {
        "install": f"pip install bloodcell{extra}",
        "install_seconds": round(install_s, 1),
        "venv_mb": round(folder_size(env_dir) / 1e6),
        "largest": [f"{n} {s / 1e6:.0f} MB" for s, n in sizes[:6]],
        "first_predict_seconds": round(predict_s, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=sorted(INSTALLS), default=None)
    args = ap.parse_args()
    print(f"machine: {cpu_line()}, {os.cpu_count()} cpus, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="bloodcell-install-") as root:
        source = Path(root) / "clone"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(source)], check=True)
        for name, extra in INSTALLS.items():
            if args.only in (None, name):
                print(json.dumps({name: measure(name, extra, Path(root), source)}, indent=1), flush=True)


if __name__ == "__main__":
    sys.exit(main())

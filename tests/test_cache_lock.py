"""Several processes (DDP ranks, study workers) asking for the same cache at once: one builds, the others wait and
reuse it, so none removes a cache another is reading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from conftest import SAMPLE

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, os, sys, time
from pathlib import Path
from bloodcell.data.cache import build_cache
from bloodcell.data.discover import scan
inv = scan(sys.argv[1], progress=False, cache_dir=None)
while not Path(sys.argv[2]).exists():  # start together
    time.sleep(0.001)
cache = build_cache(inv, 24, "bilinear", sys.argv[3], workers=1, progress=False)
print(json.dumps({"built": cache.build_seconds is not None, "sum": int(cache.images.sum(dtype="int64")), "path": str(cache.path)}))
"""  # noqa: E501


def test_concurrent_builders_of_one_cache_build_it_once_and_agree(tmp_path):
    go, cache_root = tmp_path / "go", tmp_path / "cache"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", BLOODCELL_PROGRESS="0")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(SAMPLE), str(go), str(cache_root)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    time.sleep(0.5)  # not a timing assumption: the children wait for `go`; this only lets them finish importing
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["built"] for r in results) == 1, results
    assert len({(r["sum"], r["path"]) for r in results}) == 1
    assert not list((cache_root / "arrays").glob(".build-*")), "a builder's temporary folder was left behind"

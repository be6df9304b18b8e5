"""Benchmark (not a test): the review workstation with a large sample, in a real browser.

    .venv/bin/python benchmarks/review_gallery.py                 # 1,000 cells, 30 reclassifications
    .venv/bin/python benchmarks/review_gallery.py --cells 2000 --relabels 50

Starts the real server (`bloodcell serve`, the bundled model, a fresh --data-dir) on a free port, fills one sample with
--cells cells through the API (the embedded sample's 200 images, each sent several times under its own name, classified
by the bundled model), then drives headless Chromium (Selenium):

- gallery open: from navigating to the sample's address to the moment every cell is in the gallery and every thumbnail
  in the window has loaded (the page's own performance.now(), so it includes the HTML, the script, the API calls and
  the thumbnails; --repeats loads, median and max);
- reclassification: a key press on a selected cell, (a) until its thumbnail stands in its new class and the next cell
  is selected, (b) until the frame after that is painted (what the person sees), (c) until the server has saved it
  (the answer of the POST), each timed by the page from its key handler (window.bloodcellTiming).

Targets (issue 26): the gallery in at most 1 s and a reclassification shown in at most 100 ms on 2 cores. Prints the
machine (CPU model and flags), versions and date, then a Markdown table. Needs chromium and chromedriver.
"""

from __future__ import annotations

import argparse
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

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
from headless_chromium import CHROMIUM, chromium  # noqa: E402  (tools/: the browser's options, said once)

SAMPLE = REPO / "examples" / "pbc-sample"
SAMPLE_ID = "BENCH-1"

GALLERY_READY = """
const done = arguments[arguments.length - 1], want = arguments[0];
(function check() {
  const thumbs = document.querySelectorAll('#gallery .thumb');
  if (thumbs.length === want) {
    const h = window.innerHeight, imgs = [...document.querySelectorAll('#gallery .thumb img')].filter((i) => {
      const r = i.getBoundingClientRect(); return r.bottom > 0 && r.top < h; });
    if (imgs.length && imgs.every((i) => i.complete && i.naturalWidth > 0)) { done(performance.now()); return; }
  }
  setTimeout(check, 5);
})();
"""


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bloodcell = Path(sys.executable).parent / "bloodcell"
    proc = subprocess.Popen(
        [str(bloodcell), "serve", "--port", str(port), "--data-dir", str(data_dir)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start within 60 s")


def fill(url: str, cells: int) -> float:
    """Upload `cells` cells in batches of 200; returns the seconds it took (classification included)."""
    images = sorted(f for d in SAMPLE.iterdir() if d.is_dir() for f in d.iterdir())
    httpx.post(f"{url}/api/samples", json={"sample_id": SAMPLE_ID, "who": "bench"}, timeout=30).raise_for_status()
    t0 = time.perf_counter()
    sent = 0
    while sent < cells:
        batch = [
            (
                "files",
                (
                    f"{sent + i:05d}-{images[(sent + i) % len(images)].name}",
                    images[(sent + i) % len(images)].read_bytes(),
                    "image/jpeg",
                ),
            )
            for i in range(min(200, cells - sent))
        ]
        httpx.post(
            f"{url}/api/samples/{SAMPLE_ID}/uploads?who=bench&input=cell", files=batch, timeout=600
        ).raise_for_status()
        sent += len(batch)
    return time.perf_counter() - t0


def browser(profile: Path):
    driver = chromium(profile, window="1400,1000")
    driver.set_script_timeout(60)
    return driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--relabels", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5, help="gallery loads to time")
    args = ap.parse_args()

    from selenium.webdriver.common.action_chains import ActionChains

    from bloodcell import __version__
    from bloodcell.evaluate.machine import cpu_line

    work = Path(tempfile.mkdtemp(prefix="review-bench-"))
    proc, url = start_server(work / "data")
    driver = None
    try:
        upload_s = fill(url, args.cells)
        driver = browser(work / "profile")
        driver.get(url + "/")
        driver.execute_script("localStorage.setItem('bloodcell.who', 'bench')")
        opens = []
        for _ in range(args.repeats):
            driver.get("about:blank")
            driver.get(f"{url}/#/sample/{SAMPLE_ID}")
            opens.append(driver.execute_async_script(GALLERY_READY, args.cells))
        labels = httpx.get(f"{url}/api/labels").json()["labels"]
        shown, painted, saved = [], [], []
        ids = [c["id"] for c in httpx.get(f"{url}/api/samples/{SAMPLE_ID}/cells", timeout=30).json()]
        for k in range(args.relabels):
            cell_id = ids[(k * 37) % len(ids)]
            driver.execute_script("document.querySelector(`.thumb[data-id='${arguments[0]}']`).click()", cell_id)
            label = labels[(k % 7) + 1]
            driver.execute_script("window.bloodcellTiming = null")
            ActionChains(driver).send_keys(str(labels.index(label) + 1)).perform()
            t_end = time.monotonic() + 10
            timing = None
            while time.monotonic() < t_end:
                timing = driver.execute_script("return window.bloodcellTiming")
                if timing and "saved_ms" in timing and "painted_ms" in timing:
                    break
                time.sleep(0.01)
            shown.append(timing["shown_ms"])
            painted.append(timing["painted_ms"])
            saved.append(timing["saved_ms"])
        assert len(httpx.get(f"{url}/api/samples/{SAMPLE_ID}/corrections").json()) == args.relabels
    finally:
        if driver:
            driver.quit()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    print(f"# review workstation benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {cpu_line()}, {os.cpu_count()} cores, {platform.platform()}; bloodcell {__version__}, "
        f"python {platform.python_version()}, {driver_version()}"
    )
    print(
        f"command: {' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}; {args.cells} cells uploaded and classified in "
        f"{upload_s:.1f} s (bundled model, ONNX Runtime)\n"
    )
    print("| measure | n | median | max | target |\n|---|---|---|---|---|")
    print(
        f"| gallery open, {args.cells} cells (navigation -> all cells placed, visible thumbnails loaded) | "
        f"{len(opens)} | "
        f"{statistics.median(opens):.0f} ms | {max(opens):.0f} ms | <= 1000 ms |"
    )
    print(
        f"| reclassification in the page (key -> thumbnail moved, next cell selected) | {len(shown)} | "
        f"{statistics.median(shown):.1f} ms | {max(shown):.1f} ms | - |"
    )
    print(
        f"| reclassification shown (key -> the next frame painted) | {len(painted)} | "
        f"{statistics.median(painted):.1f} ms | {max(painted):.1f} ms | <= 100 ms |"
    )
    print(
        f"| reclassification saved (key -> server's answer) | {len(saved)} | {statistics.median(saved):.1f} ms | "
        f"{max(saved):.1f} ms | - |"
    )


def driver_version() -> str:
    try:
        out = subprocess.run([CHROMIUM or "chromium", "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "chromium ?"


if __name__ == "__main__":
    main()

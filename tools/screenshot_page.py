"""Screenshot of the web page classifying sample images with the bundled model (for the README).

    .venv/bin/python tools/screenshot_page.py docs/img/serve.png
    .venv/bin/python tools/screenshot_page.py /tmp/page-ood.png --model RUN --add other-lab/*.bmp

Starts the server on a free 127.0.0.1 port, uploads one sample image per class (plus the `--add`
images, e.g. cells from another lab that a model with an OOD score flags) in headless Chromium
(Debian's chromium + chromium-driver), waits for the cards and saves a screenshot.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from bloodcell.infer import Predictor
from bloodcell.serve.app import create_app

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pbc-sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--model", default=None, help="run directory, .safetensors or .onnx (default: the bundled model)")
    parser.add_argument("--height", type=int, default=1100, help="window height in pixels (taller: more cards in view)")
    parser.add_argument("--add", nargs="*", default=[], type=Path, help="more images to upload after the samples")
    args = parser.parse_args()
    out = args.out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(Predictor.load(args.model)), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--window-size=1400,{args.height}",
                f"--user-data-dir={tempfile.mkdtemp()}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        files = [sorted((SAMPLE / c).glob("*.jpg"))[3] for c in sorted(p.name for p in SAMPLE.iterdir() if p.is_dir())]
        files += [f.resolve() for f in args.add]
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys("\n".join(map(str, files)))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".cell-card")) == len(files))
        time.sleep(0.5)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
        server.should_exit = True
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

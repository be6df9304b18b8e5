"""Screenshots of the web pages with the bundled model (for the README and docs).

    .venv/bin/python tools/screenshot_page.py docs/img/serve.png --workstation --photo ../shared/data/bccd/BCCD/JPEGImages/BloodImage_00002.jpg
    .venv/bin/python tools/screenshot_page.py docs/img/classify.png
    .venv/bin/python tools/screenshot_page.py /tmp/page-ood.png --model RUN --add other-lab/*.bmp

Starts the server on a free 127.0.0.1 port in headless Chromium (Debian's chromium + chromium-driver). The one-off page
(/classify): uploads one sample image per class (plus the `--add` images, e.g. cells from another lab that a model with
an OOD score flags), waits for the cards. --workstation: the review workstation (/) with a fresh data folder: a sample
of 4 cells per class and the --photo smear photograph, two cells relabelled by key, the analyser's WBC count entered,
one cell selected. Saves a screenshot.
"""  # noqa: E501

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from bloodcell.infer import Predictor
from bloodcell.serve.app import create_app
from headless_chromium import chromium  # tools/, beside this script

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pbc-sample"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument(
        "--model", default=None, help="run directory, .safetensors or .onnx (default: the bundled model)"
    )
    parser.add_argument("--height", type=int, default=1100, help="window height in pixels (taller: more cards in view)")
    parser.add_argument("--add", nargs="*", default=[], type=Path, help="more images to upload after the samples")
    parser.add_argument("--workstation", action="store_true", help="the review workstation instead of the one-off page")
    parser.add_argument("--photo", type=Path, help="with --workstation: a smear photograph to add to the sample")
    args = parser.parse_args()
    out = args.out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data_dir = tempfile.mkdtemp() if args.workstation else None
    app = create_app(Predictor.load(args.model), data_dir=data_dir)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    driver = chromium(tempfile.mkdtemp(), window=f"1400,{args.height}")
    try:
        if args.workstation:
            workstation(driver, f"http://127.0.0.1:{port}", args.photo)
            driver.save_screenshot(str(out))
            print(f"wrote {out}")
            return
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


def workstation(driver, url: str, photo: Path | None) -> None:
    wait = WebDriverWait(driver, 60)
    driver.get(url + "/")
    wait.until(lambda d: "connecting" not in d.find_element(By.ID, "model-info").text)
    driver.find_element(By.ID, "who").send_keys("JS")
    driver.find_element(By.ID, "new-id").send_keys("H26-00417")
    driver.find_element(By.ID, "new-note").send_keys("routine differential, ward 4")
    driver.find_element(By.CSS_SELECTOR, "#new-sample button[type=submit]").click()
    wait.until(lambda d: "H26-00417" in d.find_element(By.ID, "sample-title").text)
    files = [f for c in sorted(p for p in SAMPLE.iterdir() if p.is_dir()) for f in sorted(c.glob("*.jpg"))[:4]]
    files += [photo.resolve()] if photo else []
    driver.find_element(By.ID, "upload-input").send_keys("\n".join(map(str, files)))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .thumb")) >= len(files))
    thumbs = driver.find_elements(By.CSS_SELECTOR, "#gallery .thumb")
    for thumb, key in ((thumbs[1], "3"), (thumbs[6], "a")):
        thumb.click()
        ActionChains(driver).send_keys(key).perform()
        time.sleep(0.3)
    driver.find_element(By.ID, "wbc-count").send_keys("7.5\n")
    time.sleep(0.5)
    driver.find_elements(By.CSS_SELECTOR, "#gallery .thumb")[3].click()
    time.sleep(1.0)


if __name__ == "__main__":
    main()

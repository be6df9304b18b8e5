"""End to end in a real browser: uvicorn serves the app, headless Chromium (Selenium) uploads two images.

Needs Debian's `chromium` and `chromium-driver` packages (/usr/bin/chromium, /usr/bin/chromedriver);
skipped with the reason when they are missing.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from bloodcell.infer import Predictor
from conftest import CLASS_NAMES, toy_run

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "pbc-sample"
NAMES = CLASS_NAMES
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.load(toy_run(tmp_path_factory.mktemp("run") / "run", seed=1))


@pytest.fixture(scope="module")
def server_url(predictor):
    import uvicorn

    from bloodcell.serve.app import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(predictor), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 20 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_upload_two_images_shows_the_predicted_classes(browser, server_url, predictor, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    files = [sorted((SAMPLE / "neutrophil").glob("*.jpg"))[0], sorted((SAMPLE / "ig").glob("*.jpg"))[0]]
    want = predictor.predict_paths(files, progress=False)

    browser.get(server_url + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert "model cnn" in browser.find_element(By.ID, "model-info").text

    browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys("\n".join(str(f) for f in files))
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".cell-card")) == 2)
    cards = browser.find_elements(By.CSS_SELECTOR, ".cell-card")
    assert [c.get_attribute("data-name") for c in cards] == [f.name for f in files]
    assert [c.get_attribute("data-label") for c in cards] == [p["label"] for p in want["predictions"]]
    for card, p in zip(cards, want["predictions"]):
        assert card.get_attribute("data-review") == str(p["review"]).lower()
        assert len(card.find_elements(By.CSS_SELECTOR, ".bar")) == len(NAMES)
        assert card.find_element(By.CSS_SELECTOR, ".thumb img").get_attribute("naturalWidth") == "224"

    # the differential count table agrees with the Predictor
    for cls, n in want["counts"].items():
        row = browser.find_element(By.CSS_SELECTOR, f"#differential tbody tr[data-cls='{cls}']")
        assert row.find_elements(By.TAG_NAME, "td")[0].text == str(n)
    assert [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#flags li")] == want["flags"]
    browser.save_screenshot(str(tmp_path / "serve.png"))
    assert (tmp_path / "serve.png").stat().st_size > 10_000

    # Grad-CAM on click: the dialog shows the PNG returned by /explain
    cards[0].find_element(By.CSS_SELECTOR, ".cam-button").click()
    wait.until(lambda d: d.find_element(By.ID, "cam-image").get_attribute("data-state") in ("done", "error"))
    cam = browser.find_element(By.ID, "cam-image")
    assert cam.get_attribute("data-state") == "done"
    wait.until(lambda d: int(d.find_element(By.ID, "cam-image").get_attribute("naturalWidth") or 0) >= 400)
    browser.save_screenshot(str(tmp_path / "serve-gradcam.png"))

    # no script error or Content-Security-Policy violation on the way
    severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []

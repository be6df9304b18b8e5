"""End to end in a real browser: uvicorn serves the app, headless Chromium (Selenium) uploads two images.

Needs Debian's `chromium` and `chromium-driver` packages (/usr/bin/chromium, /usr/bin/chromedriver);
skipped with the reason when they are missing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from bloodcell.infer import Predictor
from conftest import CLASS_NAMES, set_ood_threshold, toy_run, with_ood

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


@contextlib.contextmanager
def serving(predictor):
    """uvicorn serving `predictor` on a free 127.0.0.1 port in a thread; yields the base URL."""
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
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server_url(predictor):
    with serving(predictor) as url:
        yield url


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


OOD_FILES = [sorted((SAMPLE / c).glob("*.jpg"))[2] for c in ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")]


@pytest.fixture(scope="module")
def ood_predictor(tmp_path_factory) -> Predictor:
    """A toy model with an OOD score whose threshold flags 2 of the 5 OOD_FILES."""
    run = with_ood(toy_run(tmp_path_factory.mktemp("ood") / "run", seed=1))
    set_ood_threshold(run, OOD_FILES, 2)
    return Predictor.load(run)


def test_page_marks_ood_cells_and_says_what_the_count_rests_on(browser, ood_predictor):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from bloodcell.infer.report import to_csv

    want = ood_predictor.predict_paths(OOD_FILES, progress=False)
    flagged = [p["ood"] for p in want["predictions"]]
    assert flagged.count(True) == 2

    with serving(ood_predictor) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert "OOD check on" in browser.find_element(By.ID, "model-info").text
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys("\n".join(str(f) for f in OOD_FILES))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".cell-card")) == len(OOD_FILES))

        # each flagged card, and only those, is dimmed and carries the OOD badge with an explaining title
        cards = browser.find_elements(By.CSS_SELECTOR, ".cell-card")
        assert [c.get_attribute("data-ood") for c in cards] == [str(f).lower() for f in flagged]
        for card, is_ood in zip(cards, flagged):
            badges = card.find_elements(By.CSS_SELECTOR, ".ood-badge")
            assert len(badges) == int(is_ood) and ("is-ood" in card.get_attribute("class").split()) == is_ood
            if is_ood:
                assert badges[0].text == "OOD" and "unlike the cells the model was trained on" in badges[0].get_attribute("title")
                thumb_filter = card.find_element(By.CSS_SELECTOR, ".thumb img").value_of_css_property("filter")
                assert "grayscale" in thumb_filter

        # the counts rest on the 3 counted cells, and the page says so
        assert browser.find_element(By.ID, "count-caption").text == "Counts rest on 3 of 5 images; 2 left out as OOD (unlike the training cells)."
        note = browser.find_element(By.ID, "ood-note")
        assert note.is_displayed() and note.text.startswith("2 of 5 images look unlike the cells this model was trained on (OOD)")
        assert not any("(OOD)" in f.text for f in browser.find_elements(By.CSS_SELECTOR, "#flags li"))  # said once, in the note
        for cls, n in want["counts"].items():
            row = browser.find_element(By.CSS_SELECTOR, f"#differential tbody tr[data-cls='{cls}']")
            assert row.find_elements(By.TAG_NAME, "td")[0].text == str(n)
        assert browser.find_element(By.CSS_SELECTOR, "#differential tfoot td").text == "3"
        assert "2 of them look unlike the training cells (OOD)" in browser.find_element(By.ID, "status").text

        # the page's CSV is the CLI's CSV (file names instead of paths, CRLF line ends)
        page_csv = list(csv.reader(io.StringIO(browser.execute_script("return csvText(state.result)"))))
        cli_csv = list(csv.reader(io.StringIO(to_csv(want))))
        assert page_csv[0][4:6] == ["ood", "ood_score"]
        assert [r[1:] for r in page_csv] == [r[1:] for r in cli_csv]
        assert [r[0] for r in page_csv[1:]] == [f.name for f in OOD_FILES]

        severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []

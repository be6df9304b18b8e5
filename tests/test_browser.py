"""End to end in a real browser: uvicorn serves the app, headless Chromium (Selenium) uploads images.

Needs Debian's `chromium` and `chromium-driver` packages (/usr/bin/chromium, /usr/bin/chromedriver);
skipped with the reason when they are missing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import socket
import threading
import time
from pathlib import Path

import pytest

from bloodcell.infer import Predictor
from conftest import CLASS_NAMES, FIXED_COUNTS, field_photo, load_tool, set_ood_threshold, toy_run, with_ood

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "pbc-sample"
NAMES = CLASS_NAMES
headless = load_tool("headless_chromium")
CHROMIUM, CHROMEDRIVER = headless.CHROMIUM, headless.CHROMEDRIVER

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def predictor(tmp_path_factory) -> Predictor:
    return Predictor.load(toy_run(tmp_path_factory.mktemp("run") / "run", seed=1))


@contextlib.contextmanager
def serving(predictor, detector=None, **app_options):
    """uvicorn serving `predictor` (and `detector` for fields) in a thread on a socket bound to port 0, so the kernel
    picks a free port and nothing can take it between choosing and binding; yields the base URL. app_options go to
    create_app (data_dir: the review workstation)."""
    import uvicorn

    from bloodcell.serve.app import create_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(create_app(predictor, detector=detector, **app_options), log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
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
        sock.close()


@pytest.fixture(scope="module")
def server_url(predictor):
    with serving(predictor) as url:
        yield url


def chromium(profile: Path, window: str = "1280,1000"):
    """Headless Chromium driven by Selenium (tools/headless_chromium.py), its profile in `profile`, the browser
    console kept."""
    driver = headless.chromium(profile, window)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium-profile"))
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


OOD_FILES = [
    sorted((SAMPLE / c).glob("*.jpg"))[2] for c in ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
]


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
                assert badges[0].text == "OOD" and "unlike the cells the model was trained on" in badges[
                    0
                ].get_attribute("title")
                thumb_filter = card.find_element(By.CSS_SELECTOR, ".thumb img").value_of_css_property("filter")
                assert "grayscale" in thumb_filter

        # the counts rest on the 3 counted cells, and the page says so
        assert (
            browser.find_element(By.ID, "count-caption").text
            == "Counts rest on 3 of 5 images; 2 left out as OOD (unlike the training cells)."
        )
        note = browser.find_element(By.ID, "ood-note")
        assert note.is_displayed() and note.text.startswith(
            "2 of 5 images look unlike the cells this model was trained on (OOD)"
        )
        assert not any(
            "(OOD)" in f.text for f in browser.find_elements(By.CSS_SELECTOR, "#flags li")
        )  # said once, in the note
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


ORANGE, BLUE, RED = "rgb(240, 140, 0)", "rgb(31, 95, 209)", "rgb(214, 40, 57)"  # style.css: --flagged, --wbc, --rbc


def test_field_photographs_show_their_boxes_labels_and_summed_counts(browser, predictor, fixed_detector, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from bloodcell.infer.fields import predict_mixed
    from bloodcell.infer.report import to_csv

    # two photographs of one name (from two folders) and different sizes: the page must show each its own picture
    photos = [
        field_photo(tmp_path / "a" / "smear.jpg", (640, 480), seed=1),
        field_photo(tmp_path / "b" / "smear.jpg", (800, 600), seed=2),
    ]
    want = predict_mixed(predictor, [(p.name, p.read_bytes()) for p in photos], "field", fixed_detector)
    assert [f["size"] for f in want["fields"]] == [[640, 480], [800, 600]]

    with serving(predictor, fixed_detector) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        assert browser.find_element(By.CSS_SELECTOR, "input[name=input-mode][value=auto]").is_selected()
        browser.find_element(By.CSS_SELECTOR, "input[name=input-mode][value=field]").click()
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys("\n".join(str(p) for p in photos))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".field-card")) == 2)
        assert browser.find_elements(By.CSS_SELECTOR, ".cell-card") == []

        cards = browser.find_elements(By.CSS_SELECTOR, ".field-card")
        for card, f in zip(cards, want["fields"]):
            w, h = f["size"]
            assert card.get_attribute("data-name") == "smear.jpg"
            # the uploaded photograph itself (its own blob, matched by size among the two of one name)
            img = card.find_element(By.CSS_SELECTOR, "img.field-photo")
            assert img.get_attribute("src").startswith("blob:")
            wait.until(lambda d: img.get_attribute("complete") == "true")
            assert (img.get_attribute("naturalWidth"), img.get_attribute("naturalHeight")) == (str(w), str(h))
            # the overlay covers the picture as shown, in the photograph's pixel coordinates
            layer = card.find_element(By.CSS_SELECTOR, "svg.field-overlay")
            assert layer.get_dom_attribute("viewBox") == f"0 0 {w} {h}"
            assert (
                abs(layer.rect["width"] - img.rect["width"]) < 1 and abs(layer.rect["height"] - img.rect["height"]) < 1
            )
            assert img.rect["width"] > 300 and abs(img.rect["width"] / img.rect["height"] - w / h) < 0.02
            # one box per cell found, where the server says, coloured by kind
            rects = layer.find_elements(By.CSS_SELECTOR, "rect.box")
            assert len(rects) == len(f["cells"]) == sum(FIXED_COUNTS.values())
            for rect, c in zip(rects, f["cells"]):
                assert rect.get_dom_attribute("data-kind") == c["kind"]
                x0, y0, x1, y1 = c["box"]
                got = [float(rect.get_dom_attribute(k)) for k in ("x", "y", "width", "height")]
                assert got == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.01)
                if c["kind"] == "rbc":
                    assert rect.value_of_css_property("stroke") == RED
                if c["kind"] == "wbc":
                    flagged = bool(c["review"] or c["ood"])
                    assert rect.value_of_css_property("stroke") == (ORANGE if flagged else BLUE)
            kinds = [r.get_dom_attribute("data-kind") for r in rects]
            assert {k: kinds.count(k) for k in FIXED_COUNTS} == FIXED_COUNTS
            # each white cell labelled with its class and confidence
            wbc = [c for c in f["cells"] if c["kind"] == "wbc"]
            labels = [t.text for t in layer.find_elements(By.CSS_SELECTOR, ".box-label-text")]
            assert labels == [
                f"{c['label']} {100 * c['confidence']:.0f}%"
                + (" OOD" if c["ood"] else " review" if c["review"] else "")
                for c in wbc
            ]
            # its counts and why it was read as a field (the mode chosen on the page was sent)
            for kind, n in f["counts"].items():
                assert card.find_element(By.CSS_SELECTOR, f".field-counts li[data-kind={kind}] strong").text == str(n)
            assert [li.text for li in card.find_elements(By.CSS_SELECTOR, ".field-classes li")] == [
                f"{c} {n}" for c, n in f["wbc_classes"].items() if n
            ]
            assert card.find_element(By.CSS_SELECTOR, ".field-reason").text == "read as a field: --input field"
            assert card.find_elements(By.CSS_SELECTOR, ".field-note") == []

        # the sum over both photographs
        s = want["field_summary"]
        assert s["totals"] == {k: 2 * n for k, n in FIXED_COUNTS.items()}
        assert browser.find_element(By.ID, "field-summary").is_displayed()
        assert not browser.find_element(By.ID, "cell-summary").is_displayed()  # no single-cell image in this upload

        def total(key):
            return [td.text for td in browser.find_elements(By.CSS_SELECTOR, f"#field-totals tr[data-key={key}] td")]

        assert total("photos") == ["2", "—"]
        assert total("rbc") == ["8", "4.0"] and total("platelet") == ["2", "1.0"] and total("wbc") == ["2", "1.0"]
        assert total("wbc_counted") == [str(s["wbc_counted"]), "—"] and total("wbc_ood") == [str(s["wbc_ood"]), "—"]
        assert total("wbc_review") == [str(s["wbc_review"]), "—"]
        for cls, n in s["differential"].items():
            tds = browser.find_elements(By.CSS_SELECTOR, f"#field-differential tbody tr[data-cls='{cls}'] td")
            p = s["differential_percent"].get(cls)
            assert [td.text for td in tds] == [str(n), "—" if p is None else f"{p:.1f}%"]
        assert (
            "2 smear photographs read: 2 white cells, 8 red cells, 2 platelets found"
            in browser.find_element(By.ID, "status").text
        )

        # the page's CSV is the CLI's: one row per white cell found, '<photo>#wbc<k>', with input and box at the end
        page_csv = list(csv.reader(io.StringIO(browser.execute_script("return csvText(state.result)"))))
        assert page_csv == list(csv.reader(io.StringIO(to_csv(want))))
        assert page_csv[0][-2:] == ["input", "box"] and [r[0] for r in page_csv[1:]] == ["smear.jpg#wbc1"] * 2
        browser.save_screenshot(str(tmp_path / "fields.png"))

        # a blank photograph: an answer saying so plainly, no box
        blank = field_photo(tmp_path / "blank.jpg", blank=True)
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(blank))
        shown = (
            "return Array.from(document.querySelectorAll('.field-card'), (c) => c.dataset.name)"  # no stale elements
        )
        wait.until(lambda d: d.execute_script(shown) == ["blank.jpg"])
        card = browser.find_element(By.CSS_SELECTOR, ".field-card")
        assert card.find_element(By.CSS_SELECTOR, ".field-note").text == "no cells found"
        assert card.find_elements(By.CSS_SELECTOR, "rect.box") == []
        assert [td.text for td in browser.find_elements(By.CSS_SELECTOR, "#field-totals tr[data-key=rbc] td")] == [
            "0",
            "0.0",
        ]

        # back to auto: a single-cell crop renders as before (a card, the differential), the fields are gone
        cell = sorted((SAMPLE / "neutrophil").glob("*.jpg"))[0]
        one = predictor.predict_paths([cell], progress=False)["predictions"][0]
        browser.find_element(By.CSS_SELECTOR, "input[name=input-mode][value=auto]").click()
        browser.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(cell))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".cell-card")) == 1)
        assert browser.find_elements(By.CSS_SELECTOR, ".field-card") == []
        card = browser.find_element(By.CSS_SELECTOR, ".cell-card")
        assert (card.get_attribute("data-name"), card.get_attribute("data-label")) == (cell.name, one["label"])
        assert card.find_element(By.CSS_SELECTOR, ".thumb img").get_attribute("naturalWidth") == "224"
        assert browser.find_element(By.ID, "cell-summary").is_displayed()
        assert not browser.find_element(By.ID, "field-summary").is_displayed()
        row = browser.find_element(By.CSS_SELECTOR, f"#differential tbody tr[data-cls='{one['label']}']")
        assert row.find_elements(By.TAG_NAME, "td")[0].text == "1"
        assert browser.find_element(By.ID, "status").text == "1 cell classified."
        page_csv = list(csv.reader(io.StringIO(browser.execute_script("return csvText(state.result)"))))
        assert page_csv[0][-1] == "p_platelet" and [r[0] for r in page_csv[1:]] == [cell.name]  # no input/box columns

        severe = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []

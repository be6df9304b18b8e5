"""The review workstation in a real browser, one whole sample as a technologist works it: upload 20 cells and a
smear photograph, reclassify 5 cells by keyboard, mark one artefact, sign off, print the report, export, restart the
server, and find everything as it was.

uvicorn serves the bundled model (its ONNX export) and a fixed detector; headless Chromium (Selenium) drives the page.
Needs Debian's `chromium` and `chromium-driver`; skipped with the reason when they are missing.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.request
import zipfile
from pathlib import Path

import pytest

from bloodcell.infer import Predictor
from conftest import SAMPLE, FixedDetector, field_photo
from test_browser import CHROMEDRIVER, CHROMIUM, chromium, serving

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM and CHROMEDRIVER),
        reason="needs chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)",
    ),
]
SAMPLE_ID = "H26-00417"


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def twenty_cells() -> list[Path]:
    """20 cells of the embedded sample, a few of each class, in a fixed order."""
    by_class = sorted(p for p in SAMPLE.iterdir() if p.is_dir())
    cells = [f for d in by_class for f in sorted(d.iterdir())[:3]]
    return cells[:20]


@pytest.fixture(scope="module")
def predictor():
    return Predictor.load(None)  # the bundled model


def wait_for(driver, condition, timeout: float = 30, what: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(lambda d: condition(d), message=what)


def thumbs(driver) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, "#gallery .thumb")


def section_of(driver, cell_id: int) -> str:
    return driver.execute_script(
        "return document.querySelector(`.thumb[data-id='${arguments[0]}']`).closest('.class-group').dataset.label",
        cell_id,
    )


def press(driver, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(key).perform()


def test_a_whole_sample_survives_a_restart(predictor, tmp_path):
    from selenium.webdriver.common.by import By

    data_dir = tmp_path / "lab-data"
    photo = field_photo(tmp_path / "smear.jpg", (640, 480), seed=3)
    cells = twenty_cells()
    driver = chromium(tmp_path / "profile", window="1400,1000")
    try:
        with serving(predictor, FixedDetector(), data_dir=data_dir) as url:
            driver.get(url + "/")
            wait_for(
                driver,
                lambda d: (
                    "bloodcell" in d.find_element(By.ID, "model-info").text
                    and "connecting" not in d.find_element(By.ID, "model-info").text
                ),
                what="page did not reach the server",
            )
            driver.find_element(By.ID, "who").send_keys("JS")
            driver.find_element(By.ID, "new-id").send_keys(SAMPLE_ID)
            driver.find_element(By.ID, "new-note").send_keys("routine differential")
            driver.find_element(By.CSS_SELECTOR, "#new-sample button[type=submit]").click()
            wait_for(
                driver, lambda d: SAMPLE_ID in d.find_element(By.ID, "sample-title").text, what="sample not opened"
            )

            # 20 single cells and one photograph in one upload; auto reads the 4:3 photograph as a field
            driver.find_element(By.ID, "upload-input").send_keys("\n".join(str(p) for p in [*cells, photo]))
            wait_for(driver, lambda d: len(thumbs(d)) == 21, 60, "the 21 cells did not reach the gallery")
            before = {c["id"]: c for c in get_json(f"{url}/api/samples/{SAMPLE_ID}/cells")}
            assert sum(c["box"] is not None for c in before.values()) == 1  # the white cell of the photograph

            # reclassify 5 cells by keyboard: select a cell, press the key of a class other than its own
            labels = get_json(f"{url}/api/labels")["labels"]
            changed = {}
            for cell_id in list(before)[:5]:
                driver.find_element(By.CSS_SELECTOR, f".thumb[data-id='{cell_id}']").click()
                target = next(label for label in labels[:8] if label != before[cell_id]["label"])
                press(driver, str(labels.index(target) + 1))
                wait_for(
                    driver, lambda d: section_of(d, cell_id) == target, 10, f"cell {cell_id} did not move to {target}"
                )
                changed[cell_id] = target
            artefact_id = list(before)[10]
            driver.find_element(By.CSS_SELECTOR, f".thumb[data-id='{artefact_id}']").click()
            press(driver, "a")
            wait_for(driver, lambda d: section_of(d, artefact_id) == "artefact", 10, "the artefact did not move")
            changed[artefact_id] = "artefact"
            wait_for(
                driver,
                lambda d: len(get_json(f"{url}/api/samples/{SAMPLE_ID}/corrections")) == 6,
                10,
                "the six corrections were not all saved",
            )
            # z undoes the reviewer's last change (the artefact), and the arrows move the selection along the gallery
            press(driver, "z")
            wait_for(driver, lambda d: section_of(d, artefact_id) == before[artefact_id]["label"], 10, "z did not undo")
            selected = lambda d: int(d.execute_script("return document.querySelector('.thumb.selected').dataset.id"))  # noqa: E731
            assert selected(driver) == artefact_id
            order = driver.execute_script(
                "return [...document.querySelectorAll('#gallery .thumb')].map(f => +f.dataset.id)"
            )
            press(driver, "\ue014")  # ArrowRight
            wait_for(
                driver, lambda d: selected(d) == order[order.index(artefact_id) + 1], 5, "ArrowRight did not move on"
            )
            press(driver, "\ue012")  # ArrowLeft
            wait_for(driver, lambda d: selected(d) == artefact_id, 5, "ArrowLeft did not move back")
            press(driver, "a")
            wait_for(driver, lambda d: section_of(d, artefact_id) == "artefact", 10, "the artefact did not move again")
            wait_for(
                driver,
                lambda d: len(get_json(f"{url}/api/samples/{SAMPLE_ID}/corrections")) == 8,
                10,
                "the undo and the new change were not saved",
            )

            driver.find_element(By.CSS_SELECTOR, f".thumb[data-id='{list(changed)[0]}']").click()
            wait_for(
                driver,
                lambda d: (
                    "→" in d.find_element(By.ID, "cell-history").text
                    and "JS" in d.find_element(By.ID, "cell-history").text
                ),
                10,
                "the cell's history does not show the change",
            )
            # a class of the lab's own, added in the page, is offered on every sample from then on
            driver.find_element(By.CSS_SELECTOR, ".lab-classes summary").click()
            driver.find_element(By.ID, "new-class-name").send_keys("reactive lymphocyte\n")
            wait_for(
                driver,
                lambda d: d.find_elements(By.CSS_SELECTOR, "#label-bar button[data-label='reactive lymphocyte']"),
                10,
                "the lab's class is not offered",
            )
            saved = {c["id"]: c["label"] for c in get_json(f"{url}/api/samples/{SAMPLE_ID}/cells")}
            assert {i: saved[i] for i in changed} == changed
            assert all(saved[i] == before[i]["label"] for i in before if i not in changed)

            # another reviewer (another tab) changes a cell: this page shows it within its poll, without a reload
            other = list(before)[12]
            assert (
                urllib.request.urlopen(
                    urllib.request.Request(
                        f"{url}/api/samples/{SAMPLE_ID}/cells/{other}/label",
                        method="POST",
                        headers={"Content-Type": "application/json"},
                        data=json.dumps({"label": "unidentified", "who": "CD"}).encode(),
                    ),
                    timeout=10,
                ).status
                == 200
            )
            wait_for(
                driver, lambda d: section_of(d, other) == "unidentified", 10, "the other reviewer's change did not show"
            )
            changed[other] = "unidentified"

            # the analyser's count gives absolute counts; sign off locks the sample
            wbc = driver.find_element(By.ID, "wbc-count")
            wbc.send_keys("7.5\n")
            driver.find_element(By.TAG_NAME, "body").click()
            wait_for(
                driver,
                lambda d: get_json(f"{url}/api/samples/{SAMPLE_ID}")["wbc_count"] == 7.5,
                10,
                "WBC count not saved",
            )
            driver.find_element(By.ID, "signoff").click()
            wait_for(driver, lambda d: "signed off" in d.find_element(By.ID, "sample-meta").text, 10, "not signed off")
            signed = get_json(f"{url}/api/samples/{SAMPLE_ID}")
            assert signed["status"] == "signed" and signed["version"] == 1
            # a key press on a signed-off sample changes nothing: it asks for a reason instead
            driver.find_element(By.CSS_SELECTOR, f".thumb[data-id='{list(before)[15]}']").click()
            press(driver, "1")
            wait_for(
                driver,
                lambda d: d.find_element(By.ID, "reason-dialog").get_attribute("open") is not None,
                5,
                "no reason asked",
            )
            driver.find_element(By.ID, "reason-cancel").click()
            count_before = get_json(f"{url}/api/samples/{SAMPLE_ID}/count")

            # the report: the count, the flags, the sign-off, the model; printed to PDF by the browser itself
            report_url = driver.find_element(By.ID, "report").get_attribute("href")
            driver.get(report_url)
            text = driver.find_element(By.TAG_NAME, "body").text
            assert SAMPLE_ID in text and "Signed off by JS" in text and "routine differential" in text
            assert predictor.model_name in text and "not a diagnosis" in text
            assert "Artefacts" in text and "7.5" in text
            pdf = base64.b64decode(driver.print_page())
            assert pdf.startswith(b"%PDF") and len(pdf) > 5000

            # the export: every vouched cell, a folder per label and labels.csv that the training reader takes
            with urllib.request.urlopen(f"{url}/api/samples/{SAMPLE_ID}/export.zip", timeout=30) as resp:
                archive = zipfile.ZipFile(io.BytesIO(resp.read()))
            export = tmp_path / "export"
            archive.extractall(export)
            from bloodcell.data.discover import scan

            inventory = scan(export / SAMPLE_ID / "labels.csv")
            vouched = [c for c in get_json(f"{url}/api/samples/{SAMPLE_ID}/cells") if c["reviewed"] or not c["ood"]]
            assert len(inventory.records) == len(vouched)
            assert {r.group for r in inventory.records} == {SAMPLE_ID}
            assert sorted(r.label for r in inventory.records) == sorted(c["label"] for c in vouched)
            cells_before_restart = get_json(f"{url}/api/samples/{SAMPLE_ID}/cells")

        # a new server on the same folder: everything as it was, in the page too
        with serving(predictor, FixedDetector(), data_dir=data_dir) as url:
            assert get_json(f"{url}/api/samples/{SAMPLE_ID}/cells") == cells_before_restart
            assert get_json(f"{url}/api/samples/{SAMPLE_ID}/count") == count_before
            driver.get(f"{url}/#/sample/{SAMPLE_ID}")
            wait_for(driver, lambda d: len(thumbs(d)) == 21, 30, "the cells are not back after the restart")
            assert "signed off, version 1" in driver.find_element(By.ID, "sample-meta").text
            assert driver.find_elements(By.CSS_SELECTOR, "#label-bar button[data-label='reactive lymphocyte']")
            for cell_id, label in changed.items():
                assert section_of(driver, cell_id) == label
            rows = driver.find_elements(By.CSS_SELECTOR, "#count-table tbody tr")
            assert len(rows) == len([r for r in count_before["rows"] if r["kind"] == "wbc"]) + 1
            severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not severe, severe
    finally:
        driver.quit()


def test_the_gallery_benchmark_runs(tmp_path):
    """benchmarks/review_gallery.py at a small scale: it fills a sample, opens it and times relabels (no figure
    checked)."""
    import subprocess
    import sys

    bench = Path(__file__).resolve().parents[1] / "benchmarks" / "review_gallery.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--cells", "60", "--relabels", "3", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (
        "| gallery open, 60 cells" in out.stdout
        and "| reclassification shown" in out.stdout
        and "machine: " in out.stdout
    )

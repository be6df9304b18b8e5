"""Field checks (infer/field_checks.py): what each check says, real photographs passing, spoiled ones caught, and the
severe ones answered with their sentence instead of counts (FieldReader, the CLI's text, the API's JSON)."""

from __future__ import annotations

import csv
import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bloodcell.infer.field_checks import (
    BAND_LOW,
    DARK_MEDIAN,
    FALLBACK_CELL_SCALE,
    MIN_RED_CELLS,
    check_field,
    check_magnification,
    check_shape,
    detector_scale,
    exposure,
    exposure_problems,
    magnification_band,
)

from conftest import REPO, cli_env, load_benchmark

SHARED = REPO.parent / "shared" / "data"
TXL = SHARED / "txl_pbc"
BCCD = SHARED / "bccd" / "BCCD"
needs_photos = pytest.mark.skipif(
    not (TXL.is_dir() and BCCD.is_dir()), reason=f"TXL-PBC or BCCD photographs not beside the checkout ({SHARED})"
)


def codes(problems) -> list[str]:
    return [p.code for p in problems]


def red_cells(n: int, side: float, size=(640, 480)) -> tuple[np.ndarray, np.ndarray]:
    """n red-cell boxes of `side` photograph pixels in a row (labels 0)."""
    boxes = np.array([[10 + i * side, 10, 10 + (i + 1) * side, 10 + side] for i in range(n)], np.float32)
    return boxes.reshape(-1, 4), np.zeros(n, np.int64)


# ------------------------------------------------------------------------------------------------ each check


def test_exposure_is_measured_before_detection():
    assert codes(exposure_problems(exposure(np.full((480, 640, 3), 190, np.uint8)))) == []
    (dark,) = exposure_problems(exposure(np.full((480, 640, 3), 40, np.uint8)))
    assert dark.code == "dark" and dark.severe and dark.value == 40.0
    assert "median brightness 40 of 255" in dark.message and "more light" in dark.message
    # blown out: most of it white -> counts withheld; a corner of it -> a warning, counts kept
    img = np.full((480, 640, 3), 190, np.uint8)
    img[:432] = 255
    (white,) = exposure_problems(exposure(img))
    assert white.code == "overexposed" and white.severe and "90% of the photograph is blown-out white" in white.message
    img[:] = 190
    img[:96] = 255
    (part,) = exposure_problems(exposure(img))
    assert part.code == "overexposed" and not part.severe and part.value == pytest.approx(0.2)


def test_a_strip_is_a_panorama_and_a_camera_field_is_not():
    assert check_shape(640, 480) == [] and check_shape(1920, 1080) == [] and check_shape(480, 640) == []
    (strip,) = check_shape(2560, 480)
    assert strip.code == "panorama" and strip.severe and "2560x480 px is 5.3 times as long as wide" in strip.message


def test_magnification_is_judged_against_what_the_detector_knows():
    lo, hi = magnification_band(FALLBACK_CELL_SCALE)
    to_photo = 640 / 384  # the detector sees a 640 px wide photograph at 384 px
    assert check_magnification(*red_cells(8, 74 * to_photo), (640, 480), 384, None) == []
    (small,) = check_magnification(*red_cells(8, 0.9 * lo * to_photo), (640, 480), 384, None)
    assert small.code == "magnification" and small.severe and "look too small" in small.message
    assert small.value == pytest.approx(0.9 * lo, abs=0.1) and "higher magnification" in small.message
    (large,) = check_magnification(*red_cells(3, 1.1 * hi * to_photo, (2000, 1500)), (2000, 1500), 2000, None)
    assert "look too large" in large.message and "lower magnification" in large.message
    # too few red cells to tell: no verdict either way, a warning that says so
    (few,) = check_magnification(*red_cells(MIN_RED_CELLS - 1, 10), (640, 480), 384, None)
    assert few.code == "few_red_cells" and not few.severe and "too few to check the magnification" in few.message
    # the detector's own cell_scale (detect.base.cell_scale) wins over the fallback
    own = {"rbc_side_px": {"p05": 10.0, "p50": 20.0, "p95": 30.0}, "long_side": 384}
    assert codes(check_magnification(*red_cells(8, 20 * to_photo), (640, 480), 384, own)) == []
    assert codes(check_magnification(*red_cells(8, 74 * to_photo), (640, 480), 384, own)) == ["magnification"]
    # a detector that reads photographs at their own size (the classical one) is compared in their pixels, and
    # without a cell_scale it has no reference: no verdict
    assert codes(check_magnification(*red_cells(8, 20), (640, 480), None, own)) == []
    assert check_magnification(*red_cells(8, 2), (640, 480), None, None) == []


def test_no_cells_found_says_the_likely_reason():
    empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    dark = check_field(np.full((480, 640, 3), 30, np.uint8), *empty, 384)
    assert codes(dark) == ["dark", "no_cells"]  # severe first; the red cells' absence is no extra problem
    assert dark[1].message.startswith("no cells found: too dark to count: median brightness 30")
    (plain,) = check_field(np.full((480, 640, 3), 200, np.uint8), *empty, 384)
    assert plain.code == "no_cells" and plain.message == "no cells found" and not plain.severe


def test_detector_scale_reads_the_long_side_and_the_cell_scale():
    from bloodcell.detect.base import FieldDetector

    plain = FieldDetector(long_side=384)
    assert detector_scale(plain) == (384, None)
    plain.cell_scale = {"rbc_side_px": {"p05": 1, "p50": 2, "p95": 3}}
    assert detector_scale(plain) == (384, plain.cell_scale)
    assert detector_scale(FieldDetector()) == (None, None)


def test_the_checks_run_without_pytorch():
    code = (
        "import sys; sys.modules['torch'] = None; import bloodcell.infer.field_checks as f; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['torch']"  # only the blocked placeholder: nothing imported it


# ------------------------------------------------------------------------------------------------ real photographs


def rgb(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def txl_photos(lab: str, n: int) -> list[np.ndarray]:
    """The first n TXL-PBC val photographs of one lab (sources.csv)."""
    rows = [r for r in csv.DictReader(open(TXL / "sources.csv")) if r["split"] == "val" and r["source"] == lab]
    return [rgb(TXL / r["image"]) for r in sorted(rows, key=lambda r: r["image"])[:n]]


def bccd_photos(n: int) -> list[np.ndarray]:
    names = (BCCD / "ImageSets" / "Main" / "test.txt").read_text().split()[:n]
    return [rgb(BCCD / "JPEGImages" / f"{name}.jpg") for name in names]


def spoiled(photos: list[np.ndarray], kind: str) -> np.ndarray:
    """The first photograph spoiled as benchmarks/field_checks.py spoils it (the others fill mosaics and strips)."""
    return load_benchmark("field_checks").spoiled(photos[0], photos[1:], kind)


@pytest.fixture(scope="module")
def reader():
    from bloodcell.infer import Predictor
    from bloodcell.infer.fields import FieldReader

    return FieldReader.load(Predictor.load(None))  # the bundled classifier and detector


def problems(reader, image: np.ndarray):
    return reader.check(image, reader.detector.detect([image])[0])


@needs_photos
def test_real_photographs_of_every_lab_pass(reader):
    assert detector_scale(reader.detector)[0] == 384
    for a in bccd_photos(2) + txl_photos("pbc", 1):
        assert codes(problems(reader, a)) == []
    # other labs' photographs: a warning at most (few red cells found, dim), never counts withheld
    for a in txl_photos("raabin", 2) + txl_photos("bcd", 2):
        found = problems(reader, a)
        assert not any(p.severe for p in found) and set(codes(found)) <= {"few_red_cells", "dark"}, [
            p.message for p in found
        ]


@needs_photos
def test_spoiled_photographs_are_caught_with_their_code(reader):
    (photo,) = bccd_photos(1)
    assert codes(problems(reader, spoiled([photo], "dark25")))[0] == "dark"
    bright = problems(reader, spoiled([photo], "bright2"))
    assert bright[0].code == "overexposed" and bright[0].severe
    assert codes(problems(reader, spoiled(bccd_photos(4), "strip")))[0] == "panorama"
    pbc = txl_photos("pbc", 4)
    small = problems(reader, spoiled(pbc, "zoom05"))  # cells half the size
    assert codes(small) == ["magnification"] and small[0].value < BAND_LOW * FALLBACK_CELL_SCALE["rbc_side_px"]["p50"]
    # the same field in more pixels is the same image to the detector: nothing to say
    assert codes(problems(reader, spoiled(pbc, "resize2"))) == codes(problems(reader, pbc[0])) == []


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


@needs_photos
def test_severe_problems_withhold_the_counts_and_say_why(reader):
    from bloodcell.infer.fields import predict_mixed
    from bloodcell.infer.report import tables, to_json

    (photo,) = bccd_photos(1)
    items = [
        ("good.png", png(photo)),
        ("dark.png", png(spoiled([photo], "dark25"))),
        ("strip.png", png(spoiled(bccd_photos(4), "strip"))),
        ("small.png", png(spoiled(txl_photos("pbc", 4), "zoom05"))),
    ]
    result = predict_mixed(reader.predictor, items, "field", reader.detector)
    good, dark, panorama, small = result["fields"]
    assert good["counts"]["rbc"] > 0 and not good["withheld"] and good["note"] == ""
    # the dark photograph's note may open with "no cells found: " (a detector that finds nothing in it) or not
    for f, code, said in (
        (dark, "dark", "too dark to count"),
        (panorama, "panorama", "a stitched panorama"),
        (small, "magnification", "wrong magnification"),
    ):
        assert f["withheld"] and f["counts"] is None and f["wbc_classes"] is None and f["cells"] == []
        assert f["problems"][0]["code"] == code and said in f["note"], f["note"]
    summary = result["field_summary"]
    assert summary["photos"] == 1 and summary["withheld"] == 3 and summary["totals"] == good["counts"]
    assert '"code": "panorama"' in to_json(result)
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200, record=True)
    for item in tables(result, reader.predictor.review_threshold):
        console.print(item)
    text = console.export_text()
    assert "too dark to count" in text and "wrong magnification" in text and "counts withheld for 3 photographs" in text


@needs_photos
def test_the_api_answers_a_dark_photograph_with_the_sentence(reader):
    from fastapi.testclient import TestClient

    from bloodcell.serve.app import create_app

    (photo,) = bccd_photos(1)
    client = TestClient(create_app(reader.predictor, detector=reader.detector))
    dark = ("files", ("dark.png", png(spoiled([photo], "dark25")), "image/png"))
    r = client.post("/predict?input=field", files=[dark])
    assert r.status_code == 200, r.text
    (f,) = r.json()["fields"]
    assert f["counts"] is None and f["withheld"] and "too dark to count" in f["note"]
    assert f["problems"][0]["code"] == "dark" and f["problems"][0]["value"] < DARK_MEDIAN
    assert r.json()["field_summary"]["withheld"] == 1
    # --input auto: read as a field when the detector finds cells in it (its counts withheld), else as one cell whose
    # reason says why; either way the answer says it is too dark
    r = client.post("/predict", files=[dark])
    assert r.status_code == 200, r.text
    said = [f["note"] for f in r.json()["fields"]] + [p["input_reason"] for p in r.json()["predictions"]]
    assert len(said) == 1 and "too dark to count" in said[0], said

"""Fault: requests generated from the server's own OpenAPI schema (schemathesis, in-process ASGI).

Every documented operation is called with schema-valid and schema-violating data; the server must
never answer 5xx and its answers must match what the schema documents: status codes, content types,
response bodies, valid requests accepted and invalid ones refused (all of schemathesis' checks).
Run with -s to see how many cases were generated.
"""

from __future__ import annotations

import io
import tempfile
from collections import Counter

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from PIL import Image
from schemathesis.specs.openapi.checks import positive_data_acceptance

from bloodcell.data.images import MIN_CELL_SIDE
from bloodcell.infer import Predictor
from bloodcell.serve.app import create_app

# Enough cases to cover the request shapes schemathesis knows (missing field, wrong type, empty,
# odd content types, random bytes, real images) while staying well under a minute on two cores.
MAX_EXAMPLES = 40
pytestmark = pytest.mark.slow  # ~25 s on two cores
ANSWERS: Counter[tuple[str, int]] = Counter()  # (operation, status) of every generated case


@st.composite
def encoded_images(draw, fmt: str, modes: list[str]) -> bytes:
    """A small random image encoded as `fmt`."""
    # smaller images are refused as too small to hold a cell (422), which the schema cannot say
    width, height = draw(st.integers(MIN_CELL_SIDE, 64)), draw(st.integers(MIN_CELL_SIDE, 64))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(
        draw(st.sampled_from(modes))
    )
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


# The schema says uploads are `image/*`: schema-valid cases then carry real images (random bytes
# would be refused as unreadable, rightly), so schemathesis also sees, and checks, 200 answers.
schemathesis.openapi.media_type("image/png", encoded_images("PNG", ["RGB", "RGBA", "L", "P", "1"]))
schemathesis.openapi.media_type("image/jpeg", encoded_images("JPEG", ["RGB", "L", "CMYK"]))

# The app exactly as `bloodcell serve` builds it: bundled model, default limits, the review workstation on a fresh data
# folder. Built at import: schemathesis' lazy loader (pytest.from_fixture) fails on pytest 9 (it sets Function._nodeid).
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(Predictor.load(), data_dir=tempfile.mkdtemp(prefix="review-schema-"))
)


@pytest.fixture(scope="module", autouse=True)
def _report_cases():
    yield
    print(
        f"\nschemathesis: {sum(ANSWERS.values())} generated cases; (operation, status): count",
        dict(sorted(ANSWERS.items())),
    )
    # the image strategies above are in use: valid uploads were classified, not only refused
    for operation in {op for op, _ in ANSWERS} & {"POST /predict", "POST /explain"}:
        assert ANSWERS[operation, 200] > 0, f"{operation}: no generated case was accepted"


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_cases_get_no_server_error_and_conform(case):
    # The review API refuses some schema-valid values by the lab's state (a label that is not a class here, a sample
    # signed off or unknown, a stale revision): every other check holds there too; tests/test_review.py tests those
    # refusals.
    review = case.operation.path.startswith("/api/")
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance] if review else None)
    ANSWERS[case.operation.label, response.status_code] += 1

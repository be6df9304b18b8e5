"""Fault: 100 concurrent uploads to the real server (uvicorn subprocess on 127.0.0.1).

The load logic is benchmarks/serve_load.py itself (imported, not copied): the benchmark prints the
latency figures for docs/reliability.md, this test asserts that every answer is right.
"""

from __future__ import annotations

import pytest

from bloodcell.infer import Predictor

from conftest import load_benchmark

serve_load = load_benchmark("serve_load")  # benchmarks/serve_load.py: starts the server, sends the uploads

REQUESTS = 100
CONCURRENCY = 16  # the client's bound: at most this many requests in flight


@pytest.mark.slow
def test_100_concurrent_uploads_all_answered_correctly():
    images = serve_load.sample_images()
    uploads = serve_load.make_uploads(images, REQUESTS, files_per_request=1)
    # what the same bundled model says in this process, image by image
    expected = Predictor.load().predict_images([(name, data) for name, data in images])
    want = {name: p for (name, _), p in zip(images, expected["predictions"])}
    assert expected["unreadable"] == [] and len(want) == len(images) >= REQUESTS

    with serve_load.running_server() as server:
        answers, stats = serve_load.run_load(server.url, uploads, CONCURRENCY)
        assert server.process.poll() is None, "the server died under load"

    failed = [(a.sent, a.problems) for a in answers if not a.ok]
    assert failed == [], f"{len(failed)} of {REQUESTS} uploads failed: {failed[:5]}"
    assert stats["errors"] == 0 and stats["requests"] == REQUESTS
    total = {}
    for answer in answers:
        (name,) = answer.sent
        (got,) = answer.body["predictions"]
        assert got["label"] == want[name]["label"], name
        assert got["probabilities"] == pytest.approx(want[name]["probabilities"], abs=1e-4), name
        assert got["ood"] == want[name]["ood"], name
        assert answer.body["counts"][got["label"]] == (0 if got["ood"] else 1)  # an OOD image is shown, not counted
        total[got["label"]] = total.get(got["label"], 0) + 1
    assert sum(total.values()) == REQUESTS
    print(
        f"\n{REQUESTS} uploads, {CONCURRENCY} in flight: p50 {stats['p50_ms']:.0f} ms, p99 {stats['p99_ms']:.0f} ms, "
        f"{stats['requests_per_s']:.1f} requests/s (figures for the doc: benchmarks/serve_load.py)"
    )

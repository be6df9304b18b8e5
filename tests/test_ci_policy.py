"""Under CI=true a skip fails unless conftest.CI_ALLOWED_SKIPS lists it: a missing tool cannot pass quietly."""

from __future__ import annotations

from conftest import REPO

pytest_plugins = "pytester"

TESTS = """
import pytest

def test_tool_missing():
    pytest.skip("chromedriver not found")

def test_container_limit():
    pytest.skip("mount -t tmpfs is not permitted here: EPERM")

def test_runs():
    assert True
"""


def test_unlisted_skip_fails_on_ci_listed_skip_stays_a_skip(pytester, monkeypatch):
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makepyfile(test_policy=TESTS)
    monkeypatch.setenv("CI", "true")
    on_ci = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    on_ci.assert_outcomes(passed=1, failed=1, skipped=1)
    assert "not in conftest.CI_ALLOWED_SKIPS" in on_ci.stdout.str() and "chromedriver not found" in on_ci.stdout.str()
    monkeypatch.setenv("CI", "")
    local = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    local.assert_outcomes(passed=1, skipped=2)

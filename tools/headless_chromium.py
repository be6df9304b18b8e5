"""Headless Chromium driven by Selenium, its options said once: the browser tests (tests/test_browser.py),
tools/screenshot_page.py and benchmarks/review_gallery.py all start it here.

Needs Debian's `chromium` and `chromium-driver` packages (or chromium-browser) on PATH, and selenium.
"""

from __future__ import annotations

import shutil
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def options(profile: str | Path, window: str = "1280,1000") -> list[str]:
    """Chromium's command-line options: headless, in a container (no sandbox, GPU or /dev/shm), quiet (no background
    networking, component updates, sync or first-run pages), the window `window` ("WIDTH,HEIGHT") and its profile in
    the folder `profile`."""
    return [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--window-size={window}",
        f"--user-data-dir={profile}",
    ]


def chromium(profile: str | Path, window: str = "1280,1000"):
    """A Selenium driver of headless Chromium with `options(profile, window)`, keeping the browser console
    (driver.get_log("browser"))."""
    # selenium here, not at the top: the tests read CHROMIUM and CHROMEDRIVER to skip where there is no browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in options(profile, window):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)

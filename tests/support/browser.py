"""Headless Chromium for the web page's tests, driven by Playwright for Python: Debian's `chromium` on the PATH
(Playwright's own browser download is not reachable here). Where there is no browser (or no Playwright) the tests
skip saying why, except in CI (`$CI` or `$LANTERN_REQUIRE_BROWSER` set), where they are mandatory and fail.
Screenshots of each view go to `test-output/screenshots/` (or `$LANTERN_SCREENSHOTS`)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.common import PROJECT_ROOT

REQUIRED_ENV = "LANTERN_REQUIRE_BROWSER"
# what Chromium needs in a container with no network: no sandbox (root), and none of its own connections
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def screenshots_dir() -> Path:
    folder = Path(os.environ.get("LANTERN_SCREENSHOTS") or PROJECT_ROOT / "test-output" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") or os.environ.get(REQUIRED_ENV):
        pytest.fail(f"the browser tests are mandatory here: {reason}")
    pytest.skip(reason)


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium (Playwright's Browser) for the block."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        _unavailable("no chromium on the PATH (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright for Python is not installed (pip install playwright)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def wait_for(page, expression: str, timeout_s: float = 60) -> None:  # noqa: ANN001
    """Until `expression` is true in the page (polled from here: the page's Content-Security-Policy forbids the
    evaluation Playwright's own wait_for_function runs in it)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {expression}"
        page.wait_for_timeout(100)


@contextmanager
def opened_page(browser, url: str, key: str) -> Iterator[object]:  # noqa: ANN001 - Playwright's Browser and Page
    """The page at `url` in a new browser context, with `key` typed in the scoring key field; fails the test if the
    page's script threw meanwhile."""
    context = browser.new_context(viewport={"width": 1100, "height": 900}, accept_downloads=True)
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.goto(url)
    page.fill("#key", key)
    yield page
    context.close()
    assert not problems, f"the page's script failed: {problems}"

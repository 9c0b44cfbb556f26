"""A headless Chromium for the MLflow UI tests: Debian's ``/usr/bin/chromium`` driven by Playwright.

``make test`` installs the browser (``make browser``: ``apt-get install chromium`` as root when it is missing);
Playwright comes from ``requirements.lock.txt``. Nothing is downloaded at test time (never ``playwright install``):
Playwright launches the Debian binary given by ``executable_path``.

Fixtures:

- ``browser``: one Chromium per module (Playwright gives it a fresh, empty profile directory).
- ``new_page``: a factory of pages, each in a fresh context (its own local storage, as a first-time visitor), 1440x900,
  30 s per wait. When the test fails, every page it opened is saved as ``failure-<n>.png`` in the test's ``tmp_path``
  (kept for failed tests: ``tmp_path_retention_policy = "failed"``), and the paths are printed in the report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("DAD_CHROMIUM", "/usr/bin/chromium")
# The closed network makes Chromium's background services fail (and retry) without these; --headless is Playwright's.
CHROMIUM_ARGS = (
    "--no-sandbox",  # root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIEWPORT = {"width": 1440, "height": 900}
WAIT_MS = 30_000


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item (``item.rep_call``) so fixtures can tell whether the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    """Debian's Chromium, headless, for the whole module; fails (not skips) with what to do when it is missing."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(
            f"Chromium is missing at {CHROMIUM}: the MLflow UI tests need Debian's browser. `make test` installs it "
            "as root (`make browser`: apt-get install -y --no-install-recommends chromium); elsewhere install the "
            "`chromium` package yourself, or point DAD_CHROMIUM at a Chromium binary.",
            pytrace=False,
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `make install` (pip install -r requirements.lock.txt)", pytrace=False)
    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS))
    except Exception as error:  # noqa: BLE001 - re-raised as a test failure with the cause
        playwright.stop()
        pytest.fail(f"Chromium ({CHROMIUM}) did not start under Playwright: {error}", pytrace=False)
    try:
        yield browser
    finally:
        browser.close()
        playwright.stop()


@pytest.fixture
def new_page(request, browser, tmp_path) -> Iterator[Callable[[], object]]:
    """``new_page()`` -> a Playwright page in a fresh context; screenshots of every page land in tmp_path on failure."""
    contexts, pages = [], []

    def make():
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(WAIT_MS)
        contexts.append(context)
        page = context.new_page()
        pages.append(page)
        return page

    yield make
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed and pages:
        saved = []
        for index, page in enumerate(pages):
            path = Path(tmp_path) / f"failure-{index}.png"
            try:
                page.screenshot(path=str(path), full_page=True)
                saved.append(f"{path} ({page.url})")
            except Exception as error:  # noqa: BLE001 - best effort: the test already failed
                saved.append(f"{path}: no screenshot ({error})")
        report.sections.append(("MLflow UI screenshots", "\n".join(saved)))
    for context in contexts:
        context.close()

"""The browser tests' fixtures: one `lorafit ui` server over fake runs per module, one chromium, a fresh page
per test that records every request it makes and fails the test on a JavaScript error.

Playwright is imported inside the fixtures: where it is not installed the test module skips (with its
reason) instead of this file failing the whole suite's collection.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.browser.harness import holding_env, launch_chromium, launch_ui, stop, wait_ready, write_fake_runs

API_KEY = "s3cret-key-for-the-test"
HOLD_AT = 2  # a training the open server launches holds after this step until the test creates Ui.gate


@dataclass
class Ui:
    """A running `lorafit ui`: its url, the files it serves, and the file that releases a held training."""

    url: str
    root: Path
    runs: Path
    store: Path
    reports: Path
    gate: Path


@dataclass
class Recorded:
    """What a page did: every request's url, the JavaScript errors it raised and the requests its
    Content-Security-Policy refused (Chromium reports those on the console, and never sends them)."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def console(self, message: Any) -> None:
        if "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def external(self) -> list[str]:
        """Requests that went anywhere but this machine's loopback server."""
        return [u for u in self.requests if not u.startswith("data:") and urlsplit(u).hostname != "127.0.0.1"]


@pytest.fixture(scope="module")
def ui_files(tmp_path_factory) -> Ui:
    """The fake runs (a run root and a store) the module's servers show; url filled in by `servers`."""
    root = tmp_path_factory.mktemp("ui")
    runs, store = write_fake_runs(root)
    return Ui("", root, runs, store, root / "reports", root / "release-training")


@pytest.fixture(scope="module")
def servers(ui_files) -> Iterator[tuple[Ui, Ui]]:
    """Two servers over the same fake runs, started side by side: an open one (whose launched trainings hold
    after step HOLD_AT until `gate` exists) and one with --api-key."""
    f = ui_files
    common = ("--runs", str(f.runs), "--store", str(f.store), "--reports-dir", str(f.reports))
    open_proc, open_url = launch_ui(*common, cwd=f.root, log_name="ui.log", env=holding_env(HOLD_AT, f.gate))
    keyed_proc, keyed_url = launch_ui(*common, "--api-key", API_KEY, cwd=f.root, log_name="ui-keyed.log")
    try:
        wait_ready(open_proc, open_url, f.root / "ui.log")
        wait_ready(keyed_proc, keyed_url, f.root / "ui-keyed.log")
        yield replace(f, url=open_url), replace(f, url=keyed_url)
    finally:
        stop(open_proc)
        stop(keyed_proc)


@pytest.fixture(scope="module")
def ui(servers) -> Ui:
    return servers[0]


@pytest.fixture(scope="module")
def keyed_ui(servers) -> Ui:
    return servers[1]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


def open_page(browser: Any, recorded: Recorded) -> Any:
    """A page in a fresh context (no cookies) whose requests and errors go to `recorded`."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    context.on("request", lambda r: recorded.requests.append(r.url))
    page.on("pageerror", lambda e: recorded.errors.append(str(e)))
    page.on("console", recorded.console)
    return page


@pytest.fixture
def recorded() -> Recorded:
    return Recorded()


@pytest.fixture
def page(browser, recorded) -> Iterator[Any]:
    """A fresh page; after the test, no JavaScript error, no request the CSP refused and no request
    beyond 127.0.0.1."""
    page = open_page(browser, recorded)
    yield page
    page.context.close()
    assert recorded.requests, "the page made no request at all"
    assert recorded.errors == [], f"JavaScript or CSP errors on the page: {recorded.errors}"
    assert recorded.external() == [], f"requests that left 127.0.0.1: {recorded.external()}"

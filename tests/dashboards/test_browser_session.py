"""An open tab of a deleted account, in a real browser against `millrace dash`:
the page's auto-refresh (a Streamlit fragment rerun, which does not run the
page's script) must end the session, not keep delivering data. No screenshots.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from millrace.dashboards.throttle import MAX_FAILURES_PER_SOURCE
from millrace.dashboards.users import add_user, load_users, save_users
from tests.dashboards.conftest import Plant, write_config
from tests.dashboards.test_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    PAGE_TIMEOUT_MS,
    VIEWPORT,
    _free_port,
    _settle,
    _wait_healthy,
)

pytestmark = [pytest.mark.browser, pytest.mark.security]

# The shortest refresh the config allows, so the test sees several fragment reruns.
REFRESH_S = 2
NAME, PASSWORD = "dora", "dora-operator-pw"
FRESHNESS = '[data-testid="stCaptionContainer"]:has-text("data as of")'


@dataclass(frozen=True)
class Dashboard:
    url: str
    users: Path
    log: Path


@pytest.fixture
def dashboard(plant: Plant, tmp_path: Path) -> Iterator[Dashboard]:
    """`millrace dash` with its own users file (one operator), refreshing every 2 s."""
    users = tmp_path / "users.toml"
    add_user(users, NAME, role="operator", password=PASSWORD)
    add_user(users, "keep", role="viewer", password="keep-viewer-pw")
    config = write_config(tmp_path, dsn=plant.dash_dsn, users=users, refresh_s=REFRESH_S)
    port = _free_port()
    log = tmp_path / "dash.log"
    env = {k: v for k, v in os.environ.items() if k != "MILLRACE_DASH_CONFIG"}
    millrace = Path(sys.executable).with_name("millrace")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(millrace), "dash", "--config", str(config), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(f"{base}/_stcore/health", proc, log)
        yield Dashboard(url=base, users=users, log=log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert b"Traceback" not in log.read_bytes(), log.read_text()[-3000:]


def test_deleted_account_gets_no_data_on_the_next_fragment_rerun(dashboard: Dashboard) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context(viewport=VIEWPORT).new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(f"{dashboard.url}/")  # the overview, the default page
            expect(page.get_by_role("button", name="Sign in")).to_be_visible()
            _settle(page)
            page.get_by_role("textbox", name="User name").fill(NAME)
            page.get_by_role("textbox", name="Password").fill(PASSWORD)
            page.get_by_role("button", name="Sign in").click()
            expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
            freshness = page.locator(FRESHNESS).first
            expect(freshness).to_be_visible()
            # The fragment refreshes on its own: its "data as of" line moves on.
            first = freshness.inner_text()
            expect(freshness).not_to_have_text(first)

            remaining = load_users(dashboard.users)
            del remaining[NAME]
            save_users(dashboard.users, remaining)

            # The next fragment rerun ends the session: only the login is left.
            expect(page.get_by_role("button", name="Sign in")).to_be_visible()
            assert page.locator('[data-testid="stMetric"]').count() == 0
            assert page.locator(FRESHNESS).count() == 0
            assert page.locator('[data-testid="stTopNavLink"]').count() == 0
        finally:
            browser.close()


def _sign_in(browser, url: str, name: str, password: str, *, source: str) -> str:  # type: ignore[no-untyped-def]
    """One sign-in from a fresh tab whose requests carry X-Forwarded-For: `source`."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport=VIEWPORT, extra_http_headers={"X-Forwarded-For": source})
    try:
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.goto(f"{url}/")
        expect(page.get_by_role("button", name="Sign in")).to_be_visible()
        _settle(page)
        page.get_by_role("textbox", name="User name").fill(name)
        page.get_by_role("textbox", name="Password").fill(password)
        page.get_by_role("button", name="Sign in").click()
        outcome = page.locator(
            '[data-testid="stAlertContentError"], [data-testid="stHeading"]:has-text("Overview")'
        ).first
        expect(outcome).to_be_visible()
        return outcome.inner_text()
    finally:
        context.close()


def test_one_source_is_refused_after_its_limit_of_failed_names(dashboard: Dashboard) -> None:
    """The dashboard sits behind a proxy on loopback: the X-Forwarded-For client is the source."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    attacker, other = "203.0.113.5", "198.51.100.9"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for i in range(MAX_FAILURES_PER_SOURCE):
                shown = _sign_in(
                    browser, dashboard.url, f"guess{i}", "wrong-guess", source=attacker
                )
                assert shown == "Wrong user name or password.", (i, shown)
            # The right password of a real account: refused unchecked from that source ...
            shown = _sign_in(browser, dashboard.url, NAME, PASSWORD, source=attacker)
            assert shown.startswith("Too many failed sign-ins"), shown
            # ... while the same account signs in from another address.
            shown = _sign_in(browser, dashboard.url, NAME, PASSWORD, source=other)
            assert shown == "Overview", shown
        finally:
            browser.close()

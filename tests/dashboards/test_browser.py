"""The dashboard in a real browser: `millrace dash` against a filled database,
Debian's headless Chromium driven by Playwright, login, every page, no error
shown, and a screenshot of each page.

Screenshots go to a temporary folder, so `make test` never rewrites the tracked
docs/img/*.png; `make screenshots` runs this test with MILLRACE_SCREENSHOTS_DIR=docs/img
to refresh the pictures the README shows.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dashboards.conftest import PASSWORDS, Plant, write_config

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
SCREENSHOTS_ENV = "MILLRACE_SCREENSHOTS_DIR"
STARTUP_TIMEOUT_SECONDS = 60
PAGE_TIMEOUT_MS = 30_000
VIEWPORT = {"width": 1600, "height": 1000}
# (navigation label, page heading, screenshot name, an element the page must show)
PAGES = [
    ("Overview", "Overview", "overview", '[data-testid="stMetric"]'),
    ("Fleet", "Fleet", "fleet", '[data-testid="stDataFrame"]'),
    ("Device", "Device", "device", '[data-testid="stVegaLiteChart"]'),
    ("Alerts", "Alerts", "alerts", '[data-testid="stDataFrame"]'),
    ("Data quality", "Data quality", "quality", '[data-testid="stVegaLiteChart"]'),
    ("Pipeline", "Pipeline", "pipeline", '[data-testid="stVegaLiteChart"]'),
]
# The lines of every axis label of the Vega charts (SVG; a two-line label has one tspan a line).
AXIS_LABELS_JS = """
() => Array.from(
  document.querySelectorAll('[data-testid="stVegaLiteChart"] .role-axis-label text')
).flatMap(t => {
  const lines = Array.from(t.querySelectorAll('tspan')).map(s => s.textContent);
  return lines.length ? lines : [t.textContent];
})
"""
# Metric cards whose label or value is cut off (an ellipsis or hidden overflow): their text.
CUT_OFF_METRICS_JS = """
() => Array.from(document.querySelectorAll(
  '[data-testid="stMetricLabel"], [data-testid="stMetricValue"]'
)).filter(el => [el, ...el.querySelectorAll('*')].some(
  e => e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1
)).map(el => el.innerText)
"""
# A laptop screen: the narrowest the metric cards must fit without cutting text.
NARROW_VIEWPORT = {"width": 1280, "height": 800}
METRIC_PAGES = ("Overview", "Data quality", "Pipeline")
TIME_LABEL = re.compile(r"^(\d{2}):(\d{2})(:\d{2})?$")
DATE_LABEL = re.compile(r"^\d{1,2} [A-Z][a-z]{2}( \d{4})?$")
ERROR_SELECTORS = '[data-testid="stException"], [data-testid="stAlertContentError"]'


def screenshot_dir(tmp_path: Path) -> Path:
    """Where the page screenshots go: `tmp_path`, unless MILLRACE_SCREENSHOTS_DIR names a folder."""
    chosen = os.environ.get(SCREENSHOTS_ENV, "").strip()
    return Path(chosen).resolve() if chosen else tmp_path / "screenshots"


def _tracked_images() -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in DOCS_IMG.glob("*.png")}


def test_screenshots_go_to_a_temporary_folder_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(SCREENSHOTS_ENV, raising=False)
    assert screenshot_dir(tmp_path) == tmp_path / "screenshots"
    monkeypatch.setenv(SCREENSHOTS_ENV, str(DOCS_IMG))
    assert screenshot_dir(tmp_path) == DOCS_IMG


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"millrace dash exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200 and response.read().strip() == b"ok":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"dashboard not healthy at {url}:\n{log.read_text()[-3000:]}")


@pytest.fixture
def dashboard(plant: Plant, users_file: Path, tmp_path: Path) -> Iterator[str]:
    """`millrace dash` serving the shared plant; yields its base URL."""
    config = write_config(tmp_path, dsn=plant.dash_dsn, users=users_file, refresh_s=15)
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
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert b"Traceback" not in log.read_bytes(), log.read_text()[-3000:]


def _settle(page) -> None:  # type: ignore[no-untyped-def]
    """Wait until Streamlit has finished the run and charts have painted."""
    page.wait_for_selector(
        '[data-testid="stStatusWidget"]', state="hidden", timeout=PAGE_TIMEOUT_MS
    )
    page.wait_for_load_state("networkidle")
    page.wait_for_timeout(1500)


def _time_labels_are_24_hour(page_label: str, drawn: list[str]) -> None:
    """The time axes drawn on a page: 24-hour times, a date, and no AM/PM anywhere."""
    assert not [t for t in drawn if re.search(r"\b(AM|PM)\b", t)], (page_label, drawn)
    times = [m for t in drawn if (m := TIME_LABEL.match(t))]
    assert times, f"{page_label}: no time-of-day axis label drawn: {drawn}"
    assert all(0 <= int(m[1]) <= 23 and 0 <= int(m[2]) <= 59 for m in times), drawn
    assert any(DATE_LABEL.match(t) for t in drawn), f"{page_label}: no date label: {drawn}"


def test_every_page_renders_without_errors(dashboard: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=PAGE_TIMEOUT_MS)
    shots = screenshot_dir(tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    tracked_before = _tracked_images()
    name, (_, password) = "otto", PASSWORDS["otto"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=VIEWPORT, timezone_id="America/New_York")
            page = context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(f"{dashboard}/fleet")
            # Without a session, any URL shows the login and nothing else.
            expect(page.get_by_role("button", name="Sign in")).to_be_visible()
            assert page.locator('[data-testid="stDataFrame"]').count() == 0
            assert page.locator('[data-testid="stTopNavLink"]').count() == 0
            _settle(page)
            page.screenshot(path=str(shots / "login.png"))
            page.get_by_role("textbox", name="User name").fill(name)
            page.get_by_role("textbox", name="Password").fill(password)
            page.get_by_role("button", name="Sign in").click()
            # The page asked for before signing in opens after it.
            expect(page.get_by_role("heading", name="Fleet", exact=True)).to_be_visible()
            for label, heading, shot, must_show in PAGES:
                page.locator('[data-testid="stTopNavLink"]', has_text=label).first.click()
                expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
                page.wait_for_selector(must_show, state="visible")
                _settle(page)
                errors = page.locator(ERROR_SELECTORS)
                assert errors.count() == 0, f"{label}: {errors.all_inner_texts()}"
                # Times are shown in the configured zone, not the browser's.
                expect(
                    page.locator('[data-testid="stMain"]')
                    .get_by_text("Times in Europe/Berlin")
                    .first
                ).to_be_visible()
                page.screenshot(path=str(shots / f"{shot}.png"))
                cut = page.evaluate(CUT_OFF_METRICS_JS)
                assert not cut, f"{label}: metric text cut off at 1600 px: {cut}"
                if must_show.endswith('"stVegaLiteChart"]'):
                    _time_labels_are_24_hour(label, page.evaluate(AXIS_LABELS_JS))
            page.set_viewport_size(NARROW_VIEWPORT)
            cut_narrow: dict[str, list[str]] = {}
            for label in METRIC_PAGES:
                page.locator('[data-testid="stTopNavLink"]', has_text=label).first.click()
                expect(page.get_by_role("heading", name=label, exact=True)).to_be_visible()
                page.wait_for_selector('[data-testid="stMetric"]', state="visible")
                _settle(page)
                if cut := page.evaluate(CUT_OFF_METRICS_JS):
                    cut_narrow[label] = cut
            assert not cut_narrow, f"metric text cut off at 1280 px: {cut_narrow}"
        finally:
            browser.close()
    # docs/img holds other pictures too (benchmarks.png): these are the test's.
    assert {"login", *(shot for _, _, shot, _ in PAGES)} <= {p.stem for p in shots.glob("*.png")}
    if shots != DOCS_IMG:  # only `make screenshots` may touch the tracked pictures
        assert _tracked_images() == tracked_before, "the test rewrote docs/img/*.png"

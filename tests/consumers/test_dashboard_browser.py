"""The dashboard page in a real browser: headless Chromium driven by Playwright.

Chromium is the Debian ``chromium`` package (``make setup`` installs it); Playwright drives it
through its executable path and its own browser download is never used. The store is written
with :meth:`SQLiteStore.write` (the API tests cover filling it through the real consumer):
two sites, three devices, readings of the last hour (the page's default range) with a gap of
ten minutes, a boolean and a string sensor. ``iotpipe dashboard`` runs as a subprocess. The
screenshots are saved in the test's ``tmp_path`` and their paths printed (``pytest -s``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

from consumers.sqlite_store import SQLiteStore
from consumers.store import Confirmation, DeviceStatus, Message, Reading
from tests.conftest import IOTPIPE, free_port, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 10_000
STEP_MS = 10_000  # one message every 10 s
# (site, device) -> {sensor: unit}; "door" is a boolean, "mode" a string, the rest numbers.
FLEET: dict[tuple[str, str], dict[str, str | None]] = {
    ("home", "pi-kitchen"): {"temperature": "Cel", "humidity": "%RH", "door": None, "mode": None},
    ("home", "pi-garage"): {"temperature": "Cel"},
    ("barn", "pi-barn"): {"temperature": "Cel", "door": None},
}


def value(sensor: str, n: int) -> float | bool | str:
    """The n-th reading of a sensor: a slow wave, a door opening every few minutes, a mode."""
    if sensor == "door":
        return n % 20 < 3
    if sensor == "mode":
        return ("eco", "boost", "off")[n // 30 % 3]
    return round((21.0 if sensor == "temperature" else 45.0) + (n % 60) / 10, 2)


def fill(path: Path, now_ms: int) -> None:
    """Readings from 50 to 2 minutes ago, every 10 s, with no message from 30 to 20 minutes ago."""
    store = SQLiteStore(path, durability="process")
    try:
        batch: list[Message] = []
        for (site, device), sensors in FLEET.items():
            start = now_ms - 50 * 60_000
            for n in range(48 * 60_000 // STEP_MS):
                ts = start + n * STEP_MS
                if now_ms - 30 * 60_000 <= ts < now_ms - 20 * 60_000:
                    continue  # the gap: these sequence numbers never arrive
                readings = tuple(Reading(s, ts, value(s, n), unit) for s, unit in sensors.items())
                batch.append(Message(f"{site}-{device}-{n}", site, device, n, "boot-1", readings))
        statuses = [
            DeviceStatus(site, device, "online", now_ms - 50 * 60_000, "iotpipe-edge/test")
            for site, device in FLEET
            if device != "pi-garage"  # one device has sent no status: state unknown
        ]
        store.write(batch, statuses)
        # One device's receipts confirmed (p50 1.2 s, p99 4.5 s); the others have none.
        store.record_confirmations(
            [Confirmation("home", "pi-kitchen", 900, 1200, 4500, 256, now_ms - 60_000)]
        )
    finally:
        store.close()


def listed_devices(rows: Any) -> list[str]:
    """The device names of the fleet view's rows, in page order."""
    names: list[str] = rows.evaluate_all("rows => rows.map(r => r.dataset.device)")
    return names


def stored_devices(path: Path) -> set[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return {(site, device) for site, device in conn.execute("SELECT site, device FROM devices")}


def stored_kinds(path: Path, site: str, device: str, kinds: tuple[str, ...]) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT sensor, kind FROM sensors WHERE site = ? AND device = ?", (site, device)
        )
        return {sensor: kind for sensor, kind in rows if kind in kinds}


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


@contextlib.contextmanager
def dashboard(store: Path, logs: Path, *args: str) -> Iterator[str]:
    """``iotpipe dashboard`` (with ``args``) on a free port; yields its base URL once it answers."""
    port = free_port()
    base = f"http://127.0.0.1:{port}/"
    with logs.open("wb") as log:
        proc = subprocess.Popen(
            [*IOTPIPE, "dashboard", "--store", f"sqlite:///{store}", "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:

            def answers() -> bool:
                assert proc.poll() is None, f"iotpipe dashboard exited: {logs.read_text()}"
                try:
                    with urllib.request.urlopen(base, timeout=1) as response:
                        return response.status == 200
                except (OSError, urllib.error.HTTPError):
                    return False

            wait_for(answers, 20, "iotpipe dashboard to serve its page")
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless system Chromium under Playwright; fails (never skips) when it is missing."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make setup` (it installs the chromium package)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: run `make setup`")
    with sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root, where Chromium's sandbox refuses to start.
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            yield chromium
        finally:
            chromium.close()


def test_page_lists_the_fleet_and_charts_each_sensor(browser: Any, tmp_path: Path) -> None:
    """The fleet view lists the stored devices and a device shows one chart per plotted sensor."""
    from playwright.sync_api import expect

    store = tmp_path / "telemetry.db"
    fill(store, time.time_ns() // 1_000_000)
    with dashboard(store, tmp_path / "dashboard.log") as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda err: problems.append(f"uncaught: {err}"))
        series_requests: list[str] = []
        page.on("request", lambda r: series_requests.append(r.url) if "/series?" in r.url else None)

        page.goto(base + "#/")
        rows = page.locator('[data-testid="device-row"]')
        expect(rows).to_have_count(len(FLEET), timeout=TIMEOUT_MS)
        listed = rows.evaluate_all("rows => rows.map(r => [r.dataset.site, r.dataset.device])")
        assert {tuple(pair) for pair in listed} == stored_devices(store) == set(FLEET)
        expect(page.get_by_test_id("error")).to_be_hidden()
        expect(page.get_by_role("columnheader", name="Stored & confirmed")).to_have_count(
            len({site for site, _ in FLEET})
        )
        confirmed = page.locator('[data-testid="device-row"] [data-testid="confirmed"]')
        shown = dict(zip(listed_devices(rows), confirmed.all_inner_texts(), strict=True))
        assert shown.pop("pi-kitchen") == "1.2 s / 4.5 s"
        assert set(shown.values()) == {"—"}
        fleet_png = tmp_path / "fleet.png"
        page.screenshot(path=fleet_png, full_page=True)

        # A click on the row's link, as a user would; the default range is the last hour.
        page.locator('[data-testid="device-row"][data-device="pi-kitchen"] a').click()
        expect(page).to_have_url(re.compile(r"#/device/home/pi-kitchen$"))
        plotted = stored_kinds(store, "home", "pi-kitchen", ("number", "boolean"))
        assert plotted == {"temperature": "number", "humidity": "number", "door": "boolean"}
        charts = page.get_by_test_id("chart")
        expect(charts).to_have_count(len(plotted), timeout=TIMEOUT_MS)
        for sensor in plotted:
            expect(charts.and_(page.locator(f'[data-sensor="{sensor}"]'))).to_have_attribute(
                "data-points", re.compile(r"^[1-9][0-9]*$"), timeout=TIMEOUT_MS
            )
        drawn = {
            chart["sensor"]: (chart["kind"], int(chart["points"]))
            for chart in charts.evaluate_all("charts => charts.map(c => ({...c.dataset}))")
        }
        assert {s: kind for s, (kind, _) in drawn.items()} == plotted
        expect(page.get_by_test_id("live")).to_have_attribute("data-state", "live")
        # The string sensor is a table of its latest values, not a chart.
        expect(page.locator('section[data-sensor="mode"] tbody tr')).to_have_count(10)

        # The API's answer to the very request the page made, sensor by sensor.
        for sensor, (_kind, points) in drawn.items():
            asked = [
                u for u in series_requests if parse_qs(urlsplit(u).query)["sensor"] == [sensor]
            ]
            assert asked, f"the page never asked for {sensor}"
            query = {k: v[0] for k, v in parse_qs(urlsplit(asked[-1]).query).items()}
            assert query["from"] == "-1h"
            body = get_json(f"{base}api/v1/series?{urlencode(query)}")
            assert points == len(body["points"]), sensor
        temperature = get_json(
            f"{base}api/v1/series?site=home&device=pi-kitchen&sensor=temperature"
        )
        steps = [b["t"] - a["t"] for a, b in itertools.pairwise(temperature["points"])]
        assert max(steps) >= 10 * 60_000, "the ten-minute gap is missing from the series"

        device_png = tmp_path / "device.png"
        page.screenshot(path=device_png, full_page=True)
        print(f"\nscreenshots: {fleet_png} {device_png}")
        assert problems == []
        page.close()


def test_page_shows_a_missing_store_until_it_appears(browser: Any, tmp_path: Path) -> None:
    """A store that does not exist yet shows the error banner, and its devices once it exists."""
    from playwright.sync_api import expect

    store = tmp_path / "not-yet.db"
    with dashboard(store, tmp_path / "dashboard.log") as base:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        uncaught: list[str] = []
        page.on("pageerror", lambda err: uncaught.append(str(err)))
        page.goto(base + "#/")
        banner = page.get_by_test_id("error")
        expect(banner).to_be_visible(timeout=TIMEOUT_MS)
        expect(banner).to_contain_text("Store unavailable")
        expect(banner).to_contain_text("does not exist")
        expect(page.get_by_test_id("device-row")).to_have_count(0)
        missing_png = tmp_path / "missing-store.png"
        page.screenshot(path=missing_png, full_page=True)
        print(f"\nscreenshot: {missing_png}")

        fill(store, time.time_ns() // 1_000_000)  # the consumer creates it: nothing to restart
        page.reload()
        expect(page.get_by_test_id("device-row")).to_have_count(len(FLEET), timeout=TIMEOUT_MS)
        expect(banner).to_be_hidden()
        assert uncaught == []
        page.close()


def add_token(store: Path, name: str) -> str:
    """``iotpipe dashboard token add``: the token it prints."""
    done = subprocess.run(
        [*IOTPIPE, "dashboard", "token", "add", name, "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def watch_console(page: Any) -> list[str]:
    """Console errors (CSP violations are reported there) and uncaught exceptions of a page."""
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda err: problems.append(f"uncaught: {err}"))
    return problems


def test_without_credentials_the_page_is_the_login_form_and_no_data(
    browser: Any, tmp_path: Path
) -> None:
    """With a token file, a visitor without a login sees the login form and never any data."""
    from playwright.sync_api import expect

    store = tmp_path / "telemetry.db"
    fill(store, time.time_ns() // 1_000_000)
    add_token(store, "alice")
    with dashboard(store, tmp_path / "dashboard.log") as base:
        page = browser.new_page()
        answered: list[tuple[str, int]] = []
        page.on("response", lambda r: answered.append((urlsplit(r.url).path, r.status)))
        page.goto(base + "#/")
        expect(page).to_have_url(re.compile(r"/login(#.*)?$"))
        expect(page.get_by_test_id("login")).to_be_visible()
        expect(page.get_by_test_id("device-row")).to_have_count(0)
        for _site, device in FLEET:
            assert device not in page.content()
        page.get_by_label("API token").fill("iotpipe_not-a-token")
        page.get_by_role("button", name="Log in").click()
        expect(page.get_by_role("alert")).to_contain_text("not valid")
        # the page's own scripts and the API are refused too, fetched directly
        for path in ("js/app.js", "api/v1/devices"):
            assert page.request.get(base + path).status == 401
        assert [a for a in answered if a[0].startswith("/api/") and a[1] == 200] == []
        page.close()


def test_after_login_the_dashboard_shows_the_fleet_without_csp_violations(
    browser: Any, tmp_path: Path
) -> None:
    """Logged in with a token, the fleet renders, no console error (CSP) occurs; logout ends it."""
    from playwright.sync_api import expect

    store = tmp_path / "telemetry.db"
    fill(store, time.time_ns() // 1_000_000)
    token = add_token(store, "alice")
    with dashboard(store, tmp_path / "dashboard.log") as base:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        problems = watch_console(page)
        page.goto(base)
        page.get_by_label("API token").fill(token)
        page.get_by_role("button", name="Log in").click()
        rows = page.get_by_test_id("device-row")
        expect(rows).to_have_count(len(FLEET), timeout=TIMEOUT_MS)
        assert set(listed_devices(rows)) == {device for _site, device in FLEET}
        expect(page.get_by_test_id("logout")).to_contain_text("alice")
        cookie = next(c for c in context.cookies() if c["name"] == "iotpipe_session")
        assert cookie["httpOnly"] is True
        assert cookie["sameSite"] == "Strict"
        assert token not in cookie["value"]
        # a device view: charts (uPlot, canvas) and the live stream under the CSP
        page.locator('[data-testid="device-row"][data-device="pi-kitchen"] a').click()
        expect(page.get_by_test_id("chart")).to_have_count(3, timeout=TIMEOUT_MS)
        expect(page.get_by_test_id("live")).to_have_attribute("data-state", "live")
        screenshot = tmp_path / "logged-in.png"
        page.screenshot(path=screenshot, full_page=True)
        print(f"\nscreenshot: {screenshot}")
        assert problems == []

        page.get_by_role("button", name="Log out").click()
        expect(page).to_have_url(re.compile(r"/login(#.*)?$"))
        page.goto(base + "#/")
        expect(page).to_have_url(re.compile(r"/login(#.*)?$"))
        context.close()

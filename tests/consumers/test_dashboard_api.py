"""The dashboard's query API v1 (docs/api.md) over a store the real consumer filled.

The shipped recording (tests/data/fleet-faults-seed7.jsonl: duplicates, reordering, offline
bursts, rejected messages) is routed exactly as the bridge routes it (``bridge.service.route``),
published to the shared RabbitMQ and stored by the real :class:`~consumers.service.Consumer`
into a SQLite store, once per module. Every figure the API answers is then checked against
``consumers.query`` (``store_stats``, ``iter_readings``) or a brute-force computation. Error
cases, the page and the bucket arithmetic use small stores written directly.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st

from bridge.service import route
from consumers.confirmations import WINDOW
from consumers.dashboard.app import STATIC_DIR, create_app
from consumers.dashboard.queries import bucket_width, series_source
from consumers.query import iter_readings, store_stats
from consumers.service import Consumer
from consumers.sqlite_store import SQLiteStore
from consumers.store import Message, Reading
from iotpipe.amqp import TELEMETRY_EXCHANGE
from iotpipe.mqtt import Message as MqttMessage
from iotpipe.recording import read_recording
from iotpipe.settings import AmqpSettings
from tests.conftest import IOTPIPE, free_port, wait_for, wait_port
from tests.consumers.conftest import (
    Outgoing,
    Running,
    SiteQueue,
    publish,
    telemetry,
)
from tests.e2e.conftest import Expectation, relabel
from tests.rabbitmq import blocking_channel

RECORDING = Path(__file__).parents[1] / "data" / "fleet-faults-seed7.jsonl"
HOUR = 3_600_000
STRINGS = ["eco", "boost", "off", "eco", "away"] * 6  # one string reading per second
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class Fleet:
    """The recording stored by the real consumer, and a client of the API over it."""

    path: Path
    sites: tuple[str, str]
    expected: Expectation
    client: TestClient
    first_ms: int
    last_ms: int
    stored_ms: tuple[int, int]  # wall-clock span of the consumer's run (receipts confirmed within)

    def get(self, url: str, **params: Any) -> Any:
        response = self.client.get(url, params=params)
        assert response.status_code == 200, response.text
        return response.json()


def bridged(messages: list[Any]) -> list[Outgoing]:
    """What the bridge publishes to iotpipe.telemetry for the recorded MQTT messages."""
    out = []
    for message in messages:
        routed = route(MqttMessage(message.topic, message.payload), time.time())
        if routed.exchange == TELEMETRY_EXCHANGE:
            out.append(Outgoing(routed.routing_key, routed.body, routed.properties))
    return out


def count(path: Path, table: str) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


@pytest.fixture(scope="module")
def fleet(rabbitmq_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Replay the recording (plus a string sensor) through the real consumer, once."""
    token = uuid.uuid4().hex[:10]
    sites = (f"d{token}a", f"d{token}b")
    recorded = relabel(read_recording(RECORDING)[1], {"site-01": sites[0], "site-02": sites[1]})
    expected = Expectation.of(recorded)
    first_ms = min(key[3] for key in expected.readings)
    last_ms = max(key[3] for key in expected.readings)
    outgoing = bridged(recorded)
    outgoing += [
        telemetry(sites[0], "dev-text", n, sensors=("mode",), value=v, ts_ms=first_ms + n * 1000)
        for n, v in enumerate(STRINGS)
    ]
    path = tmp_path_factory.mktemp("dashboard") / "telemetry.db"
    queue = SiteQueue(rabbitmq_url, f"test.{token}.store", sites[0], f"test.{token}.dead")
    settings = queue.settings(
        f"sqlite:///{path}", bindings=tuple(f"iotpipe.v1.{site}.#" for site in sites)
    )
    consumer = Consumer.from_settings(AmqpSettings(url=rabbitmq_url), settings, SQLiteStore(path))
    thread = threading.Thread(target=consumer.run, name="test-consumer", daemon=True)
    started_ms = time.time_ns() // 1_000_000
    thread.start()
    running = Running(consumer, thread)
    try:
        assert wait_for(consumer.ready.is_set, 30, "the consumer to connect")
        publish(rabbitmq_url, outgoing)
        wanted = len(expected.readings) + len(STRINGS)
        wait_for(lambda: count(path, "readings") == wanted and queue.ready() == 0, 60, "storing")
        running.stop()  # finishes and commits the batch in flight (statuses included)
        stored_ms = (started_ms, time.time_ns() // 1_000_000)
        client = TestClient(create_app(path))
        yield Fleet(path, sites, expected, client, first_ms, last_ms, stored_ms)
    finally:
        if thread.is_alive():
            running.stop()
        with blocking_channel(rabbitmq_url) as channel:
            channel.queue_delete(queue.name)


def ms(rfc3339: str) -> int:
    return (datetime.fromisoformat(rfc3339) - EPOCH) // timedelta(milliseconds=1)


def brute_force(path: Path, site: str, device: str, sensor: str, lo: int, hi: int, width: int):  # type: ignore[no-untyped-def]
    """Buckets of ``width`` computed in Python from every stored reading in [lo, hi)."""
    buckets: dict[int, list[float]] = defaultdict(list)
    for row in iter_readings(path, site=site, device=device, sensor=sensor):
        ts = ms(row.ts)
        if lo <= ts < hi and not isinstance(row.value, str):
            buckets[ts - ts % width].append(float(row.value))
    return {t: (len(v), min(v), sum(v) / len(v), max(v)) for t, v in sorted(buckets.items())}


# -- sites and devices ----------------------------------------------------------------------------


@pytest.mark.rabbitmq
def test_sites_agree_with_store_stats(fleet: Fleet) -> None:
    """/sites counts each site's devices, online ones and the latest reading as store_stats does."""
    stats = store_stats(fleet.path)
    body = fleet.get("/api/v1/sites")
    assert [s["site"] for s in body["sites"]] == sorted(fleet.sites)
    for site in body["sites"]:
        mine = [d for d in stats.devices if d.site == site["site"]]
        assert site["devices"] == len(mine) == (4 if site["site"] == fleet.sites[0] else 3)
        assert site["online"] == sum(d.state == "online" for d in mine)
        assert site["last_seen_ms"] == max(d.last_seen_ms or 0 for d in mine)


@pytest.mark.rabbitmq
def test_devices_agree_with_store_stats(fleet: Fleet) -> None:
    """Every completeness figure of /devices equals store_stats'; ?site= filters."""
    stats = {(d.site, d.device): d for d in store_stats(fleet.path).devices}
    body = fleet.get("/api/v1/devices")
    assert len(body["devices"]) == len(stats) == 7
    for row in body["devices"]:
        d = stats[row["site"], row["device"]]
        confirmed = row.pop("confirmed_latency_ms")
        assert fleet.stored_ms[0] <= row.pop("last_confirmed_ms") <= fleet.stored_ms[1]
        assert confirmed["envelopes"] == min(WINDOW, d.messages + d.duplicates)
        # Recorded readings, stored now: each latency spans from the recording to this run.
        assert fleet.stored_ms[0] - fleet.last_ms <= confirmed["p50"] <= confirmed["p99"]
        assert confirmed["p99"] <= fleet.stored_ms[1] - fleet.first_ms
        assert fleet.stored_ms[0] - fleet.last_ms <= confirmed["last"]
        assert row == {
            "site": d.site,
            "device": d.device,
            "state": d.state,
            "state_ms": d.state_ts_ms,
            "agent": d.agent,
            "last_seen_ms": d.last_seen_ms,
            "messages": d.messages,
            "gaps": d.gaps,
            "duplicates": d.duplicates,
            "out_of_order": d.out_of_order,
            "completeness": d.completeness,
            "sensors": 1 if d.device == "dev-text" else 7,
        }
    # The recording's faults show up: duplicates absorbed, messages out of order.
    assert sum(row["duplicates"] for row in body["devices"]) > 0
    assert sum(row["out_of_order"] for row in body["devices"]) > 0
    one_site = fleet.get("/api/v1/devices", site=fleet.sites[1])["devices"]
    assert {row["site"] for row in one_site} == {fleet.sites[1]}
    assert len(one_site) == 3


@pytest.mark.rabbitmq
def test_device_lists_its_sensors_with_kinds(fleet: Fleet) -> None:
    """/devices/{site}/{device} adds sensor_list: kind pinned, unit, last reading time."""
    site = fleet.sites[0]
    body = fleet.get(f"/api/v1/devices/{site}/dev-0001")
    listed = fleet.get("/api/v1/devices", site=site)["devices"]
    assert {k: v for k, v in body.items() if k != "sensor_list"} in listed
    sensors = {s["sensor"]: s for s in body["sensor_list"]}
    assert sorted(sensors) == sorted(
        ["battery", "door", "humidity", "motion", "power", "pressure", "temperature"]
    )
    assert sensors["door"]["kind"] == "boolean"
    assert sensors["temperature"]["kind"] == "number"
    latest = max(key[3] for key in fleet.expected.readings if key[:3] == (site, "dev-0001", "door"))
    assert sensors["door"]["last_ts_ms"] == latest
    assert all(s["type_changes"] == 0 for s in sensors.values())
    text = fleet.get(f"/api/v1/devices/{site}/dev-text")["sensor_list"]
    assert [(s["sensor"], s["kind"]) for s in text] == [("mode", "string")]


# -- series ---------------------------------------------------------------------------------------


@pytest.mark.rabbitmq
@pytest.mark.parametrize(
    ("sensor", "span_ms", "points", "source"),
    [
        ("temperature", None, 10, "readings"),  # the recording's ~4 min: 26 s buckets
        ("temperature", None, 5000, "readings"),  # 1 s buckets: gaps between messages
        ("power", HOUR, 10, "rollup_1m"),  # 6 min
        ("humidity", 6 * HOUR, 50, "rollup_1m"),  # 8 min
        ("pressure", 30 * 24 * HOUR, 500, "rollup_1h"),  # 30 days: 2 h
        ("door", 2 * 24 * HOUR, 10, "rollup_1h"),  # booleans as 0/1: 5 h
        ("motion", None, 100, "readings"),
    ],
)
def test_series_equals_brute_force_buckets(
    fleet: Fleet, sensor: str, span_ms: int | None, points: int, source: str
) -> None:
    """min/mean/max/n per epoch-aligned bucket equal a brute force over iter_readings."""
    site, device = fleet.sites[1], "dev-0005"
    if span_ms is None:
        lo, hi = fleet.first_ms, fleet.last_ms
    else:  # the data sits in the middle of the range
        lo, hi = fleet.first_ms - span_ms // 2, fleet.first_ms + span_ms // 2
    body = fleet.get(
        "/api/v1/series",
        site=site,
        device=device,
        sensor=sensor,
        points=points,
        **{"from": lo, "to": hi},
    )
    width = body["bucket_ms"]
    assert width == bucket_width(lo, hi, points)
    assert width >= (hi - lo) / points
    assert (body["from_ms"], body["to_ms"]) == (lo, hi)
    with contextlib.closing(sqlite3.connect(fleet.path)) as conn:
        assert series_source(conn, width) == source
    expected = brute_force(
        fleet.path, site, device, sensor, lo - lo % width, hi - hi % width + width, width
    )
    got = {p["t"]: (p["n"], p["min"], p["mean"], p["max"]) for p in body["points"]}
    assert got, "the range holds data"
    assert list(got) == sorted(got), "oldest first"
    assert got.keys() == expected.keys()
    for t, (n, low, mean, high) in expected.items():
        assert got[t][0] == n
        assert got[t][1:] == pytest.approx((low, mean, high), rel=1e-12)
    assert len(got) <= points
    assert all(t % width == 0 for t in got)
    if sensor == "door":
        assert all(0 <= p["mean"] <= 1 and p["min"] in (0, 1) for p in body["points"])
    if width == 1000:  # a message every few seconds: most 1 s buckets are gaps
        assert len(got) < (hi - lo) // width / 2


@pytest.mark.rabbitmq
def test_strings_give_the_latest_readings(fleet: Fleet) -> None:
    """A string sensor returns its latest `points` readings in the range, oldest first."""
    site = fleet.sites[0]
    body = fleet.get(
        "/api/v1/series",
        site=site,
        device="dev-text",
        sensor="mode",
        points=10,
        **{"from": fleet.first_ms, "to": fleet.first_ms + 25_000},
    )
    assert body["kind"] == "string"
    assert body["points"] == [
        {"t": fleet.first_ms + n * 1000, "value": STRINGS[n]} for n in range(16, 26)
    ]


@pytest.mark.rabbitmq
def test_unknown_query_parameters_are_ignored(fleet: Fleet) -> None:
    """A parameter the server does not know changes nothing."""
    site = fleet.sites[0]
    params = {
        "site": site,
        "device": "dev-0001",
        "sensor": "temperature",
        "from": fleet.first_ms,
        "to": fleet.last_ms,
    }
    plain = fleet.get("/api/v1/series", **params)
    assert fleet.get("/api/v1/series", **params, colour="blue", v="2") == plain
    assert fleet.get("/api/v1/sites", x="1") == fleet.get("/api/v1/sites")


@pytest.mark.rabbitmq
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"site": None}, "missing query parameter 'site'"),
        ({"points": 9}, "bad query parameter 'points'"),
        ({"points": 5001}, "bad query parameter 'points'"),
        ({"points": "many"}, "bad query parameter 'points'"),
        ({"from": "yesterday"}, "from='yesterday'"),
        ({"from": "-1h", "to": "-2h"}, "is after to"),
    ],
)
def test_bad_parameters_are_400(fleet: Fleet, changes: dict[str, Any], message: str) -> None:
    """A missing or malformed parameter answers 400 with one readable line."""
    query = {"site": fleet.sites[0], "device": "dev-0001", "sensor": "temperature"} | changes
    response = fleet.client.get(
        "/api/v1/series", params={k: v for k, v in query.items() if v is not None}
    )
    assert response.status_code == 400, response.text
    assert list(response.json()) == ["error"]
    assert message in response.json()["error"]


@pytest.mark.rabbitmq
@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/api/v1/devices?site=nowhere", "unknown site 'nowhere'"),
        ("/api/v1/devices/{a}/nobody", "unknown device"),
        ("/api/v1/series?site={a}&device=nobody&sensor=x", "unknown device"),
        ("/api/v1/series?site={a}&device=dev-0001&sensor=nothing", "unknown sensor 'nothing'"),
    ],
)
def test_unknown_names_are_404(fleet: Fleet, url: str, message: str) -> None:
    """Unknown site, device or sensor: 404 with {"error": ...}."""
    response = fleet.client.get(url.format(a=fleet.sites[0]))
    assert response.status_code == 404
    assert message in response.json()["error"]


@pytest.mark.rabbitmq
def test_series_defaults_to_the_last_hour(fleet: Fleet) -> None:
    """Without from/to: the hour up to now (the recording's readings are older: no points)."""
    before = time.time_ns() // 1_000_000
    body = fleet.get("/api/v1/series", site=fleet.sites[0], device="dev-0001", sensor="power")
    assert body["to_ms"] - body["from_ms"] == HOUR
    assert before <= body["to_ms"] <= time.time_ns() // 1_000_000
    assert body["points"] == []
    assert body["bucket_ms"] == 8000  # 3600 s / 500, rounded up to whole seconds


# -- the store's availability, the page, the OpenAPI description ----------------------------------


def test_missing_store_is_503_until_it_appears(tmp_path: Path) -> None:
    """Every endpoint answers 503 with a clear reason while the file is missing, then 200."""
    path = tmp_path / "later.db"
    client = TestClient(create_app(path, store_label="sqlite:///later.db"))
    for url in (
        "/api/v1/sites",
        "/api/v1/devices",
        "/api/v1/devices/a/b",
        "/api/v1/series?site=a&device=b&sensor=c",
        "/api/v1/live",
    ):
        response = client.get(url)
        assert response.status_code == 503, url
        assert "does not exist (yet)" in response.json()["error"]
    health = client.get("/api/v1/health")
    assert health.status_code == 503
    assert health.json()["healthy"] is False
    assert health.json()["store"] == "sqlite:///later.db"
    SQLiteStore(path).close()
    assert client.get("/api/v1/sites").json() == {"sites": []}
    assert client.get("/api/v1/health").json() == {
        "healthy": True,
        "store": "sqlite:///later.db",
        "readings": None,
    }


def test_foreign_file_is_503(tmp_path: Path) -> None:
    """A file that is not an iotpipe store answers 503 naming the problem."""
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE x (y)")
    response = TestClient(create_app(path)).get("/api/v1/devices")
    assert response.status_code == 503
    assert "not an iotpipe store" in response.json()["error"]


def test_openapi_lists_every_endpoint(tmp_path: Path) -> None:
    """/api/v1/openapi.json is FastAPI's description, listing the six endpoints."""
    body = TestClient(create_app(tmp_path / "x.db")).get("/api/v1/openapi.json").json()
    assert set(body["paths"]) == {
        "/api/v1/sites",
        "/api/v1/devices",
        "/api/v1/devices/{site}/{device}",
        "/api/v1/series",
        "/api/v1/live",
        "/api/v1/health",
    }
    params = {p["name"] for p in body["paths"]["/api/v1/series"]["get"]["parameters"]}
    assert params == {"site", "device", "sensor", "from", "to", "points"}


def test_page_is_served_at_root(tmp_path: Path) -> None:
    """GET / answers the shipped index.html; a page without one still serves the API."""
    page = STATIC_DIR / "index.html"
    response = TestClient(create_app(tmp_path / "x.db")).get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.content == page.read_bytes()
    elsewhere = tmp_path / "static"
    elsewhere.mkdir()
    (elsewhere / "index.html").write_text("<h1>hi</h1>")
    client = TestClient(create_app(tmp_path / "x.db", static_dir=elsewhere))
    assert client.get("/").text == "<h1>hi</h1>"
    assert client.get("/api/v1/health").status_code == 503


# -- bucket arithmetic ----------------------------------------------------------------------------


@given(
    from_ms=st.integers(0, 2_000_000_000_000),
    span=st.integers(0, 400 * 24 * HOUR),
    points=st.integers(10, 5000),
)
def test_bucket_width_is_whole_units_and_fits_points(from_ms: int, span: int, points: int) -> None:
    """The width covers the range in at most `points` aligned buckets, in whole s, min or h."""
    to_ms = from_ms + span
    width = bucket_width(from_ms, to_ms, points)
    assert width >= span / points
    assert to_ms // width - from_ms // width + 1 <= points
    if width < 60_000:
        assert width % 1000 == 0
    elif width < HOUR:
        assert width % 60_000 == 0
    else:
        assert width % HOUR == 0
    # Not much wider than needed: an unaligned range needs (points - 1) buckets of span/(points - 1)
    # at worst; rounding up to the unit and widening in steps of it add less than two units.
    unit = 1000 if width <= 60_000 else 60_000 if width <= HOUR else HOUR
    assert width <= span / (points - 1) + 2 * unit


# -- live -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[int]:
    """Run ``app`` with uvicorn on a free port in a thread; yield the port."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="test-dashboard", daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10, "uvicorn to start")
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


class EventStream:
    """A server-sent event stream read with http.client."""

    def __init__(self, port: int, path: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        self.conn.request("GET", path)
        self.response = self.conn.getresponse()

    def next(self) -> tuple[str | None, str]:
        """The next event (name, data) or comment (None, text)."""
        lines: list[str] = []
        while True:
            line = self.response.readline().decode().rstrip("\n")
            if line == "" and lines:
                break
            if line:
                lines.append(line)
        if lines[0].startswith(":"):
            return None, lines[0][1:].strip()
        fields = dict(line.split(": ", 1) for line in lines)
        return fields.get("event"), fields["data"]

    def close(self) -> None:
        self.conn.close()


@pytest.mark.rabbitmq
def test_live_delivers_readings_stored_after_connecting(
    tmp_path: Path, site_queue: SiteQueue, start_consumer: Any, rabbitmq_url: str
) -> None:
    """Readings the consumer stores after the stream opened arrive as events, late data too."""
    path = tmp_path / "telemetry.db"
    store = SQLiteStore(path)
    site = site_queue.site
    start_consumer(rabbitmq_url, site_queue.settings(f"sqlite:///{path}"), store)
    publish(rabbitmq_url, [telemetry(site, "pi-2", 0)])  # before connecting: not sent
    wait_for(lambda: count(path, "readings") == 2, 30, "the first message")
    app = create_app(path, poll_interval=0.05)
    with serving(app) as port:
        stream = EventStream(port, f"/api/v1/live?site={site}&device=pi-2&colour=x")
        try:
            assert stream.response.status == 200
            assert stream.response.headers["content-type"].startswith("text/event-stream")
            assert stream.next() == (None, "connected")
            day_old = time.time_ns() // 1_000_000 - 24 * HOUR
            publish(
                rabbitmq_url,
                [
                    telemetry(site, "pi-1", 1, value=1.5),  # another device: filtered out
                    telemetry(site, "pi-2", 2, value=True, sensors=("door",)),
                    telemetry(site, "pi-2", 3, value="late", sensors=("mode",), ts_ms=day_old),
                ],
            )
            events = []
            while len(events) < 2:
                name, data = stream.next()
                if name is not None:
                    events.append((name, json.loads(data)))
        finally:
            stream.close()
    assert events == [
        (
            "reading",
            {
                "site": site,
                "device": "pi-2",
                "sensor": "door",
                "t": 1_795_000_002_000,
                "value": True,
            },
        ),
        (
            "reading",
            {"site": site, "device": "pi-2", "sensor": "mode", "t": day_old, "value": "late"},
        ),
    ]


def test_live_sends_keepalive_comments(tmp_path: Path) -> None:
    """A quiet stream sends a comment line every `keepalive` seconds."""
    path = tmp_path / "t.db"
    SQLiteStore(path).close()
    with serving(create_app(path, poll_interval=0.05, keepalive=0.2)) as port:
        stream = EventStream(port, "/api/v1/live")
        try:
            assert stream.next() == (None, "connected")
            assert stream.next() == (None, "keep-alive")
        finally:
            stream.close()


def test_live_on_a_version_1_store_is_503(tmp_path: Path) -> None:
    """A store not yet migrated has no feed: /live says so (503), the rest still answers."""
    path = tmp_path / "v1.db"
    store = SQLiteStore(path)
    store.write(
        [Message("m", "home", "pi", 0, "b", (Reading("t", 1_795_000_000_000, 1.0, None),))], []
    )
    store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP TRIGGER readings_feed")
        conn.execute("DROP TABLE readings_feed")
        conn.commit()
    client = TestClient(create_app(path))
    response = client.get("/api/v1/live")
    assert response.status_code == 503
    assert "no live feed" in response.json()["error"]
    assert client.get("/api/v1/devices").status_code == 200


# -- the command ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ("influxdb://influx:8086", "the dashboard reads SQLite stores; for InfluxDB use Grafana"),
        ("{tmp}/notes.db", "not an iotpipe store"),
    ],
)
def test_command_refuses_what_it_cannot_read(tmp_path: Path, store: str, message: str) -> None:
    """An InfluxDB store or a foreign file: one line on stderr, exit 2."""
    (tmp_path / "notes.db").write_text("not a database\n" * 100)
    done = subprocess.run(
        [*IOTPIPE, "dashboard", "--store", store.format(tmp=tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_command_waits_for_the_store_and_stops_on_sigterm(tmp_path: Path) -> None:
    """A missing store: it starts (503 until the file appears); SIGTERM ends it, streams open."""
    port = free_port()
    store = tmp_path / "state" / "telemetry.db"
    proc = subprocess.Popen(
        [*IOTPIPE, "dashboard", "--store", f"sqlite:///{store}", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_port(port, 30)
        url = f"http://127.0.0.1:{port}/api/v1/health"
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url, timeout=5)
        assert missing.value.code == 503
        SQLiteStore(store).close()
        with urllib.request.urlopen(url, timeout=5) as response:
            assert json.load(response)["healthy"] is True
        stream = EventStream(port, "/api/v1/live")
        assert stream.next() == (None, "connected")
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - began < 5
        stream.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read() if proc.stderr else ""
    assert "does not exist yet" in stderr
    assert f"http://127.0.0.1:{port}/" in stderr
    assert "Traceback" not in stderr

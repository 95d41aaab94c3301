"""InfluxStore: its line protocol, and writes to a private VictoriaMetrics and to a fake server.

VictoriaMetrics keeps every sample it is sent (no ``-dedup.minScrapeInterval``), so its export
shows exactly how often a point was written: once after any number of redeliveries, twice when
a crash fell between writing the points and recording their ids.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from influxdb_client.client.write.point import Point
from influxdb_client.domain.write_precision import WritePrecision

from consumers.influx_store import BATCH_LINES, InfluxStore, message_lines
from consumers.seen import RedisSeen
from consumers.state import StateDB
from consumers.store import DeviceStatus, Message, Reading, StoreUnavailable, Value
from tests.conftest import free_port
from tests.victoria import Victoria, closed_port_url, redis_keys

# A recent, whole-second time: VictoriaMetrics silently drops samples > 2 days in the future.
T0_MS = (int(time.time()) - 3600) * 1000


def message(
    site: str,
    seq: int,
    *,
    device: str = "d1",
    values: Sequence[tuple[str, Value]] = (("temperature", 21.5), ("humidity", 40)),
    tags: dict[str, str] | None = None,
    unit: str | None = "Cel",
) -> Message:
    """A message of ``site``/``device`` with one reading per (sensor, value), 1 s per seq."""
    return Message(
        id=f"{site}-{device}-{seq}",
        site=site,
        device=device,
        seq=seq,
        boot="b1",
        readings=tuple(Reading(s, T0_MS + seq * 1000, v, unit) for s, v in values),
        tags=tags or {},
    )


def open_store(url: str, path: Path, **kwargs: Any) -> InfluxStore:
    """An InfluxStore on ``url`` with its state file at ``path``."""
    state = StateDB(path, durability="process")
    return InfluxStore(url, org="o", bucket="b", token="t", state=state, **kwargs)


def of_site(site: str) -> str:
    """The selector of every series a test wrote for its site."""
    return f'{{__name__=~"telemetry_.*",site="{site}"}}'


# -- line protocol ------------------------------------------------------------------------------


def test_line_of_a_reading_is_exactly_the_documented_schema() -> None:
    """A reading becomes one line: sorted tags, a float `value`, nanoseconds (docs/influxdb.md)."""
    m = Message(
        id="m-1",
        site="plant-1",
        device="pump-7",
        seq=3,
        boot="b",
        readings=(
            Reading("temperature", 1_795_000_000_125, 21, "Cel"),
            Reading("door.open", 1_795_000_000_125, True),
            Reading("mode", 1_795_000_000_125, 'say "hi" \\o/'),
        ),
        tags={"room": "boiler room", "site": "north", "a,b": "x=y"},
    )
    assert message_lines(m) == [
        r"telemetry,a\,b=x\=y,device=pump-7,room=boiler\ room,sensor=temperature,site=plant-1,"
        r"tag_site=north,unit=Cel value=21 1795000000125000000",
        r"telemetry,a\,b=x\=y,device=pump-7,room=boiler\ room,sensor=door.open,site=plant-1,"
        r"tag_site=north value_bool=true 1795000000125000000",
        r"telemetry,a\,b=x\=y,device=pump-7,room=boiler\ room,sensor=mode,site=plant-1,"
        r'tag_site=north value_str="say \"hi\" \\o/" 1795000000125000000',
    ]


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (5, "value=5"),
        (5.0, "value=5"),
        (-0.25, "value=-0.25"),
        (2**63 - 1, "value=9.223372036854776e+18"),
        (1e-7, "value=1e-07"),
        (False, "value_bool=false"),
        ("", 'value_str=""'),
        ("two\nlines", r'value_str="two\nlines"'),
    ],
)
def test_field_by_value_type(value: Value, field: str) -> None:
    """Numbers are always floats (no `i`), booleans booleans, strings escaped on one line."""
    (line,) = message_lines(message("s", 0, values=[("x", value)], unit=None))
    assert line.split(" ")[1] == field


def test_colliding_and_reserved_user_tags_are_prefixed() -> None:
    """User tags named like ours (or `time`, `_x`) get `tag_`, repeated until unique."""
    tags = {"sensor": "a", "tag_sensor": "b", "unit": "c", "time": "d", "_field": "e", "ok": ""}
    (line,) = message_lines(message("s", 0, values=[("x", 1)], tags=tags))
    assert line.split(" ")[0] == (
        "telemetry,device=d1,sensor=x,site=s,tag__field=e,tag_sensor=b,tag_tag_sensor=a,"
        "tag_time=d,tag_unit=c,unit=Cel"
    )  # `ok` is dropped: line protocol has no empty tag values


def test_measurement_is_escaped() -> None:
    """A configured measurement with spaces or commas is escaped."""
    (line,) = message_lines(message("s", 0, values=[("x", 1)], unit=None), "my data,v2")
    assert line.startswith(r"my\ data\,v2,device=d1,")


def test_identical_input_gives_identical_lines() -> None:
    """Building the lines of equal messages twice gives the same bytes."""
    a = message("s", 7, tags={"z": "1", "a": "2"})
    b = message("s", 7, tags={"a": "2", "z": "1"})
    assert message_lines(a) == message_lines(b) == message_lines(a)


_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\n\r"), max_size=12)


@given(
    site=_text.filter(bool),
    sensor=_text.filter(bool),
    unit=st.none() | _text,
    tags=st.dictionaries(_text, _text, max_size=4),
    value=st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    ts_ms=st.integers(0, 253_402_300_799_999),
)
def test_lines_match_influxdb_client_point(
    site: str, sensor: str, unit: str | None, tags: dict[str, str], value: Value, ts_ms: int
) -> None:
    """Prebuilt lines are byte-identical to influxdb-client's Point for the same tags and field."""
    m = Message("id", site, "dev", 0, "", (Reading(sensor, ts_ms, value, unit),), tags)
    point = Point("telemetry").time(ts_ms * 1_000_000, WritePrecision.NS)
    renamed = {
        (
            f"tag_{k}"
            if k in ("site", "device", "sensor", "unit", "time") or k.startswith("_")
            else k
        ): v
        for k, v in tags.items()
    }
    if len(renamed) != len(tags) or any(k.startswith("tag_tag_") for k in renamed):
        return  # double renames are covered by test_colliding_and_reserved_user_tags_are_prefixed
    for key, tag in (renamed | {"site": site, "device": "dev", "sensor": sensor}).items():
        point.tag(key, tag)
    if unit:
        point.tag("unit", unit)
    if isinstance(value, bool):
        point.field("value_bool", value)
    elif isinstance(value, str):
        point.field("value_str", value)
    else:
        point.field("value", float(value))
    assert message_lines(m) == [point.to_line_protocol()]


# -- against VictoriaMetrics --------------------------------------------------------------------


@pytest.mark.tsdb
def test_batch_written_twice_is_stored_once(
    victoria: Victoria, tmp_path: Path, unique: str
) -> None:
    """Writing a batch again stores nothing: every sample exists exactly once."""
    site = f"s{unique}"
    batch = [message(site, n, device=f"d{n % 3}") for n in range(30)]
    store = open_store(victoria.url, tmp_path / "state.db")
    try:
        first = store.write(batch, [])
        again = store.write(batch, [])
    finally:
        store.close()
    assert (first.messages, first.readings, first.duplicates) == (30, 60, 0)
    assert (again.messages, again.readings, again.duplicates) == (0, 0, 30)
    counts = victoria.sample_counts(of_site(site))
    assert len(counts) == 60
    assert set(counts.values()) == {1}


@pytest.mark.tsdb
def test_victoria_names_series_measurement_underscore_field(
    victoria: Victoria, tmp_path: Path, unique: str
) -> None:
    """VictoriaMetrics stores `telemetry_value`, `telemetry_value_bool` as 1/0, strings as 0."""
    site = f"s{unique}"
    values: list[tuple[str, Value]] = [("t", 21.5), ("n", 7), ("door", True), ("mode", "auto")]
    store = open_store(victoria.url, tmp_path / "state.db")
    try:
        store.write([message(site, 0, values=values, tags={"room": "k 1"}, unit=None)], [])
    finally:
        store.close()
    found = {
        (s.name, s.labels["sensor"]): (s.values, s.timestamps, s.labels)
        for s in victoria.export(of_site(site))
    }
    ts = [T0_MS]  # nanoseconds in, milliseconds stored
    assert found[("telemetry_value", "t")][:2] == ([21.5], ts)
    assert found[("telemetry_value", "n")][:2] == ([7.0], ts)
    assert found[("telemetry_value_bool", "door")][:2] == ([1.0], ts)
    # The string itself is lost: VictoriaMetrics only stores numbers.
    assert found[("telemetry_value_str", "mode")][:2] == ([0.0], ts)
    assert found[("telemetry_value", "t")][2] == {
        "__name__": "telemetry_value",
        "site": site,
        "device": "d1",
        "sensor": "t",
        "room": "k 1",
    }


@pytest.mark.tsdb
def test_crash_before_recording_rewrites_identical_points(
    victoria: Victoria, tmp_path: Path, unique: str
) -> None:
    """A crash after the write but before recording ids makes the retry rewrite identical points.

    InfluxDB would overwrite each point with itself. VictoriaMetrics keeps both: each series
    then holds a second sample with the same timestamp and the same value (measured here).
    """
    site = f"s{unique}"
    batch = [message(site, n) for n in range(5)]
    store = open_store(victoria.url, tmp_path / "state.db")
    real_record = store.state.record

    def crash(*args: Any, **kwargs: Any) -> list[int]:
        raise KeyboardInterrupt("simulated crash after the points were written")

    store.state.record = crash  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        store.write(batch, [])
    store.state.record = real_record  # type: ignore[method-assign]
    result = store.write(batch, [])  # the redelivery
    store.close()
    assert (result.messages, result.duplicates) == (5, 0)
    counts = victoria.sample_counts(of_site(site))
    assert len(counts) == 10  # 5 messages x 2 readings
    assert set(counts.values()) == {2}
    for s in victoria.export(of_site(site)):
        samples = list(zip(s.timestamps, s.values, strict=True))
        assert samples[0::2] == samples[1::2]  # each pair: same timestamp, same value


@pytest.mark.tsdb
def test_server_down_is_store_unavailable_and_records_nothing(
    victoria: Victoria, tmp_path: Path, unique: str
) -> None:
    """With the server down, write raises StoreUnavailable and records no id; a retry stores all."""
    site = f"s{unique}"
    batch = [message(site, n) for n in range(4)]
    status = DeviceStatus(site, "d1", "online", T0_MS, "t/1")
    down = open_store(closed_port_url(), tmp_path / "state.db", timeout_s=2)
    try:
        with pytest.raises(StoreUnavailable, match=r"InfluxDB at http://127\.0\.0\.1"):
            down.write(batch, [status])
        with pytest.raises(StoreUnavailable, match="does not answer"):
            down.check()
    finally:
        down.close()
    up = open_store(victoria.url, tmp_path / "state.db")
    try:
        up.check()
        result = up.write(batch, [])
    finally:
        up.close()
    assert (result.messages, result.duplicates) == (4, 0)
    assert set(victoria.sample_counts(of_site(site)).values()) == {1}


@pytest.mark.tsdb
def test_number_then_string_is_no_conflict(victoria: Victoria, tmp_path: Path, unique: str) -> None:
    """A sensor switching from numbers to strings is stored (separate fields) and counted."""
    site = f"s{unique}"
    batch = [
        message(site, 0, values=[("level", 3)]),
        message(site, 1, values=[("level", 3.5)]),
        message(site, 2, values=[("level", "high")]),
    ]
    store = open_store(victoria.url, tmp_path / "state.db")
    try:
        result = store.write(batch, [])
    finally:
        store.close()
    assert (result.messages, result.type_changes, result.rejected) == (3, 1, {})
    names = sorted((s.name, len(s.values)) for s in victoria.export(of_site(site)))
    assert names == [("telemetry_value", 2), ("telemetry_value_str", 1)]


@pytest.mark.tsdb
@pytest.mark.redis
def test_hosts_sharing_redis_write_each_message_once(
    victoria: Victoria, redis_url: str, tmp_path: Path, unique: str
) -> None:
    """Two consumer hosts (own state files) sharing Redis: a redelivery to the other is a duplicate."""
    site = f"s{unique}"
    prefix = f"iotpipe-test:{unique}:seen:"
    batch = [message(site, n) for n in range(10)]
    with redis_keys(redis_url, prefix):
        hosts = [
            open_store(
                victoria.url,
                tmp_path / f"host{n}.db",
                seen=RedisSeen(redis_url, prefix=prefix, retention_ms=3_600_000),
            )
            for n in range(2)
        ]
        try:
            a = hosts[0].write(batch[:6], [])
            b = hosts[1].write(batch, [])  # 0-5 redelivered to the other host
            hosts[1].check()
        finally:
            for host in hosts:
                host.close()
    assert (a.messages, a.duplicates) == (6, 0)
    assert (b.messages, b.duplicates) == (4, 6)
    counts = victoria.sample_counts(of_site(site))
    assert len(counts) == 20
    assert set(counts.values()) == {1}


@pytest.mark.tsdb
def test_large_batches_are_split_into_requests(
    victoria: Victoria, tmp_path: Path, unique: str
) -> None:
    """More lines than BATCH_LINES go out in several requests, all of them stored."""
    site = f"s{unique}"
    values: list[tuple[str, Value]] = [(f"c{n}", n) for n in range(1000)]
    batch = [message(site, n, values=values, unit=None) for n in range(12)]
    store = open_store(victoria.url, tmp_path / "state.db")
    try:
        result = store.write(batch, [])
    finally:
        store.close()
    assert result.readings == 12_000 > BATCH_LINES
    counts = victoria.sample_counts(of_site(site))
    assert len(counts) == 12_000
    assert set(counts.values()) == {1}


# -- against a fake InfluxDB: the responses VictoriaMetrics never gives ------------------------


@dataclass
class FakeInflux:
    """An HTTP server answering /api/v2/write with ``respond(body) -> (status, json, headers)``."""

    respond: Callable[[bytes], tuple[int, dict[str, str] | None, dict[str, str]]]
    port: int = field(default_factory=free_port)
    bodies: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def fake_influx() -> Iterator[Callable[..., FakeInflux]]:
    """Start fake InfluxDB servers; each is shut down at teardown."""
    servers: list[ThreadingHTTPServer] = []

    def start(
        respond: Callable[[bytes], tuple[int, dict[str, str] | None, dict[str, str]]],
    ) -> FakeInflux:
        fake = FakeInflux(respond)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fake.bodies.append(body)
                status, payload, headers = fake.respond(body)
                data = json.dumps(payload).encode() if payload else b""
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                if data:
                    self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", fake.port), Handler)
        servers.append(server)
        threading.Thread(
            target=server.serve_forever, args=(0.02,), name="fake-influx", daemon=True
        ).start()
        return fake

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


_CONFLICT = (
    'failure writing points to database: partial write: field type conflict: input field "value" '
    'on measurement "telemetry" is type float, already exists as type string dropped=1'
)


def test_invalid_messages_are_rejected_and_the_rest_stored(
    fake_influx: Callable[..., FakeInflux], tmp_path: Path
) -> None:
    """A 422 for a batch finds the refused messages one by one; the others are stored."""

    def respond(body: bytes) -> tuple[int, dict[str, str] | None, dict[str, str]]:
        if b"sensor=bad" in body:
            return 422, {"code": "unprocessable entity", "message": _CONFLICT}, {}
        return 204, None, {}

    fake = fake_influx(respond)
    batch = [message("s", n, values=[("bad" if n in (1, 3) else "ok", n)]) for n in range(5)]
    store = open_store(fake.url, tmp_path / "state.db")
    try:
        result = store.write(batch, [])
        again = store.write(batch, [])
    finally:
        store.close()
    assert result.rejected == {1: _CONFLICT, 3: _CONFLICT}
    assert (result.messages, result.duplicates) == (3, 0)
    # Rejected ids are not recorded: the consumer retries them up to the delivery limit.
    assert again.rejected == {1: _CONFLICT, 3: _CONFLICT}
    assert (again.messages, again.duplicates) == (0, 3)
    # batch, then each of 5; on the retry the batch of the 2 refused ones, then each.
    assert len(fake.bodies) == 1 + 5 + 1 + 2


@pytest.mark.parametrize(
    ("status", "headers", "match"),
    [
        (401, {}, r"refused the token \(HTTP 401\).*IOTPIPE_INFLUXDB__TOKEN"),
        (403, {}, r"refused the token \(HTTP 403\)"),
        (404, {}, r"bucket 'b' not found"),
        (429, {"Retry-After": "7"}, r"rate limiting writes \(HTTP 429, retry after 7 s\)"),
        (500, {}, r"failed \(HTTP 500\): boom"),
        (503, {}, r"failed \(HTTP 503\)"),
    ],
)
def test_server_errors_are_store_unavailable_and_record_nothing(
    fake_influx: Callable[..., FakeInflux],
    tmp_path: Path,
    status: int,
    headers: dict[str, str],
    match: str,
) -> None:
    """Auth, rate-limit and server errors raise StoreUnavailable; no id is recorded."""
    fake = fake_influx(lambda body: (status, {"code": "x", "message": "boom"}, headers))
    batch = [message("s", n) for n in range(3)]
    store = open_store(fake.url, tmp_path / "state.db")
    try:
        with pytest.raises(StoreUnavailable, match=match):
            store.write(batch, [])
        with store.state.transaction() as conn:
            assert store.state.unseen(conn, batch) == ([0, 1, 2], [])
    finally:
        store.close()


def test_slow_server_is_store_unavailable(
    fake_influx: Callable[..., FakeInflux], tmp_path: Path
) -> None:
    """A write that outlasts timeout_s raises StoreUnavailable (and is retried later)."""
    release = threading.Event()

    def respond(body: bytes) -> tuple[int, dict[str, str] | None, dict[str, str]]:
        release.wait(5)
        return 204, None, {}

    fake = fake_influx(respond)
    store = open_store(fake.url, tmp_path / "state.db", timeout_s=0.2)
    try:
        with pytest.raises(StoreUnavailable, match="timed out"):
            store.write([message("s", 0)], [])
    finally:
        release.set()
        store.close()

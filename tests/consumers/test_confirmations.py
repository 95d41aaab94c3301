"""The time from a reading to its envelope stored and confirmed: tracking, metric, store, migration.

The consumer runs on :class:`~iotpipe.testing.MemorySource` with fake clocks; the store is a
real SQLite file (behind ``test_consumer_units.FlakyStore``, which can fail on demand).
"""

from __future__ import annotations

import contextlib
import random
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from fastapi.testclient import TestClient

from consumers.confirmations import WINDOW, ConfirmLatency
from consumers.dashboard.app import create_app
from consumers.service import Consumer
from consumers.settings import ConsumeSettings
from consumers.sqlite_store import SQLiteStore
from consumers.store import Confirmation
from iotpipe.receipts import nearest_rank
from iotpipe.testing import MemorySource
from tests.bridge.test_bridge import envelope
from tests.consumers.test_consumer_units import KEY, FakeClock, FlakyStore

READ_AT_MS = 1_795_000_000_000  # the envelopes' reading time


class FakeWallClock:
    """Unix seconds that move only when the test says so."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


def rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def make(
    tmp_path: Path, wall: FakeWallClock, clock: FakeClock | None = None, **overrides: object
) -> tuple[Consumer, MemorySource, FlakyStore]:
    """A consumer with fake clocks on an in-memory source (connected) and a SQLite store."""
    settings = ConsumeSettings(
        store=f"sqlite:///{tmp_path / 'telemetry.db'}",
        http_port=0,
        batch_latency=0.01,
        **overrides,  # type: ignore[arg-type]
    )
    source = MemorySource()
    store = FlakyStore(tmp_path / "telemetry.db", source)
    consumer = Consumer(
        settings,
        store,
        source,
        rng=random.Random(1),
        clock=clock or FakeClock(),
        wall_clock=wall,
    )
    source.connect()
    return consumer, source, store


def add(source: MemorySource, seq: int, read_ms: int, device: str = "d1") -> None:
    """One envelope of ``device`` read at ``read_ms``."""
    source.add(
        KEY.replace("d1", device),
        envelope("s1", device, seq, ts=rfc3339(read_ms)),
        message_id=f"s1-{device}-{seq}",
    )


def stored_confirmations(path: Path) -> dict[str, tuple[int, ...]]:
    """Device -> (last, p50, p99, envelopes, confirmed_ms) as the store holds them."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return {
            device: tuple(rest)
            for device, *rest in conn.execute(
                "SELECT device, last_ms, p50_ms, p99_ms, envelopes, confirmed_ms"
                " FROM confirmations ORDER BY device"
            )
        }


# -- the pure tracker -----------------------------------------------------------------------------


def test_nearest_rank_picks_the_ranked_element() -> None:
    """p50 of 1..100 is 50, p99 is 99, p100 is 100; one element is every quantile."""
    ordered = list(range(1, 101))
    assert [nearest_rank(ordered, q) for q in (0.5, 0.99, 1.0)] == [50, 99, 100]
    assert nearest_rank([7], 0.01) == nearest_rank([7], 0.99) == 7


def test_a_confirm_ends_every_envelope_noted_since_the_last_one() -> None:
    """Latencies are now minus each reading time; a clock ahead counts 0; the window is bounded."""
    latency = ConfirmLatency()
    latency.stored("s", "d", 1000)
    latency.stored("s", "d", 1500)
    latency.stored("s", "d", 2600)  # the device's clock runs ahead of ours
    assert latency.confirmed("s", "d", 2500) == [1.5, 1.0, 0.0]
    assert latency.confirmed("s", "d", 3000) == []  # nothing new noted
    assert latency.take() == [Confirmation("s", "d", 0, 1000, 1500, 3, 2500)]
    assert latency.take() == []  # nothing changed since
    for n in range(WINDOW + 10):
        latency.stored("s", "d", 10_000 - n)
    latency.confirmed("s", "d", 10_000)
    (summary,) = latency.take()
    assert summary.envelopes == WINDOW  # latencies 10..265: the oldest 10 left the window
    assert (summary.last_ms, summary.p50_ms, summary.p99_ms) == (WINDOW + 9, 137, 263)


def test_summaries_the_store_refused_come_back() -> None:
    """retry() hands summaries back to the next take()."""
    latency = ConfirmLatency()
    latency.stored("s", "d", 0)
    latency.confirmed("s", "d", 40)
    refused = latency.take()
    latency.retry(refused)
    assert latency.take() == refused


# -- in the consumer --------------------------------------------------------------------------------


def test_the_consumer_measures_reading_to_confirmed_receipt(tmp_path: Path) -> None:
    """The histogram observes each envelope; the store keeps the device's last, p50 and p99."""
    wall = FakeWallClock(READ_AT_MS + 2000)
    consumer, source, store = make(tmp_path, wall)
    add(source, 1, READ_AT_MS)
    add(source, 2, READ_AT_MS + 1000)
    add(source, 3, READ_AT_MS + 1500)
    consumer.process(source.next_batch(10, 0))
    registry = consumer.metrics.registry
    name = "iotpipe_consumer_confirm_latency_seconds"
    assert registry.get_sample_value(f"{name}_count") == 3
    assert registry.get_sample_value(f"{name}_sum") == 2.0 + 1.0 + 0.5
    assert registry.get_sample_value(f"{name}_bucket", {"le": "1.0"}) == 2
    assert stored_confirmations(store.inner.path) == {"d1": (500, 1000, 2000, 3, READ_AT_MS + 2000)}


def test_the_newest_reading_of_an_envelope_counts(tmp_path: Path) -> None:
    """An envelope with several reading times is measured from its newest one."""
    wall = FakeWallClock(READ_AT_MS + 5000)
    consumer, source, store = make(tmp_path, wall)
    readings = [
        {"sensor": "a", "value": 1, "ts": rfc3339(READ_AT_MS)},
        {"sensor": "b", "value": 2, "ts": rfc3339(READ_AT_MS + 4000)},
    ]
    source.add(KEY, envelope("s1", "d1", 1, readings=readings), message_id="s1-d1-1")
    consumer.process(source.next_batch(10, 0))
    assert stored_confirmations(store.inner.path)["d1"][:3] == (1000, 1000, 1000)


def test_no_latency_until_rabbitmq_confirms_the_receipt(tmp_path: Path) -> None:
    """An unconfirmed receipt measures nothing; its retry measures up to its own confirm."""
    clock = FakeClock()
    wall = FakeWallClock(READ_AT_MS + 1000)
    consumer, source, store = make(tmp_path, wall, clock)
    source.publishes_confirmed = False
    add(source, 1, READ_AT_MS)
    consumer.process(source.next_batch(10, 0))
    name = "iotpipe_consumer_confirm_latency_seconds_count"
    assert consumer.metrics.registry.get_sample_value(name) == 0
    assert store.confirmation_calls == []
    source.publishes_confirmed = True
    clock.now += 1.0
    wall.ms += 3000
    consumer.send_receipts()
    assert consumer.metrics.registry.get_sample_value(name) == 1
    assert stored_confirmations(store.inner.path)["d1"][:3] == (4000, 4000, 4000)


def test_summaries_are_written_at_most_once_a_second(tmp_path: Path) -> None:
    """Batches within a second share one write of the summaries; stop writes the rest."""
    clock = FakeClock()
    wall = FakeWallClock(READ_AT_MS + 100)
    consumer, source, store = make(tmp_path, wall, clock, receipt_interval=0.1)
    add(source, 1, READ_AT_MS, device="d1")
    consumer.process(source.next_batch(10, 0))
    clock.now += 0.5
    add(source, 2, READ_AT_MS, device="d2")
    consumer.process(source.next_batch(10, 0))
    assert [[c.device for c in call] for call in store.confirmation_calls] == [["d1"]]
    clock.now += 0.5
    add(source, 3, READ_AT_MS, device="d1")
    consumer.process(source.next_batch(10, 0))
    assert [[c.device for c in call] for call in store.confirmation_calls] == [["d1"], ["d1", "d2"]]
    clock.now += 0.1
    add(source, 4, READ_AT_MS, device="d3")
    consumer.process(source.next_batch(10, 0))
    consumer.send_receipts(flush=True)
    assert [c.device for c in store.confirmation_calls[-1]] == ["d3"]
    assert set(stored_confirmations(store.inner.path)) == {"d1", "d2", "d3"}


def test_a_failed_summary_write_is_retried_and_costs_no_batch(tmp_path: Path) -> None:
    """The store refusing the summaries keeps them for the next write; batches go on."""
    clock = FakeClock()
    wall = FakeWallClock(READ_AT_MS + 100)
    consumer, source, store = make(tmp_path, wall, clock)
    add(source, 1, READ_AT_MS)
    store.confirmation_failures = 1
    consumer.process(source.next_batch(10, 0))
    assert source.acked == [1]
    assert len(store.confirmation_calls) == 1
    assert stored_confirmations(store.inner.path) == {}
    clock.now += 1.0
    consumer.send_receipts()
    assert stored_confirmations(store.inner.path)["d1"][:3] == (100, 100, 100)


def test_receipts_off_measures_and_stores_nothing(tmp_path: Path) -> None:
    """Without receipts nothing is confirmed: no latency, no summary."""
    wall = FakeWallClock(READ_AT_MS + 100)
    consumer, source, store = make(tmp_path, wall, receipts=False)
    add(source, 1, READ_AT_MS)
    consumer.process(source.next_batch(10, 0))
    consumer.send_receipts(flush=True)
    name = "iotpipe_consumer_confirm_latency_seconds_count"
    assert consumer.metrics.registry.get_sample_value(name) == 0
    assert store.confirmation_calls == []


# -- the store and the API --------------------------------------------------------------------------


def test_a_store_without_the_table_gains_it_on_open_and_keeps_its_data(tmp_path: Path) -> None:
    """A version 2 file from before confirmations: the API answers null, then the table appears."""
    path = tmp_path / "telemetry.db"
    wall = FakeWallClock(READ_AT_MS + 100)
    consumer, source, store = make(tmp_path, wall, receipts=False)
    add(source, 1, READ_AT_MS)
    consumer.process(source.next_batch(10, 0))
    store.inner.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP TABLE confirmations")  # as an older version left the file
        conn.commit()
    client = TestClient(create_app(path))
    (row,) = client.get("/api/v1/devices").json()["devices"]
    assert row["messages"] == 1
    assert (row["confirmed_latency_ms"], row["last_confirmed_ms"]) == (None, None)
    store = SQLiteStore(path, durability="process")
    store.record_confirmations([Confirmation("s1", "d1", 7, 5, 9, 2, READ_AT_MS + 100)])
    store.close()
    row = client.get("/api/v1/devices/s1/d1").json()
    assert row["messages"] == 1
    assert row["confirmed_latency_ms"] == {"p50": 5, "p99": 9, "last": 7, "envelopes": 2}
    assert row["last_confirmed_ms"] == READ_AT_MS + 100


def test_the_api_shows_what_the_consumer_measured(tmp_path: Path) -> None:
    """/devices answers per device the summary the consumer wrote; a device without one is null."""
    wall = FakeWallClock(READ_AT_MS + 3000)
    consumer, source, _store = make(tmp_path, wall)
    for seq in range(1, 5):
        add(source, seq, READ_AT_MS + seq * 500)
    consumer.process(source.next_batch(10, 0))
    source.publishes_confirmed = False
    add(source, 1, READ_AT_MS, device="d2")
    consumer.process(source.next_batch(10, 0))
    body = TestClient(create_app(tmp_path / "telemetry.db")).get("/api/v1/devices").json()
    rows = {row["device"]: row for row in body["devices"]}
    assert rows["d1"]["confirmed_latency_ms"] == {
        "p50": 1500,
        "p99": 2500,
        "last": 1000,
        "envelopes": 4,
    }
    assert rows["d1"]["last_confirmed_ms"] == READ_AT_MS + 3000
    assert (rows["d2"]["confirmed_latency_ms"], rows["d2"]["last_confirmed_ms"]) == (None, None)

"""Hostile AMQP input to the consumer, in process: whatever body and properties a delivery
carries (a publisher other than the bridge, or one that skipped its validation), the consumer's
handler settles it within a time and memory bound, and dead-letters every rejection with a
contract reason, while the valid neighbours of the same batch are stored.
"""

from __future__ import annotations

import random
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.service import Consumer
from consumers.settings import ConsumeSettings
from consumers.sqlite_store import SQLiteStore
from iotpipe.envelope import Reason
from iotpipe.testing import MemorySource
from tests.bridge.test_bridge import envelope
from tests.strategies import LOOKALIKES, hostile_payloads, nasty_payloads

KEY = "iotpipe.v1.s1.d1.telemetry"
TIME_LIMIT_S = 1.0
MEMORY_LIMIT = 16 * 1024 * 1024
REASONS = {reason.value for reason in Reason} - {Reason.INTERNAL.value}


@pytest.fixture(scope="module")
def consumer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Consumer, MemorySource]]:
    """One consumer on an in-memory queue and a real SQLite store, shared by the examples."""
    path: Path = tmp_path_factory.mktemp("hostile") / "telemetry.db"
    settings = ConsumeSettings(store=f"sqlite:///{path}", http_port=0, batch_latency=0.01)
    source = MemorySource()
    store = SQLiteStore(path, durability="process")
    service = Consumer(settings, store, source, rng=random.Random(1))
    source.connect()
    yield service, source
    store.close()


def _process(service: Consumer, source: MemorySource) -> None:
    """Hand the consumer everything queued, as one batch, within the time and memory limits."""
    batch = source.next_batch(100, 0)
    tracemalloc.start()
    began = time.perf_counter()
    try:
        service.process(batch)
        elapsed = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < TIME_LIMIT_S * len(batch), f"took {elapsed:.3f} s"
    assert peak < MEMORY_LIMIT, f"peak {peak / 1e6:.1f} MB"
    assert source.unsettled == []


routing_keys = st.one_of(
    st.just(KEY),
    st.text(max_size=40),
    st.text("abc.#*" + LOOKALIKES, max_size=30).map(lambda s: f"iotpipe.v1.{s}.telemetry"),
)
headers = st.dictionaries(
    st.text(max_size=20),
    st.none() | st.integers() | st.text(max_size=20) | st.binary(max_size=20) | st.booleans(),
    max_size=4,
)


@given(
    routing_key=routing_keys,
    body=hostile_payloads(),
    message_id=st.none() | st.text(max_size=300),
    type_=st.none() | st.text(max_size=20),
    extra=headers,
)
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_any_delivery_is_stored_or_dead_lettered_with_a_reason(
    consumer: tuple[Consumer, MemorySource],
    routing_key: str,
    body: bytes,
    message_id: str | None,
    type_: str | None,
    extra: dict[str, object],
) -> None:
    """Random body and properties: no exception, everything settled, rejections have a reason."""
    service, source = consumer
    before = len(source.dead_letters)
    source.add(routing_key, body, message_id=message_id, type=type_, headers=extra)
    _process(service, source)
    for dead in source.dead_letters[before:]:
        assert dead.reason in REASONS, dead
        assert dead.error
        assert "\n" not in dead.error


def test_nasty_bodies_are_dead_lettered_and_their_neighbours_stored(
    consumer: tuple[Consumer, MemorySource],
) -> None:
    """One batch of every nasty payload between two valid envelopes: both valid ones stored."""
    service, source = consumer
    stored = service.totals.messages + service.totals.duplicates
    before = len(source.dead_letters)
    source.add(KEY, envelope("s1", "d1", 900_001), message_id="s1-d1-900001")
    nasty = dict(sorted(nasty_payloads().items()))
    for name, body in nasty.items():
        source.add(KEY, body, message_id=name)
    source.add(KEY, envelope("s1", "d1", 900_002), message_id="s1-d1-900002")
    _process(service, source)
    held = service.totals.messages + service.totals.duplicates
    assert held - stored == 2
    dead = {d.delivery.message_id: d.reason for d in source.dead_letters[before:]}
    assert set(dead) == set(nasty)
    assert set(dead.values()) <= REASONS

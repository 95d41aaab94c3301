"""Hostile MQTT input to the bridge, in process: whatever a device sends, the bridge's
validation (``route`` for the contract's topics, the ingest rules for foreign ones) returns a
route within a time and memory bound, and every rejection is a dead letter with a reason.

The same payloads through real sockets: ``tests/e2e/test_hostile_input.py``.
"""

from __future__ import annotations

import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.ingest import Ingest, IngestRule
from bridge.service import Routed, route
from iotpipe.amqp import DEAD_EXCHANGE, TELEMETRY_EXCHANGE
from iotpipe.envelope import Reason
from iotpipe.mqtt import Message
from tests.strategies import LOOKALIKES, hostile_payloads, hostile_topics, nasty_payloads

#: Seconds one message may take to validate (generous: CI shares two cores, tracemalloc slows).
TIME_LIMIT_S = 1.0
#: Bytes of memory one message may allocate at its peak (payloads are at most 256 KiB).
MEMORY_LIMIT = 16 * 1024 * 1024
BRIDGE_REASONS = {f"bridge.{reason.value}" for reason in Reason}
NATIVE_TOPIC = "iotpipe/v1/s1/d1/telemetry"
NOW_MS = 1_795_680_902_125

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _ingest() -> Ingest:
    """One rule per stateless format, as a bridge facing every kind of foreign device would have."""
    rules = [
        {"name": "tasmota", "preset": "tasmota", "site": "home"},
        {"name": "esphome", "preset": "esphome", "site": "home"},
        {"name": "z2m", "preset": "zigbee2mqtt", "site": "home"},
        {"name": "shelly", "preset": "shelly", "site": "home"},
        {"name": "telegraf", "filter": "telegraf/{device}", "format": "line", "site": "home"},
        {"name": "legacy", "filter": "legacy/{device}", "format": "envelope", "site": "home"},
    ]
    return Ingest([IngestRule.model_validate(rule) for rule in rules], run="fuzz")


FOREIGN_TOPICS = [
    "tele/dev1/SENSOR",
    "dev1/sensor/temp/state",
    "zigbee2mqtt/dev1",
    "dev1/events/rpc",
    "telegraf/dev1",
    "legacy/dev1",
    f"zigbee2mqtt/d{LOOKALIKES}1",
]


def _assert_dead_letter_or_telemetry(routed: Routed, *, foreign: bool = False) -> None:
    """A route is telemetry, or a dead letter with a known reason and a one-line error."""
    if routed.exchange == TELEMETRY_EXCHANGE:
        return
    assert routed.exchange == DEAD_EXCHANGE
    if foreign and routed.routing_key.startswith("bridge.mapping_"):
        assert routed.routing_key != "bridge.mapping_internal", routed.properties.headers
    else:
        assert routed.routing_key in BRIDGE_REASONS - {"bridge.internal"}, routed.routing_key
    headers = routed.properties.headers or {}
    error = str(headers.get("x-iotpipe-error", ""))
    assert error
    assert "\n" not in error


def _bounded(call: object) -> object:
    """Run ``call()``, asserting it ends within the time and memory limits; returns its result."""
    assert callable(call)
    tracemalloc.start()
    began = time.perf_counter()
    try:
        result = call()
        elapsed = time.perf_counter() - began
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < TIME_LIMIT_S, f"took {elapsed:.3f} s"
    assert peak < MEMORY_LIMIT, f"peak {peak / 1e6:.1f} MB"
    return result


@given(topic=hostile_topics(), payload=hostile_payloads())
@FUZZ
def test_route_never_raises_and_rejects_with_a_reason(topic: str, payload: bytes) -> None:
    """Any topic and bytes: ``route`` returns telemetry or a dead letter with a known reason."""
    routed = route(Message(topic, payload), received_at=1.0)
    _assert_dead_letter_or_telemetry(routed)
    if routed.exchange == TELEMETRY_EXCHANGE:
        assert topic.isascii(), f"look-alike names forwarded: {topic!r}"
    assert routed.body is payload


@pytest.mark.parametrize("name", sorted(nasty_payloads()))
def test_nasty_payloads_are_dead_lettered_within_time_and_memory(name: str) -> None:
    """Each nasty payload on a contract topic is dead-lettered, fast and in bounded memory."""
    payload = nasty_payloads()[name]
    routed = _bounded(lambda: route(Message(NATIVE_TOPIC, payload), received_at=1.0))
    assert isinstance(routed, Routed)
    _assert_dead_letter_or_telemetry(routed)
    assert routed.exchange == DEAD_EXCHANGE, routed.routing_key


@pytest.mark.parametrize("topic", FOREIGN_TOPICS)
@pytest.mark.parametrize("name", sorted(nasty_payloads()))
def test_ingest_rules_refuse_nasty_payloads_as_mapping_errors(topic: str, name: str) -> None:
    """Every ingest format meets the nasty payloads with a mapping reason, never a bug."""
    ingest = _ingest()
    payload = nasty_payloads()[name]
    result = _bounded(lambda: ingest.map(topic, payload, NOW_MS, dup=False))
    assert isinstance(result, tuple)
    rule, outcome = result
    if outcome.error is not None:
        assert outcome.error.what != "internal", (rule, outcome.error)
    for mapped in outcome.mapped:
        assert mapped.site.isascii(), mapped
        assert mapped.device.isascii(), mapped


@given(
    topic=st.sampled_from(FOREIGN_TOPICS) | st.text(max_size=30),
    payload=hostile_payloads(),
    dup=st.booleans(),
)
@FUZZ
def test_ingest_never_fails_internally(topic: str, payload: bytes, dup: bool) -> None:
    """Any foreign topic and bytes: no exception, and no ``mapping_internal`` (an iotpipe bug)."""
    result = _ingest().map(topic, payload, NOW_MS, dup=dup)
    if result is not None:
        error = result[1].error
        assert error is None or error.what != "internal", error

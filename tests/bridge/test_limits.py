"""Per-device limits against real brokers: a noisy device is limited, the rest of the fleet not."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from bridge.limits import Limiter, LimitSettings
from bridge.receipts import ReceiptRelay
from iotpipe.receipts import (
    BootReceipt,
    Receipt,
    decode_receipt,
    encode_receipt,
    receipt_routing_key,
    receipt_topic,
)
from iotpipe.settings import AmqpSettings, MqttSettings
from iotpipe.testing import Capture
from tests.bridge.test_bridge import RunningBridge, _running_bridge, envelope, publisher
from tests.bridge.test_receipts import publish, ready, settings_for
from tests.conftest import BrokerInfo, wait_for
from tests.rabbitmq import blocking_channel

pytestmark = [pytest.mark.mqtt, pytest.mark.rabbitmq]

QUIET = ("q1", "q2", "q3", "q4")


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def take_all(amqp_url: str, queue: str) -> list[tuple[str, dict[str, str], bytes]]:
    """Every message ready in ``queue``: (routing key, headers, body)."""
    got = []
    with blocking_channel(amqp_url) as channel:
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.append((method.routing_key, props.headers or {}, body))


@pytest.fixture
def limited_bridge(
    mosquitto_broker: BrokerInfo, rabbitmq_url: str, tmp_path: Path, unique: str
) -> Iterator[RunningBridge]:
    """A bridge whose site may send 50 envelopes/s per device, dead-lettering the excess, and
    whose device ``noisy`` may send 5/s (burst 5)."""
    site = f"s{unique}"
    limits = {
        "policy": "dead_letter",
        "rate": 50,
        "devices": {f"{site}/noisy": {"rate": 5, "burst": 5}},
    }
    with _running_bridge(
        mosquitto_broker,
        rabbitmq_url,
        tmp_path,
        unique,
        limits=limits,
        receipt_queue=f"test.{unique}.receipts",
        receipt_binding=f"iotpipe.v1.{site}.*.receipt",
    ) as running:
        yield running
    with blocking_channel(rabbitmq_url) as channel:
        channel.queue_delete(f"test.{unique}.receipts")


def test_noisy_device_is_dead_lettered_and_the_fleet_is_untouched(
    limited_bridge: RunningBridge, mosquitto_broker: BrokerInfo, unique: str
) -> None:
    """A device at 20x its rate: its envelopes split exactly into forwarded + bridge.rate_limited;
    every envelope of the four devices within their limits arrives exactly once."""
    running, site = limited_bridge, limited_bridge.site
    registry = running.bridge.metrics.registry
    pub = publisher(mosquitto_broker.url, unique)
    sent: dict[str, list[bytes]] = {device: [] for device in (*QUIET, "noisy")}
    started = time.monotonic()
    for tick in range(100):  # 1 s: noisy at 100/s (20x its 5/s), the others at 20/s each
        bodies = [("noisy", envelope(site, "noisy", tick))]
        if tick % 5 == 0:
            bodies += [(device, envelope(site, device, tick)) for device in QUIET]
        for device, body in bodies:
            pub.publish(f"iotpipe/v1/{site}/{device}/telemetry", body)
            sent[device].append(body)
        time.sleep(max(0.0, started + (tick + 1) * 0.01 - time.monotonic()))  # pacing, not sync
    assert pub.flush(timeout=20)
    total = sum(len(bodies) for bodies in sent.values())

    def settled() -> float:
        forwarded = metric(registry, "iotpipe_bridge_forwarded_total")
        dead = metric(registry, "iotpipe_bridge_dead_lettered_total", reason="rate_limited")
        return forwarded + dead

    wait_for(lambda: settled() == total, 30, f"{total} envelopes confirmed")
    elapsed = time.monotonic() - started
    dead_count = metric(registry, "iotpipe_bridge_dead_lettered_total", reason="rate_limited")

    forwarded = take_all(running.amqp_url, running.queue)
    by_device: dict[str, list[bytes]] = {device: [] for device in sent}
    for _, headers, body in forwarded:
        by_device[headers["x-iotpipe-device"]].append(body)
    for device in QUIET:
        assert by_device[device] == sent[device]  # each once, in order

    dead: list[tuple[str, dict[str, str], bytes]] = []

    def all_dead_here() -> bool:
        dead.extend(
            item
            for item in take_all(running.amqp_url, running.dead_queue)
            if item[1].get("x-iotpipe-topic", "").startswith(f"iotpipe/v1/{site}/")
        )
        return len(dead) >= dead_count

    wait_for(all_dead_here, 20, f"{dead_count} dead letters")
    assert {key for key, _, _ in dead} == {"bridge.rate_limited"}
    assert {headers["x-iotpipe-error"] for _, headers, _ in dead} == {
        f"device {site}/noisy over its rate limit 5/s (burst 5)"
    }
    noisy_forwarded, noisy_dead = by_device["noisy"], [body for _, _, body in dead]
    assert sorted(noisy_forwarded + noisy_dead) == sorted(sent["noisy"])  # none lost, none twice
    assert len(noisy_dead) == dead_count
    assert metric(
        registry, "iotpipe_bridge_limited_total", reason="rate", policy="dead_letter"
    ) == (dead_count)
    # The bucket: its burst, then 5/s over the run (a count, with a generous margin).
    assert 5 <= len(noisy_forwarded) <= 5 + 5 * (elapsed + 1)
    pub.disconnect()


@pytest.fixture
def held_relay(
    mosquitto_broker: BrokerInfo, rabbitmq_url: str, unique: str, tmp_path: Path
) -> Iterator[tuple[ReceiptRelay, Limiter, list[float]]]:
    """A receipt relay with a limiter on a hand-moved clock: 1 envelope/s, policy hold."""
    clock = [1000.0]
    registry = CollectorRegistry()
    limiter = Limiter(LimitSettings(rate=1, burst=1), registry, clock=lambda: clock[0])
    relay = ReceiptRelay.from_settings(
        MqttSettings(url=mosquitto_broker.url),
        AmqpSettings(url=rabbitmq_url),
        settings_for(unique, tmp_path),
        registry,
        limiter=limiter,
    )
    relay.start()
    try:
        wait_for(lambda: relay.up, 20, "relay up")
        yield relay, limiter, clock
    finally:
        relay.stop()
        with blocking_channel(rabbitmq_url) as channel:
            channel.queue_delete(f"test.{unique}.receipts")


def test_held_device_receipts_are_parked_merged_and_released_when_the_hold_ends(
    held_relay: tuple[ReceiptRelay, Limiter, list[float]],
    mosquitto_broker: BrokerInfo,
    rabbitmq_url: str,
    unique: str,
) -> None:
    """A device in debt gets no receipt until its hold ends, then one merged receipt covering
    them all; a device within its limits gets its receipt at once."""
    relay, limiter, clock = held_relay
    registry = relay.metrics.registry
    site = f"s{unique}"
    for _ in range(3):
        assert limiter.admit(site, "noisy", 1) is None  # forwarded; 2 envelopes owed
    assert limiter.held_until(site, "noisy") == clock[0] + 2.0
    noisy = [
        (BootReceipt("b1", ((0, 4),)),),
        (BootReceipt("b1", ((5, 9),)),),
        (BootReceipt("b2", ((0, 0),)),),
    ]
    quiet = Receipt(site, "quiet", 5, (BootReceipt("b1", ((0, 2),)),))
    with Capture(mosquitto_broker.url, f"iotpipe/v1/{site}/+/receipt") as capture:
        for ts, stored in enumerate(noisy):
            body = encode_receipt(Receipt(site, "noisy", ts, stored))
            publish(rabbitmq_url, receipt_routing_key(site, "noisy"), body)
        publish(rabbitmq_url, receipt_routing_key(site, "quiet"), encode_receipt(quiet))
        (first,) = capture.wait(1)
        assert (first.topic, first.payload) == (receipt_topic(site, "quiet"), encode_receipt(quiet))
        wait_for(
            lambda: metric(registry, "iotpipe_bridge_receipts_parked_total") == 3, 10, "parked"
        )
        wait_for(lambda: ready(rabbitmq_url, f"test.{unique}.receipts") == 0, 10, "all acked")
        assert metric(registry, "iotpipe_bridge_limited_devices_held") == 1
        assert [m.topic for m in capture.messages] == [receipt_topic(site, "quiet")]

        clock[0] += 2.5  # the debt is repaid
        arrived = capture.wait(2)
    released = arrived[1]
    assert released.topic == receipt_topic(site, "noisy")
    with Capture(mosquitto_broker.url, receipt_topic(site, "noisy")) as late:
        (kept,) = late.wait(1)
    assert (kept.payload, kept.retain) == (released.payload, True)  # retained, as any receipt
    merged = decode_receipt(released.payload)
    assert isinstance(merged, Receipt)
    assert merged.stored == (BootReceipt("b1", ((0, 9),)), BootReceipt("b2", ((0, 0),)))
    assert metric(registry, "iotpipe_bridge_receipts_released_total") == 1
    assert metric(registry, "iotpipe_bridge_receipts_forwarded_total") == 1
    assert metric(registry, "iotpipe_bridge_limited_devices_held") == 0
    assert (json.loads(released.payload)["site"], merged.ts) == (site, 2)

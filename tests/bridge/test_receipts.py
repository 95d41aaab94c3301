"""The receipt relay against real brokers: RabbitMQ receipts reach the devices' MQTT topics."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pika  # type: ignore[import-untyped]
import pytest
from prometheus_client import CollectorRegistry

from bridge.receipts import ReceiptRelay, capability, device_of, receipt_queue_spec
from bridge.settings import BridgeSettings
from iotpipe.receipts import (
    CAPABILITY_TOPIC,
    EXCHANGE,
    BootReceipt,
    Receipt,
    encode_receipt,
    receipt_routing_key,
    receipt_topic,
)
from iotpipe.settings import AmqpSettings, MqttSettings
from iotpipe.testing import Capture
from tests.bridge.conftest import StartBroker
from tests.conftest import BrokerInfo, free_port, wait_for
from tests.rabbitmq import blocking_channel

MakeRelay = Callable[..., ReceiptRelay]


def settings_for(unique: str, tmp_path: Path, **fields: object) -> BridgeSettings:
    """Bridge settings with a queue and a binding of this test's own."""
    fields.setdefault("client_id", f"bridge-{unique}")
    return BridgeSettings(
        receipt_queue=f"test.{unique}.receipts",
        receipt_binding=f"iotpipe.v1.s{unique}.*.receipt",
        spool_path=tmp_path / "spool.db",
        http_port=0,
        **fields,
    )


def receipt(site: str, device: str, through: int = 41) -> bytes:
    return encode_receipt(
        Receipt(site, device, 1795680902125, (BootReceipt("b7f3", ((43, 45),), through),))
    )


def publish(amqp_url: str, routing_key: str, body: bytes) -> None:
    with blocking_channel(amqp_url) as channel:
        channel.exchange_declare(EXCHANGE, "topic", durable=True)
        channel.basic_publish(EXCHANGE, routing_key, body)


def ready(amqp_url: str, queue: str) -> int | None:
    """Messages ready in ``queue`` (None: the queue does not exist)."""
    try:
        with blocking_channel(amqp_url) as channel:
            return int(channel.queue_declare(queue, passive=True).method.message_count)
    except pika.exceptions.ChannelClosedByBroker as err:
        if err.reply_code != 404:
            raise
        return None


def count(relay: ReceiptRelay, name: str) -> float:
    return relay.metrics.registry.get_sample_value(name) or 0.0


@pytest.fixture
def make_relay(rabbitmq_url: str, unique: str, tmp_path: Path) -> Iterator[MakeRelay]:
    """Build and start relays (``make_relay(mqtt_url, **settings)``); stopped and queue deleted after."""
    relays: list[ReceiptRelay] = []

    def make(mqtt_url: str, **fields: object) -> ReceiptRelay:
        settings = settings_for(unique, tmp_path, **fields)
        relay = ReceiptRelay.from_settings(
            MqttSettings(url=mqtt_url),
            AmqpSettings(url=rabbitmq_url),
            settings,
            CollectorRegistry(),
        )
        relays.append(relay)
        relay.start()
        return relay

    yield make
    for relay in relays:
        relay.stop()
    with blocking_channel(rabbitmq_url) as channel:
        channel.queue_delete(f"test.{unique}.receipts")


def test_device_of_accepts_receipt_keys_only() -> None:
    """Only iotpipe.v1.{site}.{device}.receipt with valid names yields a device."""
    assert device_of(receipt_routing_key("home", "pi-1")) == ("home", "pi-1")
    for key in (
        "iotpipe.v1.home.pi.telemetry",
        "iotpipe.v2.home.pi.receipt",
        "iotpipe.v1.a/b.c.receipt",
    ):
        assert device_of(key) is None


def test_receipt_queue_is_classic_bounded_and_not_dead_lettered(tmp_path: Path) -> None:
    """The receipts queue expires and bounds its receipts and never dead-letters them."""
    spec = receipt_queue_spec(settings_for("x", tmp_path, receipt_ttl=30))
    assert (spec.queue_type, spec.exchange) == ("classic", EXCHANGE)
    assert spec.arguments() == {
        "x-message-ttl": 30_000,
        "x-max-length": 100_000,
        "x-overflow": "drop-head",
    }


@pytest.mark.mqtt
@pytest.mark.rabbitmq
def test_receipt_arrives_retained_and_unchanged(
    make_relay: MakeRelay, mosquitto_broker: BrokerInfo, rabbitmq_url: str, unique: str
) -> None:
    """A receipt published to iotpipe.receipts reaches the device topic retained, body unchanged."""
    relay = make_relay(mosquitto_broker.url)
    wait_for(lambda: relay.up, 20, "relay up")
    site = f"s{unique}"
    body = receipt(site, "d1")
    publish(rabbitmq_url, receipt_routing_key(site, "d1"), body)
    publish(rabbitmq_url, f"iotpipe.v1.{site}.bad/dev.receipt", body)
    wait_for(lambda: count(relay, "iotpipe_bridge_receipts_forwarded_total") == 1, 20, "forwarded")
    wait_for(lambda: count(relay, "iotpipe_bridge_receipts_dropped_total") == 1, 20, "dropped")
    with Capture(mosquitto_broker.url, receipt_topic(site, "d1")) as late:
        (message,) = late.wait(1)
    assert (message.payload, message.retain) == (body, True)
    assert count(relay, "iotpipe_bridge_receipts_up") == 1.0


@pytest.mark.mqtt
@pytest.mark.rabbitmq
def test_capability_is_retained_and_says_receipts_flow(
    make_relay: MakeRelay, mosquitto_broker: BrokerInfo
) -> None:
    """A relay announces, retained on iotpipe/v1/pipeline, that receipts flow."""
    relay = make_relay(mosquitto_broker.url)
    wait_for(lambda: relay.up, 20, "relay up")
    with Capture(mosquitto_broker.url, CAPABILITY_TOPIC) as late:
        (message,) = late.wait(1)
    announced = json.loads(message.payload)
    assert message.retain
    assert (announced["v"], announced["receipts"]) == ("1.1", True)
    assert announced["agent"].startswith("iotpipe-bridge/")
    assert json.loads(capability(True, announced["ts"])) == announced


@pytest.mark.mqtt
@pytest.mark.rabbitmq
def test_receipts_off_declares_no_queue_and_says_so(
    make_relay: MakeRelay, mosquitto_broker: BrokerInfo, rabbitmq_url: str, unique: str
) -> None:
    """With receipts off the capability says false and no receipts queue is declared."""
    relay = make_relay(mosquitto_broker.url, receipts=False)
    with Capture(mosquitto_broker.url, CAPABILITY_TOPIC) as capture:
        (message,) = capture.wait(1)
    assert json.loads(message.payload)["receipts"] is False
    wait_for(lambda: not relay.running, 10, "the relay ends once it announced")
    assert ready(rabbitmq_url, f"test.{unique}.receipts") is None


@pytest.mark.mqtt
@pytest.mark.rabbitmq
def test_two_relays_on_one_queue_forward_each_receipt_once(
    make_relay: MakeRelay, mosquitto_broker: BrokerInfo, rabbitmq_url: str, unique: str
) -> None:
    """Bridges share the receipts queue: each receipt reaches MQTT once, whichever relays it."""
    relays = [make_relay(mosquitto_broker.url, client_id=f"bridge-{unique}-{n}") for n in (1, 2)]
    wait_for(lambda: all(r.up for r in relays), 20, "relays up")
    site = f"s{unique}"
    devices = [f"d{n}" for n in range(40)]
    with Capture(mosquitto_broker.url, f"iotpipe/v1/{site}/+/receipt") as capture:
        for device in devices:
            publish(rabbitmq_url, receipt_routing_key(site, device), receipt(site, device))
        capture.wait(len(devices))

        def forwarded() -> float:
            return sum(count(r, "iotpipe_bridge_receipts_forwarded_total") for r in relays)

        wait_for(lambda: forwarded() == len(devices), 10, "every receipt acknowledged")
        wait_for(lambda: ready(rabbitmq_url, f"test.{unique}.receipts") == 0, 10, "drained")
        arrived = capture.wait(len(devices))
    assert sorted(m.topic for m in arrived) == sorted(receipt_topic(site, d) for d in devices)
    assert forwarded() == len(devices)


@pytest.mark.mqtt
@pytest.mark.rabbitmq
def test_receipt_is_acked_only_after_the_puback(
    make_relay: MakeRelay, start_broker: StartBroker, rabbitmq_url: str, unique: str
) -> None:
    """MQTT away: the receipt is held unacknowledged (back in the queue on stop); back: delivered."""
    port = free_port()
    broker = start_broker(port=port)
    url = f"mqtt://127.0.0.1:{port}"
    queue = f"test.{unique}.receipts"
    relay = make_relay(url)
    wait_for(lambda: relay.up, 20, "relay up")
    broker.stop()
    wait_for(lambda: not relay.mqtt.connected, 20, "relay noticed MQTT is gone")
    site = f"s{unique}"
    body = receipt(site, "d1")
    publish(rabbitmq_url, receipt_routing_key(site, "d1"), body)
    wait_for(lambda: ready(rabbitmq_url, queue) == 0, 20, "the relay took the receipt")
    relay.stop()
    assert ready(rabbitmq_url, queue) == 1, "not acknowledged without a PUBACK"
    assert count(relay, "iotpipe_bridge_receipts_forwarded_total") == 0

    start_broker(port=port)
    relay = make_relay(url)
    wait_for(lambda: count(relay, "iotpipe_bridge_receipts_forwarded_total") == 1, 20, "forwarded")
    relay.stop()
    assert ready(rabbitmq_url, queue) == 0, "acknowledged after the PUBACK"
    with Capture(url, receipt_topic(site, "d1")) as late:
        (message,) = late.wait(1)
    assert (message.payload, message.retain) == (body, True)

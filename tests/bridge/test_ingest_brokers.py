"""Ingest rules through real brokers: Mosquitto -> the bridge -> RabbitMQ, published twice."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bridge.ingest import IngestRule
from iotpipe.envelope import Envelope, decode
from iotpipe.topics import to_mqtt_topic
from tests.bridge.test_bridge import _running_bridge, publisher
from tests.bridge.test_ingest import LINES, TASMOTA
from tests.conftest import BrokerInfo, wait_for
from tests.rabbitmq import blocking_channel

pytestmark = [pytest.mark.mqtt, pytest.mark.rabbitmq]


def test_foreign_messages_become_envelopes_and_a_redelivery_keeps_its_id(
    mosquitto_broker: BrokerInfo, rabbitmq_url: str, tmp_path: Path, unique: str
) -> None:
    """Tasmota, ESPHome and line protocol arrive as valid envelopes; a bad one is dead-lettered
    by its rule; publishing everything again gives the same ids where the payload has a time."""
    site = f"s{unique}"
    rules = (
        IngestRule(name="plugs", preset="tasmota", site=site),
        IngestRule(
            name="nodes",
            preset="esphome",
            site=site,
            filter=f"{unique}/+/{{sensor}}/state",
            device="esp",
        ),
        IngestRule(name="telegraf", filter=f"telegraf-{unique}", format="line", site=site),
    )
    messages = [
        (f"tele/{unique}-plug/SENSOR", TASMOTA),
        (f"{unique}/sensor/temperature/state", b"21.5"),
        (f"telegraf-{unique}", LINES),
    ]
    bad = (f"tele/{unique}-plug/SENSOR", b'{"Time":"yesterday","ENERGY":{"Power":1}}')
    with _running_bridge(mosquitto_broker, rabbitmq_url, tmp_path, unique, ingest=rules) as running:
        pub = publisher(mosquitto_broker.url, unique)
        rounds: list[list[tuple[Any, bytes]]] = []
        for _ in range(2):
            for topic, payload in [*messages, bad]:
                pub.publish(topic, payload)
            assert pub.flush(timeout=20)
            rounds.append(running.drain(running.queue, 4))  # 1 + 1 + 2 (two line devices)
        dead = _dead_letters(running.amqp_url, running.dead_queue, bad[0], 2)
        pub.disconnect()

    for props, body in rounds[0] + rounds[1]:
        decoded = decode(to_mqtt_topic(f"iotpipe.v1.{site}.{_device(body)}.telemetry"), body)
        assert isinstance(decoded, Envelope), decoded
        assert props.message_id == decoded.id
        assert props.headers["x-iotpipe-rule"] in {"plugs", "nodes", "telegraf"}
    first = {(p.headers["x-iotpipe-rule"], _device(b)): p.message_id for p, b in rounds[0]}
    second = {(p.headers["x-iotpipe-rule"], _device(b)): p.message_id for p, b in rounds[1]}
    assert set(first) == {
        ("plugs", f"{unique}-plug"),
        ("nodes", "esp"),
        ("telegraf", "pi-1"),
        ("telegraf", "pi-2"),
    }
    for key in (("plugs", f"{unique}-plug"), ("telegraf", "pi-1"), ("telegraf", "pi-2")):
        assert first[key] == second[key], key  # the payload's time makes the id
    assert first["nodes", "esp"] != second["nodes", "esp"]  # no time: a new message each time
    for routing_key, props, body in dead:
        assert routing_key == "bridge.mapping_time"
        assert body == bad[1]  # unchanged
        assert props.headers["x-iotpipe-rule"] == "plugs"
        assert props.headers["x-iotpipe-error"].startswith("Time = 'yesterday'")


def _device(body: bytes) -> str:
    device: str = json.loads(body)["device"]
    return device


def _dead_letters(url: str, queue: str, topic: str, expected: int) -> list[tuple[str, Any, bytes]]:
    """``expected`` dead letters of ``topic`` (the shared dead queue may hold others' too)."""
    got: list[tuple[str, Any, bytes]] = []
    with blocking_channel(url) as channel:

        def enough() -> bool:
            while len(got) < expected:
                method, props, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    return False
                if props.headers.get("x-iotpipe-topic") == topic:
                    got.append((method.routing_key, props, body))
            return True

        wait_for(enough, 30, f"{expected} dead letters of {topic}")
    return got

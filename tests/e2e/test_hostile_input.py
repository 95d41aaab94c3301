"""Hostile payloads over real sockets: a private Mosquitto -> ``iotpipe bridge`` -> the shared
RabbitMQ. Each of the nastiest payloads lands in ``iotpipe.dead`` with the reason the in-process
validation gives it (tests/bridge/test_hostile_input.py), the bridge stays healthy, and a good
envelope published after them is forwarded.

Names are the test's own: site ``e2e<unique>``, a foreign device ``hostile<unique>``, queues
``e2e.<unique>.*`` (deleted at teardown).
"""

from __future__ import annotations

import json

import pytest

from bridge.service import route
from iotpipe.amqp import DEAD_EXCHANGE, HEADER_ERROR, HEADER_TOPIC, TELEMETRY_EXCHANGE
from iotpipe.mqtt import Message
from iotpipe.recording import RecordedMessage
from tests.bridge.test_bridge import envelope
from tests.conftest import BrokerInfo
from tests.e2e.conftest import QueueNames, Services, wait_until
from tests.fixtures_replay import Replayer
from tests.rabbitmq import blocking_channel
from tests.strategies import nasty_payloads

pytestmark = [pytest.mark.mqtt, pytest.mark.rabbitmq, pytest.mark.mosquitto]

NATIVE = ["deep_arrays", "over_size", "huge_int_seq", "nan", "invalid_utf8", "zero_width_device"]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def test_nasty_payloads_are_dead_lettered_and_the_bridge_forwards_afterwards(
    mosquitto_broker: BrokerInfo,
    rabbitmq_url: str,
    services: Services,
    shared_queues: QueueNames,
    replayer: Replayer,
    unique: str,
) -> None:
    """Every nasty payload: a dead letter with its reason; then a good envelope gets through."""
    site, foreign = f"e2e{unique}", f"zigbee2mqtt/hostile{unique}"
    native = f"iotpipe/v1/{site}/d1/telemetry"
    with blocking_channel(rabbitmq_url) as channel:
        channel.exchange_declare(DEAD_EXCHANGE, exchange_type="topic", durable=True)
        channel.exchange_declare(TELEMETRY_EXCHANGE, exchange_type="topic", durable=True)
        channel.queue_declare(shared_queues.dead, durable=True)
        channel.queue_bind(shared_queues.dead, DEAD_EXCHANGE, routing_key="bridge.#")
        channel.queue_declare(shared_queues.store, durable=True)
        channel.queue_bind(shared_queues.store, TELEMETRY_EXCHANGE, f"iotpipe.v1.{site}.#")
    bridge = services.bridge(
        "bridge",
        mqtt_url=mosquitto_broker.url,
        amqp_url=rabbitmq_url,
        client_id=f"e2e-bridge-{unique}",
    )
    with bridge.config.open("a") as config:
        rule = {"name": f"z2m-{unique}", "preset": "zigbee2mqtt", "site": site}
        config.write("\n[[bridge.ingest]]\n")
        config.writelines(f"{key} = {json.dumps(value)}\n" for key, value in rule.items())
    bridge.start().wait_ready()

    payloads = nasty_payloads()
    sent = [(native, payloads[name]) for name in NATIVE]
    sent.append((foreign, payloads["deep_objects"]))
    expected = [(topic, route(Message(topic, body), 0.0).routing_key) for topic, body in sent]
    expected[-1] = (foreign, "bridge.mapping_json")  # an ingest rule takes the foreign topic
    replayer(
        [RecordedMessage(0.0, topic, body, 1, False) for topic, body in sent], mosquitto_broker.url
    )

    dead: list[tuple[str, str]] = []

    def all_dead() -> bool:
        with blocking_channel(rabbitmq_url) as channel:
            while True:
                method, properties, _body = channel.basic_get(shared_queues.dead, auto_ack=True)
                if method is None:
                    break
                headers = dict(properties.headers or {})
                topic = _text(headers.get(HEADER_TOPIC, ""))
                if topic in {native, foreign}:
                    assert headers.get(HEADER_ERROR), "a dead letter says why"
                    dead.append((topic, method.routing_key))
        return len(dead) >= len(expected)

    wait_until(all_dead, 60, "every nasty payload dead-lettered", services.logs)
    assert sorted(dead) == sorted(expected)
    assert len(set(expected)) == 5  # bad_json and schema twice each
    assert all(key.startswith("bridge.") for _topic, key in dead)
    health = bridge.health()
    assert health is not None
    assert health["mqtt"] == "up"
    assert health["amqp"] == "up"

    good = envelope(site, "d1", 1)
    replayer([RecordedMessage(0.0, native, good, 1, False)], mosquitto_broker.url)

    def forwarded() -> bool:
        with blocking_channel(rabbitmq_url) as channel:
            method, _properties, body = channel.basic_get(shared_queues.store, auto_ack=True)
        return method is not None and body == good

    wait_until(forwarded, 30, "the good envelope forwarded", services.logs)

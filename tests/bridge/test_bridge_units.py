"""The bridge's own logic with in-memory transports: ack order, spooling, draining, dead letters.

No broker: :class:`~iotpipe.testing.MemorySubscriber` and :class:`~iotpipe.testing.MemoryPublisher`
stand in for MQTT and RabbitMQ, the spool is a real SQLite file. The same behaviour against real
brokers is in ``test_bridge.py``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bridge.service import Bridge, BridgeSettings
from bridge.spool import Spool
from iotpipe.amqp import DEAD_EXCHANGE, TELEMETRY_EXCHANGE
from iotpipe.testing import MemoryPublisher, MemorySubscriber
from tests.bridge.test_bridge import envelope
from tests.conftest import wait_for

TOPIC = "iotpipe/v1/s1/d1/telemetry"


@dataclass
class Harness:
    """A bridge running on its own thread between two in-memory transports."""

    bridge: Bridge
    subscriber: MemorySubscriber
    publisher: MemoryPublisher

    def deliver(self, *seqs: int) -> list[int]:
        """Deliver one valid envelope per ``seq``; their message ids."""
        return [self.subscriber.deliver(TOPIC, envelope("s1", "d1", seq)) for seq in seqs]

    def seqs_published(self) -> list[int]:
        """The ``seq`` in each telemetry body published so far, in order."""
        return [
            json.loads(m.body)["seq"]
            for m in self.publisher.messages
            if m.exchange == TELEMETRY_EXCHANGE
        ]


def start(tmp_path: Path, publisher: MemoryPublisher) -> tuple[Bridge, threading.Thread]:
    """A bridge on ``publisher`` and a fresh subscriber, running on a thread."""
    settings = BridgeSettings(spool_path=tmp_path / "spool.db", spool_durability="process")
    bridge = Bridge(
        settings,
        subscriber=MemorySubscriber().bind,
        publisher=publisher.bind,
        spool=Spool(settings.spool_path, durability="process"),
        serve_http=False,
    )
    thread = threading.Thread(target=bridge.run, name="test-bridge", daemon=True)
    thread.start()
    return bridge, thread


@pytest.fixture
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    """A running bridge; RabbitMQ up at start, unless parametrized with False (:data:`down`)."""
    publisher = MemoryPublisher(up=getattr(request, "param", True))
    bridge, thread = start(tmp_path, publisher)
    subscriber = bridge.mqtt
    assert isinstance(subscriber, MemorySubscriber)
    wait_for(lambda: subscriber.subscriptions, 5, "the bridge subscribed")
    try:
        yield Harness(bridge, subscriber, publisher)
    finally:
        bridge.stop()
        publisher.auto_confirm = True  # whatever is still out settles, so stopping is quick
        publisher.come_up()
        publisher.confirm()
        thread.join(timeout=10)
        assert not thread.is_alive(), "bridge did not stop"


down = pytest.mark.parametrize("harness", [False], indirect=True, ids=["amqp-down"])


def test_nothing_is_acknowledged_before_rabbitmq_confirms(harness: Harness) -> None:
    """Published and unconfirmed, a message stays unacknowledged on the MQTT side."""
    harness.deliver(1, 2, 3)
    harness.publisher.wait_unconfirmed(3)
    harness.subscriber.settle()
    assert harness.subscriber.acked == []
    assert harness.bridge.health()[1]["unacked"] == 3


def test_acks_go_out_in_arrival_order_whatever_order_the_confirms_come_in(
    harness: Harness,
) -> None:
    """Later messages confirmed first wait for the earliest; then all are acked in arrival order."""
    mids = harness.deliver(1, 2, 3, 4)
    harness.publisher.wait_unconfirmed(4)
    harness.publisher.confirm(skip=1)  # 2, 3 and 4, not 1
    harness.subscriber.settle()
    assert harness.subscriber.acked == []
    harness.publisher.confirm()
    assert harness.subscriber.wait_acked(4) == mids
    assert harness.seqs_published() == [1, 2, 3, 4]


def test_a_spool_commit_counts_like_a_confirm_in_the_ack_order(harness: Harness) -> None:
    """A nacked message goes to the spool and is acked once committed, still in arrival order."""
    mids = harness.deliver(1, 2)
    harness.publisher.wait_unconfirmed(2)
    harness.publisher.nack(1, skip=1)  # 2 is refused, spooled and committed; 1 still out
    wait_for(lambda: harness.bridge.spool.depth == 1, 5, "the refused message spooled")
    harness.subscriber.settle()
    assert harness.subscriber.acked == []
    harness.publisher.confirm()
    assert harness.subscriber.wait_acked(2) == mids


@down
def test_while_rabbitmq_is_down_messages_are_spooled_acked_and_drained_after(
    harness: Harness,
) -> None:
    """With RabbitMQ away messages are acked after the spool commit; they go out, in order, later."""
    mids = harness.deliver(*range(1, 6))
    assert harness.subscriber.wait_acked(5) == mids
    assert harness.bridge.spool.depth == 5
    assert harness.publisher.messages == []
    harness.publisher.come_up()
    harness.publisher.wait_unconfirmed(5)
    assert harness.seqs_published() == [1, 2, 3, 4, 5]
    harness.publisher.confirm()
    wait_for(lambda: harness.bridge.spool.depth == 0, 5, "the spool drained")
    assert harness.bridge.health()[1]["spool"]["depth"] == 0


def test_unconfirmed_messages_move_to_the_spool_when_rabbitmq_goes_away(harness: Harness) -> None:
    """Messages out when the connection drops (reported FAILED) are spooled, then acked."""
    mids = harness.deliver(1, 2, 3)
    harness.publisher.wait_unconfirmed(3)
    harness.publisher.go_down()
    assert harness.subscriber.wait_acked(3) == mids
    assert harness.bridge.spool.depth == 3


def test_an_unroutable_message_is_spooled_not_acknowledged_as_forwarded(harness: Harness) -> None:
    """A message RabbitMQ returns (no queue bound) is kept in the spool and counted."""
    harness.deliver(1)
    harness.publisher.wait_unconfirmed(1)
    harness.publisher.return_unroutable()
    harness.subscriber.wait_acked(1)
    assert harness.bridge.spool.depth == 1
    registry = harness.bridge.metrics.registry
    assert registry.get_sample_value("iotpipe_bridge_unroutable_total") == 1
    assert registry.get_sample_value("iotpipe_bridge_forwarded_total") == 0


def test_contract_breaks_are_dead_lettered_and_acked_after_their_confirm(
    harness: Harness,
) -> None:
    """Invalid messages go to iotpipe.dead with bridge.<reason>, body unchanged, in arrival order."""
    bad_json = harness.subscriber.deliver(TOPIC, b"{not json")
    (valid,) = harness.deliver(7)
    mismatch = harness.subscriber.deliver(TOPIC, envelope("s1", "other", 1))
    published = harness.publisher.wait_unconfirmed(3)
    assert [(m.exchange, m.routing_key) for m in published] == [
        (DEAD_EXCHANGE, "bridge.bad_json"),
        (TELEMETRY_EXCHANGE, "iotpipe.v1.s1.d1.telemetry"),
        (DEAD_EXCHANGE, "bridge.topic_mismatch"),
    ]
    assert published[0].body == b"{not json"
    harness.publisher.confirm()
    assert harness.subscriber.wait_acked(3) == [bad_json, valid, mismatch]
    registry = harness.bridge.metrics.registry
    dead = "iotpipe_bridge_dead_lettered_total"
    assert registry.get_sample_value(dead, {"reason": "bad_json"}) == 1
    assert registry.get_sample_value(dead, {"reason": "topic_mismatch"}) == 1


def test_after_a_lost_mqtt_connection_only_the_redelivered_copies_are_acked(
    harness: Harness,
) -> None:
    """Acks owed on a dropped connection are not sent; the broker's redelivered copies are."""
    harness.deliver(1, 2)
    harness.publisher.wait_unconfirmed(2)
    harness.subscriber.drop()
    wait_for(lambda: harness.subscriber.reconnects == 1, 5, "the bridge reconnected")
    harness.publisher.wait_unconfirmed(4)  # the two redelivered copies, published again
    harness.publisher.confirm()
    acked = harness.subscriber.wait_acked(2)
    harness.subscriber.settle()
    assert harness.subscriber.acked == acked  # once each: the old connection's acks are dropped
    assert sorted(acked) == [1, 2]

"""PackingPublisher against the in-memory publisher: sealing, outcomes fanned out, withdraw;
and the bridge in packed mode with in-memory transports."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bridge.service import Bridge
from bridge.settings import BridgeSettings
from bridge.spool import Spool
from bridge.uplink import HEADER_PACK_COUNT, PACK_CONTRACT, PackingPublisher
from iotpipe import pack
from iotpipe.amqp import (
    HEADER_VERSION,
    UPLINK_EXCHANGE,
    MessageProperties,
    Outcome,
    decode_properties,
    encode_properties,
)
from iotpipe.testing import MemoryPublisher, MemorySubscriber
from tests.bridge.test_bridge import envelope
from tests.conftest import wait_for

TOPIC = "iotpipe/v1/s1/d1/telemetry"

_PROPS = encode_properties(MessageProperties(message_id="x", content_type="application/json"))


@dataclass
class Clock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rig:
    inner: MemoryPublisher
    packer: PackingPublisher
    clock: Clock
    outcomes: list[tuple[object, Outcome]] = field(default_factory=list)

    def publish(self, *tokens: object, body: bytes = b"{}") -> None:
        for token in tokens:
            self.packer.publish(
                "iotpipe.telemetry", f"iotpipe.v1.home.d{token}.telemetry", body, _PROPS, token
            )

    def packs(self) -> list[list[pack.PackedMessage]]:
        return [pack.decode(m.body) for m in self.inner.messages]


def _rig(**options: object) -> Rig:
    inner = MemoryPublisher()
    clock = Clock()
    outcomes: list[tuple[object, Outcome]] = []
    packer = PackingPublisher(
        inner.bind,
        lambda token, outcome: outcomes.append((token, outcome)),
        clock=clock,
        **options,  # type: ignore[arg-type]
    )
    packer.start()
    return Rig(inner, packer, clock, outcomes)


def test_a_pack_is_sent_when_it_holds_max_messages() -> None:
    rig = _rig(max_messages=3, max_delay=10)
    rig.publish(1, 2)
    assert rig.inner.messages == []
    assert rig.packer.pending == 2
    rig.publish(3, 4)
    assert len(rig.inner.messages) == 1
    [first] = rig.packs()
    assert [m.routing_key for m in first] == [f"iotpipe.v1.home.d{i}.telemetry" for i in (1, 2, 3)]
    assert all(m.properties == _PROPS and m.body == b"{}" for m in first)
    assert rig.packer.pending == 4


def test_a_pack_is_sent_before_it_would_grow_past_max_bytes() -> None:
    rig = _rig(max_bytes=2000, max_delay=10)
    rig.publish(1, 2, body=bytes(800))
    assert rig.inner.messages == []
    rig.publish(3, body=bytes(800))  # would make it ~2.5 kB: the two go first
    assert [len(p) for p in rig.packs()] == [2]
    rig.publish(4, body=bytes(5000))  # larger than a pack: it travels alone, at once
    assert [len(p) for p in rig.packs()] == [2, 1, 1]
    assert rig.packer.pending == 4


def test_a_pack_is_sent_when_its_oldest_message_waited_max_delay() -> None:
    rig = _rig(max_delay=0.5)  # steps of 1/4: exact in binary floating point
    rig.publish(1)
    rig.clock.now += 0.25
    rig.publish(2)
    rig.packer.tick()
    assert rig.inner.messages == []
    rig.clock.now += 0.25
    rig.packer.tick()
    assert [len(p) for p in rig.packs()] == [2]
    rig.packer.tick()
    assert len(rig.inner.messages) == 1


def test_pack_properties_name_the_format() -> None:
    rig = _rig(max_messages=2)
    rig.publish(1, 2)
    [sent] = rig.inner.messages
    assert sent.exchange == UPLINK_EXCHANGE
    assert isinstance(sent.properties, bytes)
    props = decode_properties(sent.properties)
    assert props.content_type == pack.CONTENT_TYPE
    assert props.type == pack.MESSAGE_TYPE
    assert props.delivery_mode == 2
    assert props.message_id
    assert props.headers == {HEADER_VERSION: PACK_CONTRACT, HEADER_PACK_COUNT: "2"}
    rig.publish(3, 4)
    assert decode_properties(rig.inner.messages[1].properties).message_id != props.message_id  # type: ignore[arg-type]


@pytest.mark.parametrize("outcome", list(Outcome))
def test_every_member_gets_its_packs_outcome_in_order(outcome: Outcome) -> None:
    rig = _rig(max_messages=3)
    rig.publish("a", "b", "c", "d", "e", "f")
    settle = {
        Outcome.CONFIRMED: rig.inner.confirm,
        Outcome.NACKED: rig.inner.nack,
        Outcome.RETURNED: rig.inner.return_unroutable,
        Outcome.FAILED: lambda count: rig.inner.go_down(),
    }[outcome]
    if outcome is Outcome.FAILED:
        settle(None)
        expected = list("abcdef")
    else:
        settle(1)
        expected = list("abc")
    assert rig.outcomes == [(t, outcome) for t in expected]
    assert rig.packer.pending == 6 - len(expected)


def test_withdraw_returns_the_members_of_unsent_and_open_packs() -> None:
    rig = _rig(max_messages=2, max_delay=10)
    rig.publish(1, 2)  # sent, unconfirmed
    rig.inner.go_down()  # -> 1, 2 FAILED
    rig.publish(3, 4, 5)  # 3+4 queued in the wrapped publisher (down), 5 in the open pack
    assert rig.packer.pending == 3
    assert rig.packer.withdraw() == [3, 4, 5]
    assert rig.packer.pending == 0
    assert rig.outcomes == [(1, Outcome.FAILED), (2, Outcome.FAILED)]
    assert rig.packer.withdraw() == []


def test_close_sends_the_open_pack() -> None:
    rig = _rig(max_delay=10)
    rig.inner.auto_confirm = True
    rig.publish(1)
    rig.packer.close()
    assert rig.outcomes == [(1, Outcome.CONFIRMED)]


def test_properties_given_as_an_object_are_encoded() -> None:
    rig = _rig(max_messages=1)
    rig.packer.publish("iotpipe.dead", "bridge.invalid_json", b"x", MessageProperties(), "t")
    [[message]] = rig.packs()
    assert message.properties == encode_properties(MessageProperties())


# -- the bridge in packed mode, with in-memory transports -------------------------------------


@pytest.fixture
def packed(tmp_path: Path) -> Iterator[tuple[Bridge, MemorySubscriber, MemoryPublisher]]:
    """A running bridge whose publisher packs (3 messages, or 20 ms) into a MemoryPublisher."""
    inner = MemoryPublisher()
    settings = BridgeSettings(spool_path=tmp_path / "spool.db", spool_durability="process")
    bridge = Bridge(
        settings,
        subscriber=MemorySubscriber().bind,
        publisher=lambda on_result: PackingPublisher(
            inner.bind, on_result, max_messages=3, max_delay=0.02
        ),
        spool=Spool(settings.spool_path, durability="process"),
        serve_http=False,
    )
    thread = threading.Thread(target=bridge.run, name="test-bridge", daemon=True)
    thread.start()
    subscriber = bridge.mqtt
    assert isinstance(subscriber, MemorySubscriber)
    wait_for(lambda: subscriber.subscriptions, 5, "the bridge subscribed")
    try:
        yield bridge, subscriber, inner
    finally:
        bridge.stop()
        inner.auto_confirm = True
        inner.come_up()
        inner.confirm()
        thread.join(timeout=10)
        assert not thread.is_alive(), "bridge did not stop"


def _deliver(subscriber: MemorySubscriber, *seqs: int) -> list[int]:
    return [subscriber.deliver(TOPIC, envelope("s1", "d1", seq)) for seq in seqs]


def _seqs(inner: MemoryPublisher) -> list[list[int]]:
    return [
        [json.loads(m.body)["seq"] for m in pack.decode(p.body) if m.exchange != "iotpipe.dead"]
        for p in inner.messages
    ]


def test_packed_bridge_acks_a_packs_members_in_order_after_its_confirm(
    packed: tuple[Bridge, MemorySubscriber, MemoryPublisher],
) -> None:
    bridge, subscriber, inner = packed
    mids = _deliver(subscriber, 1, 2, 3, 4, 5)
    bad = subscriber.deliver(TOPIC, b"{not json")  # 6th: a dead letter, in the 2nd pack
    inner.wait_unconfirmed(2)  # 1-3 by count; 4, 5 and the dead letter by count too
    assert _seqs(inner) == [[1, 2, 3], [4, 5]]
    [dead] = [m for m in pack.decode(inner.messages[1].body) if m.exchange == "iotpipe.dead"]
    assert (dead.routing_key, dead.body) == ("bridge.bad_json", b"{not json")
    inner.confirm(1, skip=1)  # the second pack first: nothing may be acked yet
    subscriber.settle()
    assert subscriber.acked == []
    inner.confirm()
    assert subscriber.wait_acked(6) == [*mids, bad]
    registry = bridge.metrics.registry
    assert registry.get_sample_value("iotpipe_bridge_forwarded_total") == 5
    assert registry.get_sample_value("iotpipe_bridge_uplink_packs") == 2


def test_packed_bridge_sends_a_lone_message_after_max_delay(
    packed: tuple[Bridge, MemorySubscriber, MemoryPublisher],
) -> None:
    _bridge, subscriber, inner = packed
    [mid] = _deliver(subscriber, 1)
    inner.wait_unconfirmed(1)  # sent by the bridge loop's tick, not by count
    inner.confirm()
    assert subscriber.wait_acked(1) == [mid]


def test_packed_bridge_spools_a_failed_pack_and_drains_it_in_packs(
    packed: tuple[Bridge, MemorySubscriber, MemoryPublisher],
) -> None:
    bridge, subscriber, inner = packed
    mids = _deliver(subscriber, 1, 2, 3)
    inner.wait_unconfirmed(1)
    inner.go_down()  # the pack is FAILED: its members go to the spool and are acked
    assert subscriber.wait_acked(3) == mids
    assert bridge.spool.depth == 3
    more = _deliver(subscriber, 4)  # RabbitMQ away: spooled directly
    assert subscriber.wait_acked(4) == [*mids, *more]
    inner.come_up()
    inner.wait_unconfirmed(2)  # 1-3 by count, then 4 after max_delay
    inner.confirm()
    wait_for(lambda: bridge.spool.depth == 0, 5, "the spool drained")
    assert sorted(s for p in _seqs(inner)[1:] for s in p) == [1, 2, 3, 4]

"""PackingPublisher against the in-memory publisher: sealing, outcomes fanned out, withdraw."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

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
from iotpipe.testing import MemoryPublisher

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

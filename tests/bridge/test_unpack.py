"""The unpacker with in-memory clients: publish, confirm, record, ack; duplicates; bad packs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from bridge.settings import UnpackSettings
from bridge.unpack import BAD_PACK_KEY, PackIds, Unpacker
from bridge.uplink import pack_properties
from iotpipe.amqp import (
    DEAD_EXCHANGE,
    HEADER_ERROR,
    TELEMETRY_EXCHANGE,
    MessageProperties,
    encode_properties,
    encode_telemetry_properties,
)
from iotpipe.pack import PackedMessage, PackEncoder
from iotpipe.testing import MemoryPublisher, MemorySource
from tests.conftest import wait_for


def _message(seq: int, exchange: str = TELEMETRY_EXCHANGE) -> PackedMessage:
    properties = encode_telemetry_properties(
        message_id=f"s-d-{seq}",
        version="1.0",
        site="s",
        device="d",
        topic="iotpipe/v1/s/d/telemetry",
        kind="telemetry",
        received_at=1_795_680_902,
    )
    return PackedMessage(exchange, "iotpipe.v1.s.d.telemetry", properties, b'{"seq":%d}' % seq)


class Rig:
    def __init__(self, tmp_path: Path, *, auto_confirm: bool = True, **source: bool) -> None:
        self.source = MemorySource(**source)
        self.publisher = MemoryPublisher(auto_confirm=auto_confirm)
        self.ids = PackIds(tmp_path / "packs.db")
        self.unpacker = Unpacker(
            UnpackSettings(seen_path=tmp_path / "packs.db", http_port=0),
            source=self.source,
            publisher=self.publisher.bind,
            ids=self.ids,
            serve_http=False,
        )
        self.publisher.start()
        self.source.connect()

    def add(self, pack_id: str | None, messages: list[PackedMessage] | bytes) -> None:
        body = messages if isinstance(messages, bytes) else PackEncoder().encode(messages)
        self.source.add("iotpipe.uplink", body, message_id=pack_id, type="iotpipe.pack.v1")

    def handle_all(self) -> bool:
        return self.unpacker.handle(self.source.next_batch(100, 0))

    def sent(self) -> list[PackedMessage]:
        return [
            PackedMessage(m.exchange, m.routing_key, m.properties, m.body)  # type: ignore[arg-type]
            for m in self.publisher.messages
        ]

    def count(self, outcome: str) -> float:
        return self.unpacker.metrics.packs.labels(outcome)._value.get()


def test_every_message_is_published_as_packed_then_the_pack_is_recorded_and_acked(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path)
    first, second = [_message(i) for i in range(3)], [_message(i) for i in range(3, 5)]
    rig.add("p1", first)
    rig.add("p2", second)
    assert rig.handle_all()
    assert rig.sent() == first + second
    assert rig.source.acked == [1, 2]
    assert rig.ids.known("p1")
    assert rig.ids.known("p2")
    assert rig.count("unpacked") == 2


def test_a_pack_id_seen_before_is_acked_without_publishing(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    pack = [_message(1), _message(2)]
    rig.add("p1", pack)
    rig.add("p1", pack)  # the same pack twice in one batch
    assert rig.handle_all()
    rig.add("p1", pack)  # and again later
    assert rig.handle_all()
    assert rig.sent() == pack
    assert rig.source.acked == [1, 2, 3]
    assert rig.count("duplicate") == 2


def test_ids_survive_a_restart(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.add("p1", [_message(1)])
    assert rig.handle_all()
    rig.ids.close()
    again = PackIds(tmp_path / "packs.db")
    assert again.known("p1")
    assert not again.known("p2")


def test_only_the_newest_ids_are_kept(tmp_path: Path) -> None:
    ids = PackIds(tmp_path / "packs.db", keep=100)
    for n in range(300):
        ids.add([f"p{n}"])
    assert len(ids) <= 200
    assert ids.known("p299")
    assert not ids.known("p0")


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        pytest.param(b"IPAK\x01garbage", "cannot fit", id="garbage"),
        pytest.param(
            PackEncoder().encode([_message(1), _message(2, exchange="amq.topic")]),
            "message 1",
            id="foreign-exchange",
        ),
        pytest.param(
            PackEncoder().encode(
                [PackedMessage(TELEMETRY_EXCHANGE, "k", _message(1).properties + b"\0", b"x")]
            ),
            "canonical",
            id="trailing-property-bytes",
        ),
        pytest.param(
            PackEncoder().encode([PackedMessage(TELEMETRY_EXCHANGE, "k", b"\xff", b"x")]),
            "bad properties",
            id="bad-properties",
        ),
    ],
)
def test_a_bad_pack_is_dead_lettered_with_the_reason_and_nothing_published(
    tmp_path: Path, body: bytes, reason: str
) -> None:
    rig = Rig(tmp_path)
    rig.add("bad", body)
    rig.add("good", [_message(7)])
    assert rig.handle_all()
    assert rig.sent() == [_message(7)]
    [dead] = rig.source.published
    assert (dead.exchange, dead.routing_key, dead.body) == (DEAD_EXCHANGE, BAD_PACK_KEY, body)
    assert isinstance(dead.properties, MessageProperties)
    assert dead.properties.message_id == "bad"
    assert dead.properties.headers is not None
    assert reason in dead.properties.headers[HEADER_ERROR]
    assert sorted(rig.source.acked) == [1, 2]
    assert not rig.ids.known("bad")
    assert rig.count("bad") == 1


def test_a_bad_pack_whose_dead_letter_fails_is_requeued(tmp_path: Path) -> None:
    rig = Rig(tmp_path, publishes_confirmed=False)
    rig.add("bad", b"nonsense")
    assert rig.handle_all()
    assert rig.source.requeued == [1]
    assert rig.source.acked == []


def test_messages_rabbitmq_did_not_take_are_published_again_before_the_ack(
    tmp_path: Path,
) -> None:
    rig = Rig(tmp_path, auto_confirm=False)
    pack = [_message(i) for i in range(4)]
    rig.add("p1", pack)
    batch = rig.source.next_batch(10, 0)
    done: list[bool] = []
    worker = threading.Thread(target=lambda: done.append(rig.unpacker.handle(batch)))
    worker.start()
    try:
        wait_for(lambda: len(rig.publisher.unconfirmed) == 4, 5, "4 published")
        rig.publisher.return_unroutable(1, skip=1)  # the 2nd: no queue bound
        rig.publisher.nack(1, skip=2)  # the 4th
        rig.publisher.confirm(2)  # the 1st and 3rd
        wait_for(lambda: len(rig.publisher.unconfirmed) == 2, 5, "2 published again")
        assert rig.source.acked == []
        assert not rig.ids.known("p1")
        rig.publisher.confirm()
    finally:
        worker.join(timeout=10)
    assert done == [True]
    assert rig.sent() == [*pack, pack[1], pack[3]]
    assert rig.source.acked == [1]
    assert rig.ids.known("p1")


def test_stopping_with_messages_unconfirmed_acks_and_records_nothing(tmp_path: Path) -> None:
    rig = Rig(tmp_path, auto_confirm=False)
    rig.add("p1", [_message(1), _message(2)])
    batch = rig.source.next_batch(10, 0)
    done: list[bool] = []
    worker = threading.Thread(target=lambda: done.append(rig.unpacker.handle(batch)))
    worker.start()
    wait_for(lambda: len(rig.publisher.unconfirmed) == 2, 5, "published")
    rig.publisher.confirm(1)
    rig.unpacker.stop()
    worker.join(timeout=10)
    assert done == [False]
    assert rig.source.acked == []
    assert not rig.ids.known("p1")


def test_pack_properties_are_what_the_bridge_sends(tmp_path: Path) -> None:
    del tmp_path
    encoded = pack_properties("id-1", 3, 1_795_680_902.5)
    assert encoded == encode_properties(
        MessageProperties(
            message_id="id-1",
            content_type="application/vnd.iotpipe.pack",
            type="iotpipe.pack.v1",
            timestamp=1_795_680_902,
            app_id="iotpipe-bridge",
            headers={"x-iotpipe-version": "1.2", "x-iotpipe-pack-count": "3"},
        )
    )

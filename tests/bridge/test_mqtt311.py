"""The embedded broker keeps MQTT 3.1.1's promises: one test per normative statement.

Each test is named after the statement of the OASIS MQTT 3.1.1 standard it checks, and talks to
``iotpipe broker`` (amqtt with :mod:`bridge.mqtt311`) over a real socket, either with paho or,
where the test must see packet ids and flags or must stop acknowledging half-way through a flow,
with :class:`RawClient`, a few lines of MQTT framing. ``docs/broker.md`` maps each amqtt 0.12
deviation to the test here that proves it corrected.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from bridge.broker import BrokerThread
from bridge.mqtt311 import Mqtt311Handler
from tests.bridge.conftest import StartBroker, password_of
from tests.conftest import wait_for

pytestmark = pytest.mark.mqtt

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, DISCONNECT = 8, 9, 14


@dataclass(frozen=True)
class Packet:
    """One MQTT control packet as read off the socket."""

    kind: int
    flags: int
    body: bytes

    @property
    def packet_id(self) -> int:
        """The packet identifier of a PUBACK/PUBREC/PUBREL/PUBCOMP/SUBACK."""
        return int(struct.unpack("!H", self.body[:2])[0])

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)

    @property
    def qos(self) -> int:
        return (self.flags >> 1) & 0x03

    @property
    def retain(self) -> bool:
        return bool(self.flags & 0x01)

    def publish(self) -> tuple[str, int | None, bytes]:
        """(topic, packet id or None for QoS 0, payload) of a PUBLISH."""
        (length,) = struct.unpack("!H", self.body[:2])
        topic = self.body[2 : 2 + length].decode()
        rest = self.body[2 + length :]
        if self.qos == 0:
            return topic, None, rest
        return topic, int(struct.unpack("!H", rest[:2])[0]), rest[2:]


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(raw)) + raw


def _frame(kind: int, flags: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([kind << 4 | flags]) + bytes(encoded) + body


class RawClient:
    """An MQTT 3.1.1 client that does exactly what the test says, and nothing on its own."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._buffer = b""

    def connect(
        self,
        client_id: str,
        *,
        clean: bool = True,
        keepalive: int = 60,
        will: str | None = None,
        login: tuple[str, str] | None = None,
    ) -> bool:
        """Send CONNECT (optionally with a QoS 1 will on topic ``will``); return session_present."""
        flags = (0x02 if clean else 0) | (0x04 | 0x08 if will else 0) | (0xC0 if login else 0)
        body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
        body += _string(client_id)
        if will:
            body += _string(will) + _string(b"gone")
        if login:
            body += _string(login[0]) + _string(login[1])
        self.send(CONNECT, 0, body)
        connack = self.expect(CONNACK)
        assert connack.body[1] == 0, f"CONNACK return code {connack.body[1]}"
        return bool(connack.body[0] & 0x01)

    def subscribe(self, *filters: tuple[str, int], packet_id: int = 1) -> list[int]:
        """SUBSCRIBE and return the granted QoS codes."""
        body = struct.pack("!H", packet_id) + b"".join(_string(f) + bytes([q]) for f, q in filters)
        self.send(SUBSCRIBE, 0x02, body)
        return list(self.expect(SUBACK).body[2:])

    def publish(self, topic: str, payload: bytes, qos: int, packet_id: int = 0) -> None:
        """Send a PUBLISH (no waiting for its acknowledgement)."""
        body = _string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
        self.send(PUBLISH, qos << 1, body)

    def ack(self, kind: int, packet_id: int) -> None:
        """Send PUBACK, PUBREC, PUBREL or PUBCOMP for ``packet_id``."""
        self.send(kind, 0x02 if kind == PUBREL else 0, struct.pack("!H", packet_id))

    def send(self, kind: int, flags: int, body: bytes) -> None:
        self.sock.sendall(_frame(kind, flags, body))

    def read(self, timeout: float = 10.0) -> Packet | None:
        """The next packet, or None at end of file."""
        self.sock.settimeout(timeout)
        while True:
            packet = self._parse()
            if packet is not None:
                return packet
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buffer += chunk

    def quiet_for(self, seconds: float) -> bool:
        """True if nothing arrives and the connection stays open for ``seconds``."""
        if self._buffer:
            return False
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(1, socket.MSG_PEEK)  # data or end of file: not quiet
        except TimeoutError:
            return True
        return False

    def expect(self, kind: int, timeout: float = 10.0) -> Packet:
        packet = self.read(timeout)
        assert packet is not None, f"connection closed, expected packet type {kind}"
        assert packet.kind == kind, f"expected packet type {kind}, got {packet}"
        return packet

    def _parse(self) -> Packet | None:
        data = self._buffer
        multiplier, length, index = 1, 0, 1
        while True:
            if index >= len(data):
                return None
            byte = data[index]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            index += 1
            if not byte & 0x80:
                break
        if len(data) < index + length:
            return None
        self._buffer = data[index + length :]
        return Packet(data[0] >> 4, data[0] & 0x0F, data[index : index + length])

    def drop(self) -> None:
        """Vanish without DISCONNECT, as a device losing power does."""
        self.sock.close()

    def disconnect(self) -> None:
        self.send(DISCONNECT, 0, b"")
        self.sock.close()


class PahoClient:
    """A paho client on its own network thread that records what it receives."""

    def __init__(self, port: int, client_id: str, *, clean: bool = True) -> None:
        self.messages: list[paho.MQTTMessage] = []
        self.granted: list[list[int]] = []
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean,
        )
        self.client.on_message = lambda _c, _u, message: self.messages.append(message)
        self.client.on_subscribe = lambda _c, _u, _mid, codes, _p: self.granted.append(
            [code.value for code in codes]
        )
        connected: list[bool] = []
        self.client.on_connect = lambda _c, _u, flags, _rc, _p: connected.append(
            flags.session_present
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        wait_for(lambda: connected, what="CONNACK")

    def subscribe(self, *filters: tuple[str, int]) -> list[int]:
        before = len(self.granted)
        self.client.subscribe(list(filters))
        wait_for(lambda: len(self.granted) > before, what="SUBACK")
        return self.granted[-1]

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos, retain=retain).wait_for_publish(timeout=10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(start_broker: StartBroker) -> BrokerThread:
    return start_broker()


@pytest.fixture
def raw(broker: BrokerThread) -> Iterator[list[RawClient]]:
    """Raw clients opened by a test; closed after it."""
    opened: list[RawClient] = []
    yield opened
    for client in opened:
        client.sock.close()


@pytest.fixture
def pahos() -> Iterator[list[PahoClient]]:
    opened: list[PahoClient] = []
    yield opened
    for client in opened:
        client.close()


def _raw(broker: BrokerThread, opened: list[RawClient]) -> RawClient:
    client = RawClient(broker.settings.port)
    opened.append(client)
    return client


def _queued(broker: BrokerThread, client_id: str) -> int:
    count: int = broker.call(lambda b: b.queued_messages(client_id))
    return count


def _inflight(broker: BrokerThread, client_id: str) -> int:
    count: int = broker.call(lambda b: b.inflight_messages(client_id))
    return count


def _paho(broker: BrokerThread, opened: list[PahoClient], client_id: str) -> PahoClient:
    client = PahoClient(broker.settings.port, client_id)
    opened.append(client)
    return client


# -- keep alive -------------------------------------------------------------------------------


def test_mqtt_3_1_2_24_a_silent_client_is_disconnected_and_its_will_published(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """MQTT-3.1.2-24: no packet for 1.5x the keep-alive: the server disconnects, as for a failure."""
    watcher = _paho(broker, pahos, f"watch-{unique}")
    watcher.subscribe((f"will/{unique}", 1))
    before = Mqtt311Handler.keepalive_timeouts
    silent = _raw(broker, raw)
    silent.connect(f"silent-{unique}", keepalive=1, will=f"will/{unique}")
    started = time.monotonic()
    assert silent.read(timeout=10) is None, "the broker should close the connection"
    closed_after = time.monotonic() - started
    wait_for(lambda: watcher.messages, what="the will message")
    assert watcher.messages[0].payload == b"gone"
    assert Mqtt311Handler.keepalive_timeouts == before + 1
    assert closed_after >= 1.0, f"closed after {closed_after:.2f} s, before the keep-alive ran out"


def test_mqtt_3_1_2_24_a_client_that_pings_stays_connected(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """A client sending PINGREQ within its keep-alive is kept, however long it is otherwise idle."""
    watcher = _paho(broker, pahos, f"watch-{unique}")
    watcher.subscribe((f"will/{unique}/#", 1))
    pinging = _raw(broker, raw)
    pinging.connect(f"pinging-{unique}", keepalive=1, will=f"will/{unique}/pinging")
    for _ in range(4):  # four keep-alive periods: twice the grace
        pinging.send(12, 0, b"")  # PINGREQ
        assert pinging.expect(13).kind == 13  # PINGRESP
        assert pinging.quiet_for(0.5), "closed within half a keep-alive of silence"
    pinging.disconnect()
    watcher.publish(f"will/{unique}/marker", b"m", 1)
    wait_for(lambda: watcher.messages, what="the marker")
    assert [m.topic for m in watcher.messages] == [f"will/{unique}/marker"], "the will was sent"


# -- redelivery -------------------------------------------------------------------------------


def test_mqtt_4_4_0_1_unacknowledged_qos1_messages_are_resent_with_dup_after_reconnect(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """MQTT-4.4.0-1: on reconnect (clean session 0) unacknowledged PUBLISHes are resent, same ids.

    Messages queued while the client was away follow the resent ones, in publish order.
    """
    topic = f"t/{unique}"
    sub = _raw(broker, raw)
    sub.connect(f"sub-{unique}", clean=False)
    assert sub.subscribe((topic, 1)) == [1]
    pub = _paho(broker, pahos, f"pub-{unique}")
    for i in range(3):
        pub.publish(topic, f"{i}".encode(), 1)
    first = [sub.expect(PUBLISH) for _ in range(3)]
    assert [p.publish()[2] for p in first] == [b"0", b"1", b"2"]
    assert not any(p.dup for p in first)
    sub.drop()  # none acknowledged
    for i in range(3, 5):
        pub.publish(topic, f"{i}".encode(), 1)
    wait_for(lambda: _queued(broker, f"sub-{unique}") == 2, what="2 queued")

    back = _raw(broker, raw)
    assert back.connect(f"sub-{unique}", clean=False) is True
    again = [back.expect(PUBLISH) for _ in range(5)]
    assert [p.publish()[2] for p in again] == [b"0", b"1", b"2", b"3", b"4"]
    assert [p.dup for p in again] == [True, True, True, False, False]
    assert [p.publish()[1] for p in again[:3]] == [p.publish()[1] for p in first]
    for packet in again:
        back.ack(PUBACK, packet.publish()[1] or 0)
    back.disconnect()
    third = _raw(broker, raw)
    assert third.connect(f"sub-{unique}", clean=False) is True
    pub.publish(topic, b"marker", 1)
    assert third.expect(PUBLISH).publish()[2] == b"marker", "acknowledged messages came back"


def test_mqtt_4_4_0_1_a_qos1_delivery_waits_for_its_puback_beyond_5_seconds(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """amqtt dropped a QoS 1 delivery after 5 s without PUBACK; the standard has no such limit."""
    topic = f"t/{unique}"
    sub = _raw(broker, raw)
    sub.connect(f"slow-{unique}", clean=False)
    sub.subscribe((topic, 1))
    _paho(broker, pahos, f"pub-{unique}").publish(topic, b"slow", 1)
    packet = sub.expect(PUBLISH)
    # A subscriber slower than amqtt's 5 s: nothing is resent or dropped meanwhile.
    assert sub.quiet_for(6), "the broker closed the connection or sent again"
    assert _inflight(broker, f"slow-{unique}") == 1
    sub.drop()
    back = _raw(broker, raw)
    back.connect(f"slow-{unique}", clean=False)
    resent = back.expect(PUBLISH)
    assert resent.dup
    assert resent.publish()[1:] == packet.publish()[1:]


def test_mqtt_4_4_0_1_qos2_resends_publish_before_pubrec_and_pubrel_after_it(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """MQTT-4.4.0-1 for QoS 2: a PUBLISH not yet PUBRECed is resent; after PUBREC, the PUBREL."""
    topic = f"t/{unique}"
    sub = _raw(broker, raw)
    sub.connect(f"q2-{unique}", clean=False)
    sub.subscribe((topic, 2))
    pub = _paho(broker, pahos, f"pub-{unique}")
    pub.publish(topic, b"a", 2)
    pub.publish(topic, b"b", 2)
    a, b = sub.expect(PUBLISH), sub.expect(PUBLISH)
    sub.ack(PUBREC, a.publish()[1] or 0)  # "a" received, "b" not
    assert sub.expect(PUBREL).packet_id == a.publish()[1]
    sub.drop()

    back = _raw(broker, raw)
    back.connect(f"q2-{unique}", clean=False)
    first, second = back.read(), back.read()
    assert first is not None
    assert second is not None
    assert (first.kind, first.packet_id) == (PUBREL, a.publish()[1])
    assert second.kind == PUBLISH
    assert second.dup
    assert second.publish()[1:] == b.publish()[1:]
    back.ack(PUBCOMP, a.publish()[1] or 0)
    back.ack(PUBREC, b.publish()[1] or 0)
    assert back.expect(PUBREL).packet_id == b.publish()[1]
    back.ack(PUBCOMP, b.publish()[1] or 0)
    wait_for(lambda: _inflight(broker, f"q2-{unique}") == 0, what="no message in flight")


def test_mqtt_4_3_3_a_pubrel_on_a_new_connection_completes_the_incoming_qos2_message(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """A publisher that got PUBREC, lost its connection and resends PUBREL gets PUBCOMP.

    The message is delivered exactly once (amqtt ignored a PUBREL it was not waiting for on the
    current connection, so the publisher retried forever).
    """
    topic = f"t/{unique}"
    watcher = _paho(broker, pahos, f"watch-{unique}")
    watcher.subscribe((topic, 2))
    pub = _raw(broker, raw)
    pub.connect(f"q2pub-{unique}", clean=False)
    pub.publish(topic, b"once", 2, packet_id=7)
    assert pub.expect(PUBREC).packet_id == 7
    pub.drop()
    back = _raw(broker, raw)
    assert back.connect(f"q2pub-{unique}", clean=False) is True
    back.ack(PUBREL, 7)
    assert back.expect(PUBCOMP).packet_id == 7
    wait_for(lambda: watcher.messages, what="the QoS 2 message")
    watcher.publish(f"{topic}/marker", b"", 0)  # anything later proves nothing else is coming
    assert [m.payload for m in watcher.messages] == [b"once"]


# -- offline queueing -------------------------------------------------------------------------


def test_mqtt_3_1_2_5_qos1_and_qos2_messages_are_queued_for_an_absent_session(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """MQTT-3.1.2-5: QoS 1 and 2 messages published while a persistent client is away are kept.

    QoS 0 ones are not (the standard allows either; a QoS 0 publish is delivered at QoS 0).
    """
    topic = f"t/{unique}"
    away = _raw(broker, raw)
    away.connect(f"away-{unique}", clean=False)
    away.subscribe((topic, 2))
    away.disconnect()
    pub = _paho(broker, pahos, f"pub-{unique}")
    for qos in (0, 1, 2):
        pub.publish(topic, f"qos {qos}".encode(), qos)
    wait_for(lambda: _queued(broker, f"away-{unique}") == 2, what="2 queued")
    back = _raw(broker, raw)
    assert back.connect(f"away-{unique}", clean=False) is True
    got = [back.expect(PUBLISH) for _ in range(2)]
    assert [(p.publish()[2], p.qos) for p in got] == [(b"qos 1", 1), (b"qos 2", 2)]


def test_mqtt_3_3_1_9_queued_messages_arrive_with_retain_0(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """MQTT-3.3.1-9: a message sent for an established subscription has RETAIN 0 (amqtt: 1)."""
    topic = f"t/{unique}"
    away = _raw(broker, raw)
    away.connect(f"away-{unique}", clean=False)
    away.subscribe((topic, 1))
    away.disconnect()
    _paho(broker, pahos, f"pub-{unique}").publish(topic, b"queued", 1)
    wait_for(lambda: _queued(broker, f"away-{unique}") == 1, what="1 queued")
    back = _raw(broker, raw)
    back.connect(f"away-{unique}", clean=False)
    queued = back.expect(PUBLISH)
    assert queued.publish()[2] == b"queued"
    assert not queued.retain


# -- retained messages ------------------------------------------------------------------------


def test_mqtt_3_3_1_10_and_11_a_zero_byte_retained_publish_deletes_and_is_not_stored(
    broker: BrokerThread, pahos: list[PahoClient], unique: str
) -> None:
    """MQTT-3.3.1-10/11: an empty retained PUBLISH removes the retained message, at any QoS."""
    pub = _paho(broker, pahos, f"pub-{unique}")
    for qos in (0, 1, 2):
        pub.publish(f"r/{unique}/{qos}", b"value", qos, retain=True)
    wait_for(lambda: broker.stats.retained == 3, what="3 retained")
    for qos in (0, 1, 2):
        pub.publish(f"r/{unique}/{qos}", b"", qos, retain=True)
    wait_for(lambda: broker.stats.retained == 0, what="retained messages deleted")
    late = _paho(broker, pahos, f"late-{unique}")
    late.subscribe((f"r/{unique}/#", 2))
    pub.publish(f"r/{unique}/marker", b"m", 1)
    wait_for(lambda: late.messages, what="the marker")
    assert [(m.topic, m.payload) for m in late.messages] == [(f"r/{unique}/marker", b"m")]


def test_mqtt_3_3_1_6_retained_messages_come_with_a_new_subscription_only(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """MQTT-3.3.1-6: retained messages are sent when a subscription is made, not at every CONNECT.

    amqtt sent every connecting client the retained messages matching any client's filters.
    """
    pub = _paho(broker, pahos, f"pub-{unique}")
    pub.publish(f"r/{unique}/a", b"kept", 1, retain=True)
    other = _paho(broker, pahos, f"other-{unique}")
    other.subscribe(("r/#", 1))  # someone else's filter matching the retained message
    wait_for(lambda: other.messages, what="the retained message for the subscriber")

    sub = _raw(broker, raw)
    sub.connect(f"sub-{unique}", clean=False)
    sub.subscribe((f"r/{unique}/#", 1))
    retained = sub.expect(PUBLISH)
    assert retained.retain
    assert retained.publish()[2] == b"kept"
    sub.ack(PUBACK, retained.publish()[1] or 0)
    sub.disconnect()

    again = _raw(broker, raw)
    assert again.connect(f"sub-{unique}", clean=False) is True
    pub.publish(f"r/{unique}/a", b"live", 1)
    live = again.expect(PUBLISH)  # the live message first: no retained replay before it
    assert (live.publish()[2], live.retain) == (b"live", False)

    fresh = _raw(broker, raw)
    fresh.connect(f"fresh-{unique}")
    fresh.subscribe((f"m/{unique}", 1))
    pub.publish(f"m/{unique}", b"marker", 1)
    assert fresh.expect(PUBLISH).publish()[2] == b"marker", "retained messages sent at CONNECT"


# -- QoS of a delivery ------------------------------------------------------------------------


def test_mqtt_3_3_5_1_overlapping_subscriptions_get_one_copy_at_the_highest_qos(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """MQTT-3.3.5-1: one message, at the maximum QoS of all the client's matching subscriptions."""
    sub = _raw(broker, raw)
    sub.connect(f"sub-{unique}")
    assert sub.subscribe((f"o/{unique}/+", 1), (f"o/{unique}/#", 2), (f"o/{unique}/x", 0)) == [
        1,
        2,
        0,
    ]
    _paho(broker, pahos, f"pub-{unique}").publish(f"o/{unique}/x", b"one", 2)
    only = sub.expect(PUBLISH)
    assert (only.qos, only.publish()[2]) == (2, b"one")
    sub.ack(PUBREC, only.publish()[1] or 0)
    assert sub.expect(PUBREL)
    sub.ack(PUBCOMP, only.publish()[1] or 0)
    _paho(broker, pahos, f"pub2-{unique}").publish(f"o/{unique}/y", b"marker", 0)
    assert sub.expect(PUBLISH).publish()[2] == b"marker", "a second copy was delivered"


def test_mqtt_3_8_4_6_delivery_qos_is_the_lower_of_publish_and_subscription(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """A QoS 0 publish reaches a QoS 2 subscriber at QoS 0; a QoS 2 one a QoS 1 subscriber at 1."""
    sub = _raw(broker, raw)
    sub.connect(f"sub-{unique}")
    sub.subscribe((f"q/{unique}/high", 2), (f"q/{unique}/low", 1))
    pub = _paho(broker, pahos, f"pub-{unique}")
    pub.publish(f"q/{unique}/high", b"zero", 0)
    assert sub.expect(PUBLISH).qos == 0
    pub.publish(f"q/{unique}/low", b"two", 2)
    assert sub.expect(PUBLISH).qos == 1


# -- publish, then DISCONNECT -----------------------------------------------------------------


def test_mqtt_3_14_4_messages_published_before_disconnect_are_delivered(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """A client that publishes and disconnects in one write (as ``mosquitto_pub`` does) is heard.

    amqtt could cancel the unstarted handling of those PUBLISHes, or end the session before
    forwarding what it had already acknowledged (MQTT-3.14.4: the DISCONNECT comes after them).
    """
    topic = f"t/{unique}"
    watcher = _paho(broker, pahos, f"watch-{unique}")
    watcher.subscribe((topic, 1))
    for attempt in range(20):
        pub = _raw(broker, raw)
        pub.connect(f"burst-{unique}")
        burst = b"".join(
            _frame(PUBLISH, qos << 1, _string(topic) + (b"\x00\x01" if qos else b"") + payload)
            for qos, payload in ((0, f"{attempt}-0".encode()), (1, f"{attempt}-1".encode()))
        )
        pub.sock.sendall(burst + _frame(DISCONNECT, 0, b""))
        pub.sock.close()
    expected = [f"{attempt}-{qos}".encode() for attempt in range(20) for qos in (0, 1)]
    wait_for(lambda: len(watcher.messages) >= len(expected), what="every message")
    assert sorted(m.payload for m in watcher.messages) == sorted(expected)


def test_mqtt_3_1_4_2_a_client_reconnecting_at_once_keeps_receiving(
    broker: BrokerThread, raw: list[RawClient], pahos: list[PahoClient], unique: str
) -> None:
    """MQTT-3.1.4-2: a new connection with the same client id takes the session over, live.

    amqtt marked the session offline when it finished with the old connection, after the new
    one had started, and queued the new connection's messages instead of sending them.
    """
    topic = f"t/{unique}"
    pub = _paho(broker, pahos, f"pub-{unique}")
    for attempt in range(10):
        old = _raw(broker, raw)
        old.connect(f"quick-{unique}", clean=False)
        old.subscribe((topic, 1))
        new = _raw(broker, raw)  # before the broker has seen the old connection end
        new.connect(f"quick-{unique}", clean=False)
        pub.publish(topic, f"{attempt}".encode(), 1)
        live = new.expect(PUBLISH)
        assert live.publish()[2] == f"{attempt}".encode()
        new.ack(PUBACK, live.publish()[1] or 0)
        new.disconnect()
        old.sock.close()


def test_mqtt_3_9_3_a_subscription_the_acl_denies_gets_return_code_0x80(
    secured_broker: BrokerThread, raw: list[RawClient]
) -> None:
    """MQTT-3.9.3: the SUBACK carries 0x80 (failure) for a filter the ACL denies, the rest granted.

    (The interoperability suite's "subscribe failure" test needs exactly this: a denied filter.)
    """
    bridge = _raw(secured_broker, raw)
    bridge.connect("acl-bridge", login=("bridge", password_of("bridge")))
    assert bridge.subscribe(("iotpipe/v1/+/+/telemetry", 1), ("secrets/#", 1)) == [1, 0x80]
    device = _raw(secured_broker, raw)
    device.connect("acl-device", login=("home/dev1", password_of("home/dev1")))
    assert device.subscribe(("iotpipe/#", 1)) == [0x80]

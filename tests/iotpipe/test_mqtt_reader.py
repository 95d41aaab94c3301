"""iotpipe.mqtt's own PUBLISH reader delivers exactly what paho's reader delivers, from any bytes."""

from __future__ import annotations

import itertools
import socket
import struct
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotpipe import compat
from iotpipe.mqtt import Message, MqttClient, _BufferedSocket, _parse_publish
from iotpipe.settings import MqttSettings

PINGRESP = b"\xd0\x00"


def remaining_length(size: int) -> bytes:
    """MQTT's variable-length encoding of ``size``."""
    out = bytearray()
    while True:
        byte, size = size % 128, size // 128
        out.append(byte | (0x80 if size else 0))
        if not size:
            return bytes(out)


def publish(
    topic: bytes,
    payload: bytes,
    qos: int = 1,
    mid: int = 1,
    *,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    """One PUBLISH packet as a broker sends it."""
    body = (
        struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + payload
    )
    command = 0x30 | qos << 1 | (0x08 if dup else 0) | (0x01 if retain else 0)
    return bytes([command]) + remaining_length(len(body)) + body


@dataclass
class Received:
    """What a client made of a stream: messages, bytes it wrote back, how reading ended."""

    messages: list[Message]
    written: bytes
    ended: str


def receive(chunks: list[bytes], *, read_ahead: bool, manual_ack: bool = True) -> Received:
    """Feed ``chunks`` to a client one by one (reading after each); what it made of them."""
    ours, peer = socket.socketpair()
    with ours, peer:
        ours.setblocking(False)
        peer.setblocking(False)
        got: list[Message] = []
        client = MqttClient(
            MqttSettings(), client_id="reader", manual_ack=manual_ack, on_message=got.append
        )
        client._client._sock = _BufferedSocket(ours)  # as connect() installs it
        client._read_ahead = read_ahead and compat.paho_can_read_ahead(client._client)
        assert client._read_ahead == read_ahead
        ended = "ok"
        for chunk in chunks:
            peer.sendall(chunk)
            try:
                rc = client._loop(0)
            except Exception as err:  # an error must be the same error on both paths
                ended = f"{type(err).__name__}: {err}"
                break
            if rc != 0:
                ended = f"rc {rc}"
                break
        written = b""
        while True:
            try:
                chunk = peer.recv(65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            written += chunk
        return Received(got, written, ended)


def both(chunks: list[bytes], *, manual_ack: bool = True) -> tuple[Received, Received]:
    """The stream read by iotpipe's reader and by paho's alone."""
    return (
        receive(chunks, read_ahead=True, manual_ack=manual_ack),
        receive(chunks, read_ahead=False, manual_ack=manual_ack),
    )


topics = st.one_of(
    st.text(min_size=1, max_size=40).map(str.encode),
    st.sampled_from([b"iotpipe/v1/s/d/telemetry", b"", b"\xff\xfe", b"a/\xed\xa0\x80"]),
)
packets = st.one_of(
    st.builds(
        publish,
        topics,
        st.one_of(st.binary(max_size=300), st.binary(min_size=16_000, max_size=17_000)),
        st.integers(0, 2),
        st.integers(0, 65535),
        retain=st.booleans(),
        dup=st.booleans(),
    ),
    st.just(PINGRESP),
    st.sampled_from(
        [
            b"\x32\x01\x00",  # too short for a topic length
            b"\x32\x04\x00\x05ab",  # topic longer than the packet
            b"\x32\x03\x00\x01a",  # QoS 1 without a packet id
            b"\x36\x05\x00\x01aXY",  # QoS 3
            b"\x30\xff\xff\xff\xff\x01",  # remaining length over 4 bytes
        ]
    ),
)


@st.composite
def streams(draw: st.DrawFn) -> list[bytes]:
    """Packets back to back, cut into chunks at arbitrary places."""
    data = b"".join(draw(st.lists(packets, min_size=1, max_size=30)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@settings(max_examples=300, deadline=None)
@given(streams(), st.booleans())
def test_the_reader_delivers_what_paho_delivers(chunks: list[bytes], manual_ack: bool) -> None:
    """Any stream, cut anywhere: the same messages, the same bytes written back, the same end."""
    ours, pahos = both(chunks, manual_ack=manual_ack)
    assert ours == pahos


def test_the_reader_takes_the_packets_paho_leaves_in_the_buffer() -> None:
    """After paho read a burst's first packet, the reader takes the rest, paho's clock kept."""
    stream = b"".join(
        publish(b"iotpipe/v1/s/d/telemetry", b"%d" % i, qos=i % 2, mid=i + 1, retain=i == 3)
        for i in range(50)
    )
    ours, pahos = both([stream[:100], stream[100:]])
    assert ours == pahos
    assert [int(m.payload) for m in ours.messages] == list(range(50))
    assert ours.messages[3].retain
    assert ours.messages[1].mid == 2


ODD_PACKETS = [
    PINGRESP,
    publish(b"t", b"x", qos=2),
    publish(b"", b"x", qos=0),
    publish(b"\xff", b"x", qos=1),
    publish(b"a/\xed\xa0\x80", b"x", qos=1),
    publish(b"t", b"x" * 20_000, qos=1),
    publish(b"t", b"", qos=1, retain=True, dup=True),
    b"\x32\x01\x00",
    b"\x32\x04\x00\x05ab",
    b"\x32\x03\x00\x01a",
    b"\x36\x05\x00\x01aXY",
    b"\x30\xff\xff\xff\xff\x01",
]


@pytest.mark.parametrize("odd", ODD_PACKETS)
@pytest.mark.parametrize("manual_ack", [True, False])
def test_the_reader_agrees_on_each_odd_packet_amid_others(odd: bytes, manual_ack: bool) -> None:
    """An unusual or malformed packet between ordinary ones ends or passes the same way."""
    before = publish(b"t", b"before", qos=1, mid=7)
    after = publish(b"t", b"after", qos=0)
    for chunks in (
        [before + odd + after],
        [before, odd + after],
        [before + odd[:2], odd[2:] + after],
    ):
        ours, pahos = both([c for c in chunks if c], manual_ack=manual_ack)
        assert ours == pahos


@pytest.mark.parametrize(
    "data",
    [
        PINGRESP,
        publish(b"t", b"x", qos=2),
        publish(b"t", b"x", qos=1)[:-1],
        publish(b"", b"x", qos=0),
        publish(b"\xff", b"x", qos=0),
    ],
)
def test_the_reader_leaves_everything_else_to_paho(data: bytes) -> None:
    """Other packets, partial ones, QoS 2 and what paho refuses or words are not parsed here."""
    assert _parse_publish(data, 0, len(data), True) is None


def test_the_reader_keeps_pahos_keepalive_clock() -> None:
    """Reading packets sets the time paho's keepalive check compares with, as paho's reader does."""
    ours, peer = socket.socketpair()
    with ours, peer:
        ours.setblocking(False)
        client = MqttClient(MqttSettings(), client_id="clock", manual_ack=True)
        client._client._sock = buffered = _BufferedSocket(ours)
        client._read_ahead = True
        peer.sendall(b"".join(publish(b"t", b"%d" % i, mid=i + 1) for i in range(3)))
        assert buffered.recv(1)  # as paho's first read of a burst: the rest is buffered
        buffered.skip_to(0)
        client._client._last_bytes_received = 0.0
        assert client._read_publishes(client._client, buffered)
        assert client._client._last_bytes_received > 0.0

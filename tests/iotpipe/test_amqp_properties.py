"""Encoded properties and publish frames: the bridge's per-message path agrees with pika's."""

from __future__ import annotations

from typing import Any

import pika.connection
import pika.exceptions
import pika.spec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotpipe import amqp
from iotpipe.amqp import (
    MessageProperties,
    _pika_properties,
    dead_letter_properties,
    decode_properties,
    encode_properties,
    encode_telemetry_properties,
    telemetry_properties,
)
from iotpipe.topics import Kind
from tests.strategies import message_ids, names, versions


def outcome(make: Any) -> tuple[str, object]:
    """What ``make()`` returns, or the type and message of what it raises."""
    try:
        return ("ok", make())
    except Exception as err:  # any exception, so a difference in kind shows too
        return (type(err).__name__, str(err))


def both(**fields: Any) -> tuple[tuple[str, object], tuple[str, object]]:
    """The per-message encoder's outcome and that of encoding telemetry_properties()."""
    return (
        outcome(lambda: encode_telemetry_properties(**fields)),
        outcome(lambda: encode_properties(telemetry_properties(**fields))),
    )


@settings(max_examples=300, deadline=None)
@given(
    message_id=st.none() | message_ids(),
    version=versions(),
    site=names(),
    device=names(),
    kind=st.sampled_from([Kind.TELEMETRY, Kind.STATUS, "telemetry", "status"]),
    received_at=st.floats(0, 2**40),
    suffix=st.text(max_size=40),
)
def test_the_per_message_encoder_gives_the_bytes_of_encode_properties(
    message_id: str | None,
    version: str,
    site: str,
    device: str,
    kind: Kind | str,
    received_at: float,
    suffix: str,
) -> None:
    """For any contract values the pre-encoded parts plus id and timestamp are the same bytes."""
    fields = {
        "message_id": message_id,
        "version": version,
        "site": site,
        "device": device,
        "topic": f"iotpipe/v1/{site}/{device}/{kind}{suffix}",
        "kind": kind,
        "received_at": received_at,
    }
    fast, full = both(**fields)
    assert fast[0] == "ok"
    assert fast == full
    assert decode_properties(fast[1]) == telemetry_properties(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"message_id": "x" * 256},
        {"message_id": "é" * 128},
        {"received_at": -1.0},
        {"received_at": 2.0**64},
        {"received_at": -0.5},
        {"received_at": float("nan")},
        {"kind": "receipt"},
        {"message_id": "x" * 300, "received_at": -5.0},
        {"version": "\ud800"},
    ],
)
def test_the_per_message_encoder_fails_as_encode_properties_does(change: dict[str, Any]) -> None:
    """Values that do not fit AMQP (or the contract) raise the same error from both encoders."""
    fields = {
        "message_id": "m-1",
        "version": "1.0",
        "site": "home",
        "device": "pi-1",
        "topic": "iotpipe/v1/home/pi-1/telemetry",
        "kind": "telemetry",
        "received_at": 1_764_000_000.5,
    } | change
    fast, full = both(**fields)
    assert fast == full


@pytest.mark.parametrize(
    "props",
    [
        telemetry_properties(
            message_id="m-1",
            version="1.0",
            site="home",
            device="pi-1",
            topic="iotpipe/v1/home/pi-1/telemetry",
            kind=Kind.TELEMETRY,
            received_at=1_764_000_000.9,
        ),
        dead_letter_properties("bad JSON: ünïcödé ✓", topic="a/b/c", received_at=5),
        dead_letter_properties("x" * 5000, topic="t", received_at=5, message_id="id-1"),
        MessageProperties(),
        MessageProperties(headers={}, delivery_mode=1),
        MessageProperties(content_type="text/plain", type="t", app_id="a", timestamp=0),
    ],
)
def test_decoding_gives_back_the_encoded_properties(props: MessageProperties) -> None:
    """decode_properties() inverts encode_properties() (pika's own encoding of them too)."""
    assert decode_properties(encode_properties(props)) == props
    assert decode_properties(b"".join(_pika_properties(props).encode())) == props


def test_decoding_refuses_what_is_not_a_property_list() -> None:
    """Truncated bytes, or properties MessageProperties cannot hold, raise ValueError."""
    encoded = encode_properties(MessageProperties(message_id="m-1", headers={"a": "b"}))
    with pytest.raises(ValueError, match="not an AMQP property list"):
        decode_properties(encoded[: len(encoded) // 2])
    priority = b"\x08\x00\x05"  # flags: priority only, then its octet
    with pytest.raises(ValueError, match="beyond MessageProperties: priority"):
        decode_properties(priority)


class Channel:
    """What the publisher needs of a pika channel; its basic_publish is pika's own path."""

    def __init__(self, connection: Any, *, is_open: bool = True) -> None:
        self.connection = connection
        self.channel_number = 3
        self.is_open = is_open

    def basic_publish(
        self, exchange: str, routing_key: str, body: bytes, properties: Any, mandatory: bool
    ) -> None:
        """As pika.channel.Channel.basic_publish sends an open channel's message."""
        if not self.is_open:
            raise pika.exceptions.ChannelWrongStateError("Channel is closed.")
        method = pika.spec.Basic.Publish(
            exchange=exchange, routing_key=routing_key, mandatory=mandatory
        )
        pika.connection.Connection._send_message(
            self.connection, self.channel_number, method, (properties, body)
        )


def frames_written(publish: Any) -> bytes:
    """The bytes a held connection collected while ``publish(connection)`` ran."""
    connection = amqp._BatchingConnection.__new__(amqp._BatchingConnection)
    connection._body_max_length = 131072 - 8  # pika's for the default frame_max
    connection.hold()
    publish(connection)
    assert connection._held is not None
    return b"".join(connection._held)


@pytest.mark.parametrize("size", [1, 265, 131064, 131065, 300_000, 0])
@pytest.mark.parametrize(
    ("exchange", "routing_key"),
    [("iotpipe.telemetry", "iotpipe.v1.home.pi-1.telemetry"), ("", "q"), ("e" * 255, "ü" * 127)],
)
def test_publish_frames_are_what_basic_publish_sends(
    size: int, exchange: str, routing_key: str
) -> None:
    """Method, header and body frames are pika's bytes, for one body frame or several."""
    body = bytes(range(256)) * (size // 256) + bytes(size % 256)
    encoded = encode_properties(dead_letter_properties("e", topic="t", received_at=1))

    def ours(connection: Any) -> None:
        connection.publish(Channel(connection), exchange, routing_key, body, encoded)

    def pikas(connection: Any) -> None:
        Channel(connection).basic_publish(
            exchange, routing_key, body, amqp._EncodedProperties(encoded), True
        )

    assert frames_written(ours) == frames_written(pikas)


def test_publish_on_a_closed_channel_raises_as_pika_does() -> None:
    """A closed channel refuses the publish with pika's error, and nothing is written."""
    written = []

    def closed(connection: Any) -> None:
        with pytest.raises(pika.exceptions.ChannelWrongStateError):
            connection.publish(Channel(connection, is_open=False), "e", "k", b"x", b"\0\0")
        written.append(connection._held)

    frames_written(closed)
    assert written == [[]]

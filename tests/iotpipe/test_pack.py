"""The pack format: round trip, and a clean PackError for anything that is not a valid pack."""

from __future__ import annotations

import struct

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from iotpipe import pack
from iotpipe.amqp import encode_telemetry_properties
from iotpipe.pack import PackedMessage, PackEncoder, PackError, decode, encode

_NAMES = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
_MESSAGES = st.lists(
    st.builds(PackedMessage, _NAMES, _NAMES, st.binary(max_size=300), st.binary(max_size=2000)),
    min_size=1,
    max_size=40,
)


def _telemetry(i: int) -> PackedMessage:
    body = b'{"v":"1.0","id":"m-%d","site":"home","device":"d1","ts":1,"readings":{"t":%d}}' % (
        i,
        i,
    )
    properties = encode_telemetry_properties(
        message_id=f"m-{i}",
        version="1.0",
        site="home",
        device="d1",
        topic="iotpipe/v1/home/d1/telemetry",
        kind="telemetry",
        received_at=1_795_680_902 + i,
    )
    return PackedMessage("iotpipe.telemetry", "iotpipe.v1.home.d1.telemetry", properties, body)


@settings(max_examples=60, deadline=None)
@given(_MESSAGES, st.integers(1, 6))
def test_round_trip(messages: list[PackedMessage], level: int) -> None:
    assert decode(encode(messages, level=level)) == messages


def test_layout_is_the_documented_one() -> None:
    messages = [_telemetry(0), _telemetry(1)]
    data = PackEncoder(3).encode(messages)
    magic, version, count = struct.unpack_from(">4sBI", data)
    assert (magic, version, count) == (b"IPAK", 1, 2)
    payload = zstandard.ZstdDecompressor().decompress(data[9:])
    first = messages[0]
    expected = (
        bytes([len(first.exchange)])
        + first.exchange.encode()
        + bytes([len(first.routing_key)])
        + first.routing_key.encode()
        + struct.pack(">I", len(first.properties))
        + first.properties
        + struct.pack(">I", len(first.body))
        + first.body
    )
    assert payload.startswith(expected)
    assert pack.stated_count(data) == 2


def test_telemetry_compresses() -> None:
    messages = [_telemetry(i) for i in range(500)]
    raw = sum(pack.record_size(*m) for m in messages)
    assert len(PackEncoder(3).encode(messages)) < raw / 4


def test_an_empty_pack_is_refused_when_encoding() -> None:
    with pytest.raises(ValueError, match="at least one"):
        encode([])


def _valid() -> bytes:
    return encode([_telemetry(i) for i in range(10)])


def _with_payload(payload: bytes, count: int) -> bytes:
    return struct.pack(">4sBI", b"IPAK", 1, count) + zstandard.ZstdCompressor().compress(payload)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "shorter than"),
        (b"IPA", "shorter than"),
        (b"NOPE" + _valid()[4:], "magic"),
        (b"IPAK\x02" + _valid()[5:], "format version 2"),
        (b"IPAK\x01\0\0\0\0" + _valid()[9:], "count 0"),
        (_valid()[:9], "no zstd frame"),
        (_valid()[:9] + b"not zstd at all", "no zstd frame"),
        (_valid()[:-5], "does not decompress"),
        (_valid() + b"trailing", "does not decompress"),
        (_valid()[:5] + struct.pack(">I", 11) + _valid()[9:], "10 records, the header states 11"),
        (_valid()[:5] + struct.pack(">I", 9) + _valid()[9:], "more records than"),
        (_with_payload(b"\x05ab", 1), "exchange cut short"),
        (_with_payload(b"\x01a\x01b\0\0", 1), "properties length missing"),
        (_with_payload(b"\x01a\x01b\0\0\0\0\0\0\0\x09xy", 1), "body cut short"),
        (_with_payload(b"\x01\xff\x01b\0\0\0\0\0\0\0\0", 1), "exchange is not UTF-8"),
        (_with_payload(b"\x01a\x01b\0\0\0\0\0\0\0\0", 2), "1 records, the header states 2"),
    ],
)
def test_broken_packs_give_a_clean_error(data: bytes, reason: str) -> None:
    with pytest.raises(PackError, match=reason) as caught:
        decode(data)
    assert reason in caught.value.reason


def test_a_frame_without_content_size_is_refused() -> None:
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x01a\x01b" + bytes(8))
    with pytest.raises(PackError, match="does not state its content size"):
        decode(struct.pack(">4sBI", b"IPAK", 1, 1) + frame)


def test_a_pack_over_the_limit_is_refused_before_decompressing() -> None:
    bomb = _with_payload(b"\x01a\x01b\0\0\0\0" + struct.pack(">I", 5_000_000) + bytes(5_000_000), 1)
    assert len(bomb) < 1000
    with pytest.raises(PackError, match="more than the limit 1048576"):
        decode(bomb, max_bytes=1 << 20)
    assert len(decode(bomb, max_bytes=1 << 23)[0].body) == 5_000_000


def test_a_frame_that_lies_about_its_size_is_refused() -> None:
    frame = bytearray(zstandard.ZstdCompressor().compress(b"\x01a\x01b" + bytes(8)))
    # Frame header: magic (4), descriptor (1, single segment: content size in 1 byte follows).
    assert frame[4] & 0x20
    assert frame[4] >> 6 == 0
    frame[5] = 200
    with pytest.raises(PackError, match=r"does not decompress|gave"):
        decode(struct.pack(">4sBI", b"IPAK", 1, 1) + bytes(frame))


def test_a_huge_count_is_refused_at_once() -> None:
    with pytest.raises(PackError, match="cannot fit"):
        decode(struct.pack(">4sBI", b"IPAK", 1, 0xFFFFFFFF) + b"\x28\xb5\x2f\xfd")


def _messages_or_pack_error(data: bytes) -> list[PackedMessage] | PackError:
    """What decode gives; any other exception fails the test."""
    try:
        return decode(data)
    except PackError as err:
        return err


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_give_messages_or_a_pack_error(data: bytes) -> None:
    for candidate in (data, b"IPAK\x01\0\0\0\x01" + data):
        result = _messages_or_pack_error(candidate)
        assert isinstance(result, PackError) or all(isinstance(m, PackedMessage) for m in result)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 400), st.integers(1, 255))
def test_a_changed_byte_never_gives_other_messages(position: int, delta: int) -> None:
    original = _valid()
    data = bytearray(original)
    position %= len(data)
    data[position] = (data[position] + delta) % 256
    # The frame carries a checksum: a change that alters the content is noticed (a few bits of
    # a frame do not matter to its content at all).
    result = _messages_or_pack_error(bytes(data))
    assert isinstance(result, PackError) or result == decode(original)

"""The pack: many AMQP messages as one compressed blob, for the lean WAN uplink.

A site bridge in packed mode (``[bridge] uplink = "packed"``) sends packs instead of one AMQP
message per envelope; ``iotpipe unpack`` turns each pack back into the very messages the bridge
would have published. docs/wire.md ("Packed uplink") specifies the bytes; in short::

    pack    = magic "IPAK" | version u8 (= 1) | count u32 | one zstd frame (content size set)
    frame   = count records, concatenated, once decompressed
    record  = u8 len | exchange | u8 len | routing key | u32 len | properties | u32 len | body

All integers are big-endian. ``properties`` is an AMQP 0-9-1 basic content-header property list
(16-bit flags, then the fields), exactly as :func:`iotpipe.amqp.encode_properties` writes it.

This module knows bytes only (no AMQP client): :func:`encode` and :func:`decode` are pure, so a
benchmark can drive them directly. :func:`decode` is for bytes from the network: any input gives
either the messages or a :class:`PackError` saying what is wrong; it never decompresses more than
``max_bytes`` (a small frame cannot claim gigabytes of memory).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import zstandard

from iotpipe.errors import IotpipeError

__all__ = [
    "CONTENT_TYPE",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_UNPACKED_BYTES",
    "MESSAGE_TYPE",
    "PackEncoder",
    "PackError",
    "PackedMessage",
    "decode",
    "encode",
    "record_size",
    "stated_count",
]

MAGIC = b"IPAK"
"""The first four bytes of every pack."""

FORMAT_VERSION = 1
"""The pack format this module writes and the only one it reads."""

CONTENT_TYPE = "application/vnd.iotpipe.pack"
"""The ``content_type`` of a pack's AMQP message."""

MESSAGE_TYPE = "iotpipe.pack.v1"
"""The ``type`` of a pack's AMQP message (names the format version)."""

MAX_UNPACKED_BYTES = 64 * 1024 * 1024
"""Default limit of :func:`decode`: decompressed bytes of one pack, at most."""

_HEAD = struct.Struct(">4sBI")  # magic, version, count
_U8 = struct.Struct(">B")
_U32 = struct.Struct(">I")
_MIN_RECORD = 1 + 1 + 4 + 4  # four length fields, everything else empty
_U32_MAX = 0xFFFFFFFF
# Bounds the memory a frame may ask for beyond its content (zstd's own default allows 128 MiB);
# the encoder's levels 1-19 never use a window past 8 MiB.
_MAX_WINDOW = 1 << 24


class PackError(IotpipeError):
    """Bytes that are not a valid pack.

    Attributes:
        reason: what is wrong, one line (it goes into the dead letter's ``x-iotpipe-error``).
    """

    exit_code = 2

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"not a valid pack: {reason}")


class PackedMessage(NamedTuple):
    """One AMQP message inside a pack.

    Attributes:
        exchange: the exchange it is published to.
        routing_key: its routing key.
        properties: its encoded AMQP property list (:func:`iotpipe.amqp.encode_properties`).
        body: the payload, unchanged.
    """

    exchange: str
    routing_key: str
    properties: bytes
    body: bytes


def record_size(exchange: str, routing_key: str, properties: bytes, body: bytes) -> int:
    """Bytes the message takes in a pack before compression (for a packer's size limit).

    Names are counted as characters: exact for the ASCII names iotpipe uses, an estimate
    otherwise (the limit is a target, not a contract).
    """
    return _MIN_RECORD + len(exchange) + len(routing_key) + len(properties) + len(body)


def _record(message: PackedMessage) -> bytes:
    exchange = message.exchange.encode()
    routing_key = message.routing_key.encode()
    if len(exchange) > 255 or len(routing_key) > 255:
        raise ValueError("exchange and routing key must fit an AMQP short string (255 bytes)")
    if len(message.properties) > _U32_MAX or len(message.body) > _U32_MAX:
        raise ValueError("properties and body must be under 4 GiB")
    return b"".join(
        (
            _U8.pack(len(exchange)),
            exchange,
            _U8.pack(len(routing_key)),
            routing_key,
            _U32.pack(len(message.properties)),
            message.properties,
            _U32.pack(len(message.body)),
            message.body,
        )
    )


class PackEncoder:
    """Encodes packs with one reusable zstd compressor (not thread-safe: one per thread).

    Args:
        level: zstd compression level (1 fastest .. 19; 3 is zstd's default).
    """

    def __init__(self, level: int = 3) -> None:
        if not 1 <= level <= 19:
            raise ValueError(f"zstd level must be 1 to 19, got {level}")
        self.level = level
        self._compressor = zstandard.ZstdCompressor(
            level=level, write_content_size=True, write_checksum=True
        )

    def encode(self, messages: Sequence[PackedMessage]) -> bytes:
        """The pack holding ``messages``, in order.

        Raises:
            ValueError: no messages, or a name or size that the format cannot carry.
        """
        if not messages:
            raise ValueError("a pack holds at least one message")
        payload = b"".join([_record(m) for m in messages])
        head = _HEAD.pack(MAGIC, FORMAT_VERSION, len(messages))
        return head + self._compressor.compress(payload)


def encode(messages: Iterable[PackedMessage], *, level: int = 3) -> bytes:
    """The pack holding ``messages`` (see :class:`PackEncoder` to reuse a compressor)."""
    return PackEncoder(level).encode(list(messages))


def stated_count(data: bytes) -> int:
    """The message count a pack's header states (PackError if the header is not a pack's)."""
    return _header(data)


def _header(data: bytes) -> int:
    if len(data) < _HEAD.size:
        raise PackError(f"{len(data)} bytes, shorter than the {_HEAD.size}-byte header")
    magic, version, number = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise PackError(f"magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise PackError(f"format version {version}, this unpacker reads {FORMAT_VERSION} only")
    if number < 1:
        raise PackError("count 0: a pack holds at least one message")
    return int(number)


def _decompress(frame: bytes, max_bytes: int) -> bytes:
    try:
        size = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as err:
        raise PackError(f"no zstd frame: {err}") from None
    if size < 0:
        raise PackError("the zstd frame does not state its content size")
    if size > max_bytes:
        raise PackError(f"the zstd frame holds {size} bytes, more than the limit {max_bytes}")
    try:
        # A decompressor per pack: they are not thread-safe, and one costs little next to a pack.
        payload = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW).decompress(
            frame, max_output_size=max_bytes, allow_extra_data=False
        )
    except zstandard.ZstdError as err:
        raise PackError(f"the zstd frame does not decompress: {err}") from None
    if len(payload) != size:
        raise PackError(f"the zstd frame gave {len(payload)} bytes, its header says {size}")
    return payload


def _name(payload: bytes, offset: int, what: str) -> tuple[str, int]:
    end = offset + 1
    if end > len(payload):
        raise PackError(f"truncated record: {what} length missing")
    length = payload[offset]
    if end + length > len(payload):
        raise PackError(f"truncated record: {what} cut short")
    try:
        return payload[end : end + length].decode(), end + length
    except UnicodeDecodeError:
        raise PackError(f"{what} is not UTF-8") from None


def _blob(payload: bytes, offset: int, what: str) -> tuple[bytes, int]:
    end = offset + 4
    if end > len(payload):
        raise PackError(f"truncated record: {what} length missing")
    (length,) = _U32.unpack_from(payload, offset)
    if end + length > len(payload):
        raise PackError(f"truncated record: {what} cut short")
    return payload[end : end + length], end + length


def decode(data: bytes, *, max_bytes: int = MAX_UNPACKED_BYTES) -> list[PackedMessage]:
    """The messages of a pack, in order.

    Args:
        data: the pack's bytes, as received (untrusted).
        max_bytes: refuse a pack that would decompress to more than this.

    Raises:
        PackError: ``data`` is not a valid pack of this format version (wrong magic or
            version, not one whole zstd frame, a size over ``max_bytes``, truncated or extra
            records, a count that does not match the header, a name that is not UTF-8).
    """
    number = _header(data)
    if number > max_bytes // _MIN_RECORD:
        raise PackError(f"count {number} cannot fit in {max_bytes} bytes")
    payload = _decompress(data[_HEAD.size :], max_bytes)
    messages: list[PackedMessage] = []
    offset = 0
    end = len(payload)
    while offset < end:
        if len(messages) == number:
            raise PackError(f"more records than the stated count {number}")
        exchange, offset = _name(payload, offset, "exchange")
        routing_key, offset = _name(payload, offset, "routing key")
        properties, offset = _blob(payload, offset, "properties")
        body, offset = _blob(payload, offset, "body")
        messages.append(PackedMessage(exchange, routing_key, properties, body))
    if len(messages) != number:
        raise PackError(f"{len(messages)} records, the header states {number}")
    return messages

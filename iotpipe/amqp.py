"""AMQP transport: the only module that talks to pika.

:class:`ConfirmingPublisher` publishes to RabbitMQ with publisher confirms from a pika
``SelectConnection`` whose I/O loop runs in its own thread (``iotpipe-amqp``). Callers on any
thread hand it messages with :meth:`~ConfirmingPublisher.publish`, which only enqueues; the loop
thread publishes them ``mandatory`` with at most ``window`` unconfirmed at a time and reports
exactly one :class:`Outcome` per message through the ``on_result`` callback. On this machine that
is about as fast as pika gets (a blocking publish that waits for each confirm is >10x slower).

The public API carries no pika types: properties are a :class:`MessageProperties` dataclass,
built for the wire contract by :func:`telemetry_properties` and :func:`dead_letter_properties`.

Outcomes, and what the caller should do with them:

    CONFIRMED   the broker took responsibility (routed to at least one queue, persisted if the
                message and queue are durable): acknowledge upstream.
    RETURNED    the broker had nowhere to route it (no matching binding): it is NOT stored.
    NACKED      the broker refused it (e.g. a full queue with ``x-overflow: reject-publish``).
    FAILED      the connection or channel broke while the message was unconfirmed (it may or may
                not have reached a queue), or the publisher closed before it was settled.

On a lost connection every *unconfirmed* message is reported FAILED at once (the caller retries or
spools it; the store deduplicates on the envelope id, so a retry that duplicates is harmless).
Messages still waiting in the queue were never sent: they stay queued and go out, in order, after
the publisher reconnects (jittered exponential backoff, topology re-declared).

Several nodes (``[amqp] url`` plus ``urls``, see :attr:`AmqpSettings.brokers`): each connection
attempt goes to one node; an unreachable node is followed at once by the next, and only a whole
round of failures waits out a backoff delay. A lost connection fails over to the *next* node at
once (round-robin), so a dead node costs one refused connect at most.
"""

from __future__ import annotations

import collections
import logging
import re
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from typing import Any, Protocol
from urllib.parse import unquote

# pika ships no type information; everything taken from it stays inside this module.
import pika  # type: ignore[import-untyped]
from pika import exceptions as pika_errors
from pika.adapters.select_connection import IOLoop  # type: ignore[import-untyped]
from pika.adapters.utils import connection_workflow as pika_workflow  # type: ignore[import-untyped]

from iotpipe import compat
from iotpipe.connection import certificate_problem, tls_context
from iotpipe.errors import CertificateError, ConnectError
from iotpipe.pacing import Backoff
from iotpipe.settings import AmqpSettings, BrokerUrl
from iotpipe.topics import Kind

__all__ = [
    "APP_ID",
    "CONTENT_TYPE",
    "DEAD_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "EXCHANGES",
    "HEADER_DEVICE",
    "HEADER_ERROR",
    "HEADER_SITE",
    "HEADER_TOPIC",
    "HEADER_VERSION",
    "HOME_NODE_DOWN",
    "TELEMETRY_EXCHANGE",
    "UPLINK_EXCHANGE",
    "UPLINK_QUEUE",
    "ConfirmingPublisher",
    "MessageProperties",
    "Outcome",
    "OwnQueue",
    "Publisher",
    "PublisherFactory",
    "ResultHandler",
    "dead_letter_properties",
    "declare_topology",
    "decode_properties",
    "describe_error",
    "encode_properties",
    "encode_telemetry_properties",
    "telemetry_properties",
    "vhost_of",
]

log = logging.getLogger(__name__)

TELEMETRY_EXCHANGE = "iotpipe.telemetry"
"""Topic exchange the bridge publishes accepted messages to (routing key = topic with ``.``)."""

DEAD_EXCHANGE = "iotpipe.dead"
"""Topic exchange for rejected messages (routing key ``bridge.<reason>``)."""

EXCHANGES: tuple[tuple[str, str], ...] = ((TELEMETRY_EXCHANGE, "topic"), (DEAD_EXCHANGE, "topic"))
#: The default queue that keeps everything sent to :data:`DEAD_EXCHANGE` (bound with ``#``).
#: Without a queue bound there, RabbitMQ would have nowhere to put a rejected message: the
#: bridge's mandatory publishes would come back, and dead letters of the store queue be dropped.
DEAD_LETTER_QUEUE = "iotpipe.dead"
"""The exchanges of wire contract 1.x as ``(name, type)``; both durable. Consumers own queues."""

UPLINK_EXCHANGE = "iotpipe.uplink"
"""Topic exchange (durable) a site bridge in packed mode sends its packs to (contract 1.2)."""
UPLINK_QUEUE = "iotpipe.uplink"
"""The queue ``iotpipe unpack`` consumes packs from, bound to :data:`UPLINK_EXCHANGE` with its
name as binding key: packs are published with routing key = the uplink queue's name."""

HOME_NODE_DOWN = "is down or inaccessible"
"""In RabbitMQ's 404 for a classic queue whose node is down (a cluster cannot serve it)."""

APP_ID = "iotpipe-bridge"
CONTENT_TYPE = "application/json"
HEADER_VERSION = "x-iotpipe-version"
HEADER_SITE = "x-iotpipe-site"
HEADER_DEVICE = "x-iotpipe-device"
HEADER_TOPIC = "x-iotpipe-topic"
HEADER_ERROR = "x-iotpipe-error"

_PERSISTENT = 2
_MESSAGE_TYPES = {Kind.TELEMETRY: "iotpipe.telemetry", Kind.STATUS: "iotpipe.status"}
_TYPE_BY_KIND: dict[str, str] = {kind.value: type_ for kind, type_ in _MESSAGE_TYPES.items()}


class Outcome(StrEnum):
    """The final fate of one published message (see the module docstring)."""

    CONFIRMED = "confirmed"
    NACKED = "nacked"
    RETURNED = "returned"
    FAILED = "failed"


ResultHandler = Callable[[object, Outcome], object]
"""``on_result(token, outcome)``, called once per message on the publisher's loop thread."""


@dataclass(frozen=True, slots=True)
class MessageProperties:
    """AMQP basic properties of one message (the subset iotpipe uses).

    Attributes:
        message_id: the envelope ``id`` (the consumers' dedupe key), if the message has one.
        content_type: MIME type of the body.
        type: ``iotpipe.telemetry`` or ``iotpipe.status`` for accepted messages.
        delivery_mode: 2 = persistent, 1 = transient.
        timestamp: when the bridge received the message, whole Unix seconds.
        app_id: who published it.
        headers: string headers (``x-iotpipe-*``).
    """

    message_id: str | None = None
    content_type: str | None = None
    type: str | None = None
    delivery_mode: int = _PERSISTENT
    timestamp: int | None = None
    app_id: str | None = None
    headers: Mapping[str, str] | None = None


class Publisher(Protocol):
    """What the bridge needs of :class:`ConfirmingPublisher`: its seam to RabbitMQ.

    :class:`iotpipe.testing.MemoryPublisher` is the in-memory one. Outcomes reach the
    ``on_result`` handler the publisher was built with, one per published message.
    """

    @property
    def connected(self) -> bool:
        """Whether messages published now go to the broker (else they wait in the queue)."""
        ...

    @property
    def pending(self) -> int:
        """Messages not yet settled: waiting in the queue plus published and unconfirmed."""
        ...

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-established."""
        ...

    def start(self, timeout: float | None = ..., *, retry: bool = ...) -> None:
        """Connect and wait until ready (raises ConnectError; with ``retry`` keeps trying)."""

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: MessageProperties | bytes,
        token: object,
    ) -> None:
        """Queue one message; ``on_result(token, outcome)`` follows exactly once."""

    def withdraw(self) -> list[object]:
        """Take back the messages still waiting in the queue (never sent); their tokens."""
        ...

    def close(self, timeout: float = ...) -> bool:
        """Wait for outstanding confirms, then disconnect; True if everything was settled."""
        ...


#: Builds the publisher that reports each outcome to the given handler.
PublisherFactory = Callable[[ResultHandler], Publisher]


@dataclass(frozen=True, slots=True)
class OwnQueue:
    """A queue a publisher declares on every connect, so its messages always have a home.

    Attributes:
        name: the durable queue.
        exchange: the durable topic exchange it is bound to, with its own name as binding key
            (publish with routing key = the queue's name).
        arguments: its ``x-`` arguments; they must equal those of every other declaration of
            the queue (RabbitMQ refuses a declaration with other arguments).
    """

    name: str
    exchange: str
    arguments: Mapping[str, Any]


def telemetry_properties(
    *,
    message_id: str | None,
    version: str,
    site: str,
    device: str,
    topic: str,
    kind: Kind | str,
    received_at: float,
) -> MessageProperties:
    """Properties of an accepted message, exactly as wire contract 1.x specifies them.

    Args:
        message_id: the envelope ``id`` (status messages have none: pass None).
        version: the envelope ``v``, e.g. ``"1.0"``.
        site: the site, as in the topic.
        device: the device, as in the topic.
        topic: the original MQTT topic.
        kind: telemetry or status (a :class:`~iotpipe.topics.Kind` or its value).
        received_at: when the bridge received it, Unix seconds.

    Raises:
        ValueError: ``kind`` is neither ``telemetry`` nor ``status``.
    """
    return MessageProperties(
        message_id=message_id,
        content_type=CONTENT_TYPE,
        type=_TYPE_BY_KIND.get(kind) or _MESSAGE_TYPES[Kind(kind)],  # Kind(): ValueError
        delivery_mode=_PERSISTENT,
        timestamp=int(received_at),
        app_id=APP_ID,
        headers={
            HEADER_VERSION: version,
            HEADER_SITE: site,
            HEADER_DEVICE: device,
            HEADER_TOPIC: topic,
        },
    )


def encode_telemetry_properties(
    *,
    message_id: str | None,
    version: str,
    site: str,
    device: str,
    topic: str,
    kind: Kind | str,
    received_at: float,
) -> bytes:
    """``encode_properties(telemetry_properties(...))`` of the same arguments, byte for byte.

    Only the message id and the timestamp change from one message of a device to the next; the
    rest (flags, content type, headers, delivery mode, type, app id) is encoded once per
    version, site, device, topic and kind, and kept. The bridge's per-message path.

    Raises:
        ValueError: as :func:`telemetry_properties` and :func:`encode_properties` raise it.
    """
    head, tail = _telemetry_parts(version, site, device, topic, kind, message_id is not None)
    timestamp = int(received_at)
    middle = b"" if message_id is None else _short(message_id, "message_id")
    try:
        stamp = _PACK_U64(timestamp)
    except struct.error as err:
        raise ValueError(f"property out of range: {err}") from None
    return b"".join((head, middle, stamp, tail))


@lru_cache(maxsize=4096)
def _telemetry_parts(  # noqa: PLR0917 - positional: the arguments are the cache's key
    version: str, site: str, device: str, topic: str, kind: Kind | str, with_id: bool
) -> tuple[bytes, bytes]:
    """What comes before the message id (or the timestamp) and after the timestamp.

    Memoised: the values repeat per device. The fields' order is the property list's.
    """
    props = telemetry_properties(
        message_id="" if with_id else None,
        version=version,
        site=site,
        device=device,
        topic=topic,
        kind=kind,
        received_at=0,
    )
    encoded = _encode_properties(props)
    # Everything up to the message id (an empty short string: one zero byte) or, without one,
    # up to the timestamp (8 zero bytes), then everything after the timestamp.
    tail = _short(str(props.type), "type") + _short(APP_ID, "app_id")
    head = encoded[: len(encoded) - len(tail) - 8 - (1 if with_id else 0)]
    if head + (b"\0" if with_id else b"") + bytes(8) + tail != encoded:
        raise AssertionError("telemetry properties are not laid out as expected")
    return head, tail


def dead_letter_properties(
    error: str, *, topic: str, received_at: float, message_id: str | None = None
) -> MessageProperties:
    """Properties of a rejected message bound for :data:`DEAD_EXCHANGE`.

    The body goes out unchanged and may not be JSON, so no content type is claimed.

    Args:
        error: why it was rejected, human-readable (the ``x-iotpipe-error`` header).
        topic: the MQTT topic it arrived on, as received (it may not be a valid iotpipe topic).
        received_at: when the bridge received it, Unix seconds.
        message_id: the envelope ``id``, if one could be read.
    """
    return MessageProperties(
        message_id=message_id,
        delivery_mode=_PERSISTENT,
        timestamp=int(received_at),
        app_id=APP_ID,
        headers={HEADER_ERROR: error, HEADER_TOPIC: topic},
    )


def _pika_properties(props: MessageProperties) -> Any:
    """The same properties as a pika object (what :class:`_EncodedProperties` must equal)."""
    return pika.BasicProperties(
        content_type=props.content_type,
        delivery_mode=props.delivery_mode,
        message_id=props.message_id,
        timestamp=props.timestamp,
        type=props.type,
        app_id=props.app_id,
        headers=dict(props.headers) if props.headers is not None else None,
    )


#: pika's property names that MessageProperties has no field for.
_UNKEPT_PROPERTIES = (
    "content_encoding",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "user_id",
    "cluster_id",
)


def decode_properties(data: bytes) -> MessageProperties:
    """The inverse of :func:`encode_properties` (for encoded properties kept as bytes).

    Raises:
        ValueError: ``data`` is not an encoded property list, or sets a property beyond
            :class:`MessageProperties`.
    """
    props = pika.spec.BasicProperties()
    try:
        props.decode(data)
    except (struct.error, IndexError, KeyError) as err:
        raise ValueError(f"not an AMQP property list: {err}") from None
    extra = [name for name in _UNKEPT_PROPERTIES if getattr(props, name) is not None]
    if extra:
        raise ValueError(f"properties beyond MessageProperties: {', '.join(extra)}")
    return MessageProperties(
        message_id=props.message_id,
        content_type=props.content_type,
        type=props.type,
        delivery_mode=props.delivery_mode if props.delivery_mode is not None else _PERSISTENT,
        timestamp=props.timestamp,
        app_id=props.app_id,
        headers=props.headers,
    )


_FLAGS = pika.spec.BasicProperties
_PACK_U8 = struct.Struct(">B").pack
_PACK_U16 = struct.Struct(">H").pack
_PACK_U32 = struct.Struct(">I").pack
_PACK_U64 = struct.Struct(">Q").pack


def _short(value: str, what: str) -> bytes:
    data = value.encode()
    if len(data) > 255:
        raise ValueError(f"{what} is {len(data)} bytes; AMQP allows at most 255")
    return _PACK_U8(len(data)) + data


def encode_properties(props: MessageProperties) -> bytes:
    """Encode ``props`` as the property list of an AMQP content header (flags + fields).

    Byte for byte what pika's ``BasicProperties.encode()`` produces for the same values (a test
    holds it to that), in well under half the time of building and encoding a pika object:
    the header frame is the largest per-message cost of publishing, paid for every message.

    Raises:
        ValueError: a string does not fit an AMQP short string (255 bytes), or a number is out
            of range.
    """
    try:
        return _encode_properties(props)
    except struct.error as err:  # a number that does not fit its AMQP field
        raise ValueError(f"property out of range: {err}") from None


def _encode_properties(props: MessageProperties) -> bytes:
    flags = 0
    fields: list[bytes] = []
    if props.content_type is not None:
        flags |= _FLAGS.FLAG_CONTENT_TYPE
        fields.append(_short(props.content_type, "content_type"))
    if props.headers is not None:
        flags |= _FLAGS.FLAG_HEADERS
        fields.append(_header_table(tuple(props.headers.items())))
    flags |= _FLAGS.FLAG_DELIVERY_MODE
    fields.append(_PACK_U8(props.delivery_mode))
    if props.message_id is not None:
        flags |= _FLAGS.FLAG_MESSAGE_ID
        fields.append(_short(props.message_id, "message_id"))
    if props.timestamp is not None:
        flags |= _FLAGS.FLAG_TIMESTAMP
        fields.append(_PACK_U64(props.timestamp))
    if props.type is not None:
        flags |= _FLAGS.FLAG_TYPE
        fields.append(_short(props.type, "type"))
    if props.app_id is not None:
        flags |= _FLAGS.FLAG_APP_ID
        fields.append(_short(props.app_id, "app_id"))
    return _PACK_U16(flags) + b"".join(fields)


@lru_cache(maxsize=4096)
def _header_table(items: tuple[tuple[str, str], ...]) -> bytes:
    """The encoded headers table (length-prefixed). Memoised: the bridge's headers repeat per
    device (version, site, device, topic), and encoding them is most of the properties' cost."""
    entries: list[bytes] = []
    for key, value in items:
        data = value.encode()
        entries += (_short(key, "header name"), b"S", _PACK_U32(len(data)), data)
    table = b"".join(entries)
    return _PACK_U32(len(table)) + table


# pika's private hook (see iotpipe.compat): frames go out through
# ``Connection._output_marshaled_frames``, overridden below. Fallback: without it, hold() and
# release() do nothing and every frame is written the way pika does it.
_CAN_BATCH = compat.pika_can_batch()


_FRAME_HEAD = struct.Struct(">BHI").pack  # frame type, channel, payload size
_CONTENT_HEAD = struct.Struct(">HxxQ").pack  # class id, weight (0), body size
_FRAME_END = bytes([pika.spec.FRAME_END])
_FRAME_HEADER, _FRAME_BODY = pika.spec.FRAME_HEADER, pika.spec.FRAME_BODY
_BASIC_CLASS = pika.spec.BasicProperties.INDEX


@lru_cache(maxsize=4096)
def _publish_method_frame(channel_number: int, exchange: str, routing_key: str) -> bytes:
    """The marshalled ``basic.publish`` (mandatory) method frame; memoised, as keys repeat."""
    method = pika.spec.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True)
    return bytes(pika.frame.Method(channel_number, method).marshal())


class _BatchingConnection(pika.SelectConnection):  # type: ignore[misc]
    """A SelectConnection that can join the frames of many publishes into one write.

    pika hands every frame (three per message: method, header, body) to its transport as a
    separate buffer, and the transport sends each with its own ``send()``. Between :meth:`hold`
    and :meth:`release` the frames are collected and go to the transport as one buffer, in the
    same order. (pika's ``frames_sent`` statistic then counts a batch as one frame.)

    :meth:`publish` builds a message's frames itself: the method frame is kept per exchange and
    routing key, the header frame is the pre-encoded properties with a fixed prefix.
    """

    _held: list[bytes] | None = None

    def publish(
        self, channel: Any, exchange: str, routing_key: str, body: bytes, encoded: bytes
    ) -> None:
        """``channel.basic_publish(exchange, routing_key, body, properties, mandatory=True)``.

        The same frames, byte for byte (a test holds it to that), to the same output; pika's own
        method for what this does not cover (a closed channel, an empty body or one that needs
        more than one body frame, the hook missing: see :mod:`iotpipe.compat`).

        Raises:
            pika.exceptions.ChannelWrongStateError: the channel is not open (as pika raises it).
        """
        # pika's private hook: the body frame size it computed when the connection was tuned.
        body_max = getattr(self, "_body_max_length", None) if _CAN_BATCH else None
        if not (channel.is_open and isinstance(body_max, int) and 0 < len(body) <= body_max):
            channel.basic_publish(exchange, routing_key, body, _EncodedProperties(encoded), True)
            return
        number = channel.channel_number
        header = _CONTENT_HEAD(_BASIC_CLASS, len(body)) + encoded
        self._output_marshaled_frames(
            [
                _publish_method_frame(number, exchange, routing_key),
                _FRAME_HEAD(_FRAME_HEADER, number, len(header)) + header + _FRAME_END,
                _FRAME_HEAD(_FRAME_BODY, number, len(body)) + body + _FRAME_END,
            ]
        )

    def hold(self) -> None:
        """Collect the frames of the following publishes (till :meth:`release`)."""
        if _CAN_BATCH:
            self._held = []

    def release(self) -> None:
        """Write the frames collected since :meth:`hold` as one buffer."""
        frames, self._held = self._held, None
        if frames:
            super()._output_marshaled_frames([b"".join(frames)])

    def _output_marshaled_frames(self, marshaled_frames: list[bytes]) -> None:
        if self._held is not None:
            self._held += marshaled_frames
        else:
            super()._output_marshaled_frames(marshaled_frames)


class _EncodedProperties:
    """Pre-encoded properties that pika's header frame accepts in place of ``BasicProperties``.

    ``pika.frame.Header.marshal()`` only reads ``INDEX`` and calls ``encode()``.
    """

    __slots__ = ("_data",)
    INDEX = pika.spec.BasicProperties.INDEX

    def __init__(self, data: bytes) -> None:
        self._data = data

    def encode(self) -> list[bytes]:
        return [self._data]  # a fresh list: marshal() inserts the frame prefix into it


def declare_topology(channel: Any, dead_letter_queue: str = "") -> None:
    """Declare the contract's exchanges on a pika ``BlockingChannel`` (idempotent).

    For tests and command-line tools; :class:`ConfirmingPublisher` declares them itself on
    every (re)connect.

    Args:
        channel: an open channel.
        dead_letter_queue: also declare this durable queue, bound with ``#`` to
            :data:`DEAD_EXCHANGE`; ``""`` declares none.
    """
    for name, kind in EXCHANGES:
        channel.exchange_declare(exchange=name, exchange_type=kind, durable=True)
    if dead_letter_queue:
        channel.queue_declare(dead_letter_queue, durable=True)
        channel.queue_bind(dead_letter_queue, DEAD_EXCHANGE, routing_key="#")


def vhost_of(path: str) -> str:
    """The virtual host named by a URL path: ``""`` or ``"/"`` -> ``"/"``, else percent-decoded."""
    if path in ("", "/"):
        return "/"
    return unquote(path[1:])


def connection_parameters(
    settings: AmqpSettings,
    *,
    timeout: float,
    heartbeat: int | None,
    name: str,
    node: BrokerUrl | None = None,
) -> Any:
    """pika's ``ConnectionParameters`` for one node (credentials, TLS, vhost, one attempt).

    For the two modules that talk to pika (this one and ``iotpipe.amqp_consumer``); it is not
    in ``__all__``, whose API carries no pika types.

    Args:
        settings: URL and TLS material.
        timeout: socket and handshake limit in seconds.
        heartbeat: AMQP heartbeat in seconds; None accepts the broker's proposal.
        name: the connection name shown in RabbitMQ's management UI.
        node: which of ``settings.brokers`` to connect to; None is the first (``url``).
    """
    url = settings.broker if node is None else node
    password = url.password.get_secret_value() if url.password is not None else ""
    credentials = (
        pika.PlainCredentials(url.username, password) if url.username is not None else None
    )
    options: dict[str, Any] = {}
    if url.tls:
        context = tls_context(settings.tls, "amqp.tls")
        options["ssl_options"] = pika.SSLOptions(context, server_hostname=url.host)
    if credentials is not None:
        options["credentials"] = credentials
    if heartbeat is not None:
        options["heartbeat"] = heartbeat
    return pika.ConnectionParameters(
        host=url.host,
        port=url.port,
        virtual_host=vhost_of(url.path),
        connection_attempts=1,
        socket_timeout=timeout,
        stack_timeout=timeout,
        client_properties={"connection_name": name},
        **options,
    )


class _Delivery:
    """One published, not yet settled message (what a basic.return is matched against)."""

    __slots__ = ("body", "exchange", "returned", "routing_key", "token")

    def __init__(self, token: object, exchange: str, routing_key: str, body: bytes) -> None:
        self.token = token
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.returned = False


_Queued = tuple[str, str, bytes, bytes, object]


class ConfirmingPublisher:
    """Publishes with confirms from a background pika I/O loop; reports one outcome per message.

    Thread-safe: :meth:`publish`, :attr:`pending`, :attr:`connected`, :meth:`flush` and
    :meth:`close` may be called from any thread. ``on_result`` runs on the loop thread: it must
    be quick and must not block (hand the outcome to your own thread if there is real work).

    Usage::

        publisher = ConfirmingPublisher(settings, on_result=handle)
        publisher.start()                         # raises ConnectError if RabbitMQ is not there
        publisher.publish(TELEMETRY_EXCHANGE, key, body, properties, token=mid)
        ...
        publisher.close(timeout=10)               # waits for outstanding confirms

    Args:
        settings: URL (credentials, host, port, vhost from its path) and TLS material; with
            ``urls``, the nodes of a cluster to fail over between.
        on_result: ``on_result(token, outcome)``, once per published message, on the loop thread.
        window: the most messages unconfirmed at once; more wait in the queue (in order).
        heartbeat: AMQP heartbeat in seconds; None accepts the broker's proposal (60 s).
        connect_timeout: limit for each connection attempt, and :meth:`start`'s default wait.
        backoff_base: first reconnect delay in seconds; doubles per failed attempt, +-50% jitter.
        backoff_max: the longest reconnect delay (before jitter).
        connection_name: shown in RabbitMQ's management UI and logs.
        dead_letter_queue: a durable queue to declare, bound with ``#`` to
            :data:`DEAD_EXCHANGE`, so that rejected messages have somewhere to go; ``""``
            declares none (another component owns it).
        own_queue: another queue (and its exchange) to declare, e.g. the packed uplink's.

    Attributes:
        window: the most messages that may be unconfirmed at once.
        published: messages handed to the broker (retries after a failure count again).
        confirmed: messages the broker confirmed.
        nacked: messages the broker refused.
        returned: messages the broker could not route.
        failed: messages reported FAILED (lost connection or closed publisher).
        reconnects: how many times the connection was re-established.
        peak_unconfirmed: the most messages ever unconfirmed at once (never above ``window``).
        url: the node connected to (or tried) last.
    """

    def __init__(
        self,
        settings: AmqpSettings,
        on_result: ResultHandler,
        *,
        window: int = 1000,
        heartbeat: int | None = None,
        connect_timeout: float = 10.0,
        backoff_base: float = 0.5,
        backoff_max: float = 10.0,
        connection_name: str = "iotpipe-publisher",
        dead_letter_queue: str = "",
        own_queue: OwnQueue | None = None,
    ) -> None:
        if window < 1:
            raise ValueError("window must be at least 1")
        self.settings = settings
        self.url = settings.broker
        self.window = window
        self.published = 0
        self.confirmed = 0
        self.nacked = 0
        self.returned = 0
        self.failed = 0
        self.reconnects = 0
        self.peak_unconfirmed = 0
        self._on_result = on_result
        self._heartbeat = heartbeat
        self._connect_timeout = connect_timeout
        self._backoff = Backoff(backoff_base, backoff_max)
        self._connection_name = connection_name
        self._dead_letter_queue = dead_letter_queue
        self._own_queue = own_queue
        self._nodes = len(settings.brokers)
        self._node = 0  # index in settings.brokers of the node the next attempt goes to
        self._tried = 0  # nodes that failed in a row since the last success or backoff wait
        self._was_ready = False  # the connection that just closed had been ready: fail over

        # Shared with publishing threads: deque.append/popleft are atomic, the flags are plain
        # attribute reads and writes (a stale read costs at most one extra wake-up).
        self._queue: collections.deque[_Queued] = collections.deque()
        self._accepting = True
        self._ready = False
        self._wake_scheduled = False
        self._ioloop: Any = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._start_error: str | None = None
        self._certificate_problem: str | None = None
        self._settled = threading.Condition()
        self._flushing = 0
        self._retry_start = False

        # Loop-thread state.
        self._connection: Any = None
        self._channel: Any = None
        self._tag = 0
        self._unconfirmed: collections.OrderedDict[int, _Delivery] = collections.OrderedDict()
        self._closing = False
        self._reconnect_timer: Any = None

    # -- public API (any thread) --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the channel is open, in confirm mode, with the topology declared."""
        return self._ready

    @property
    def pending(self) -> int:
        """Messages not yet settled: waiting in the queue plus published and unconfirmed."""
        return len(self._queue) + len(self._unconfirmed)

    @property
    def unconfirmed(self) -> int:
        """Messages published and not yet confirmed, nacked or returned."""
        return len(self._unconfirmed)

    def start(self, timeout: float | None = None, *, retry: bool = False) -> None:
        """Connect, enable confirms, declare the topology; wait until ready.

        Args:
            timeout: seconds to wait, default ``connect_timeout``.
            retry: when the first connection fails, still raise ConnectError, but keep the
                publisher running and reconnecting in the background as after a lost connection:
                ``publish()`` queues, and ``connected`` turns True once a connection succeeds.

        Raises:
            ConnectError: the broker is unreachable, refused the login or the virtual host,
                rejected the topology, or did not finish in time.
            CertificateError: the broker's TLS certificate failed verification (also with
                ``retry``: the publisher stops).
            RuntimeError: the publisher was already started.
        """
        if self._thread is not None:
            raise RuntimeError("the publisher was already started")
        wait = self._connect_timeout if timeout is None else timeout
        self._ioloop = IOLoop()
        self._thread = threading.Thread(target=self._run, name="iotpipe-amqp", daemon=True)
        self._retry_start = retry
        self._thread.start()
        if not self._started.wait(wait):
            self._start_error = f"not ready within {wait:g} s"
            if not retry:
                self._ioloop.add_callback_threadsafe(self._begin_close)
        if self._start_error is not None and retry and self._certificate_problem is None:
            raise ConnectError(self.url.redacted(), self._start_error)  # still trying
        if self._start_error is not None:
            self._thread.join(timeout=wait + 5)
            self._accepting = False
            if self._certificate_problem is not None:
                raise CertificateError("amqp", self.url.redacted(), self._certificate_problem)
            raise ConnectError(self.url.redacted(), self._start_error)
        log.info("amqp publisher ready url=%s window=%d", self.url, self.window)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: MessageProperties | bytes,
        token: object,
    ) -> None:
        """Queue one message for publishing; returns at once.

        ``on_result(token, outcome)`` is called exactly once for it later, on the loop thread.

        Args:
            exchange: the exchange, e.g. :data:`TELEMETRY_EXCHANGE`.
            routing_key: the routing key.
            body: the message body, sent unchanged.
            properties: the properties, or what :func:`encode_properties` made of them (for
                messages kept encoded, e.g. in a spool; such bytes are sent as they are).
            token: handed back to ``on_result`` with the outcome.

        Raises:
            ValueError: a name or property does not fit AMQP (e.g. longer than 255 bytes).
            RuntimeError: the publisher is closed (or failed to start).
        """
        if not self._accepting:
            raise RuntimeError("the publisher is closed")
        # Encoded here so a bad value fails in the caller, not in the I/O loop.
        encoded = properties if isinstance(properties, bytes) else encode_properties(properties)
        if len(routing_key) > 85 or len(exchange) > 85:  # 85 chars may be 255 UTF-8 bytes
            _short(exchange, "exchange")
            _short(routing_key, "routing key")
        self._queue.append((exchange, routing_key, body, encoded, token))
        # Wake the loop only when it can act on this message right now: while the window is full
        # or the link is down, the confirm / ready handlers drain the queue themselves. Waking per
        # message would cost a pipe write each.
        if (
            self._ready
            and not self._wake_scheduled
            and len(self._unconfirmed) < self.window
            and self._ioloop is not None
        ):
            self._wake_scheduled = True
            self._ioloop.add_callback_threadsafe(self._on_wake)

    def withdraw(self) -> list[object]:
        """Take back every message still waiting in the queue (never sent); return their tokens.

        For a caller with a better place for them while the broker is away (the bridge's
        spool). No outcome is ever reported for a withdrawn message; messages already published
        are not affected. Thread-safe.
        """
        tokens: list[object] = []
        queue = self._queue
        while True:
            try:
                tokens.append(queue.popleft()[4])
            except IndexError:
                break
        if tokens and self._flushing:
            with self._settled:
                self._settled.notify_all()
        return tokens

    def flush(self, timeout: float) -> bool:
        """Wait until every queued message is settled; False if ``timeout`` seconds pass first."""
        with self._settled:
            self._flushing += 1
            try:
                return self._settled.wait_for(lambda: self.pending == 0, timeout)
            finally:
                self._flushing -= 1

    def close(self, timeout: float = 10.0) -> bool:
        """Stop accepting messages, wait for outstanding confirms, then disconnect.

        Messages still unsettled after ``timeout`` seconds are reported FAILED (on this thread if
        the loop thread has already ended). Idempotent. Not from ``on_result``.

        Returns:
            True when every message was settled by the broker before closing.
        """
        self._accepting = False
        thread = self._thread
        if thread is threading.current_thread():
            raise RuntimeError("close() cannot be called from on_result (it waits for that thread)")
        if thread is None or not thread.is_alive():
            # No loop thread (never started, or it already ended): settle what is left here.
            leftover = len(self._queue)
            self._fail_queued()
            return leftover == 0
        settled = self.flush(timeout)
        self._ioloop.add_callback_threadsafe(self._begin_close)
        thread.join(timeout=max(5.0, self._connect_timeout))
        if thread.is_alive():
            log.warning("amqp publisher thread did not stop url=%s", self.url)
        else:
            self._fail_queued()  # a publish() that raced with close() still gets its outcome
        log.info(
            "amqp publisher closed url=%s confirmed=%d nacked=%d returned=%d failed=%d",
            self.url,
            self.confirmed,
            self.nacked,
            self.returned,
            self.failed,
        )
        return settled

    # -- loop thread --------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._connect()
            self._ioloop.start()
        except Exception:
            if self._closing:
                # pika 1.4 trips over its own assertion (it reports an exception class, not an
                # instance) when a connection is closed during the AMQP handshake; the stream is
                # already torn down by then, so this is the end we asked for.
                log.debug("amqp loop ended while closing url=%s", self.url, exc_info=True)
            else:
                log.exception("amqp publisher loop crashed url=%s", self.url)
            if not self._started.is_set():
                self._start_error = self._start_error or "internal error (see the log)"
                self._started.set()
        finally:
            self._accepting = False
            self._ready = False
            self._fail_unconfirmed()
            self._fail_queued()
            self._ioloop.close()

    def _connect(self) -> None:
        self._reconnect_timer = None
        if self._closing:
            return
        node = self.settings.brokers[self._node % self._nodes]
        self.url = node
        params = connection_parameters(
            self.settings,
            timeout=self._connect_timeout,
            heartbeat=self._heartbeat,
            name=self._connection_name,
            node=node,
        )
        self._connection = _BatchingConnection(
            params,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_connection_open_error,
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self._ioloop,
        )

    def _on_connection_open(self, connection: Any) -> None:
        connection.add_on_connection_blocked_callback(self._on_blocked)
        connection.add_on_connection_unblocked_callback(self._on_unblocked)
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_connection_open_error(self, _connection: Any, error: BaseException) -> None:
        self._connection = None
        reason = describe_error(error)
        self._node += 1
        self._tried += 1
        if self._tried < self._nodes and not self._closing:
            log.warning("amqp node unreachable url=%s reason=%s trying=next", self.url, reason)
            self._reconnect_timer = self._ioloop.call_later(0, self._connect)
            return
        self._tried = 0
        # A refused certificate stays refused: not retried even by start(retry=True).
        problem = None if self._started.is_set() else certificate_problem(error)
        if self._closing:
            self._finish()
        elif not self._started.is_set() and (not self._retry_start or problem is not None):
            self._certificate_problem = problem
            self._start_error = reason
            self._started.set()
            self._ioloop.stop()
        else:
            if not self._started.is_set():  # start(retry=True): report, keep trying
                self._start_error = reason
                self._started.set()
            delay = self._schedule_reconnect()
            log.warning(
                "amqp reconnect failed url=%s reason=%s queued=%d retry_in_s=%.2f",
                self.url,
                reason,
                len(self._queue),
                delay,
            )

    def _on_channel_open(self, channel: Any) -> None:
        channel.add_on_close_callback(self._on_channel_closed)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(
            ack_nack_callback=self._on_confirm,
            callback=lambda _frame: self._declare(channel, 0),
        )

    def _declare(self, channel: Any, index: int) -> None:
        if index == len(EXCHANGES):
            self._declare_dead_letter_queue(channel)
            return
        name, kind = EXCHANGES[index]
        channel.exchange_declare(
            exchange=name,
            exchange_type=kind,
            durable=True,
            callback=lambda _frame: self._declare(channel, index + 1),
        )

    def _declare_dead_letter_queue(self, channel: Any) -> None:
        """Declare and bind the dead-letter queue on a channel of its own, then go on.

        An existing queue is taken as it is, whatever its type (passive declare first). A
        classic one whose cluster node is down cannot be declared anywhere (404): logged, and
        publishing goes on without it. Any other refusal ends the connection as before.
        """
        queue = self._dead_letter_queue
        connection = self._connection
        if not queue or connection is None:
            self._declare_own_queue(channel)
            return
        state = {"passive": True, "done": False}

        def finish() -> None:
            if not state["done"]:
                state["done"] = True
                self._declare_own_queue(channel)

        def bind(side: Any) -> None:
            def bound(_frame: Any) -> None:
                finish()
                side.close()

            side.queue_bind(queue, DEAD_EXCHANGE, routing_key="#", callback=bound)

        def on_open(side: Any) -> None:
            side.add_on_close_callback(on_close)
            side.queue_declare(
                queue, passive=state["passive"], durable=True, callback=lambda _f: bind(side)
            )

        def on_close(_side: Any, reason: BaseException) -> None:
            if state["done"] or not isinstance(reason, pika_errors.ChannelClosedByBroker):
                return
            if reason.reply_code == 404 and HOME_NODE_DOWN in reason.reply_text:
                log.warning(
                    "amqp dead-letter queue unavailable url=%s queue=%s reason=%s",
                    self.url,
                    queue,
                    reason.reply_text,
                )
                finish()
            elif reason.reply_code == 404 and state["passive"] and connection.is_open:
                state["passive"] = False  # it does not exist yet: create it
                connection.channel(on_open_callback=on_open)
            else:
                self._on_channel_closed(channel, reason)

        connection.channel(on_open_callback=on_open)

    def _declare_own_queue(self, channel: Any) -> None:
        own = self._own_queue
        if own is None:
            self._on_channel_ready(channel)
            return

        def bind(_frame: Any) -> None:
            channel.queue_bind(
                own.name,
                own.exchange,
                routing_key=own.name,
                callback=lambda _frame: self._on_channel_ready(channel),
            )

        channel.exchange_declare(
            exchange=own.exchange,
            exchange_type="topic",
            durable=True,
            callback=lambda _frame: channel.queue_declare(
                own.name, durable=True, arguments=dict(own.arguments), callback=bind
            ),
        )

    def _on_channel_ready(self, channel: Any) -> None:
        self._channel = channel
        self._tag = 0
        self._backoff.reset()
        self._tried = 0
        self._was_ready = True
        self._ready = True
        if self._started.is_set():
            self.reconnects += 1
            log.info("amqp reconnected url=%s queued=%d", self.url, len(self._queue))
        else:
            self._started.set()
        self._drain()

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is not self._channel and self._channel is not None:
            return
        self._ready = False
        self._channel = None
        self._fail_unconfirmed()
        connection = self._connection
        if isinstance(reason, pika_errors.ChannelClosedByBroker):
            text = describe_error(reason)
            if not self._started.is_set():
                self._start_error = text
            else:
                log.warning("amqp channel closed by the broker url=%s reason=%s", self.url, text)
        # The channel is our only one: start over on a fresh connection (which re-declares the
        # topology), the same path as a lost connection.
        if connection is not None and connection.is_open:
            connection.close()

    def _on_connection_closed(self, _connection: Any, reason: BaseException) -> None:
        self._connection = None
        self._channel = None
        self._ready = False
        self._fail_unconfirmed()
        if self._closing:
            self._finish()
        elif not self._started.is_set() and not self._retry_start:
            self._start_error = self._start_error or describe_error(reason)
            self._started.set()
            self._ioloop.stop()
        else:
            if not self._started.is_set():  # start(retry=True): report, keep trying
                self._start_error = self._start_error or describe_error(reason)
                self._started.set()
            lost = self.url
            # Another node of the cluster is tried at once; one node alone only after a backoff.
            failover = self._was_ready and self._nodes > 1
            self._was_ready = False
            self._node += 1
            log.warning(
                "amqp connection lost url=%s reason=%s queued=%d retry_in_s=%.2f",
                lost,
                describe_error(reason),
                len(self._queue),
                self._schedule_reconnect(immediately=failover),
            )

    def _schedule_reconnect(self, *, immediately: bool = False) -> float:
        """Arrange the next connection attempt (jittered exponential backoff); returns the delay."""
        delay = 0.0 if immediately else self._backoff.next_delay()
        self._reconnect_timer = self._ioloop.call_later(delay, self._connect)
        return delay

    def _on_blocked(self, _connection: Any, _frame: Any) -> None:
        log.warning("amqp broker blocked publishing (resource alarm) url=%s", self.url)

    def _on_unblocked(self, _connection: Any, _frame: Any) -> None:
        log.info("amqp broker unblocked publishing url=%s", self.url)

    def _on_wake(self) -> None:
        self._wake_scheduled = False
        self._drain()

    def _drain(self) -> None:
        channel = self._channel
        if channel is None or not self._ready:
            return
        queue = self._queue
        unconfirmed = self._unconfirmed
        room = self.window - len(unconfirmed)
        connection = self._connection
        publish = connection.publish
        connection.hold()
        try:
            while room > 0 and queue:
                item = queue.popleft()
                exchange, routing_key, body, encoded, token = item
                try:
                    publish(channel, exchange, routing_key, body, encoded)
                except (pika_errors.AMQPChannelError, pika_errors.AMQPConnectionError):
                    # Not sent: keep it first in line for the next channel.
                    queue.appendleft(item)
                    return
                self._tag += 1
                unconfirmed[self._tag] = _Delivery(token, exchange, routing_key, body)
                room -= 1
                self.published += 1
        finally:
            connection.release()
        self.peak_unconfirmed = max(self.peak_unconfirmed, len(unconfirmed))

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        outcome = Outcome.CONFIRMED if isinstance(method, pika.spec.Basic.Ack) else Outcome.NACKED
        tag: int = method.delivery_tag
        unconfirmed = self._unconfirmed
        if method.multiple:
            while unconfirmed and (tag == 0 or next(iter(unconfirmed)) <= tag):
                self._settle(unconfirmed.popitem(last=False)[1], outcome)
        else:
            delivery = unconfirmed.pop(tag, None)
            if delivery is not None:
                self._settle(delivery, outcome)
        self._drain()
        self._notify_if_settled()

    def _on_return(self, _channel: Any, method: Any, _properties: Any, body: bytes) -> None:
        # basic.return carries no delivery tag. RabbitMQ sends it before the ack of the same
        # message and in publish order, so the returned message is the oldest unconfirmed one
        # with the same exchange, routing key and body that was not already returned.
        for delivery in self._unconfirmed.values():
            if (
                not delivery.returned
                and delivery.routing_key == method.routing_key
                and delivery.exchange == method.exchange
                and delivery.body == body
            ):
                delivery.returned = True
                self.returned += 1
                log.debug(
                    "amqp message returned exchange=%s routing_key=%s reply=%s",
                    method.exchange,
                    method.routing_key,
                    method.reply_text,
                )
                self._report(delivery.token, Outcome.RETURNED)
                return
        log.warning(
            "amqp return matched no unconfirmed message exchange=%s routing_key=%s",
            method.exchange,
            method.routing_key,
        )

    def _settle(self, delivery: _Delivery, outcome: Outcome) -> None:
        if delivery.returned:
            return  # its outcome (RETURNED) was reported when the return arrived
        if outcome is Outcome.CONFIRMED:
            self.confirmed += 1
        else:
            self.nacked += 1
        self._report(delivery.token, outcome)

    def _report(self, token: object, outcome: Outcome) -> None:
        try:
            self._on_result(token, outcome)
        except Exception:
            # A faulty handler must not take the I/O loop (and every other message) down.
            log.exception("amqp on_result handler raised outcome=%s", outcome)

    def _fail_unconfirmed(self) -> None:
        if not self._unconfirmed:
            return
        lost = list(self._unconfirmed.values())
        self._unconfirmed.clear()
        for delivery in lost:
            if not delivery.returned:
                self.failed += 1
                self._report(delivery.token, Outcome.FAILED)
        self._notify_if_settled()

    def _fail_queued(self) -> None:
        while self._queue:
            token = self._queue.popleft()[4]
            self.failed += 1
            self._report(token, Outcome.FAILED)
        self._notify_if_settled()

    def _notify_if_settled(self) -> None:
        if self._flushing and self.pending == 0:
            with self._settled:
                self._settled.notify_all()

    def _begin_close(self) -> None:
        self._closing = True
        self._accepting = False
        if self._reconnect_timer is not None:
            self._ioloop.remove_timeout(self._reconnect_timer)
            self._reconnect_timer = None
        connection = self._connection
        if connection is not None and not (connection.is_closing or connection.is_closed):
            connection.close()  # -> _on_connection_closed / _on_connection_open_error -> _finish
        else:
            self._finish()

    def _finish(self) -> None:
        self._ready = False
        self._fail_unconfirmed()
        self._fail_queued()
        self._ioloop.stop()


def describe_error(error: BaseException) -> str:  # noqa: PLR0911 - one flat case per failure
    """One line saying why a pika connection or channel failed, without pika's wrapping."""
    cause = _root_cause(error)
    if isinstance(cause, pika_errors.ProbableAuthenticationError):
        return "login refused (wrong user name or password?)"
    if isinstance(cause, pika_errors.ProbableAccessDeniedError):
        return f"access to the virtual host refused ({_broker_text(cause)})"
    if isinstance(cause, pika_errors.ConnectionClosedByBroker | pika_errors.ChannelClosedByBroker):
        return f"closed by the broker: {cause.reply_code} {cause.reply_text}"
    if isinstance(cause, pika_errors.IncompatibleProtocolError):
        return "not an AMQP 0-9-1 server, or it hung up during the handshake"
    if isinstance(cause, ssl.SSLError):
        return f"TLS handshake failed ({cause})"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused (is the broker running?)"
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve the host name ({cause.strerror})"
    if isinstance(cause, TimeoutError | pika_workflow.AMQPConnectorStackTimeout):
        return "timed out"
    if isinstance(cause, OSError) and cause.strerror:
        return str(cause.strerror)
    return str(cause) or type(cause).__name__


def _root_cause(error: BaseException) -> BaseException:
    """Unwrap pika's connection-workflow exceptions down to the one that says what happened."""
    while True:
        if isinstance(error, pika_workflow.AMQPConnectionWorkflowFailed) and error.exceptions:
            error = error.exceptions[-1]
        elif isinstance(error, pika_workflow.AMQPConnectorPhaseErrorBase):
            error = error.exception
        elif (
            isinstance(
                error, pika_workflow.AMQPConnectorException | pika_errors.AMQPConnectionError
            )
            and not isinstance(error, pika_workflow.AMQPConnectionWorkflowFailed)
            and error.args
            and isinstance(error.args[0], BaseException)
        ):
            error = error.args[0]
        else:
            return error


def _broker_text(error: BaseException) -> str:
    text = str(error.args[0]) if error.args else str(error)
    quoted = re.search(r"'(.+)'", text)  # pika wraps the broker's reply text in its own words
    return quoted.group(1) if quoted else text

"""The site side of the lean WAN uplink: many messages per AMQP publish, compressed.

:class:`PackingPublisher` is a :class:`~iotpipe.amqp.Publisher` (the bridge cannot tell it from
:class:`~iotpipe.amqp.ConfirmingPublisher`) that collects what the bridge publishes into packs
(:mod:`iotpipe.pack`) and publishes each pack, with one confirm, through the publisher it wraps.
A pack's outcome is every member's outcome: the bridge's in-order MQTT acks, its spool on
failure and its spool drain work as they do one message at a time.

A pack is sealed and sent when it holds ``max_messages``, when the next message would take it
past ``max_bytes`` (uncompressed), or when its oldest message has waited ``max_delay`` seconds;
the last is checked by :meth:`PackingPublisher.tick`, which the bridge calls on every loop step
(every few milliseconds).

The central side is :mod:`bridge.unpack` (``iotpipe unpack``). Both declare the uplink queue with
:func:`uplink_queue`'s arguments, so either may come up first.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from iotpipe.amqp import (
    APP_ID,
    DEAD_LETTER_QUEUE,
    HEADER_VERSION,
    UPLINK_EXCHANGE,
    UPLINK_QUEUE,
    MessageProperties,
    Outcome,
    OwnQueue,
    Publisher,
    PublisherFactory,
    ResultHandler,
    encode_properties,
)
from iotpipe.amqp_consumer import QueueSpec
from iotpipe.pack import CONTENT_TYPE, MESSAGE_TYPE, PackedMessage, PackEncoder, record_size

__all__ = [
    "HEADER_PACK_COUNT",
    "PACK_CONTRACT",
    "PackingPublisher",
    "own_uplink_queue",
    "pack_properties",
    "uplink_queue",
]

PACK_CONTRACT = "1.2"
"""The wire contract version that introduced packs (the ``x-iotpipe-version`` of a pack)."""
HEADER_PACK_COUNT = "x-iotpipe-pack-count"
"""Header of a pack's AMQP message: how many messages it holds (a decimal string)."""


def uplink_queue(name: str = UPLINK_QUEUE) -> QueueSpec:
    """The uplink queue: durable, quorum, dead-lettering to ``iotpipe.dead`` after 5 deliveries.

    Bound to ``iotpipe.uplink`` with its own name: packs sent with routing key = ``name`` reach
    it, and only it (several uplink queues, say one per region, do not share packs).

    A pack that keeps failing (its unpacker crashes on it, say) ends in ``iotpipe.dead`` with
    routing key ``unpack.delivery_limit`` instead of blocking the queue.
    """
    return QueueSpec(
        name=name,
        bindings=(name,),
        exchange=UPLINK_EXCHANGE,
        dead_letter_routing_key="unpack.delivery_limit",
        dead_letter_queue=DEAD_LETTER_QUEUE,
    )


def own_uplink_queue(name: str = UPLINK_QUEUE) -> OwnQueue:
    """:func:`uplink_queue` as the bridge's publisher declares it."""
    spec = uplink_queue(name)
    return OwnQueue(spec.name, spec.exchange, spec.arguments())


def pack_properties(pack_id: str, count: int, sent_at: float) -> bytes:
    """The encoded AMQP properties of a pack's message (docs/wire.md, "Packed uplink")."""
    return encode_properties(
        MessageProperties(
            message_id=pack_id,
            content_type=CONTENT_TYPE,
            type=MESSAGE_TYPE,
            timestamp=int(sent_at),
            app_id=APP_ID,
            headers={HEADER_VERSION: PACK_CONTRACT, HEADER_PACK_COUNT: str(count)},
        )
    )


@dataclass(slots=True)
class _Pack:
    """A pack being filled or in flight: its members and their tokens, in publish order."""

    opened: float
    messages: list[PackedMessage] = field(default_factory=list)
    tokens: list[object] = field(default_factory=list)
    size: int = 0


class PackingPublisher:
    """A :class:`~iotpipe.amqp.Publisher` that sends what it is given in packs; module docstring.

    Not thread-safe on the publishing side: :meth:`publish`, :meth:`tick`, :meth:`withdraw`
    and :meth:`close` are for one thread (the bridge's). Outcomes arrive on the wrapped
    publisher's thread and are passed on from there, one per member.

    Args:
        publisher: builds the wrapped publisher (e.g. a ConfirmingPublisher declaring
            :func:`own_uplink_queue`), given the handler for the packs' outcomes.
        on_result: ``on_result(token, outcome)`` once per message published here.
        max_messages: a pack is sent when it holds this many messages.
        max_bytes: ... or when the next message would take it past this many bytes
            (uncompressed; a single larger message travels alone).
        max_delay: ... or when its oldest message has waited this many seconds (see
            :meth:`tick`).
        level: zstd level.
        exchange: where packs go.
        routing_key: their routing key: the uplink queue's name.
        clock: monotonic seconds (tests inject their own).

    Attributes:
        packs_sent: packs sealed and handed to the wrapped publisher.
        bytes_in: uncompressed bytes of those packs.
        bytes_out: their bytes as sent (header and zstd frame).
    """

    def __init__(
        self,
        publisher: PublisherFactory,
        on_result: ResultHandler,
        *,
        max_messages: int = 500,
        max_bytes: int = 256 * 1024,
        max_delay: float = 0.25,
        level: int = 3,
        exchange: str = UPLINK_EXCHANGE,
        routing_key: str = UPLINK_QUEUE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_messages < 1 or max_bytes < 1 or max_delay < 0:
            raise ValueError("max_messages and max_bytes must be positive, max_delay not negative")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_delay = max_delay
        self.exchange = exchange
        self.routing_key = routing_key
        self.packs_sent = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self._encoder = PackEncoder(level)
        self._clock = clock
        self._on_result = on_result
        self._open: _Pack | None = None
        self._lock = threading.Lock()
        self._in_flight = 0  # members of packs handed to the wrapped publisher, not settled
        self._inner: Publisher = publisher(self._on_pack_result)

    # -- Publisher protocol -----------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the wrapped publisher is connected."""
        return self._inner.connected

    @property
    def pending(self) -> int:
        """Messages not yet settled: in the open pack, or in packs sent and unconfirmed."""
        open_pack = self._open
        return (len(open_pack.tokens) if open_pack is not None else 0) + self._in_flight

    @property
    def reconnects(self) -> int:
        """The wrapped publisher's reconnections."""
        return self._inner.reconnects

    def start(self, timeout: float | None = None, *, retry: bool = False) -> None:
        """Start the wrapped publisher (as :meth:`ConfirmingPublisher.start` does)."""
        self._inner.start(timeout, retry=retry)

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: MessageProperties | bytes,
        token: object,
    ) -> None:
        """Add one message to the open pack; send the pack if that fills it."""
        encoded = properties if isinstance(properties, bytes) else encode_properties(properties)
        size = record_size(exchange, routing_key, encoded, body)
        pack = self._open
        if pack is not None and pack.size + size > self.max_bytes:
            self._seal()
            pack = None
        if pack is None:
            pack = self._open = _Pack(self._clock())
        pack.messages.append(PackedMessage(exchange, routing_key, encoded, body))
        pack.tokens.append(token)
        pack.size += size
        if len(pack.tokens) >= self.max_messages or pack.size >= self.max_bytes:
            self._seal()

    def tick(self) -> None:
        """Send the open pack if its oldest message has waited ``max_delay``; call often."""
        pack = self._open
        if pack is not None and self._clock() - pack.opened >= self.max_delay:
            self._seal()

    def flush(self) -> None:
        """Send the open pack now, however full."""
        if self._open is not None:
            self._seal()

    def withdraw(self) -> list[object]:
        """Take back the members of packs never sent and of the open pack; their tokens."""
        tokens: list[object] = []
        for pack in self._inner.withdraw():
            assert isinstance(pack, _Pack)
            with self._lock:
                self._in_flight -= len(pack.tokens)
            tokens += pack.tokens
        if self._open is not None:
            tokens += self._open.tokens
            self._open = None
        return tokens

    def close(self, timeout: float = 10.0) -> bool:
        """Send the open pack, then close the wrapped publisher (waiting for confirms)."""
        self.flush()
        return self._inner.close(timeout)

    # -- internals ----------------------------------------------------------------------------

    def _seal(self) -> None:
        pack = self._open
        assert pack is not None
        self._open = None
        data = self._encoder.encode(pack.messages)
        pack.messages = []  # the encoded pack is all the publisher needs from here
        count = len(pack.tokens)
        properties = pack_properties(str(uuid.uuid4()), count, time.time())
        with self._lock:
            self._in_flight += count
        self.packs_sent += 1
        self.bytes_in += pack.size
        self.bytes_out += len(data)
        self._inner.publish(self.exchange, self.routing_key, data, properties, pack)

    def _on_pack_result(self, token: object, outcome: Outcome) -> None:
        assert isinstance(token, _Pack)
        with self._lock:
            self._in_flight -= len(token.tokens)
        on_result = self._on_result
        for member in token.tokens:
            on_result(member, outcome)

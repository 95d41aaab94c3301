"""AMQP consumer side: batches of deliveries from one RabbitMQ queue, on the caller's thread.

:class:`BatchConsumer` is for a single-threaded worker that loops *fetch a batch -> write it ->
acknowledge it*. It runs a pika ``BlockingConnection`` on the caller's thread: nothing happens on
the connection (deliveries, heartbeats) except inside :meth:`~BatchConsumer.next_batch`,
:meth:`~BatchConsumer.sleep` and the acknowledging methods, so call ``next_batch`` or ``sleep`` at
least every ``heartbeat`` seconds.

Usage::

    consumer = BatchConsumer(settings, QueueSpec())
    consumer.connect(retry=True)               # declares exchanges, queue and bindings
    while not stopping:
        batch = consumer.next_batch(1000, 0.05)
        if batch:
            store.write(batch)
            consumer.ack_through(batch[-1])
    consumer.close()                           # whatever was not acked goes back to the queue

Connections come and go. Every delivery carries the ``epoch`` (connection generation) it arrived
on; after a lost connection the broker redelivers everything unacknowledged, so settling a
delivery of an older epoch is a no-op (the store deduplicates the redelivered copy).
``next_batch`` never raises for a lost connection: it reconnects with jittered exponential
backoff and returns what is valid.

Poison messages: the queue is declared with a delivery limit (quorum queues) and dead-letters to
:data:`~iotpipe.amqp.DEAD_EXCHANGE` with routing key ``consumer.delivery_limit`` once a message
has been requeued too often; :meth:`~BatchConsumer.dead_letter` sends one there at once, with the
reason in the routing key (``consumer.<reason>``) and the error in ``x-iotpipe-error``.

:meth:`~BatchConsumer.publish` sends the consumer's own messages on the same channel in confirm
mode, to exchanges named in ``publish_exchanges`` (declared on every connect);
:meth:`~BatchConsumer.publish_many` sends several (receipts) on a channel of their own and waits
for all their confirms at once: one round trip to the broker for all of them, not one each.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, Protocol

# pika ships no type information; everything taken from it stays inside this module.
import pika  # type: ignore[import-untyped]
from pika import exceptions as pika_errors

from iotpipe import compat
from iotpipe.amqp import (
    DEAD_EXCHANGE,
    EXCHANGES,
    HEADER_ERROR,
    HOME_NODE_DOWN,
    TELEMETRY_EXCHANGE,
    MessageProperties,
    connection_parameters,
    declare_topology,
    describe_error,
    vhost_of,
)
from iotpipe.connection import certificate_problem
from iotpipe.errors import CertificateError, ConfigError, ConnectError
from iotpipe.pacing import Backoff
from iotpipe.settings import AmqpSettings, BrokerUrl

__all__ = ["BatchConsumer", "Delivery", "DeliverySource", "Outgoing", "QueueSpec", "batch_wait"]

log = logging.getLogger(__name__)

_SLICE = 0.1
"""Longest single wait on the socket: how quickly next_batch/sleep notice stop()."""

_CONNECT_TIMEOUT = 10.0
"""Limit for one connection attempt (TCP, TLS and AMQP handshake, declarations)."""

_CONFIRM_TIMEOUT = 30.0
"""Longest wait for the broker to confirm a dead letter before the connection is given up."""

_BLOCKED_TIMEOUT = 60.0
"""Longest the broker may block the connection (resource alarm) before it is given up."""

_ERROR_LIMIT = 1000
"""Characters of an error message kept in a dead letter's ``x-iotpipe-error`` header."""

_REASON = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PERSISTENT = 2
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_DELIVERY_COUNT = "x-delivery-count"
_QUORUM_SINCE = (3, 8)

# Which QueueSpec field an argument RabbitMQ reports as "inequivalent" comes from.
_ARGUMENT_FIELDS = {
    "x-queue-type": "queue_type",
    "x-delivery-limit": "delivery_limit",
    "x-dead-letter-routing-key": "dead_letter_routing_key",
    "x-message-ttl": "message_ttl",
    "x-max-length": "max_length",
    "x-quorum-initial-group-size": "quorum_group_size",
}
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for queue '[^']*' in vhost '[^']*': "
    r"received (?P<ours>.+?) but current is (?P<theirs>.+)$"
)
_VALUE = re.compile(r"the value ('.*?') of type '\w+'")


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """The queue a consumer owns, declared (idempotently) on every connect.

    Attributes:
        name: the queue's name.
        bindings: binding keys on ``exchange``.
        queue_type: ``quorum`` (replicated, with a delivery limit; RabbitMQ 3.8+) or ``classic``.
        delivery_limit: quorum queues only: deliveries after which a message that keeps being
            requeued is dead-lettered (``x-delivery-limit``; RabbitMQ 3.10 has no default, so a
            poison message would otherwise loop forever).
        dead_letter_routing_key: routing key of messages the broker dead-letters to
            :data:`~iotpipe.amqp.DEAD_EXCHANGE`.
        dead_letter_queue: a durable queue bound with ``#`` to the dead-letter exchange, so
            dead letters are kept; ``""`` declares none (another component owns it).
        exchange: the topic exchange the bindings are on (declared durable if it is not one of
            the contract's :data:`~iotpipe.amqp.EXCHANGES`).
        dead_letter: dead-letter to :data:`~iotpipe.amqp.DEAD_EXCHANGE`; off for messages that
            may simply vanish (expired or pushed out by ``max_length``).
        message_ttl: milliseconds a message may wait before it expires (``x-message-ttl``).
        max_length: ready messages kept at most; the oldest are dropped (``x-overflow``
            ``drop-head``).
        quorum_group_size: quorum queues only: on how many cluster nodes the queue is created
            (``x-quorum-initial-group-size``); None is RabbitMQ's default, every node in the
            cluster at the time. RabbitMQ compares it like the other arguments: changing it
            means deleting the queue (or ``rabbitmq-queues grow``/``shrink`` and a new name).
    """

    name: str = "iotpipe.store"
    bindings: tuple[str, ...] = ("iotpipe.v1.#",)
    queue_type: Literal["quorum", "classic"] = "quorum"
    delivery_limit: int = 5
    dead_letter_routing_key: str = "consumer.delivery_limit"
    dead_letter_queue: str = ""
    exchange: str = TELEMETRY_EXCHANGE
    dead_letter: bool = True
    message_ttl: int | None = None
    max_length: int | None = None
    quorum_group_size: int | None = None

    def __post_init__(self) -> None:
        if not self.name or len(self.name.encode()) > 255:
            raise ConfigError("queue.name", self.name, "1 to 255 bytes")
        if self.queue_type not in ("quorum", "classic"):
            raise ConfigError("queue.queue_type", self.queue_type, "'quorum' or 'classic'")
        if self.delivery_limit < 1:
            raise ConfigError("queue.delivery_limit", self.delivery_limit, "at least 1")
        if self.message_ttl is not None and self.message_ttl < 0:
            raise ConfigError("queue.message_ttl", self.message_ttl, "0 or more milliseconds")
        if self.max_length is not None and self.max_length < 1:
            raise ConfigError("queue.max_length", self.max_length, "at least 1")
        if self.quorum_group_size is not None and self.quorum_group_size < 1:
            raise ConfigError("queue.quorum_group_size", self.quorum_group_size, "at least 1")

    def arguments(self) -> dict[str, Any]:
        """The ``x-`` arguments the queue is declared with."""
        args: dict[str, Any] = {}
        if self.dead_letter:
            args["x-dead-letter-exchange"] = DEAD_EXCHANGE
            args["x-dead-letter-routing-key"] = self.dead_letter_routing_key
        if self.queue_type == "quorum":
            args["x-queue-type"] = "quorum"
            args["x-delivery-limit"] = self.delivery_limit
            if self.quorum_group_size is not None:
                args["x-quorum-initial-group-size"] = self.quorum_group_size
        if self.message_ttl is not None:
            args["x-message-ttl"] = self.message_ttl
        if self.max_length is not None:
            args["x-max-length"] = self.max_length
            args["x-overflow"] = "drop-head"
        return args


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message delivered to the consumer and not yet settled.

    Attributes:
        tag: the delivery tag on its connection.
        epoch: the connection generation it arrived on (:attr:`BatchConsumer.epoch`); settling
            a delivery of an older epoch does nothing (the broker redelivers it).
        routing_key: its routing key, ``iotpipe.v1.{site}.{device}.telemetry``.
        body: the payload bytes.
        message_id: the envelope ``id`` set by the bridge.
        content_type: MIME type of the body.
        type: ``iotpipe.telemetry`` or ``iotpipe.status``.
        headers: the AMQP headers (empty mapping when there are none).
        redelivered: the broker delivered it before (to us or another consumer).
        delivery_count: earlier deliveries, from a quorum queue's ``x-delivery-count`` header (0 on
            the first delivery and always 0 on classic queues).
        timestamp: when the bridge received it, Unix seconds.
        app_id: who published it.
    """

    tag: int
    epoch: int
    routing_key: str
    body: bytes
    message_id: str | None
    content_type: str | None
    type: str | None
    headers: Mapping[str, Any]
    redelivered: bool
    delivery_count: int
    timestamp: int | None = None
    app_id: str | None = None


class Outgoing(NamedTuple):
    """One message for :meth:`BatchConsumer.publish_many`."""

    exchange: str
    routing_key: str
    body: bytes
    properties: MessageProperties


class DeliverySource(Protocol):
    """What the store consumer needs of :class:`BatchConsumer`: its seam to RabbitMQ.

    :class:`iotpipe.testing.MemorySource` is the in-memory one. Settling a delivery of an older
    connection (``epoch``) does nothing: the broker hands it out again.
    """

    @property
    def connected(self) -> bool:
        """Whether the connection is open and the consumer registered."""
        ...

    @property
    def reconnects(self) -> int:
        """Connections re-established after a loss."""
        ...

    def connect(self, timeout: float | None = ..., *, retry: bool = ...) -> None:
        """Connect and start consuming (raises ConnectError; with ``retry`` keeps trying)."""

    def next_batch(self, max_messages: int, max_wait: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, as soon as those received are drained.

        Waits at most ``max_wait`` for a first delivery (else ``[]``); a batch that keeps
        growing is cut ``max_wait`` after its first delivery arrived.
        """
        ...

    def ack_through(self, last: Delivery) -> None:
        """Acknowledge ``last`` and every earlier unsettled delivery of its connection."""

    def ack(self, d: Delivery) -> None:
        """Acknowledge one delivery (no-op if stale or already settled)."""

    def requeue(self, d: Delivery) -> None:
        """Return one delivery to the queue (counts towards the delivery limit)."""

    def dead_letter(self, d: Delivery, reason: str, error: str) -> bool:
        """Send ``d`` to the dead-letter exchange, then acknowledge it; True once confirmed."""
        ...

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: MessageProperties,
        *,
        mandatory: bool = ...,
    ) -> bool:
        """Publish one message and wait for the broker's confirm; True once confirmed."""
        ...

    def publish_many(self, messages: Sequence[Outgoing]) -> list[bool]:
        """Publish ``messages``, then wait for their confirms together; True for each confirmed."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait while keeping the connection alive; returns early after :meth:`stop`."""

    def stop(self) -> None:
        """Make waiting calls return promptly (safe from any thread or a signal handler)."""

    def close(self) -> None:
        """Close the connection; what was not acknowledged goes back to the queue."""


class BatchConsumer:
    """Consumes one queue in batches on the caller's thread; see the module docstring.

    Not thread-safe, except :meth:`stop`, which may be called from any thread or a signal
    handler.

    Args:
        settings: URL (credentials, host, port, vhost from its path) and TLS material.
        queue: the queue to declare, bind and consume.
        prefetch: the most unacknowledged deliveries the broker sends ahead (``basic.qos``);
            larger than the batch size keeps the next batch arriving while one is written.
        name: connection name, shown in RabbitMQ's management UI and logs.
        heartbeat: AMQP heartbeat in seconds.
        backoff_min: first reconnect delay in seconds (before jitter); doubles per attempt.
        backoff_max: the longest reconnect delay.
        publish_exchanges: topic exchanges (durable) this consumer publishes to with
            :meth:`publish`, declared on every connect (e.g. :data:`~iotpipe.receipts.EXCHANGE`).

    Attributes:
        reconnects: connections re-established after a loss.
        epoch: the current connection generation (1 after the first connect).
    """

    def __init__(
        self,
        settings: AmqpSettings,
        queue: QueueSpec,
        *,
        prefetch: int = 2000,
        name: str = "iotpipe-consumer",
        heartbeat: int = 30,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        publish_exchanges: tuple[str, ...] = (),
    ) -> None:
        if prefetch < 1 or prefetch > 65535:
            raise ConfigError("prefetch", prefetch, "1 to 65535")
        self.settings = settings
        self.url = settings.broker
        self.queue = queue
        self.prefetch = prefetch
        self.name = name
        self.heartbeat = heartbeat
        self.publish_exchanges = publish_exchanges
        self.reconnects = 0
        self.epoch = 0
        # The first delay falls in [backoff_min, 2 * backoff_min], none beyond backoff_max.
        self._backoff = Backoff(2 * backoff_min, backoff_max, jitter=(0.5, 1.0))
        self._node = 0  # index in settings.brokers of the node the next attempt goes to
        self._server_version = ""

        self._connection: Any = None
        self._channel: Any = None
        self._confirm_channel: Any = None
        # publish_many's channel: its confirms arrive through _on_confirm (tags count from 1).
        self._pipeline_channel: Any = None
        self._pipeline_sent = 0
        self._awaiting: set[int] = set()
        self._confirms: dict[int, bool] = {}
        self._cancelled = False
        self._stopping = False
        self._closed = False

        self._buffer: list[Delivery] = []
        self._buffer_since: float | None = None  # when the oldest buffered delivery arrived
        # Settlement bookkeeping of the current epoch. A multiple ack naming a tag that was
        # already settled alone is a channel error (406 unknown delivery tag), so ack_through
        # must know which tags are settled.
        self._acked_through = 0
        self._settled: set[int] = set()

        self._next_attempt = 0.0

    # -- state --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the connection is open and the consumer registered."""
        channel = self._channel
        return channel is not None and channel.is_open and not self._cancelled

    @property
    def buffered(self) -> int:
        """Deliveries received on the connection and not yet handed out by :meth:`next_batch`."""
        return len(self._buffer)

    @property
    def server_version(self) -> str:
        """The broker's version, e.g. ``"3.10.8"`` (empty before the first connect)."""
        return self._server_version

    # -- connecting ---------------------------------------------------------------------------

    def connect(self, timeout: float | None = None, *, retry: bool = False) -> None:
        """Connect, declare the exchanges, the queue and its bindings, and start consuming.

        Does nothing when already connected.

        Args:
            timeout: seconds for one attempt (default 10); with ``retry``, for all attempts
                (default: no limit).
            retry: keep trying with jittered exponential backoff (one log line per failed
                attempt) instead of raising at the first failure. Returns early, not connected,
                once :meth:`stop` was called.

        Raises:
            ConnectError: the broker is unreachable or refused us (with ``retry``: still so
                when ``timeout`` ran out).
            ConfigError: the queue exists with other arguments, or the broker is too old for
                a quorum queue. Never retried: a person must fix it.
            CertificateError: the broker's TLS certificate failed verification. Never retried.
        """
        if self.connected:
            return
        if self._closed:
            raise RuntimeError("the consumer is closed")
        if not retry:
            self._open(_CONNECT_TIMEOUT if timeout is None else timeout)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopping:
            remaining = _CONNECT_TIMEOUT if deadline is None else deadline - time.monotonic()
            try:
                self._open(min(_CONNECT_TIMEOUT, max(remaining, 0.1)))
            except CertificateError:
                raise  # a person must fix the certificate or the CA: retrying cannot help
            except ConnectError as err:
                delay = self._backoff.next_delay()
                if deadline is not None and time.monotonic() + delay >= deadline:
                    raise
                log.warning(
                    "amqp consumer connect failed url=%s queue=%s attempt=%d reason=%s "
                    "retry_in_s=%.2f",
                    self.url,
                    self.queue.name,
                    self._backoff.attempts,
                    err.reason,
                    delay,
                )
                self._wait(delay)
            else:
                return

    def _open(self, timeout: float) -> None:
        """One round of attempts, a node at a time from the next one (round-robin) until one works.

        Raises:
            ConnectError: every node failed (the last one's reason).
        """
        nodes = self.settings.brokers
        for attempt in range(len(nodes)):
            node = nodes[self._node % len(nodes)]
            self._node += 1
            try:
                self._open_node(node, timeout)
            except ConnectError as err:
                if attempt == len(nodes) - 1:
                    raise
                log.warning(
                    "amqp consumer node unreachable url=%s queue=%s reason=%s trying=next",
                    node,
                    self.queue.name,
                    err.reason,
                )
            else:
                return

    def _open_node(self, node: BrokerUrl, timeout: float) -> None:
        """One connection attempt; on success the consumer is registered and epoch advanced."""
        self.url = node
        params = connection_parameters(
            self.settings, timeout=timeout, heartbeat=self.heartbeat, name=self.name, node=node
        )
        # A broker under a resource alarm stops reading from connections that publish (ours
        # does, dead letters): give up on such a connection rather than hang in an ack.
        params.blocked_connection_timeout = _BLOCKED_TIMEOUT
        try:
            connection = pika.BlockingConnection(params)
        except (pika_errors.AMQPError, OSError) as err:
            problem = certificate_problem(err)
            if problem is not None:
                raise CertificateError("amqp", self.url.redacted(), problem) from None
            raise ConnectError(self.url.redacted(), describe_error(err)) from None
        try:
            version = compat.pika_server_version(connection)
            self._check_server(version)
            # A node that is still booting may accept the connection and then never answer
            # basic.consume on a quorum queue (seen with RabbitMQ 3.10 after a SIGKILL).
            with compat.pika_answer_within(
                connection, timeout, f"declaring and consuming {self.queue.name}"
            ):
                channel = connection.channel()
                self._declare(connection, channel)
                channel.basic_qos(prefetch_count=self.prefetch)
                channel.add_on_cancel_callback(self._on_cancel)
                channel.basic_consume(self.queue.name, self._on_message, auto_ack=False)
        except BaseException as err:
            _close_quietly(connection)
            if isinstance(err, pika_errors.AMQPError | OSError):
                raise ConnectError(self.url.redacted(), _reason(err)) from None
            raise
        # Deliveries that arrived meanwhile wait in pika until process_data_events dispatches
        # them to _on_message, which stamps them with the epoch set here.
        self.epoch += 1
        self._reset_epoch_state()
        first = not self._server_version
        self._server_version = version
        self._connection = connection
        self._channel = channel
        self._backoff.reset()
        if first:
            log.info(
                "amqp consumer connected url=%s queue=%s type=%s server=%s prefetch=%d",
                self.url,
                self.queue.name,
                self.queue.queue_type,
                version,
                self.prefetch,
            )
        else:
            self.reconnects += 1
            log.info(
                "amqp consumer reconnected url=%s queue=%s epoch=%d reconnects=%d",
                self.url,
                self.queue.name,
                self.epoch,
                self.reconnects,
            )

    def _check_server(self, version: str) -> None:
        if self.queue.queue_type != "quorum":
            return
        numbers = re.match(r"(\d+)\.(\d+)", version)
        if numbers is not None and (int(numbers[1]), int(numbers[2])) < _QUORUM_SINCE:
            raise ConfigError(
                "queue.queue_type",
                "quorum",
                f"RabbitMQ {version} has no quorum queues (they need 3.8 or newer): "
                "use queue_type = 'classic' or upgrade the broker",
            )

    def _declare(self, connection: Any, channel: Any) -> None:
        spec = self.queue
        try:
            declare_topology(channel)
            for name in dict.fromkeys((spec.exchange, *self.publish_exchanges)):
                if name not in dict(EXCHANGES):
                    channel.exchange_declare(exchange=name, exchange_type="topic", durable=True)
        except pika_errors.ChannelClosedByBroker as err:
            if err.reply_code != 406:
                raise
            raise ConfigError(
                "amqp exchanges",
                ", ".join(
                    dict.fromkeys(
                        (TELEMETRY_EXCHANGE, DEAD_EXCHANGE, spec.exchange, *self.publish_exchanges)
                    )
                ),
                f"an exchange exists with another type or durability ({err.reply_text}); "
                "they must be durable topic exchanges: delete the wrong one",
            ) from None
        self._declare_dead_letter_queue(connection)
        try:
            channel.queue_declare(spec.name, durable=True, arguments=spec.arguments())
        except pika_errors.ChannelClosedByBroker as err:
            if err.reply_code != 406:
                raise
            raise self._inequivalent(connection, err.reply_text) from None
        for key in spec.bindings:
            channel.queue_bind(spec.name, spec.exchange, routing_key=key)

    def _declare_dead_letter_queue(self, connection: Any) -> None:
        """Declare and bind the dead-letter queue, as it exists if it does (on its own channel).

        An existing queue is taken whatever its type (a cluster's should be a quorum queue,
        made by the operator). A classic one whose node is down cannot be declared anywhere in
        the cluster: that is logged, and the consumer goes on without it.
        """
        queue = self.queue.dead_letter_queue
        if not queue:
            return
        channel = connection.channel()
        try:
            channel.queue_declare(queue, passive=True)
        except pika_errors.ChannelClosedByBroker as err:
            if err.reply_code != 404:
                raise
            if HOME_NODE_DOWN in err.reply_text:
                log.warning(
                    "amqp dead-letter queue unavailable url=%s queue=%s reason=%s",
                    self.url,
                    queue,
                    err.reply_text,
                )
                return
            channel = connection.channel()
            channel.queue_declare(queue, durable=True)
        channel.queue_bind(queue, DEAD_EXCHANGE, routing_key="#")
        channel.close()

    def _inequivalent(self, connection: Any, reply: str) -> ConfigError:
        """The ConfigError for a queue that exists with other arguments (406 on declare).

        RabbitMQ names only the first argument that differs, so the others are found by
        declaring again with each difference learnt so far set to the existing queue's value
        (a declare that matches the existing queue changes nothing).
        """
        spec = self.queue
        vhost = vhost_of(self.url.path)
        delete = "rabbitmqctl delete_queue " + ("" if vhost == "/" else f"-p {vhost} ") + spec.name
        differences: list[tuple[str, str, str]] = []  # (argument, theirs, ours)
        arguments = spec.arguments()
        durable = True
        for _ in range(12):
            found = _INEQUIVALENT.search(reply)
            if found is None or any(arg == found["arg"] for arg, _, _ in differences):
                break  # unparsable, or our guess of their value was wrong: report what we know
            arg = found["arg"]
            ours, theirs = (_VALUE.sub(r"\1", found[side]) for side in ("ours", "theirs"))
            differences.append((arg, theirs, ours))
            if arg == "durable":
                durable = theirs == "'true'"
            elif theirs == "none":
                arguments.pop(arg, None)
            else:
                text = theirs.strip("'")
                arguments[arg] = int(text) if text.isdigit() else text
            try:
                connection.channel().queue_declare(spec.name, durable=durable, arguments=arguments)
            except pika_errors.ChannelClosedByBroker as err:
                if err.reply_code != 406:
                    break
                reply = err.reply_text
            except (pika_errors.AMQPError, OSError):
                break
            else:
                break  # equivalent now: every difference is known
        if not differences:
            return ConfigError(
                "queue.name",
                spec.name,
                f"the queue exists with other arguments ({reply}); delete it ({delete}; its "
                "messages are lost) or use another queue name",
            )
        fields = [_ARGUMENT_FIELDS.get(arg) for arg, _, _ in differences]
        described = ", ".join(
            f"{arg} is {theirs} (we declare {ours})" for arg, theirs, ours in differences
        )
        if all(fields):
            names = " and ".join(f"queue.{field}" for field in fields)
            fix = f"or change {names} to match"
            field = str(fields[0])
            value: object = getattr(spec, field)
        else:
            fix = "or use another queue name"
            field, value = "name", spec.name
        return ConfigError(
            f"queue.{field}",
            value,
            f"queue {spec.name!r} already exists with other arguments: {described}; "
            f"delete it ({delete}; its messages are lost) {fix}",
        )

    # -- consuming ----------------------------------------------------------------------------

    def _on_message(self, _channel: Any, method: Any, props: Any, body: bytes) -> None:
        headers = props.headers
        self._buffer.append(
            Delivery(
                method.delivery_tag,
                self.epoch,
                method.routing_key,
                body,
                props.message_id,
                props.content_type,
                props.type,
                headers if headers is not None else _EMPTY,
                method.redelivered,
                headers.get(_DELIVERY_COUNT, 0) if headers else 0,
                props.timestamp,
                props.app_id,
            )
        )

    def _on_cancel(self, _frame: Any) -> None:
        # The broker cancelled our consumer (queue deleted, or a quorum leader moved): start over
        # on a new connection, which re-declares the queue.
        self._cancelled = True

    def next_batch(self, max_messages: int, max_wait: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, in delivery order, as soon as the socket is drained.

        Waits (at most ``max_wait`` seconds) for the first delivery, then reads on without
        waiting and returns as soon as a read finds nothing new: a batch is what has arrived,
        not what a timer let accumulate (:func:`batch_wait` is the rule). It is cut earlier at
        ``max_messages``, or ``max_wait`` seconds after its first delivery arrived when deliveries
        keep coming faster than they are read. Under load the batches grow by themselves: what
        arrives while the caller writes one is the next. Nothing arriving, it returns ``[]``
        after ``max_wait``; it returns ``[]`` promptly once :meth:`stop` was called.

        A lost connection is logged and re-established with backoff (``epoch`` advances);
        deliveries buffered from the old connection are dropped, because the broker redelivers
        them. While the broker stays away each call waits about ``max_wait`` (plus at most one
        connection attempt) and returns ``[]``.

        Raises:
            ConfigError: on reconnecting, the queue turned out to have been re-declared with other
                arguments.
        """
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        buffer = self._buffer
        started = time.monotonic()
        read = drained = False
        while not (self._stopping or self._closed):
            if len(buffer) >= max_messages:
                break
            if not self.connected:
                if self._channel is not None:  # cancelled, or the channel closed under us
                    self._lost(
                        "the broker cancelled the consumer (queue deleted?)"
                        if self._cancelled
                        else "the channel was closed"
                    )
                if not self._reconnect(started + max_wait):
                    return []
                read = drained = False
                continue
            now = time.monotonic()
            if buffer and self._buffer_since is None:  # dispatched outside _poll (a publish)
                self._buffer_since = now
            since = self._buffer_since
            wait = batch_wait(
                len(buffer),
                max_messages,
                max_wait,
                age=0.0 if since is None else now - since,
                waited=now - started,
                read=read,
                drained=drained,
            )
            if wait is None:
                break
            before = len(buffer)
            self._poll(min(wait, _SLICE))
            read = True
            drained = wait == 0.0 and len(buffer) == before
        if self._stopping or self._closed:
            return []
        return self._take(max_messages)

    def _poll(self, time_limit: float) -> None:
        try:
            self._connection.process_data_events(time_limit=time_limit)
        except (pika_errors.AMQPError, OSError) as err:
            self._lost(describe_error(err))
            return
        if self._buffer and self._buffer_since is None:
            self._buffer_since = time.monotonic()

    def _take(self, max_messages: int) -> list[Delivery]:
        buffer = self._buffer
        if len(buffer) <= max_messages:
            batch = buffer[:]
            buffer.clear()
            self._buffer_since = None
        else:
            batch = buffer[:max_messages]
            del buffer[:max_messages]
            self._buffer_since = time.monotonic()  # at the latest; they arrived before this
        return batch

    def _lost(self, reason: str) -> None:
        """Forget the connection and everything delivered on it; schedule a reconnect."""
        dropped = len(self._buffer)
        self._buffer.clear()
        self._buffer_since = None
        connection = self._connection
        self._connection = None
        self._channel = None
        self._confirm_channel = None
        self._pipeline_channel = None
        self._cancelled = False
        if connection is not None:
            _close_quietly(connection)
        delay = self._backoff.next_delay()
        self._next_attempt = time.monotonic() + delay
        log.warning(
            "amqp consumer connection lost url=%s queue=%s epoch=%d reason=%s dropped=%d "
            "retry_in_s=%.2f",
            self.url,
            self.queue.name,
            self.epoch,
            reason,
            dropped,
            delay,
        )

    def _reconnect(self, until: float) -> bool:
        """Wait (at most until ``until``) for the next attempt's turn and make it."""
        wait = self._next_attempt - time.monotonic()
        if wait > 0:
            self._wait(min(wait, max(until - time.monotonic(), 0.0)))
            if self._stopping or time.monotonic() < self._next_attempt:
                return False
        try:
            self._open(_CONNECT_TIMEOUT)
        except ConnectError as err:
            delay = self._backoff.next_delay()
            self._next_attempt = time.monotonic() + delay
            log.warning(
                "amqp consumer reconnect failed url=%s queue=%s attempt=%d reason=%s "
                "retry_in_s=%.2f",
                self.url,
                self.queue.name,
                self._backoff.attempts,
                err.reason,
                delay,
            )
            return False
        return True

    def _wait(self, seconds: float) -> None:
        """Sleep without a connection, in slices so that stop() is noticed."""
        deadline = time.monotonic() + seconds
        while not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(remaining, _SLICE))

    # -- settling -----------------------------------------------------------------------------

    def _reset_epoch_state(self) -> None:
        self._buffer.clear()
        self._buffer_since = None
        self._acked_through = 0
        self._settled.clear()
        self._cancelled = False

    def _current(self, d: Delivery, what: str) -> bool:
        if d.epoch == self.epoch and self.connected:
            return True
        log.debug(
            "amqp consumer %s skipped: stale delivery tag=%d epoch=%d current_epoch=%d",
            what,
            d.tag,
            d.epoch,
            self.epoch,
        )
        return False

    def ack_through(self, last: Delivery) -> None:
        """Acknowledge ``last`` and every earlier delivery of its connection at once.

        Deliveries already settled one by one (:meth:`ack`, :meth:`requeue`,
        :meth:`dead_letter`) are skipped. A no-op for a stale delivery (older epoch) or while the
        connection is down: the broker redelivers those.
        """
        if not self._current(last, "ack_through") or last.tag <= self._acked_through:
            return
        tag = last.tag
        settled = self._settled
        while tag in settled:
            tag -= 1
        if tag > self._acked_through:
            try:
                self._channel.basic_ack(delivery_tag=tag, multiple=True)
            except (pika_errors.AMQPError, OSError) as err:
                self._lost(describe_error(err))
                return
        self._acked_through = last.tag
        if settled:
            self._settled = {t for t in settled if t > last.tag}

    def ack(self, d: Delivery) -> None:
        """Acknowledge one delivery (no-op if stale or already settled)."""
        self._settle_one(d, "ack")

    def requeue(self, d: Delivery) -> None:
        """Return one delivery to the queue (``basic.nack`` with requeue).

        On a quorum queue this counts towards the delivery limit: after ``delivery_limit``
        requeues the broker dead-letters it. No-op if stale or already settled.
        """
        self._settle_one(d, "requeue")

    def _settle_one(self, d: Delivery, how: Literal["ack", "requeue"]) -> bool:
        if not self._current(d, how):
            return False
        tag = d.tag
        if tag <= self._acked_through or tag in self._settled:
            log.debug("amqp consumer %s skipped: already settled tag=%d", how, tag)
            return False
        try:
            if how == "ack":
                self._channel.basic_ack(delivery_tag=tag)
            else:
                self._channel.basic_nack(delivery_tag=tag, requeue=True)
        except (pika_errors.AMQPError, OSError) as err:
            self._lost(describe_error(err))
            return False
        if tag == self._acked_through + 1:
            self._acked_through = tag
            while self._acked_through + 1 in self._settled:
                self._acked_through += 1
                self._settled.discard(self._acked_through)
        else:
            self._settled.add(tag)
        return True

    def dead_letter(self, d: Delivery, reason: str, error: str) -> bool:
        """Publish ``d`` to :data:`~iotpipe.amqp.DEAD_EXCHANGE`, then acknowledge it.

        The body, properties and headers go unchanged, plus ``x-iotpipe-error`` = ``error``
        (truncated to 1000 characters), persistent, with routing key ``consumer.<reason>``, on a
        separate channel in confirm mode, published ``mandatory``. Only once the broker has
        confirmed it is ``d`` acknowledged.

        Args:
            d: a delivery of the current epoch.
            reason: a short token, ``A-Z a-z 0-9 _ -`` (e.g. ``invalid``, ``store_rejected``).
            error: human-readable, for whoever inspects the dead letters.

        Returns:
            True when the broker confirmed the dead letter (even if the ack that followed was
            lost with the connection: the original then comes back once more). False, acking
            nothing, when it was not confirmed: the connection is down, ``d`` is stale, the broker
            nacked it, or it was unroutable (no queue bound to ``iotpipe.dead``); ``d`` is then
            redelivered, or, while the connection lives, still the caller's to settle.

        Raises:
            ValueError: ``reason`` is not a short token.
        """
        if _REASON.fullmatch(reason) is None:
            raise ValueError(f"dead-letter reason must match {_REASON.pattern}, got {reason!r}")
        if not self._current(d, "dead_letter"):
            return False
        if len(error) > _ERROR_LIMIT:
            error = error[: _ERROR_LIMIT - 1] + "…"
        headers = dict(d.headers)
        headers[HEADER_ERROR] = error
        properties = pika.BasicProperties(
            content_type=d.content_type,
            delivery_mode=_PERSISTENT,
            message_id=d.message_id,
            timestamp=d.timestamp,
            type=d.type,
            app_id=d.app_id,
            headers=headers,
        )
        routing_key = f"consumer.{reason}"
        if not self._publish_confirmed(
            "dead letter", DEAD_EXCHANGE, routing_key, d.body, properties, mandatory=True
        ):
            return False
        self._settle_one(d, "ack")
        return True

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: MessageProperties,
        *,
        mandatory: bool = False,
    ) -> bool:
        """Publish one message on the confirm channel and wait for the broker's confirm.

        The channel is the one :meth:`dead_letter` uses, on this consumer's connection (the
        consumer's own publishes, such as receipts, need no second connection).

        Args:
            exchange: the exchange, e.g. :data:`~iotpipe.receipts.EXCHANGE` (declare it with
                ``publish_exchanges``).
            routing_key: its routing key.
            body: the payload.
            properties: its AMQP properties.
            mandatory: an unroutable message is not confirmed (False: RabbitMQ confirms it).

        Returns:
            True once the broker confirmed it. False when it was not: the connection is down,
            the broker nacked it, or (``mandatory``) it was unroutable; the caller keeps it.
        """
        if not self.connected:
            return False
        return self._publish_confirmed(
            "publish",
            exchange,
            routing_key,
            body,
            _pika_properties(properties),
            mandatory=mandatory,
        )

    def publish_many(self, messages: Sequence[Outgoing]) -> list[bool]:
        """Publish ``messages``, then wait for all their confirms at once.

        One round trip to the broker for all of them, where :meth:`publish` waits for each
        (which, to a quorum queue under load, is milliseconds apiece). They go on a confirm
        channel of their own, not ``mandatory`` (RabbitMQ confirms an unroutable message), and
        are waited for at most 30 s, after which the connection is given up.

        Returns:
            For each message, in order: True once the broker confirmed it; False when it did not
            (nacked, the channel or connection failed, or not connected): the caller keeps it.
        """
        if not messages:
            return []
        if not self.connected:
            return [False] * len(messages)
        first = self._pipeline_sent + 1
        try:
            with compat.pika_answer_within(
                self._connection, _CONFIRM_TIMEOUT, "confirming publishes"
            ):
                channel = self._pipeline()
                if channel is None:  # no asynchronous confirms in this pika: one after the other
                    return [self.publish(*message) for message in messages]
                first = self._pipeline_sent + 1
                for message in messages:
                    # Awaited before it is sent: its confirm may arrive inside basic_publish.
                    self._pipeline_sent += 1
                    self._awaiting.add(self._pipeline_sent)
                    channel.basic_publish(
                        message.exchange,
                        message.routing_key,
                        message.body,
                        _pika_properties(message.properties),
                    )
                while self._awaiting and channel.is_open:
                    self._connection.process_data_events(time_limit=_SLICE)
                if self._awaiting:
                    self._pipeline_channel = None
                    log.warning(
                        "amqp consumer publish failed: channel closed with %d unconfirmed",
                        len(self._awaiting),
                    )
        except pika_errors.AMQPChannelError as err:
            self._pipeline_channel = None
            log.warning("amqp consumer publish failed reason=%s", describe_error(err))
            if self._connection is not None and not self._connection.is_open:
                self._lost(describe_error(err))
        except (pika_errors.AMQPError, OSError) as err:
            self._lost(_reason(err))
        confirms = self._confirms
        outcomes = [confirms.get(tag, False) for tag in range(first, first + len(messages))]
        if not all(outcomes):
            log.warning(
                "amqp consumer publishes not confirmed: %d of %d",
                outcomes.count(False),
                len(outcomes),
            )
        confirms.clear()
        self._awaiting.clear()
        return outcomes

    def _pipeline(self) -> Any:
        """publish_many's channel (opened on first use), or None if pika cannot confirm it so."""
        channel = self._pipeline_channel
        if channel is None or not channel.is_open:
            channel = self._connection.channel()
            self._pipeline_sent = 0
            self._awaiting.clear()
            self._confirms.clear()
            if not compat.pika_confirm_async(channel, self._on_confirm):
                channel.close()
                return None
            self._pipeline_channel = channel
        return channel

    def _on_confirm(self, ack: bool, tag: int, multiple: bool) -> None:
        awaiting = self._awaiting
        if multiple:
            settled = [t for t in awaiting if t <= tag]
        else:
            settled = [tag] if tag in awaiting else []
        for t in settled:
            awaiting.discard(t)
            self._confirms[t] = ack
        if settled and not awaiting and self._connection is not None:
            # process_data_events returns early only for events of the BlockingConnection's
            # own; a timer due now is one, so publish_many stops waiting at once.
            self._connection.call_later(0, _nothing)

    def _publish_confirmed(
        self,
        what: str,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: Any,
        *,
        mandatory: bool,
    ) -> bool:
        """Publish on the confirm channel (opened on first use) and wait for the confirm.

        Failures are logged (``what`` names the message in the log line) and answered False; a
        connection found broken is given up (:meth:`next_batch` reconnects).
        """
        try:
            with compat.pika_answer_within(
                self._connection, _CONFIRM_TIMEOUT, f"confirming a {what}"
            ):
                channel = self._confirm_channel
                if channel is None or not channel.is_open:
                    channel = self._connection.channel()
                    channel.confirm_delivery()
                    self._confirm_channel = channel
                channel.basic_publish(exchange, routing_key, body, properties, mandatory=mandatory)
        except (pika_errors.UnroutableError, pika_errors.NackError) as err:
            how = "unroutable" if isinstance(err, pika_errors.UnroutableError) else "nacked"
            log.warning(
                "amqp consumer %s %s exchange=%s routing_key=%s message_id=%s "
                "(is a queue bound to %s?)",
                what,
                how,
                exchange,
                routing_key,
                properties.message_id,
                exchange,
            )
            return False
        except pika_errors.AMQPChannelError as err:
            self._confirm_channel = None
            log.warning(
                "amqp consumer %s failed exchange=%s routing_key=%s reason=%s",
                what,
                exchange,
                routing_key,
                describe_error(err),
            )
            if self._connection is not None and not self._connection.is_open:
                self._lost(describe_error(err))
            return False
        except (pika_errors.AMQPError, OSError) as err:
            self._lost(_reason(err))
            return False
        return True

    # -- waiting and stopping -----------------------------------------------------------------

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` while keeping the connection alive; returns early after stop().

        Deliveries arriving meanwhile are buffered for the next batch. A connection lost while
        sleeping is noticed here and re-established by the next :meth:`next_batch`.
        """
        deadline = time.monotonic() + seconds
        while not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self.connected:
                self._poll(min(remaining, _SLICE))
            else:
                time.sleep(min(remaining, _SLICE))

    def stop(self) -> None:
        """Make :meth:`next_batch`, :meth:`sleep` and ``connect(retry=True)`` return promptly.

        Safe from any thread and from a signal handler: it only sets a flag, which those
        methods check at least every 0.1 s. Final: afterwards ``next_batch`` always returns
        ``[]``. Settle what you hold, then :meth:`close`.
        """
        self._stopping = True

    def close(self) -> None:
        """Cancel the consumer and close the connection; unacknowledged messages are requeued.

        Idempotent.
        """
        self._closed = True
        connection = self._connection
        self._connection = None
        self._channel = None
        self._confirm_channel = None
        self._pipeline_channel = None
        self._buffer.clear()
        if connection is not None:
            _close_quietly(connection)
            log.info(
                "amqp consumer closed url=%s queue=%s reconnects=%d",
                self.url,
                self.queue.name,
                self.reconnects,
            )


def batch_wait(
    buffered: int,
    max_messages: int,
    max_wait: float,
    *,
    age: float,
    waited: float,
    read: bool,
    drained: bool,
) -> float | None:
    """The batching rule of :meth:`BatchConsumer.next_batch`: how long its next read may wait.

    Adaptive batching: a batch is cut as soon as the deliveries already received are drained
    (a read that did not wait found nothing new), so a lone message is written at once and no
    timer adds latency; under load, what arrives while one batch is written makes the next one
    larger. ``max_wait`` only bounds the waiting: for the first delivery, and for a batch that
    keeps growing because deliveries arrive faster than they are read.

    Args:
        buffered: deliveries received and not yet handed out.
        max_messages: the largest batch.
        max_wait: seconds to wait for a first delivery, and the longest a batch keeps growing
            after its first delivery arrived.
        age: seconds since the oldest buffered delivery arrived (ignored when none is).
        waited: seconds since ``next_batch`` was called.
        read: whether ``next_batch`` has read the socket yet (it always reads once).
        drained: the last read waited for nothing and found nothing new.

    Returns:
        ``None`` to hand out the batch now (``[]`` when nothing is buffered), ``0.0`` to read
        what is there without waiting, or the seconds to wait for a first delivery.
    """
    if buffered >= max_messages:
        return None
    if buffered:
        return None if drained or age >= max_wait else 0.0
    if read and waited >= max_wait:
        return None
    return max(max_wait - waited, 0.0)


def _nothing() -> None:
    """A callback that does nothing (it only ends a wait)."""


def _pika_properties(properties: MessageProperties) -> Any:
    """``properties`` as pika's ``BasicProperties``, for the consumer's own publishes."""
    return pika.BasicProperties(**dataclasses.asdict(properties))


def _reason(error: BaseException) -> str:
    """describe_error(), but keeping what a pika_answer_within timeout was waiting for."""
    if isinstance(error, TimeoutError) and str(error).startswith("no answer within"):
        return str(error)
    return describe_error(error)


def _close_quietly(connection: Any) -> None:
    """Close a BlockingConnection that may already be broken, ignoring how it fails."""
    try:
        if connection.is_open:
            connection.close()
    except (pika_errors.AMQPError, OSError) as err:
        log.debug("amqp consumer close failed: %s", describe_error(err))
    except AssertionError:
        # pika 1.4 can trip over its own assertions when closing a half-dead connection.
        log.debug("amqp consumer close failed", exc_info=True)

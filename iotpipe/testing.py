"""Helpers for testing: replay a recording and wait until it was seen; in-memory transports.

Shipped with the library (like ``structlog.testing``) so that every component's end-to-end
tests drive the pipeline the same way::

    from iotpipe.testing import Capture, replay_and_wait

    with Capture(broker_url, "iotpipe/#") as capture:
        result = replay_and_wait("tests/data/fleet-faults-seed7.jsonl", broker_url, seen=capture.count)
    assert result.seen == result.published

``seen`` can be any callable that counts what arrived downstream (rows in a store, messages on
a queue); :func:`replay_and_wait` polls it, with a deadline, until it reaches ``expected``.
Failures raise :class:`ReplayTimeoutError`, an ``AssertionError``, so pytest reports them as test
failures with the counts in the message.

The in-memory twins of the transports (like httpx's ``MockTransport``) make a service's own
logic testable without a broker, each driven by the test and recording what the service did:

- :class:`MemorySubscriber` (an :class:`~iotpipe.mqtt.Subscriber`): the test delivers MQTT
  messages, the service's ``pump()`` hands them over; acknowledgements are kept in order.
- :class:`MemoryPublisher` (a :class:`~iotpipe.amqp.Publisher`): records publishes; the test
  confirms, nacks or returns them, or takes the broker down and back up.
- :class:`MemorySource` (a :class:`~iotpipe.amqp_consumer.DeliverySource`): the test adds
  deliveries; acks, requeues, dead letters and confirmed publishes (receipts) are recorded.

Each is safe to drive from the test's thread while the service runs on its own; the
``wait_*`` methods wait on a condition with a deadline (never a sleep)::

    subscriber, publisher = MemorySubscriber(), MemoryPublisher()
    bridge = Bridge(settings, subscriber=subscriber.bind, publisher=publisher.bind, spool=spool)
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Self

from iotpipe.amqp import MessageProperties, Outcome, ResultHandler
from iotpipe.amqp_consumer import Delivery, Outgoing
from iotpipe.errors import ConnectError
from iotpipe.mqtt import Message, MessageHandler, MqttClient
from iotpipe.recording import RecordedMessage, read_recording
from iotpipe.replay import replay_messages
from iotpipe.settings import MqttSettings

__all__ = [
    "Capture",
    "DeadLetter",
    "MemoryPublisher",
    "MemorySource",
    "MemorySubscriber",
    "Published",
    "ReplayResult",
    "ReplayTimeoutError",
    "replay_and_wait",
]


class ReplayTimeoutError(AssertionError):
    """The broker did not acknowledge a replay, or downstream did not see enough in time.

    Attributes:
        expected: how many were wanted.
        got: how many there were when time ran out.
    """

    def __init__(self, message: str, expected: int, got: int) -> None:
        super().__init__(message)
        self.expected = expected
        self.got = got


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What :func:`replay_and_wait` did.

    Attributes:
        published: messages published (all of them were acknowledged by the broker).
        seen: the last value of ``seen()`` (at least ``expected``).
        expected: the count that was waited for.
        elapsed: seconds from the first publish until ``seen()`` reached ``expected``.
    """

    published: int
    seen: int
    expected: int
    elapsed: float


def _settings(mqtt: str | MqttSettings) -> MqttSettings:
    return mqtt if isinstance(mqtt, MqttSettings) else MqttSettings(url=mqtt)


def replay_and_wait(
    source: str | Path | Iterable[RecordedMessage],
    mqtt: str | MqttSettings,
    *,
    seen: Callable[[], int] | None = None,
    expected: int | None = None,
    timeout: float = 30.0,
    speed: float | None = None,
    topic_prefix: str = "",
    client_id: str | None = None,
) -> ReplayResult:
    """Replay a recording into a broker, then wait until ``seen()`` reaches ``expected``.

    Args:
        source: a recording file, or the messages themselves.
        mqtt: the broker's URL (or full settings).
        seen: counts what has arrived downstream; ``None`` only waits for the broker's acks.
        expected: the count to wait for (default: the number of messages replayed).
        timeout: the deadline for the whole call, in seconds.
        speed: time scale of the replay; ``None`` (default) publishes without pacing.
        topic_prefix: prepended to every topic.
        client_id: the publisher's MQTT client id (default: a random one).

    Returns:
        The counts and elapsed time.

    Raises:
        ReplayTimeoutError: the broker did not acknowledge everything, or ``seen()`` stayed below
            ``expected`` until the deadline.
        RecordingError: the recording is missing or malformed.
        ConnectError: the broker cannot be reached.
    """
    if isinstance(source, str | Path):
        _header, messages = read_recording(source)
    else:
        messages = list(source)
    want = len(messages) if expected is None else expected
    deadline = time.monotonic() + timeout
    client = MqttClient(_settings(mqtt), client_id=client_id)
    client.connect(timeout=max(0.1, deadline - time.monotonic()))
    try:
        started = time.monotonic()
        stats = replay_messages(
            client,
            messages,
            speed=speed,
            topic_prefix=topic_prefix,
            ack_timeout=max(0.0, deadline - time.monotonic()),
        )
        if stats.unacknowledged:
            raise ReplayTimeoutError(
                f"the broker acknowledged only {stats.acknowledged} of {stats.published} "
                f"replayed messages within {timeout:g} s",
                stats.published,
                stats.acknowledged,
            )
        if seen is None:
            return ReplayResult(stats.published, want, want, time.monotonic() - started)
        count = seen()
        while count < want:
            if time.monotonic() > deadline:
                raise ReplayTimeoutError(
                    f"only {count} of {want} replayed messages were seen downstream "
                    f"after {timeout:g} s",
                    want,
                    count,
                )
            # Pumping is the wait: it keeps our connection alive between polls.
            client.pump(timeout=0.02)
            count = seen()
        return ReplayResult(stats.published, count, want, time.monotonic() - started)
    finally:
        client.disconnect()


class Capture:
    """Subscribe to topic filters and collect every message, on a background thread.

    The subscription is in place (SUBACK received) when :meth:`start` returns, so nothing
    published afterwards is missed. The thread owns the MQTT client until :meth:`stop`.

    Args:
        mqtt: the broker's URL (or full settings).
        filters: one filter or several.
        qos: subscription QoS (2 lets messages arrive with the QoS they were published with).
        client_id: the subscriber's client id (default: a random one).

    Attributes:
        messages: what arrived so far, in arrival order (the capture thread appends to it;
            :meth:`wait` returns a stable copy).
        error: set if the capture thread lost the connection.
    """

    def __init__(
        self,
        mqtt: str | MqttSettings,
        filters: str | Iterable[str],
        *,
        qos: int = 2,
        client_id: str | None = None,
    ) -> None:
        self.filters = [filters] if isinstance(filters, str) else list(filters)
        self.qos = qos
        self.messages: list[Message] = []
        self.error: ConnectError | None = None
        self._arrived = threading.Condition()
        self._stopping = threading.Event()
        self._client = MqttClient(_settings(mqtt), client_id=client_id, on_message=self._on_message)
        self._thread = threading.Thread(
            target=self._run, name=f"capture-{self._client.client_id or 'mqtt'}", daemon=True
        )

    def _on_message(self, message: Message) -> None:
        with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._client.pump(timeout=0.05)
        except ConnectError as err:
            self.error = err
            with self._arrived:
                self._arrived.notify_all()

    def start(self) -> Self:
        """Connect, subscribe (waiting for the SUBACK) and start collecting.

        Raises:
            ConnectError: the broker cannot be reached or refused the subscription.
        """
        self._client.connect()
        self._client.subscribe([(f, self.qos) for f in self.filters])
        self._thread.start()
        return self

    def count(self) -> int:
        """How many messages arrived so far (usable as ``seen`` for :func:`replay_and_wait`)."""
        return len(self.messages)

    def wait(self, count: int, timeout: float = 10.0) -> list[Message]:
        """Wait until at least ``count`` messages arrived; returns a copy of them.

        Raises:
            ReplayTimeoutError: fewer arrived within ``timeout`` seconds.
            ConnectError: the connection was lost.
        """
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.messages) >= count or self.error, timeout)
            if self.error is not None:
                raise self.error
            if len(self.messages) < count:
                raise ReplayTimeoutError(
                    f"only {len(self.messages)} of {count} messages arrived on "
                    f"{', '.join(self.filters)} within {timeout:g} s",
                    count,
                    len(self.messages),
                )
            return list(self.messages)

    def stop(self) -> None:
        """Stop collecting and disconnect (idempotent)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._client.disconnect()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- in-memory transports --------------------------------------------------------------------

_MEMORY_URL = "memory://"


def _wait_count(
    arrived: threading.Condition, count: Callable[[], int], want: int, timeout: float, what: str
) -> None:
    """Wait (holding ``arrived``) until ``count()`` reaches ``want``, else ReplayTimeoutError."""
    if not arrived.wait_for(lambda: count() >= want, timeout):
        raise ReplayTimeoutError(
            f"only {count()} of {want} {what} within {timeout:g} s", want, count()
        )


class MemorySubscriber:
    """An MQTT subscriber with manual acknowledgements, fed by the test.

    Pass :meth:`bind` as the service's subscriber factory. :meth:`deliver` queues a message;
    the service's next :meth:`pump` hands it to the service. :meth:`drop` loses the connection
    (the next ``pump`` raises :class:`~iotpipe.errors.ConnectError`); after ``reconnect`` every
    QoS>0 message not yet acknowledged comes again with ``dup=True``, as from a broker keeping
    a persistent session.

    Attributes:
        acked: message ids acknowledged, in the order the service acknowledged them.
        subscriptions: the filters subscribed, with their QoS.
        published: the messages the service published, in order.
        pumps: how many times ``pump`` ran.
        reconnects: how many times ``reconnect`` succeeded.
    """

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.subscriptions: list[tuple[str, int]] = []
        self.published: list[Message] = []
        self.pumps = 0
        self.reconnects = 0
        self._on_message: MessageHandler | None = None
        self._connected = False
        self._lost = False
        self._next_mid = 1
        self._inbox: deque[Message] = deque()
        self._unacked: dict[int, Message] = {}
        self._changed = threading.Condition()

    def bind(self, on_message: MessageHandler) -> Self:
        """Hand every message to ``on_message`` from now on (a ``SubscriberFactory``)."""
        self._on_message = on_message
        return self

    @property
    def connected(self) -> bool:
        """Whether the service connected and the connection was not dropped since."""
        return self._connected

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Record a message the service publishes (see :attr:`published`)."""
        self.published.append(Message(topic, payload, qos, retain))
        return 0

    # -- the test's side --------------------------------------------------------------------

    def deliver(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int:
        """Queue one message for the service's next ``pump``; returns its message id."""
        with self._changed:
            mid = self._next_mid
            self._next_mid += 1
            self._inbox.append(Message(topic, payload, qos, retain, mid=mid))
            self._changed.notify_all()
        return mid

    def drop(self) -> None:
        """Lose the connection: the service's next ``pump`` raises ConnectError."""
        with self._changed:
            self._lost = True
            self._changed.notify_all()

    def wait_acked(self, count: int, timeout: float = 5.0) -> list[int]:
        """Wait until ``count`` acknowledgements were sent; returns a copy of :attr:`acked`."""
        with self._changed:
            _wait_count(self._changed, lambda: len(self.acked), count, timeout, "acks")
            return list(self.acked)

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until the service's loop has gone round completely at least once from now.

        ``pump`` runs at the top of each pass, so once two more have started, a whole pass
        (whatever it does with the results it had by then) lies between now and that point.
        """
        with self._changed:
            want = self.pumps + 2
            _wait_count(self._changed, lambda: self.pumps, want, timeout, "pumps")

    # -- the service's side (the Subscriber protocol) ---------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """Connect (always succeeds)."""
        del timeout
        self._connected = True

    def subscribe(self, filters: Iterable[tuple[str, int]], timeout: float = 10.0) -> list[int]:
        """Record the filters; every QoS is granted."""
        del timeout
        wanted = list(filters)
        self.subscriptions += wanted
        return [qos for _, qos in wanted]

    def pump(self, timeout: float = 0.0) -> None:
        """Hand every queued message to the service, waiting up to ``timeout`` for one."""
        with self._changed:
            self.pumps += 1
            self._changed.notify_all()
            if self._lost or not self._connected:
                self._connected = False
                raise ConnectError(_MEMORY_URL, "connection lost")
            self._changed.wait_for(lambda: bool(self._inbox) or self._lost, timeout)
            messages = list(self._inbox)
            self._inbox.clear()
            for message in messages:
                if message.qos > 0:
                    self._unacked[message.mid] = message
        handler = self._on_message
        for message in messages:
            if handler is not None:
                handler(message)

    def ack(self, mid: int, qos: int) -> None:
        """Record the acknowledgement."""
        del qos
        with self._changed:
            self.acked.append(mid)
            self._unacked.pop(mid, None)
            self._changed.notify_all()

    def reconnect(self, deadline: float) -> None:
        """Reconnect; unacknowledged messages come again first, marked ``dup``."""
        del deadline
        with self._changed:
            again = [m._replace(dup=True) for m in self._unacked.values()]
            self._unacked.clear()
            self._inbox.extendleft(reversed(again))
            self._lost = False
            self._connected = True
            self.reconnects += 1

    def disconnect(self) -> None:
        """Disconnect."""
        self._connected = False


@dataclass(frozen=True, slots=True)
class Published:
    """One message handed to :class:`MemoryPublisher`."""

    exchange: str
    routing_key: str
    body: bytes
    properties: MessageProperties | bytes
    token: object


class MemoryPublisher:
    """A confirming AMQP publisher whose broker is the test.

    Pass :meth:`bind` as the service's publisher factory. While the broker is up, a publish is
    unconfirmed until the test settles it (:meth:`confirm`, :meth:`nack`,
    :meth:`return_unroutable`; in any order), or at once with ``auto_confirm``. While it is down, publishes
    wait in the queue (:meth:`~iotpipe.amqp.Publisher.withdraw` takes them back) and go out when
    it comes back; :meth:`go_down` reports every unconfirmed message FAILED, as a lost
    connection does. Outcomes are reported on the test's thread (the real one reports on its
    I/O thread).

    Args:
        up: whether the broker is reachable at ``start``.
        auto_confirm: confirm every message as it is published.

    Attributes:
        messages: every message published, in order (a message sent again is listed again).
        outcomes: ``(token, outcome)`` as reported, in order.
    """

    def __init__(self, *, up: bool = True, auto_confirm: bool = False) -> None:
        self.auto_confirm = auto_confirm
        self.messages: list[Published] = []
        self.outcomes: list[tuple[object, Outcome]] = []
        self._up = up
        self._started = False
        self._closed = False
        self._reconnects = 0
        self._on_result: ResultHandler | None = None
        self._queued: deque[Published] = deque()
        self._unconfirmed: deque[Published] = deque()
        self._changed = threading.Condition()

    def bind(self, on_result: ResultHandler) -> Self:
        """Report every outcome to ``on_result`` from now on (a ``PublisherFactory``)."""
        self._on_result = on_result
        return self

    @property
    def connected(self) -> bool:
        """Started, not closed, and the broker is up."""
        return self._started and self._up and not self._closed

    @property
    def pending(self) -> int:
        """Messages queued plus published and unconfirmed."""
        return len(self._queued) + len(self._unconfirmed)

    @property
    def reconnects(self) -> int:
        """How many times the broker came back after :meth:`go_down`."""
        return self._reconnects

    @property
    def unconfirmed(self) -> list[Published]:
        """The messages published and not yet settled, oldest first."""
        with self._changed:
            return list(self._unconfirmed)

    # -- the test's side --------------------------------------------------------------------

    def confirm(self, count: int | None = None, *, skip: int = 0) -> list[Published]:
        """Confirm ``count`` unconfirmed messages (default all) after the ``skip`` oldest."""
        return self._settle(Outcome.CONFIRMED, count, skip)

    def nack(self, count: int | None = None, *, skip: int = 0) -> list[Published]:
        """Refuse ``count`` unconfirmed messages (default all) after the ``skip`` oldest."""
        return self._settle(Outcome.NACKED, count, skip)

    def return_unroutable(self, count: int | None = None, *, skip: int = 0) -> list[Published]:
        """Return ``count`` unconfirmed messages (default all) after the ``skip`` oldest."""
        return self._settle(Outcome.RETURNED, count, skip)

    def go_down(self) -> None:
        """Lose the broker: every unconfirmed message is reported FAILED; new ones queue."""
        with self._changed:
            self._up = False
            failed = list(self._unconfirmed)
            self._unconfirmed.clear()
        self._report(failed, Outcome.FAILED)

    def come_up(self) -> None:
        """The broker is back: queued messages go out, in order."""
        with self._changed:
            if not self._up and self._started:
                self._reconnects += 1
            self._up = True
            self._unconfirmed.extend(self._queued)
            self._queued.clear()
            sent: list[Published] = []
            if self.auto_confirm:
                sent = list(self._unconfirmed)
                self._unconfirmed.clear()
            self._changed.notify_all()
        self._report(sent, Outcome.CONFIRMED)

    def wait_published(self, count: int, timeout: float = 5.0) -> list[Published]:
        """Wait until ``count`` messages were published; returns a copy of :attr:`messages`."""
        with self._changed:
            _wait_count(self._changed, lambda: len(self.messages), count, timeout, "publishes")
            return list(self.messages)

    def wait_unconfirmed(self, count: int, timeout: float = 5.0) -> list[Published]:
        """Wait until ``count`` messages are unconfirmed; returns them, oldest first."""
        with self._changed:
            _wait_count(
                self._changed, lambda: len(self._unconfirmed), count, timeout, "unconfirmed"
            )
            return list(self._unconfirmed)

    # -- the service's side (the Publisher protocol) ----------------------------------------

    def start(self, timeout: float | None = None, *, retry: bool = False) -> None:
        """Start; raises ConnectError while the broker is down (still started with ``retry``)."""
        del timeout
        if self._up or retry:
            self._started = True
        if not self._up:
            raise ConnectError(_MEMORY_URL, "broker down")

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: MessageProperties | bytes,
        token: object,
    ) -> None:
        """Record the message; unconfirmed while up, queued while down."""
        if self._closed:
            raise RuntimeError("the publisher is closed")
        message = Published(exchange, routing_key, body, properties, token)
        with self._changed:
            self.messages.append(message)
            confirm_now = self.connected and self.auto_confirm
            if not confirm_now:
                (self._unconfirmed if self.connected else self._queued).append(message)
            self._changed.notify_all()
        if confirm_now:
            self._report([message], Outcome.CONFIRMED)

    def withdraw(self) -> list[object]:
        """Take back every queued (never sent) message; their tokens."""
        with self._changed:
            tokens = [m.token for m in self._queued]
            self._queued.clear()
            self._changed.notify_all()
        return tokens

    def close(self, timeout: float = 10.0) -> bool:
        """Close; whatever is still unsettled is reported FAILED. True if nothing was."""
        del timeout
        with self._changed:
            self._closed = True
            left = [*self._unconfirmed, *self._queued]
            self._unconfirmed.clear()
            self._queued.clear()
        self._report(left, Outcome.FAILED)
        return not left

    # -- internals --------------------------------------------------------------------------

    def _settle(self, outcome: Outcome, count: int | None, skip: int) -> list[Published]:
        """Settle ``count`` unconfirmed messages after the ``skip`` oldest; returns them."""
        with self._changed:
            waiting = list(self._unconfirmed)
            n = len(waiting) - skip if count is None else count
            if skip < 0 or n < 0 or skip + n > len(waiting):
                raise ValueError(f"only {len(waiting)} messages are unconfirmed")
            settled = waiting[skip : skip + n]
            self._unconfirmed = deque(waiting[:skip] + waiting[skip + n :])
            self._changed.notify_all()
        self._report(settled, outcome)
        return settled

    def _report(self, messages: list[Published], outcome: Outcome) -> None:
        for message in messages:
            self.outcomes.append((message.token, outcome))
            if self._on_result is not None:
                self._on_result(message.token, outcome)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A delivery :class:`MemorySource` was asked to dead-letter."""

    delivery: Delivery
    reason: str
    error: str


class MemorySource:
    """The AMQP deliveries of one queue, added by the test, settled by the service.

    Mirrors :class:`~iotpipe.amqp_consumer.BatchConsumer`'s contract: a requeued delivery comes
    back with a new tag and ``delivery_count`` one higher; :meth:`drop` starts a new connection
    (``epoch``) and hands out everything unsettled again, marked ``redelivered``, while settling
    a delivery of the old epoch does nothing; ``sleep`` returns at once and is recorded.

    Args:
        dead_letters_confirmed: False makes :meth:`dead_letter` fail (nothing bound to the
            dead-letter exchange), leaving the delivery unsettled.
        publishes_confirmed: False makes :meth:`publish` fail (not confirmed); the test may
            flip it at any time.

    Attributes:
        refused_keys: routing keys :meth:`publish_many` does not confirm (the others it does,
            as :meth:`publish`): a batch of publishes partly confirmed.
        acked: delivery tags acknowledged (dead-lettered ones included), in order.
        requeued: delivery tags requeued, in order.
        dead_letters: what was dead-lettered, in order.
        published: what :meth:`publish` had confirmed, in order (``token`` is None).
        unconfirmed: publishes that failed, in order.
        slept: the seconds of every ``sleep``.
        epoch: the connection generation (1 once connected).
        reconnects: connections re-established by :meth:`drop`.
    """

    def __init__(
        self, *, dead_letters_confirmed: bool = True, publishes_confirmed: bool = True
    ) -> None:
        self.dead_letters_confirmed = dead_letters_confirmed
        self.publishes_confirmed = publishes_confirmed
        self.refused_keys: set[str] = set()
        self.published: list[Published] = []
        self.unconfirmed: list[Published] = []
        self.acked: list[int] = []
        self.requeued: list[int] = []
        self.dead_letters: list[DeadLetter] = []
        self.slept: list[float] = []
        self.epoch = 0
        self.reconnects = 0
        self._tag = 0
        self._stopping = False
        self._closed = False
        self._ready: deque[Delivery] = deque()
        self._unsettled: dict[int, Delivery] = {}
        self._changed = threading.Condition()

    @property
    def connected(self) -> bool:
        """Connected and not closed."""
        return self.epoch > 0 and not self._closed

    @property
    def unsettled(self) -> list[int]:
        """Tags handed out and neither acknowledged, requeued nor dead-lettered."""
        with self._changed:
            return sorted(self._unsettled)

    # -- the test's side --------------------------------------------------------------------

    def add(
        self,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None = None,
        type: str | None = None,
        headers: Mapping[str, object] | None = None,
    ) -> None:
        """Queue one delivery for the service's next ``next_batch``."""
        with self._changed:
            self._push(
                Delivery(
                    0,
                    0,
                    routing_key,
                    body,
                    message_id,
                    "application/json",
                    type,
                    dict(headers or {}),
                    False,
                    0,
                )
            )

    def drop(self) -> None:
        """Lose the connection and reconnect: everything unsettled comes again, new epoch."""
        with self._changed:
            self.epoch += 1
            self.reconnects += 1
            again = [replace(d, redelivered=True) for _, d in sorted(self._unsettled.items())]
            self._unsettled.clear()
            waiting = list(self._ready)
            self._ready.clear()
            for delivery in [*again, *waiting]:
                self._push(delivery)

    def wait_acked(self, count: int, timeout: float = 5.0) -> list[int]:
        """Wait until ``count`` deliveries were acknowledged; returns a copy of :attr:`acked`."""
        with self._changed:
            _wait_count(self._changed, lambda: len(self.acked), count, timeout, "acks")
            return list(self.acked)

    # -- the service's side (the DeliverySource protocol) -----------------------------------

    def connect(self, timeout: float | None = None, *, retry: bool = False) -> None:
        """Connect (always succeeds); epoch 1."""
        del timeout, retry
        if self._closed:
            raise RuntimeError("the source is closed")
        with self._changed:
            if self.epoch == 0:
                self.epoch = 1
                waiting = list(self._ready)
                self._ready.clear()
                for delivery in waiting:
                    self._push(delivery)

    def next_batch(self, max_messages: int, max_wait: float) -> list[Delivery]:
        """Up to ``max_messages`` deliveries, waiting up to ``max_wait`` for the first."""
        with self._changed:
            self._changed.wait_for(lambda: bool(self._ready) or self._stopping, max_wait)
            if self._stopping:
                return []
            batch: list[Delivery] = []
            while self._ready and len(batch) < max_messages:
                delivery = self._ready.popleft()
                self._unsettled[delivery.tag] = delivery
                batch.append(delivery)
            return batch

    def ack_through(self, last: Delivery) -> None:
        """Acknowledge ``last`` and every earlier unsettled delivery (no-op if stale)."""
        with self._changed:
            if last.epoch != self.epoch:
                return
            for tag in sorted(t for t in self._unsettled if t <= last.tag):
                del self._unsettled[tag]
                self.acked.append(tag)
            self._changed.notify_all()

    def ack(self, d: Delivery) -> None:
        """Acknowledge one delivery (no-op if stale or already settled)."""
        with self._changed:
            if d.epoch != self.epoch or self._unsettled.pop(d.tag, None) is None:
                return
            self.acked.append(d.tag)
            self._changed.notify_all()

    def requeue(self, d: Delivery) -> None:
        """Put ``d`` back: it comes again with a new tag, one delivery more (no-op if stale)."""
        with self._changed:
            if d.epoch != self.epoch or self._unsettled.pop(d.tag, None) is None:
                return
            self.requeued.append(d.tag)
            self._push(replace(d, redelivered=True, delivery_count=d.delivery_count + 1))

    def dead_letter(self, d: Delivery, reason: str, error: str) -> bool:
        """Record the dead letter and acknowledge ``d``; False (nothing settled) if refused."""
        with self._changed:
            if not self.dead_letters_confirmed or d.epoch != self.epoch:
                return False
            if self._unsettled.pop(d.tag, None) is None:
                return False
            self.dead_letters.append(DeadLetter(d, reason, error))
            self.acked.append(d.tag)
            self._changed.notify_all()
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
        """Record the message; True (confirmed) while connected and ``publishes_confirmed``."""
        del mandatory
        message = Published(exchange, routing_key, body, properties, None)
        with self._changed:
            confirmed = self.publishes_confirmed and self.connected
            (self.published if confirmed else self.unconfirmed).append(message)
            self._changed.notify_all()
            return confirmed

    def publish_many(self, messages: Sequence[Outgoing]) -> list[bool]:
        """:meth:`publish` each; one whose routing key is in ``refused_keys`` is not confirmed."""
        outcomes = []
        for message in messages:
            with self._changed:
                refused = message.routing_key in self.refused_keys
            outcomes.append(not refused and self.publish(*message))
            if refused:
                with self._changed:
                    self.unconfirmed.append(Published(*message, None))
        return outcomes

    def wait_published(self, count: int, timeout: float = 5.0) -> list[Published]:
        """Wait until ``count`` publishes were confirmed; returns a copy of :attr:`published`."""
        with self._changed:
            _wait_count(self._changed, lambda: len(self.published), count, timeout, "publishes")
            return list(self.published)

    def sleep(self, seconds: float) -> None:
        """Record the wait and return at once."""
        self.slept.append(seconds)

    def stop(self) -> None:
        """Make ``next_batch`` return ``[]`` from now on."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def close(self) -> None:
        """Close: everything unsettled goes back to the queue."""
        with self._changed:
            self._closed = True
            self._unsettled.clear()

    # -- internals --------------------------------------------------------------------------

    def _push(self, delivery: Delivery) -> None:
        """Queue ``delivery`` under a fresh tag of the current epoch (caller holds the lock)."""
        self._tag += 1
        self._ready.append(replace(delivery, tag=self._tag, epoch=self.epoch))
        self._changed.notify_all()

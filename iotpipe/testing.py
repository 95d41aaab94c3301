"""Helpers for testing code downstream of MQTT: replay a recording and wait until it was seen.

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
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from iotpipe.errors import ConnectError
from iotpipe.mqtt import Message, MqttClient
from iotpipe.recording import RecordedMessage, read_recording
from iotpipe.replay import replay_messages
from iotpipe.settings import MqttSettings

__all__ = ["Capture", "ReplayResult", "ReplayTimeoutError", "replay_and_wait"]


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

"""Play a recording back to an MQTT broker with its original pacing, scaled by a speed factor.

:func:`replay_messages` publishes recorded messages in order through any
:class:`PacedPublisher` (:class:`~iotpipe.mqtt.MqttClient` is one) and returns
:class:`ReplayStats`; it runs on the caller's thread and pumps the client while it waits, so one
thread owns the connection. ``iotpipe replay`` (:mod:`iotpipe.recording_cli`) and
:func:`iotpipe.testing.replay_and_wait` are built on it. The file format lives in
:mod:`iotpipe.recording`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from iotpipe.errors import DeliveryError
from iotpipe.recording import RecordedMessage

__all__ = ["PacedPublisher", "ReplayStats", "check_delivered", "parse_speed", "replay_messages"]


def parse_speed(text: str) -> float | None:
    """Parse ``--speed``: a factor > 0 (``1`` = real time, ``10`` = ten times faster) or ``max``.

    Returns:
        The factor, or ``None`` for ``max`` (no pacing: as fast as the publish window allows).

    Raises:
        ValueError: anything else.
    """
    if text.strip().lower() == "max":
        return None
    try:
        speed = float(text)
    except ValueError:
        speed = math.nan
    if not math.isfinite(speed) or speed <= 0:
        raise ValueError(f"must be a number > 0 or 'max', not {text!r}")
    return speed


class PacedPublisher(Protocol):
    """What :func:`replay_messages` needs from an MQTT client (:class:`~iotpipe.mqtt.MqttClient`)."""

    @property
    def acknowledged(self) -> int:
        """Messages the broker acknowledged so far (QoS 0 counts when sent)."""
        ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Publish one message (waiting while the in-flight window is full)."""
        ...

    def pump(self, timeout: float = 0.0) -> None:
        """Run the network loop once, waiting at most ``timeout`` seconds for traffic."""
        ...

    def flush(self, timeout: float) -> bool:
        """Wait until everything published is acknowledged; False if time ran out."""
        ...


@dataclass
class ReplayStats:
    """What a replay did.

    Attributes:
        published: messages handed to the broker.
        acknowledged: of those, how many the broker acknowledged.
        payload_bytes: payload bytes published.
        elapsed: seconds from the first publish until the acknowledgements were in.
        interrupted: a stop was requested before the end of the recording.
    """

    published: int = 0
    acknowledged: int = 0
    payload_bytes: int = 0
    elapsed: float = 0.0
    interrupted: bool = False

    @property
    def unacknowledged(self) -> int:
        """Published messages the broker did not acknowledge."""
        return self.published - self.acknowledged


def replay_messages(
    client: PacedPublisher,
    messages: Iterable[RecordedMessage],
    *,
    speed: float | None = 1.0,
    topic_prefix: str = "",
    ack_timeout: float = 30.0,
    clock: Callable[[], float] = time.monotonic,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[ReplayStats], None] | None = None,
) -> ReplayStats:
    """Publish recorded messages in order, paced like the recording.

    Each message is due at ``start + (offset - first offset) / speed`` on the monotonic
    ``clock``: deadlines come from the start, so waiting never accumulates drift, and a replay
    that falls behind (a full publish window) catches up by publishing at once. While waiting it
    pumps the client, so acknowledgements and keep-alives are handled.

    Args:
        client: a connected client.
        messages: the recording's messages.
        speed: time scale (``2.0`` = twice as fast); ``None`` publishes without pacing.
        topic_prefix: prepended to every topic (e.g. ``"replay/"``).
        ack_timeout: how long to wait for outstanding acknowledgements at the end.
        clock: monotonic seconds (injected by tests).
        should_stop: polled between messages; when true, publishing stops early.
        on_progress: called after every publish (rate-limit it yourself).

    Returns:
        Counts; ``acknowledged < published`` means the broker did not confirm everything.

    Raises:
        ConnectError: the connection was lost.
        DeliveryError: the client refused a publish.
    """
    stats = ReplayStats()
    acked_before = client.acknowledged
    start = clock()
    first: float | None = None
    for message in messages:
        if first is None:
            first = message.offset
        if speed is not None:
            due = start + (message.offset - first) / speed
            while not should_stop() and (now := clock()) < due:
                client.pump(timeout=min(due - now, 0.1))
        elif stats.published % 256 == 0:
            # Unpaced, publish() only pumps when the window is full; read acks now and then.
            client.pump(timeout=0.0)
        if should_stop():
            stats.interrupted = True
            break
        client.publish(topic_prefix + message.topic, message.payload, message.qos, message.retain)
        stats.published += 1
        stats.payload_bytes += len(message.payload)
        if on_progress is not None:
            stats.acknowledged = client.acknowledged - acked_before
            on_progress(stats)
    client.flush(ack_timeout)
    stats.acknowledged = client.acknowledged - acked_before
    stats.elapsed = clock() - start
    return stats


def check_delivered(stats: ReplayStats, target: str) -> None:
    """Raise :class:`~iotpipe.errors.DeliveryError` unless every published message was acknowledged."""
    if stats.unacknowledged:
        raise DeliveryError(
            f"{target} did not acknowledge {stats.unacknowledged:,} of "
            f"{stats.published:,} replayed messages"
        )

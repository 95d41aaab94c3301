"""The simulator's one seam to a broker: :class:`Link`, and an in-memory implementation.

:class:`iotpipe.mqtt.MqttClient` is the real link. :class:`MemoryLink` keeps every message in a
list and acknowledges at the next ``pump``, and can be told to drop the connection or lose
acknowledgements, so the run loop's accounting and recovery are testable without a broker.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from iotpipe.errors import ConnectError
from iotpipe.mqtt import Message, Will


class Link(Protocol):
    """One connection to the broker (what the simulator needs of ``MqttClient``)."""

    published: int
    acknowledged: int
    reconnects: int

    @property
    def unacknowledged(self) -> int:
        """QoS>0 messages published and not yet acknowledged."""
        ...

    @property
    def connected(self) -> bool:
        """Whether the link is up."""
        ...

    def connect(self, timeout: float = ...) -> None:
        """Connect and wait for the broker to accept us (raises ConnectError)."""

    def reconnect(self, deadline: float) -> None:
        """Re-establish a lost connection before ``deadline`` (monotonic), or raise ConnectError."""

    def publish(self, topic: str, payload: bytes, qos: int = ..., retain: bool = ...) -> int:
        """Publish one message, waiting while the in-flight window is full."""
        ...

    def pump(self, timeout: float = ...) -> None:
        """Run the network loop once (raises ConnectError when the link is lost)."""

    def flush(self, timeout: float) -> bool:
        """Wait until every message is acknowledged; False if time ran out."""
        ...

    def disconnect(self) -> None:
        """Disconnect cleanly (no last will)."""


#: Makes link number ``index`` (0-based), with ``will`` as its last will or None.
LinkFactory = Callable[[int, Will | None], Link]


class MemoryLink:
    """A :class:`Link` that records messages in memory.

    Args:
        will: kept for inspection (``self.will``).
        acknowledge: False to lose every acknowledgement (``flush`` then times out).
        max_inflight: the publish window, as in ``MqttClient``.

    Attributes:
        messages: every message published, in order (retransmissions are not repeated).
        drops: how many times :meth:`drop` cut the connection.
    """

    def __init__(
        self, will: Will | None = None, *, acknowledge: bool = True, max_inflight: int = 1000
    ) -> None:
        self.will = will
        self.acknowledge = acknowledge
        self.max_inflight = max_inflight
        self.messages: list[Message] = []
        self.published = 0
        self.acknowledged = 0
        self.reconnects = 0
        self.drops = 0
        self.connected = False
        self._unacked = 0
        self._drop_at: int | None = None

    @property
    def unacknowledged(self) -> int:
        """Messages published and not yet acknowledged."""
        return self._unacked

    def drop_after(self, messages: int) -> None:
        """Lose the connection once ``messages`` more messages have been published."""
        self._drop_at = self.published + messages

    def connect(self, timeout: float = 10.0) -> None:
        """Connect (always succeeds)."""
        del timeout
        self.connected = True

    def reconnect(self, deadline: float) -> None:
        """Reconnect (always succeeds before ``deadline``)."""
        if time.monotonic() > deadline:
            raise ConnectError("memory://", "deadline passed")
        self.connected = True
        self.reconnects += 1

    def _check(self) -> None:
        if not self.connected:
            raise ConnectError("memory://", "connection lost")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Record one message."""
        while qos > 0 and self.acknowledge and self._unacked >= self.max_inflight:
            self.pump()
        self.messages.append(Message(topic, payload, qos, retain, mid=len(self.messages) + 1))
        self.published += 1
        if qos > 0:
            self._unacked += 1
        else:
            self.acknowledged += 1
        if self._drop_at is not None and self.published >= self._drop_at:
            self._drop_at = None
            self.connected = False
            self.drops += 1
        return len(self.messages)

    def pump(self, timeout: float = 0.0) -> None:
        """Acknowledge everything in flight (unless acknowledgements are lost)."""
        del timeout
        self._check()
        if self.acknowledge:
            self.acknowledged += self._unacked
            self._unacked = 0

    def flush(self, timeout: float) -> bool:
        """Acknowledge everything; False when acknowledgements are lost."""
        del timeout
        self.pump()
        return self._unacked == 0

    def disconnect(self) -> None:
        """Disconnect."""
        self.connected = False

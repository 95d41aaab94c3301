"""The simulator's one seam to a broker: :class:`Link`, and an in-memory implementation.

:class:`MqttLink` (an :class:`iotpipe.mqtt.MqttClient` that queues what it receives) is the real
link. :class:`MemoryLink` keeps every message in a list and acknowledges at the next ``pump``, and
can be told to drop the connection or lose acknowledgements, so the run loop's accounting and
recovery are testable without a broker. It also plays the broker's side of receipts: retained
messages, messages injected by a test, and (``auto_receipt``) a store that receipts every
envelope once the broker acknowledged it.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from iotpipe.errors import ConnectError
from iotpipe.mqtt import Message, MqttClient, Will, topic_matches
from iotpipe.receipts import CAPABILITY_TOPIC, BootReceipt, Receipt, encode_receipt, receipt_topic
from iotpipe.settings import MqttSettings


class Link(Protocol):
    """One connection to the broker (what the simulator needs of ``MqttClient``)."""

    published: int
    acknowledged: int
    reconnects: int
    #: Messages received on the link's subscriptions, oldest first, until the run takes them.
    inbox: deque[Message]
    #: True when :meth:`subscribe` itself delivers the retained messages (nothing to wait for).
    synchronous: bool

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

    def subscribe(self, filters: Iterable[tuple[str, int]], timeout: float = ...) -> list[int]:
        """Subscribe (kept across reconnects); received messages go to :attr:`inbox`."""
        ...

    def disconnect(self) -> None:
        """Disconnect cleanly (no last will)."""


#: Makes link number ``index`` (0-based), with ``will`` as its last will or None.
LinkFactory = Callable[[int, Will | None], Link]


class MqttLink(MqttClient):
    """The real link: an :class:`~iotpipe.mqtt.MqttClient` whose received messages queue up in
    :attr:`inbox` (the run takes them between publishes)."""

    synchronous = False

    def __init__(
        self, settings: MqttSettings, *, client_id: str, will: Will | None, max_inflight: int = 1000
    ) -> None:
        self.inbox: deque[Message] = deque()
        super().__init__(
            settings,
            client_id=client_id,
            will=will,
            max_inflight=max_inflight,
            on_message=self.inbox.append,
        )


def capability_message(receipts: bool) -> bytes:
    """A pipeline capability message as a bridge publishes it (retained) on the capability topic."""
    return json.dumps(
        {"v": "1.1", "receipts": receipts, "agent": "memory", "ts": 0}, separators=(",", ":")
    ).encode()


class MemoryLink:
    """A :class:`Link` that records messages in memory.

    Args:
        will: kept for inspection (``self.will``).
        acknowledge: False to lose every acknowledgement (``flush`` then times out).
        max_inflight: the publish window, as in ``MqttClient``.
        capability: the retained pipeline capability a subscriber to ``iotpipe/v1/pipeline``
            finds: receipts on (True), off (False), or no message at all (None, the default:
            a pipeline without receipts).
        auto_receipt: play a store that receipts every telemetry envelope once it is
            acknowledged (implies ``capability=True``).

    Attributes:
        messages: every message published, in order (retransmissions are not repeated).
        drops: how many times :meth:`drop` cut the connection.
        inbox: messages delivered on the link's subscriptions, not yet taken.
        retained: the retained message per topic, as a broker keeps them.
    """

    synchronous = True

    def __init__(
        self,
        will: Will | None = None,
        *,
        acknowledge: bool = True,
        max_inflight: int = 1000,
        capability: bool | None = None,
        auto_receipt: bool = False,
    ) -> None:
        self.will = will
        self.inbox: deque[Message] = deque()
        self.subscriptions: list[str] = []
        self.retained: dict[str, bytes] = {}
        self.auto_receipt = auto_receipt
        if auto_receipt and capability is None:
            capability = True
        if capability is not None:
            self.retained[CAPABILITY_TOPIC] = capability_message(capability)
        self._receipt_from = 0
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
            if self.auto_receipt:
                self._receipt_acknowledged()

    def _receipt_acknowledged(self) -> None:
        """Answer every telemetry envelope acknowledged since the last pump with a receipt."""
        for message in self.messages[self._receipt_from :]:
            if not message.topic.endswith("/telemetry"):
                continue
            try:
                env = json.loads(message.payload)
                site, device, boot, seq = env["site"], env["device"], env.get("boot"), env["seq"]
                entry = BootReceipt(boot=boot, ranges=((seq, seq),))
            except (ValueError, KeyError, TypeError):
                continue  # an envelope the bridge rejects is never receipted
            receipt = Receipt(site=site, device=device, ts=0, stored=(entry,))
            self.inject(receipt_topic(site, device), encode_receipt(receipt), retain=True)
        self._receipt_from = len(self.messages)

    def subscribe(self, filters: Iterable[tuple[str, int]], timeout: float = 10.0) -> list[int]:
        """Subscribe; the retained messages that match arrive in :attr:`inbox` at once."""
        del timeout
        granted = []
        for topic_filter, qos in filters:
            self.subscriptions.append(topic_filter)
            granted.append(qos)
            for topic, payload in self.retained.items():
                if topic_matches(topic_filter, topic):
                    self.inbox.append(Message(topic, payload, 1, retain=True))
        return granted

    def inject(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """A message arrives from the broker; True if a subscription of this link matches it."""
        if retain:
            self.retained[topic] = payload
        if not any(topic_matches(f, topic) for f in self.subscriptions):
            return False
        self.inbox.append(Message(topic, payload, 1))
        return True

    def flush(self, timeout: float) -> bool:
        """Acknowledge everything; False when acknowledgements are lost."""
        del timeout
        self.pump()
        return self._unacked == 0

    def disconnect(self) -> None:
        """Disconnect."""
        self.connected = False

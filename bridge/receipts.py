"""The receipt relay: receipts from RabbitMQ down to the devices over MQTT (wire contract 1.1).

Consumers publish receipts to the ``iotpipe.receipts`` exchange; the relay consumes them from one
queue and publishes each body unchanged, QoS 1 and retained, on the device's receipt topic
(``iotpipe/v1/{site}/{device}/receipt``), so a device that reconnects finds its latest receipt.

It runs beside the bridge, not inside it: its own thread ``iotpipe-receipts``, its own AMQP
connection (a :class:`~iotpipe.amqp_consumer.BatchConsumer`) and its own MQTT connection, so the
telemetry path keeps its throughput and never waits on receipts::

    RabbitMQ  receipt_queue --batch--> [iotpipe-receipts] --QoS 1, retained--> MQTT broker
                      ^                        |
                      +------ ack_through -----+  (after every PUBACK of the batch)

Delivery: a batch is acknowledged to RabbitMQ only once the MQTT broker acknowledged every
receipt of it. While MQTT is away the batch stays unacknowledged (paho re-sends it after the
reconnect); a lost AMQP connection hands it back to the queue. Receipts are idempotent sets, so
a receipt delivered twice costs nothing. What cannot be delivered does not pile up: the queue
drops receipts older than ``receipt_ttl`` and, past :data:`MAX_WAITING`, the oldest ones (a
device resends what no receipt covered). Every bridge uses the same queue name: competing
consumers, so bridges sharing a subscription do not multiply receipt traffic.

Capability: on every MQTT connect the relay publishes, retained, on
:data:`~iotpipe.receipts.CAPABILITY_TOPIC` that receipts flow; a bridge with ``receipts = false``
publishes once that they do not (:func:`announce`), so agents can tell.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

from bridge.settings import BridgeSettings
from iotpipe import __version__
from iotpipe.amqp_consumer import BatchConsumer, Delivery, DeliverySource, QueueSpec
from iotpipe.errors import ConfigError, ConnectError, DeliveryError
from iotpipe.mqtt import MqttClient
from iotpipe.receipts import CAPABILITY_TOPIC, EXCHANGE, receipt_topic
from iotpipe.settings import AmqpSettings, MqttSettings
from iotpipe.topics import is_valid_name

__all__ = [
    "MAX_WAITING",
    "ReceiptRelay",
    "RelayMetrics",
    "announce",
    "capability",
    "device_of",
    "receipt_queue_spec",
]

log = logging.getLogger(__name__)

#: Receipts the queue keeps waiting at most; past it the oldest are dropped. About one receipt
#: per device per second: room for a large fleet over the default ``receipt_ttl``.
MAX_WAITING = 100_000

_BATCH = 200
"""Receipts published per batch (below the MQTT window of 1000, so publish never waits)."""

_SLICE = 0.05
"""Longest wait in one pass of the loop: how quickly the relay notices stop()."""

_RECONNECT = 2.0
"""Seconds one MQTT reconnect attempt may take before the AMQP side is serviced again."""


def receipt_queue_spec(settings: BridgeSettings) -> QueueSpec:
    """The receipts queue: classic, durable, expiring and bounded, never dead-lettering."""
    return QueueSpec(
        name=settings.receipt_queue,
        bindings=(settings.receipt_binding,),
        queue_type="classic",
        exchange=EXCHANGE,
        dead_letter=False,
        message_ttl=settings.receipt_ttl * 1000,
        max_length=MAX_WAITING,
    )


def capability(receipts: bool, ts_ms: int) -> bytes:
    """The retained capability message: whether this pipeline carries receipts."""
    body = {"v": "1.1", "receipts": receipts, "agent": f"iotpipe-bridge/{__version__}", "ts": ts_ms}
    return json.dumps(body, separators=(",", ":")).encode()


def device_of(routing_key: str) -> tuple[str, str] | None:
    """``(site, device)`` of a receipt routing key ``iotpipe.v1.{site}.{device}.receipt``, else None."""
    parts = routing_key.split(".")
    if len(parts) != 5 or parts[:2] != ["iotpipe", "v1"] or parts[4] != "receipt":
        return None
    site, device = parts[2], parts[3]
    if not (is_valid_name(site) and is_valid_name(device)):
        return None
    return site, device


class RelayMetrics:
    """The relay's metrics, registered on the bridge's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.forwarded = Counter(
            "iotpipe_bridge_receipts_forwarded",
            "receipts the MQTT broker acknowledged (then acked to RabbitMQ)",
            registry=registry,
        )
        self.dropped = Counter(
            "iotpipe_bridge_receipts_dropped",
            "receipts dropped: malformed routing key or refused by the MQTT client",
            registry=registry,
        )
        self.up = Gauge(
            "iotpipe_bridge_receipts_up",
            "1 while the receipt relay's AMQP and MQTT connections are both up",
            registry=registry,
        )


def announce(mqtt: MqttClient, receipts: bool, clock: Callable[[], float] = time.time) -> None:
    """Publish the capability (retained, QoS 1) on a connected client; PUBACK comes with a flush."""
    mqtt.publish(CAPABILITY_TOPIC, capability(receipts, int(clock() * 1000)), qos=1, retain=True)


class ReceiptRelay:
    """Relays receipts from a RabbitMQ queue to MQTT on its own thread; see the module docstring.

    Args:
        mqtt: the relay's own MQTT client (clean session, not the bridge's).
        source: the receipts queue consumer; None when receipts are off: the relay then only
            announces ``"receipts": false`` once and ends.
        registry: where :class:`RelayMetrics` are registered.
        clock: wall clock (seconds) for the capability's ``ts``.
        batch: receipts per batch.
        ack_timeout: how long a batch may wait for its PUBACKs before the connection is
            considered broken and re-established.
    """

    def __init__(
        self,
        mqtt: MqttClient,
        source: DeliverySource | None,
        registry: CollectorRegistry,
        *,
        clock: Callable[[], float] = time.time,
        batch: int = _BATCH,
        ack_timeout: float = 10.0,
    ) -> None:
        self.mqtt = mqtt
        self.source = source
        self.metrics = RelayMetrics(registry)
        self.metrics.up.set_function(lambda: float(self.up))
        self._clock = clock
        self._batch = batch
        self._ack_timeout = ack_timeout
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._since = 0.0  # when the batch in hand was published

    @classmethod
    def from_settings(
        cls,
        mqtt: MqttSettings,
        amqp: AmqpSettings,
        settings: BridgeSettings,
        registry: CollectorRegistry,
    ) -> ReceiptRelay:
        """The relay of a bridge: client id ``<client_id>-receipts``, queue from ``settings``."""
        client = MqttClient(mqtt, client_id=f"{settings.client_id}-receipts", clean_session=True)
        source = (
            BatchConsumer(
                amqp,
                receipt_queue_spec(settings),
                prefetch=2 * _BATCH,
                name=f"{settings.client_id}-receipts",
            )
            if settings.receipts
            else None
        )
        return cls(client, source, registry)

    @property
    def up(self) -> bool:
        """Whether both connections are up (never with receipts off)."""
        return self.source is not None and self.source.connected and self.mqtt.connected

    @property
    def running(self) -> bool:
        """Whether the relay's thread is alive (with receipts off it ends after announcing)."""
        return self._thread is not None and self._thread.is_alive()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Run the relay on its thread ``iotpipe-receipts``."""
        self._thread = threading.Thread(target=self.run, name="iotpipe-receipts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 15.0) -> None:
        """Finish the batch in hand (within its PUBACK wait), close both connections, join."""
        self._stopping.set()
        if self.source is not None:
            self.source.stop()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("receipt relay did not stop within %g s", timeout)

    def run(self) -> None:
        """Relay until :meth:`stop`; with receipts off, announce that and return."""
        try:
            if not self._connect_mqtt():
                return
            if self.source is None:
                if not self.mqtt.flush(self._ack_timeout):
                    log.warning("receipt relay: capability not acknowledged url=%s", self.mqtt.url)
                log.info("receipt relay off: announced receipts=false on %s", CAPABILITY_TOPIC)
                return
            self.source.connect(retry=True)
            log.info("receipt relay running")
            held: list[Delivery] = []
            while not self._stopping.is_set():
                held = self._step(held)
            if held and self.mqtt.connected and self.mqtt.flush(self._ack_timeout):
                self._settle(held)
        except ConfigError as err:
            log.error("receipt relay stopped: %s", err)
        except Exception:
            # A failure here must not take the bridge down with it: say so and leave.
            log.exception("receipt relay failed; receipts stop until the bridge restarts")
        finally:
            self._close()

    def _step(self, held: list[Delivery]) -> list[Delivery]:
        """One pass: fetch and publish a batch, or wait for the PUBACKs of the one in hand."""
        assert self.source is not None
        if not held:
            held = self.source.next_batch(self._batch, _SLICE)
            if held:
                self._publish(held)
                self._since = time.monotonic()
        try:
            if not held:
                self.mqtt.pump(0.0)
            elif self.mqtt.flush(_SLICE):
                self._settle(held)
                held = []
            elif time.monotonic() - self._since > self._ack_timeout:
                raise ConnectError(self.mqtt.url.redacted(), "no PUBACK for receipts")
            else:
                self.source.sleep(0.001)  # keeps the AMQP connection's heartbeats going
        except ConnectError as err:
            log.warning("receipt relay lost MQTT (receipts stay unacknowledged): %s", err.reason)
            # paho re-sends the unacknowledged receipts once connected again.
            self._connect_mqtt()
            self._since = time.monotonic()
        return held

    def _publish(self, batch: list[Delivery]) -> None:
        for delivery in batch:
            where = device_of(delivery.routing_key)
            if where is None:
                self.metrics.dropped.inc()
                log.warning("receipt dropped: malformed routing_key=%r", delivery.routing_key)
                continue
            try:
                self.mqtt.publish(receipt_topic(*where), delivery.body, qos=1, retain=True)
            except DeliveryError as err:
                self.metrics.dropped.inc()
                log.warning("receipt dropped routing_key=%s: %s", delivery.routing_key, err)

    def _settle(self, batch: list[Delivery]) -> None:
        assert self.source is not None
        self.source.ack_through(batch[-1])
        forwarded = sum(1 for d in batch if device_of(d.routing_key) is not None)
        self.metrics.forwarded.inc(forwarded)

    def _connect_mqtt(self) -> bool:
        """Connect (again) with backoff until connected or stopped, then announce; True if up."""
        failures = 0
        while not self._stopping.is_set():
            try:
                self.mqtt.reconnect(deadline=time.monotonic() + _RECONNECT)
            except ConnectError as err:
                failures += 1
                if failures == 1:
                    log.warning("receipt relay cannot reach MQTT, retrying: %s", err.reason)
                self._pause(min(0.5 * failures, 5.0))
                continue
            announce(self.mqtt, self.source is not None, self._clock)
            log.info("receipt relay connected to MQTT url=%s", self.mqtt.url)
            return True
        return False

    def _pause(self, seconds: float) -> None:
        """Wait, keeping the AMQP connection alive when there is one."""
        if self.source is not None and self.source.connected:
            self.source.sleep(seconds)
        else:
            self._stopping.wait(seconds)

    def _close(self) -> None:
        if self.source is not None:
            self.source.close()  # unacknowledged receipts go back to the queue
        self.mqtt.disconnect()

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

Holding (per-device limits, :mod:`bridge.limits`): while the limiter holds a device under
policy ``hold``, the relay parks that device's receipts in memory instead of publishing them,
merged into one receipt per device (:class:`ParkedReceipts`), and publishes that receipt when
the hold ends. A device that speaks receipts keeps at most its receipt window unreceipted, so
it waits: that is what slows it down. Parked receipts are acknowledged to RabbitMQ with their
batch; a crash of the bridge loses them, and the device resends what no receipt covered (the
store absorbs the duplicates).

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

from bridge.limits import Limiter
from bridge.settings import BridgeSettings
from iotpipe import __version__
from iotpipe.amqp_consumer import BatchConsumer, Delivery, DeliverySource, QueueSpec
from iotpipe.errors import ConfigError, ConnectError, DeliveryError
from iotpipe.mqtt import MqttClient
from iotpipe.receipts import (
    CAPABILITY_TOPIC,
    EXCHANGE,
    MAX_BOOTS,
    MAX_RANGES,
    BootReceipt,
    Receipt,
    SeqSet,
    decode_receipt,
    encode_receipt,
    receipt_topic,
)
from iotpipe.settings import AmqpSettings, MqttSettings
from iotpipe.topics import is_valid_name

__all__ = [
    "MAX_WAITING",
    "ParkedReceipts",
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


class _Boot:
    """What the parked receipts of one device say of one boot."""

    __slots__ = ("seqs", "through")

    def __init__(self) -> None:
        self.through: int | None = None
        self.seqs = SeqSet()

    def merged(self, entry: BootReceipt) -> _Boot:
        """A copy with ``entry`` added (``through`` kept apart, seqs below it dropped)."""
        out = _Boot()
        out.through = self.through
        if entry.through is not None:
            out.through = max(entry.through, -1 if out.through is None else out.through)
        out.seqs = SeqSet(self.seqs.ranges())
        for lo, hi in entry.ranges:
            out.seqs.add_range(lo, hi)
        if out.through is not None:
            out.seqs.discard_through(out.through)
            ranges = out.seqs.ranges()
            if ranges and ranges[0][0] == out.through + 1:  # contiguous: through covers it
                out.through = ranges[0][1]
                out.seqs.discard_through(out.through)
        return out

    def entry(self, boot: str | None) -> BootReceipt:
        return BootReceipt(boot=boot, ranges=tuple(self.seqs.ranges()), through=self.through)


class _Device:
    __slots__ = ("boots", "ts")

    def __init__(self) -> None:
        self.boots: dict[str | None, _Boot] = {}
        self.ts = 0


class ParkedReceipts:
    """The receipts of held devices, merged into one receipt per device (set union per boot).

    Memory is bounded by the contract's limits on one receipt (:data:`MAX_BOOTS` boots,
    :data:`MAX_RANGES` ranges per boot): a receipt that would take the merged one past them
    makes :meth:`park` hand back the merged one so far, to be published at once.
    """

    def __init__(self) -> None:
        self._devices: dict[tuple[str, str], _Device] = {}

    def __len__(self) -> int:
        """Devices with parked receipts."""
        return len(self._devices)

    def __contains__(self, key: object) -> bool:
        return key in self._devices

    def devices(self) -> list[tuple[str, str]]:
        """The devices with parked receipts."""
        return list(self._devices)

    def park(self, site: str, device: str, receipt: Receipt) -> Receipt | None:
        """Merge ``receipt`` into the device's parked one.

        Returns:
            The receipt parked before, when adding this one would break the contract's limits
            (publish it now; ``receipt`` starts a new parked one), else None.
        """
        key = (site, device)
        parked = self._devices.get(key)
        full: Receipt | None = None
        if parked is not None:
            merged = self._merge(parked, receipt)
            if merged is not None:
                parked.boots = merged
                parked.ts = max(parked.ts, receipt.ts)
                return None
            full = self.release(site, device)
        parked = self._devices[key] = _Device()
        merged = self._merge(parked, receipt)
        assert merged is not None  # one valid receipt always fits
        parked.boots, parked.ts = merged, receipt.ts
        return full

    @staticmethod
    def _merge(parked: _Device, receipt: Receipt) -> dict[str | None, _Boot] | None:
        """The device's boots with ``receipt`` added, or None if they would break the limits."""
        boots = dict(parked.boots)
        for entry in receipt.stored:
            old = boots.pop(entry.boot, None) or _Boot()
            new = old.merged(entry)
            if len(new.seqs.ranges()) > MAX_RANGES:
                return None
            boots[entry.boot] = new  # most recently receipted boot last
        return boots if len(boots) <= MAX_BOOTS else None

    def release(self, site: str, device: str) -> Receipt | None:
        """The device's merged receipt, forgotten here (None if nothing was parked)."""
        parked = self._devices.pop((site, device), None)
        if parked is None:
            return None
        stored = tuple(boot.entry(name) for name, boot in parked.boots.items())
        return Receipt(site=site, device=device, ts=parked.ts, stored=stored)


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
        self.parked = Counter(
            "iotpipe_bridge_receipts_parked",
            "receipts held back while their device was over its limits (policy hold)",
            registry=registry,
        )
        self.released = Counter(
            "iotpipe_bridge_receipts_released",
            "merged receipts published when a device's hold ended",
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
        limiter: the bridge's per-device limiter, whose held devices' receipts are parked until
            their hold ends (None: no limits, every receipt goes out at once).
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
        limiter: Limiter | None = None,
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
        self._limiter = limiter
        self._parked = ParkedReceipts()
        self._parked_in_batch = 0

    @classmethod
    def from_settings(
        cls,
        mqtt: MqttSettings,
        amqp: AmqpSettings,
        settings: BridgeSettings,
        registry: CollectorRegistry,
        *,
        limiter: Limiter | None = None,
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
        return cls(client, source, registry, limiter=limiter)

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
            released = self._release_all()  # stopping: parked receipts go out now, not never
            flushed = (held or released) and self.mqtt.connected
            if flushed and self.mqtt.flush(self._ack_timeout) and held:
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
            if self._parked:
                self._release_due()
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
        self._parked_in_batch = 0
        for delivery in batch:
            where = device_of(delivery.routing_key)
            if where is None:
                self.metrics.dropped.inc()
                log.warning("receipt dropped: malformed routing_key=%r", delivery.routing_key)
                continue
            if self._limiter is not None and self._park(where, delivery.body):
                self._parked_in_batch += 1
                continue
            self._send(where, delivery.body)

    def _send(self, where: tuple[str, str], body: bytes) -> None:
        try:
            self.mqtt.publish(receipt_topic(*where), body, qos=1, retain=True)
        except DeliveryError as err:
            self.metrics.dropped.inc()
            log.warning("receipt dropped for %s/%s: %s", *where, err)

    def _park(self, where: tuple[str, str], body: bytes) -> bool:
        """Park the receipt if its device is held (True); a device no longer held first gets
        what was parked for it, so its receipts go out in order."""
        assert self._limiter is not None
        if not self._limiter.held_until(*where):
            if where in self._parked:
                self._release(where)
            return False
        receipt = decode_receipt(body)
        if isinstance(receipt, str):
            return False  # not ours to judge: it goes out unchanged, as any receipt
        self.metrics.parked.inc()
        full = self._parked.park(*where, receipt)
        if full is not None:  # the merged receipt would outgrow the contract: send what we have
            self._send(where, encode_receipt(full))
            self.metrics.released.inc()
        return True

    def _release(self, where: tuple[str, str]) -> None:
        receipt = self._parked.release(*where)
        if receipt is not None:
            self._send(where, encode_receipt(receipt))
            self.metrics.released.inc()

    def _release_due(self) -> None:
        """Publish the parked receipt of every device whose hold has ended."""
        assert self._limiter is not None
        for where in self._parked.devices():
            if not self._limiter.held_until(*where):
                self._release(where)

    def _release_all(self) -> int:
        devices = self._parked.devices()
        for where in devices:
            self._release(where)
        return len(devices)

    def _settle(self, batch: list[Delivery]) -> None:
        assert self.source is not None
        self.source.ack_through(batch[-1])
        forwarded = sum(1 for d in batch if device_of(d.routing_key) is not None)
        self.metrics.forwarded.inc(forwarded - self._parked_in_batch)

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

"""The MQTT -> RabbitMQ bridge: validate, route, publish with confirms, spool, ack in order.

Delivery rule: an MQTT message is acknowledged (PUBACK, in the order the messages arrived, as
MQTT requires) only after RabbitMQ confirmed it, or after it was committed to the local spool.

Threads, each with one job (paho and pika are each driven by exactly one thread):

- ``iotpipe-bridge`` (``Bridge.run``): the MQTT network loop. It validates each message,
  hands it to the AMQP publisher (or to the spool writer while RabbitMQ is away), applies the
  outcomes that the other threads queue for it, sends PUBACKs in arrival order, and feeds the
  spool drain.
- ``iotpipe-amqp`` (``ConfirmingPublisher``): pika's I/O loop; reports each publish outcome.
- ``iotpipe-spool`` (``SpoolWriter``): group commits to the SQLite spool.
- ``iotpipe-http``: ``/metrics`` and ``/healthz``.
- ``iotpipe-receipts`` (``ReceiptRelay``, :mod:`bridge.receipts`): receipts RabbitMQ -> MQTT, on
  connections of its own; it shares nothing with the threads above but the metrics registry
  and, with per-device limits on, the limiter's hold deadlines (:mod:`bridge.limits`).

Outcomes travel back to the bridge thread through one ``deque`` (append and popleft are atomic),
so neither pika's thread nor the spool's ever waits on MQTT.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from bridge.ingest import RETAINED_COPY, Ingest, IngestRule
from bridge.limits import Limiter
from bridge.mapping import Mapped, MappingError, StatefulFormat
from bridge.receipts import ReceiptRelay
from bridge.settings import BridgeSettings
from bridge.spool import Entry, Spool, SpoolWriter
from bridge.uplink import PackingPublisher, own_uplink_queue
from iotpipe.amqp import (
    DEAD_EXCHANGE,
    TELEMETRY_EXCHANGE,
    ConfirmingPublisher,
    MessageProperties,
    Outcome,
    PublisherFactory,
    ResultHandler,
    dead_letter_properties,
    decode_properties,
    encode_properties,
    encode_telemetry_properties,
    telemetry_properties,
)
from iotpipe.envelope import Envelope, Rejection, Status, decode
from iotpipe.errors import CertificateError, ConnectError
from iotpipe.health import HealthServer
from iotpipe.mqtt import Message, MessageHandler, MqttClient, SubscriberFactory
from iotpipe.pacing import TokenBucket
from iotpipe.settings import AmqpSettings, MqttSettings
from iotpipe.topics import to_routing_key
from iotpipe.watchdog import Liveness
from iotpipe.wire import PREFIX, VERSION, encode_envelope

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Routed:
    """Where one message goes: exchange, routing key, the unchanged body and its properties.

    The properties are kept as they go on the wire (:func:`~iotpipe.amqp.encode_properties`):
    encoded once, when the message is routed; :attr:`properties` reads them back.
    """

    exchange: str
    routing_key: str
    body: bytes
    encoded: bytes

    @property
    def properties(self) -> MessageProperties:
        """The properties, decoded from :attr:`encoded`."""
        return decode_properties(self.encoded)

    def to_spool(self, received_at: float) -> Entry:
        """The spool's form of this message (properties as a JSON-able dict)."""
        props = self.properties
        fields = {
            "message_id": props.message_id,
            "content_type": props.content_type,
            "type": props.type,
            "delivery_mode": props.delivery_mode,
            "timestamp": props.timestamp,
            "app_id": props.app_id,
            "headers": dict(props.headers) if props.headers is not None else None,
        }
        return Entry(self.exchange, self.routing_key, self.body, fields, received_at)

    @staticmethod
    def from_spool(exchange: str, routing_key: str, body: bytes, fields: Any) -> Routed:
        """Rebuild a message read back from the spool."""
        return Routed(exchange, routing_key, body, encode_properties(MessageProperties(**fields)))


@dataclass(slots=True)
class Inbound:
    """One MQTT message on its way: acknowledged once ``done``.

    A foreign message an ingest rule mapped to several envelopes is one Inbound in the ack
    order (``routed`` empty, ``parts`` = how many envelopes are still on their way) and one
    child per envelope (``parent`` set), published and spooled like any message: when the
    last child is done, so is the parent.
    """

    mid: int
    qos: int
    generation: int
    routed: Routed
    received_at: float
    received: float = field(default_factory=time.monotonic)
    done: bool = False
    parent: Inbound | None = None
    parts: int = 0

    def finish(self) -> None:
        """Mark this message (or this envelope of a mapped message) done."""
        self.done = True
        parent = self.parent
        if parent is not None:
            parent.parts -= 1
            if parent.parts == 0:
                parent.done = True


@dataclass(frozen=True, slots=True)
class Drained:
    """A token for a spool entry being re-sent."""

    spool_id: int


class BridgeMetrics:
    """The bridge's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "iotpipe_bridge_received", "MQTT messages received", ["kind"], registry=r
        )
        self.forwarded = Counter(
            "iotpipe_bridge_forwarded", "messages confirmed by RabbitMQ", registry=r
        )
        self.dead = Counter(
            "iotpipe_bridge_dead_lettered",
            "rejected messages sent to iotpipe.dead",
            ["reason"],
            registry=r,
        )
        self.spooled = Counter(
            "iotpipe_bridge_spooled", "messages committed to the spool", registry=r
        )
        self.drained = Counter(
            "iotpipe_bridge_spool_drained", "spooled messages confirmed by RabbitMQ", registry=r
        )
        self.returned = Counter(
            "iotpipe_bridge_unroutable", "publishes RabbitMQ returned as unroutable", registry=r
        )
        self.spool_depth = Gauge("iotpipe_bridge_spool_depth", "messages in the spool", registry=r)
        self.spool_bytes = Gauge("iotpipe_bridge_spool_bytes", "bytes in the spool", registry=r)
        self.unacked = Gauge(
            "iotpipe_bridge_mqtt_unacked",
            "MQTT messages received and not yet acknowledged",
            registry=r,
        )
        self.confirm_latency = Histogram(
            "iotpipe_bridge_confirm_latency_seconds",
            "MQTT receive to RabbitMQ confirm",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.reconnects = Counter(
            "iotpipe_bridge_reconnects", "reconnections", ["side"], registry=r
        )
        self.mapped = Counter(
            "iotpipe_bridge_mapped",
            "envelopes made from foreign messages by an ingest rule",
            ["rule"],
            registry=r,
        )


class Bridge:
    """Forward MQTT telemetry and status to RabbitMQ; see the module docstring.

    The bridge builds neither of its clients: it is handed a factory for each, which it calls
    with its own handler, and an open spool. :meth:`from_settings` wires the real ones
    (``MqttClient``, ``ConfirmingPublisher``, the SQLite spool); tests wire the in-memory ones
    of :mod:`iotpipe.testing`.

    Args:
        settings: the ``[bridge]`` section.
        subscriber: builds the MQTT client (fixed client id, persistent session, manual acks)
            that hands every message to the handler it is given.
        publisher: builds the AMQP publisher (window ``settings.window``, declaring
            ``settings.dead_letter_queue``) that reports every outcome to the handler given.
        spool: the open spool; the bridge closes it when it stops.
        serve_http: serve ``/metrics`` and ``/healthz`` while running.
        receipts: builds the receipt relay on the given metrics registry, handing it the
            limiter (None while no limit is configured) whose held devices' receipts it holds;
            it runs while the bridge runs (None: no relay, as in tests with in-memory clients).
        stateful: builds the stateful format of a ``format = "sparkplug"`` ingest rule
            (default: :class:`bridge.sparkplug.SparkplugIngest`, imported only then).
    """

    def __init__(
        self,
        settings: BridgeSettings,
        *,
        subscriber: SubscriberFactory,
        publisher: PublisherFactory,
        spool: Spool,
        serve_http: bool = True,
        receipts: Callable[[CollectorRegistry, Limiter | None], ReceiptRelay] | None = None,
        stateful: Callable[[IngestRule], StatefulFormat] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = BridgeMetrics()
        # No ingest rule: no rule matching at all, the native path pays one `is None` test.
        self.ingest = Ingest(settings.ingest, stateful=stateful) if settings.ingest else None
        # No limit configured: no limiter, and the hot path pays one `is None` test.
        self.limiter = (
            Limiter(settings.limits, self.metrics.registry) if settings.limits.enabled else None
        )
        self.receipts = (
            receipts(self.metrics.registry, self.limiter) if receipts is not None else None
        )
        # Label children looked up once: .labels() costs more than the increment itself.
        self._received = {
            kind: self.metrics.received.labels(kind)
            for kind in ("telemetry", "status", "rejected", "cleared", "mapped", "retained_copy")
        }
        self._mapped = {
            rule.name: self.metrics.mapped.labels(rule.name) for rule in settings.ingest
        }
        self._results: deque[tuple[object, Outcome | None]] = deque()
        self._pending: deque[Inbound] = deque()
        self._generation = 0
        self._stopping = threading.Event()
        self.liveness = Liveness()
        self._drain_rate = TokenBucket(settings.drain_rate, setting="bridge.drain_rate")
        self._amqp_reconnects = 0

        self.spool = spool
        self._spool_writer: SpoolWriter[Inbound] = SpoolWriter(
            self.spool,
            on_committed=self._on_committed,
            on_error=self._on_spool_error,
            name="iotpipe-spool",
        )
        self.publisher = publisher(self._on_result)
        # Packed uplink: the open pack is sent once its oldest message waited long enough.
        self._tick: Callable[[], None] | None = None
        if isinstance(self.publisher, PackingPublisher):
            self._tick = self.publisher.tick
            self._pack_metrics(self.publisher)
        self.mqtt = subscriber(self._on_message)
        self._http = (
            HealthServer(settings.http_host, settings.http_port, self.metrics.registry, self.health)
            if serve_http
            else None
        )
        # Read when /metrics is scraped, not set on every loop iteration.
        self.metrics.spool_depth.set_function(lambda: self.spool.depth)
        self.metrics.spool_bytes.set_function(lambda: self.spool.bytes)
        self.metrics.unacked.set_function(lambda: len(self._pending))

    @classmethod
    def from_settings(
        cls,
        mqtt: MqttSettings,
        amqp: AmqpSettings,
        settings: BridgeSettings,
        *,
        serve_http: bool = True,
    ) -> Bridge:
        """A bridge with the real clients: paho to ``mqtt``, pika to ``amqp``, the SQLite spool.

        Raises:
            SpoolError: the spool file cannot be opened (as :class:`Spool` says).
        """

        def subscriber(on_message: MessageHandler) -> MqttClient:
            return MqttClient(
                mqtt,
                client_id=settings.client_id,
                clean_session=False,
                manual_ack=True,
                on_message=on_message,
                max_inflight=1000,
            )

        def publisher(on_result: ResultHandler) -> ConfirmingPublisher:
            return ConfirmingPublisher(
                amqp,
                on_result=on_result,
                window=settings.window,
                dead_letter_queue=settings.dead_letter_queue,
            )

        def packing(on_result: ResultHandler) -> PackingPublisher:
            def packs(on_pack: ResultHandler) -> ConfirmingPublisher:
                return ConfirmingPublisher(
                    amqp,
                    on_result=on_pack,
                    window=settings.window,
                    dead_letter_queue=settings.dead_letter_queue,
                    own_queue=own_uplink_queue(settings.uplink_queue),
                )

            return PackingPublisher(
                packs,
                on_result,
                max_messages=settings.pack_max_messages,
                max_bytes=settings.pack_max_bytes,
                max_delay=settings.pack_max_delay,
                level=settings.pack_level,
                routing_key=settings.uplink_queue,
            )

        spool = Spool(
            settings.spool_path,
            max_bytes=settings.spool_max_bytes,
            durability=settings.spool_durability,
        )
        return cls(
            settings,
            subscriber=subscriber,
            publisher=packing if settings.uplink == "packed" else publisher,
            spool=spool,
            serve_http=serve_http,
            receipts=lambda registry, limiter: ReceiptRelay.from_settings(
                mqtt, amqp, settings, registry, limiter=limiter
            ),
        )

    def _pack_metrics(self, packer: PackingPublisher) -> None:
        """Gauges read from the packing publisher's counters when /metrics is scraped."""
        r = self.metrics.registry
        for name, text, read in (
            ("packs", "packs sealed and handed to the publisher", lambda: packer.packs_sent),
            ("bytes_in", "uncompressed bytes of the packs sent", lambda: packer.bytes_in),
            ("bytes_out", "bytes of the packs as sent (compressed)", lambda: packer.bytes_out),
        ):
            Gauge(f"iotpipe_bridge_uplink_{name}", text, registry=r).set_function(read)

    # -- outcomes from other threads ------------------------------------------------------

    def _on_result(self, token: object, outcome: Outcome) -> None:
        self._results.append((token, outcome))

    def _on_committed(self, tokens: list[Inbound]) -> None:
        for token in tokens:
            self._results.append((token, None))

    # -- MQTT side (bridge thread) ----------------------------------------------------------

    def _filters(self) -> list[tuple[str, int]]:
        group = self.settings.shared_group
        topics = list(self.settings.topics)
        if self.ingest is not None:
            topics += [t for t in self.ingest.subscriptions if t not in topics]
        return [(f"$share/{group}/{t}" if group else t, 1) for t in topics]

    def _on_message(self, message: Message) -> None:
        if self._stopping.is_set():
            return  # not acked: the broker's persistent session redelivers it to the next run
        now = time.time()
        if message.retain and not message.payload:
            # Clearing a retained status is broker housekeeping, not a message to forward.
            self._received["cleared"].inc()
            if message.qos > 0:
                self._pending.append(
                    Inbound(message.mid, message.qos, self._generation, _EMPTY, now, done=True)
                )
            return
        if self.ingest is not None and not message.topic.startswith(_OWN_TOPICS):
            self._on_foreign(message, now)
            return
        routed = route(message, now) if self.limiter is None else self._route_limited(message, now)
        kind = (
            routed.routing_key.rsplit(".", 1)[-1]
            if routed.exchange == TELEMETRY_EXCHANGE
            else "rejected"
        )
        self._received[kind].inc()
        inbound = Inbound(message.mid, message.qos, self._generation, routed, now)
        if message.qos > 0:
            self._pending.append(inbound)
        self._forward(inbound)

    def _on_foreign(self, message: Message, now: float) -> None:
        """A message outside the contract's topics: the first matching ingest rule maps it."""
        assert self.ingest is not None
        result = self.ingest.map(
            message.topic,
            message.payload,
            int(now * 1000),
            dup=message.dup,
            retain=message.retain,
        )
        if result is None:  # no rule: dead-lettered as before rules existed
            self._received["rejected"].inc()
            self._accept(message, [route(message, now)], now)
            return
        rule, outcome = result
        for topic, payload in outcome.commands:
            self.mqtt.publish(topic, payload, qos=0)
        if outcome.error is not None:
            self._received["rejected"].inc()
            self._accept(message, [mapping_dead_letter(message, rule, outcome.error, now)], now)
            return
        if outcome is RETAINED_COPY:
            self._received["retained_copy"].inc()
        else:
            self._received["mapped"].inc()
        if outcome.mapped:
            self._mapped[rule].inc(len(outcome.mapped))
        routes = [
            self._limited(message, routed_mapped(message, rule, m, now), m, now)
            for m in outcome.mapped
        ]
        self._accept(message, routes, now)

    def _limited(
        self, message: Message, routed: Routed, envelope: Envelope | Mapped, now: float
    ) -> Routed:
        """``routed`` under its device's limits: an envelope the limiter refuses goes to
        ``iotpipe.dead`` as ``bridge.<reason>`` instead, body unchanged."""
        if self.limiter is None:
            return routed
        refusal = self.limiter.admit(
            envelope.site, envelope.device, len(envelope.readings), envelope.boot, envelope.seq
        )
        if refusal is None:
            return routed
        properties = dead_letter_properties(
            refusal.error, topic=message.topic, received_at=now, message_id=envelope.id
        )
        return Routed(
            DEAD_EXCHANGE, f"bridge.{refusal.reason}", routed.body, encode_properties(properties)
        )

    def _accept(self, message: Message, routes: list[Routed], now: float) -> None:
        """Forward the envelopes one message became; it is acknowledged once all are done."""
        tracked = message.qos > 0
        if len(routes) == 1:
            inbound = Inbound(message.mid, message.qos, self._generation, routes[0], now)
            if tracked:
                self._pending.append(inbound)
            self._forward(inbound)
            return
        parent = Inbound(
            message.mid,
            message.qos,
            self._generation,
            _EMPTY,
            now,
            done=not routes,
            parts=len(routes),
        )
        if tracked:
            self._pending.append(parent)
        for routed in routes:
            self._forward(
                Inbound(message.mid, message.qos, self._generation, routed, now, parent=parent)
            )

    def _route_limited(self, message: Message, now: float) -> Routed:
        """:func:`route`, then the device's limits (status messages are not limited)."""
        decoded = decode(message.topic, message.payload)
        routed = routed_as(message, decoded, now)
        if not isinstance(decoded, Envelope):
            return routed
        return self._limited(message, routed, decoded, now)

    def _forward(self, inbound: Inbound) -> None:
        if self.publisher.connected:
            routed = inbound.routed
            self.publisher.publish(
                routed.exchange, routed.routing_key, routed.body, routed.encoded, inbound
            )
        else:
            self._spool(inbound)

    def _spool(self, inbound: Inbound) -> None:
        # Never blocks: while the spool is full the writer keeps retrying, and the message
        # stays unacknowledged (back-pressure onto the MQTT broker's persistent session).
        self._spool_writer.submit(inbound.routed.to_spool(inbound.received_at), inbound)

    def _on_spool_error(self, error: Exception) -> None:
        if not self._spool_writer.stalled:
            log.warning("bridge spool cannot take more (not acknowledging MQTT): %s", error)

    def _reclaim_queued(self) -> None:
        """RabbitMQ went away: take back what the publisher had not sent yet."""
        for token in self.publisher.withdraw():
            if isinstance(token, Drained):
                self.spool.release([token.spool_id])
            elif isinstance(token, Inbound):
                self._spool(token)

    def _apply_results(self) -> None:
        results = self._results
        metrics = self.metrics
        to_delete: list[int] = []
        to_release: list[int] = []
        forwarded = 0  # counted here, added once: an increment costs about what a message does
        while results:
            token, outcome = results.popleft()
            if isinstance(token, Drained):
                if outcome is Outcome.CONFIRMED:
                    to_delete.append(token.spool_id)
                else:
                    to_release.append(token.spool_id)
                continue
            assert isinstance(token, Inbound)
            if outcome is None:  # committed to the spool
                metrics.spooled.inc()
                token.finish()
            elif outcome is Outcome.CONFIRMED:
                metrics.confirm_latency.observe(time.monotonic() - token.received)
                if token.routed.exchange == DEAD_EXCHANGE:
                    metrics.dead.labels(token.routed.routing_key.removeprefix("bridge.")).inc()
                else:
                    forwarded += 1
                token.finish()
            else:
                self._not_taken(token, outcome)
        if forwarded:
            metrics.forwarded.inc(forwarded)
        if to_delete:
            self.spool.delete(to_delete)
            self.metrics.drained.inc(len(to_delete))
        if to_release:
            self.spool.release(to_release)

    def _not_taken(self, inbound: Inbound, outcome: Outcome) -> None:
        """RabbitMQ did not take the message (returned, nacked, failed): spool it."""
        if outcome is Outcome.RETURNED:
            self.metrics.returned.inc()
            log.warning(
                "bridge unroutable: no queue bound exchange=%s routing_key=%s; spooling",
                inbound.routed.exchange,
                inbound.routed.routing_key,
            )
        self._spool(inbound)

    def _ack_in_order(self) -> None:
        pending = self._pending
        while pending and pending[0].done:
            inbound = pending.popleft()
            if inbound.generation == self._generation:
                self.mqtt.ack(inbound.mid, inbound.qos)

    def _drain(self) -> None:
        """Re-send spooled messages, oldest first, within the rate and the publish window."""
        if not self.publisher.connected or self.spool.depth == self.spool.in_flight:
            return
        room = self.settings.window - self.publisher.pending
        if room <= 0:
            return
        allowed = self._drain_rate.take(min(room, 1000))
        if allowed == 0:
            return
        batch = self.spool.peek_oldest(allowed)
        self._drain_rate.give_back(allowed - len(batch))
        for spooled in batch:
            routed = Routed.from_spool(
                spooled.exchange, spooled.routing_key, spooled.body, spooled.properties
            )
            self.publisher.publish(
                routed.exchange,
                routed.routing_key,
                routed.body,
                routed.encoded,
                Drained(spooled.id),
            )

    # -- lifecycle ---------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Connectivity of both sides and the spool's state."""
        full = self._spool_writer.stalled
        healthy = self.mqtt.connected and (self.publisher.connected or not full)
        return healthy, {
            "mqtt": "up" if self.mqtt.connected else "down",
            "amqp": "up" if self.publisher.connected else "down",
            "spool": {"depth": self.spool.depth, "bytes": self.spool.bytes, "full": full},
            "unacked": len(self._pending),
        }

    def stop(self) -> None:
        """Ask :meth:`run` to finish: no new messages, flush confirms, ack, return."""
        self._stopping.set()

    def run(self) -> None:
        """Connect both sides and forward until :meth:`stop` is called.

        Raises:
            ConnectError: a broker cannot be reached at start-up.
            CertificateError: a broker's TLS certificate failed verification.
        """
        threading.current_thread().name = "iotpipe-bridge"
        try:
            self.publisher.start(retry=True)
        except CertificateError:
            raise  # a refused certificate is a person's to fix, not an outage to spool through
        except ConnectError as err:
            # RabbitMQ away at start-up is what the spool is for (the publisher keeps trying
            # in the background); MQTT away is fatal.
            log.warning("bridge starting without RabbitMQ (spooling): %s", err.reason)
        self.mqtt.connect()
        self.mqtt.subscribe(self._filters())
        if self._http is not None:
            self._http.start()
        if self.receipts is not None:
            self.receipts.start()
        log.info("bridge running topics=%s", ",".join(self.settings.topics))
        self.liveness.ready()
        if self.limiter is not None:
            limits = self.settings.limits
            log.info(
                "bridge per-device limits on: policy=%s rate=%g quota_hour=%d quota_day=%d "
                "(+%d site, %d device overrides)",
                limits.policy,
                limits.rate,
                limits.quota_hour,
                limits.quota_day,
                len(limits.sites),
                len(limits.devices),
            )
        try:
            while not self._stopping.is_set():
                self._step()
                self.liveness.turn()
            self._finish()
        finally:
            self._close()

    def _step(self, timeout: float = 0.005) -> None:
        try:
            self.mqtt.pump(timeout)
        except ConnectError as err:
            log.warning("bridge lost MQTT: %s", err.reason)
            self._generation += 1  # unacked messages will be redelivered by the broker
            self._pending.clear()
            with self.liveness.waiting():
                self.mqtt.reconnect(deadline=time.monotonic() + 3600)
            self.metrics.reconnects.labels("mqtt").inc()
        if self.publisher.reconnects != self._amqp_reconnects:
            self.metrics.reconnects.labels("amqp").inc(
                self.publisher.reconnects - self._amqp_reconnects
            )
            self._amqp_reconnects = self.publisher.reconnects
        self._apply_results()
        self._ack_in_order()
        if not self.publisher.connected and self.publisher.pending:
            self._reclaim_queued()
        self._drain()
        if self._tick is not None:
            self._tick()

    def _finish(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self._pending and time.monotonic() < deadline:
            self._step(timeout=0.01)
        if self._pending:
            log.warning("bridge stopping with %d messages unacknowledged", len(self._pending))

    def _close(self) -> None:
        if self.receipts is not None:
            self.receipts.stop()
        if self._http is not None:
            self._http.stop()
        self.mqtt.disconnect()
        self.publisher.close()
        self._spool_writer.close()
        self.spool.close()


def route(message: Message, received_at: float) -> Routed:
    """Where one MQTT message goes, with which properties (pure; never raises).

    Valid messages go to ``iotpipe.telemetry`` with the routing key of their topic; invalid
    ones to ``iotpipe.dead`` with routing key ``bridge.<reason>``. The body is never changed.
    """
    return routed_as(message, decode(message.topic, message.payload), received_at)


def routed_as(
    message: Message, decoded: Envelope | Status | Rejection, received_at: float
) -> Routed:
    """:func:`route` of a message already decoded (``decoded`` is what ``decode`` made of it)."""
    if isinstance(decoded, Rejection):
        properties = dead_letter_properties(
            str(decoded), topic=message.topic, received_at=received_at
        )
        return Routed(
            DEAD_EXCHANGE,
            f"bridge.{decoded.reason.value}",
            message.payload,
            encode_properties(properties),
        )
    encoded = encode_telemetry_properties(
        message_id=decoded.id if isinstance(decoded, Envelope) else None,
        version=decoded.v,
        site=decoded.site,
        device=decoded.device,
        topic=message.topic,
        kind="status" if isinstance(decoded, Status) else "telemetry",
        received_at=received_at,
    )
    return Routed(TELEMETRY_EXCHANGE, to_routing_key(message.topic), message.payload, encoded)


_EMPTY = Routed("", "", b"", encode_properties(MessageProperties()))

# Topics of the contract take the native path, never the ingest rules.
_OWN_TOPICS = f"{PREFIX}/"

#: The header naming the ingest rule that mapped (or refused) a foreign message.
HEADER_RULE = "x-iotpipe-rule"


def routed_mapped(message: Message, rule: str, mapped: Mapped, received_at: float) -> Routed:
    """One envelope an ingest rule made of a foreign message, bound for ``iotpipe.telemetry``.

    The usual telemetry properties (message id = the envelope id, ``x-iotpipe-topic`` = the
    original MQTT topic) plus ``x-iotpipe-rule``.
    """
    body = encode_envelope(
        id=mapped.id,
        site=mapped.site,
        device=mapped.device,
        seq=mapped.seq,
        ts=mapped.ts_ms,
        readings=mapped.readings,  # a Reading is the (sensor, value, unit, ts) it takes
        boot=mapped.boot,
        tags=mapped.tags or None,
    )
    head, tail = _mapped_parts(mapped.site, mapped.device, message.topic, rule)
    message_id = mapped.id.encode()
    encoded = b"".join(
        (head, bytes((len(message_id),)), message_id, _U64.pack(int(received_at)), tail)
    )
    routing_key = f"iotpipe.v1.{mapped.site}.{mapped.device}.telemetry"
    return Routed(TELEMETRY_EXCHANGE, routing_key, body, encoded)


_U64 = struct.Struct(">Q")


@lru_cache(maxsize=4096)
def _mapped_parts(site: str, device: str, topic: str, rule: str) -> tuple[bytes, bytes]:
    """The encoded properties of a mapped envelope before its message id and after its
    timestamp, which is all that changes between a device's envelopes (as
    :func:`~iotpipe.amqp.encode_telemetry_properties` does for the native path)."""
    properties = telemetry_properties(
        message_id="",
        version=VERSION,
        site=site,
        device=device,
        topic=topic,
        kind="telemetry",
        received_at=0,
    )
    headers = {**(properties.headers or {}), HEADER_RULE: rule}
    encoded = encode_properties(replace(properties, headers=headers))
    # The property list ends: message_id (short string), timestamp (8 bytes), type, app_id.
    tail_length = 2 + len(str(properties.type).encode()) + len(str(properties.app_id).encode())
    head, tail = encoded[: -tail_length - 9], encoded[-tail_length:]
    if head + bytes(9) + tail != encoded:
        raise AssertionError("telemetry properties are not laid out as expected")
    return head, tail


def mapping_dead_letter(
    message: Message, rule: str, error: MappingError, received_at: float
) -> Routed:
    """A foreign message its rule could not map: ``iotpipe.dead``, ``bridge.mapping_<what>``."""
    properties = dead_letter_properties(
        f"{error.message} (rule {rule})", topic=message.topic, received_at=received_at
    )
    headers = {**(properties.headers or {}), HEADER_RULE: rule}
    return Routed(
        DEAD_EXCHANGE,
        f"bridge.mapping_{error.what}",
        message.payload,
        encode_properties(replace(properties, headers=headers)),
    )

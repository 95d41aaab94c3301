"""The store writer: RabbitMQ -> decode -> store -> ack, each reading stored exactly once.

One thread does everything, in a loop (the HTTP endpoint has its own):

1. take a batch of deliveries from the queue: everything received, as soon as a read finds
   nothing more (adaptive batching, :func:`~iotpipe.amqp_consumer.batch_wait`), at most
   ``batch_size``; ``batch_latency`` only bounds the waiting (for a first delivery, and for a
   batch that keeps growing). Under load the batches grow by themselves: what arrives while one
   is written and committed is the next;
2. decode each with the core codec; a message that breaks the wire contract can never succeed,
   so it is dead-lettered at once (``consumer.<reason>``, with ``x-iotpipe-error``);
3. write the rest to the store in one call, which deduplicates by message id and commits;
4. only then acknowledge the batch (``basic.ack`` with ``multiple``);
5. record every telemetry message the store now holds (stored or duplicate; not the dead-lettered
   or refused ones) in a :class:`~iotpipe.receipts.ReceiptBook` and publish the receipts that are
   due to ``iotpipe.receipts``, with publisher confirms (``[consume].receipts``), all of them
   before waiting for their confirms together.
   The time from each envelope's newest reading to its receipt's confirm feeds
   ``iotpipe_consumer_confirm_latency_seconds`` and a per-device summary the store keeps
   (:mod:`consumers.confirmations`), written at most once a second in a small transaction.

Receipts go out at most once per device per ``receipt_interval``; the loop also sends due ones
when idle, and all of them on stop. A receipt RabbitMQ did not confirm is put back in the book
and sent again later; one lost with a crash costs nothing, because the devices resend what no
receipt covered and the store receipts the duplicates.

A store that is down (server unreachable, disk full, file locked) raises
:class:`~consumers.store.StoreUnavailable`: the batch stays unacknowledged and is retried with
jittered exponential backoff, heartbeats kept alive meanwhile, so nothing is lost and nothing
spins; it does not count towards the delivery limit. A message the store refuses outright is
requeued (which counts) and dead-lettered with the store's reason on its last allowed delivery.

A crash anywhere leaves the batch unacknowledged; RabbitMQ redelivers it and the store's dedupe
absorbs what was already committed. A lost connection makes the batch's delivery tags stale: the
ack is skipped and the redelivered copies are absorbed the same way.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from consumers.confirmations import ConfirmLatency
from consumers.query import Location, seq_gaps
from consumers.settings import ConsumeSettings, PostgresTarget, SqliteTarget
from consumers.store import (
    ConfirmationStore,
    DeviceStatus,
    Message,
    Store,
    StoreUnavailable,
    WriteResult,
)
from iotpipe import receipts
from iotpipe.amqp import CONTENT_TYPE, HEADER_DEVICE, HEADER_SITE, HEADER_VERSION, MessageProperties
from iotpipe.amqp_consumer import BatchConsumer, Delivery, DeliverySource, Outgoing, QueueSpec
from iotpipe.envelope import Envelope, Rejection, decode
from iotpipe.errors import IotpipeError
from iotpipe.health import HealthServer
from iotpipe.pacing import Backoff
from iotpipe.settings import AmqpSettings
from iotpipe.watchdog import Liveness

log = logging.getLogger(__name__)

#: Dead-letter reason of a message the store refused on its last allowed delivery.
STORE_REJECTED = "store_rejected"
#: ``type`` and ``app_id`` of the receipts the consumer publishes.
RECEIPT_TYPE = "iotpipe.receipt"
RECEIPT_APP_ID = "iotpipe-consumer"
_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0
#: Seconds between writes of the confirmation summaries to the store.
_CONFIRMATIONS_INTERVAL_S = 1.0


class ConsumerMetrics:
    """The consumer's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "iotpipe_consumer_received", "AMQP deliveries received", ["kind"], registry=r
        )
        self.stored_messages = Counter(
            "iotpipe_consumer_stored_messages", "messages stored (new ids)", registry=r
        )
        self.stored_readings = Counter(
            "iotpipe_consumer_stored_readings", "readings stored", registry=r
        )
        self.duplicates = Counter(
            "iotpipe_consumer_duplicates", "messages absorbed by dedupe (id seen)", registry=r
        )
        self.out_of_order = Counter(
            "iotpipe_consumer_out_of_order", "messages stored after a higher seq", registry=r
        )
        self.type_changes = Counter(
            "iotpipe_consumer_type_changes",
            "readings whose value type differs from the sensor's first",
            registry=r,
        )
        self.statuses = Counter(
            "iotpipe_consumer_statuses", "status messages applied to the registry", registry=r
        )
        self.dead = Counter(
            "iotpipe_consumer_dead_lettered",
            "messages sent to iotpipe.dead",
            ["reason"],
            registry=r,
        )
        self.requeued = Counter(
            "iotpipe_consumer_requeued", "messages the store refused, requeued", registry=r
        )
        self.store_errors = Counter(
            "iotpipe_consumer_store_errors", "failed store writes (retried)", registry=r
        )
        self.batch_seconds = Histogram(
            "iotpipe_consumer_store_write_seconds",
            "time of one successful store write",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.batch_messages = Histogram(
            "iotpipe_consumer_batch_messages",
            "deliveries per batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.reconnects = Gauge(
            "iotpipe_consumer_amqp_reconnects", "AMQP reconnections since start", registry=r
        )
        self.store_up = Gauge(
            "iotpipe_consumer_store_up", "1 while the last store write succeeded", registry=r
        )
        self.receipts_published = Counter(
            "iotpipe_consumer_receipts_published", "receipts RabbitMQ confirmed", registry=r
        )
        self.receipt_failures = Counter(
            "iotpipe_consumer_receipt_failures",
            "receipt publishes not confirmed (kept and retried)",
            registry=r,
        )
        self.receipts_pending = Gauge(
            "iotpipe_consumer_receipts_pending",
            "devices with stored envelopes not yet receipted",
            registry=r,
        )
        self.confirm_latency = Histogram(
            "iotpipe_consumer_confirm_latency_seconds",
            "time from an envelope's newest reading to the confirm of the receipt covering it",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
            registry=r,
        )
        self.seq_gaps = Gauge(
            "iotpipe_consumer_seq_gaps",
            "seq values missing between the lowest and highest stored, over every device and boot",
            registry=r,
        )


class Consumer:
    """Consume ``settings.queue`` into ``store`` until :meth:`stop`.

    The consumer builds no client: :meth:`from_settings` wires the real one (``BatchConsumer``
    on RabbitMQ); tests hand it :class:`iotpipe.testing.MemorySource`.

    Args:
        settings: the ``[consume]`` section.
        store: an open store; the consumer closes it when it stops.
        source: where deliveries come from and are settled (not yet connected); the consumer
            connects it in :meth:`run` and closes it when it stops.
        rng: random source of the backoff jitter (tests pass a seeded one).
        clock: monotonic seconds, for pacing receipts (tests pass a fake one).
        wall_clock: Unix seconds, for the receipts' ``ts``.
    """

    def __init__(
        self,
        settings: ConsumeSettings,
        store: Store,
        source: DeliverySource,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.metrics = ConsumerMetrics()
        self._rng = rng or random.Random()
        self._stopping = threading.Event()
        self.amqp = source
        self.metrics.reconnects.set_function(lambda: self.amqp.reconnects)
        self.metrics.seq_gaps.set_function(self._seq_gaps)
        self.totals = WriteResult()
        self.statuses = 0
        self.dead_lettered = 0
        self.requeued = 0
        self._store_error = ""
        self._last_batch_at: float | None = None
        self._http: HealthServer | None = None
        self._clock = clock
        self._wall_clock = wall_clock
        self._receipts = (
            receipts.ReceiptBook(settings.receipt_interval) if settings.receipts else None
        )
        self._latency = ConfirmLatency() if settings.receipts else None
        self._confirmation_store = store if isinstance(store, ConfirmationStore) else None
        self._confirmations_saved = float("-inf")
        self.ready = threading.Event()
        self.liveness = Liveness()

    @classmethod
    def from_settings(
        cls,
        amqp: AmqpSettings,
        settings: ConsumeSettings,
        store: Store,
        *,
        rng: random.Random | None = None,
    ) -> Consumer:
        """A consumer of RabbitMQ at ``amqp``, declaring the queue ``settings`` describe."""
        queue = QueueSpec(
            name=settings.queue,
            bindings=settings.bindings,
            queue_type=settings.queue_type,
            delivery_limit=settings.delivery_limit,
            dead_letter_queue=settings.dead_letter_queue,
            quorum_group_size=settings.quorum_group_size or None,
        )
        source = BatchConsumer(
            amqp,
            queue,
            prefetch=settings.prefetch,
            publish_exchanges=(receipts.EXCHANGE,) if settings.receipts else (),
        )
        return cls(settings, store, source, rng=rng)

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        """Serve ``/metrics``, connect, and consume until :meth:`stop`; then close everything."""
        s = self.settings
        self._http = HealthServer(s.http_host, s.http_port, self.metrics.registry, self.health)
        self._http.start()
        try:
            self.amqp.connect(retry=True)
            if not self._stopping.is_set():
                log.info(
                    "consuming queue=%s type=%s delivery_limit=%d store=%s",
                    s.queue,
                    s.queue_type,
                    s.delivery_limit,
                    s.target,
                )
            self.ready.set()
            self.liveness.ready()
            next_prune = time.monotonic()
            while not self._stopping.is_set():
                batch = self.amqp.next_batch(s.batch_size, s.batch_latency)
                if batch:
                    self.process(batch)
                else:
                    self.send_receipts()  # what waited for its interval, while no batch comes
                if time.monotonic() >= next_prune:
                    self._prune()
                    next_prune = time.monotonic() + s.prune_interval
                self.liveness.turn()
        finally:
            self.send_receipts(flush=True)
            self.amqp.close()
            self.store.close()
            self._http.stop()
            t = self.totals
            log.info(
                "stopped: stored %d messages (%d readings), %d duplicates absorbed, "
                "%d dead-lettered, %d requeued",
                t.messages,
                t.readings,
                t.duplicates,
                self.dead_lettered,
                self.requeued,
            )

    def stop(self) -> None:
        """Finish the batch in hand (store and ack it), then return from :meth:`run`.

        Safe to call from a signal handler. A batch waiting for an unavailable store is left
        unacknowledged instead: RabbitMQ hands it out again later.
        """
        self._stopping.set()
        self.amqp.stop()

    @property
    def http_port(self) -> int | None:
        """The port ``/metrics`` and ``/healthz`` listen on, once running."""
        return self._http.port if self._http is not None else None

    def health(self) -> tuple[bool, Mapping[str, Any]]:
        """``/healthz``: RabbitMQ connected and the store writable."""
        amqp_ok = self.amqp.connected
        store_ok = not self._store_error
        details = {
            "amqp": "connected" if amqp_ok else "disconnected",
            "store": "ok" if store_ok else self._store_error,
            "queue": self.settings.queue,
            "last_batch_age_s": (
                round(time.monotonic() - self._last_batch_at, 3)
                if self._last_batch_at is not None
                else None
            ),
        }
        return amqp_ok and store_ok, details

    def _seq_gaps(self) -> float:
        """Read at scrape time from the completeness table (on the HTTP thread, own connection)."""
        target = self.settings.target
        path: Location = self.settings.state_path
        if isinstance(target, SqliteTarget):
            path = target.path
        elif isinstance(target, PostgresTarget):
            path = target
        try:
            return float(seq_gaps(path))
        except (IotpipeError, sqlite3.Error):
            return float("nan")  # no store file yet, or busy: no figure rather than a wrong one

    # -- one batch -------------------------------------------------------------------------

    def process(self, batch: Sequence[Delivery]) -> None:
        """Decode, store and acknowledge one batch of deliveries."""
        m = self.metrics
        m.batch_messages.observe(len(batch))
        messages: list[Message] = []
        owners: list[Delivery] = []
        statuses: list[DeviceStatus] = []
        settled: set[int] = set()
        rejected = 0
        for delivery in batch:
            decoded = decode(_topic_of(delivery.routing_key), delivery.body)
            if isinstance(decoded, Rejection):
                rejected += 1
                self._dead_letter(delivery, decoded.reason.value, decoded.message, settled)
            elif isinstance(decoded, Envelope):
                messages.append(Message.from_envelope(decoded))
                owners.append(delivery)
            else:
                statuses.append(DeviceStatus.from_status(decoded))
        # Counted once per batch: a labelled counter costs microseconds per call.
        m.received.labels("telemetry").inc(len(messages))
        m.received.labels("status").inc(len(statuses))
        m.received.labels("rejected").inc(rejected)
        result = self._write(messages, statuses)
        if result is None:
            return  # stopping while the store is down: the batch goes back to the queue
        self._count(result, len(statuses))
        for index, reason in sorted(result.rejected.items()):
            self._refused(owners[index], reason, settled)
        unsettled = [d for d in batch if d.tag not in settled]
        if unsettled:
            self.amqp.ack_through(unsettled[-1])
        self._last_batch_at = time.monotonic()
        book = self._receipts
        if book is not None:
            # Stored now or before (duplicates): the store holds them, whatever became of the ack.
            for index, message in enumerate(messages):
                if index not in result.rejected:
                    book.record(message.site, message.device, message.boot or None, message.seq)
                    self._note_stored(message)
            self.send_receipts()

    # -- receipts --------------------------------------------------------------------------

    def send_receipts(self, *, flush: bool = False) -> None:
        """Publish the receipts that are due (all pending ones if ``flush``).

        One RabbitMQ did not confirm goes back into the book and is sent again with the next
        receipt of its device.
        """
        book = self._receipts
        if book is None:
            return
        due = book.due(self._clock(), int(self._wall_clock() * 1000), flush=flush)
        # All published first, then their confirms awaited together: one round trip, not one
        # per device (a stall of the consuming thread as long as the fleet is large).
        confirmed = self.amqp.publish_many(
            [
                Outgoing(
                    receipts.EXCHANGE,
                    receipts.receipt_routing_key(receipt.site, receipt.device),
                    receipts.encode_receipt(receipt),
                    _receipt_properties(receipt),
                )
                for receipt in due
            ]
        )
        failed = 0
        for receipt, ok in zip(due, confirmed, strict=True):
            if ok:
                self._note_confirmed(receipt.site, receipt.device)
                continue
            failed += 1
            for entry in receipt.stored:
                for first, last in entry.ranges:
                    book.record_range(receipt.site, receipt.device, entry.boot, first, last)
        m = self.metrics
        m.receipts_published.inc(len(due) - failed)
        if failed:
            m.receipt_failures.inc(failed)
            log.warning(
                "%d of %d receipts not confirmed: kept for the next attempt", failed, len(due)
            )
        m.receipts_pending.set(len(book))
        self._save_confirmations(flush=flush)

    def _note_stored(self, message: Message) -> None:
        if self._latency is not None and message.readings:
            newest = max(reading.ts_ms for reading in message.readings)
            self._latency.stored(message.site, message.device, newest)

    def _note_confirmed(self, site: str, device: str) -> None:
        if self._latency is not None:
            now_ms = int(self._wall_clock() * 1000)
            for seconds in self._latency.confirmed(site, device, now_ms):
                self.metrics.confirm_latency.observe(seconds)

    def _save_confirmations(self, *, flush: bool = False) -> None:
        """Hand the changed per-device summaries to the store, at most once per interval."""
        store, latency = self._confirmation_store, self._latency
        now = self._clock()
        if store is None or latency is None:
            return
        if not flush and now - self._confirmations_saved < _CONFIRMATIONS_INTERVAL_S:
            return
        self._confirmations_saved = now
        changed = latency.take()
        if not changed:
            return
        try:
            store.record_confirmations(changed)
        except StoreUnavailable as err:
            latency.retry(changed)  # a figure for the dashboard: try again with the next ones
            log.debug("confirmation summaries not saved: %s", err)

    def _write(
        self, messages: Sequence[Message], statuses: Sequence[DeviceStatus]
    ) -> WriteResult | None:
        """Write until the store takes the batch; None when stopped first."""
        backoff = Backoff(_BACKOFF_MIN_S, _BACKOFF_MAX_S, jitter=(0.5, 1.0), rng=self._rng)
        while True:
            started = time.perf_counter()
            try:
                result = self.store.write(messages, statuses)
            except StoreUnavailable as err:
                self.metrics.store_errors.inc()
                self.metrics.store_up.set(0)
                if not self._store_error:
                    log.warning("store unavailable, holding the batch: %s", err)
                self._store_error = str(err) or type(err).__name__
                wait = backoff.next_delay()
                log.info("store write retry in %.1fs", wait)
                with self.liveness.waiting():
                    self.amqp.sleep(wait)
                if self._stopping.is_set():
                    return None
                continue
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.metrics.store_up.set(1)
            if self._store_error:
                log.warning("store available again")
                self._store_error = ""
            return result

    def _count(self, result: WriteResult, statuses: int) -> None:
        t = self.totals
        t.messages += result.messages
        t.readings += result.readings
        t.duplicates += result.duplicates
        t.out_of_order += result.out_of_order
        t.type_changes += result.type_changes
        self.statuses += statuses
        m = self.metrics
        m.stored_messages.inc(result.messages)
        m.stored_readings.inc(result.readings)
        m.duplicates.inc(result.duplicates)
        m.out_of_order.inc(result.out_of_order)
        m.type_changes.inc(result.type_changes)
        m.statuses.inc(statuses)

    def _refused(self, delivery: Delivery, reason: str, settled: set[int]) -> None:
        """A message the store refused: requeue it, or dead-letter it on its last delivery."""
        if delivery.delivery_count + 1 >= self.settings.delivery_limit:
            self._dead_letter(delivery, STORE_REJECTED, reason, settled)
            return
        log.warning(
            "store refused message id=%s (delivery %d of %d): %s",
            delivery.message_id,
            delivery.delivery_count + 1,
            self.settings.delivery_limit,
            reason,
        )
        self.amqp.requeue(delivery)
        self.metrics.requeued.inc()
        self.requeued += 1
        settled.add(delivery.tag)

    def _dead_letter(self, delivery: Delivery, reason: str, error: str, settled: set[int]) -> None:
        if self.amqp.dead_letter(delivery, reason, error):
            self.metrics.dead.labels(reason).inc()
            self.dead_lettered += 1
            log.info(
                "dead-lettered id=%s key=%s reason=%s: %s",
                delivery.message_id,
                delivery.routing_key,
                reason,
                error,
            )
        else:
            # Not confirmed (nothing bound to the dead-letter exchange, a nack, or the connection
            # dropped): requeue it so the batch's multiple ack does not drop it. On a quorum queue
            # the requeue counts towards the delivery limit, after which RabbitMQ dead-letters it.
            log.warning(
                "dead letter of id=%s not confirmed (reason=%s): requeued",
                delivery.message_id,
                reason,
            )
            self.amqp.requeue(delivery)
        settled.add(delivery.tag)

    def _prune(self) -> None:
        try:
            dropped = self.store.prune(int(time.time() * 1000))
        except StoreUnavailable as err:
            log.warning("prune skipped: %s", err)
            return
        if dropped:
            log.info(
                "pruned %d message ids older than %g days", dropped, self.settings.retention_days
            )


def _receipt_properties(receipt: receipts.Receipt) -> MessageProperties:
    """The AMQP properties of a receipt (wire contract 1.1)."""
    return MessageProperties(
        content_type=CONTENT_TYPE,
        type=RECEIPT_TYPE,
        app_id=RECEIPT_APP_ID,
        headers={
            HEADER_VERSION: receipt.v,
            HEADER_SITE: receipt.site,
            HEADER_DEVICE: receipt.device,
        },
    )


def _topic_of(routing_key: str) -> str:
    """The MQTT topic a routing key came from (``/`` <-> ``.``; names cannot hold dots)."""
    return routing_key.replace(".", "/")

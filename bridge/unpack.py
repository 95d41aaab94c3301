"""The central end of the lean WAN uplink: packs in, the standard per-envelope messages out.

``iotpipe unpack`` consumes packs (:mod:`iotpipe.pack`) that site bridges in packed mode send to
the uplink queue, and publishes every message of a pack to its exchange with its exact
properties and body, as the site bridge would have published it in messages mode: consumers of
``iotpipe.telemetry`` and ``iotpipe.dead`` cannot tell the difference.

One thread does the work, in a loop (the publisher's I/O and the HTTP endpoint have their own):

1. take a batch of packs from the uplink queue (at most ``prefetch``);
2. skip those whose pack id is in the :class:`PackIds` file (already unpacked: a redelivery,
   or a pack the bridge sent again); decode the others, and dead-letter one that does not
   decode or breaks the format's rules to ``iotpipe.dead`` (routing key ``unpack.bad_pack``,
   header ``x-iotpipe-error``, the pack's bytes unchanged);
3. publish every message of the batch's packs with publisher confirms; one RabbitMQ did not
   take (returned as unroutable, nacked, or lost with the connection) is published again, with
   jittered backoff, until it is confirmed;
4. once all are confirmed, commit the packs' ids to the file, then acknowledge the batch.

A crash between 3 and 4 (or before the ack reaches RabbitMQ) leaves the batch unacknowledged:
its packs are redelivered and unpacked again, and the store keeps each reading once (its dedupe
is by envelope id). A crash never loses a message.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from bridge.settings import UnpackSettings
from bridge.uplink import uplink_queue
from iotpipe.amqp import (
    DEAD_EXCHANGE,
    EXCHANGES,
    HEADER_ERROR,
    ConfirmingPublisher,
    MessageProperties,
    Outcome,
    PublisherFactory,
    ResultHandler,
    decode_properties,
    encode_properties,
)
from iotpipe.amqp_consumer import BatchConsumer, Delivery, DeliverySource
from iotpipe.errors import ConfigError, ConnectError
from iotpipe.health import HealthServer
from iotpipe.pacing import Backoff
from iotpipe.pack import PackedMessage, PackError, decode
from iotpipe.settings import AmqpSettings
from iotpipe.watchdog import Liveness

__all__ = ["BAD_PACK_KEY", "PackIds", "Unpacker", "check_messages"]

log = logging.getLogger(__name__)

BAD_PACK_KEY = "unpack.bad_pack"
"""Routing key on ``iotpipe.dead`` of a pack that cannot be unpacked."""

_ALLOWED_EXCHANGES = frozenset(name for name, _kind in EXCHANGES)
_ERROR_LIMIT = 1000
_WAIT_SLICE = 0.05


def check_messages(messages: Iterable[PackedMessage]) -> None:
    """Refuse a pack whose messages iotpipe's bridge could not have written.

    Each must address one of the contract's exchanges (a pack must not publish anywhere else
    on the central broker), and its properties must be exactly what
    :func:`~iotpipe.amqp.encode_properties` writes for them: the unpacker sends them to RabbitMQ
    as they are, and malformed ones would cost the publisher its connection.

    Raises:
        PackError: the first message that breaks a rule, by position.
    """
    for index, message in enumerate(messages):
        if message.exchange not in _ALLOWED_EXCHANGES:
            raise PackError(f"message {index}: exchange {message.exchange!r} is not allowed")
        try:
            canonical = encode_properties(decode_properties(message.properties))
        except (ValueError, TypeError, AttributeError, UnicodeError) as err:
            raise PackError(f"message {index}: bad properties ({err})") from None
        if canonical != message.properties:
            raise PackError(f"message {index}: properties not in canonical form")


class PackIds:
    """The ids of packs already unpacked, in a small SQLite file (the newest ``keep``).

    :meth:`add` commits (synchronous=FULL): the ids are durable once it returns.

    Raises:
        ConfigError: the file cannot be opened.
    """

    def __init__(self, path: Path, keep: int = 100_000) -> None:
        self.path = path
        self.keep = keep
        try:
            if str(path) != ":memory:":
                path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS packs (seq INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL)"
            )
        except (OSError, sqlite3.Error) as err:
            raise ConfigError("unpack.seen_path", path, f"cannot open it ({err})") from None
        self._adds = 0

    def known(self, pack_id: str) -> bool:
        """Whether ``pack_id`` was added (and not yet forgotten)."""
        row = self._db.execute("SELECT 1 FROM packs WHERE id = ?", (pack_id,)).fetchone()
        return row is not None

    def add(self, pack_ids: Iterable[str]) -> None:
        """Remember ``pack_ids`` durably; forget the oldest beyond ``keep`` now and then."""
        db = self._db
        db.execute("BEGIN")
        try:
            db.executemany("INSERT OR IGNORE INTO packs (id) VALUES (?)", [(i,) for i in pack_ids])
            self._adds += 1
            if self._adds % 100 == 0:
                db.execute(
                    "DELETE FROM packs WHERE seq <= (SELECT max(seq) FROM packs) - ?", (self.keep,)
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM packs").fetchone()[0])

    def close(self) -> None:
        """Close the file."""
        self._db.close()


class UnpackMetrics:
    """The unpacker's Prometheus metrics, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.packs = Counter(
            "iotpipe_unpack_packs", "packs received, by outcome", ["outcome"], registry=r
        )
        self.messages = Counter(
            "iotpipe_unpack_messages", "unpacked messages confirmed by RabbitMQ", registry=r
        )
        self.retried = Counter(
            "iotpipe_unpack_republished",
            "unpacked messages published again (RabbitMQ did not take them)",
            ["outcome"],
            registry=r,
        )
        self.bytes_in = Counter(
            "iotpipe_unpack_pack_bytes", "bytes of the packs unpacked (as received)", registry=r
        )
        self.bytes_out = Counter(
            "iotpipe_unpack_message_bytes", "body bytes of the messages unpacked", registry=r
        )
        self.reconnects = Counter(
            "iotpipe_unpack_reconnects", "reconnections", ["side"], registry=r
        )
        self.seen = Gauge("iotpipe_unpack_seen_ids", "pack ids remembered", registry=r)


@dataclass(slots=True)
class _Work:
    """One pack of the batch being unpacked."""

    delivery: Delivery
    pack_id: str | None
    messages: list[PackedMessage]


class Unpacker:
    """Packs from the uplink queue -> their messages to RabbitMQ; see the module docstring.

    Args:
        settings: the ``[unpack]`` section.
        source: the uplink queue's consumer (:class:`BatchConsumer`; an in-memory one in tests).
        publisher: builds the publisher of the unpacked messages, given its result handler.
        ids: the pack ids already unpacked.
        serve_http: serve ``/metrics`` and ``/healthz`` while running.
    """

    def __init__(
        self,
        settings: UnpackSettings,
        *,
        source: DeliverySource,
        publisher: PublisherFactory,
        ids: PackIds,
        serve_http: bool = True,
    ) -> None:
        self.settings = settings
        self.metrics = UnpackMetrics()
        self.source = source
        self.ids = ids
        self._results: deque[tuple[object, Outcome]] = deque()
        self._arrived = threading.Event()
        self.publisher = publisher(self._on_result)
        self._stopping = threading.Event()
        self.liveness = Liveness()
        self._backoff = Backoff(0.2, 10.0)
        self._publisher_reconnects = 0
        self._http = (
            HealthServer(settings.http_host, settings.http_port, self.metrics.registry, self.health)
            if serve_http
            else None
        )
        self.metrics.seen.set_function(lambda: len(self.ids))

    @classmethod
    def from_settings(
        cls, amqp: AmqpSettings, settings: UnpackSettings, *, serve_http: bool = True
    ) -> Unpacker:
        """An unpacker with the real clients, on RabbitMQ at ``amqp``.

        Raises:
            ConfigError: the pack-id file cannot be opened.
        """

        def publisher(on_result: ResultHandler) -> ConfirmingPublisher:
            return ConfirmingPublisher(
                amqp,
                on_result=on_result,
                window=settings.window,
                dead_letter_queue=settings.dead_letter_queue,
                connection_name="iotpipe-unpack",
            )

        source = BatchConsumer(
            amqp,
            dataclasses.replace(
                uplink_queue(settings.queue), dead_letter_queue=settings.dead_letter_queue
            ),
            prefetch=settings.prefetch,
            name="iotpipe-unpack",
            publish_exchanges=(DEAD_EXCHANGE,),
        )
        return cls(
            settings,
            source=source,
            publisher=publisher,
            ids=PackIds(settings.seen_path, settings.seen_keep),
            serve_http=serve_http,
        )

    def _on_result(self, token: object, outcome: Outcome) -> None:
        self._results.append((token, outcome))
        self._arrived.set()

    # -- lifecycle ----------------------------------------------------------------------------

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Both connections up."""
        up = self.source.connected and self.publisher.connected
        return up, {
            "uplink_queue": "up" if self.source.connected else "down",
            "amqp": "up" if self.publisher.connected else "down",
            "queue": self.settings.queue,
        }

    def stop(self) -> None:
        """Ask :meth:`run` to return (safe from a signal handler): what is in hand is not
        acknowledged, so RabbitMQ hands it out again."""
        self._stopping.set()
        self.source.stop()

    def run(self) -> None:
        """Connect and unpack until :meth:`stop` is called.

        Raises:
            ConnectError: the unpacker was stopped before RabbitMQ could be reached.
        """
        threading.current_thread().name = "iotpipe-unpack"
        try:
            try:
                self.publisher.start(retry=True)
            except ConnectError as err:
                log.warning("unpack publisher not connected yet (retrying): %s", err.reason)
            self.source.connect(retry=True)
            if self._http is not None:
                self._http.start()
            log.info("unpack running queue=%s", self.settings.queue)
            self.liveness.ready()
            while not self._stopping.is_set():
                batch = self.source.next_batch(self.settings.prefetch, 0.1)
                if batch:
                    self.handle(batch)
                self._count_reconnects()
                self.liveness.turn()
        finally:
            self._close()

    def _count_reconnects(self) -> None:
        reconnects = self.publisher.reconnects
        if reconnects != self._publisher_reconnects:
            self.metrics.reconnects.labels("publisher").inc(reconnects - self._publisher_reconnects)
            self._publisher_reconnects = reconnects

    def _close(self) -> None:
        if self._http is not None:
            self._http.stop()
        self.source.close()
        self.publisher.close()
        self.ids.close()

    # -- one batch ----------------------------------------------------------------------------

    def handle(self, batch: list[Delivery]) -> bool:
        """Unpack ``batch`` and acknowledge it; False if stopped first (nothing acknowledged)."""
        work: list[_Work] = []
        in_batch: set[str] = set()
        for delivery in batch:
            pack_id = delivery.message_id
            if pack_id is not None and (pack_id in in_batch or self.ids.known(pack_id)):
                self.metrics.packs.labels("duplicate").inc()
                log.debug("unpack skipping a pack already unpacked id=%s", pack_id)
                continue
            try:
                messages = decode(delivery.body, max_bytes=self.settings.max_unpacked_bytes)
                check_messages(messages)
            except PackError as err:
                self._refuse(delivery, err.reason)
                continue
            if pack_id is not None:
                in_batch.add(pack_id)
            work.append(_Work(delivery, pack_id, messages))
        if not self._publish_all(work):
            return False
        ids = [w.pack_id for w in work if w.pack_id is not None]
        if ids:
            self.ids.add(ids)
        self.source.ack_through(batch[-1])
        for w in work:
            self.metrics.packs.labels("unpacked").inc()
            self.metrics.bytes_in.inc(len(w.delivery.body))
        return True

    def _refuse(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter a pack that cannot be unpacked (requeue it if that fails)."""
        log.warning("unpack refusing a pack id=%s: %s", delivery.message_id, reason)
        headers = {k: v for k, v in delivery.headers.items() if isinstance(v, str)}
        error = reason if len(reason) <= _ERROR_LIMIT else reason[: _ERROR_LIMIT - 1] + "…"
        headers[HEADER_ERROR] = error
        properties = MessageProperties(
            message_id=delivery.message_id,
            content_type=delivery.content_type,
            type=delivery.type,
            timestamp=delivery.timestamp,
            app_id=delivery.app_id,
            headers=headers,
        )
        if self.source.publish(
            DEAD_EXCHANGE, BAD_PACK_KEY, delivery.body, properties, mandatory=True
        ):
            self.metrics.packs.labels("bad").inc()
            self.source.ack(delivery)
        else:
            # Counts towards the queue's delivery limit: the broker dead-letters it in the end.
            self.source.requeue(delivery)

    def _publish_all(self, work: list[_Work]) -> bool:
        """Publish every message of ``work`` until each is confirmed; False if stopped first."""
        outstanding: dict[int, PackedMessage] = {}
        for w in work:
            for message in w.messages:
                outstanding[len(outstanding)] = message
        if not outstanding:
            return True
        self._results.clear()
        for token, message in outstanding.items():
            self._send(token, message)
        body_bytes = sum(len(m.body) for m in outstanding.values())
        total = len(outstanding)
        retry: list[int] = []
        while outstanding:
            if self._stopping.is_set():
                log.info("unpack stopping with %d messages unconfirmed", len(outstanding))
                return False
            self._arrived.wait(_WAIT_SLICE)
            self._arrived.clear()
            self.source.sleep(0.0005)  # keeps the uplink queue's connection alive
            while self._results:
                item, outcome = self._results.popleft()
                assert isinstance(item, int)
                token = item
                if outcome is Outcome.CONFIRMED:
                    outstanding.pop(token, None)
                elif token in outstanding:
                    self.metrics.retried.labels(outcome.value).inc()
                    retry.append(token)
            if retry:
                self._retry(retry, outstanding)
                retry = []
        self._backoff.reset()
        self.metrics.messages.inc(total)
        self.metrics.bytes_out.inc(body_bytes)
        return True

    def _retry(self, tokens: list[int], outstanding: dict[int, PackedMessage]) -> None:
        """Publish again, after a jittered pause, what RabbitMQ did not take."""
        first = outstanding[tokens[0]]
        delay = self._backoff.next_delay()
        log.warning(
            "unpack: RabbitMQ did not take %d messages (e.g. exchange=%s routing_key=%s); "
            "publishing them again in %.2f s",
            len(tokens),
            first.exchange,
            first.routing_key,
            delay,
        )
        self.source.sleep(delay)
        for token in tokens:
            self._send(token, outstanding[token])

    def _send(self, token: int, message: PackedMessage) -> None:
        self.publisher.publish(
            message.exchange, message.routing_key, message.body, message.properties, token
        )

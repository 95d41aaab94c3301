"""The edge agent: read sensors, batch readings into envelopes, commit them, publish them.

Threads, each with one job:

- the main thread (:meth:`Agent.run`): runs each driver on its own interval, batches readings
  into envelopes (at most ``batch_max_readings``, sealed after ``batch_max_delay``), commits
  sealed envelopes to the outbox in groups (``commit_max_delay`` / ``commit_max_envelopes``),
  logs backlog statistics and pings the systemd watchdog. It never touches the network, so a
  broker outage or a slow reconnect never costs a reading.
- ``iotpipe-edge-mqtt`` (:class:`Publisher`): owns the MQTT connection. It publishes the
  outbox oldest-first at QoS 1 in *rounds* of at most ``window`` envelopes (and at most
  ``drain_rate`` per second), and deletes a round from the outbox once every envelope of it
  was acknowledged. A lost connection is renewed with jittered exponential backoff and the
  unacknowledged round is published again on the new connection, in order (duplicates are
  allowed: ids are kept, consumers deduplicate). With receipts (``receipts = "on"``, or
  ``"auto"`` and the pipeline's capability says so) an acknowledged round is *held*
  (:class:`edge.unconfirmed.Unconfirmed`; its rows stay in flight in the outbox) until a receipt
  on the device's receipt topic covers it; held envelopes without a receipt are resent after a
  timeout, and at most ``receipt_window`` are published and unreceipted at a time. Receipt and
  capability handlers run inside ``pump()``, on this thread.
- ``iotpipe-http``: ``/metrics`` and ``/healthz`` (only if ``http_port`` is not 0).

Status: every connection carries a last will (``offline``, retained) and starts with a birth
(``online``, retained). The will's ``ts`` is the birth's plus 1 ms, so whichever of the two a
reader sees last is also the newest. On SIGTERM the agent seals and commits what it has read,
publishes the backlog for up to ``stop_timeout`` seconds, publishes ``offline`` (retained),
waits for the PUBACKs (bounded), disconnects and returns.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge.config import AGENT, EdgeSettings
from edge.envelopes import build_envelope, sample_problem
from edge.outbox import FillRate, Outbox, OutboxEntry, OutboxError, Pending
from edge.sensors.base import Driver, Sample, SensorError
from edge.unconfirmed import Unconfirmed, envelope_boot, receipts_capability
from iotpipe import metrics
from iotpipe.connection import MqttSettings
from iotpipe.errors import ConnectError, DeliveryError
from iotpipe.mqtt import Message, MessageHandler, MqttClient, Will
from iotpipe.pacing import Backoff, TokenBucket
from iotpipe.receipts import CAPABILITY_TOPIC, decode_receipt, receipt_topic
from iotpipe.systemd_notify import Notifier
from iotpipe.wire import MAX_PAYLOAD, Kind, State, encode_status, topic

if TYPE_CHECKING:
    from iotpipe.health import HealthServer

log = logging.getLogger(__name__)

__all__ = ["Agent", "AgentStats", "ClientFactory", "Publisher"]

#: Seconds between samples of the outbox size for the "full in" estimate.
_FILL_SAMPLE_INTERVAL = 10.0
#: A thread that has not looped for this long is unhealthy (the watchdog stops pinging).
_STALL_SECONDS = 30.0
#: Seconds between repeated log lines about one failing sensor.
_ERROR_LOG_INTERVAL = 60.0
#: ``receipts = "auto"``: seconds after connecting without a capability message before the
#: agent decides the pipeline sends no receipts.
CAPABILITY_WAIT = 3.0

#: Builds the MQTT client of one connection attempt: settings, last will, publish window and the
#: handler of incoming messages (receipts, the capability). Tests inject their own.
ClientFactory = Callable[[MqttSettings, Will, int, MessageHandler], MqttClient]


def _default_client(
    settings: MqttSettings, will: Will, max_inflight: int, on_message: MessageHandler
) -> MqttClient:
    return MqttClient(settings, will=will, max_inflight=max_inflight, on_message=on_message)


def wall_ms() -> int:
    """Now, in Unix epoch milliseconds."""
    return time.time_ns() // 1_000_000


class AgentStats:
    """Counters of one agent run (plain integers: read by ``/metrics`` and the stats log)."""

    readings: int = 0
    readings_invalid: int = 0
    envelopes_sealed: int = 0
    envelopes_committed: int = 0
    envelopes_published: int = 0
    envelopes_lost: int = 0
    commit_failures: int = 0
    reconnects: int = 0
    connected: bool = False
    clock_synced: bool = True
    sensor_errors: dict[str, int]
    full_in_seconds: float = math.inf
    #: Receipts: "active", "inactive" or "undecided" (``receipts = "auto"`` before the capability).
    receipts: str = "inactive"
    unconfirmed: int = 0
    #: Monotonic time the oldest unconfirmed envelope was acknowledged (None: none held).
    unconfirmed_since: float | None = None
    receipt_latency_p50: float | None = None
    receipt_latency_p99: float | None = None
    receipts_received: int = 0
    receipts_malformed: int = 0
    envelopes_resent: int = 0

    def __init__(self) -> None:
        self.sensor_errors = {}


class Publisher:
    """The ``iotpipe-edge-mqtt`` thread: outbox -> broker, birth/will, reconnects.

    Args:
        settings: the ``[edge]`` section.
        mqtt: the broker (client id and credentials complete).
        outbox: where committed envelopes wait.
        stats: counters shared with the agent.
        site: the site name.
        device: the device name.
        client_factory: builds one connection's client.
        wall: epoch milliseconds, for status timestamps.
    """

    def __init__(
        self,
        settings: EdgeSettings,
        mqtt: MqttSettings,
        outbox: Outbox,
        stats: AgentStats,
        *,
        site: str,
        device: str,
        client_factory: ClientFactory = _default_client,
        wall: Callable[[], int] = wall_ms,
    ) -> None:
        self.settings = settings
        self.mqtt = mqtt
        self.outbox = outbox
        self.stats = stats
        self.site = site
        self.device = device
        self.status_topic = topic(site, device, Kind.STATUS)
        self._client_factory = client_factory
        self._wall = wall
        self._stop = threading.Event()
        self._stop_deadline = math.inf
        self._last_status_ms = 0
        self._round: list[OutboxEntry] = []
        self._round_started = 0.0
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._next_attempt = 0.0
        self._attempts = 0
        self._ever_connected = False
        self.last_beat = time.monotonic()
        self.offline_acknowledged = False
        # Receipts: True holds acknowledged envelopes until a receipt covers them, False deletes
        # them on PUBACK, None (``receipts = "auto"`` before the capability) holds them too.
        self.receipt_topic = receipt_topic(site, device)
        self.capability_wait = CAPABILITY_WAIT
        self._holding: bool | None = {"on": True, "off": False}.get(settings.receipts)
        self._decide_by = math.inf
        self._unconfirmed = Unconfirmed(settings.receipt_timeout_min, settings.receipt_timeout_max)
        self._boots: dict[int, str | None] = {}
        self._resent_out = 0
        self._resend_turn = True
        self._publish_receipt_stats()
        self._thread = threading.Thread(target=self._run, name="iotpipe-edge-mqtt", daemon=True)

    def start(self) -> Publisher:
        """Start the thread."""
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """The thread runs and looped recently."""
        return self._thread.is_alive() and time.monotonic() - self.last_beat < _STALL_SECONDS

    def stop(self, timeout: float) -> None:
        """Publish the backlog for up to ``timeout`` s, then ``offline``; disconnect, join."""
        self._stop_deadline = time.monotonic() + timeout
        self._stop.set()
        # A connect attempt in progress may take its own timeout (10 s) on top.
        self._thread.join(timeout + 15.0)
        if self._thread.is_alive():
            log.error("mqtt thread did not stop in time")

    # -- the thread -------------------------------------------------------------------------------

    def _status(self, state: State, ts_ms: int) -> bytes:
        return encode_status(site=self.site, device=self.device, state=state, ts=ts_ms, agent=AGENT)

    def _connect(self) -> MqttClient | None:
        """One connection attempt: a new client whose will is newer than its birth."""
        birth_ms = max(self._wall(), self._last_status_ms + 1)
        will = Will(self.status_topic, self._status("offline", birth_ms + 1), qos=1, retain=True)
        client = self._client_factory(self.mqtt, will, self.settings.window + 1, self._on_message)
        try:
            client.connect(timeout=10.0)
            client.publish(self.status_topic, self._status("online", birth_ms), qos=1, retain=True)
            if self.settings.receipts != "off":
                # Both retained: the latest receipt and the capability arrive at once.
                filters = [(self.receipt_topic, 1)]
                if self.settings.receipts == "auto":
                    filters.append((CAPABILITY_TOPIC, 1))
                client.subscribe(filters)
            # What the lost connection did not get acknowledged goes again, first and in order.
            for entry in self._round:
                client.publish(entry.topic, entry.payload, qos=1)
        except (ConnectError, DeliveryError) as err:
            with contextlib.suppress(Exception):
                client.disconnect()
            self._attempts += 1
            wait = self._backoff.next_delay()
            self._next_attempt = time.monotonic() + wait
            if self._attempts == 1 or self._attempts % 10 == 0:
                log.warning(
                    "mqtt cannot connect url=%s attempts=%d retry_in=%.1fs error=%s",
                    self.mqtt.broker,
                    self._attempts,
                    wait,
                    err,
                )
            return None
        self._last_status_ms = birth_ms + 1
        log.info(
            "mqtt connected url=%s failed_attempts=%d backlog=%d resent=%d",
            self.mqtt.broker,
            self._attempts,
            self.outbox.depth,
            len(self._round),
        )
        if self._ever_connected:
            self.stats.reconnects += 1
        self._ever_connected = True
        self._attempts = 0
        self._backoff.reset()
        self.stats.connected = True
        self._round_started = time.monotonic()
        if self._holding is None:
            self._decide_by = self._round_started + self.capability_wait
        return client

    def _lost(self, client: MqttClient, err: Exception) -> None:
        log.warning(
            "mqtt connection lost url=%s unacknowledged=%d backlog=%d error=%s",
            self.mqtt.broker,
            len(self._round),
            self.outbox.depth,
            err,
        )
        with contextlib.suppress(Exception):
            client.disconnect()
        self.stats.connected = False
        self._resent_out = 0  # still held: resent when due again
        self._next_attempt = time.monotonic() + self._backoff.next_delay()

    def _run(self) -> None:
        bucket = TokenBucket(self.settings.drain_rate, setting="edge.drain_rate")
        client: MqttClient | None = None
        try:
            while True:
                now = self.last_beat = time.monotonic()
                if self._stop.is_set() and (
                    client is None
                    or now > self._stop_deadline
                    or (not self._round and self.outbox.depth == 0)
                ):
                    break
                if client is None:
                    if now < self._next_attempt:
                        self._stop.wait(min(self._next_attempt - now, 0.5))
                        continue
                    client = self._connect()
                    continue
                active = client
                try:
                    client = self._step(active, bucket, now)
                except (ConnectError, DeliveryError) as err:
                    self._lost(active, err)
                    client = None
                except OutboxError as err:
                    log.error("outbox failed in the mqtt thread: %s", err)
                    self._stop.wait(1.0)
        except Exception:
            log.exception("mqtt thread failed")
        finally:
            self._finish(client)

    def _step(self, client: MqttClient, bucket: TokenBucket, now: float) -> MqttClient | None:
        """Publish a round if none is out, pump, and retire the round once acknowledged."""
        if self._holding is None and now >= self._decide_by:
            self._set_holding(
                False, f"no capability on {CAPABILITY_TOPIC} within {self.capability_wait:g} s"
            )
        if self._holding is not False:
            return self._step_held(client, bucket, now)
        timeout = 0.2
        if not self._round and self.outbox.depth > self.outbox.in_flight:
            allowed = bucket.take(self.settings.window)
            if allowed:
                self._round = self.outbox.peek_oldest(allowed)
                bucket.give_back(allowed - len(self._round))
                for entry in self._round:
                    client.publish(entry.topic, entry.payload, qos=1)
                self._round_started = now
            else:
                timeout = min(timeout, bucket.wait_time())
        client.pump(timeout=0.02 if self._round else timeout)
        if self._round and client.unacknowledged == 0:
            done = self._round
            self.outbox.delete(entry.id for entry in done)
            self._round = []
            self.stats.envelopes_published += len(done)
        elif self._round and now - self._round_started > self.settings.ack_timeout:
            self._lost(
                client,
                DeliveryError(f"no PUBACK for {self.settings.ack_timeout:g} s; reconnecting"),
            )
            return None
        return client

    def _step_held(self, client: MqttClient, bucket: TokenBucket, now: float) -> MqttClient | None:
        """:meth:`_step` while receipts are (or may be) on: resends first, then new envelopes,
        together at most ``window`` per round and ``drain_rate`` per second; an acknowledged
        round is held until receipts cover it."""
        timeout = 0.2
        held = self._unconfirmed
        if not self._round and not self._resent_out:
            room = self.settings.window
            due = held.due(now, room)
            fresh = 0
            if self.outbox.depth > self.outbox.in_flight:
                fresh = max(0, min(room - len(due), self.settings.receipt_window - len(held)))
            wanted = len(due) + fresh
            allowed = bucket.take(wanted)
            # While new envelopes wait, resends get half the tokens (the odd one in turns):
            # they never starve new data.
            share = allowed
            if fresh and due:
                share = allowed // 2
                if allowed % 2:
                    # Only a step that really had an odd token to give takes a turn: toggling
                    # on token-less steps too could lock the turn to the resends forever.
                    share += int(self._resend_turn)
                    self._resend_turn = not self._resend_turn
            resends = min(len(due), share)
            for entry in due[:resends]:
                client.publish(entry.topic, entry.payload, qos=1)
                held.resent(entry, now)
            self._resent_out = resends
            if allowed > self._resent_out and fresh:
                # Never more new envelopes than the receipt window has room for: tokens the
                # resends' share left unused go back to the bucket, not to new data.
                self._round = self._fresh(min(fresh, allowed - self._resent_out))
                for fresh_entry in self._round:
                    client.publish(fresh_entry.topic, fresh_entry.payload, qos=1)
            bucket.give_back(allowed - self._resent_out - len(self._round))
            if self._round or self._resent_out:
                self._round_started = now
                self._publish_receipt_stats()
            elif wanted:
                timeout = min(timeout, bucket.wait_time())
            else:
                timeout = min(timeout, max(0.0, held.next_due() - now))
        out = bool(self._round or self._resent_out)
        client.pump(timeout=0.02 if out else timeout)
        if out and client.unacknowledged == 0:
            done, self._round, self._resent_out = self._round, [], 0
            self._retire(done, now)
        elif out and now - self._round_started > self.settings.ack_timeout:
            self._lost(
                client,
                DeliveryError(f"no PUBACK for {self.settings.ack_timeout:g} s; reconnecting"),
            )
            return None
        return client

    def _fresh(self, n: int) -> list[OutboxEntry]:
        """Up to ``n`` envelopes from the outbox; those a receipt already covers are deleted."""
        entries = self.outbox.peek_oldest(n)
        covered = []
        for entry in entries:
            boot = self._boots[entry.id] = envelope_boot(entry.payload)
            if self._unconfirmed.covers(boot, entry.seq):
                covered.append(entry.id)
        if covered:
            self.outbox.delete(covered)
            gone = set(covered)
            entries = [entry for entry in entries if entry.id not in gone]
        return entries

    def _retire(self, done: list[OutboxEntry], now: float) -> None:
        """An acknowledged round: held until receipted (deleted if receipts went off)."""
        boots, self._boots = self._boots, {}
        if self._holding is False:
            receipted = [entry.id for entry in done]
        else:
            receipted = [
                entry.id
                for entry in done
                if not self._unconfirmed.hold(
                    entry.id,
                    boots.get(entry.id) if entry.id in boots else envelope_boot(entry.payload),
                    entry.seq,
                    entry.topic,
                    entry.payload,
                    acked_at=now,
                    sent_at=self._round_started,
                )
            ]
        if receipted:
            self.outbox.delete(receipted)
        self.stats.envelopes_published += len(done)
        self._publish_receipt_stats()

    # -- receipts (handlers run inside pump(), on this thread) ------------------------------------

    def _on_message(self, message: Message) -> None:
        if message.topic == self.receipt_topic:
            try:
                self._on_receipt(message.payload)
            except OutboxError as err:
                # The rows stay in the outbox: after a restart they are published again, and
                # the store's receipt for the duplicate deletes them then.
                log.error("receipted envelopes not deleted from the outbox: %s", err)
        elif message.topic == CAPABILITY_TOPIC:
            capability = receipts_capability(message.payload)
            if capability is None:
                log.warning(
                    "capability message ignored topic=%s: no boolean 'receipts'", CAPABILITY_TOPIC
                )
            elif self.settings.receipts == "auto":
                self._set_holding(capability, f"capability receipts={str(capability).lower()}")

    def _on_receipt(self, payload: bytes) -> None:
        receipt = decode_receipt(payload)
        if not isinstance(receipt, str) and (receipt.site, receipt.device) != (
            self.site,
            self.device,
        ):
            receipt = f"for {receipt.site}/{receipt.device}"
        if isinstance(receipt, str):
            self.stats.receipts_malformed += 1
            log.warning("receipt ignored topic=%s reason=%s", self.receipt_topic, receipt)
            return
        ids = self._unconfirmed.apply(receipt, time.monotonic())
        if ids:
            self.outbox.delete(ids)
        self._publish_receipt_stats()

    def _set_holding(self, holding: bool, reason: str) -> None:
        """Follow a change of the pipeline's receipts (one log line per change)."""
        if holding == self._holding:
            return
        self._holding = holding
        if holding:
            log.info("receipts active reason=%s: envelopes are deleted on their receipt", reason)
        else:
            released = self._unconfirmed.release()
            if released:
                self.outbox.delete(released)
            self._resent_out = 0
            log.warning(
                "receipts inactive reason=%s: envelopes are deleted on PUBACK"
                " (a broker that drops them loses them) released=%d",
                reason,
                len(released),
            )
        self._publish_receipt_stats()

    def _publish_receipt_stats(self) -> None:
        """Copy the receipt state into :class:`AgentStats` (read by other threads)."""
        s, held = self.stats, self._unconfirmed
        s.receipts = {None: "undecided", True: "active", False: "inactive"}[self._holding]
        s.unconfirmed = len(held)
        s.unconfirmed_since = held.oldest_acked()
        s.receipt_latency_p50 = held.latency(0.5)
        s.receipt_latency_p99 = held.latency(0.99)
        s.receipts_received = held.received
        s.envelopes_resent = held.resent_total

    def _finish(self, client: MqttClient | None) -> None:
        self.stats.connected = False
        if client is not None:
            try:
                ts = max(self._wall(), self._last_status_ms + 1)
                client.publish(self.status_topic, self._status("offline", ts), qos=1, retain=True)
                self.offline_acknowledged = client.flush(timeout=2.0)
                if self._round and self.offline_acknowledged and self._holding is False:
                    self.outbox.delete(entry.id for entry in self._round)
                    self.stats.envelopes_published += len(self._round)
                    self._round = []
            except (ConnectError, DeliveryError, OutboxError) as err:
                log.warning("offline status not acknowledged: %s", err)
            with contextlib.suppress(Exception):
                client.disconnect()
        self.outbox.release_all()
        self._round = []


class _Batch:
    __slots__ = ("samples", "started", "unsynced")

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.started = 0.0
        self.unsynced = False


class _Due:
    """When the main loop's periodic jobs are next due (monotonic seconds)."""

    __slots__ = ("fill", "ping", "stats", "sync")

    def __init__(self, sync: float, stats: float, fill: float, ping: float) -> None:
        self.sync = sync
        self.stats = stats
        self.fill = fill
        self.ping = ping


class _Scheduled:
    __slots__ = ("driver", "due", "errors_logged_at", "errors_suppressed")

    def __init__(self, driver: Driver, due: float) -> None:
        self.driver = driver
        self.due = due
        self.errors_logged_at = -math.inf
        self.errors_suppressed = 0


class Agent:
    """The edge agent: sensors -> envelopes -> outbox -> MQTT.

    Args:
        settings: the ``[edge]`` section.
        mqtt: the broker (see :func:`edge.config.mqtt_settings`).
        drivers: the configured sensors (the agent closes them when it stops).
        client_factory: builds the MQTT client of each connection (tests inject one).
        notifier: systemd notifications (default: from ``$NOTIFY_SOCKET``).
        wall: epoch milliseconds, for status timestamps.
        clock_synced: tells whether the system clock is synchronised (default: one of
            ``settings.clock_sync_files`` exists, or the list is empty).

    Raises:
        OutboxError: the outbox cannot be opened.
    """

    def __init__(
        self,
        settings: EdgeSettings,
        mqtt: MqttSettings,
        drivers: Sequence[Driver],
        *,
        client_factory: ClientFactory = _default_client,
        notifier: Notifier | None = None,
        wall: Callable[[], int] = wall_ms,
        clock_synced: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.mqtt = mqtt
        self.site = settings.site
        self.device = settings.device_name
        self.topic = topic(self.site, self.device)
        self.stats = AgentStats()
        self.notifier = notifier if notifier is not None else Notifier()
        self._drivers = list(drivers)
        self._clock_synced = clock_synced or self._sync_files_exist
        self._stop = threading.Event()
        self._batch = _Batch()
        self._pending: list[tuple[Pending, float]] = []
        self._known_names: set[str] = set()
        self._fill = FillRate()
        self.outbox = Outbox(
            settings.outbox_path,
            max_bytes=settings.outbox_max_bytes,
            durability=settings.durability,
        )
        counter = self.outbox.counter(self._kernel_boot())
        self.boot = counter.boot
        self._next_seq = counter.next_seq
        self.publisher = Publisher(
            settings,
            mqtt,
            self.outbox,
            self.stats,
            site=self.site,
            device=self.device,
            client_factory=client_factory,
            wall=wall,
        )
        self._http: HealthServer | None = None
        self._schedule: list[_Scheduled] = []
        self._due = _Due(0.0, 0.0, 0.0, 0.0)
        self.last_beat = time.monotonic()

    # -- life cycle -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask :meth:`run` to finish (safe from a signal handler or another thread)."""
        self._stop.set()

    def run(self) -> None:
        """Run until :meth:`stop`; then commit, publish what time allows, go offline."""
        settings = self.settings
        log.info(
            "edge agent starting site=%s device=%s boot=%s next_seq=%d sensors=%d outbox=%s"
            " backlog=%d",
            self.site,
            self.device,
            self.boot,
            self._next_seq,
            len(self._drivers),
            settings.outbox_path,
            self.outbox.depth,
        )
        if settings.http_port:
            self._http = self._start_http()
        self.publisher.start()
        now = time.monotonic()
        self._schedule = [_Scheduled(driver, now) for driver in self._drivers]
        self.stats.clock_synced = self._clock_synced()
        self._due = _Due(sync=now, stats=now + settings.stats_interval, fill=now, ping=now)
        self.notifier.ready(f"publishing to {self.mqtt.broker}")
        try:
            while not self._stop.is_set():
                self._tick()
                self._stop.wait(max(0.0, self._next_wake() - time.monotonic()))
        finally:
            self._shutdown()

    def _tick(self) -> None:
        """One pass of the main loop: whatever is due now."""
        settings, due = self.settings, self._due
        now = self.last_beat = time.monotonic()
        if now >= due.sync:
            self._set_clock_synced(self._clock_synced())
            due.sync = now + (60.0 if self.stats.clock_synced else 1.0)
        for item in self._schedule:
            if now >= item.due:
                self._read(item, now)
                # Keep the cadence; after a stall skip the missed reads.
                item.due += item.driver.interval
                if item.due <= now:
                    item.due = now + item.driver.interval
                now = time.monotonic()
        batch = self._batch
        if batch.samples and now - batch.started >= settings.batch_max_delay:
            self._seal()
        if self._pending and (
            len(self._pending) >= settings.commit_max_envelopes
            or now - self._pending[0][1] >= settings.commit_max_delay
        ):
            self._commit()
        if now >= due.fill:
            self._fill.observe(now, self.outbox.bytes)
            self.stats.full_in_seconds = self._fill.seconds_until_full(self.outbox.free_bytes)
            due.fill = now + _FILL_SAMPLE_INTERVAL
        if now >= due.stats:
            self._log_stats()
            due.stats = now + settings.stats_interval
        interval = self.notifier.watchdog_interval
        if interval is not None and now >= due.ping:
            # Only while both loops run: a stuck agent is restarted by systemd.
            if self.publisher.alive:
                self.notifier.watchdog()
            else:
                log.error("mqtt thread is stuck; not pinging the watchdog")
            due.ping = now + interval

    def _next_wake(self) -> float:
        due = self._due
        wake = [due.sync, due.stats, due.fill, time.monotonic() + 1.0]
        wake.extend(item.due for item in self._schedule)
        if self.notifier.watchdog_interval is not None:
            wake.append(due.ping)
        if self._batch.samples:
            wake.append(self._batch.started + self.settings.batch_max_delay)
        if self._pending:
            wake.append(self._pending[0][1] + self.settings.commit_max_delay)
        return min(wake)

    def _shutdown(self) -> None:
        self.notifier.stopping()
        log.info("edge agent stopping backlog=%d", self.outbox.depth)
        if self._batch.samples:
            self._seal()
        if self._pending:
            self._commit()
        self.publisher.stop(self.settings.stop_timeout)
        for driver in self._drivers:
            try:
                driver.close()
            except Exception:
                log.exception("sensor close failed sensor=%s", driver.name)
        if self._http is not None:
            self._http.stop()
        self._log_stats()
        self.outbox.close()
        self.notifier.close()
        log.info("edge agent stopped")

    # -- readings ---------------------------------------------------------------------------------

    def _read(self, item: _Scheduled, now: float) -> None:
        driver = item.driver
        try:
            samples = driver.read()
        except SensorError as err:
            self._sensor_failed(item, str(err), now)
            samples = list(getattr(err, "samples", ()))
        except Exception as err:  # a driver bug must not stop the other sensors
            self._sensor_failed(item, f"{type(err).__name__}: {err}", now)
            return
        for sample in samples:
            problem = sample_problem(sample, self._known_names)
            if problem is not None:
                self.stats.readings_invalid += 1
                self._sensor_failed(item, f"invalid reading: {problem}", now)
                continue
            self._add(sample, now)

    def _sensor_failed(self, item: _Scheduled, reason: str, now: float) -> None:
        name = item.driver.name
        self.stats.sensor_errors[name] = self.stats.sensor_errors.get(name, 0) + 1
        if now - item.errors_logged_at >= _ERROR_LOG_INTERVAL:
            log.warning(
                "sensor read failed sensor=%s errors=%d suppressed=%d reason=%s",
                name,
                self.stats.sensor_errors[name],
                item.errors_suppressed,
                reason,
            )
            item.errors_logged_at = now
            item.errors_suppressed = 0
        else:
            item.errors_suppressed += 1

    def _add(self, sample: Sample, now: float) -> None:
        batch = self._batch
        if not batch.samples:
            batch.started = now
            batch.unsynced = not self.stats.clock_synced
        batch.samples.append(sample)
        self.stats.readings += 1
        if len(batch.samples) >= self.settings.batch_max_readings:
            self._seal()

    def _set_clock_synced(self, synced: bool) -> None:
        if synced == self.stats.clock_synced:
            return
        # Envelopes are tagged as a whole: readings from before and after do not share one.
        if self._batch.samples:
            self._seal()
        self.stats.clock_synced = synced
        log.info("clock %s", "synchronised" if synced else "not synchronised")

    def _sync_files_exist(self) -> bool:
        files = self.settings.clock_sync_files
        return not files or any(path.exists() for path in files)

    def _kernel_boot(self) -> str:
        try:
            return self.settings.boot_id_path.read_text(encoding="ascii").strip()
        except OSError as err:
            log.warning(
                "no kernel boot id path=%s error=%s; seq restarts with every agent start",
                self.settings.boot_id_path,
                err.strerror,
            )
            return os.urandom(16).hex()

    # -- envelopes --------------------------------------------------------------------------------

    def _seal(self) -> None:
        batch, self._batch = self._batch, _Batch()
        tags: dict[str, str] = dict(self.settings.tags)
        if batch.unsynced:
            tags["clock"] = "unsynced"
        self._seal_samples(batch.samples, tags)

    def _seal_samples(self, samples: list[Sample], tags: Mapping[str, str]) -> None:
        seq = self._next_seq
        payload = build_envelope(
            site=self.site,
            device=self.device,
            boot=self.boot,
            seq=seq,
            samples=samples,
            tags=tags or None,
        )
        if len(payload) > MAX_PAYLOAD and len(samples) > 1:
            half = len(samples) // 2
            self._seal_samples(samples[:half], tags)
            self._seal_samples(samples[half:], tags)
            return
        self._next_seq = seq + 1
        pending = Pending(self.topic, payload, seq, len(samples), samples[0].ts_ms)
        self._pending.append((pending, time.monotonic()))
        self.stats.envelopes_sealed += 1

    def _commit(self) -> None:
        items = [item for item, _ in self._pending]
        try:
            self.outbox.append(items)
        except OutboxError as err:
            self.stats.commit_failures += 1
            log.error("outbox commit failed envelopes=%d error=%s", len(items), err)
            limit = 10 * self.settings.commit_max_envelopes
            if len(self._pending) > limit:
                lost = self._pending[: len(self._pending) - limit]
                del self._pending[: len(lost)]
                self.stats.envelopes_lost += len(lost)
                log.error(
                    "outbox unwritable: dropped the oldest uncommitted envelopes count=%d",
                    len(lost),
                )
            # Retry after commit_max_delay at the earliest (the oldest is now that old).
            self._pending[0] = (self._pending[0][0], time.monotonic())
            return
        self._pending.clear()
        self.stats.envelopes_committed += len(items)

    # -- observability ----------------------------------------------------------------------------

    def _receipt_figures(self) -> dict[str, Any]:
        """The receipt fields of ``/healthz`` and the stats line (seconds; None: not known)."""
        s = self.stats
        since = s.unconfirmed_since
        return {
            "receipts": s.receipts,
            "unconfirmed": s.unconfirmed,
            "oldest_unconfirmed_age": (
                None if since is None else round(max(0.0, time.monotonic() - since), 3)
            ),
            "receipt_latency_p50": s.receipt_latency_p50,
            "receipt_latency_p99": s.receipt_latency_p99,
        }

    def _log_stats(self) -> None:
        oldest = self.outbox.oldest_created_ms
        full_in = self.stats.full_in_seconds
        receipts = self._receipt_figures()
        log.info(
            "edge stats readings=%d envelopes=%d published=%d backlog=%d backlog_bytes=%d"
            " max_bytes=%d oldest_age_s=%s full_in_s=%s dropped=%d connected=%s clock_synced=%s"
            " sensor_errors=%d receipts=%s unconfirmed=%d oldest_unconfirmed_age=%s"
            " receipt_latency_p50=%s receipt_latency_p99=%s resent=%d",
            self.stats.readings,
            self.stats.envelopes_committed,
            self.stats.envelopes_published,
            self.outbox.depth,
            self.outbox.bytes,
            self.outbox.max_bytes,
            "-" if oldest is None else f"{max(0, wall_ms() - oldest) / 1000:.0f}",
            "inf" if math.isinf(full_in) else f"{full_in:.0f}",
            self.outbox.dropped_envelopes,
            self.stats.connected,
            self.stats.clock_synced,
            sum(self.stats.sensor_errors.values()),
            receipts["receipts"],
            receipts["unconfirmed"],
            *(
                "-" if receipts[key] is None else f"{receipts[key]:.3f}"
                for key in ("oldest_unconfirmed_age", "receipt_latency_p50", "receipt_latency_p99")
            ),
            self.stats.envelopes_resent,
        )

    def health(self) -> tuple[bool, dict[str, Any]]:
        """``/healthz``: healthy while both loops run (a broker outage is not unhealthy)."""
        looping = time.monotonic() - self.last_beat < _STALL_SECONDS
        healthy = looping and self.publisher.alive
        return healthy, {
            "connected": self.stats.connected,
            "backlog": self.outbox.depth,
            "backlog_bytes": self.outbox.bytes,
            "dropped": self.outbox.dropped_envelopes,
            "clock_synced": self.stats.clock_synced,
            **self._receipt_figures(),
        }

    def metric_families(self) -> list[metrics.Family]:
        """``/metrics``: :class:`AgentStats` and the outbox, read at scrape time."""
        s, o = self.stats, self.outbox
        oldest = o.oldest_created_ms
        errors = metrics.Family(
            "iotpipe_edge_sensor_errors", "counter", "failed sensor reads", ["sensor"]
        )
        for name, count in s.sensor_errors.items():
            errors.add(count, name)
        return [
            metrics.counter("iotpipe_edge_readings", "readings taken", s.readings),
            metrics.counter(
                "iotpipe_edge_readings_invalid", "readings refused (contract)", s.readings_invalid
            ),
            errors,
            metrics.counter(
                "iotpipe_edge_envelopes_committed", "envelopes committed", s.envelopes_committed
            ),
            metrics.counter(
                "iotpipe_edge_envelopes_published", "envelopes acknowledged", s.envelopes_published
            ),
            metrics.counter(
                "iotpipe_edge_outbox_dropped", "envelopes thinned (budget)", o.dropped_envelopes
            ),
            metrics.counter(
                "iotpipe_edge_outbox_dropped_readings",
                "readings thinned (budget)",
                o.dropped_readings,
            ),
            metrics.counter("iotpipe_edge_reconnects", "MQTT reconnections", s.reconnects),
            metrics.gauge("iotpipe_edge_outbox_envelopes", "envelopes waiting (backlog)", o.depth),
            metrics.gauge("iotpipe_edge_outbox_bytes", "accounted bytes in the outbox", o.bytes),
            metrics.gauge("iotpipe_edge_outbox_max_bytes", "outbox budget", o.max_bytes),
            metrics.gauge("iotpipe_edge_outbox_file_bytes", "outbox files on disk", o.file_bytes),
            metrics.gauge(
                "iotpipe_edge_outbox_full_in_seconds",
                "time until the budget is full at the recent growth (+Inf: not growing)",
                s.full_in_seconds,
            ),
            metrics.gauge(
                "iotpipe_edge_outbox_oldest_age_seconds",
                "age of the oldest waiting reading",
                0.0 if oldest is None else max(0.0, (wall_ms() - oldest) / 1000),
            ),
            metrics.gauge("iotpipe_edge_connected", "1 while connected to the broker", s.connected),
            metrics.gauge(
                "iotpipe_edge_clock_synced", "1 while the clock is synchronised", s.clock_synced
            ),
            metrics.gauge(
                "iotpipe_edge_next_seq", "sequence number of the next envelope", self._next_seq
            ),
            *self._receipt_families(),
        ]

    def _receipt_families(self) -> list[metrics.Family]:
        s = self.stats
        since = s.unconfirmed_since
        latency = metrics.Family(
            "iotpipe_edge_receipt_latency_seconds",
            "gauge",
            "PUBACK to receipt over the last 256 receipted envelopes (NaN: none yet)",
            ["quantile"],
        )
        for quantile, value in (("0.5", s.receipt_latency_p50), ("0.99", s.receipt_latency_p99)):
            latency.add(math.nan if value is None else value, quantile)
        return [
            metrics.gauge(
                "iotpipe_edge_receipts_active",
                "1 while envelopes are deleted on their receipt, not on PUBACK",
                s.receipts == "active",
            ),
            metrics.gauge(
                "iotpipe_edge_unconfirmed",
                "envelopes acknowledged by the broker, not yet receipted",
                s.unconfirmed,
            ),
            metrics.gauge(
                "iotpipe_edge_unconfirmed_oldest_age_seconds",
                "time since the oldest unconfirmed envelope was acknowledged",
                0.0 if since is None else max(0.0, time.monotonic() - since),
            ),
            latency,
            metrics.counter(
                "iotpipe_edge_receipts_received", "receipts taken in", s.receipts_received
            ),
            metrics.counter(
                "iotpipe_edge_envelopes_resent",
                "envelopes published again for want of a receipt",
                s.envelopes_resent,
            ),
        ]

    def _start_http(self) -> HealthServer:
        from iotpipe.health import HealthServer

        return HealthServer(
            self.settings.http_host,
            self.settings.http_port,
            lambda: (metrics.CONTENT_TYPE, metrics.render(self.metric_families())),
            self.health,
        ).start()


def serve(
    config: Path | None,
    *,
    mqtt_url: str | None = None,
    site: str | None = None,
    device: str | None = None,
) -> None:
    """Load the settings, build the drivers and run the agent until SIGTERM or SIGINT.

    Raises:
        ConfigError: a setting is invalid.
        OutboxError: the outbox cannot be opened.
    """
    import signal

    from edge.config import mqtt_settings
    from edge.sensors import build_drivers
    from iotpipe.schema import config_path, load

    path = config_path(config)
    settings = load(
        EdgeSettings, "edge", config_file=path, overrides={"site": site, "device": device}
    )
    broker = mqtt_settings(
        load(MqttSettings, "mqtt", config_file=path, overrides={"url": mqtt_url}), settings
    )
    drivers = build_drivers(settings.sensors)
    agent = Agent(settings, broker, drivers)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: agent.stop())
    sys.stderr.write(
        f"iotpipe edge {settings.site}/{settings.device_name} -> {broker.broker}; "
        f"{len(drivers)} sensors; outbox {settings.outbox_path}\n"
    )
    agent.run()

"""The simulation loop: pace the fleet, inject faults, publish, account for every message.

Schedule. Devices take turns: message ``k`` belongs to device ``k mod N`` and carries the samples
taken up to simulated time ``start + k * batch / (rate * N)``, so every device samples at exactly
``rate`` Hz of simulated time and the fleet's messages are spread evenly. Paced runs publish
message ``k`` at ``k * batch / (rate * N * speed)`` seconds of real time after the start (late
messages go out at once and the lag is shown); ``rate = "max"`` publishes as fast as the broker
acknowledges, stamping samples 1 s apart in simulated time.

Connections and last wills. An MQTT last will belongs to a connection, so it can speak for one
device only. When the fleet is small (``connections`` unset and at most ``PER_DEVICE_LIMIT``
devices), or when ``connections`` equals the fleet size, each device gets its own connection
whose will is that device's retained ``offline`` status: exact semantics. Otherwise devices are
spread round-robin over ``connections`` (default 1: one socket is the fastest way to publish
from one thread) and carry no wills; the simulator then publishes every device's ``offline``
status itself on every orderly exit (the end, Ctrl-C, SIGTERM), so only a hard kill (or a
broker that cannot be reached again) leaves their statuses reading ``online``.

Delivery. Every publish goes through an :class:`~simulator.link.Link` (``MqttClient``) that
windows in-flight QoS>0 messages and checks paho's result; a lost connection is re-established
with backoff and unacknowledged messages are retransmitted. At the end every link is flushed;
the summary says how many messages were never acknowledged, and the command fails if any were.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

from iotpipe.errors import ConnectError, DeliveryError
from iotpipe.mqtt import Message, Will
from iotpipe.receipts import CAPABILITY_TOPIC, decode_receipt, receipt_topic
from iotpipe.settings import MqttSettings
from iotpipe.wire import State
from simulator import faults
from simulator.faults import REJECTED, Fault, FaultPlan, Outage, Reorderer
from simulator.fleet import Device, Fleet, Outgoing
from simulator.formats import Part, Publication, Rendered
from simulator.link import Link, LinkFactory, MqttLink
from simulator.progress import NoProgress, Progress, Snapshot
from simulator.receipts import ReceiptTracker
from simulator.settings import SimulateSettings

log = logging.getLogger(__name__)

#: Fleets up to this size get one connection (and one exact last will) per device by default.
PER_DEVICE_LIMIT = 10

#: Read acknowledgements every this many messages per connection. Reading them in batches,
#: before the window fills, is ~1.7x faster than pumping only when publish() has to wait
#: (bench/bench_simulator.py measures both; 32-64 is the sweet spot on this machine).
_PUMP_EVERY = 32

#: Messages rendered in one go before publishing them (unpaced, or paced and behind).
_BLOCK = 256


@dataclass(frozen=True)
class Summary:
    """What a run did, for people and (``--json``) for programs.

    Attributes:
        seed: the seed used; pass it as ``--seed`` to repeat the run's ids and values.
        sites: number of sites.
        devices: number of devices.
        connections: MQTT connections used.
        messages: envelopes generated, each with its own id and seq.
        readings: readings in those envelopes.
        published: telemetry publishes: messages plus duplicates and offline resends.
        rejected: publishes the bridge must reject (malformed, schema, oversize, mismatch).
        valid: publishes that decode as valid envelopes (``published - rejected``).
        status: retained status messages published (births, offline/online, final offline).
        acknowledged: publishes (telemetry and status) the broker acknowledged.
        unacknowledged: publishes never acknowledged; non-zero fails the command.
        resent: messages sent again after an offline period (same id).
        faults: faults injected, by kind.
        reconnects: connections re-established after a loss.
        elapsed_s: seconds from the first telemetry message to the last acknowledgement.
        rate: telemetry publishes per second over ``elapsed_s``.
        max_behind_s: the worst lag behind the paced schedule.
        interrupted: the run was stopped early (Ctrl-C, SIGTERM).
        receipts: whether devices kept their envelopes until receipted (``--receipts``).
        confirmed: envelopes a receipt covered.
        unconfirmed: envelopes no receipt covered by the end; non-zero fails the command.
        receipt_resends: publishes of envelopes resent because no receipt came in time.
        receipt_latency_p50_s: median seconds from publish to receipt.
        receipt_latency_p99_s: 99th percentile of the same.
    """

    seed: int
    sites: int
    devices: int
    connections: int
    messages: int
    readings: int
    published: int
    rejected: int
    valid: int
    status: int
    acknowledged: int
    unacknowledged: int
    resent: int
    faults: dict[str, int]
    reconnects: int
    elapsed_s: float
    rate: float
    max_behind_s: float
    interrupted: bool
    receipts: bool = False
    confirmed: int = 0
    unconfirmed: int = 0
    receipt_resends: int = 0
    receipt_latency_p50_s: float = 0.0
    receipt_latency_p99_s: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether every publish was acknowledged (and, with receipts, receipted)."""
        return self.unacknowledged == 0 and self.unconfirmed == 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass
class _Counts:
    published: int = 0
    rejected: int = 0
    status: int = 0
    resent: int = 0
    held: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    behind: float = 0.0
    max_behind: float = 0.0


def connection_count(settings: SimulateSettings) -> int:
    """How many MQTT connections carry the fleet (see the module docstring)."""
    devices = settings.total_devices
    if settings.connections is not None:
        return min(settings.connections, devices)
    return devices if devices <= PER_DEVICE_LIMIT else 1


class Simulation:
    """One run of the simulator.

    Args:
        settings: what to simulate.
        links: makes the connections (``MqttClient`` in production, ``MemoryLink`` in tests).
        progress: where snapshots go while running (default: nowhere).
        clock: monotonic seconds, for pacing.
        wall: Unix seconds, for the default start time.
        sleep: waits between pumps when several links are idle.
    """

    def __init__(
        self,
        settings: SimulateSettings,
        links: LinkFactory,
        *,
        progress: Progress | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.fleet = Fleet(settings)
        self.progress: Progress = progress or NoProgress()
        self._link_factory = links
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self.links: list[Link] = []
        self._counts = _Counts()
        self._status_ms: dict[int, int] = {}
        self._plan = FaultPlan(settings.faults.rates())
        # Two fault streams, each consumed in message order whatever the block boundaries, so
        # a seed injects the same faults into the same messages in paced and unpaced runs:
        # which fault (and how much skew) is drawn when rendering, the details when delivering.
        self._decide_rng = random.Random(f"{self.fleet.seed}/faults")
        self._detail_rng = random.Random(f"{self.fleet.seed}/fault-details")
        #: Command topic -> the device it is for (formats that take commands).
        self._commanded: dict[str, Device] = {}
        self._stopping = False
        self._interrupted = False
        self._messages = 0
        self._target: int | None = None
        self._started: float | None = None
        self._next_report = 0.0
        self._now_ms = 0
        #: Set once the run decided to speak receipts (``--receipts``).
        self.tracker: ReceiptTracker | None = None
        self._resend_rate = math.inf
        self._resend_budget = 0.0
        self._resend_clock = 0.0

    # -- control -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the run to stop generating, then drain and flush as usual (signal-safe)."""
        self._stopping = True
        self._interrupted = True

    def snapshot(self) -> Snapshot:
        """Where the run stands now."""
        c = self._counts
        return Snapshot(
            elapsed=0.0 if self._started is None else self._clock() - self._started,
            messages=self._messages,
            target=self._target,
            published=c.published,
            acknowledged=sum(link.acknowledged for link in self.links),
            inflight=sum(link.unacknowledged for link in self.links),
            held=c.held,
            faults=dict(c.faults),
            behind=c.behind,
            reconnects=sum(link.reconnects for link in self.links),
            unconfirmed=None if self.tracker is None else self.tracker.unconfirmed,
            latency_p50=None if self.tracker is None else self.tracker.latency(0.5),
            latency_p99=None if self.tracker is None else self.tracker.latency(0.99),
        )

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> Summary:
        """Connect, publish births, simulate, drain faults, publish offline statuses, flush.

        Returns:
            The summary; check ``summary.ok`` (every publish acknowledged).

        Raises:
            ConnectError: a broker refused or dropped us and could not be reached again.
            DeliveryError: the MQTT client refused a publish.
        """
        s = self.settings
        devices = self.fleet.devices
        n_links = connection_count(s)
        per_device = n_links == len(devices)
        for device in devices:
            device.link = device.index % n_links
        start = s.start.timestamp() if s.start is not None else self._wall()
        start_ms = round(start * 1000)
        self._now_ms = start_ms
        try:
            for i in range(n_links):
                will = None
                # A session format's will is its death certificate: set whatever --status says.
                if per_device and (s.status or devices[i].sessions):
                    will = devices[i].will(start_ms)
                self.links.append(self._link_factory(i, will))
                self.links[-1].connect()
            self._negotiate()
            self._listen()
            self._announce(start_ms)
            self._started = self._clock()
            try:
                self._loop(start_ms)
            except KeyboardInterrupt:
                self._interrupted = True
            self._drain()
            for device in devices:
                # A session format's orderly end: its death certificate (Sparkplug's NDEATH).
                self._publish(device, device.deaths(self._now_ms))
            if s.status:
                for device in devices:
                    self._publish_status(device, "offline", self._now_ms)
            deadline = time.monotonic() + s.flush_timeout
            self._flush(deadline)
            if self.tracker is not None:
                self._await_receipts(deadline)
                # Resends still in flight: their acknowledgements, as for every publish.
                self._flush(time.monotonic() + s.flush_timeout)
            elapsed = self._clock() - self._started
        finally:
            for link in self.links:
                try:
                    link.disconnect()
                except Exception:  # closing a dead socket must not mask the real error
                    log.debug("disconnect failed", exc_info=True)
            self.progress.close()
        return self._summary(elapsed, n_links)

    def _announce(self, start_ms: int) -> None:
        """Before the first message: every device's births (formats that have them), then its
        retained ``online`` status (unless ``status`` is off)."""
        devices = self.fleet.devices
        for device in devices:
            self._publish(device, device.births(start_ms))
        if self.settings.status:
            for device in devices:
                self._publish_status(device, "online", start_ms)

    def _limit(self) -> int | None:
        s = self.settings
        limits = []
        if s.count is not None:
            limits.append(s.count)
        if s.duration is not None:
            per_second = s.sample_rate * s.total_devices / s.batch
            limits.append(max(1, math.ceil(s.duration * per_second - 1e-9)))
        return min(limits) if limits else None

    def _loop(self, start_ms: int) -> None:  # noqa: PLR0912, PLR0915 - one hot loop, in locals
        s = self.settings
        devices = self.fleet.devices
        n = len(devices)
        batch = s.batch
        rate = s.sample_rate
        interval_ms = 1000.0 * batch / (rate * n)
        steps = [round((batch - 1 - b) * 1000.0 / rate) for b in range(batch)] if batch > 1 else []
        limit = self._target = self._limit()
        paced = not s.unpaced
        wall_interval = interval_ms / 1000.0 / s.speed
        clock = self._clock
        t0 = clock()
        plan = self._plan
        p_any = plan.total
        decide = self._decide_rng.random
        skew_rng = self._decide_rng
        skew_seconds = s.faults.skew_seconds
        links = self.links
        qos = s.qos
        counts = self._counts
        republish = self._republish
        deliver = self._deliver
        tick_every = _PUMP_EVERY * len(links)
        next_tick = tick_every
        skew = Fault.SKEW
        track_last = s.faults.offline > 0  # only an outage resends the last message sent
        tracker = self.tracker
        now = 0.0
        published = 0  # fast-path publishes not yet added to counts.published
        k = 0
        try:
            while limit is None or k < limit:
                if self._stopping:
                    break
                end = k + _BLOCK if limit is None else min(limit, k + _BLOCK)
                if paced:
                    end = self._await_turn(k, end, t0, wall_interval)
                    if end <= k:
                        break
                # Render first, then publish: each loop stays hot in the CPU caches, which makes
                # the whole ~20% faster than alternating generation and paho message by message.
                if tracker is not None:
                    end = self._room(k, end)
                    if end <= k:
                        break
                    now = clock()
                block: list[tuple[Device, Fault | None, Rendered, int, int]] = []
                for j in range(k, end):
                    dev = devices[j % n]
                    t_ms = start_ms + round(j * interval_ms)
                    fault = plan.choose(u) if p_any and (u := decide()) < p_any else None
                    skew_ms = faults.skew(skew_rng, skew_seconds) if fault is skew else 0
                    seq = dev.seq
                    block.append((dev, fault, dev.render(t_ms, skew_ms, steps), t_ms, seq))
                for dev, fault, payload, t_ms, seq in block:
                    if (
                        fault is None
                        and dev.outage is None
                        and dev.reorder is None
                        and dev.sequencer is None  # not numbered at dispatch (Sparkplug B)
                        and isinstance(payload, bytes)  # not the parts of a multipart format
                    ):
                        link = links[dev.link]
                        try:
                            link.publish(dev.topic, payload, qos)
                        except (ConnectError, DeliveryError) as err:
                            republish(link, dev.topic, payload, qos, retain=False, err=err)
                        published += 1
                        if track_last:
                            dev.last = (dev.topic, payload, False, seq)
                        if tracker is not None:
                            tracker.keep(dev.index, seq, dev.topic, payload, now)
                    else:
                        deliver(dev, fault, payload, t_ms, seq)
                    k += 1
                    if k >= next_tick:
                        next_tick = k + tick_every
                        counts.published += published
                        published = 0
                        self._messages = k
                        self._now_ms = t_ms
                        if paced:
                            counts.behind = max(0.0, clock() - (t0 + k * wall_interval))
                            counts.max_behind = max(counts.max_behind, counts.behind)
                        self._tick()
        finally:  # also when interrupted mid-block: count what really went out
            counts.published += published
            self._messages = k
            self._now_ms = start_ms + round(max(0, k - 1) * interval_ms)
            counts.behind = 0.0

    def _await_turn(self, k: int, end: int, t0: float, wall_interval: float) -> int:
        """Paced runs: wait until message ``k`` is due, then say how many are due (up to
        ``end``): one when on time, a block when running behind. ``k`` means "stop"."""
        now = self._clock()
        due = t0 + k * wall_interval
        if now < due:
            self._wait(due)
            if self._stopping:
                return k
            now = self._clock()
        return min(end, max(k + 1, int((now - t0) / wall_interval) + 1))

    def _deliver(
        self, dev: Device, fault: Fault | None, payload: Rendered, t_ms: int, seq: int
    ) -> None:
        """The slow path: a fault hits this message, or the device is offline or reordering."""
        rng = self._detail_rng
        counts = self._counts
        if dev.outage is not None and fault in (Fault.DUPLICATE, Fault.REORDER, Fault.OFFLINE):
            fault = None  # an offline device cannot duplicate, reorder or go offline again
        if not isinstance(payload, bytes):
            self._deliver_parts(dev, fault, payload, t_ms, seq)
            return
        if fault is Fault.MALFORMED:
            payload = dev.malform(payload, rng)
        elif fault is Fault.SCHEMA:
            payload, _ = faults.break_schema(payload, rng)
        elif fault is Fault.OVERSIZE:
            payload = faults.oversize(payload)
        elif fault is Fault.MISMATCH:
            payload = faults.mismatch(payload)
        if fault is not None:
            counts.faults[fault.value] += 1
        self._dispatch(dev, fault, (dev.topic, payload, fault in REJECTED, seq), t_ms)

    def _deliver_parts(
        self, dev: Device, fault: Fault | None, parts: tuple[Part, ...], t_ms: int, seq: int
    ) -> None:
        """A message of several publishes (ESPHome: one per sensor): the fault, counted once,
        hits each of them; an outage lasts ``offline_messages`` whole messages."""
        if fault is not None:
            self._counts.faults[fault.value] += 1
        for topic, payload in parts:
            # The first part of an offline message starts the outage, which buffers the rest.
            self._dispatch(dev, fault, (topic, payload, False, seq), t_ms, len(parts))

    def _dispatch(
        self, dev: Device, fault: Fault | None, out: Outgoing, t_ms: int, parts: int = 1
    ) -> None:
        """Send, hold back, buffer or duplicate one publish as its fault and device say."""
        f = self.settings.faults
        counts = self._counts
        if dev.outage is not None:
            self._buffer(dev, out, t_ms)
            return
        if fault is Fault.OFFLINE:
            resend = dev.last
            if dev.sessions:
                # The session ends: what the network still holds of it arrives first, and no
                # message of it can be sent again in the next one (its seq would be wrong).
                self._release_reordered(dev, everything=True)
                resend = None
            dev.outage = Outage(remaining=f.offline_messages * parts, resend=resend)
            self._publish(dev, dev.deaths(t_ms))
            if self.settings.status:
                self._publish_status(dev, "offline", t_ms)
            self._buffer(dev, out, t_ms)
            return
        if dev.sequencer is not None:
            out = _numbered(dev, out)
        if fault is Fault.REORDER:
            if dev.reorder is None:
                dev.reorder = Reorderer()
            dev.reorder.hold(out, self._detail_rng.randint(1, f.reorder_window))
            counts.held += 1
            return
        self._send(dev, out)
        if fault is Fault.DUPLICATE:
            self._send(dev, out)
        self._release_reordered(dev)

    def _release_reordered(self, dev: Device, *, everything: bool = False) -> None:
        if dev.reorder is None:
            return
        for item in dev.reorder.drain() if everything else dev.reorder.tick():
            self._counts.held -= 1
            self._send(dev, item)
        if not dev.reorder:
            dev.reorder = None

    def _buffer(self, dev: Device, out: Outgoing, t_ms: int) -> None:
        assert dev.outage is not None
        self._counts.held += 1
        if dev.outage.buffer(out):
            self._end_outage(dev, t_ms)

    def _end_outage(self, dev: Device, t_ms: int) -> None:
        outage = dev.outage
        if outage is None:
            return
        dev.outage = None
        self._publish(dev, dev.births(t_ms))  # a session format's new session (NBIRTH)
        if self.settings.status:
            self._publish_status(dev, "online", t_ms)
        if outage.resend is not None:
            self._counts.resent += 1
        self._counts.held -= len(outage.buffered)
        for item in outage.release():
            self._send(dev, item if dev.sequencer is None else _numbered(dev, item))

    def _drain(self) -> None:
        """Send whatever faults still hold: nothing generated is ever left behind."""
        for dev in self.fleet.devices:
            if dev.outage is not None:
                self._end_outage(dev, self._now_ms)
            if dev.reorder is not None:
                for item in dev.reorder.drain():
                    self._counts.held -= 1
                    self._send(dev, item)
                dev.reorder = None

    # -- receipts ------------------------------------------------------------------------------

    def _negotiate(self) -> None:
        """Subscribe to receipts and the pipeline's capability; decide whether to speak receipts.

        ``on`` speaks them; ``auto`` follows the retained capability on ``iotpipe/v1/pipeline``,
        waiting up to ``capability_wait`` seconds for it (none: off, said once on stderr).
        """
        s = self.settings
        if s.receipts == "off" or s.foreign:  # receipts are the envelope contract's
            return
        devices = self.fleet.devices
        for i, link in enumerate(self.links):
            carried = devices[i :: len(self.links)]
            if len(carried) == 1:
                filters = [receipt_topic(carried[0].site, carried[0].name)]
            else:  # one wildcard per site scales to 10,000 devices on one connection
                filters = [
                    f"iotpipe/v1/{site}/+/receipt"
                    for site in dict.fromkeys(d.site for d in carried)
                ]
            if i == 0:
                filters.append(CAPABILITY_TOPIC)
            self._subscribe(link, filters)
        active = s.receipts == "on"
        if s.receipts == "auto":
            said = self._await_capability()
            active = bool(said)
            if said is None:
                log.warning(
                    "simulate found no pipeline capability on %s within %g s; receipts off",
                    CAPABILITY_TOPIC,
                    s.capability_wait,
                )
            elif not said:
                log.warning("simulate: the pipeline sends no receipts; receipts off")
        if not active:
            return
        self.tracker = ReceiptTracker(
            [(d.site, d.name, d.boot) for d in devices],
            window=s.receipt_window,
            timeout_min=s.receipt_timeout_min,
            timeout_max=s.receipt_timeout_max,
            rng=random.Random(f"{self.fleet.seed}/receipts"),
        )
        if not s.unpaced:
            self._resend_rate = s.sample_rate * len(devices) / s.batch * s.speed
        self._resend_clock = self._clock()
        self._take_messages()

    # -- commands to devices (Sparkplug B's rebirth requests) ----------------------------------

    def _listen(self) -> None:
        """Subscribe each link to the command topics of the devices it carries, if any."""
        for i, link in enumerate(self.links):
            filters: list[str] = []
            for device in self.fleet.devices[i :: len(self.links)]:
                if device.emitter is not None:
                    for topic in device.emitter.commands():
                        self._commanded[topic] = device
                        filters.append(topic)
            if filters:
                self._subscribe(link, filters, qos=0)

    def _answer_commands(self) -> None:
        """Hand every command received to its device and publish the answers (births)."""
        for link in self.links:
            inbox = link.inbox
            while inbox:
                message = inbox.popleft()
                dev = self._commanded.get(message.topic)
                if dev is None or dev.emitter is None or dev.outage is not None:
                    continue  # an offline device hears nothing; it births when back anyway
                answer = dev.emitter.command(message.topic, message.payload, self._now_ms)
                if answer:
                    # What the network holds of the old numbering arrives before the new birth.
                    self._release_reordered(dev, everything=True)
                    self._publish(dev, answer)  # counted as status, as every birth

    def _subscribe(self, link: Link, filters: list[str], qos: int = 1) -> None:
        while True:
            try:
                link.subscribe([(f, qos) for f in filters])
                return
            except ConnectError:
                if link.connected:
                    raise  # refused, e.g. by an ACL
                self._recover(link)

    def _await_capability(self) -> bool | None:
        """The pipeline's retained capability: receipts on/off, or None if none came in time."""
        link = self.links[0]
        deadline = self._clock() + self.settings.capability_wait
        while True:
            said = _capability_in(link.inbox)
            if said is not None or link.synchronous or self._clock() >= deadline:
                return said
            self._pump(link, 0.05)

    def _take_messages(self) -> None:
        """Apply the receipts every link received."""
        tracker = self.tracker
        if tracker is None:
            return
        now = self._clock()
        for link in self.links:
            inbox = link.inbox
            while inbox:
                message = inbox.popleft()
                if not message.topic.endswith("/receipt"):
                    continue
                receipt = decode_receipt(message.payload)
                if isinstance(receipt, str):
                    log.warning(
                        "simulate ignored a bad receipt topic=%s: %s", message.topic, receipt
                    )
                    continue
                tracker.apply(receipt, now)

    def _service(self) -> None:
        """Apply the receipts received, resend what timed out (paced at the run's rate)."""
        tracker = self.tracker
        if tracker is None:
            return
        self._take_messages()
        now = self._clock()
        rate = self._resend_rate
        if math.isinf(rate):
            limit = tracker.window * len(self.fleet)
        else:
            budget = self._resend_budget + (now - self._resend_clock) * rate
            self._resend_budget = min(budget, max(1.0, rate))
            limit = int(self._resend_budget)
        self._resend_clock = now
        if limit <= 0:
            return
        devices = self.fleet.devices
        qos = self.settings.qos
        for index, topic, payload in tracker.due(now, limit):
            link = self.links[devices[index].link]
            try:
                link.publish(topic, payload, qos)
            except (ConnectError, DeliveryError) as err:
                self._republish(link, topic, payload, qos, retain=False, err=err)
            self._counts.published += 1
            self._resend_budget -= 1

    def _room(self, k: int, end: int) -> int:
        """Cut the block ``[k, end)`` where a device's receipt window would overflow; wait for
        receipts while the very next device's window is full. ``k`` means "stop"."""
        tracker = self.tracker
        assert tracker is not None
        devices = self.fleet.devices
        n = len(devices)
        while True:
            taken: dict[int, int] = {}
            j = k
            while j < end:
                index = j % n
                used = taken.get(index, 0) + 1
                if used > tracker.room(index):
                    break
                taken[index] = used
                j += 1
            if j > k or self._stopping:
                return j
            self._wait_for_receipts()

    def _wait_for_receipts(self) -> None:
        """Pump every link for a moment, then apply receipts and resend what is due."""
        links = self.links
        if len(links) == 1:
            self._pump(links[0], 0.05)
        else:
            for link in links:
                self._pump(link, 0.0)
            self._sleep(0.005)
        self._service()
        self._report(self._clock())

    def _await_receipts(self, deadline: float) -> None:
        """The end of a run: wait until a receipt covered every envelope, or ``deadline``."""
        tracker = self.tracker
        assert tracker is not None
        self._service()
        while tracker.unconfirmed and time.monotonic() < deadline:
            self._wait_for_receipts()
        self.progress.update(self.snapshot())

    # -- I/O -----------------------------------------------------------------------------------

    def _send(self, dev: Device, out: Outgoing) -> None:
        link = self.links[dev.link]
        try:
            link.publish(out[0], out[1], self.settings.qos)
        except (ConnectError, DeliveryError) as err:
            self._republish(link, out[0], out[1], self.settings.qos, retain=False, err=err)
        self._counts.published += 1
        if out[2]:
            self._counts.rejected += 1
        elif self.tracker is not None:
            self.tracker.keep(dev.index, out[3], out[0], out[1], self._clock())
        dev.last = out

    def _publish_status(self, dev: Device, state: State, t_ms: int) -> None:
        # Each status of a device is strictly newer than its last one, so a reader that keeps
        # the newest status per device (the consumers' registry) always ends on the last one,
        # even when an outage ends and the run ends in the same millisecond.
        t_ms = max(t_ms, self._status_ms.get(dev.index, t_ms - 1) + 1)
        self._status_ms[dev.index] = t_ms
        self._publish(dev, dev.statuses(state, t_ms))

    def _publish(self, dev: Device, publications: list[Publication]) -> None:
        """Publish status messages (or births) on the device's link, counted as ``status``."""
        link = self.links[dev.link]
        for topic, payload, qos, retain in publications:
            try:
                link.publish(topic, payload, qos, retain)
            except (ConnectError, DeliveryError) as err:
                self._republish(link, topic, payload, qos, retain=retain, err=err)
            self._counts.status += 1

    def _republish(
        self, link: Link, topic: str, payload: bytes, qos: int, *, retain: bool, err: Exception
    ) -> None:
        """Publish again after ``link`` failed with ``err``, reconnecting first.

        A lost connection surfaces as ConnectError while waiting for window space (the message
        was not handed to paho yet), or as a DeliveryError with the link down for a QoS 0
        message. A QoS>0 message paho accepted is retransmitted by paho itself and never
        comes here, so nothing is sent twice.
        """
        while True:
            if isinstance(err, DeliveryError) and link.connected:
                raise err  # a real refusal, not a lost connection
            self._recover(link)
            try:
                link.publish(topic, payload, qos, retain)
            except (ConnectError, DeliveryError) as again:
                err = again
            else:
                return

    def _recover(self, link: Link) -> None:
        log.warning(
            "simulate lost its connection; reconnecting timeout=%s", self.settings.reconnect_timeout
        )
        link.reconnect(time.monotonic() + self.settings.reconnect_timeout)
        log.info("simulate reconnected")

    def _pump(self, link: Link, timeout: float) -> None:
        try:
            link.pump(timeout)
        except ConnectError:
            self._recover(link)

    def _tick(self) -> None:
        """Between messages: keep idle connections alive and refresh the progress view."""
        for link in self.links:
            self._pump(link, 0.0)
        if self.tracker is not None:
            self._service()
        if self._commanded:
            self._answer_commands()
        self._report(self._clock())

    def _report(self, now: float) -> None:
        """Refresh the progress view if it is due."""
        if now >= self._next_report:
            self._next_report = now + self.progress.interval
            self.progress.update(self.snapshot())

    def _wait(self, due: float) -> None:
        """Until the paced schedule's ``due`` time: read acknowledgements, refresh the view."""
        links = self.links
        clock = self._clock
        while not self._stopping:
            now = clock()
            if now >= due:
                return
            remaining = min(due - now, 0.05)
            if len(links) == 1:
                self._pump(links[0], remaining)
            else:
                for link in links:
                    self._pump(link, 0.0)
                self._sleep(min(remaining, 0.005))
            if self.tracker is not None:
                self._service()
            if self._commanded:
                self._answer_commands()
            self._report(now)

    def _flush(self, deadline: float) -> None:
        for link in self.links:
            while True:
                try:
                    link.flush(max(0.0, deadline - time.monotonic()))
                    break
                except ConnectError:
                    self._recover(link)
        self.progress.update(self.snapshot())

    def _summary(self, elapsed: float, n_links: int) -> Summary:
        s = self.settings
        c = self._counts
        rate = c.published / elapsed if elapsed > 0 else 0.0
        return Summary(
            seed=self.fleet.seed,
            sites=s.sites,
            devices=len(self.fleet),
            connections=n_links,
            messages=self._messages,
            readings=self._messages * s.batch * len(s.sensors),
            published=c.published,
            rejected=c.rejected,
            valid=c.published - c.rejected,
            status=c.status,
            acknowledged=sum(link.acknowledged for link in self.links),
            unacknowledged=sum(link.unacknowledged for link in self.links),
            resent=c.resent,
            faults=dict(sorted(c.faults.items())),
            reconnects=sum(link.reconnects for link in self.links),
            elapsed_s=round(elapsed, 3),
            rate=round(rate, 1),
            max_behind_s=round(c.max_behind, 3),
            interrupted=self._interrupted,
            **self._receipt_summary(),
        )

    def _receipt_summary(self) -> dict[str, Any]:
        t = self.tracker
        if t is None:
            return {}
        return {
            "receipts": True,
            "confirmed": t.confirmed,
            "unconfirmed": t.unconfirmed,
            "receipt_resends": t.resends,
            "receipt_latency_p50_s": round(t.latency(0.5), 3),
            "receipt_latency_p99_s": round(t.latency(0.99), 3),
        }


def _numbered(dev: Device, out: Outgoing) -> Outgoing:
    """``out`` with its session's sequence number written in, as it is dispatched."""
    assert dev.sequencer is not None
    return (out[0], dev.sequencer(out[1], out[2]), out[2], out[3])


def _capability(message: Message) -> bool:
    """Whether a capability message says receipts flow (anything unreadable: they do not)."""
    try:
        said = json.loads(message.payload)
    except ValueError:
        return False
    return isinstance(said, dict) and said.get("receipts") is True


def _capability_in(inbox: Iterable[Message]) -> bool | None:
    for message in inbox:
        if message.topic == CAPABILITY_TOPIC:
            return _capability(message)
    return None


def summary_lines(summary: Summary) -> Iterable[str]:
    """The summary as a few human-readable lines."""
    s = summary
    yield (
        f"simulated {s.devices} devices on {s.sites} site(s) over {s.connections} connection(s), "
        f"seed {s.seed}{' (interrupted)' if s.interrupted else ''}"
    )
    yield (
        f"messages {s.messages} ({s.readings} readings), published {s.published} "
        f"(valid {s.valid}, to be rejected {s.rejected}, resent {s.resent}), status {s.status}"
    )
    yield (
        f"acknowledged {s.acknowledged}, unacknowledged {s.unacknowledged}, "
        f"reconnects {s.reconnects}, {s.elapsed_s:.2f} s, {s.rate:.0f} msg/s, "
        f"max behind schedule {s.max_behind_s:.2f} s"
    )
    if s.faults:
        yield "faults " + ", ".join(f"{kind}={count}" for kind, count in s.faults.items())
    else:
        yield "faults none"
    if s.receipts:
        yield (
            f"receipts on: confirmed {s.confirmed}, unconfirmed {s.unconfirmed}, "
            f"resent {s.receipt_resends}, latency p50 {s.receipt_latency_p50_s:.3f} s "
            f"p99 {s.receipt_latency_p99_s:.3f} s"
        )
    else:
        yield "receipts off"


# -- running a fleet against a broker ---------------------------------------------------------


def mqtt_links(mqtt: MqttSettings, *, max_inflight: int) -> LinkFactory:
    """Open each of a simulation's connections as an :class:`~simulator.link.MqttLink`.

    Client ids are ``<client_id or "iotsim">-<run>-<index>``, with a random run part so two
    simulators on one broker never take over each other's sessions.
    """
    # MQTT 3.1.1 only promises client ids of up to 23 characters: "iotsim-1a2b3c-9999" fits.
    prefix = mqtt.client_id or "iotsim"
    run_id = uuid.uuid4().hex[:6]

    def connect(index: int, will: Will | None) -> Link:
        return MqttLink(
            mqtt, client_id=f"{prefix}-{run_id}-{index}", will=will, max_inflight=max_inflight
        )

    return connect


@contextmanager
def stop_on_signals(sim: Simulation) -> Iterator[None]:
    """First SIGINT/SIGTERM: stop generating, drain, flush, summarise. Second SIGINT: abort.

    Off the main thread (where Python installs no handlers) the run is simply not stoppable
    by signals.
    """
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(_signum: int, _frame: FrameType | None) -> None:
        sim.stop()
        # A second Ctrl-C interrupts at once (e.g. while waiting for acknowledgements).
        signal.signal(signal.SIGINT, signal.default_int_handler)

    installed = False
    try:
        for sig in previous:
            signal.signal(sig, handler)
        installed = True
    except ValueError:  # not the main thread (e.g. run from a test's worker thread)
        pass
    try:
        yield
    finally:
        if installed:
            for sig, old in previous.items():
                signal.signal(sig, old)


def simulate_fleet(
    settings: SimulateSettings, mqtt: MqttSettings, *, progress: Progress | None = None
) -> Summary:
    """Publish the fleet ``settings`` describe to the broker ``mqtt`` names, until it is done.

    Signals stop the run gracefully (:func:`stop_on_signals`). Every publish is accounted for;
    call :func:`check_acknowledged` on the result to fail on lost ones.

    Raises:
        ConfigError: the fleet cannot be built from the settings.
        ConnectError: the broker cannot be reached.
    """
    links = mqtt_links(mqtt, max_inflight=settings.max_inflight)
    sim = Simulation(settings, links, progress=progress)
    with stop_on_signals(sim):
        return sim.run()


def check_acknowledged(summary: Summary, settings: SimulateSettings, broker: object) -> None:
    """Raise :class:`~iotpipe.errors.DeliveryError` unless the broker acknowledged every publish
    and, with receipts, a receipt covered every envelope."""
    if summary.unacknowledged:
        total = summary.acknowledged + summary.unacknowledged
        raise DeliveryError(
            f"{summary.unacknowledged} of {total} publishes were not acknowledged by "
            f"{broker} within {settings.flush_timeout:g} s"
        )
    if summary.unconfirmed:
        total = summary.confirmed + summary.unconfirmed
        raise DeliveryError(
            f"{summary.unconfirmed} of {total} envelopes got no receipt from the pipeline "
            f"within {settings.flush_timeout:g} s"
        )

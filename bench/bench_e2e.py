"""End-to-end throughput and latency of the full chain at fixed offered rates, beside RabbitMQ's
MQTT plugin feeding a bare consumer, both measured in the same run.

    .venv/bin/python bench/bench_e2e.py [--duration 20] [--warmup 3] [--rates 1000,5000,max]
        [--influx] [--commit-poll-ms 2] [--window 1000] [--mosquitto-inflight 1000]
        [--profile RATES] [--no-save] [--no-plot]
        [--receipts [--receipt-rate 1000] [--overload-factor 2] [--overload-duration 60]
         [--receipt-window 256]]

Starts a private Mosquitto and a private RabbitMQ node with the MQTT plugin (the helpers of
``bench_bridge.py``: free loopback ports, deleted at the end), with ``--influx`` a private
VictoriaMetrics too (as the tests start it: ``tests/victoria.py``), then for each offered rate
runs, interleaved so machine noise hits every path alike:

(a) pipeline: a paho QoS 1 publisher -> Mosquitto -> ``iotpipe bridge`` (subprocess, default
    settings, own spool and client id) -> ``iotpipe.telemetry`` -> a fresh quorum queue ->
    ``iotpipe consume`` (subprocess, default settings: adaptive batches of at most 1000,
    ``batch_latency`` 0.2 s, prefetch 2000, ``durability = "fsync"``) into a fresh SQLite
    file. A message's latency ends when its batch is **committed**: the consumer acks it to
    RabbitMQ only after that, and a reader of the store sees it from then on (below).
(i) influx (with ``--influx``): the same, but ``iotpipe consume`` writes to VictoriaMetrics over
    the InfluxDB v2 write API (``store = "influxdb://..."``, otherwise defaults), its dedupe
    state in a fresh SQLite state file. Committed = the state file's transaction recording the
    batch's ids, which the consumer opens only after the server answered 204 to the points;
    it acks after it. VictoriaMetrics answers 204 once the samples are in its memory buffers;
    they become searchable and reach its disk within about a second, which the figure does not
    include. After the round every sample is read back (``/api/v1/export`` after
    ``/internal/force_flush``; it keeps duplicates): ``server_samples`` must equal
    ``server_samples_expected`` (3 per message): nothing lost, nothing written twice.
(b) plugin: the same publisher -> RabbitMQ's MQTT listener -> ``amq.topic`` -> a fresh quorum
    queue declared like the consumer's -> a bare pika consumer in its own process (prefetch 1000,
    one multiple-ack per 250 messages or per 50 ms) that records each message's receive time.
    Latency = receive time - ``ts``: what RabbitMQ alone costs, the baseline.

Committed, measured: the consumer commits each batch in one SQLite transaction (WAL mode) that
inserts a row per message into the ``messages`` table (the store's, or the InfluxDB store's
state file), with ``stored_ms``, its wall clock taken inside the transaction before COMMIT and
its fsync. A commit watcher in a child process of the bench polls that file every
``--commit-poll-ms`` (default 2): ``PRAGMA data_version``, and only when another connection
committed, a read of the rows newer than the newest seen (via the ``stored_ms`` index). Each row
is stamped with the wall clock after the poll that first returned it: never before its COMMIT,
and late by at most the interval between the previous poll's start and this poll's end
(``commit_resolution``: p50/p99/max of those intervals; they stretch beyond the poll interval
when the machine is busy). WAL readers never block the writer. The watcher's CPU is reported
like the other processes' (``commit_watcher``): 30-80 us per poll, mostly waking up, so 2-4% of
one core at the default interval, whatever the rate.
``latency_before_commit_ms`` keeps the old figure, ``stored_ms`` - ``ts``, for comparison.

The publisher is single-threaded paho with inline ``client.loop()`` (at most ``--window``
unacknowledged). Each message is a valid wire-1.0 envelope with 3 readings from one of 10 devices;
its ``ts`` is the wall clock (``time.time()``, ms) at the moment it is published. At a fixed rate
message *i* is due at ``start + i / rate`` (monotonic deadlines: a late publisher catches up in a
burst, it never lowers the rate); ``max`` publishes as fast as the window allows (saturation).
Each round publishes ``--warmup`` + ``--duration`` seconds; statistics cover the messages published
after the warm-up, then the bench waits until every message arrived. All clocks are wall clocks
of this machine, shared by the processes.

Reported per path and rate: the publisher's achieved rate, the stored (committed; plugin:
received) rate within the measured window (at saturation: the sustained rate of the whole
chain), latency p50/p95/p99/max, how long the backlog took to drain after the last publish, and
CPU microseconds per message of each process. On a 2-core machine all processes compete for the
same cores, and at saturation the publisher alone takes most of one: the figures are for *this*
machine, not a capacity plan.

Prints one JSON object and writes it to ``bench/results/e2e.json``, with a plot of latency
against offered load, ``bench/results/e2e-latency.png`` (needs matplotlib: ``pip install -e
'.[bench]'``), unless ``--no-save`` / ``--no-plot``.

``--receipts`` adds two rounds after the rates above, through the whole receipt loop: devices
-> Mosquitto -> bridge -> RabbitMQ -> ``iotpipe consume`` (which publishes receipts to
``iotpipe.receipts`` after each commit, at most one per device per second) -> the bridge's
receipt relay -> Mosquitto (retained, QoS 1) -> the devices. The devices are the publisher above
made to behave as edge agents with ``receipts = "on"``: readings are generated at the offered
rate into a per-device outbox (their ``ts`` is that moment); a device publishes from its outbox
only while fewer than ``--receipt-window`` of its envelopes are unconfirmed, keeps each published
envelope until a receipt on ``iotpipe/v1/bench/{device}/receipt`` covers its (boot, seq), and
resends what no receipt covered within clamp(4 x p99 receipt latency, 5 s, 300 s).

(c) latency: ``--receipt-rate`` msg/s for ``--warmup`` + ``--duration`` s. Receipt latency =
    the device's first publish of an envelope -> the receipt covering it received by the device
    (p50/p95/p99/max over the envelopes generated after the warm-up); beside it the store
    latency (to committed, and before commit), comparable with the pipeline round at the same
    rate (devices ignoring receipts).
(d) overload: ``--overload-factor`` x the sustained rate of this run (the pipeline's ``max``
    round, run first if ``max`` is not among ``--rates``) for ``--overload-duration`` s. Reported:
    envelopes lost (generated but not in the store; every one must be), stored twice (rows with
    the same device, boot and seq), how many readings the window held back (entered an outbox
    while their device's window was full or others already waited), the peak backlog, and the
    drain: seconds from the end of the offered load until the outboxes are empty, the last
    envelope is stored, and the last one is receipted.

``--profile 1000,5000`` adds, after everything else, one pipeline round per rate with the
consumer under ``py-spy record --idle`` (wall clock, waits included), and writes
``bench/results/e2e-consumer-profile-<rate>.txt``: the consumer's CPU per message by thread, and
where its consuming thread spends the wall clock (waiting for deliveries, decoding, writing,
committing, publishing receipts). Those rounds are slowed by the sampling: their figures go to
``profiled_rounds`` in the JSON, never into the results table.

With ``--receipts`` the JSON goes to ``bench/results/e2e-receipts.json`` (the plot, of the rates
rounds, to ``e2e-receipts-latency.png``), so the plain run's figures stay as they were.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.parse
import urllib.request
import uuid
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pika  # type: ignore[import-untyped]
from paho.mqtt.enums import CallbackAPIVersion

# bench_bridge (its helpers) and tests/ (PrivateRabbit) are not installed packages.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_bridge import (
    ROOT,
    BridgeProcess,
    PrivateMosquitto,
    cpu_seconds,
    frame_name,
    group_pids,
    thread_cpu,
)
from benchlib import py_spy

from iotpipe.amqp import declare_topology
from iotpipe.amqp_consumer import QueueSpec
from iotpipe.envelope import Envelope, decode
from iotpipe.receipts import decode_receipt
from tests.rabbitmq import PrivateRabbit
from tests.victoria import Victoria

RESULTS = ROOT / "bench" / "results" / "e2e.json"
PLOT = ROOT / "bench" / "results" / "e2e-latency.png"
RECEIPTS_RESULTS = ROOT / "bench" / "results" / "e2e-receipts.json"
RECEIPTS_PLOT = ROOT / "bench" / "results" / "e2e-receipts-latency.png"
PROFILE = ROOT / "bench" / "results" / "e2e-consumer-profile"
DEVICES = 10
READINGS = 3
PUMP_EVERY = 32
ACK_EVERY = 250
ACK_INTERVAL_S = 0.05
BINDING = "iotpipe.v1.#"
ID_DIGITS = 8  # ids are <4-character round tag><index, 8 digits>
ID_SLICE = slice(17, 29)  # the id in every body: after '{"v":"1.0","id":"'
PATHS = ("pipeline", "influx", "plugin")
COMMIT_POLL_MS = 2.0  # the commit watcher's poll interval: the resolution of committed latency
IOTPIPE = str(Path(sys.executable).parent / "iotpipe")

BODY = (
    '{{"v":"1.0","id":"{id}","site":"bench","device":"{device}","seq":{seq},"boot":"{boot}",'
    '"ts":"{ts}","readings":[{{"sensor":"temperature","value":{t:.2f},"unit":"Cel"}},'
    '{{"sensor":"humidity","value":{h:.1f},"unit":"%RH"}},'
    '{{"sensor":"pressure","value":{p:.1f},"unit":"hPa"}}]}}'
)


class BenchError(Exception):
    """Something the benchmark cannot measure around: one line for the user, exit 1."""


# -- messages -----------------------------------------------------------------------------------


class Envelopes:
    """Builds the envelopes of one round at publish time: ids ``<tag><i:08d>``, ``ts`` = now."""

    def __init__(self, tag: str) -> None:
        assert len(tag) == 4, tag
        self.tag = tag
        self.boot = f"b-{tag}"
        self._second = -1
        self._prefix = ""

    def make(self, i: int, ts_ms: int) -> tuple[str, bytes]:
        second = ts_ms // 1000
        if second != self._second:  # strftime once per second, not per message
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        device = f"dev-{i % DEVICES:02d}"
        body = BODY.format(
            id=f"{self.tag}{i:0{ID_DIGITS}d}",
            device=device,
            seq=i // DEVICES,
            boot=self.boot,
            ts=f"{self._prefix}.{ts_ms % 1000:03d}Z",
            t=20 + i % 500 / 100,
            h=40 + i % 300 / 10,
            p=1000 + i % 400 / 10,
        )
        return f"iotpipe/v1/bench/{device}/telemetry", body.encode()

    def check(self) -> None:
        """Fail early if the bridge would dead-letter these (so the bench measures the real path)."""
        now = int(time.time() * 1000)
        for i in (0, 7, 10**ID_DIGITS - 1):
            topic, body = self.make(i, now)
            decoded = decode(topic, body)
            if not isinstance(decoded, Envelope):
                raise BenchError(f"bench message breaks the wire contract: {decoded}")
            if body[ID_SLICE].decode() != decoded.id or decoded.timestamp_ms != now:
                raise BenchError("ID_SLICE does not cut out the id, or ts does not round-trip")


def index_of(message_id: str | bytes) -> int:
    """The publish index inside an id ``<tag><i:08d>``."""
    return int(message_id[-ID_DIGITS:])


# -- the publisher ------------------------------------------------------------------------------


@dataclass
class Published:
    """What the publisher did in one round."""

    ts_ms: array[int]  # envelope ts of message i (wall clock at publish, ms)
    measured_from: int  # index of the first message after the warm-up
    window: tuple[float, float]  # wall-clock seconds of the measured window
    cpu_s: float

    @property
    def count(self) -> int:
        return len(self.ts_ms)

    @property
    def measured(self) -> int:
        return self.count - self.measured_from

    @property
    def seconds(self) -> float:
        return self.window[1] - self.window[0]


def publish(
    port: int, envelopes: Envelopes, rate: float | None, warmup: float, duration: float, window: int
) -> Published:
    """Publish at ``rate`` msg/s (None: as fast as ``window`` allows) for warmup + duration s."""
    acked = 0
    connected = False

    def on_connect(*_args: object) -> None:
        nonlocal connected
        connected = True

    def on_publish(*_args: object) -> None:
        nonlocal acked
        acked += 1

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-pub-{uuid.uuid4().hex[:10]}",
        protocol=paho.MQTTv311,
    )
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    while not connected:
        client.loop(0.05)
    ts_ms: array[int] = array("q")
    interval = 1.0 / rate if rate else 0.0
    cpu = time.process_time()
    start = time.monotonic()
    warm_end, end = start + warmup, start + warmup + duration
    measured_from, window_start = -1, 0.0
    i = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if measured_from < 0 and now >= warm_end:
            measured_from, window_start = i, time.time()
        if i - acked >= window:
            client.loop(0.01)
            continue
        if rate:
            due = start + i * interval
            if now < due:
                # Returns early when a PUBACK arrives; at most 2 ms late for the next deadline.
                client.loop(min(due - now, 0.002))
                continue
        sent_ms = int(time.time() * 1000)
        topic, body = envelopes.make(i, sent_ms)
        info = client.publish(topic, body, qos=1)  # written to the socket at once (no thread)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise BenchError(f"publish refused: {info.rc}")
        ts_ms.append(sent_ms)
        i += 1
        if i % PUMP_EVERY == 0:
            client.loop(0)
    window_end = time.time()
    while acked < i:
        client.loop(0.01)
    cpu = time.process_time() - cpu
    client.disconnect()
    client.loop(0.1)
    if measured_from < 0:
        raise BenchError("nothing was published after the warm-up")
    return Published(ts_ms, measured_from, (window_start, window_end), cpu)


def forget_session(port: int, client_id: str) -> None:
    """Drop the persistent session a finished bridge left in Mosquitto (else it queues copies of
    every later round's messages for nobody)."""
    done = False

    def on_connect(*_args: object) -> None:
        nonlocal done
        done = True

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=True,
        protocol=paho.MQTTv311,
    )
    client.on_connect = on_connect
    client.connect("127.0.0.1", port)
    deadline = time.monotonic() + 10
    while not done and time.monotonic() < deadline:
        client.loop(0.05)
    client.disconnect()
    client.loop(0.05)


# -- devices that speak receipts --------------------------------------------------------------


@dataclass
class Devices:
    """What the receipt-speaking devices did in one round (arrays indexed by envelope)."""

    ts_ms: array[int]  # envelope ts: when the reading was taken (entered the device's outbox)
    published_ms: array[int]  # first publish (wall clock, ms)
    receipted_ms: array[int]  # receipt covering it arrived (0: never)
    measured_from: int  # index of the first envelope generated after the warm-up
    load_end: float  # wall clock: the offered load stopped
    outbox_drained: float  # wall clock: the last waiting envelope was published
    all_receipted: float  # wall clock: the last envelope was receipted (0: never)
    held: int  # envelopes that waited in the outbox because their device's window was full
    peak_outbox: int
    peak_unconfirmed: int
    resends: int
    receipts: int
    cpu_s: float

    @property
    def count(self) -> int:
        return len(self.ts_ms)


def run_devices(
    port: int,
    envelopes: Envelopes,
    rate: float,
    warmup: float,
    duration: float,
    mqtt_window: int,
    receipt_window: int,
    drain_timeout: float,
) -> Devices:
    """Generate envelopes at ``rate``/s for warmup + duration s, as ``DEVICES`` devices with
    receipts on: each keeps what it published until a receipt covers it, publishes nothing new
    while ``receipt_window`` envelopes are unconfirmed (new ones wait in its outbox), and resends
    what no receipt covered within clamp(4 x p99 receipt latency, 5 s, 300 s). Returns once
    every envelope is receipted, or after ``drain_timeout`` s of drain."""
    acked = sent = 0
    connected = subscribed = False
    outbox: list[deque[int]] = [deque() for _ in range(DEVICES)]
    unconfirmed: list[dict[int, int]] = [{} for _ in range(DEVICES)]  # seq -> index
    last_sent: dict[int, float] = {}  # index -> monotonic of its last publish
    bodies: dict[int, tuple[str, bytes]] = {}  # index -> (topic, body) until receipted
    ts_ms: array[int] = array("q")
    published_ms: array[int] = array("q")
    receipted_ms: array[int] = array("q")
    latencies: deque[float] = deque(maxlen=256)
    counts = {"held": 0, "resends": 0, "receipts": 0, "peak_outbox": 0, "peak_unconfirmed": 0}
    waiting = in_doubt = 0  # envelopes in all outboxes; unconfirmed in all devices

    def on_connect(*_args: object) -> None:
        nonlocal connected
        connected = True

    def on_subscribe(*_args: object) -> None:
        nonlocal subscribed
        subscribed = True

    def on_publish(*_args: object) -> None:
        nonlocal acked
        acked += 1

    def on_message(_client: object, _userdata: object, message: paho.MQTTMessage) -> None:
        nonlocal in_doubt
        receipt = decode_receipt(bytes(message.payload))
        if isinstance(receipt, str) or receipt.site != "bench":
            return
        device = int(receipt.device.rsplit("-", 1)[1])
        pending = unconfirmed[device]
        now_ms = int(time.time() * 1000)
        now = time.monotonic()
        counts["receipts"] += 1
        for entry in receipt.stored:
            if entry.boot != envelopes.boot or not pending:
                continue
            covered = [seq for seq in pending if entry.covers(seq)]
            for seq in covered:
                index = pending.pop(seq)
                receipted_ms[index] = now_ms
                latencies.append(now - last_sent.pop(index))
                del bodies[index]
            in_doubt -= len(covered)

    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-devices-{uuid.uuid4().hex[:10]}",
        protocol=paho.MQTTv311,
    )
    client.max_inflight_messages_set(mqtt_window)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_publish = on_publish
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    while not connected:
        client.loop(0.05)
    client.subscribe("iotpipe/v1/bench/+/receipt", qos=1)
    while not subscribed:
        client.loop(0.05)

    def send(index: int, topic: str, body: bytes) -> None:
        nonlocal sent
        info = client.publish(topic, body, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise BenchError(f"publish refused: {info.rc}")
        sent += 1
        last_sent[index] = time.monotonic()
        if sent % PUMP_EVERY == 0:
            client.loop(0)

    interval = 1.0 / rate
    total = round(rate * (warmup + duration))  # readings offered in the round
    cpu = time.process_time()
    start = time.monotonic()
    warm_end, end = start + warmup, start + warmup + duration
    measured_from = -1
    generated = 0
    next_resend_check = start + 1.0
    load_end = outbox_drained = all_receipted = 0.0
    deadline = end + drain_timeout
    while True:
        now = time.monotonic()
        if generated < total:  # the readings due by now enter their device's outbox
            while generated < total and start + generated * interval <= now:
                if measured_from < 0 and now >= warm_end:
                    measured_from = generated
                device = generated % DEVICES
                if outbox[device] or len(unconfirmed[device]) >= receipt_window:
                    counts["held"] += 1
                outbox[device].append(generated)
                ts = int(time.time() * 1000)
                ts_ms.append(ts)
                published_ms.append(0)
                receipted_ms.append(0)
                bodies[generated] = envelopes.make(generated, ts)
                generated += 1
                waiting += 1
            counts["peak_outbox"] = max(counts["peak_outbox"], waiting)
            if generated == total:
                load_end = time.time()
        # Publish what the windows allow, devices taking turns.
        progress = True
        while waiting and progress and sent - acked < mqtt_window:
            progress = False
            for device in range(DEVICES):
                queue = outbox[device]
                if queue and len(unconfirmed[device]) < receipt_window:
                    index = queue.popleft()
                    waiting -= 1
                    in_doubt += 1
                    unconfirmed[device][index // DEVICES] = index
                    published_ms[index] = int(time.time() * 1000)
                    send(index, *bodies[index])
                    progress = True
        counts["peak_unconfirmed"] = max(counts["peak_unconfirmed"], in_doubt)
        if load_end and not waiting and not outbox_drained:
            outbox_drained = time.time()
        if now >= next_resend_check:  # resend what no receipt covered in time, oldest first
            next_resend_check = now + 0.25
            p99 = sorted(latencies)[int(0.99 * (len(latencies) - 1))] if latencies else 0.0
            timeout = min(300.0, max(5.0, 4 * p99))
            for pending in unconfirmed:
                for index in list(pending.values()):
                    if now - last_sent[index] > timeout and sent - acked < mqtt_window:
                        send(index, *bodies[index])
                        counts["resends"] += 1
        if load_end and not waiting and not in_doubt:
            all_receipted = time.time()
            break
        if now > deadline:
            break
        next_due = start + generated * interval if generated < total else now + 0.01
        client.loop(max(0.0, min(next_due - time.monotonic(), 0.002)))
    cpu = time.process_time() - cpu
    while acked < sent and time.monotonic() < deadline:
        client.loop(0.01)
    client.disconnect()
    client.loop(0.1)
    if measured_from < 0:
        raise BenchError("nothing was generated after the warm-up")
    return Devices(
        ts_ms=ts_ms,
        published_ms=published_ms,
        receipted_ms=receipted_ms,
        measured_from=measured_from,
        load_end=load_end,
        outbox_drained=outbox_drained or load_end,
        all_receipted=all_receipted,
        held=counts["held"],
        peak_outbox=counts["peak_outbox"],
        peak_unconfirmed=counts["peak_unconfirmed"],
        resends=counts["resends"],
        receipts=counts["receipts"],
        cpu_s=cpu,
    )


# -- the pipeline's consumer ------------------------------------------------------------------


class ConsumerProcess:
    """``iotpipe consume`` as a subprocess on its own queue, into a fresh SQLite file, or with
    ``influx_url`` into that InfluxDB v2 write API with a fresh state file.

    Either way :attr:`db` is the SQLite file whose ``messages`` table gets a row per message
    stored, in the transaction that commits it (the SQLite store: with its readings; the
    InfluxDB store: after the server accepted the points).
    """

    def __init__(
        self, amqp_url: str, queue: str, workdir: Path, influx_url: str | None = None
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "consumer.log"
        self.config = workdir / "consume.toml"
        if influx_url is None:
            self.db = workdir / "telemetry.db"
            store = f'store = "sqlite:///{self.db}"\n'
        else:
            self.db = workdir / "state.db"
            host = influx_url.removeprefix("http://")
            store = f'store = "influxdb://{host}"\nstate_path = "{self.db}"\n'
        self.config.write_text(
            f'[amqp]\nurl = "{amqp_url}"\n'
            f'[consume]\n{store}queue = "{queue}"\nhttp_port = 0\n'
            + ('[influxdb]\ntoken = "bench"\n' if influx_url else "")
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IOTPIPE_")}
        self.proc: subprocess.Popen[bytes] | None = None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])

    def __enter__(self) -> ConsumerProcess:
        argv = [IOTPIPE, "--log-level", "info", "consume", "--config", str(self.config)]
        with self.log.open("wb") as out:
            # Own session: a Ctrl-C of the bench does not reach it; __exit__ stops it.
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + 60
        while b"consuming queue=" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(
                    f"consumer did not start (exit {self.proc.poll()}):\n{self.tail()}"
                )
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if code != 0:
            print(f"consumer exited {code}:\n{self.tail()}", file=sys.stderr)

    def stored(self) -> int:
        """Rows in the store's ``messages`` table (0 before it exists)."""
        if not self.db.exists():
            return 0
        try:
            with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as c:
                return int(c.execute("SELECT count(*) FROM messages").fetchone()[0])
        except sqlite3.OperationalError:
            return 0  # schema not created yet, or busy for a moment

    def stored_ms(self, count: int) -> array[int]:
        """``stored_ms`` of message 0 .. count-1, from the store."""
        out: array[int] = array("q", bytes(8 * count))
        with contextlib.closing(sqlite3.connect(f"file:{self.db}?mode=ro", uri=True)) as c:
            for message_id, stored_ms in c.execute("SELECT id, stored_ms FROM messages"):
                out[index_of(message_id)] = stored_ms
        return out


# -- the baseline's bare consumer -----------------------------------------------------------------


def bare_consume(url: str, queue: str, pipe: Connection) -> None:
    """Child process: record the receive time of each message of ``queue`` until told how many.

    Sends ``("ready",)`` once consuming; then waits for ``("expect", n)`` and, once n distinct
    messages arrived, sends ``("done", received_ms as bytes of array('q'), deliveries, cpu_s)``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends this process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    received: dict[int, int] = {}
    deliveries = unacked = 0
    last_tag = 0
    expected = -1
    connection: Any = None

    def on_message(channel: Any, method: Any, _props: Any, body: bytes) -> None:
        nonlocal deliveries, unacked, last_tag
        index = int(body[ID_SLICE][-ID_DIGITS:])
        if index not in received:
            received[index] = int(time.time() * 1000)
        deliveries += 1
        unacked += 1
        last_tag = method.delivery_tag
        if unacked >= ACK_EVERY:
            channel.basic_ack(last_tag, multiple=True)
            unacked = 0

    def tick(channel: Any) -> None:
        nonlocal unacked, expected
        if unacked:
            channel.basic_ack(last_tag, multiple=True)
            unacked = 0
        if expected < 0 and pipe.poll():
            expected = pipe.recv()[1]
        if 0 <= expected <= len(received):
            connection.close()
            return
        connection.ioloop.call_later(ACK_INTERVAL_S, lambda: tick(channel))

    def on_channel(channel: Any) -> None:
        def consuming(_frame: object) -> None:
            pipe.send(("ready",))
            tick(channel)

        def go(_frame: object) -> None:
            channel.basic_consume(queue, on_message, callback=consuming)

        channel.basic_qos(prefetch_count=1000, callback=go)

    connection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, _e: c.ioloop.stop(),
    )
    began = time.process_time()
    connection.ioloop.start()
    out: array[int] = array("q", bytes(8 * max(expected, 0)))
    for index, ms in received.items():
        if index < len(out):
            out[index] = ms
    pipe.send(("done", out.tobytes(), deliveries, time.process_time() - began))


# -- when rows become committed --------------------------------------------------------------------


def watch_commits(db: str, poll_s: float, pipe: Connection) -> None:
    """Child process: stamp each row of ``db``'s ``messages`` table with the wall clock (ms) of
    the first poll that sees it committed, until told to stop.

    A poll is ``PRAGMA data_version`` (it changes when another connection commits) and, only
    when it changed, one read transaction selecting the rows whose ``stored_ms`` is newer than
    the newest seen (or equal to it, when more rows share that millisecond than were seen); the
    index on ``stored_ms`` makes that cost the new rows only. In WAL mode readers never block
    the consumer's writes. A row is stamped with the time *after* the poll that first returned
    it, so a stamp is never earlier than the COMMIT; the commit happened after the start of the
    previous poll, so the stamp is late by at most the gap between the two (``windows_ms``).

    Sends ``("ready",)`` after the first poll; on ``("stop",)`` polls once more, checks that
    every committed row was stamped (a row whose ``stored_ms`` is older than one already seen,
    i.e. the wall clock stepped back, would be missed) and sends ``("done", committed_ms by
    index as bytes of array('q'), unobserved, polls, windows_ms as bytes of array('d'))``:
    ``windows_ms`` holds, for each poll that found rows, the interval in which those rows were
    committed (this poll's stamp - the previous poll's start).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends this process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Normal priority, like every process of the chain. Raised (nice -5) it seemed to delay the
    # consumer's own commits: stored_ms p99 16-23 ms at 1,000 msg/s over four runs, 10-18 at
    # normal priority, on a shared machine. A poll the scheduler delays shows in the windows.
    committed: dict[int, int] = {}
    windows: array[float] = array("d")
    newest = at_newest = polls = 0
    version = -1
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)

    def poll() -> float:
        """Stamp what is newly committed; return the stamp (wall clock, s), or 0 if none."""
        nonlocal newest, at_newest, version
        now = conn.execute("PRAGMA data_version").fetchone()[0]
        if now == version:  # nothing committed since the last poll: the usual, cheap case
            return 0.0
        version = now
        conn.execute("BEGIN")  # one snapshot for the queries below
        try:
            rows = conn.execute(
                "SELECT id, stored_ms FROM messages WHERE stored_ms > ?", (newest,)
            ).fetchall()
            # A later COMMIT rarely shares the newest millisecond; count before fetching it.
            same = conn.execute(
                "SELECT count(*) FROM messages WHERE stored_ms = ?", (newest,)
            ).fetchone()[0]
            if same != at_newest:
                rows += conn.execute(
                    "SELECT id, stored_ms FROM messages WHERE stored_ms = ?", (newest,)
                ).fetchall()
                at_newest = same
        finally:
            conn.execute("COMMIT")
        seen = time.time()
        seen_ms = int(seen * 1000)
        found = 0
        for message_id, _stored_ms in rows:
            index = index_of(message_id)
            if index not in committed:
                committed[index] = seen_ms
                found += 1
        top = max((stored_ms for _, stored_ms in rows), default=newest)
        if top > newest:
            newest = top
            at_newest = sum(1 for _, stored_ms in rows if stored_ms == top)
        return seen if found else 0.0

    previous = time.time()
    poll()
    pipe.send(("ready",))
    tick = time.monotonic()
    while polls % 16 or not pipe.poll():  # the pipe is looked at every 16 polls
        tick = max(tick + poll_s, time.monotonic())  # steady ticks; none made up after a stall
        time.sleep(max(0.0, tick - time.monotonic()))
        started = time.time()
        polls += 1
        if seen := poll():
            windows.append((seen - previous) * 1000)
        previous = started
    pipe.recv()
    poll()
    everything = {index_of(row[0]) for row in conn.execute("SELECT id FROM messages")}
    conn.close()
    unobserved = len(everything - committed.keys())
    out: array[int] = array("q", bytes(8 * (max(committed, default=-1) + 1)))
    for index, ms in committed.items():
        out[index] = ms
    pipe.send(("done", out.tobytes(), unobserved, polls, windows.tobytes()))


@dataclass
class Commits:
    """What :func:`watch_commits` saw in one round."""

    committed_ms: array[int]  # by message index; 0: never seen
    polls: int
    windows_ms: list[float]  # per poll that found rows: the interval their COMMIT fell in

    def resolution(self, poll_ms: float) -> dict[str, float]:
        """How late a committed stamp can be: the poll interval asked for, and the measured
        intervals the COMMITs fell in (a stamp is late by at most its interval)."""
        ordered = sorted(self.windows_ms)
        return {
            "poll_interval_ms": poll_ms,
            "window_ms_p50": round(percentile(ordered, 50), 2) if ordered else 0.0,
            "window_ms_p99": round(percentile(ordered, 99), 2) if ordered else 0.0,
            "window_ms_max": round(ordered[-1], 2) if ordered else 0.0,
            "polls": self.polls,
        }


class CommitWatcher:
    """:func:`watch_commits` on ``db`` in a child process, from ``with`` until :meth:`finish`.

    Attributes:
        pid: the child's process id, to account its CPU like the other processes'.
    """

    def __init__(self, db: Path, poll_ms: float) -> None:
        context = multiprocessing.get_context("fork")
        self._pipe, child = context.Pipe()
        self._process = context.Process(
            target=watch_commits, args=(str(db), poll_ms / 1000, child), name="bench-commit-watcher"
        )
        self.db = db
        self.pid = 0
        self._finished = False

    def __enter__(self) -> CommitWatcher:
        self._process.start()
        self.pid = self._process.pid or 0
        if not self._pipe.poll(30) or self._pipe.recv() != ("ready",):
            self.__exit__()
            raise BenchError(f"the commit watcher did not start on {self.db}")
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.join(10 if self._finished else 0.1)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(10)

    def finish(self, count: int) -> Commits:
        """Stop watching; what was seen of messages 0 .. count-1."""
        self._finished = True
        self._pipe.send(("stop",))
        if not self._pipe.poll(60):
            raise BenchError("the commit watcher did not answer")
        _, raw, unobserved, polls, raw_windows = self._pipe.recv()
        if unobserved:
            raise BenchError(
                f"the commit watcher missed {unobserved} committed rows (did the wall clock "
                "step back?)"
            )
        committed: array[int] = array("q")
        committed.frombytes(raw)
        committed.extend([0] * max(0, count - len(committed)))
        windows: array[float] = array("d")
        windows.frombytes(raw_windows)
        return Commits(committed[:count], polls, list(windows))


# -- one round ------------------------------------------------------------------------------------


@dataclass
class Round:
    """One measured round of one path at one offered rate."""

    offered: float | None
    published_msg_s: float
    stored_msg_s: float  # arrivals within the measured window / its length
    latency_ms: dict[str, float]
    measured: int
    total: int
    drain_s: float  # last publish -> last arrival
    cpu_us: dict[str, float] = field(default_factory=dict)
    latencies: list[int] = field(default_factory=list, repr=False)
    # Stores only: latency to the consumer's stored_ms, taken inside the transaction before its
    # COMMIT (what latency_ms was before it ended at the COMMIT), and how late a committed
    # stamp can be.
    before_commit_ms: dict[str, float] | None = None
    commit_resolution: dict[str, float] | None = None
    checks: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out = {
            "published_msg_s": round(self.published_msg_s),
            "stored_msg_s": round(self.stored_msg_s),
            "latency_ms": self.latency_ms,
            "messages_measured": self.measured,
            "messages_total": self.total,
            "drain_s": round(self.drain_s, 2),
            "cpu_us_per_msg": self.cpu_us,
        }
        if self.before_commit_ms is not None:
            out["latency_before_commit_ms"] = self.before_commit_ms
        if self.commit_resolution is not None:
            out["commit_resolution"] = self.commit_resolution
        return out | self.checks


def percentile(ordered: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return float(ordered[rank - 1])


def latency_stats(sent: Published, arrived_ms: array[int]) -> tuple[dict[str, float], list[int]]:
    """Percentiles of arrival - ts over the measured messages, and the sorted latencies."""
    lat = sorted(arrived_ms[i] - sent.ts_ms[i] for i in range(sent.measured_from, sent.count))
    stats = {
        "p50": percentile(lat, 50),
        "p95": percentile(lat, 95),
        "p99": percentile(lat, 99),
        "max": float(lat[-1]),
        "mean": round(sum(lat) / len(lat), 1),
    }
    return stats, lat


def evaluate(
    offered: float | None, sent: Published, arrived_ms: array[int], cpu_s: dict[str, float]
) -> Round:
    """Latency and rates of one round from publish and arrival times (ms), index by index."""
    missing = sum(1 for ms in arrived_ms if ms == 0)
    if missing:
        raise BenchError(f"{missing} of {sent.count} messages never arrived")
    stats, lat = latency_stats(sent, arrived_ms)
    lo, hi = sent.window[0] * 1000, sent.window[1] * 1000
    in_window = sum(1 for ms in arrived_ms if lo <= ms < hi)
    return Round(
        offered=offered,
        published_msg_s=sent.measured / sent.seconds,
        stored_msg_s=in_window / sent.seconds,
        latency_ms=stats,
        measured=sent.measured,
        total=sent.count,
        drain_s=max(0.0, max(arrived_ms) / 1000 - sent.window[1]),
        cpu_us={k: round(v / sent.count * 1e6, 1) for k, v in cpu_s.items()},
        latencies=lat,
    )


def stats(values: list[int]) -> dict[str, float]:
    """p50/p95/p99/max of ``values`` (sorted in place); {} if empty."""
    values.sort()
    if not values:
        return {}
    return {
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": float(values[-1]),
    }


def check_commit_stamps(committed_ms: array[int], stored_ms: array[int]) -> None:
    """A message is seen committed no earlier than the ``stored_ms`` its transaction took."""
    early = sum(1 for c, s in zip(committed_ms, stored_ms, strict=True) if c and c < s)
    if early:
        raise BenchError(f"{early} messages were seen committed before their stored_ms")


def victoria_samples(url: str, ts_ms: array[int]) -> dict[str, Any]:
    """How many samples VictoriaMetrics holds for a round's readings (raw, via
    ``/api/v1/export`` after ``/internal/force_flush``): READINGS per message if nothing was
    lost and nothing written twice (it keeps duplicate samples)."""
    with urllib.request.urlopen(f"{url}/internal/force_flush", timeout=30) as response:
        response.read()
    query = urllib.parse.urlencode(
        {
            "match[]": '{__name__=~"telemetry_.*",site="bench"}',
            # Rounds are seconds apart: the margin takes in no other round's readings.
            "start": f"{min(ts_ms) / 1000 - 1:.3f}",
            "end": f"{max(ts_ms) / 1000 + 1:.3f}",
        }
    )
    samples = 0
    with urllib.request.urlopen(f"{url}/api/v1/export?{query}", timeout=120) as response:
        for line in response:
            if line.strip():
                samples += len(json.loads(line)["timestamps"])
    expected = READINGS * len(ts_ms)
    if samples != expected:
        print(f"VictoriaMetrics holds {samples} samples, expected {expected}", file=sys.stderr)
    return {"server_samples": samples, "server_samples_expected": expected}


def evaluate_devices(
    offered: float,
    done: Devices,
    arrived_ms: array[int],
    store: tuple[int, int],
    cpu_s: dict[str, float],
) -> dict[str, Any]:
    """One receipts round as a JSON-ready summary: latencies over the envelopes generated after
    the warm-up, loss and duplicates over all of them, drain times after the load stopped."""

    measured = range(done.measured_from, done.count)
    rows, distinct = store
    started = done.ts_ms[0] / 1000
    in_load = sum(1 for ms in arrived_ms if 0 < ms <= done.load_end * 1000)
    last_stored = max(arrived_ms) / 1000
    return {
        "offered_msg_s": round(offered),
        "generated": done.count,
        "generated_msg_s": round((done.count - 1) / (done.ts_ms[-1] / 1000 - started)),
        "seconds_offered": round(done.load_end - started, 1),
        "stored_msg_s_while_offered": round(in_load / (done.load_end - started)),
        "stored_rows": rows,
        "lost": sum(1 for ms in arrived_ms if ms == 0),
        "stored_twice": rows - distinct,
        "unreceipted_at_end": sum(1 for ms in done.receipted_ms if ms == 0),
        "receipt_latency_ms": stats(
            [done.receipted_ms[i] - done.published_ms[i] for i in measured if done.receipted_ms[i]]
        ),
        "reading_to_receipt_ms": stats(
            [done.receipted_ms[i] - done.ts_ms[i] for i in measured if done.receipted_ms[i]]
        ),
        "store_latency_ms": stats(
            [arrived_ms[i] - done.ts_ms[i] for i in measured if arrived_ms[i]]
        ),
        "held_by_window": done.held,
        "peak_outbox": done.peak_outbox,
        "peak_unconfirmed": done.peak_unconfirmed,
        "resends": done.resends,
        "receipts_received": done.receipts,
        "drain_after_load_s": {
            "outbox_empty": round(done.outbox_drained - done.load_end, 2),
            "all_stored": round(max(0.0, last_stored - done.load_end), 2),
            "all_receipted": (
                round(done.all_receipted - done.load_end, 2) if done.all_receipted else None
            ),
        },
        "cpu_us_per_msg": {k: round(v / done.count * 1e6, 1) for k, v in cpu_s.items()},
    }


@dataclass
class Rig:
    """The running brokers and what each round needs."""

    mosquitto: PrivateMosquitto
    rabbit: PrivateRabbit
    workdir: Path
    warmup: float
    duration: float
    window: int
    commit_poll_ms: float = COMMIT_POLL_MS
    victoria: Victoria | None = None
    rounds_run: int = 0
    consumer_threads_cpu: dict[int, float] = field(default_factory=dict)

    @property
    def drain_timeout(self) -> float:
        return max(120.0, 20 * self.duration)

    def fresh(self, path: str) -> tuple[Envelopes, str, Path]:
        """A round tag's envelopes, a unique queue name and an empty directory for one round."""
        self.rounds_run += 1
        tag = f"{path[:2]}{self.rounds_run:02d}"
        envelopes = Envelopes(tag)
        envelopes.check()
        directory = self.workdir / tag
        directory.mkdir()
        return envelopes, f"bench.e2e.{tag}", directory

    def accounts(self) -> list[tuple[str, list[int]]]:
        assert self.mosquitto.proc is not None
        assert self.rabbit.proc is not None
        return [
            ("mosquitto", [self.mosquitto.proc.pid]),
            ("rabbitmq", group_pids(self.rabbit.proc.pid)),
        ]

    def delete_queue(self, queue: str) -> None:
        with (
            contextlib.suppress(pika.exceptions.AMQPError, OSError),  # cleanup only
            pika.BlockingConnection(pika.URLParameters(self.rabbit.url)) as admin,
        ):
            admin.channel().queue_delete(queue)

    @contextlib.contextmanager
    def chain(
        self, queue: str, directory: Path, influx: bool = False
    ) -> Iterator[tuple[ConsumerProcess, BridgeProcess, list[tuple[str, list[int]]]]]:
        """The consumer on ``queue`` (into VictoriaMetrics if ``influx``, else SQLite) and a
        bridge, running; yields them and the processes to account CPU for. Afterwards the
        bridge's Mosquitto session and the queue are gone."""
        client_id = ""
        url = None
        servers: list[tuple[str, list[int]]] = []
        if influx:
            assert self.victoria is not None
            assert self.victoria.proc is not None
            url = self.victoria.url
            servers = [("victoria-metrics", [self.victoria.proc.pid])]
        try:
            with ConsumerProcess(self.rabbit.url, queue, directory / "consumer", url) as consumer:
                bridge = BridgeProcess(self.mosquitto.port, self.rabbit.url, directory / "bridge")
                config = tomllib.loads((bridge.workdir / "bridge.toml").read_text())
                client_id = config["bridge"]["client_id"]
                with bridge:
                    assert bridge.proc is not None
                    assert consumer.proc is not None
                    accounts = [
                        *self.accounts(),
                        ("bridge", [bridge.proc.pid]),
                        ("consumer", [consumer.proc.pid]),
                        *servers,
                    ]
                    yield consumer, bridge, accounts
        finally:
            if client_id:
                with contextlib.suppress(OSError):
                    forget_session(self.mosquitto.port, client_id)
            self.delete_queue(queue)

    def pipeline(
        self, rate: float | None, profile: Path | None = None, influx: bool = False
    ) -> Round:
        """Publisher -> Mosquitto -> bridge -> RabbitMQ -> iotpipe consume -> SQLite, or with
        ``influx`` -> VictoriaMetrics (InfluxDB v2 write API).

        Latency ends when the message's row is committed (:func:`watch_commits`); the
        ``stored_ms``-based figure goes beside it. With ``profile``, the consumer runs under
        ``py-spy record --idle`` (wall clock, waits included), written there as speedscope JSON;
        :attr:`consumer_threads_cpu` then holds the CPU seconds of each of its threads.
        """
        envelopes, queue, directory = self.fresh("influx" if influx else "pipeline")
        with self.chain(queue, directory, influx) as (consumer, bridge, chain_accounts):
            assert bridge.proc is not None
            assert consumer.proc is not None
            with contextlib.ExitStack() as stack:
                if profile is not None:
                    profile.parent.mkdir(parents=True, exist_ok=True)
                    # --idle: the consuming thread's waits are part of the story.
                    stack.enter_context(py_spy(consumer.proc.pid, profile, "--idle"))
                watcher = stack.enter_context(CommitWatcher(consumer.db, self.commit_poll_ms))
                accounts = [*chain_accounts, ("commit_watcher", [watcher.pid])]
                threads_before = thread_cpu(consumer.proc.pid)
                before = {name: cpu_seconds(pids) for name, pids in accounts}
                sent = publish(
                    self.mosquitto.port, envelopes, rate, self.warmup, self.duration, self.window
                )
                deadline = time.monotonic() + self.drain_timeout
                while (n := consumer.stored()) < sent.count:
                    if consumer.proc.poll() is not None or bridge.proc.poll() is not None:
                        raise BenchError(f"a process exited; stored {n}/{sent.count}")
                    if time.monotonic() > deadline:
                        raise BenchError(f"pipeline stored {n}/{sent.count}:\n{consumer.tail()}")
                    time.sleep(0.2)
                after = {name: cpu_seconds(pids) for name, pids in accounts}
                threads_after = thread_cpu(consumer.proc.pid)
                commits = watcher.finish(sent.count)
                self.consumer_threads_cpu = {
                    tid: seconds - threads_before.get(tid, 0.0)
                    for tid, seconds in threads_after.items()
                }
        stored = consumer.stored_ms(sent.count)
        check_commit_stamps(commits.committed_ms, stored)
        cpu = {"publisher": sent.cpu_s} | {k: after[k] - before[k] for k in before}
        r = evaluate(rate, sent, commits.committed_ms, cpu)
        r.before_commit_ms = latency_stats(sent, stored)[0]
        r.commit_resolution = commits.resolution(self.commit_poll_ms)
        if influx:
            assert self.victoria is not None
            r.checks = victoria_samples(self.victoria.url, sent.ts_ms)
        return r

    def devices(self, rate: float, warmup: float, duration: float, window: int) -> dict[str, Any]:
        """Receipt-speaking devices -> Mosquitto -> bridge (receipt relay on) -> RabbitMQ ->
        iotpipe consume (receipts on) -> SQLite, receipts back the same way."""
        envelopes, queue, directory = self.fresh("receipts")
        with (
            self.chain(queue, directory) as (consumer, _bridge, chain_accounts),
            CommitWatcher(consumer.db, self.commit_poll_ms) as watcher,
        ):
            accounts = [*chain_accounts, ("commit_watcher", [watcher.pid])]
            before = {name: cpu_seconds(pids) for name, pids in accounts}
            done = run_devices(
                self.mosquitto.port,
                envelopes,
                rate,
                warmup,
                duration,
                self.window,
                window,
                self.drain_timeout,
            )
            # Every receipted envelope is stored; if some never were, look anyway.
            deadline = time.monotonic() + 10
            while consumer.stored() < done.count and time.monotonic() < deadline:
                time.sleep(0.2)
            after = {name: cpu_seconds(pids) for name, pids in accounts}
            commits = watcher.finish(done.count)
        with contextlib.closing(sqlite3.connect(f"file:{consumer.db}?mode=ro", uri=True)) as conn:
            rows, distinct = conn.execute(
                "SELECT count(*), count(DISTINCT device || ':' || boot || ':' || seq) FROM messages"
            ).fetchone()
        stored = consumer.stored_ms(done.count)
        check_commit_stamps(commits.committed_ms, stored)
        cpu = {"devices": done.cpu_s} | {k: after[k] - before[k] for k in before}
        out = evaluate_devices(rate, done, commits.committed_ms, (rows, distinct), cpu)
        measured = range(done.measured_from, done.count)
        out["store_latency_before_commit_ms"] = stats(
            [stored[i] - done.ts_ms[i] for i in measured if stored[i]]
        )
        out["commit_resolution"] = commits.resolution(self.commit_poll_ms)
        return out

    def plugin(self, rate: float | None) -> Round:
        """Publisher -> RabbitMQ's MQTT plugin -> amq.topic -> a bare pika consumer."""
        envelopes, queue, _ = self.fresh("plugin")
        spec = QueueSpec(name=queue, bindings=(BINDING,))  # declared as iotpipe consume does
        with pika.BlockingConnection(pika.URLParameters(self.rabbit.url)) as admin:
            channel = admin.channel()
            channel.queue_declare(queue, durable=True, arguments=spec.arguments())
            channel.queue_bind(queue, "amq.topic", BINDING)
        context = multiprocessing.get_context("fork")
        parent, child = context.Pipe()
        process = context.Process(
            target=bare_consume, args=(self.rabbit.url, queue, child), name="bench-bare-consumer"
        )
        try:
            process.start()
            if not parent.poll(30) or parent.recv() != ("ready",):
                raise BenchError("bare consumer did not start")
            accounts = self.accounts()
            before = {name: cpu_seconds(pids) for name, pids in accounts}
            assert self.rabbit.mqtt_port is not None
            sent = publish(
                self.rabbit.mqtt_port, envelopes, rate, self.warmup, self.duration, self.window
            )
            parent.send(("expect", sent.count))
            if not parent.poll(self.drain_timeout):
                raise BenchError("bare consumer did not receive every message in time")
            _, raw, _deliveries, consumer_cpu = parent.recv()
            after = {name: cpu_seconds(pids) for name, pids in accounts}
            process.join(10)
        finally:
            if process.is_alive():
                process.terminate()
                process.join(10)
            self.delete_queue(queue)
        arrived: array[int] = array("q")
        arrived.frombytes(raw)
        cpu = {"publisher": sent.cpu_s, "consumer": consumer_cpu}
        cpu |= {k: after[k] - before[k] for k in before}
        return evaluate(rate, sent, arrived, cpu)


# -- profile --------------------------------------------------------------------------------------


def summarize_consumer_profile(
    path: Path, threads_cpu: dict[int, float], count: int, top: int = 25
) -> str:
    """Where the consumer's time goes: CPU per message of each thread (/proc), then the wall
    clock of the consuming thread (``MainThread``) by function, waits included: self time (the
    innermost Python frame: ``select`` is waiting for deliveries or confirms, a SQLite
    ``execute`` of ``COMMIT`` is the fsync) and total time including callees."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    names_by_tid: dict[int, str] = {}
    total = 0.0
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            names = [frame_name(frames[i]) for i in stack]
            thread = re.match(r"thread \((\d+)\): (\S+)", names[0]) if names else None
            if thread:
                names_by_tid[int(thread[1])] = thread[2]
            if thread is None or thread[2] != "MainThread":
                continue
            total += weight
            self_time[names[-1]] += weight
            for name in set(names[1:]):
                inclusive[name] += weight
    lines = ["CPU per message by thread (/proc, user + system):"]
    for tid, seconds in sorted(threads_cpu.items(), key=lambda item: -item[1]):
        label = names_by_tid.get(tid, f"thread {tid}")
        lines.append(f"  {seconds / count * 1e6:7.1f} us  {label}")
    if total == 0:
        return "\n".join([*lines, "", "no py-spy samples of MainThread"]) + "\n"
    # Frames on every sample (typer, Consumer.run) are the entry chain: they say nothing.
    calls = Counter({name: n for name, n in inclusive.items() if n < 0.97 * total})
    lines += ["", f"MainThread wall clock, self ({total:.1f} s sampled = 100%, waits included):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    lines += ["", "MainThread wall clock, including callees:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in calls.most_common(top)]
    return "\n".join(lines) + "\n"


# -- plot -----------------------------------------------------------------------------------------


def plot(results: dict[str, dict[str, Round]], path: Path, title: str) -> None:
    """Latency percentiles and stored rate against offered load, every path, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, (lat_ax, rate_ax) = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    colors = {"pipeline": "tab:blue", "influx": "tab:green", "plugin": "tab:orange"}
    labels = {
        "pipeline": "iotpipe: Mosquitto -> bridge -> RabbitMQ -> consume -> SQLite, committed",
        "influx": "iotpipe, consume -> VictoriaMetrics (InfluxDB v2 API), committed",
        "plugin": "baseline: RabbitMQ MQTT plugin -> bare consumer, received",
    }
    styles = {"p50": "-", "p95": "--", "p99": ":"}
    ticks: set[float] = set()
    for name, rounds in results.items():
        # Saturation is drawn at the rate the publisher reached, with a square marker.
        xs = [r.offered or r.published_msg_s for r in rounds.values()]
        markers = ["s" if key == "max" else "o" for key in rounds]
        ticks.update(r.offered for r in rounds.values() if r.offered)
        for pct, style in styles.items():
            ys = [max(r.latency_ms[pct], 0.5) for r in rounds.values()]
            lat_ax.plot(xs, ys, style, color=colors[name])
            for x, y, marker in zip(xs, ys, markers, strict=True):
                lat_ax.plot(x, y, marker, color=colors[name])
        ys = [r.stored_msg_s for r in rounds.values()]
        rate_ax.plot(xs, ys, color=colors[name])
        for x, y, marker in zip(xs, ys, markers, strict=True):
            rate_ax.plot(x, y, marker, color=colors[name])
        if "max" in rounds:
            r = rounds["max"]
            rate_ax.annotate(  # left of and below the marker: the right edge is near
                f"{r.stored_msg_s:,.0f}/s sustained",
                (xs[-1], r.stored_msg_s),
                xytext=(-6, -12),
                textcoords="offset points",
                ha="right",
                fontsize=8,
            )
    top = max(r.offered or r.published_msg_s for rs in results.values() for r in rs.values())
    rate_ax.plot([0, top], [0, top], color="grey", linewidth=0.8)
    path_handles = [Line2D([], [], color=colors[n], label=labels[n]) for n in results]
    lat_ax.legend(
        handles=[
            *path_handles,
            *[Line2D([], [], color="black", linestyle=s, label=p) for p, s in styles.items()],
            Line2D([], [], color="black", marker="s", linestyle="", label="saturation"),
        ],
        fontsize=7,
        loc="upper left",
    )
    rate_ax.legend(
        handles=[
            *path_handles,
            Line2D([], [], color="grey", linewidth=0.8, label="stored = offered"),
            Line2D([], [], color="black", marker="s", linestyle="", label="saturation"),
        ],
        fontsize=7,
        loc="lower right",  # the lines rise from lower left; the markers' labels are upper right
    )
    lat_ax.set(
        xscale="log",
        yscale="log",
        xlabel="offered load, msg/s (saturation: as reached by the publisher)",
        ylabel="latency, device ts -> committed / received (ms)",
        title="Latency percentiles (saturation: queueing, grows with --duration)",
    )
    highest = max(r.latency_ms["p99"] for rs in results.values() for r in rs.values())
    lat_ax.set_ylim(0.5, max(highest, 1.0) * 40)  # headroom for the legend above the lines
    if ticks:  # the offered rates; saturation points are marked, not ticked (they crowd)
        lat_ax.set_xticks(sorted(ticks))
    lat_ax.xaxis.set_major_formatter(ScalarFormatter())
    lat_ax.xaxis.set_minor_formatter(NullFormatter())
    lat_ax.yaxis.set_major_formatter(ScalarFormatter())
    rate_ax.set(
        xlabel="offered load, msg/s",
        ylabel="stored / received within the measured window (msg/s)",
        title="Throughput",
    )
    for ax in (lat_ax, rate_ax):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------


def poll_ms(text: str) -> float:
    """``--commit-poll-ms``: at least 0.5 ms (a watcher that never pauses takes a core)."""
    value = float(text)
    if not value >= 0.5:  # written so that nan is refused too
        raise argparse.ArgumentTypeError(f"must be at least 0.5 ms: {text}")
    return value


def parse_rates(text: str) -> list[float | None]:
    """``1000,5000,max`` -> [1000.0, 5000.0, None]."""
    rates: list[float | None] = []
    for raw in text.split(","):
        part = raw.strip().lower()
        if part in ("max", "saturation"):
            rates.append(None)
        else:
            value = float(part)
            if value <= 0:
                raise argparse.ArgumentTypeError(f"rate must be positive: {part}")
            rates.append(value)
    return rates


def rate_key(rate: float | None) -> str:
    return "max" if rate is None else f"{rate:g}"


def on_sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # unwind through every cleanup, as Ctrl-C does


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per round")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds first")
    parser.add_argument(
        "--rates",
        type=parse_rates,
        default=parse_rates("1000,5000,max"),
        help="offered msg/s, comma-separated; max = saturation (default 1000,5000,max)",
    )
    parser.add_argument("--window", type=int, default=1000, help="publisher's unacked QoS 1")
    parser.add_argument(
        "--mosquitto-inflight", type=int, default=1000, help="Mosquitto max_inflight_messages"
    )
    parser.add_argument(
        "--receipts",
        action="store_true",
        help="also the receipts rounds (latency at --receipt-rate, then overload); writes "
        "bench/results/e2e-receipts.json",
    )
    parser.add_argument(
        "--receipt-rate", type=float, default=1000.0, help="offered msg/s of the latency round"
    )
    parser.add_argument(
        "--overload-factor",
        type=float,
        default=2.0,
        help="the overload round offers this many times the sustained rate",
    )
    parser.add_argument(
        "--overload-duration", type=float, default=60.0, help="seconds the overload is offered"
    )
    parser.add_argument(
        "--receipt-window", type=int, default=256, help="devices' receipt_window (per device)"
    )
    parser.add_argument(
        "--profile",
        type=parse_rates,
        default=[],
        metavar="RATES",
        help="then one more pipeline round per rate with the consumer under py-spy record "
        "--idle; writes bench/results/e2e-consumer-profile-<rate>.txt",
    )
    parser.add_argument(
        "--influx",
        action="store_true",
        help="also each rate with iotpipe consume writing to a private VictoriaMetrics "
        "(InfluxDB v2 write API)",
    )
    parser.add_argument(
        "--commit-poll-ms",
        type=poll_ms,
        default=COMMIT_POLL_MS,
        help="how often the commit watcher polls the store for committed rows (the resolution "
        f"of committed latency; default {COMMIT_POLL_MS:g})",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    args = parser.parse_args()
    if not args.no_plot and not args.no_save:
        try:
            import matplotlib  # noqa: F401
        except ImportError:  # the figures still count; say how to get the plot
            print(
                "matplotlib is missing, no plot: .venv/bin/pip install -e '.[bench]'",
                file=sys.stderr,
            )
            args.no_plot = True
    if args.profile and not (Path(sys.executable).parent / "py-spy").exists():
        sys.exit("bench_e2e: --profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        run(args)
    except BenchError as err:
        sys.exit(f"bench_e2e: {err}")
    except KeyboardInterrupt:
        sys.exit("bench_e2e: interrupted; private brokers and processes stopped")


def receipts_rounds(
    rig: Rig, args: argparse.Namespace, results: dict[str, dict[str, Round]]
) -> dict[str, Any]:
    """The receipts rounds: latency at ``--receipt-rate``, then ``--overload-factor`` x the
    sustained rate (the pipeline's ``max`` round of this run; run now if not among ``--rates``)."""
    latency = rig.devices(args.receipt_rate, args.warmup, args.duration, args.receipt_window)
    progress("receipts", f"{args.receipt_rate:g}", latency)
    if "max" not in results["pipeline"]:
        results["pipeline"]["max"] = rig.pipeline(None)
    sustained = results["pipeline"]["max"].stored_msg_s
    overload = rig.devices(
        args.overload_factor * sustained, 0.0, args.overload_duration, args.receipt_window
    )
    progress("overload", f"{args.overload_factor:g}x", overload)
    out: dict[str, Any] = {
        "devices": f"{DEVICES} devices in one paho client (QoS 1, <= --window unacknowledged), "
        "receipts on: each keeps what it published until a receipt covers it, at most "
        f"{args.receipt_window} unconfirmed (then new readings wait in its outbox), resends "
        "after clamp(4 x p99 receipt latency, 5 s, 300 s)",
        "receipt_latency": "first publish -> receipt received by the device (wall clock, ms); "
        "reading_to_receipt: envelope ts (entered the outbox) -> receipt; store_latency: "
        "envelope ts -> committed (as in the rates rounds); store_latency_before_commit: "
        "envelope ts -> stored_ms",
        "receipt_window": args.receipt_window,
        "latency_round": latency,
        "sustained_msg_s": round(sustained),
        "overload_factor": args.overload_factor,
        "overload_round": overload,
    }
    plain = results["pipeline"].get(rate_key(args.receipt_rate))
    if plain is not None:  # the same rate, devices ignoring receipts: what receipts add
        out["pipeline_store_latency_ms_same_rate"] = plain.latency_ms
    return out


def profile_round(rig: Rig, rate: float | None, save: bool) -> dict[str, Any]:
    """One pipeline round at ``rate`` with the consumer under py-spy; writes the summary
    (``e2e-consumer-profile-<rate>.txt``) unless not ``save``. Its figures are distorted by the
    sampling, so they stay out of the results table."""
    key = rate_key(rate)
    speedscope = PROFILE.with_name(f"{PROFILE.name}-{key}.speedscope.json")
    r = rig.pipeline(rate, profile=speedscope)
    print(
        f"profiled offered {key:>5}: stored {r.stored_msg_s:7.0f}/s  p50 "
        f"{r.latency_ms['p50']:6.0f} p99 {r.latency_ms['p99']:6.0f} ms (under py-spy)",
        file=sys.stderr,
    )
    text = (
        f"iotpipe consume in a bench_e2e pipeline round at {key} msg/s offered, under py-spy "
        f"record --idle --rate 250: stored {r.stored_msg_s:.0f} msg/s, latency p50/p95/p99 "
        f"{r.latency_ms['p50']:.0f}/{r.latency_ms['p95']:.0f}/{r.latency_ms['p99']:.0f} ms\n\n"
        + summarize_consumer_profile(speedscope, rig.consumer_threads_cpu, r.total)
    )
    if save:
        speedscope.with_suffix("").with_suffix(".txt").write_text(text)
    else:
        print(text, file=sys.stderr)
    return {"offered": key} | r.summary()


def progress(name: str, offered: str, summary: dict[str, Any]) -> None:
    """One stderr line per receipts round."""
    lat = summary["receipt_latency_ms"]
    print(
        f"{name:8} offered {offered:>5}: generated {summary['generated_msg_s']:7.0f}/s "
        f"lost {summary['lost']} held {summary['held_by_window']} receipt p50 "
        f"{lat.get('p50', 0):6.0f} p99 {lat.get('p99', 0):6.0f} ms  drain "
        f"{summary['drain_after_load_s']}",
        file=sys.stderr,
    )


@contextlib.contextmanager
def private_victoria(workdir: Path, wanted: bool) -> Iterator[Victoria | None]:
    """A private VictoriaMetrics (as the tests start it) if ``wanted``, stopped afterwards."""
    if not wanted:
        yield None
        return
    workdir.mkdir(parents=True)
    try:
        server = Victoria(workdir)
    except FileNotFoundError:
        raise BenchError(
            "victoria-metrics is not installed: make setup (apt-get install victoria-metrics)"
        ) from None
    try:
        server.start()
        yield server
    finally:
        server.stop()


def run(args: argparse.Namespace) -> None:
    started = time.monotonic()
    load_start = os.getloadavg()[0]  # other work on the machine skews every figure
    paths = [name for name in PATHS if name != "influx" or args.influx]
    results: dict[str, dict[str, Round]] = {name: {} for name in paths}
    profiles: list[dict[str, Any]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    victoria_version = None
    try:
        with (
            PrivateMosquitto(args.mosquitto_inflight) as mosquitto,
            private_victoria(tmp / "victoria", args.influx) as victoria,
        ):
            rabbit = PrivateRabbit(tmp / "rabbitmq", mqtt=True)
            try:
                rabbit.start()
                with pika.BlockingConnection(pika.URLParameters(rabbit.url)) as admin:
                    declare_topology(admin.channel())  # iotpipe.telemetry, iotpipe.dead
                rig = Rig(
                    mosquitto,
                    rabbit,
                    tmp,
                    args.warmup,
                    args.duration,
                    args.window,
                    args.commit_poll_ms,
                    victoria,
                )
                runs: dict[str, Callable[[float | None], Round]] = {
                    "pipeline": rig.pipeline,
                    "influx": lambda rate: rig.pipeline(rate, influx=True),
                    "plugin": rig.plugin,
                }
                for rate in args.rates:  # interleaved, so machine noise hits every path alike
                    for name in paths:
                        r = runs[name](rate)
                        results[name][rate_key(rate)] = r
                        before = (
                            f" (before COMMIT p50 {r.before_commit_ms['p50']:.0f} p99 "
                            f"{r.before_commit_ms['p99']:.0f})"
                            if r.before_commit_ms
                            else ""
                        )
                        print(
                            f"{name:8} offered {rate_key(rate):>5}: published "
                            f"{r.published_msg_s:7.0f}/s stored {r.stored_msg_s:7.0f}/s  "
                            f"p50 {r.latency_ms['p50']:6.0f} p95 {r.latency_ms['p95']:6.0f} "
                            f"p99 {r.latency_ms['p99']:6.0f} ms{before}  drain {r.drain_s:.1f} s",
                            file=sys.stderr,
                        )
                receipt_rounds = receipts_rounds(rig, args, results) if args.receipts else None
                for rate in args.profile:
                    profiles.append(profile_round(rig, rate, not args.no_save))
                rabbit_version = rabbit.ctl("version").stdout.strip()
            finally:
                rabbit.kill()
            mosquitto_version = mosquitto.version()
            if victoria is not None:
                # Debian's build prints no version (-version, /metrics): ask the package.
                victoria_version = (
                    subprocess.run(
                        ["dpkg-query", "-W", "-f", "${Version}", "victoria-metrics"],
                        capture_output=True,
                        text=True,
                        check=False,
                    ).stdout.strip()
                    or "unknown"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    result: dict[str, Any] = {
        "benchmark": "e2e",
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "offered_msg_s": [rate_key(r) for r in args.rates],
        "devices": DEVICES,
        "readings_per_message": READINGS,
        "qos": 1,
        "publisher_window": args.window,
        "mosquitto_max_inflight_messages": args.mosquitto_inflight,
        "pipeline": "paho -> Mosquitto -> iotpipe bridge (defaults) -> RabbitMQ quorum queue -> "
        "iotpipe consume (defaults: adaptive batches <= 1000, batch_latency 0.2 s, prefetch 2000, "
        "fsync) -> SQLite",
        "plugin": "paho -> RabbitMQ MQTT plugin -> amq.topic -> quorum queue -> bare pika "
        "consumer (prefetch 1000, multiple ack per 250 or 50 ms)",
        "latency": "pipeline and influx: committed - envelope ts, where committed is the wall "
        "clock of the first poll of the store's messages table (a reader in its own process, "
        f"every {args.commit_poll_ms:g} ms) that sees the message's row committed: never early, "
        "late by at most commit_resolution.window_ms; latency_before_commit_ms: "
        "messages.stored_ms (taken inside the transaction, before COMMIT and its fsync) - "
        "envelope ts; plugin: receive time - envelope ts; wall clock, ms",
        "commit_poll_ms": args.commit_poll_ms,
        "results": {
            name: {key: r.summary() for key, r in rounds.items()}
            for name, rounds in results.items()
        },
        "pipeline_vs_plugin_stored_at_max": (
            round(
                results["pipeline"]["max"].stored_msg_s / results["plugin"]["max"].stored_msg_s, 3
            )
            if "max" in results["pipeline"] and "max" in results["plugin"]
            else None
        ),
        "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    if args.influx:
        result["influx"] = (
            "the pipeline with iotpipe consume writing to a private VictoriaMetrics over the "
            "InfluxDB v2 write API (store influxdb://, defaults), its dedupe state in a fresh "
            "SQLite file: committed = the state's messages row committed, after the server "
            "answered 204 for the points (VictoriaMetrics: in its memory buffers, searchable and "
            "on disk within about a second, not counted); server_samples: raw samples of the "
            "round exported afterwards"
        )
        result["influx_vs_pipeline_stored_at_max"] = (
            round(
                results["influx"]["max"].stored_msg_s / results["pipeline"]["max"].stored_msg_s, 3
            )
            if "max" in results["influx"] and "max" in results["pipeline"]
            else None
        )
    if receipt_rounds is not None:
        result["receipts"] = receipt_rounds
    if profiles:
        result["profiled_rounds"] = profiles
    result |= {
        "python": platform.python_version(),
        "paho": version("paho-mqtt"),
        "pika": version("pika"),
        "mosquitto": mosquitto_version,
        "rabbitmq": rabbit_version,
        **({"victoria_metrics": victoria_version} if victoria_version else {}),
        "machine": f"{platform.machine()} x{os.cpu_count() or 1}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bench_seconds": round(time.monotonic() - started),
    }
    print(json.dumps(result))
    if args.no_save:
        return
    path = RECEIPTS_RESULTS if args.receipts else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_file = path.with_suffix(".json.tmp")
    tmp_file.write_text(json.dumps(result, indent=2) + "\n")
    tmp_file.replace(path)
    if not args.no_plot:
        plot(
            results,
            RECEIPTS_PLOT if args.receipts else PLOT,
            f"iotpipe end to end vs RabbitMQ MQTT plugin, QoS 1, {args.duration:g} s per rate, "
            f"{result['machine']}, load {result['loadavg_1m_start_end']}, {result['when']}",
        )


if __name__ == "__main__":
    main()

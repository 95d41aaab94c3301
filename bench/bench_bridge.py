"""Bridge throughput against RabbitMQ's own MQTT plugin, both measured in the same run.

    .venv/bin/python bench/bench_bridge.py [--messages 30000] [--rounds 3] [--window 1000]
        [--mosquitto-inflight 1000] [--candidate DIR ...] [--profile] [--no-save] [--check]

Starts a private Mosquitto and a private RabbitMQ node with the MQTT plugin (both on free
loopback ports, deleted at the end), then alternates, ``--rounds`` times each:

(a) bridge: a paho QoS 1 publisher -> Mosquitto -> ``iotpipe bridge`` (a subprocess at its
    default settings, started per round with its own spool in a temporary directory and a unique
    client id) -> exchange ``iotpipe.telemetry`` -> a durable queue bound ``iotpipe.v1.#``;
(b) plugin: the same publisher -> RabbitMQ's MQTT listener -> ``amq.topic`` -> a durable queue
    bound ``iotpipe.v1.#``: what RabbitMQ does without us, the baseline.

The publisher is the fastest paho loop of ``bench_simulator.py`` (single-threaded, inline
``client.loop()``, at most ``--window`` unacknowledged, the loop run every 32 publishes). Every
message is a valid wire-1.0 telemetry envelope of ``PAYLOAD_BYTES`` bytes with a unique id and its
own timestamp, from one of 10 devices. The consumer is a plain pika ``SelectConnection`` in a
separate process (prefetch 1000, multiple acks every 250) that counts distinct ids until all
arrived. Each figure is messages / (first publish -> last message consumed); the clocks are
``time.monotonic()``, shared by the processes.

Also reported per round: CPU microseconds per message of each process (publisher, Mosquitto,
bridge, RabbitMQ, consumer), so a slow path says where its time went; on a 2-core machine they
all compete for the same cores. Each ``--candidate DIR`` adds an interleaved variant: the bridge
run with ``PYTHONPATH=DIR`` (a patched copy of the ``bridge``/``iotpipe`` packages), to measure a
proposed change against the current code in the same run. ``--profile`` runs one more bridge
round under ``py-spy record --gil`` and writes ``bench/results/bridge-profile.speedscope.json``
and a summary, ``bridge-profile.txt``: CPU per message of each bridge thread (from /proc, system
calls included), then the share of GIL-holding samples per thread and per function.

Prints one JSON object with both medians and the ratio bridge / plugin (target >= 1.0), and
writes it to ``bench/results/bridge.json``.

``--receipts`` measures what carrying receipts costs the telemetry path (target: receipts on >=
0.9 x receipts off), and writes ``bench/results/bridge-receipts.json`` instead. Three bridge paths
are then interleaved with the plugin, round by round:

- ``bridge`` (receipts on): ``[bridge] receipts = true`` while a feeder process publishes receipts
  to ``iotpipe.receipts`` as ``iotpipe consume`` does: one receipt per device per second (the
  consumer's ``receipt_interval``), for the bench's 10 devices, each a wire-1.1 receipt naming the
  seqs of that device's last second, routing key ``iotpipe.v1.bench.{device}.receipt``. The bridge
  relays each to Mosquitto (QoS 1, retained) on its relay thread, so the relay's AMQP consumer,
  MQTT publishes and acknowledgements all compete with the telemetry path for the same process
  and cores. That is what "receipts on" costs a deployment like the bench's.
- ``receipts_fleet``: the same with ``--fleet-devices`` (1000) devices, i.e. 1000 receipts/s, as
  a fleet of 1000 devices each sending ~10 msg/s at the bridge's saturation would cause: how the
  cost grows with the fleet. A device receipts at most once a second, so receipts/s never exceed
  min(devices, messages/s); the worst case, one receipt per message (every device sending at
  most once a second), costs about the relay's CPU per receipt (reported) per message.
- ``receipts_off``: ``[bridge] receipts = false`` and no feeder (the relay does not run).

The feeder's own CPU is reported (``cpu_us_per_msg.*.feeder``) but it stands for the consumer's
work, not the bridge's; the bridge's ``/metrics`` counter ``iotpipe_bridge_receipts_forwarded``
is read at the end of each round to show the receipts really went through the relay.
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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from importlib.metadata import version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ is not an installed package; PrivateRabbit lives there

from benchlib import PUMP_EVERY, paho_client, publish_windowed, py_spy  # noqa: E402

from iotpipe.envelope import Envelope, decode  # noqa: E402
from iotpipe.receipts import EXCHANGE as RECEIPTS_EXCHANGE  # noqa: E402
from iotpipe.receipts import (  # noqa: E402
    BootReceipt,
    Receipt,
    encode_receipt,
    receipt_routing_key,
)
from tests.rabbitmq import PrivateRabbit  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "bridge.json"
RECEIPTS_RESULTS = ROOT / "bench" / "results" / "bridge-receipts.json"
RECEIPTS_TARGET_RATIO = 0.9
FLEET_DEVICES = 1000
PROFILE = ROOT / "bench" / "results" / "bridge-profile"
TARGET_RATIO = 1.0
PAYLOAD_BYTES = 265
DEVICES = 10
ACK_EVERY = 250
TELEMETRY_EXCHANGE = "iotpipe.telemetry"
BINDING = "iotpipe.v1.#"
# The id is the 12 bytes after '{"v":"1.0","id":"' in every payload: the consumer's dedupe key.
ID_SLICE = slice(17, 29)
ROUND_TIMEOUT = 120.0


# -- messages -----------------------------------------------------------------------------------


def make_messages(tag: str, count: int) -> list[tuple[str, bytes]]:
    """``count`` valid wire-1.0 envelopes, ids ``<tag><i:08d>`` (12 bytes), round-robin devices."""
    assert len(tag) == 4, tag
    base_ms = int(time.time() * 1000)
    out = []
    for i in range(count):
        device = f"dev-{i % DEVICES:02d}"
        ts = datetime.fromtimestamp((base_ms + i) / 1000, UTC)
        body = (
            f'{{"v":"1.0","id":"{tag}{i:08d}","site":"bench","device":"{device}",'
            f'"seq":{i // DEVICES},"ts":"{ts:%Y-%m-%dT%H:%M:%S}.{ts.microsecond // 1000:03d}Z",'
            f'"readings":[{{"sensor":"temperature","value":{20 + i % 500 / 100:.2f},"unit":"Cel"}},'
            f'{{"sensor":"humidity","value":{40 + i % 300 / 10:.1f},"unit":"%RH"}}]}}'
        ).encode()
        out.append((f"iotpipe/v1/bench/{device}/telemetry", body.ljust(PAYLOAD_BYTES)))
    return out


def check_messages(messages: list[tuple[str, bytes]]) -> None:
    """Fail early if the bridge would dead-letter these (so the bench measures the real path)."""
    for topic, payload in messages[:: max(1, len(messages) // 50)]:
        decoded = decode(topic, payload)
        if not isinstance(decoded, Envelope) or len(payload) != PAYLOAD_BYTES:
            raise RuntimeError(f"bad bench message: {decoded}")
        if payload[ID_SLICE].decode() != decoded.id:
            raise RuntimeError("ID_SLICE does not cut out the id")


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of these processes (all their threads), from /proc."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


def group_pids(pgid: int) -> list[int]:
    """Every process in process group ``pgid`` (RabbitMQ: the launcher, beam, helpers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
    return pids


class PrivateMosquitto:
    """A throw-away Mosquitto on a free loopback port."""

    def __init__(self, max_inflight: int) -> None:
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="bench-mosquitto-")
        workdir = Path(self._dir.name)
        shutil.chown(workdir, "mosquitto", "mosquitto")
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"log_dest file {workdir}/mosquitto.log\n"
            # Mosquitto sends a subscriber at most max_inflight_messages unacknowledged QoS 1
            # messages (default 20). The bridge acknowledges a message only after RabbitMQ
            # confirmed it, so the bridge can never have more than this many messages in flight
            # to RabbitMQ: raise it to the bridge's own window.
            f"max_inflight_messages {max_inflight}\n"
            # The rest waits in the bridge's session queue, capped by default at 1000 messages,
            # beyond which Mosquitto drops QoS 1 messages silently; 0 = no limit.
            "max_queued_messages 0\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrivateMosquitto:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)])
        wait_port(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self._dir.cleanup()

    def version(self) -> str:
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False)
        first = (out.stdout or out.stderr).splitlines()
        return first[0] if first else "unknown"


class BridgeProcess:
    """``iotpipe bridge`` as a subprocess with its own spool, client id and HTTP port."""

    def __init__(
        self,
        mqtt_port: int,
        amqp_url: str,
        workdir: Path,
        pythonpath: Path | None = None,
        receipts: bool = True,
        extra_config: str = "",
    ) -> None:
        self.http_port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "bridge.log"
        config = workdir / "bridge.toml"
        config.write_text(
            f'[bridge]\nclient_id = "bench-bridge-{uuid.uuid4().hex[:10]}"\n'
            f"receipts = {'true' if receipts else 'false'}\n{extra_config}"
        )
        self.argv = [
            str(Path(sys.executable).parent / "iotpipe"),
            "bridge",
            "--config",
            str(config),
            "--mqtt",
            f"mqtt://127.0.0.1:{mqtt_port}",
            "--amqp",
            amqp_url,
            "--spool",
            str(workdir / "spool.db"),
            "--http-port",
            str(self.http_port),
        ]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IOTPIPE_")}
        if pythonpath is not None:
            self.env["PYTHONPATH"] = os.pathsep.join(
                [str(pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])]
            )
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BridgeProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        while True:  # /healthz answers once MQTT is subscribed; wait for "amqp": "up" too
            if self.proc.poll() is not None:
                raise RuntimeError(f"bridge exited:\n{self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:
                if json.load(answer).get("amqp") == "up":
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"bridge not ready:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode != 0:
            tail = self.log.read_text()[-2000:]
            print(f"bridge exited {self.proc.returncode}:\n{tail}", file=sys.stderr)


# -- publisher and consumer --------------------------------------------------------------------


def publish(port: int, messages: list[tuple[str, bytes]], window: int) -> tuple[float, float]:
    """Publish every message at QoS 1 (the fastest paho loop); return (first publish, last ack)."""
    client = paho_client("bench-pub")
    started, finished = publish_windowed(client, port, messages, window)
    client.disconnect()
    client.loop(0.1)
    return started, finished


def consume(
    url: str, queue: str, count: int, pipe: Connection, *, by_message_id: bool = False
) -> None:
    """Child process: consume ``queue`` until ``count`` distinct ids arrived; report on ``pipe``.

    The id is cut out of the body (:data:`ID_SLICE`), or with ``by_message_id`` read from the
    AMQP ``message_id`` (for bodies that are not this bench's envelopes).

    Sends ``("ready",)`` once consuming, then ``("done", last_monotonic, deliveries, distinct,
    cpu_seconds)``.
    """
    seen: set[object] = set()
    deliveries = unacked = 0
    last = 0.0
    connection: Any = None

    def on_message(channel: Any, method: Any, props: Any, body: bytes) -> None:
        nonlocal deliveries, unacked, last
        seen.add(props.message_id if by_message_id else body[ID_SLICE])
        deliveries += 1
        unacked += 1
        if len(seen) >= count:
            last = time.monotonic()
            channel.basic_ack(method.delivery_tag, multiple=True)
            connection.close()
        elif unacked >= ACK_EVERY:
            channel.basic_ack(method.delivery_tag, multiple=True)
            unacked = 0

    def on_channel(channel: Any) -> None:
        def go(_frame: object) -> None:
            channel.basic_consume(queue, on_message, callback=lambda _frame: pipe.send(("ready",)))

        channel.basic_qos(prefetch_count=1000, callback=go)

    connection = pika.SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, _e: c.ioloop.stop(),
    )
    connection.ioloop.call_later(ROUND_TIMEOUT, connection.close)
    began = time.process_time()
    connection.ioloop.start()
    pipe.send(("done", last, deliveries, len(seen), time.process_time() - began))


def feed_receipts(url: str, devices: list[str], pipe: Connection) -> None:
    """Child process: publish one receipt per device per second to ``iotpipe.receipts`` (as
    ``iotpipe consume`` does for busy devices) until told to stop on ``pipe``.

    Sends ``("ready",)`` once connected, then, after any message from the parent, ``("done",
    receipts_published, cpu_seconds)``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends this process
    began = time.process_time()
    properties = pika.BasicProperties(content_type="application/json", type="iotpipe.receipt")
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.exchange_declare(RECEIPTS_EXCHANGE, "topic", durable=True)
        pipe.send(("ready",))
        interval = 1.0 / len(devices)
        start = time.monotonic()
        sent = 0
        while True:
            wait = start + sent * interval - time.monotonic()
            if pipe.poll(max(0.0, wait)):
                break
            device = devices[sent % len(devices)]
            second = sent // len(devices)  # this device's receipt names its last second's seqs
            receipt = Receipt(
                site="bench",
                device=device,
                ts=int(time.time() * 1000),
                stored=(BootReceipt(boot="bench", ranges=((second * 100, second * 100 + 99),)),),
            )
            channel.basic_publish(
                RECEIPTS_EXCHANGE,
                receipt_routing_key("bench", device),
                encode_receipt(receipt),
                properties,
            )
            sent += 1
            if sent % 100 == 0:
                connection.process_data_events(0)
    pipe.send(("done", sent, time.process_time() - began))


@contextlib.contextmanager
def receipt_feeder(url: str, devices: int) -> Iterator[tuple[int, Callable[[], int]]]:
    """:func:`feed_receipts` in a child process: yields its pid and a function that stops it
    and returns how many receipts it published."""
    context = multiprocessing.get_context("fork")
    parent, child = context.Pipe()
    names = [f"dev-{i:02d}" if devices <= 100 else f"fleet-{i:04d}" for i in range(devices)]
    process = context.Process(
        target=feed_receipts, args=(url, names, child), name="bench-receipt-feeder"
    )
    process.start()
    published = 0

    def stop() -> int:
        nonlocal published
        if process.is_alive() and not published:
            parent.send(("stop",))
            if parent.poll(30):
                published = parent.recv()[1]
        return published

    try:
        if not parent.poll(30) or parent.recv() != ("ready",):
            raise RuntimeError("receipt feeder did not start")
        assert process.pid is not None
        yield process.pid, stop
    finally:
        stop()
        process.join(10)
        if process.is_alive():
            process.terminate()
            process.join(10)


def forwarded_receipts(http_port: int) -> int:
    """``iotpipe_bridge_receipts_forwarded`` from the bridge's ``/metrics`` (-1 if unreadable)."""
    url = f"http://127.0.0.1:{http_port}/metrics"
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as answer:
        text = answer.read().decode()
        found = re.search(r"^iotpipe_bridge_receipts_forwarded_total (\S+)$", text, re.M)
        if found:
            return int(float(found[1]))
    return -1


@dataclass
class Round:
    """One measured round of one path."""

    rate: float
    publish_rate: float  # messages / (first publish -> last PUBACK) at the publisher
    cpu_us: dict[str, float] = field(default_factory=dict)  # per process, per message
    duplicates: int = 0
    receipts: tuple[int, int] = (0, 0)  # (fed, forwarded by the bridge's relay)


@dataclass
class Rig:
    """The running brokers and what each round needs."""

    mosquitto: PrivateMosquitto
    rabbit: PrivateRabbit
    window: int
    workdir: Path
    rounds_run: int = 0
    thread_cpu: dict[int, float] = field(default_factory=dict)  # of the last bridge
    receipts: tuple[int, int] = (0, 0)  # (fed, forwarded) in the last bridge round

    def messages(self, count: int) -> list[tuple[str, bytes]]:
        self.rounds_run += 1
        messages = make_messages(f"r{self.rounds_run % 100:02d}-", count)
        check_messages(messages)
        return messages

    def run(
        self,
        queue: str,
        mqtt_port: int,
        count: int,
        extra: Callable[[], contextlib.AbstractContextManager[list[tuple[str, int]]]],
    ) -> Round:
        """Publish ``count`` messages to ``mqtt_port`` and time them until consumed from
        ``queue``; ``extra`` runs around it (the bridge) and names more processes to account."""
        messages = self.messages(count)
        self.receipts = (0, 0)
        with pika.BlockingConnection(pika.URLParameters(self.rabbit.url)) as admin:
            admin.channel().queue_purge(queue)
        context = multiprocessing.get_context("fork")
        parent, child = context.Pipe()
        consumer = context.Process(
            target=consume, args=(self.rabbit.url, queue, count, child), name="bench-consumer"
        )
        with extra() as more:
            consumer.start()
            if not parent.poll(30) or parent.recv() != ("ready",):
                raise RuntimeError("consumer did not start")
            assert self.mosquitto.proc is not None
            assert self.rabbit.proc is not None
            accounts = [
                ("mosquitto", [self.mosquitto.proc.pid]),
                ("rabbitmq", group_pids(self.rabbit.proc.pid)),
            ] + [(name, [pid]) for name, pid in more]
            before = {name: cpu_seconds(pids) for name, pids in accounts}
            own = time.process_time()
            first, acked = publish(mqtt_port, messages, self.window)
            publisher_cpu = time.process_time() - own
            if not parent.poll(ROUND_TIMEOUT):
                raise RuntimeError(f"{queue}: consumer did not finish")
            _, last, deliveries, distinct, consumer_cpu = parent.recv()
            after = {name: cpu_seconds(pids) for name, pids in accounts}
        consumer.join(10)
        if distinct != count:
            raise RuntimeError(f"{queue}: {distinct} of {count} messages arrived")
        cpu = {"publisher": publisher_cpu, "consumer": consumer_cpu}
        cpu |= {name: after[name] - before[name] for name in before}
        return Round(
            rate=count / (last - first),
            publish_rate=count / (acked - first),
            cpu_us={name: round(seconds / count * 1e6, 1) for name, seconds in cpu.items()},
            duplicates=deliveries - distinct,
            receipts=self.receipts,
        )

    @contextlib.contextmanager
    def bridge(
        self,
        pythonpath: Path | None = None,
        profile: Path | None = None,
        receipts: bool = True,
        feed: int = 0,
    ) -> Iterator[list[tuple[str, int]]]:
        """The bridge around one round; ``feed`` > 0 also runs a :func:`receipt_feeder` for
        that many devices."""
        workdir = self.workdir / f"bridge-{self.rounds_run}"
        with contextlib.ExitStack() as stack:
            bridge = stack.enter_context(
                BridgeProcess(
                    self.mosquitto.port,
                    self.rabbit.url,
                    workdir,
                    pythonpath=pythonpath,
                    receipts=receipts,
                )
            )
            assert bridge.proc is not None
            processes = [("bridge", bridge.proc.pid)]
            if feed:
                feeder_pid, stop_feeder = stack.enter_context(receipt_feeder(self.rabbit.url, feed))
                processes.append(("feeder", feeder_pid))
            if profile is not None:
                stack.enter_context(py_spy(bridge.proc.pid, profile, "--gil"))
            before = thread_cpu(bridge.proc.pid)
            try:
                yield processes
                if feed:
                    fed = stop_feeder()
                    # The relay forwards within a few batches; give the last ones a moment.
                    deadline = time.monotonic() + 10
                    while (forwarded := forwarded_receipts(bridge.http_port)) < fed:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.1)
                    self.receipts = (fed, forwarded)
            finally:
                after = thread_cpu(bridge.proc.pid)
                self.thread_cpu = {tid: after[tid] - before.get(tid, 0.0) for tid in after}

    @contextlib.contextmanager
    def nothing(self) -> Iterator[list[tuple[str, int]]]:
        yield []


def candidate_run(rig: Rig, port: int, pythonpath: Path, count: int) -> Round:
    """A bridge round with ``PYTHONPATH=pythonpath`` (a patched copy of the packages)."""
    return rig.run("bench.bridge", port, count, partial(rig.bridge, pythonpath))


def declare(url: str) -> None:
    """The two durable queues, each bound ``iotpipe.v1.#`` to its path's exchange."""
    with pika.BlockingConnection(pika.URLParameters(url)) as admin:
        channel = admin.channel()
        # As the bridge declares it, so the binding exists before the bridge's first publish.
        channel.exchange_declare(TELEMETRY_EXCHANGE, "topic", durable=True)
        for queue, exchange in (
            ("bench.bridge", TELEMETRY_EXCHANGE),
            ("bench.plugin", "amq.topic"),
        ):
            channel.queue_declare(queue, durable=True)
            channel.queue_bind(queue, exchange, BINDING)


# -- profile summary ---------------------------------------------------------------------------


def summarize_profile(path: Path, thread_cpu: dict[int, float], count: int, top: int = 30) -> str:
    """Where the bridge's CPU went: per thread (exact, from /proc), then per function (py-spy
    samples of the thread holding the GIL, i.e. Python time; system calls made without the GIL
    show only in the per-thread figures)."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    total = 0.0
    names_by_tid: dict[int, str] = {}
    per_thread: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[tuple[str, str]] = Counter()  # (thread, function)
    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            names = [frame_name(frames[i]) for i in stack]
            if not names:
                continue
            total += weight
            thread = re.match(r"thread \((\d+)\): (\S+)", names[0])
            label = thread[2] if thread else "?"
            if thread:
                names_by_tid[int(thread[1])] = label
            per_thread[label] += weight
            self_time[names[-1]] += weight
            for name in set(names[1:]):
                inclusive[label, name] += weight
    # Frames on (nearly) every sample of their thread are its entry chain (typer, Thread.run,
    # Bridge.run): they say nothing, so they are left out of the inclusive list.
    calls: Counter[str] = Counter()
    for (label, name), n in inclusive.items():
        if n < 0.97 * per_thread[label]:
            calls[name] += n
    lines = ["CPU per message by thread (/proc, user + system):"]
    for tid, seconds in sorted(thread_cpu.items(), key=lambda item: -item[1]):
        label = names_by_tid.get(tid, f"thread {tid} (never held the GIL)")
        lines.append(f"  {seconds / count * 1e6:7.1f} us  {label}")
    if total == 0:
        return "\n".join([*lines, "", "no py-spy samples"]) + "\n"
    lines += ["", f"GIL held, by thread ({total:.2f} s sampled = 100%):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in per_thread.most_common()]
    lines += ["", "self time (GIL held):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    lines += ["", "total time, including callees (GIL held):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in calls.most_common(top)]
    return "\n".join(lines) + "\n"


def frame_name(frame: dict[str, Any]) -> str:
    """``function (path)``, the path shortened to the package (``pika/channel.py``)."""
    path = str(frame.get("file") or "")
    for marker in ("/site-packages/", f"/python{sys.version_info[0]}.{sys.version_info[1]}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.removeprefix(str(ROOT) + "/")
    return f"{frame['name']} ({path})" if path else str(frame["name"])


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``, by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / _TICK
    return out


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=1000, help="publisher's unacked QoS 1")
    parser.add_argument(
        "--mosquitto-inflight", type=int, default=1000, help="Mosquitto max_inflight_messages"
    )
    parser.add_argument(
        "--candidate",
        type=Path,
        action="append",
        default=[],
        help="also run the bridge with PYTHONPATH=DIR (a patched copy), interleaved; repeatable",
    )
    parser.add_argument(
        "--profile", action="store_true", help="one more bridge round under py-spy record"
    )
    parser.add_argument(
        "--receipts",
        action="store_true",
        help="receipts on (fed) vs off, interleaved; writes bench/results/bridge-receipts.json",
    )
    parser.add_argument(
        "--fleet-devices",
        type=int,
        default=FLEET_DEVICES,
        help="devices (receipts/s) of the receipts_fleet path of --receipts",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the ratio is below the target"
    )
    args = parser.parse_args()

    started = time.monotonic()
    load_start = os.getloadavg()[0]  # other work on the machine skews every figure
    candidates = {f"candidate:{path.name}": path.resolve() for path in args.candidate}
    samples: dict[str, list[Round]] = {"bridge": [], "plugin": []}
    samples |= {name: [] for name in candidates}
    if args.receipts:
        samples |= {"receipts_fleet": [], "receipts_off": []}
    with (
        tempfile.TemporaryDirectory(prefix="bench-bridge-") as tmp,
        PrivateMosquitto(args.mosquitto_inflight) as mosquitto,
    ):
        rabbit = PrivateRabbit(Path(tmp) / "rabbitmq", mqtt=True)
        try:
            rabbit.start()
            declare(rabbit.url)
            rig = Rig(mosquitto, rabbit, args.window, Path(tmp))
            assert rabbit.mqtt_port is not None
            plugin_port = rabbit.mqtt_port
            runs: dict[str, Callable[[int], Round]] = {
                "bridge": lambda n: rig.run("bench.bridge", mosquitto.port, n, rig.bridge),
                "plugin": lambda n: rig.run("bench.plugin", plugin_port, n, rig.nothing),
            }
            for name, path in candidates.items():
                runs[name] = partial(candidate_run, rig, mosquitto.port, path)
            if args.receipts:
                on = partial(rig.bridge, feed=DEVICES)
                fleet = partial(rig.bridge, feed=args.fleet_devices)
                off = partial(rig.bridge, receipts=False)
                runs["bridge"] = lambda n: rig.run("bench.bridge", mosquitto.port, n, on)
                runs["receipts_fleet"] = lambda n: rig.run("bench.bridge", mosquitto.port, n, fleet)
                runs["receipts_off"] = lambda n: rig.run("bench.bridge", mosquitto.port, n, off)
            for run in runs.values():  # unmeasured: warms up the brokers, queues, caches
                run(3000)
            for _ in range(args.rounds):  # interleaved, so machine noise hits every path alike
                for name, run in runs.items():
                    samples[name].append(run(args.messages))
            profile_summary = None
            if args.profile:
                speedscope = PROFILE.with_suffix(".speedscope.json")
                speedscope.parent.mkdir(parents=True, exist_ok=True)
                profiled = rig.run(
                    "bench.bridge",
                    mosquitto.port,
                    args.messages,
                    lambda: rig.bridge(profile=speedscope),
                )
                profile_summary = (
                    f"{args.messages} messages through the bridge under py-spy record --gil "
                    f"--rate 250: {profiled.rate:.0f} msg/s\n\n"
                    + summarize_profile(speedscope, rig.thread_cpu, args.messages)
                )
                PROFILE.with_suffix(".txt").write_text(profile_summary)
            rabbit_version = rabbit.ctl("version").stdout.strip()
        finally:
            rabbit.kill()
        mosquitto_version = mosquitto.version()

    medians = {name: statistics.median(r.rate for r in rounds) for name, rounds in samples.items()}
    cpu = {
        name: {
            key: round(statistics.median(r.cpu_us.get(key, 0.0) for r in rounds), 1)
            for key in rounds[0].cpu_us
        }
        for name, rounds in samples.items()
    }
    result: dict[str, Any] = {
        "benchmark": "bridge",
        "messages_per_round": args.messages,
        "rounds": args.rounds,
        "payload_bytes": PAYLOAD_BYTES,
        "devices": DEVICES,
        "qos": 1,
        "publisher_window": args.window,
        "publisher_pump_every": PUMP_EVERY,
        "mosquitto_max_inflight_messages": args.mosquitto_inflight,
        "bridge_settings": "defaults (window 1000, spool unused)",
        "bridge_msg_s": round(medians["bridge"]),
        "plugin_msg_s": round(medians["plugin"]),
        "ratio": round(medians["bridge"] / medians["plugin"], 3),
        "target_ratio": TARGET_RATIO,
        "samples_msg_s": {
            name: [round(r.rate) for r in rounds] for name, rounds in samples.items()
        },
        "publisher_acked_msg_s": {
            name: round(statistics.median(r.publish_rate for r in rounds))
            for name, rounds in samples.items()
        },
        "cpu_us_per_msg": cpu,
        "duplicates": {name: sum(r.duplicates for r in rounds) for name, rounds in samples.items()},
        "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }
    if candidates:
        result["candidates_vs_bridge"] = {
            name: round(medians[name] / medians["bridge"], 3) for name in candidates
        }
    if args.receipts:
        # The relay has its own thread and connections: receipts on should cost the telemetry
        # path little (target >= 0.9).
        result["receipts"] = {
            "bridge": f"receipts on, fed one receipt per device per second ({DEVICES} devices)",
            "receipts_fleet": f"receipts on, fed {args.fleet_devices} receipts/s "
            f"({args.fleet_devices} devices, one per second each)",
            "receipts_off": "[bridge] receipts = false, no feeder",
            "on_vs_off": round(medians["bridge"] / medians["receipts_off"], 3),
            "fleet_vs_off": round(medians["receipts_fleet"] / medians["receipts_off"], 3),
            "target_ratio": RECEIPTS_TARGET_RATIO,
            "fed_forwarded_per_round": {
                name: [list(r.receipts) for r in samples[name]]
                for name in ("bridge", "receipts_fleet")
            },
            "bridge_cpu_us_per_msg": {
                name: cpu[name].get("bridge")
                for name in ("bridge", "receipts_fleet", "receipts_off")
            },
        }
    result |= {
        "python": platform.python_version(),
        "paho": version("paho-mqtt"),
        "pika": version("pika"),
        "mosquitto": mosquitto_version,
        "rabbitmq": rabbit_version,
        "machine": f"{platform.machine()} x{os.cpu_count() or 1}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bench_seconds": round(time.monotonic() - started),
    }
    print(json.dumps(result))
    if profile_summary is not None:
        print(profile_summary, file=sys.stderr)
    if not args.no_save:
        path = RECEIPTS_RESULTS if args.receipts else RESULTS
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = path.with_suffix(".json.tmp")
        tmp_file.write_text(json.dumps(result, indent=2) + "\n")
        tmp_file.replace(path)
    if args.check and result["ratio"] < TARGET_RATIO:
        sys.exit(f"bridge/plugin ratio {result['ratio']} is below the target {TARGET_RATIO}")
    on_vs_off = result.get("receipts", {}).get("on_vs_off")
    if args.check and on_vs_off is not None and on_vs_off < RECEIPTS_TARGET_RATIO:
        sys.exit(f"receipts on/off ratio {on_vs_off} is below the target {RECEIPTS_TARGET_RATIO}")


if __name__ == "__main__":
    main()

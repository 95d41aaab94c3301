"""The WAN uplink: bytes and bridge CPU per reading, one message per envelope vs packed + zstd.

    .venv/bin/python bench/bench_uplink.py [--devices 100] [--messages 20000] [--rounds 3]
        [--no-save]

The hop measured is the one a site gateway pays for by the megabyte: its bridge -> a central
RabbitMQ. Starts a private Mosquitto and a private RabbitMQ node (free loopback ports, deleted at
the end), and between the bridge and RabbitMQ a byte-counting TCP proxy standing in for the WAN
link: every byte the bridge's AMQP connection sends or receives crosses it and is counted.
Then alternates, ``--rounds`` times each, in the same run:

(a) ``messages``: ``iotpipe bridge`` at its defaults (``uplink = "messages"``): one AMQP message
    per envelope, JSON body, properties and headers per message, one confirm per message;
(b) ``packed``: the same bridge with ``uplink = "packed"`` (default pack settings): many
    envelopes per AMQP message, zstd-compressed, one confirm per pack; ``iotpipe unpack`` runs
    beside RabbitMQ (not through the proxy: it is central) and turns packs back into
    per-envelope messages on ``iotpipe.telemetry``.

The fleet is realistic: the simulator's default devices (``--devices`` of them, seven sensors
each, as ``iotpipe simulate`` makes them), one envelope per device per second of simulated time,
published at QoS 1 by one paho client to Mosquitto. A round ends when the bridge reports every
envelope confirmed (``iotpipe_bridge_forwarded``) and a queue bound ``iotpipe.v1.#`` holds all of
them (proof that packs were unpacked into the standard messages).

Per round: bytes on the WAN socket per reading (both directions; per envelope too), the
bridge's CPU microseconds per reading (user + system, all threads, from /proc, over the round)
and the end-to-end rate. Prints one JSON object with the medians and the ratios
(messages / packed bytes: goal >= 5), and writes it to ``bench/results/uplink.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pika  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from bench_bridge import (  # noqa: E402
    BridgeProcess,
    PrivateMosquitto,
    cpu_seconds,
    free_port,
)
from benchlib import paho_client, publish_windowed  # noqa: E402

from simulator.fleet import Fleet  # noqa: E402
from simulator.settings import SimulateSettings  # noqa: E402
from tests.rabbitmq import PrivateRabbit  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "uplink.json"
TARGET_RATIO = 5.0
QUEUE = "bench.uplink"
#: The bridge's uplink settings per variant.
VARIANTS = {
    "messages": 'uplink = "messages"\n',
    "packed": 'uplink = "packed"\n',
    "packed_delay_1s": 'uplink = "packed"\npack_max_delay = 1.0\n',
}
ROUND_TIMEOUT = 180.0
WINDOW = 1000


# -- the WAN link ------------------------------------------------------------------------------


class ByteProxy:
    """A TCP proxy on a free loopback port to ``target``, counting the bytes in each direction.

    Attributes:
        port: where clients connect instead of ``target``.
        up: bytes clients sent towards ``target`` (the gateway's uplink).
        down: bytes ``target`` sent back.
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = 0
        self.down = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._copy, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._copy, args=(server, client, False), daemon=True).start()

    def _copy(self, source: socket.socket, sink: socket.socket, upward: bool) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                with self._lock:
                    if upward:
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# -- the fleet ---------------------------------------------------------------------------------


def fleet_messages(devices: int, count: int, seed: int) -> tuple[list[tuple[str, bytes]], int]:
    """``count`` envelopes of a simulated fleet, device after device per simulated second; and
    the number of readings in them."""
    fleet = Fleet(SimulateSettings(devices=devices), seed=seed)
    start_ms = int(time.time() * 1000)
    messages: list[tuple[str, bytes]] = []
    readings = 0
    second = 0
    while len(messages) < count:
        for device in fleet.devices:
            payload = device.message(start_ms + second * 1000)
            messages.append((device.topic, payload))
            readings += payload.count(b'"sensor":')
            if len(messages) == count:
                break
        second += 1
    return messages, readings


# -- processes ---------------------------------------------------------------------------------


class Unpacker:
    """``iotpipe unpack`` as a subprocess, straight to RabbitMQ (the central side)."""

    def __init__(self, amqp_url: str, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "unpack.log"
        self.http_port = free_port()
        config = workdir / "unpack.toml"
        config.write_text(f'[unpack]\nseen_path = "{workdir / "packs.db"}"\n')
        self.argv = [
            str(Path(sys.executable).parent / "iotpipe"),
            "unpack",
            "--config",
            str(config),
            "--amqp",
            amqp_url,
            "--http-port",
            str(self.http_port),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Unpacker:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        url = f"http://127.0.0.1:{self.http_port}/healthz"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"unpack exited:\n{self.log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"unpack not ready:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def metric(http_port: int, name: str) -> float:
    """One unlabelled metric from a service's ``/metrics`` (-1 if unreadable)."""
    with (
        contextlib.suppress(OSError),
        urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as answer,
    ):
        found = re.search(rf"^{name} (\S+)$", answer.read().decode(), re.M)
        if found:
            return float(found[1])
    return -1.0


def queue_depth(url: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        return int(connection.channel().queue_declare(QUEUE, passive=True).method.message_count)


def wait_for(what: str, condition: object, timeout: float = ROUND_TIMEOUT) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


# -- rounds ------------------------------------------------------------------------------------


@dataclass
class Round:
    bytes_per_reading: float
    bytes_per_envelope: float
    up_bytes: int
    down_bytes: int
    cpu_us_per_reading: float
    rate: float  # envelopes / (first publish -> all confirmed and queued)


@dataclass
class Rig:
    mosquitto: PrivateMosquitto
    rabbit: PrivateRabbit
    proxy: ByteProxy
    workdir: Path
    devices: int
    count: int
    duration: float
    rounds_run: int = 0

    def run(self, variant: str, rate: float | None) -> Round:
        """One round of ``variant`` (a key of :data:`VARIANTS`) at ``rate`` envelopes/s (None:
        as fast as the window allows)."""
        self.rounds_run += 1
        count = self.count if rate is None else max(self.devices, int(rate * self.duration))
        messages, readings = fleet_messages(self.devices, count, seed=self.rounds_run)
        with pika.BlockingConnection(pika.URLParameters(self.rabbit.url)) as admin:
            admin.channel().queue_purge(QUEUE)
        wan = self.rabbit.url.replace(f":{self.rabbit.port}/", f":{self.proxy.port}/")
        workdir = self.workdir / f"{variant}-{self.rounds_run}"
        with contextlib.ExitStack() as stack:
            if variant != "messages":
                stack.enter_context(Unpacker(self.rabbit.url, workdir / "unpack"))
            bridge = stack.enter_context(
                BridgeProcess(
                    self.mosquitto.port,
                    wan,
                    workdir,
                    receipts=False,
                    extra_config=VARIANTS[variant],
                )
            )
            assert bridge.proc is not None
            forwarded_before = metric(bridge.http_port, "iotpipe_bridge_forwarded_total")
            up0, down0 = self.proxy.counts()
            cpu0 = cpu_seconds([bridge.proc.pid])
            client = paho_client("bench-uplink")
            if rate is None:
                first, _ = publish_windowed(client, self.mosquitto.port, messages, WINDOW)
            else:
                first = publish_paced(client, self.mosquitto.port, messages, rate)
            client.disconnect()
            client.loop(0.1)
            target = forwarded_before + len(messages)
            wait_for(
                "the bridge's confirms",
                lambda: metric(bridge.http_port, "iotpipe_bridge_forwarded_total") >= target,
            )
            up1, down1 = self.proxy.counts()
            cpu1 = cpu_seconds([bridge.proc.pid])
            wait_for("the telemetry queue", lambda: queue_depth(self.rabbit.url) >= len(messages))
            done = time.monotonic()
        wire_bytes = (up1 - up0) + (down1 - down0)
        return Round(
            bytes_per_reading=round(wire_bytes / readings, 2),
            bytes_per_envelope=round(wire_bytes / len(messages), 1),
            up_bytes=up1 - up0,
            down_bytes=down1 - down0,
            cpu_us_per_reading=round((cpu1 - cpu0) / readings * 1e6, 2),
            rate=round(len(messages) / (done - first)),
        )


def publish_paced(
    client: paho.Client, port: int, messages: list[tuple[str, bytes]], rate: float
) -> float:
    """Publish message *i* at QoS 1 when it is due (``start + i / rate``); wait for every PUBACK.
    Returns the first publish's ``time.monotonic()``."""
    acked = 0

    def on_publish(*_args: object) -> None:
        nonlocal acked
        acked += 1

    client.max_inflight_messages_set(WINDOW)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    start = time.monotonic()
    for sent, (topic, payload) in enumerate(messages):
        while (wait := start + sent / rate - time.monotonic()) > 0:
            client.loop(min(wait, 0.01))
        client.publish(topic, payload, qos=1)
    while acked < len(messages):
        client.loop(0.01)
    return start


def declare(url: str) -> None:
    with pika.BlockingConnection(pika.URLParameters(url)) as admin:
        channel = admin.channel()
        channel.exchange_declare("iotpipe.telemetry", "topic", durable=True)
        channel.queue_declare(QUEUE, durable=True)
        channel.queue_bind(QUEUE, "iotpipe.telemetry", "iotpipe.v1.#")


def parse_rates(text: str) -> list[float | None]:
    rates: list[float | None] = []
    for part in text.split(","):
        if part.strip() == "max":
            rates.append(None)
            continue
        try:
            rate = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a rate: {part!r}") from None
        if not 1 <= rate <= 20_000:
            raise argparse.ArgumentTypeError(f"rate {part} is not between 1 and 20000")
        rates.append(rate)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100, help="simulated devices (default 100)")
    parser.add_argument(
        "--rates",
        type=parse_rates,
        default=parse_rates("100,max"),
        help="offered envelopes/s, comma-separated; 'max' = as fast as the window allows "
        "(default 100,max: the fleet at one envelope per device per second, then saturation)",
    )
    parser.add_argument(
        "--duration", type=float, default=30.0, help="seconds per paced round (default 30)"
    )
    parser.add_argument(
        "--messages", type=int, default=20_000, help="envelopes per 'max' round (default 20000)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each variant (default 3)")
    parser.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS}")
    args = parser.parse_args()
    if args.devices < 1 or args.messages < args.devices or args.rounds < 1 or args.duration <= 0:
        parser.error("need --devices >= 1, --messages >= --devices, --rounds >= 1, --duration > 0")

    sample, sample_readings = fleet_messages(args.devices, args.devices, seed=0)
    keys = [(rate, variant) for rate in args.rates for variant in VARIANTS]
    results: dict[tuple[float | None, str], list[Round]] = {key: [] for key in keys}
    with tempfile.TemporaryDirectory(prefix="bench-uplink-") as tmp:
        workdir = Path(tmp)
        rabbit = PrivateRabbit(workdir / "rabbit")
        rabbit.start()
        try:
            with PrivateMosquitto(max_inflight=WINDOW) as mosquitto:
                declare(rabbit.url)
                proxy = ByteProxy(("127.0.0.1", rabbit.port))
                rig = Rig(
                    mosquitto, rabbit, proxy, workdir, args.devices, args.messages, args.duration
                )
                try:
                    for number in range(args.rounds):
                        for rate, variant in keys:
                            outcome = rig.run(variant, rate)
                            results[rate, variant].append(outcome)
                            print(
                                f"round {number + 1} {label(rate)} {variant}: "
                                f"{outcome.bytes_per_reading} B/reading, "
                                f"{outcome.cpu_us_per_reading} us CPU/reading, "
                                f"{outcome.rate} envelopes/s",
                                file=sys.stderr,
                            )
                finally:
                    proxy.close()
        finally:
            rabbit.stop()

    def median(key: tuple[float | None, str], name: str) -> float:
        return float(statistics.median(getattr(r, name) for r in results[key]))

    figures = ("bytes_per_reading", "bytes_per_envelope", "cpu_us_per_reading", "rate")
    by_rate: dict[str, object] = {}
    for rate in args.rates:
        base = (rate, "messages")
        by_rate[label(rate)] = {
            "median": {v: {n: median((rate, v), n) for n in figures} for v in VARIANTS},
            "bytes_ratio_messages_over": {
                v: round(
                    median(base, "bytes_per_reading") / median((rate, v), "bytes_per_reading"), 2
                )
                for v in VARIANTS
                if v != "messages"
            },
            "cpu_ratio_over_messages": {
                v: round(
                    median((rate, v), "cpu_us_per_reading") / median(base, "cpu_us_per_reading"), 2
                )
                for v in VARIANTS
                if v != "messages"
            },
        }
    worst = min(
        median((rate, "messages"), "bytes_per_reading")
        / median((rate, "packed"), "bytes_per_reading")
        for rate in args.rates
    )
    summary = {
        "bench": "uplink",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "versions": {"pika": version("pika"), "zstandard": version("zstandard")},
        "fleet": {
            "devices": args.devices,
            "readings_per_envelope": round(sample_readings / len(sample), 2),
            "envelope_bytes": round(statistics.mean(len(p) for _, p in sample), 1),
            "paced_round_s": args.duration,
            "max_round_envelopes": args.messages,
        },
        "variants": VARIANTS,
        "rounds": args.rounds,
        "by_rate": by_rate,
        "packed_default_worst_bytes_ratio": round(worst, 2),
        "target_ratio": TARGET_RATIO,
        "meets_target": worst >= TARGET_RATIO,
        "rounds_detail": {
            f"{label(rate)}/{variant}": [vars(r) for r in rs]
            for (rate, variant), rs in results.items()
        },
        "id": uuid.uuid4().hex[:8],
    }
    print(json.dumps(summary, indent=2))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")


def label(rate: float | None) -> str:
    return "max" if rate is None else f"{rate:g}/s"


if __name__ == "__main__":
    main()

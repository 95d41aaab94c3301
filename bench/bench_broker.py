"""Embedded broker throughput (``iotpipe broker``) against Mosquitto, both measured in the same run.

    .venv/bin/python bench/bench_broker.py [--messages 30000] [--rounds 3] [--window 100]
        [--no-acl] [--candidate DIR ...] [--profile] [--no-save] [--check]

Starts, on free loopback ports, each for the whole run:

(a) embedded: ``iotpipe broker --config FILE --port P`` as a subprocess (its own process and
    GIL, as in production), at its default settings: auth off, no ACL, ``max_queued_messages``
    10,000 (so :class:`bridge.broker.SessionQueueLimitPlugin` is loaded);
(b) embedded_acl: the same with a password file and an ACL (``IotpipeAuthPlugin`` verifying
    argon2 at CONNECT, ``IotpipeAclPlugin`` asked for every PUBLISH): what a LAN-facing edge box
    runs. ``--no-acl`` leaves it out;
(c) mosquitto: a private ``mosquitto -c FILE`` (no persistence), ``max_inflight_messages`` set
    to the publisher's window (its default, 20, would throttle the subscriber below what the
    publisher may have in flight) and ``max_queued_messages 0`` (never drop): the baseline.

Each round, for each broker in turn (interleaved, so machine noise hits every path alike): a QoS
1 subscriber (paho, clean session, its own process, inline ``client.loop()``) subscribes
``iotpipe/v1/bench/+/telemetry`` and counts distinct message ids; then one paho publisher (this
process, single-threaded, inline loop, at most ``--window`` unacknowledged QoS 1 publishes, the
loop pumped every 32 publishes) sends ``--messages`` wire-1.0 telemetry envelopes of
``PAYLOAD_BYTES`` bytes (the project's typical telemetry size) from 10 devices. The rate is
messages / (first publish -> last message received by the subscriber); ``publisher_acked_msg_s``
is messages / (first publish -> last PUBACK). Clocks are ``time.monotonic()``, shared by the
processes. Also per round: CPU microseconds per message of publisher, subscriber and broker
(``/proc``, user + system); the three share this machine's cores.

Each ``--candidate DIR`` adds an interleaved variant of (a): ``iotpipe broker`` run with
``PYTHONPATH=DIR`` (a patched copy of ``bridge``/``iotpipe``, or of ``amqtt``), to measure a
proposed change against the current code in the same run. ``--profile`` runs one more round of
(a), and one of (b), under ``py-spy record --format raw`` and writes
``bench/results/broker-profile.txt``: for each, the broker's CPU per message, its samples
grouped by where the code lives (amqtt's packet codecs, its protocol handler, its broker, its
plugin manager, our layer, asyncio, logging), then the top functions by self and total time.

Prints one JSON object with the medians and the ratio embedded / mosquitto (target >= 0.5), and
writes it to ``bench/results/broker.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from benchlib import PUMP_EVERY, paho_client, publish_windowed, py_spy

from bridge.broker import add_user

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "broker.json"
PROFILE = ROOT / "bench" / "results" / "broker-profile.txt"
TARGET_RATIO = 0.5
PAYLOAD_BYTES = 265
DEVICES = 10
TOPIC_FILTER = "iotpipe/v1/bench/+/telemetry"
# The id is the 12 bytes after '{"v":"1.0","id":"' in every payload.
ID_SLICE = slice(17, 29)
ROUND_TIMEOUT = 120.0
PUBLISHER = ("bench-pub", "bench-pub-password")
SUBSCRIBER = ("bench-sub", "bench-sub-password")
ACL = """\
# bench_broker.py: the publisher may publish telemetry, the subscriber read it.
[users.bench-pub]
publish = ["iotpipe/v1/+/+/telemetry"]

[users.bench-sub]
subscribe = ["iotpipe/v1/#"]
"""


# -- messages -----------------------------------------------------------------------------------


def make_messages(tag: str, count: int) -> list[tuple[str, bytes]]:
    """``count`` wire-1.0 envelopes, ids ``<tag><i:08d>`` (12 bytes), round-robin devices."""
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
        payload = body.ljust(PAYLOAD_BYTES)
        assert len(payload) == PAYLOAD_BYTES, len(payload)
        assert payload[ID_SLICE].decode() == f"{tag}{i:08d}", payload
        out.append((f"iotpipe/v1/bench/{device}/telemetry", payload))
    return out


# -- brokers ------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    """Wait until something accepts connections on 127.0.0.1:``port`` (``proc`` must live)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on port {port}") from None
            time.sleep(0.05)


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads), from /proc."""
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    return 0.0


class BrokerProcess:
    """A broker subprocess on a free loopback port, its files in ``workdir``."""

    name = "broker"
    credentials: tuple[tuple[str, str], tuple[str, str]] | None = None

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / "broker.log"
        self.argv: list[str] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("IOTPIPE_")}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> BrokerProcess:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=self.workdir, stdout=log, stderr=log
            )
        wait_port(self.port, self.proc, self.log)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.returncode not in (0, -signal.SIGTERM):
            print(f"{self.name} exited {self.proc.returncode}:", file=sys.stderr)
            print(self.log.read_text()[-2000:], file=sys.stderr)


class EmbeddedBroker(BrokerProcess):
    """``iotpipe broker`` at its defaults, optionally with logins + ACL or a ``PYTHONPATH``."""

    def __init__(self, workdir: Path, *, acl: bool = False, pythonpath: Path | None = None) -> None:
        super().__init__(workdir)
        self.name = "iotpipe broker"
        config = workdir / "broker.toml"
        # http_port 0: two embedded brokers run side by side, /metrics on a free port each.
        lines = ["[broker]", f"port = {self.port}", "http_port = 0"]
        if acl:
            passwd = workdir / "passwd"
            for user, password in (PUBLISHER, SUBSCRIBER):
                add_user(passwd, user, password)
            (workdir / "acl.toml").write_text(ACL)
            lines += [f'password_file = "{passwd}"', f'acl_file = "{workdir / "acl.toml"}"']
            self.credentials = (PUBLISHER, SUBSCRIBER)
        config.write_text("\n".join(lines) + "\n")
        self.argv = [
            str(Path(sys.executable).parent / "iotpipe"),
            "broker",
            "--config",
            str(config),
            "--port",
            str(self.port),
        ]
        if pythonpath is not None:
            self.env["PYTHONPATH"] = os.pathsep.join(
                [str(pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])]
            )


class Mosquitto(BrokerProcess):
    """A throw-away Mosquitto (as tests/conftest.py's ``MosquittoProcess``, no persistence)."""

    def __init__(self, workdir: Path, max_inflight: int) -> None:
        super().__init__(workdir)
        self.name = "mosquitto"
        # As root, Mosquitto drops to the `mosquitto` user, which cannot enter a private tmp dir.
        as_root = "user root\n" if os.geteuid() == 0 else ""
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            as_root + f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            f"persistence false\nlog_dest file {workdir}/mosquitto.log\n"
            f"max_inflight_messages {max_inflight}\nmax_queued_messages 0\n"
        )
        self.argv = ["mosquitto", "-c", str(conf)]

    @staticmethod
    def version() -> str:
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False)
        first = (out.stdout or out.stderr).splitlines()
        return first[0] if first else "unknown"


# -- clients ------------------------------------------------------------------------------------


def client(prefix: str, login: tuple[str, str] | None) -> paho.Client:
    """A paho MQTT 3.1.1 clean-session client with a unique id."""
    return paho_client(prefix, login)


def subscribe(port: int, count: int, login: tuple[str, str] | None, pipe: Connection) -> None:
    """Child process: subscribe at QoS 1 and receive until ``count`` distinct ids arrived.

    Sends ``("ready",)`` once subscribed, then ``("done", last_monotonic, deliveries, distinct,
    cpu_seconds)``.
    """
    seen: set[bytes] = set()
    deliveries = 0
    last = 0.0
    subscribed = False

    def on_subscribe(_c: object, _u: object, _mid: int, codes: list[Any], _p: object) -> None:
        nonlocal subscribed
        if any(code.is_failure for code in codes):
            raise RuntimeError(f"subscription refused: {codes}")
        subscribed = True

    def on_message(_c: object, _u: object, message: paho.MQTTMessage) -> None:
        nonlocal deliveries, last
        seen.add(message.payload[ID_SLICE])
        deliveries += 1
        last = time.monotonic()

    mqtt = client("bench-sub", login)
    mqtt.on_connect = lambda c, *_: c.subscribe(TOPIC_FILTER, qos=1)
    mqtt.on_subscribe = on_subscribe
    mqtt.on_message = on_message
    mqtt.connect("127.0.0.1", port)
    deadline = time.monotonic() + 30
    while not subscribed and time.monotonic() < deadline:
        mqtt.loop(0.05)
    pipe.send(("ready",) if subscribed else ("not subscribed",))
    began = time.process_time()
    deadline = time.monotonic() + ROUND_TIMEOUT
    while len(seen) < count and time.monotonic() < deadline:
        mqtt.loop(0.01)
    cpu = time.process_time() - began
    for _ in range(10):  # PUBACK the last messages before leaving
        mqtt.loop(0.01)
    mqtt.disconnect()
    pipe.send(("done", last, deliveries, len(seen), cpu))


def publish(
    port: int,
    messages: list[tuple[str, bytes]],
    window: int,
    login: tuple[str, str] | None,
    received: Callable[[], bool],
) -> tuple[float, float]:
    """Publish every message at QoS 1 (the fastest paho loop); return (first publish, last ack).

    Stays connected until ``received()`` says the subscriber has everything, so the measured
    brokers are compared on the same terms (plain amqtt 0.12 also dropped what a publisher had
    had acknowledged but not yet forwarded when it disconnected; ``iotpipe broker`` no longer
    does, ``tests/bridge/test_mqtt311.py``).
    """
    mqtt = client("bench-pub", login)
    started, finished = publish_windowed(mqtt, port, messages, window)
    deadline = finished + ROUND_TIMEOUT
    while not received() and time.monotonic() < deadline:
        mqtt.loop(0.01)
    mqtt.disconnect()
    mqtt.loop(0.1)
    return started, finished


@dataclass
class Round:
    """One measured round of one path."""

    rate: float  # messages / (first publish -> last message received)
    publish_rate: float  # messages / (first publish -> last PUBACK at the publisher)
    cpu_us: dict[str, float] = field(default_factory=dict)  # per process, per message
    duplicates: int = 0


@dataclass
class Rig:
    """What every round needs."""

    window: int
    rounds_run: int = 0

    def run(self, broker: BrokerProcess, count: int) -> Round:
        """Publish ``count`` messages through ``broker`` and time them until all arrived."""
        self.rounds_run += 1
        messages = make_messages(f"r{self.rounds_run % 100:02d}-", count)
        pub_login, sub_login = broker.credentials or (None, None)
        context = multiprocessing.get_context("fork")
        parent, child = context.Pipe()
        subscriber = context.Process(
            target=subscribe, args=(broker.port, count, sub_login, child), name="bench-subscriber"
        )
        subscriber.start()
        try:
            if not parent.poll(30) or (answer := parent.recv()) != ("ready",):
                raise RuntimeError(f"{broker.name}: subscriber did not start")
            broker_cpu = cpu_seconds(broker.pid)
            own = time.process_time()
            first, acked = publish(
                broker.port, messages, self.window, pub_login, lambda: parent.poll(0)
            )
            publisher_cpu = time.process_time() - own
            if not parent.poll(10):
                raise RuntimeError(f"{broker.name}: subscriber did not finish")
            answer = parent.recv()
            broker_cpu = cpu_seconds(broker.pid) - broker_cpu
        finally:
            subscriber.join(10)
            if subscriber.is_alive():
                subscriber.terminate()
        _, last, deliveries, distinct, subscriber_cpu = answer
        if distinct != count:
            tail = broker.log.read_text()[-2000:]
            raise RuntimeError(
                f"{broker.name}: {distinct} of {count} messages arrived; log:\n{tail}"
            )
        cpu = {"publisher": publisher_cpu, "subscriber": subscriber_cpu, "broker": broker_cpu}
        return Round(
            rate=count / (last - first),
            publish_rate=count / (acked - first),
            cpu_us={name: round(seconds / count * 1e6, 1) for name, seconds in cpu.items()},
            duplicates=deliveries - distinct,
        )


# -- profile ------------------------------------------------------------------------------------

# Where a frame's code lives, first match wins: the groups the summary adds self time up by.
GROUPS = (
    ("bridge/", "our layer (bridge/, iotpipe/)"),
    ("iotpipe/", "our layer (bridge/, iotpipe/)"),
    ("amqtt/plugins/", "amqtt plugin manager (fire_event, map_plugin_*)"),
    ("amqtt/mqtt/protocol/", "amqtt protocol handler (reader loop, QoS flows)"),
    ("amqtt/mqtt/", "amqtt packet codecs (parse, build, encode)"),
    ("amqtt/codecs", "amqtt packet codecs (parse, build, encode)"),
    ("amqtt/adapters", "amqtt stream adapters"),
    ("amqtt/broker.py", "amqtt broker (broadcast, _matches, delivery)"),
    ("amqtt/session.py", "amqtt session / messages"),
    ("amqtt/", "amqtt, other"),
    ("asyncio/", "asyncio (tasks, queues, wait_for, streams)"),
    ("logging/", "logging"),
    ("transitions/", "transitions (state machine)"),
)


def profile_round(rig: Rig, name: str, broker: BrokerProcess, count: int) -> str:
    """One more round with ``py-spy record`` attached to ``broker``; return the summary text."""
    raw = broker.workdir / "profile.raw"
    with py_spy(broker.pid, raw, "--nolineno", fmt="raw"):
        profiled = rig.run(broker, count)
    settings = "logins and an ACL" if broker.credentials else "defaults: auth off, no ACL"
    header = (
        f"== {name}: {count} messages through `iotpipe broker` ({settings}) under py-spy "
        f"record --rate 250 (samples of the broker's thread while it runs Python, idle time in "
        f"epoll left out): {profiled.rate:.0f} msg/s, broker CPU {profiled.cpu_us['broker']:.1f} "
        f"us/msg (/proc, user + system, py-spy's pauses included)\n\n"
    )
    return header + summarize_profile(raw.read_text())


def summarize_profile(raw: str, top: int = 30) -> str:
    """Self time by code group, then the top functions by self and by total time, of the event
    loop's thread (``raw`` is py-spy's collapsed-stack output with ``--threads``: ``thread
    (TID): NAME;frame;... count`` per line, outermost first). Other threads (the pool that
    verifies passwords, idle in its queue) are only counted."""
    total = 0
    others: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    groups: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        weight = int(count)
        thread, _, stack = stack.partition(";")
        name = thread.partition(": ")[2]
        if name != "MainThread":
            others[name or thread] += weight
            continue
        names = [_frame_name(frame) for frame in stack.split(";")]
        names = [name for name in names if name]
        if not names:
            continue
        total += weight
        self_time[names[-1]] += weight
        groups[_group(names[-1])] += weight
        for name in set(names):
            inclusive[name] += weight
    if total == 0:
        return "no py-spy samples\n"
    # Frames on (nearly) every sample are the entry chain (typer, asyncio.run, run_forever):
    # they say nothing, so they are left out of the total-time list.
    calls = Counter({name: n for name, n in inclusive.items() if n < 0.97 * total})
    lines = [
        f"self time of the event loop's thread by where the code lives ({total} samples = 100%):"
    ]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in groups.most_common()]
    lines += ["", "self time, top functions:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    lines += ["", "total time, including callees (entry chain left out):"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in calls.most_common(top)]
    if others:
        lines += ["", "samples of other threads (not above; mostly idle waits py-spy counts):"]
        lines += [f"  {n:6d}  {name}" for name, n in others.most_common()]
    return "\n".join(lines) + "\n"


_FRAME = re.compile(r"^(?P<name>.*) \((?P<path>[^()]*)\)$")


def _frame_name(frame: str) -> str:
    """``function (path)``, the path shortened to the package (``amqtt/broker.py``)."""
    found = _FRAME.match(frame)
    if found is None:
        return "" if frame.startswith(("process ", "thread ")) else frame
    path = found["path"]
    for marker in ("/site-packages/", f"/python{sys.version_info[0]}.{sys.version_info[1]}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.removeprefix(str(ROOT) + "/")
    return f"{found['name']} ({path})"


def _group(name: str) -> str:
    path = name.rpartition(" (")[2]
    for prefix, group in GROUPS:
        if path.startswith(prefix):
            return group
    return "other (stdlib, paho-free C calls, ...)"


# -- main ----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000, help="per round and broker")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--window", type=int, default=100, help="publisher's unacknowledged QoS 1 publishes"
    )
    parser.add_argument(
        "--no-acl", action="store_true", help="leave out the embedded broker with logins + ACL"
    )
    parser.add_argument(
        "--candidate",
        type=Path,
        action="append",
        default=[],
        help="also run iotpipe broker with PYTHONPATH=DIR (a patched copy), interleaved; repeatable",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more round of each embedded broker under py-spy record",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the ratio is below the target"
    )
    args = parser.parse_args()

    started = time.monotonic()
    load_start = os.getloadavg()[0]  # other work on the machine skews every figure
    rig = Rig(args.window)
    with (
        tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        workdir = Path(tmp)
        brokers: dict[str, BrokerProcess] = {
            "embedded": EmbeddedBroker(workdir / "embedded"),
            "mosquitto": Mosquitto(workdir / "mosquitto", args.window),
        }
        if not args.no_acl:
            brokers["embedded_acl"] = EmbeddedBroker(workdir / "embedded-acl", acl=True)
        for path in args.candidate:
            brokers[f"candidate:{path.name}"] = EmbeddedBroker(
                workdir / f"candidate-{path.name}", pythonpath=path.resolve()
            )
        for broker in brokers.values():
            stack.enter_context(broker)
        samples: dict[str, list[Round]] = {name: [] for name in brokers}
        for broker in brokers.values():  # unmeasured: warms up the brokers and caches
            rig.run(broker, 3000)
        order = list(brokers)
        for round_number in range(args.rounds):
            # Interleaved, and each round starts with the next broker, so neither machine noise
            # nor the position in a round favours one path.
            shift = round_number % len(order)
            for name in order[shift:] + order[:shift]:
                samples[name].append(rig.run(brokers[name], args.messages))
        profile = None
        if args.profile:
            profile = "\n\n".join(
                profile_round(rig, name, brokers[name], args.messages)
                for name in ("embedded", "embedded_acl")
                if name in brokers
            )
            PROFILE.parent.mkdir(parents=True, exist_ok=True)
            PROFILE.write_text(profile)

    medians = {name: statistics.median(r.rate for r in rounds) for name, rounds in samples.items()}
    result: dict[str, Any] = {
        "benchmark": "broker",
        "messages_per_round": args.messages,
        "rounds": args.rounds,
        "payload_bytes": PAYLOAD_BYTES,
        "devices": DEVICES,
        "qos": 1,
        "publisher_window": args.window,
        "publisher_pump_every": PUMP_EVERY,
        "mosquitto_max_inflight_messages": args.window,
        "embedded_settings": "iotpipe broker defaults (auth off, no ACL, max_queued_messages 10000)",
        "embedded_msg_s": round(medians["embedded"]),
        "mosquitto_msg_s": round(medians["mosquitto"]),
        "ratio": round(medians["embedded"] / medians["mosquitto"], 3),
        "target_ratio": TARGET_RATIO,
    }
    if "embedded_acl" in medians:
        result["embedded_acl_msg_s"] = round(medians["embedded_acl"])
        result["acl_vs_embedded"] = round(medians["embedded_acl"] / medians["embedded"], 3)
    candidates = [name for name in samples if name.startswith("candidate:")]
    if candidates:
        result["candidates_vs_embedded"] = {
            name: round(medians[name] / medians["embedded"], 3) for name in candidates
        }
    result |= {
        "samples_msg_s": {
            name: [round(r.rate) for r in rounds] for name, rounds in samples.items()
        },
        "publisher_acked_msg_s": {
            name: round(statistics.median(r.publish_rate for r in rounds))
            for name, rounds in samples.items()
        },
        "cpu_us_per_msg": {
            name: {
                key: round(statistics.median(r.cpu_us[key] for r in rounds), 1)
                for key in rounds[0].cpu_us
            }
            for name, rounds in samples.items()
        },
        "duplicates": {name: sum(r.duplicates for r in rounds) for name, rounds in samples.items()},
        "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "python": platform.python_version(),
        "paho": version("paho-mqtt"),
        "amqtt": version("amqtt"),
        "mosquitto": Mosquitto.version(),
        "machine": f"{platform.machine()} x{os.cpu_count() or 1}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bench_seconds": round(time.monotonic() - started),
    }
    print(json.dumps(result))
    if profile is not None:
        print(profile, file=sys.stderr)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = RESULTS.with_suffix(".json.tmp")
        tmp_file.write_text(json.dumps(result, indent=2) + "\n")
        tmp_file.replace(RESULTS)
    if args.check and result["ratio"] < TARGET_RATIO:
        sys.exit(f"embedded/mosquitto ratio {result['ratio']} is below the target {TARGET_RATIO}")


if __name__ == "__main__":
    main()

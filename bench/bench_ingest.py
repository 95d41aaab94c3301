"""Ingest throughput: mapped JSON and Sparkplug B messages through the bridge next to native
envelopes, all measured in the same run.

    .venv/bin/python bench/bench_ingest.py [--messages 20000] [--rounds 3] [--window 1000]
        [--variants native,zigbee2mqtt,tasmota,sparkplug] [--profile] [--no-save] [--check]

Starts a private Mosquitto and a private RabbitMQ node (free loopback ports, deleted at the
end), then runs each variant once per round, interleaved round by round so machine noise hits
every variant alike:

- ``native``: the simulator's wire-1.0 envelopes on ``iotpipe/v1/bench/<device>/telemetry``
  (the bridge's native path, untouched by the ingest rules);
- ``zigbee2mqtt``: the simulator's Zigbee2MQTT state messages, mapped by the ``zigbee2mqtt``
  preset rule (flat JSON, ``last_seen`` as the time);
- ``tasmota``: the simulator's Tasmota ``tele/<device>/SENSOR`` messages, mapped by the
  ``tasmota`` preset rule (nested JSON, local ``Time``);
- ``sparkplug``: one NBIRTH per edge node first, then NDATA by alias (built with
  :mod:`iotpipe.sparkplug`'s encoder), mapped by a ``format = "sparkplug"`` rule.

Every variant has 10 devices (edge nodes) and 7 readings per message: the simulator's sensors
are chosen so that each format writes seven values (see :data:`VARIANTS`); Sparkplug's NDATA
carry seven metrics, its NBIRTHs the seven plus ``bdSeq``. The messages are made in-process
before each round (the simulator on in-memory links with a simulated clock, one sample per
simulated second per device, so every JSON message has its own time and so its own id) and
checked in-process with the bridge's own :class:`bridge.ingest.Ingest`: every one maps to
exactly one envelope, none is refused, and the readings are counted.

Each round: a fresh ``iotpipe bridge`` subprocess (default settings plus all three ingest rules,
the same config for every variant, so the native path also pays for the rules being there)
with its own spool; a paho QoS 1 publisher (``--window`` unacknowledged) -> Mosquitto -> the
bridge -> exchange ``iotpipe.telemetry`` -> a durable queue bound ``iotpipe.v1.#``; a pika
consumer in a separate process counts distinct AMQP message ids (the envelope ids) until all
expected envelopes arrived. Each rate is messages / (first publish -> last envelope consumed).

Reported per variant (medians over the rounds): messages/s, envelopes/s, readings/s, CPU
microseconds per message of every process (the bridge's from /proc), and the ratio of its
messages/s to native's (goal >= 0.8). ``--profile`` runs one more round per variant under
``py-spy record --gil`` and writes ``bench/results/ingest-profile-<variant>.txt`` (CPU per
thread, then the share of GIL-holding samples per function, as ``bench_bridge.py --profile``).

Prints one JSON object and writes it to ``bench/results/ingest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/ is not an installed package; PrivateRabbit lives there

from bench_bridge import (  # noqa: E402
    ROUND_TIMEOUT,
    TELEMETRY_EXCHANGE,
    BridgeProcess,
    PrivateMosquitto,
    consume,
    cpu_seconds,
    group_pids,
    publish,
    summarize_profile,
    thread_cpu,
)
from benchlib import PUMP_EVERY, py_spy  # noqa: E402

from bridge.ingest import Ingest, IngestRule  # noqa: E402
from iotpipe.envelope import Envelope, decode  # noqa: E402
from iotpipe.mqtt import Will  # noqa: E402
from iotpipe.sparkplug import (  # noqa: E402
    BDSEQ_METRIC,
    DataType,
    MessageType,
    Metric,
    Payload,
    build_topic,
    encode_payload,
)
from simulator.link import MemoryLink  # noqa: E402
from simulator.run import Simulation  # noqa: E402
from simulator.settings import SimulateSettings  # noqa: E402
from tests.rabbitmq import PrivateRabbit  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "ingest.json"
PROFILE = ROOT / "bench" / "results" / "ingest-profile"
TARGET_RATIO = 0.8
DEVICES = 10
READINGS = 7
QUEUE = "bench.ingest"
BINDING = "iotpipe.v1.#"
SITE = "bench"

#: Per simulated variant: the simulator's format, device names and sensors (chosen so that each
#: format writes READINGS values per message), and which topics carry its telemetry.
VARIANTS: dict[str, dict[str, Any]] = {
    "native": {
        "format": "envelope",
        "device_pattern": "dev-{n:02d}",
        # one reading per sensor
        "sensors": ["temperature", "humidity", "pressure", "power", "battery", "door", "motion"],
    },
    "zigbee2mqtt": {
        "format": "zigbee2mqtt",
        "device_pattern": "z2m-{n:02d}",
        # battery, contact, humidity, linkquality, power, pressure, temperature (+ last_seen)
        "sensors": ["temperature", "humidity", "pressure", "power", "battery", "door"],
    },
    "tasmota": {
        "format": "tasmota",
        "device_pattern": "tasmota-{n:02d}",
        # AM2301 Temperature, Humidity; BMP280 Pressure; ENERGY Total, Power, Voltage, Current
        "sensors": ["temperature", "humidity", "pressure", "power"],
    },
}
SPARKPLUG_METRICS: tuple[tuple[str, DataType], ...] = (
    ("temperature", DataType.DOUBLE),
    ("humidity", DataType.DOUBLE),
    ("pressure", DataType.DOUBLE),
    ("power", DataType.FLOAT),
    ("battery", DataType.INT32),
    ("door", DataType.BOOLEAN),
    ("motion", DataType.BOOLEAN),
)
ALL_VARIANTS = ("native", "zigbee2mqtt", "tasmota", "sparkplug")

#: The ingest rules of every round's bridge (appended to its ``[bridge]`` section).
RULES = f"""
[[bridge.ingest]]
name = "zigbee2mqtt"
preset = "zigbee2mqtt"
site = "{SITE}"

[[bridge.ingest]]
name = "tasmota"
preset = "tasmota"
site = "{SITE}"

[[bridge.ingest]]
name = "sparkplug"
filter = "spBv1.0/#"
format = "sparkplug"
units = {{ temperature = "Cel", humidity = "%RH", pressure = "hPa", power = "W", battery = "%" }}
"""


# -- messages -----------------------------------------------------------------------------------


class _Clock:
    """Simulated monotonic time: moves only when the simulation waits."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class _Link(MemoryLink):
    """A MemoryLink on the simulated clock."""

    def __init__(self, clock: _Clock, will: Will | None) -> None:
        super().__init__(will)
        self.clock = clock

    def pump(self, timeout: float = 0.0) -> None:
        self.clock.now += timeout  # waiting for the network takes (simulated) time
        super().pump(timeout)


def simulated(variant: str, count: int, start_s: int, seed: int) -> list[tuple[str, bytes]]:
    """``count`` telemetry messages of ``variant`` from the simulator, in publish order."""
    spec = VARIANTS[variant]
    clock = _Clock()
    links: list[MemoryLink] = []

    def factory(index: int, will: Will | None) -> MemoryLink:
        del index
        links.append(_Link(clock, will))
        return links[-1]

    settings = SimulateSettings(
        sites=1,
        site_pattern=SITE,
        devices=DEVICES,
        device_pattern=spec["device_pattern"],
        sensors=spec["sensors"],
        format=spec["format"],
        rate=1,
        speed=1000,
        start=datetime.fromtimestamp(start_s, UTC),
        count=count,
        seed=seed,
        receipts="off",
        status=False,
    )
    Simulation(settings, factory, clock=clock, wall=lambda: float(start_s), sleep=clock.sleep).run()
    messages = [(m.topic, m.payload) for link in links for m in link.messages]
    telemetry = [m for m in messages if _is_telemetry(variant, m[0])]
    if len(telemetry) != count:
        raise RuntimeError(f"{variant}: the simulator made {len(telemetry)} of {count} messages")
    return telemetry


def _is_telemetry(variant: str, topic: str) -> bool:
    if variant == "native":
        return topic.endswith("/telemetry")
    if variant == "tasmota":
        return topic.endswith("/SENSOR")
    return topic.count("/") == 1  # zigbee2mqtt/<friendly_name>


def sparkplug(count: int, start_s: int, seed: int) -> list[tuple[str, bytes]]:
    """One NBIRTH per edge node (metrics with aliases), then NDATA by alias, round-robin:
    ``count`` messages in all, one sample per simulated second per node."""
    rng = random.Random(seed)
    nodes = [f"node-{n:02d}" for n in range(1, DEVICES + 1)]
    start_ms = start_s * 1000
    messages = []
    for n, node in enumerate(nodes):
        metrics = [Metric(BDSEQ_METRIC, timestamp=start_ms, datatype=DataType.INT64, value=0)]
        metrics += [
            Metric(name, alias, start_ms, kind, _value(kind, rng))
            for alias, (name, kind) in enumerate(SPARKPLUG_METRICS, start=1)
        ]
        birth = Payload(timestamp=start_ms + n, seq=0, metrics=tuple(metrics))
        messages.append((build_topic(SITE, MessageType.NBIRTH, node), encode_payload(birth)))
    topics = [build_topic(SITE, MessageType.NDATA, node) for node in nodes]
    for i in range(count - len(nodes)):
        ts = start_ms + 1000 * (1 + i // DEVICES) + i % DEVICES
        # Data messages leave name and datatype out: the birth declared them.
        metrics = [
            Metric(alias=alias, timestamp=ts, value=_value(kind, rng))
            for alias, (_name, kind) in enumerate(SPARKPLUG_METRICS, start=1)
        ]
        data = Payload(timestamp=ts, seq=(1 + i // DEVICES) % 256, metrics=tuple(metrics))
        messages.append((topics[i % DEVICES], encode_payload(data)))
    return messages


def _value(kind: DataType, rng: random.Random) -> float | int | bool:
    if kind == DataType.BOOLEAN:
        return rng.random() < 0.5
    if kind == DataType.INT32:
        return rng.randint(0, 100)
    if kind == DataType.FLOAT:
        return float(round(rng.uniform(0, 2000), 1))
    return round(rng.uniform(-10, 1100), 2)


def make_messages(variant: str, count: int, round_no: int) -> list[tuple[str, bytes]]:
    """A round's messages: each round its own start time, so its own ids."""
    start_s = int(time.time()) - 86_400 + round_no * (count // DEVICES + 10)
    if variant == "sparkplug":
        return sparkplug(count, start_s, round_no)
    return simulated(variant, count, start_s, round_no)


def check_messages(variant: str, messages: list[tuple[str, bytes]]) -> int:
    """Map every message in-process as the bridge will; return the readings they carry.

    Raises:
        RuntimeError: a message would be dead-lettered or not make exactly one envelope (the
            bench would then not measure the path it names).
    """
    readings = 0
    if variant == "native":
        for topic, payload in messages:
            decoded = decode(topic, payload)
            if not isinstance(decoded, Envelope):
                raise RuntimeError(f"bad bench message on {topic}: {decoded}")
            readings += len(decoded.readings)
        return readings
    ingest = Ingest(rules())
    now_ms = int(time.time() * 1000)
    for topic, payload in messages:
        result = ingest.map(topic, payload, now_ms)
        if result is None or result[0] != variant or len(result[1].mapped) != 1:
            raise RuntimeError(f"{variant}: {topic} does not map to one envelope: {result}")
        readings += len(result[1].mapped[0].readings)
    return readings


def rules() -> list[IngestRule]:
    """:data:`RULES` as the bridge reads them."""
    import tomllib

    tables = tomllib.loads(RULES)["bridge"]["ingest"]
    return [IngestRule.model_validate(table) for table in tables]


# -- rounds -------------------------------------------------------------------------------------


@dataclass
class Round:
    """One measured round of one variant."""

    messages: int
    envelopes: int
    readings: int
    seconds: float  # first publish -> last envelope consumed
    cpu_us: dict[str, float] = field(default_factory=dict)  # per process, per message
    duplicates: int = 0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


@dataclass
class Rig:
    """The running brokers and what each round needs."""

    mosquitto: PrivateMosquitto
    rabbit: PrivateRabbit
    window: int
    workdir: Path
    rounds_run: int = 0
    thread_cpu: dict[int, float] = field(default_factory=dict)  # of the last bridge

    def run(self, variant: str, count: int, profile: Path | None = None) -> Round:
        """One round of ``variant``: ``count`` messages through a fresh bridge."""
        self.rounds_run += 1
        messages = make_messages(variant, count, self.rounds_run)
        readings = check_messages(variant, messages)
        envelopes = len(messages)  # one each, checked above
        with pika.BlockingConnection(pika.URLParameters(self.rabbit.url)) as admin:
            admin.channel().queue_purge(QUEUE)
        context = multiprocessing.get_context("fork")
        parent, child = context.Pipe()
        consumer = context.Process(
            target=consume,
            args=(self.rabbit.url, QUEUE, envelopes, child),
            kwargs={"by_message_id": True},
            name="bench-consumer",
        )
        with self.bridge(profile) as bridge_pid:
            consumer.start()
            if not parent.poll(30) or parent.recv() != ("ready",):
                raise RuntimeError("consumer did not start")
            assert self.mosquitto.proc is not None
            assert self.rabbit.proc is not None
            accounts = [
                ("mosquitto", [self.mosquitto.proc.pid]),
                ("rabbitmq", group_pids(self.rabbit.proc.pid)),
                ("bridge", [bridge_pid]),
            ]
            before = {name: cpu_seconds(pids) for name, pids in accounts}
            own = time.process_time()
            first, _acked = publish(self.mosquitto.port, messages, self.window)
            publisher_cpu = time.process_time() - own
            if not parent.poll(ROUND_TIMEOUT):
                raise RuntimeError(f"{variant}: consumer did not finish")
            _, last, deliveries, distinct, consumer_cpu = parent.recv()
            after = {name: cpu_seconds(pids) for name, pids in accounts}
        consumer.join(10)
        if distinct != envelopes:
            raise RuntimeError(f"{variant}: {distinct} of {envelopes} envelopes arrived")
        cpu = {"publisher": publisher_cpu, "consumer": consumer_cpu}
        cpu |= {name: after[name] - before[name] for name in before}
        return Round(
            messages=count,
            envelopes=envelopes,
            readings=readings,
            seconds=last - first,
            cpu_us={name: round(seconds / count * 1e6, 1) for name, seconds in cpu.items()},
            duplicates=deliveries - distinct,
        )

    @contextlib.contextmanager
    def bridge(self, profile: Path | None) -> Iterator[int]:
        """A fresh bridge with :data:`RULES` around one round; yields its pid."""
        workdir = self.workdir / f"bridge-{self.rounds_run}"
        with contextlib.ExitStack() as stack:
            bridge = stack.enter_context(
                BridgeProcess(
                    self.mosquitto.port, self.rabbit.url, workdir, extra_config=RULES.lstrip()
                )
            )
            assert bridge.proc is not None
            if profile is not None:
                stack.enter_context(py_spy(bridge.proc.pid, profile, "--gil"))
            before = thread_cpu(bridge.proc.pid)
            try:
                yield bridge.proc.pid
            finally:
                after = thread_cpu(bridge.proc.pid)
                self.thread_cpu = {tid: after[tid] - before.get(tid, 0.0) for tid in after}


def declare(url: str) -> None:
    """The durable queue, bound ``iotpipe.v1.#`` to ``iotpipe.telemetry``."""
    with pika.BlockingConnection(pika.URLParameters(url)) as admin:
        channel = admin.channel()
        # As the bridge declares it, so the binding exists before the bridge's first publish.
        channel.exchange_declare(TELEMETRY_EXCHANGE, "topic", durable=True)
        channel.queue_declare(QUEUE, durable=True)
        channel.queue_bind(QUEUE, TELEMETRY_EXCHANGE, BINDING)


# -- main ---------------------------------------------------------------------------------------


def summary(name: str, rounds: list[Round], native: float | None) -> dict[str, Any]:
    """The medians of one variant's rounds."""
    msg_s = statistics.median(r.rate for r in rounds)
    per_message = rounds[0].readings / rounds[0].messages
    out: dict[str, Any] = {
        "msg_s": round(msg_s),
        "envelopes_s": round(statistics.median(r.envelopes / r.seconds for r in rounds)),
        "readings_s": round(statistics.median(r.readings / r.seconds for r in rounds)),
        "readings_per_message": round(per_message, 2),
        "bridge_cpu_us_per_msg": round(statistics.median(r.cpu_us["bridge"] for r in rounds), 1),
        "ratio_to_native": None if native is None else round(msg_s / native, 3),
        "samples_msg_s": [round(r.rate) for r in rounds],
        "cpu_us_per_msg": {
            key: round(statistics.median(r.cpu_us[key] for r in rounds), 1)
            for key in rounds[0].cpu_us
        },
        "duplicates": sum(r.duplicates for r in rounds),
    }
    if name == "native":
        del out["ratio_to_native"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000, help="per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=1000, help="publisher's unacked QoS 1")
    parser.add_argument(
        "--mosquitto-inflight", type=int, default=1000, help="Mosquitto max_inflight_messages"
    )
    parser.add_argument(
        "--variants",
        default=",".join(ALL_VARIANTS),
        help=f"comma-separated, from {', '.join(ALL_VARIANTS)} (native is always run)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="one more round per variant under py-spy record; bench/results/ingest-profile-*",
    )
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a variant's ratio is below the target"
    )
    args = parser.parse_args()
    variants = ["native", *(v for v in args.variants.split(",") if v and v != "native")]
    for name in variants:
        if name not in ALL_VARIANTS:
            parser.error(f"unknown variant {name!r}; one of {', '.join(ALL_VARIANTS)}")
    if args.messages < 10 * DEVICES:
        parser.error(f"--messages must be at least {10 * DEVICES}")

    started = time.monotonic()
    load_start = os.getloadavg()[0]  # other work on the machine skews every figure
    samples: dict[str, list[Round]] = {name: [] for name in variants}
    profiles: dict[str, str] = {}
    with (
        tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp,
        PrivateMosquitto(args.mosquitto_inflight) as mosquitto,
    ):
        rabbit = PrivateRabbit(Path(tmp) / "rabbitmq")
        try:
            rabbit.start()
            declare(rabbit.url)
            rig = Rig(mosquitto, rabbit, args.window, Path(tmp))
            for name in variants:  # unmeasured: warms up the brokers, the queue, the caches
                rig.run(name, 2000)
            for _ in range(args.rounds):  # interleaved, so machine noise hits every variant alike
                for name in variants:
                    samples[name].append(rig.run(name, args.messages))
            if args.profile:
                for name in variants:
                    speedscope = Path(f"{PROFILE}-{name}.speedscope.json")
                    speedscope.parent.mkdir(parents=True, exist_ok=True)
                    profiled = rig.run(name, args.messages, profile=speedscope)
                    profiles[name] = (
                        f"{name}: {args.messages} messages through the bridge under py-spy "
                        f"record --gil --rate 250: {profiled.rate:.0f} msg/s\n\n"
                        + summarize_profile(speedscope, rig.thread_cpu, args.messages)
                    )
                    Path(f"{PROFILE}-{name}.txt").write_text(profiles[name])
            rabbit_version = rabbit.ctl("version").stdout.strip()
        finally:
            rabbit.kill()
        mosquitto_version = mosquitto.version()

    native = statistics.median(r.rate for r in samples["native"])
    result: dict[str, Any] = {
        "benchmark": "ingest",
        "messages_per_round": args.messages,
        "rounds": args.rounds,
        "devices": DEVICES,
        "readings_per_message": {
            "native": "7 (temperature, humidity, pressure, power, battery, door, motion)",
            "zigbee2mqtt": "7 (battery, contact, humidity, linkquality, power, pressure, "
            "temperature; last_seen is the time)",
            "tasmota": "7 (AM2301 Temperature, Humidity; BMP280 Pressure; ENERGY Total, Power, "
            "Voltage, Current; Time is the time)",
            "sparkplug": f"7 metrics by alias per NDATA (7 + bdSeq in each of the {DEVICES} "
            "NBIRTHs that open the round)",
        },
        "qos": 1,
        "publisher_window": args.window,
        "publisher_pump_every": PUMP_EVERY,
        "mosquitto_max_inflight_messages": args.mosquitto_inflight,
        "bridge_settings": "defaults + the zigbee2mqtt, tasmota and sparkplug rules, every round",
        "target_ratio": TARGET_RATIO,
        "variants": {
            name: summary(name, rounds, None if name == "native" else native)
            for name, rounds in samples.items()
        },
        "loadavg_1m_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "python": platform.python_version(),
        "paho": version("paho-mqtt"),
        "pika": version("pika"),
        "protobuf": version("protobuf"),
        "mosquitto": mosquitto_version,
        "rabbitmq": rabbit_version,
        "machine": f"{platform.machine()} x{os.cpu_count() or 1}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bench_seconds": round(time.monotonic() - started),
    }
    print(json.dumps(result))
    for text in profiles.values():
        print(text, file=sys.stderr)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = RESULTS.with_suffix(".json.tmp")
        tmp_file.write_text(json.dumps(result, indent=2) + "\n")
        tmp_file.replace(RESULTS)
    below = {
        name: v["ratio_to_native"]
        for name, v in result["variants"].items()
        if name != "native" and v["ratio_to_native"] < TARGET_RATIO
    }
    if args.check and below:
        sys.exit(f"below the target ratio {TARGET_RATIO}: {below}")


if __name__ == "__main__":
    main()

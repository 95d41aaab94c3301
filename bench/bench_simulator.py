"""Simulator throughput against a minimal raw paho loop, into the same private Mosquitto.

    .venv/bin/python bench/bench_simulator.py [--messages 30000] [--rounds 3] [--check]

Starts a private Mosquitto on a free port, then alternates, ``--rounds`` times each:

(a) raw: a minimal paho QoS 1 publish loop, single-threaded with inline ``client.loop()``, at
    most ``--window`` (1000) unacknowledged messages, publishing one pre-built payload of the
    same size as the simulator's messages, in two variants: ``raw_window`` runs the loop only
    while the window is full, ``raw_pump32`` also runs it (without waiting) every 32 messages (the fastest cadence here);
    the faster median is the baseline;
(b) simulator: ``Simulation.run()`` with ``rate = "max"``, ``--devices`` devices (10) on one
    connection, status messages on, no faults: generation, encoding, windowed publishing and
    accounting, exactly as ``iotpipe simulate --rate max --connections 1`` runs them.

Rounds are interleaved (raw_window, raw_pump32, simulator, raw_window, ...) so machine noise hits
every variant alike. Each figure is messages / (first publish -> last acknowledgement). Prints
one JSON object with the medians and the ratio simulator / best raw (target >= 0.8) and writes
it to ``bench/results/simulator.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from iotpipe.mqtt import MqttClient, Will
from iotpipe.settings import MqttSettings
from simulator.fleet import Fleet
from simulator.run import Simulation
from simulator.settings import SimulateSettings

RESULTS = Path(__file__).parent / "results" / "simulator.json"
TARGET_RATIO = 0.8


class PrivateMosquitto:
    """A throw-away Mosquitto on a free loopback port (same settings as the test fixture)."""

    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self._dir = tempfile.TemporaryDirectory(prefix="bench-mosquitto-")
        workdir = Path(self._dir.name)
        shutil.chown(workdir, "mosquitto", "mosquitto")
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"log_dest file {workdir}/mosquitto.log\nmax_queued_messages 0\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PrivateMosquitto:
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)])
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not start") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self._dir.cleanup()

    def version(self) -> str:
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, check=False)
        first = (out.stdout or out.stderr).splitlines()
        return first[0] if first else "unknown"


def raw_paho(
    port: int, topic: str, payload: bytes, messages: int, window: int, pump_every: int = 0
) -> float:
    """The minimal publisher: publish; run the inline loop while the window is full and, if
    ``pump_every`` is set, once (without waiting) every ``pump_every`` messages."""
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
        client_id=f"bench-raw-{time.monotonic_ns()}",
        protocol=paho.MQTTv311,
    )
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    while not connected:
        client.loop(0.05)
    started = time.perf_counter()
    for sent in range(messages):
        while sent - acked >= window:
            client.loop(0.01)
        info = client.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publish refused: {info.rc}")
        if pump_every and sent % pump_every == 0:
            client.loop(0)
    while acked < messages:
        client.loop(0.01)
    elapsed = time.perf_counter() - started
    client.disconnect()
    client.loop(0.1)
    return messages / elapsed


def simulator(port: int, messages: int, devices: int, window: int) -> float:
    """The simulator's own publish path at max rate, one connection."""
    settings = SimulateSettings(
        devices=devices, rate="max", count=messages, connections=1, max_inflight=window
    )
    mqtt = MqttSettings(url=f"mqtt://127.0.0.1:{port}")

    def connect(index: int, will: Will | None) -> MqttClient:
        return MqttClient(
            mqtt,
            client_id=f"bench-sim-{time.monotonic_ns()}-{index}",
            will=will,
            max_inflight=window,
        )

    summary = Simulation(settings, connect).run()
    if not summary.ok or summary.published != messages:
        raise RuntimeError(f"simulator lost messages: {summary}")
    return summary.rate


def sample_message(devices: int) -> tuple[str, bytes]:
    """A typical simulator message, so the raw loop publishes the same size."""
    fleet = Fleet(SimulateSettings(devices=devices), seed=1)
    device = fleet.devices[0]
    return device.topic, device.message(int(time.time() * 1000))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--window", type=int, default=1000)
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the ratio is below the target"
    )
    args = parser.parse_args()

    topic, payload = sample_message(args.devices)
    samples: dict[str, list[float]] = {"raw_window": [], "raw_pump32": [], "simulator": []}
    with PrivateMosquitto() as broker:
        port, n, window = broker.port, args.messages, args.window
        runs: dict[str, Callable[[int], float]] = {
            "raw_window": lambda m: raw_paho(port, topic, payload, m, window),
            "raw_pump32": lambda m: raw_paho(port, topic, payload, m, window, pump_every=32),
            "simulator": lambda m: simulator(port, m, args.devices, window),
        }
        for run in runs.values():  # unmeasured: warms up imports, the broker, the caches
            run(2000)
        for _ in range(args.rounds):  # interleaved, so machine noise hits every variant alike
            for name, run in runs.items():
                samples[name].append(run(n))
        mosquitto = broker.version()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    raw_best = max(medians["raw_window"], medians["raw_pump32"])
    result = {
        "benchmark": "simulator",
        "messages_per_round": args.messages,
        "rounds": args.rounds,
        "payload_bytes": len(payload),
        "devices": args.devices,
        "connections": 1,
        "window": args.window,
        "qos": 1,
        "raw_paho_msg_s": round(raw_best),
        "simulator_msg_s": round(medians["simulator"]),
        "ratio": round(medians["simulator"] / raw_best, 3),
        "target_ratio": TARGET_RATIO,
        "medians_msg_s": {name: round(value) for name, value in medians.items()},
        "samples_msg_s": {name: [round(x) for x in values] for name, values in samples.items()},
        "python": platform.python_version(),
        "paho": version("paho-mqtt"),
        "broker": mosquitto,
        "machine": f"{platform.machine()} x{os.cpu_count() or 1}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    text = json.dumps(result)
    print(text)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(RESULTS)
    if args.check and result["ratio"] < TARGET_RATIO:
        sys.exit(f"simulator/raw ratio {result['ratio']} is below the target {TARGET_RATIO}")


if __name__ == "__main__":
    main()

"""Edge agent footprint: peak resident memory and CPU per reading at 5 sensors x 1 Hz.

    .venv/bin/python bench/bench_edge.py [--duration 30] [--runs 3] [--no-save]

Starts a private Mosquitto on a free port and runs the agent as it runs on a Pi, through its one
entry point ``iotpipe --log-level info edge run --config ...`` (the installed script, a
subprocess), with five ``simulated`` sensors of one signal each, every one read once a second,
default batching (100 readings or 5 s), fsync durability and ``/metrics`` on. A QoS 1
subscriber counts the readings that arrive. The agent's own packages are byte-compiled first, as
an installed wheel is (with ``PYTHONDONTWRITEBYTECODE`` set, each run would compile them again).

Measured from ``/proc/<pid>``: peak RSS (``VmHWM``) at the end of the run, steady RSS (median
of ``VmRSS`` over the second half); CPU time of all threads (``/proc/<pid>/task/*/schedstat``)
from 10 s after start to the end, divided by the readings taken in that time. ``--runs`` runs
with ``/metrics`` on give the medians; one run with ``/metrics`` off shows what it costs.

Baselines, measured in the same run and the same way (peak RSS of an interpreter that did its
imports and sleeps, median of three): the bare interpreter, + ``paho.mqtt.client``, and
+ ``prometheus_client``: the floor of any Python MQTT agent with Prometheus metrics.
Target: peak <= 25 MB (Python 3.11). Prints one JSON object and writes it to
``bench/results/edge.json``.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import edge
import iotpipe
from iotpipe.testing import Capture

RESULTS = Path(__file__).parent / "results" / "edge.json"
TARGET_MB = 25.0
IOTPIPE = Path(sys.executable).with_name("iotpipe")
SIGNALS = ("temperature", "humidity", "pressure", "power", "battery")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` (schedstat: nanoseconds, not 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def idle_rss(code: str) -> float:
    """Peak RSS (MB) of ``python -c code`` once it has done its imports (median of three)."""
    peaks = []
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", code + "\nprint(flush=True)\nimport time; time.sleep(60)"],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            proc.stdout.readline()  # the imports are done
            peaks.append(status_kb(proc.pid, "VmHWM") / 1024)
        finally:
            proc.kill()
            proc.wait()
    return statistics.median(peaks)


def write_config(path: Path, port: int, site: str, state: Path, http_port: int) -> None:
    sensors = "".join(
        f'\n[[edge.sensors]]\ntype = "simulated"\nname = "sim{i}"\ninterval = 1.0\n'
        f'sensors = ["{signal_name}"]\nseed = {i}\n'
        for i, signal_name in enumerate(SIGNALS)
    )
    path.write_text(
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n\n'
        f'[edge]\nsite = "{site}"\ndevice = "pi1"\nstate_dir = "{state}"\n'
        f"http_port = {http_port}\nclock_sync_files = []\nstats_interval = 30.0\n" + sensors
    )


def run_agent(port: int, workdir: Path, duration: float, http: bool, run: int) -> dict[str, Any]:
    site = f"bench{os.getpid()}{'h' if http else 'n'}{run}"
    config = workdir / f"edge-{site}.toml"
    write_config(config, port, site, workdir / site, free_port() if http else 0)
    url = f"mqtt://127.0.0.1:{port}"
    with Capture(url, f"iotpipe/v1/{site}/+/telemetry", qos=1) as capture:
        log = (workdir / f"{site}.log").open("wb")
        started = time.monotonic()
        proc = subprocess.Popen(
            [str(IOTPIPE), "--log-level", "info", "edge", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        samples: list[tuple[float, float]] = []
        warm_at = started + 10.0
        cpu_warm = readings_warm = None
        try:
            while (now := time.monotonic()) < started + duration:
                samples.append((now - started, status_kb(proc.pid, "VmRSS") / 1024))
                if cpu_warm is None and now >= warm_at:
                    cpu_warm = cpu_seconds(proc.pid)
                    readings_warm = readings(capture)
                    warm_at = now
                time.sleep(1.0)
            cpu_end = cpu_seconds(proc.pid)
            peak = status_kb(proc.pid, "VmHWM") / 1024
            end = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        time.sleep(0.5)
        total = readings(capture)
    assert cpu_warm is not None
    assert readings_warm is not None
    steady = [rss for t, rss in samples if t >= duration / 2]
    # Readings taken after warm-up: those published then, plus what SIGTERM flushed at the end.
    taken = total - readings_warm
    return {
        "metrics_http": http,
        "exit_code": code,
        "readings_received": total,
        "rss_mb_peak": round(peak, 1),
        "rss_mb_steady": round(statistics.median(steady), 1),
        "cpu_ms_per_reading": round((cpu_end - cpu_warm) * 1000 / max(1, taken), 3),
        "cpu_percent": round((cpu_end - cpu_warm) * 100 / (end - warm_at), 3),
    }


def readings(capture: Capture) -> int:
    return sum(len(json.loads(m.payload)["readings"]) for m in list(capture.messages))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--runs", type=int, default=3, help="runs with /metrics on")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if shutil.which("mosquitto") is None:
        sys.exit("mosquitto is not installed (make setup)")
    for package in (iotpipe, edge):
        compileall.compile_dir(Path(package.__path__[0]), quiet=1)
    with tempfile.TemporaryDirectory(prefix="bench-edge-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        mosq_dir = workdir / "mosquitto"
        mosq_dir.mkdir()
        conf = mosq_dir / "mosquitto.conf"
        as_root = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(
            f"{as_root}listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            f"log_dest file {mosq_dir}/mosquitto.log\n"
        )
        broker = subprocess.Popen(["mosquitto", "-c", str(conf)])
        try:
            wait_port(port)
            baseline = {
                "python_bare": idle_rss("pass"),
                "python_paho": idle_rss("import paho.mqtt.client"),
                "python_paho_prometheus_client": idle_rss(
                    "import paho.mqtt.client, prometheus_client"
                ),
            }
            runs = [run_agent(port, workdir, args.duration, True, i) for i in range(args.runs)]
            without_http = run_agent(port, workdir, args.duration, False, args.runs)
        finally:
            broker.terminate()
            broker.wait(10)
    peak = statistics.median(r["rss_mb_peak"] for r in runs)
    result = {
        "benchmark": "edge agent, 5 simulated sensors x 1 Hz, through `iotpipe edge run`",
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "duration_s": args.duration,
        "target_rss_mb": TARGET_MB,
        "baseline_rss_mb_peak": {name: round(mb, 1) for name, mb in baseline.items()},
        "agent_rss_mb_peak_median": round(peak, 1),
        "agent_cpu_ms_per_reading_median": statistics.median(r["cpu_ms_per_reading"] for r in runs),
        "agent_runs": runs,
        "agent_without_metrics": without_http,
        "within_target": peak <= TARGET_MB,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()

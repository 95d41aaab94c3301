"""A noisy device at 20x its limit beside a fleet: the others' latency and throughput, with and
without per-device limits, all measured in the same run.

    .venv/bin/python bench/bench_limits.py [--devices 250] [--rate 2] [--limit 5]
        [--noisy-rate 100] [--duration 20] [--rounds 3] [--no-save]

Starts a private Mosquitto and a private RabbitMQ node (free loopback ports, deleted at the end).
Each scenario runs the whole chain: ``iotpipe simulate`` (the fleet: ``--devices`` devices of
site ``fleet`` at ``--rate`` envelopes/s each, receipts off) -> Mosquitto -> ``iotpipe bridge``
-> RabbitMQ -> ``iotpipe consume`` into a fresh SQLite store; the noisy device is a second
``iotpipe simulate`` (site ``noisy``, one device at ``--noisy-rate`` envelopes/s). Scenarios,
interleaved round by round so machine noise hits them alike:

- ``quiet``: the fleet alone, no limits (the baseline);
- ``unlimited``: fleet + noisy device, no limits;
- ``dead_letter``: fleet + noisy device; ``[bridge.limits] rate = --limit`` (burst 2x) for every
  device, policy ``dead_letter``: the noisy device's excess goes to ``iotpipe.dead``;
- ``hold``: the same limit with policy ``hold``; the noisy device keeps its envelopes until
  receipted (``--receipts on``, window 256), so holding its receipts slows it at the source.

Every fleet device stays within the limit (``--rate`` < ``--limit``). Per scenario: the fleet's
stored throughput (envelopes stored / first reading time -> last stored), its latency (reading ``ts`` -> the store's
``stored_ms``, taken in the committing transaction) p50/p95/p99, and the noisy device's envelopes
published, stored and dead-lettered (the bridge's ``/metrics``). Printed as one JSON object with
the medians and each scenario's ratio to ``quiet`` (goal: within noise, ~1.0), written to
``bench/results/limits.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_bridge import BridgeProcess, PrivateMosquitto  # noqa: E402
from bench_e2e import ConsumerProcess  # noqa: E402

from tests.rabbitmq import PrivateRabbit  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "limits.json"
IOTPIPE = str(Path(sys.executable).parent / "iotpipe")
SCENARIOS = ("quiet", "unlimited", "dead_letter", "hold")
DRAIN_TIMEOUT = 120.0


@dataclass
class Outcome:
    fleet_stored: int
    fleet_published: int
    fleet_rate: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    noisy_published: int = 0
    noisy_stored: int = 0
    noisy_dead_lettered: int = 0


def simulate(
    mqtt_port: int, site: str, devices: int, rate: float, duration: float, *extra: str
) -> subprocess.Popen[bytes]:
    """``iotpipe simulate`` as a subprocess printing its JSON summary on stdout."""
    argv = [
        IOTPIPE,
        "simulate",
        "--mqtt",
        f"mqtt://127.0.0.1:{mqtt_port}",
        "--site-pattern",
        site,
        "--device-pattern",
        f"{site}-{{n:04d}}",
        "--devices",
        str(devices),
        "--rate",
        f"{rate:g}",
        "--duration",
        f"{duration:g}",
        "--json",
        "--no-progress",
        "--no-status",
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("IOTPIPE_")}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)


def summary_of(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, object]:
    out, err = proc.communicate(timeout=timeout)
    lines = [line for line in out.decode().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"simulator printed no summary (exit {proc.returncode}): {err[-800:]!r}")
    return dict(json.loads(lines[-1]))


def dead_lettered(http_port: int) -> int:
    """Envelopes the bridge dead-lettered as over a limit, from its ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    found = re.findall(
        r'^iotpipe_bridge_dead_lettered_total\{reason="(?:rate_limited|quota_exceeded)"\} (\S+)$',
        text,
        re.M,
    )
    return int(sum(float(n) for n in found))


def store_counts(db: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
        return dict(c.execute("SELECT site, count(*) FROM messages GROUP BY site").fetchall())


def fleet_latencies(db: Path) -> tuple[list[int], float]:
    """Per stored fleet envelope, ``stored_ms`` - its reading time in milliseconds; and the
    fleet's stored rate: envelopes / (first reading time -> last stored), per second."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as c:
        rows = c.execute(
            "SELECT m.stored_ms - r.ts, r.ts, m.stored_ms FROM messages m JOIN "
            "(SELECT msg_id, min(ts_ms) AS ts FROM readings WHERE site = 'fleet' GROUP BY msg_id) r"
            " ON r.msg_id = m.id"
        ).fetchall()
    span_ms = max(row[2] for row in rows) - min(row[1] for row in rows)
    return [int(row[0]) for row in rows], len(rows) / max(span_ms / 1000, 1e-3)


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def limits_config(scenario: str, limit: float) -> str:
    if scenario in ("quiet", "unlimited"):
        return ""
    return f'[bridge.limits]\npolicy = "{scenario}"\nrate = {limit:g}\nburst = {2 * limit:g}\n'


def run_scenario(
    scenario: str,
    mosquitto: PrivateMosquitto,
    rabbit: PrivateRabbit,
    workdir: Path,
    args: argparse.Namespace,
) -> Outcome:
    workdir.mkdir(parents=True)
    queue = f"bench.limits.{workdir.name}"
    with (
        ConsumerProcess(rabbit.url, queue, workdir / "consumer") as consumer,
        BridgeProcess(
            mosquitto.port,
            rabbit.url,
            workdir / "bridge",
            receipts=True,
            extra_config=limits_config(scenario, args.limit),
        ) as bridge,
    ):
        noisy = None
        if scenario != "quiet":
            receipts = "on" if scenario == "hold" else "off"
            noisy = simulate(
                mosquitto.port, "noisy", 1, args.noisy_rate, args.duration, "--receipts", receipts
            )
        fleet = simulate(
            mosquitto.port, "fleet", args.devices, args.rate, args.duration, "--receipts", "off"
        )
        fleet_summary = summary_of(fleet, args.duration + DRAIN_TIMEOUT)
        noisy_summary: dict[str, object] = {}
        if noisy is not None:
            if scenario == "hold":
                # A held device is still waiting for receipts: stop it (its last envelopes
                # stay unreceipted, as a device's outbox would keep them).
                noisy.send_signal(signal.SIGINT)
            noisy_summary = summary_of(noisy, DRAIN_TIMEOUT)
        published = int(fleet_summary["published"])  # type: ignore[call-overload]
        deadline = time.monotonic() + DRAIN_TIMEOUT
        while store_counts_safe(consumer.db).get("fleet", 0) < published:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{scenario}: fleet envelopes not all stored")
            time.sleep(0.2)
        counts = store_counts_safe(consumer.db)
        latencies, fleet_rate = fleet_latencies(consumer.db)
        dead = dead_lettered(bridge.http_port)
    return Outcome(
        fleet_stored=counts.get("fleet", 0),
        fleet_published=published,
        fleet_rate=round(fleet_rate, 1),
        p50_ms=percentile(latencies, 0.50),
        p95_ms=percentile(latencies, 0.95),
        p99_ms=percentile(latencies, 0.99),
        noisy_published=int(noisy_summary.get("published", 0)),  # type: ignore[call-overload]
        noisy_stored=counts.get("noisy", 0),
        noisy_dead_lettered=dead,
    )


def store_counts_safe(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    try:
        return store_counts(db)
    except sqlite3.OperationalError:
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=250, help="fleet devices (default 250)")
    parser.add_argument(
        "--rate", type=float, default=2.0, help="envelopes/s per fleet device (default 2)"
    )
    parser.add_argument(
        "--limit", type=float, default=5.0, help="per-device rate limit, envelopes/s (default 5)"
    )
    parser.add_argument(
        "--noisy-rate",
        type=float,
        default=100.0,
        help="the noisy device's envelopes/s (default 100 = 20x the limit; at most 100)",
    )
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per scenario")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)} (quiet always runs)",
    )
    parser.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS}")
    args = parser.parse_args()
    chosen = {"quiet", *args.scenarios.split(",")}
    if not chosen <= set(SCENARIOS):
        parser.error(f"--scenarios: unknown {sorted(chosen - set(SCENARIOS))}")
    scenarios = [name for name in SCENARIOS if name in chosen]
    if not (0 < args.rate < args.limit < args.noisy_rate <= 100):
        parser.error("need 0 < --rate < --limit < --noisy-rate <= 100")

    results: dict[str, list[Outcome]] = {name: [] for name in scenarios}
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        workdir = Path(tmp)
        rabbit = PrivateRabbit(workdir / "rabbit")
        rabbit.start()
        try:
            with PrivateMosquitto(max_inflight=1000) as mosquitto:
                for number in range(args.rounds):
                    for scenario in scenarios:
                        outcome = run_scenario(
                            scenario, mosquitto, rabbit, workdir / f"{scenario}-{number}", args
                        )
                        results[scenario].append(outcome)
                        print(f"round {number + 1} {scenario}: {outcome}", file=sys.stderr)
        finally:
            rabbit.stop()

    def median(scenario: str, name: str) -> float:
        return float(statistics.median(getattr(o, name) for o in results[scenario]))

    figures = ("fleet_rate", "p50_ms", "p95_ms", "p99_ms", "noisy_published", "noisy_stored")
    summary = {
        "bench": "limits",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "setup": {
            "fleet_devices": args.devices,
            "fleet_rate_per_device": args.rate,
            "limit": args.limit,
            "burst": 2 * args.limit,
            "noisy_rate": args.noisy_rate,
            "noisy_over_limit": round(args.noisy_rate / args.limit, 1),
            "duration_s": args.duration,
            "rounds": args.rounds,
        },
        "median": {
            scenario: {name: median(scenario, name) for name in (*figures, "noisy_dead_lettered")}
            for scenario in scenarios
        },
        "ratio_to_quiet": {
            scenario: {
                name: round(median(scenario, name) / max(median("quiet", name), 1e-9), 2)
                for name in ("fleet_rate", "p50_ms", "p95_ms", "p99_ms")
            }
            for scenario in scenarios[1:]
        },
        "rounds_detail": {name: [vars(o) for o in outs] for name, outs in results.items()},
    }
    print(json.dumps(summary, indent=2))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

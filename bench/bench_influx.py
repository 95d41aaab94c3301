"""InfluxStore.write throughput against raw influxdb-client writes, both measured in the same run.

    .venv/bin/python bench/bench_influx.py [--batches 20] [--rounds 3] [--url http://host:8428]
                                           [--durability fsync|process]

Without ``--url`` a private VictoriaMetrics is started in a temporary directory (as the tests
do). Each batch is 1000 messages of 5 readings (5000 points), with fresh ids every time.

* **store**: ``InfluxStore.write`` (state file lookup, line building, one 5000-line request,
  state file commit with ``--durability``, default ``fsync``), in points per second.
* **raw**: influxdb-client's synchronous ``WriteApi.write`` of the same lines, prebuilt and
  joined beforehand: the floor the store is measured against.
* **raw_with_line_building**: the same, counting the time to build the lines too (the store
  minus its state file).
* **lines**: building the line protocol alone (``message_lines``), CPU only.

Rounds are interleaved (store, raw, store, raw, ...) so machine noise hits both alike; figures
are medians. Prints one JSON object and writes it to ``bench/results/influx.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from influxdb_client.client.influxdb_client import InfluxDBClient
from influxdb_client.client.write_api import SYNCHRONOUS

from consumers.influx_store import InfluxStore, message_lines
from consumers.state import StateDB
from consumers.store import Message, Reading

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "influx.json"
MESSAGES = 1000
SENSORS = (
    ("temperature", "Cel"),
    ("humidity", "%RH"),
    ("pressure", "Pa"),
    ("co2", "ppm"),
    ("battery", "V"),
)


def batch(site: str, start: int) -> list[Message]:
    """1000 messages of 5 readings from 10 devices, one second apart."""
    t0 = (int(time.time()) - 86_400) * 1000
    return [
        Message(
            id=f"{site}-{uuid.uuid4().hex}",
            site=site,
            device=f"dev-{n % 10}",
            seq=n,
            boot="b1",
            readings=tuple(
                Reading(sensor, t0 + n * 1000, 20.0 + (n % 97) / 10 + k, unit)
                for k, (sensor, unit) in enumerate(SENSORS)
            ),
            tags={"room": "lab"},
        )
        for n in range(start, start + MESSAGES)
    ]


@contextlib.contextmanager
def server(url: str | None) -> Iterator[str]:
    """``url``, or a private VictoriaMetrics for the duration of the block."""
    if url:
        yield url
        return
    sys.path.insert(0, str(ROOT))  # tests/ is not an installed package; Victoria lives there
    from tests.victoria import Victoria

    with tempfile.TemporaryDirectory(prefix="bench-influx-") as tmp:
        vm = Victoria(Path(tmp))
        vm.start()
        try:
            yield vm.url
        finally:
            vm.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=20, help="batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--url", help="an existing server (default: a private VictoriaMetrics)")
    parser.add_argument("--durability", choices=("fsync", "process"), default="fsync")
    args = parser.parse_args()
    points = args.batches * MESSAGES * len(SENSORS)
    rates: dict[str, list[float]] = {"store": [], "raw": [], "raw_with_lines": [], "lines": []}
    with server(args.url) as url, tempfile.TemporaryDirectory(prefix="bench-state-") as tmp:
        client = InfluxDBClient(url=url, token="t", org="o", timeout=30_000)
        raw_api = client.write_api(write_options=SYNCHRONOUS)
        state = StateDB(Path(tmp) / "state.db", durability=args.durability)
        store = InfluxStore(url, org="o", bucket="b", token="t", state=state)
        try:
            for r in range(args.rounds):
                batches = [batch(f"store{r}", b * MESSAGES) for b in range(args.batches)]
                started = time.perf_counter()
                for messages in batches:
                    store.write(messages, [])
                rates["store"].append(points / (time.perf_counter() - started))

                batches = [batch(f"raw{r}", b * MESSAGES) for b in range(args.batches)]
                started = time.perf_counter()
                bodies = []
                for messages in batches:
                    lines = [line for m in messages for line in message_lines(m)]
                    bodies.append("\n".join(lines).encode())
                build = time.perf_counter() - started
                rates["lines"].append(points / build)
                started = time.perf_counter()
                for body in bodies:
                    raw_api.write("b", "o", body)
                send = time.perf_counter() - started
                rates["raw"].append(points / send)
                rates["raw_with_lines"].append(points / (build + send))
        finally:
            store.close()
            raw_api.close()
            client.close()
    result = {
        "bench": "influx",
        "python": platform.python_version(),
        "server": args.url or "private VictoriaMetrics",
        "durability": args.durability,
        "points_per_batch": MESSAGES * len(SENSORS),
        "points_per_round": points,
        "rounds": args.rounds,
        "store_points_per_s": round(statistics.median(rates["store"])),
        "raw_points_per_s": round(statistics.median(rates["raw"])),
        "raw_with_line_building_points_per_s": round(statistics.median(rates["raw_with_lines"])),
        "line_building_points_per_s": round(statistics.median(rates["lines"])),
    }
    result["store_vs_raw_with_line_building"] = round(
        result["store_points_per_s"] / result["raw_with_line_building_points_per_s"], 3
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

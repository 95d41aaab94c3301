"""Spool throughput against raw sqlite3 executemany, both measured in the same run.

    .venv/bin/python bench/bench_spool.py [--messages 100000] [--single 2000] [--rounds 3]

Every entry has a 265-byte JSON body (the size of a typical telemetry message) and the AMQP
properties the bridge will keep (a dict of ~310 bytes as JSON), like the real bridge.

* **append**: ``Spool.append_many`` in group commits of 1, 100 and 1000 entries, for durability
  ``fsync`` (WAL, synchronous=FULL) and ``process`` (WAL, synchronous=NORMAL), against the
  baseline: one raw sqlite3 connection with the same schema and pragmas, ``executemany`` of
  pre-built row tuples (properties already serialised), one transaction per group.
  ``--single`` entries for groups of 1 (one commit each), ``--messages`` otherwise. Measured
  twice: properties as a dict (the spool serialises them: ~4 us of JSON per entry) and as
  pre-serialised bytes (``*_bytes_props``, the same work as the baseline).
* **drain**: ``peek_oldest(1000)`` + ``delete(ids)`` until empty (properties parsed back into
  dicts), against raw ``SELECT ... ORDER BY id LIMIT 1000`` + ``DELETE ... WHERE id <= last``.
* **writer**: ``SpoolWriter.submit`` of ``--messages`` entries from one thread (max_batch 1000,
  max_delay 20 ms) until the last ``on_committed``, i.e. what the bridge's MQTT thread sees.
* **open**: reopening a spool of ``--messages`` entries (recounts depth and bytes; warm cache).
* **vacuum**: the ``delete`` that empties a ``--messages`` spool, including its VACUUM.
* **disk**: file bytes per entry at ``--messages`` entries, against accounted bytes per entry.

Rounds are interleaved (spool, raw, spool, raw, ...) so machine noise hits both alike; figures
are medians. Prints one JSON object and writes it to ``bench/results/spool.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

from bridge.spool import Durability, Entry, Spool, SpoolWriter

RESULTS = Path(__file__).parent / "results" / "spool.json"
DURABILITIES: tuple[Durability, ...] = ("fsync", "process")
GROUPS = (1, 100, 1000)
T = TypeVar("T")

BODY = json.dumps(
    {
        "v": "1.0",
        "id": "pi-01:7f3c2a:42",
        "site": "home",
        "device": "pi-01",
        "seq": 42,
        "ts": "2026-11-26T08:15:02.125Z",
        "readings": [
            {"sensor": "temperature", "value": 21.37, "unit": "Cel"},
            {"sensor": "humidity", "value": 48.2, "unit": "%RH"},
        ],
    },
    separators=(",", ":"),
).encode()
BODY = BODY.ljust(265, b" ")
assert len(BODY) == 265, len(BODY)
PROPERTIES = {
    "message_id": "home-pi-01:7f3c2a:000042",
    "content_type": "application/json",
    "type": "iotpipe.telemetry",
    "delivery_mode": 2,
    "timestamp": 1795650902,
    "app_id": "iotpipe-bridge",
    "headers": {
        "x-iotpipe-version": "1.0",
        "x-iotpipe-site": "home",
        "x-iotpipe-device": "pi-01",
        "x-iotpipe-topic": "iotpipe/v1/home/pi-01/telemetry",
    },
}
EXCHANGE = "iotpipe.telemetry"
KEY = "iotpipe.v1.home.pi-01.telemetry"

RAW_SCHEMA = (
    "CREATE TABLE spool (id INTEGER PRIMARY KEY, received_at REAL NOT NULL, size INTEGER NOT"
    " NULL, exchange TEXT NOT NULL, routing_key TEXT NOT NULL, props, body BLOB NOT NULL)"
)


PROPERTIES_JSON = json.dumps(PROPERTIES, separators=(",", ":")).encode()


def entries(count: int, *, raw_properties: bool = False) -> list[Entry]:
    """``count`` entries like the bridge's, properties as a dict or as pre-serialised bytes."""
    now = time.time()
    props = PROPERTIES_JSON if raw_properties else PROPERTIES
    return [Entry(EXCHANGE, KEY, BODY, props, received_at=now) for _ in range(count)]


def raw_connect(path: Path, durability: Durability) -> sqlite3.Connection:
    """The baseline's connection: same pragmas and schema as the spool."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={'FULL' if durability == 'fsync' else 'NORMAL'}")
    conn.execute(RAW_SCHEMA)
    return conn


def raw_rows(count: int) -> list[tuple[object, ...]]:
    """Pre-built rows for the baseline (properties serialised once, outside the timing)."""
    props = json.dumps(PROPERTIES, separators=(",", ":"))
    size = len(BODY) + len(EXCHANGE) + len(KEY) + len(props) + 56
    now = time.time()
    return [(n + 1, now, size, EXCHANGE, KEY, props, BODY) for n in range(count)]


def append_spool(
    folder: Path, durability: Durability, count: int, group: int, raw_properties: bool = False
) -> float:
    """Entries/s through Spool.append_many in groups of ``group``."""
    batch = entries(count, raw_properties=raw_properties)
    with Spool(folder / "spool.db", durability=durability) as spool:
        started = time.perf_counter()
        for start in range(0, count, group):
            spool.append_many(batch[start : start + group])
        elapsed = time.perf_counter() - started
        assert spool.depth == count
    return count / elapsed


def append_raw(folder: Path, durability: Durability, count: int, group: int) -> float:
    """Entries/s through raw executemany in transactions of ``group``."""
    rows = raw_rows(count)
    conn = raw_connect(folder / "raw.db", durability)
    insert = "INSERT INTO spool VALUES (?, ?, ?, ?, ?, ?, ?)"
    started = time.perf_counter()
    for start in range(0, count, group):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(insert, rows[start : start + group])
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return count / elapsed


def drain_spool(folder: Path, durability: Durability, count: int) -> float:
    """Entries/s through peek_oldest(1000) + delete(ids), until empty (no VACUUM)."""
    with Spool(folder / "spool.db", durability=durability, reclaim_above=None) as spool:
        batch = entries(count)
        for start in range(0, count, 1000):
            spool.append_many(batch[start : start + 1000])
        started = time.perf_counter()
        while peeked := spool.peek_oldest(1000):
            spool.delete([item.id for item in peeked])
        elapsed = time.perf_counter() - started
        assert spool.depth == 0
    return count / elapsed


def drain_raw(folder: Path, durability: Durability, count: int) -> float:
    """Entries/s through raw SELECT ... LIMIT 1000 + DELETE WHERE id <= last."""
    conn = raw_connect(folder / "raw.db", durability)
    rows = raw_rows(count)
    for start in range(0, count, 1000):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO spool VALUES (?, ?, ?, ?, ?, ?, ?)", rows[start : start + 1000]
        )
        conn.execute("COMMIT")
    select = "SELECT id, received_at, exchange, routing_key, props, body FROM spool ORDER BY id LIMIT 1000"
    started = time.perf_counter()
    while peeked := conn.execute(select).fetchall():
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DELETE FROM spool WHERE id <= ?", (peeked[-1][0],))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return count / elapsed


def writer(folder: Path, durability: Durability, count: int) -> dict[str, float]:
    """Entries/s from the first submit() to the last on_committed, and the batches' sizes."""
    batch = entries(count)
    done = threading.Event()
    batches: list[int] = []

    def committed(tokens: list[int]) -> None:
        batches.append(len(tokens))
        if tokens[-1] == count - 1:
            done.set()

    with (
        Spool(folder / "spool.db", durability=durability) as spool,
        SpoolWriter(spool, committed, max_batch=1000, max_delay_ms=20) as spool_writer,
    ):
        started = time.perf_counter()
        for token, item in enumerate(batch):
            spool_writer.submit(item, token)
        submitted = time.perf_counter() - started
        if not done.wait(120):
            raise RuntimeError("the writer did not commit everything")
        elapsed = time.perf_counter() - started
    return {
        "msg_s": count / elapsed,
        "submit_us": submitted / count * 1e6,
        "mean_batch": statistics.mean(batches),
    }


def reopen_and_vacuum(folder: Path, count: int) -> dict[str, float]:
    """Open time of a full spool, its disk use per entry, and the emptying delete + VACUUM."""
    path = folder / "spool.db"
    with Spool(path, durability="process") as spool:
        batch = entries(count)
        for start in range(0, count, 1000):
            spool.append_many(batch[start : start + 1000])
        accounted = spool.bytes / count
    started = time.perf_counter()
    spool = Spool(path, durability="process", reclaim_above=0)
    opened = time.perf_counter() - started
    file_bytes = spool.file_bytes
    ids = [item.id for item in spool.peek_oldest(count)]
    spool.delete(ids[:-1])
    started = time.perf_counter()
    spool.delete(ids[-1:])
    vacuum = time.perf_counter() - started
    after = spool.file_bytes
    spool.close()
    return {
        "open_s": opened,
        "file_bytes_per_entry": file_bytes / count,
        "accounted_bytes_per_entry": accounted,
        "emptying_delete_with_vacuum_ms": vacuum * 1000,
        "file_bytes_before_vacuum": file_bytes,
        "file_bytes_after_vacuum": after,
    }


def run_in_tmp(base: str | None, run: Callable[[Path], T]) -> T:
    """Run one measurement in a fresh directory."""
    with tempfile.TemporaryDirectory(prefix="bench-spool-", dir=base) as folder:
        return run(Path(folder))


def rate_runs(args: argparse.Namespace) -> dict[str, Callable[[Path], float]]:
    """Every entries/s measurement, by name: ``append_{durability}_group{n}_{variant}``, ..."""
    runs: dict[str, Callable[[Path], float]] = {}
    for durability in DURABILITIES:
        for group in GROUPS:
            count = args.single if group == 1 else args.messages
            key = f"append_{durability}_group{group}"
            runs[f"{key}_spool"] = partial(
                append_spool, durability=durability, count=count, group=group
            )
            runs[f"{key}_spool_bytes_props"] = partial(
                append_spool, durability=durability, count=count, group=group, raw_properties=True
            )
            runs[f"{key}_raw"] = partial(
                append_raw, durability=durability, count=count, group=group
            )
        runs[f"drain_{durability}_spool"] = partial(
            drain_spool, durability=durability, count=args.messages
        )
        runs[f"drain_{durability}_raw"] = partial(
            drain_raw, durability=durability, count=args.messages
        )
    return runs


def compare(medians: dict[str, float], key: str, group: int = 0) -> dict[str, float]:
    """Spool against raw for one measurement, from the medians."""
    spool, raw = medians[f"{key}_spool"], medians[f"{key}_raw"]
    result = {"spool_msg_s": round(spool), "raw_msg_s": round(raw), "ratio": round(spool / raw, 3)}
    if f"{key}_spool_bytes_props" in medians:
        as_bytes = medians[f"{key}_spool_bytes_props"]
        result["spool_bytes_props_msg_s"] = round(as_bytes)
        result["ratio_bytes_props"] = round(as_bytes / raw, 3)
    if group:
        result["commit_ms"] = round(group / spool * 1000, 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--single", type=int, default=2000, help="entries for groups of 1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where the files go (default: $TMPDIR)")
    parser.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    args = parser.parse_args()

    runs = rate_runs(args)
    run_in_tmp(args.dir, partial(append_spool, durability="process", count=5000, group=1000))
    run_in_tmp(args.dir, partial(append_raw, durability="process", count=5000, group=1000))
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):  # interleaved, so machine noise hits every variant alike
        for name, run in runs.items():
            samples[name].append(run_in_tmp(args.dir, run))
    medians = {name: statistics.median(values) for name, values in samples.items()}

    writers: dict[str, dict[str, float]] = {}
    for durability in DURABILITIES:
        done = [
            run_in_tmp(args.dir, partial(writer, durability=durability, count=args.messages))
            for _ in range(args.rounds)
        ]
        done.sort(key=lambda result: result["msg_s"])
        middle = done[len(done) // 2]
        writers[durability] = {
            "msg_s": round(middle["msg_s"]),
            "submit_us": round(middle["submit_us"], 2),
            "mean_batch": round(middle["mean_batch"], 1),
        }
    files = run_in_tmp(args.dir, partial(reopen_and_vacuum, count=args.messages))

    result = {
        "benchmark": "spool",
        "messages": args.messages,
        "single_commits": args.single,
        "rounds": args.rounds,
        "body_bytes": len(BODY),
        "properties_json_bytes": len(PROPERTIES_JSON),
        "append": {
            f"{d}/group{g}": compare(medians, f"append_{d}_group{g}", g)
            for d in DURABILITIES
            for g in GROUPS
        },
        "drain_peek1000_delete": {d: compare(medians, f"drain_{d}") for d in DURABILITIES},
        "writer_max_batch1000_delay20ms": writers,
        "files": {name: round(value, 4) for name, value in files.items()},
        "samples_msg_s": {name: [round(x) for x in values] for name, values in samples.items()},
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "machine": f"{platform.machine()} x{os.cpu_count() or 1}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(json.dumps(result))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        tmp = RESULTS.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(RESULTS)


if __name__ == "__main__":
    main()

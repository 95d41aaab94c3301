"""Stored readings per second: the SQLite store next to the PostgreSQL store, same batches.

    .venv/bin/python bench/bench_store.py [--messages 20000] [--readings-per-message 5]
        [--batch 1000] [--rounds 3] [--pg postgresql://postgres@127.0.0.1:5432/postgres]
        [--no-save]

Each round builds the same decoded messages (20 devices, ``--readings-per-message`` number
readings each, unique ids, tags) and writes them in batches of ``--batch`` with the stores'
own ``write`` (ids claimed, readings inserted, rollups and completeness updated, one commit per
batch), in-process, no AMQP:

* ``sqlite``: :class:`~consumers.sqlite_store.SQLiteStore` on a fresh file (WAL, fsync).
* ``postgresql``: :class:`~consumers.pg_store.PostgresStore` on a fresh database of the server
  ``--pg`` names (created and dropped per round; ``synchronous_commit = on``).
* ``postgresql_2_writers``: two processes writing halves of the messages (disjoint devices)
  into one fresh database at once: what a second consumer host adds.

Rounds are interleaved so machine noise hits every figure alike. Prints one JSON object with
the medians in readings/s, the samples, and the ratios to SQLite; writes it to
``bench/results/store.json`` unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from consumers.pg_store import PostgresStore  # noqa: E402
from consumers.sqlite_store import SQLiteStore  # noqa: E402
from consumers.store import Message, Reading, Store  # noqa: E402
from tests.postgres import scratch_database  # noqa: E402

T0_MS = 1_795_000_000_000
DEVICES = 20


def build_messages(count: int, per_message: int) -> list[Message]:
    """``count`` messages round-robin over 20 devices, one second apart per device."""
    run = uuid.uuid4().hex[:8]
    out = []
    for n in range(count):
        device, seq = f"d{n % DEVICES:02d}", n // DEVICES
        ts = T0_MS + seq * 1000
        readings = tuple(
            Reading(f"s{r}", ts, 20.0 + (n + r) % 17 * 0.25, "Cel") for r in range(per_message)
        )
        out.append(Message(f"{run}-{n}", "bench", device, seq, "b1", readings, {"room": device}))
    return out


def write_all(store: Store, messages: Sequence[Message], batch: int) -> float:
    """Write ``messages`` in batches; return the seconds it took."""
    began = time.perf_counter()
    for i in range(0, len(messages), batch):
        store.write(messages[i : i + batch], [])
    return time.perf_counter() - began


def round_sqlite(messages: Sequence[Message], batch: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "telemetry.db")
        try:
            seconds = write_all(store, messages, batch)
        finally:
            store.close()
    return seconds


def round_pg(server: str, messages: Sequence[Message], batch: int) -> float:
    with scratch_database(server, prefix="iotpipe_bench_") as url:
        store = PostgresStore(url)
        try:
            seconds = write_all(store, messages, batch)
        finally:
            store.close()
    return seconds


def _writer(args: tuple[str, Sequence[Message], int]) -> float:
    url, messages, batch = args
    store = PostgresStore(url)
    try:
        return write_all(store, messages, batch)
    finally:
        store.close()


def _warm(_: int) -> None:
    """Nothing: the worker has imported this module (and psycopg) by the time it runs."""


def round_pg_two(server: str, messages: Sequence[Message], batch: int) -> float:
    """Two processes, disjoint devices, one database: wall time until both finished."""
    halves = [
        [m for m in messages if int(m.device[1:]) % 2 == 0],
        [m for m in messages if int(m.device[1:]) % 2 == 1],
    ]
    with scratch_database(server, prefix="iotpipe_bench_") as url:
        PostgresStore(url).close()  # schema first, so the two do not wait on each other for it
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(2) as pool:
            pool.map(_warm, range(2))  # imports done before the clock starts
            began = time.perf_counter()
            pool.map(_writer, [(url, half, batch) for half in halves])
            return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--readings-per-message", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    readings = args.messages * args.readings_per_message
    runs: dict[str, Callable[[Sequence[Message]], float]] = {
        "sqlite": lambda ms: round_sqlite(ms, args.batch),
        "postgresql": lambda ms: round_pg(args.pg, ms, args.batch),
        "postgresql_2_writers": lambda ms: round_pg_two(args.pg, ms, args.batch),
    }
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        messages = build_messages(args.messages, args.readings_per_message)
        for name, run in runs.items():
            samples[name].append(round(readings / run(messages)))
    medians = {name: statistics.median(values) for name, values in samples.items()}
    result = {
        "bench": "store",
        "python": platform.python_version(),
        "messages": args.messages,
        "readings": readings,
        "batch": args.batch,
        "rounds": args.rounds,
        "readings_per_s": medians,
        "samples": samples,
        "ratio_to_sqlite": {
            name: round(value / medians["sqlite"], 3) for name, value in medians.items()
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if not args.no_save:
        (ROOT / "bench" / "results" / "store.json").write_text(text + "\n")


if __name__ == "__main__":
    main()

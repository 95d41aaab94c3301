"""The embedded broker's state file: one save of a big queue, against raw sqlite3 in the same run.

    .venv/bin/python bench/bench_broker_store.py [--messages 10000] [--size 300] [--rounds 5]

One persistent session with ``--messages`` queued QoS 1 messages of ``--size`` random bytes (plus
one subscription and ten retained messages), in a real amqtt broker object:

* **capture**: :func:`bridge.broker.capture_state`, the copy taken on the event loop (the only
  part that holds the loop; the save runs in a thread).
* **save**: :meth:`BrokerStore.save` of that state (``synchronous=FULL``: fsynced when it
  returns), against the baseline: a raw sqlite3 connection with the same schema and pragmas,
  ``DELETE`` + ``executemany`` of pre-built row tuples in one transaction.
* **load**: :meth:`BrokerStore.load` of the saved state (warm cache).
* **restore**: :func:`bridge.broker.restore_state` into an empty broker (start-up cost).

Rounds are interleaved (store, raw, store, raw, ...) so machine noise hits both alike; figures
are medians in milliseconds. Prints one JSON object and writes it to
``bench/results/broker-store.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from amqtt.broker import Broker, RetainedApplicationMessage

from bridge.broker import amqtt_config, capture_state, restore_state
from bridge.broker_store import KIND, BrokerState, BrokerStore
from bridge.settings import BrokerSettings

RESULTS = Path(__file__).parent / "results" / "broker-store.json"


def _ms(func: Callable[[], object]) -> float:
    started = time.perf_counter()
    func()
    return (time.perf_counter() - started) * 1000


def _broker_with_queue(messages: int, size: int) -> Any:
    """An amqtt broker (not listening) holding one offline session with a full queue."""
    broker = Broker(amqtt_config(BrokerSettings(port=1)))
    _, session = broker.create_offline_session("bench")
    session.clean_session = False
    broker.sessions["bench"] = (session, None)
    broker.subscriptions["iotpipe/#"] = [(session, 1)]
    for index in range(messages):
        session.retained_messages.put_nowait(
            RetainedApplicationMessage(None, f"iotpipe/v1/s/d{index % 10}/t", os.urandom(size), 1)
        )
    for index in range(10):
        topic = f"iotpipe/v1/s/d{index}/status"
        broker.retained_messages[topic] = RetainedApplicationMessage(None, topic, b"online", 1)
    return broker


def _raw_save(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("DELETE FROM messages")
    conn.executemany(
        "INSERT INTO messages (client_id, inflight, packet_id, topic, payload, qos, retain,"
        " released) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.execute("COMMIT")


async def _bench(messages: int, size: int, rounds: int, where: Path) -> dict[str, Any]:
    broker = _broker_with_queue(messages, size)
    captures, saves, raws, loads, restores = [], [], [], [], []
    state: BrokerState = capture_state(broker)
    rows = [("bench", 0, None, m.topic, m.payload, m.qos, 0, 0) for m in state.sessions[0].queued]
    raw = sqlite3.connect(where / "raw.db", isolation_level=None)
    for pragma in ("locking_mode=EXCLUSIVE", "journal_mode=WAL", "synchronous=FULL"):
        raw.execute(f"PRAGMA {pragma}")
    for statement in KIND.schema:
        raw.execute(statement)
    with BrokerStore(where / "state.db") as store:
        for _ in range(rounds):
            captures.append(_ms(lambda: capture_state(broker)))
            saves.append(_ms(lambda: store.save(state)))
            raws.append(_ms(lambda: _raw_save(raw, rows)))
            loads.append(_ms(store.load))
            empty = Broker(amqtt_config(BrokerSettings(port=1)))
            restores.append(_ms(partial(restore_state, empty, state)))
        file_bytes = (where / "state.db").stat().st_size
    raw.close()
    save_ms = statistics.median(saves)
    raw_ms = statistics.median(raws)
    return {
        "messages": messages,
        "payload_bytes": size,
        "rounds": rounds,
        "capture_ms": round(statistics.median(captures), 2),
        "save_ms": round(save_ms, 2),
        "raw_save_ms": round(raw_ms, 2),
        "save_vs_raw": round(save_ms / raw_ms, 2),
        "load_ms": round(statistics.median(loads), 2),
        "restore_ms": round(statistics.median(restores), 2),
        "file_bytes": file_bytes,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    """Run the benchmark and print its JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as where:
        result = asyncio.run(_bench(args.messages, args.size, args.rounds, Path(where)))
    text = json.dumps(result, indent=2)
    print(text)
    RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()

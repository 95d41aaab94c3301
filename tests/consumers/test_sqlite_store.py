"""SQLiteStore: each reading exactly once, whatever is repeated, reordered or written at once."""

from __future__ import annotations

import multiprocessing
import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumers.sqlite_store import SQLiteStore
from consumers.store import DeviceStatus, Message, StoreUnavailable, Value
from tests.consumers.test_state import T0, msg


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    db = SQLiteStore(tmp_path / "telemetry.db", busy_timeout_s=1.0)
    yield db
    db.close()


def readings(path: Path) -> list[tuple[object, ...]]:
    """Every stored reading row, in key order."""
    conn = sqlite3.connect(path)
    rows = conn.execute(
        "SELECT site, device, sensor, ts_ms, value_num, value_bool, value_str, unit, msg_id, tags"
        " FROM readings ORDER BY site, device, sensor, ts_ms"
    ).fetchall()
    conn.close()
    return rows


def five_readings(seq: int, device: str = "pi-1") -> Message:
    """A message with five numeric readings."""
    return msg(seq, device=device, values={f"s{k}": seq + k / 10 for k in range(5)})


def test_batch_written_twice_stores_each_reading_once(store: SQLiteStore) -> None:
    """Writing the same batch again stores nothing and counts every message as a duplicate."""
    batch = [five_readings(seq) for seq in range(20)]
    first = store.write(batch, [])
    again = store.write(batch, [])
    assert (first.messages, first.readings, first.duplicates) == (20, 100, 0)
    assert (again.messages, again.readings, again.duplicates) == (0, 0, 20)
    assert len(readings(store.path)) == 100


def test_reverse_order_gives_the_same_rows(tmp_path: Path) -> None:
    """A batch and its reverse (and their repeats) leave identical readings tables."""
    batch = [five_readings(seq, device=f"pi-{seq % 3}") for seq in range(30)]
    forward = SQLiteStore(tmp_path / "forward.db")
    backward = SQLiteStore(tmp_path / "backward.db")
    for _ in range(2):
        forward.write(batch, [])
        backward.write(batch[::-1], [])
    forward.close()
    backward.close()
    assert readings(tmp_path / "forward.db") == readings(tmp_path / "backward.db")
    assert len(readings(tmp_path / "forward.db")) == 150


def test_duplicates_inside_one_batch(store: SQLiteStore) -> None:
    """A message repeated inside one batch is stored once."""
    result = store.write([msg(0), msg(1), msg(0)], [])
    assert (result.messages, result.duplicates, result.readings) == (2, 1, 2)


def test_dedupe_survives_reopen(tmp_path: Path) -> None:
    """A message stored before a restart is a duplicate after it."""
    path = tmp_path / "telemetry.db"
    SQLiteStore(path).write([msg(0)], [])
    reopened = SQLiteStore(path)
    result = reopened.write([msg(0), msg(1)], [])
    reopened.close()
    assert (result.messages, result.duplicates) == (1, 1)


def test_values_go_to_the_column_of_their_type(store: SQLiteStore) -> None:
    """Numbers, booleans and strings each fill exactly one value column; tags are JSON."""
    values: dict[str, Value] = {"t": 21.5, "n": 7, "door": True, "mode": "eco"}
    store.write([msg(0, values=values, tags={"room": "kitchen"})], [])
    rows = {row[2]: row[4:7] for row in readings(store.path)}
    assert rows == {
        "t": (21.5, None, None),
        "n": (7.0, None, None),
        "door": (None, 1, None),
        "mode": (None, None, "eco"),
    }
    assert {row[9] for row in readings(store.path)} == {'{"room":"kitchen"}'}


def test_type_change_is_stored_and_counted(store: SQLiteStore) -> None:
    """A string reading of a numeric sensor is stored in value_str and counted, not refused."""
    store.write([msg(0, values={"level-x": 3.0})], [])
    result = store.write([msg(1, values={"level-x": "high"})], [])
    assert (result.readings, result.type_changes, result.rejected) == (1, 1, {})
    assert [row[4:7] for row in readings(store.path)] == [(3.0, None, None), (None, None, "high")]


def test_same_reading_key_under_another_id_is_not_stored_twice(store: SQLiteStore) -> None:
    """A reading is keyed by (site, device, sensor, time): a re-minted id adds no second point."""
    store.write([msg(0)], [])
    result = store.write([msg(0, id="re-minted")], [])
    assert (result.messages, result.readings) == (1, 0)
    assert len(readings(store.path)) == 1


def test_statuses_update_the_registry(store: SQLiteStore) -> None:
    """Statuses written with a batch land in the devices table, newest first wins."""
    store.write([], [DeviceStatus("home", "pi-1", "online", T0, "edge/1")])
    store.write([msg(0)], [DeviceStatus("home", "pi-1", "offline", T0 - 1, "edge/1")])
    conn = sqlite3.connect(store.path)
    row = conn.execute("SELECT state, last_seen_ms FROM devices").fetchone()
    conn.close()
    assert row == ("online", T0)


def test_prune_and_check(tmp_path: Path) -> None:
    """prune forgets old ids (readings stay); check passes on a healthy file."""
    store = SQLiteStore(tmp_path / "t.db", retention_ms=1000, clock_ms=lambda: T0)
    store.write([msg(0), msg(1)], [])
    store.check()
    assert store.prune(T0 + 5000) == 2
    assert store.write([msg(0)], []).readings == 0  # id forgotten, reading key still present
    store.close()
    assert len(readings(tmp_path / "t.db")) == 2


def test_locked_store_is_unavailable_and_retry_succeeds(store: SQLiteStore) -> None:
    """While another process holds the write lock, write raises StoreUnavailable; a retry works."""
    locked = SQLiteStore(store.path, busy_timeout_s=0.05)
    blocker = sqlite3.connect(store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with pytest.raises(StoreUnavailable, match="locked"):
        locked.write([msg(0)], [])
    blocker.execute("ROLLBACK")
    blocker.close()
    assert locked.write([msg(0)], []).messages == 1
    locked.close()


def _writer(path: str, seed: int, total: int, queue: multiprocessing.SimpleQueue[object]) -> None:
    """Write all ``total`` messages in shuffled overlapping batches; report the sums."""
    order = list(range(total))
    random.Random(seed).shuffle(order)
    store = SQLiteStore(Path(path))
    stored = duplicates = 0
    for start in range(0, total, 40):
        batch = [five_readings(seq, device=f"pi-{seq % 4}") for seq in order[start : start + 60]]
        result = store.write(batch, [])
        stored += result.readings
        duplicates += result.duplicates
    store.close()
    queue.put((stored, duplicates))


def test_three_processes_store_each_reading_once(tmp_path: Path) -> None:
    """Three processes writing overlapping batches into one file store every reading once."""
    path = tmp_path / "shared.db"
    SQLiteStore(path).close()
    total = 400
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    procs = [ctx.Process(target=_writer, args=(str(path), seed, total, queue)) for seed in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    sums = [queue.get() for _ in procs]
    rows = readings(path)
    assert len(rows) == len({r[:4] for r in rows}) == total * 5
    assert sum(s for s, _ in sums) == total * 5
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT count(*) FROM messages").fetchone()[0] == total
    assert conn.execute("SELECT sum(messages) FROM streams").fetchone()[0] == total
    conn.close()

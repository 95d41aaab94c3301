"""The SQLite store: readings and the consumers' state in one file, committed together.

Each :meth:`SQLiteStore.write` is one transaction: find the batch's new messages, insert their
readings, record their ids and update completeness and the registry (:mod:`consumers.state`).
Readings and seen ids commit together, so a batch is either fully stored or not at all, and a
redelivered message finds its id already there: each reading is stored exactly once.

A reading is keyed by (site, device, sensor, ts_ms), as the wire contract identifies it:
``INSERT OR IGNORE`` also refuses a second point for that key from a message with another id
(e.g. a copy arriving after its id was pruned).

Values: numbers in ``value_num`` (REAL: integers beyond 2**53 lose precision, as in JSON
readers and InfluxDB floats), booleans in ``value_bool`` (0/1), strings in ``value_str``;
exactly one of them is set. ``tags`` is the message's tags as compact JSON, or NULL.

Several consumer processes may write one file (one writer at a time, see
:mod:`consumers.state`); readers (:mod:`consumers.query`) never block them (WAL).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from consumers.state import DEFAULT_RETENTION_MS, Durability, StateDB
from consumers.store import DeviceStatus, Message, Value, WriteResult

__all__ = ["READINGS_SCHEMA", "SQLiteStore"]

READINGS_SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (
    site       TEXT NOT NULL,
    device     TEXT NOT NULL,
    sensor     TEXT NOT NULL,
    ts_ms      INTEGER NOT NULL,  -- reading time, Unix epoch milliseconds
    value_num  REAL,              -- numbers
    value_bool INTEGER,           -- booleans, 0 or 1
    value_str  TEXT,              -- strings
    unit       TEXT,
    msg_id     TEXT NOT NULL,     -- the envelope id that brought it
    tags       TEXT,              -- the message's tags as JSON, or NULL
    PRIMARY KEY (site, device, sensor, ts_ms)
) WITHOUT ROWID
"""
_INSERT_READING = (
    "INSERT OR IGNORE INTO readings (site, device, sensor, ts_ms, value_num, value_bool,"
    " value_str, unit, msg_id, tags) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_Row = tuple[
    str, str, str, int, float | int | None, int | None, str | None, str | None, str, str | None
]


# Built once: json.dumps with arguments builds a new encoder on every call.
_TAGS_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def encode_tags(tags: Mapping[str, str]) -> str | None:
    """Encode a message's tags as compact JSON with sorted keys, or ``None`` when empty."""
    if not tags:
        return None
    return _TAGS_ENCODER.encode(dict(tags))


def value_columns(value: Value) -> tuple[float | int | None, int | None, str | None]:
    """Split a value into (value_num, value_bool, value_str): exactly one is not ``None``."""
    if isinstance(value, bool):
        return None, int(value), None
    if isinstance(value, str):
        return None, None, value
    return value, None, None


def reading_rows(messages: Sequence[Message]) -> list[_Row]:
    """The ``readings`` rows of ``messages``, in the order of :data:`_INSERT_READING`."""
    rows: list[_Row] = []
    for message in messages:
        tags = encode_tags(message.tags)
        site, device, msg_id = message.site, message.device, message.id
        for reading in message.readings:
            num, flag, text = value_columns(reading.value)
            rows.append(
                (
                    site,
                    device,
                    reading.sensor,
                    reading.ts_ms,
                    num,
                    flag,
                    text,
                    reading.unit,
                    msg_id,
                    tags,
                )
            )
    return rows


class SQLiteStore:
    """A :class:`~consumers.store.Store` writing readings to a local SQLite file.

    Args:
        path: the SQLite file; created (with its directories) if missing.
        retention_ms: how long message ids are remembered for dedupe.
        durability: ``"fsync"`` (an acknowledged batch survives power loss) or ``"process"``.
        busy_timeout_s: how long a write waits for another process's transaction.
        clock_ms: the consumer's clock (Unix epoch milliseconds), when ids were stored.

    Raises:
        StoreUnavailable: the file cannot be opened or written now.
        ConfigError: the file is not an iotpipe store or was written by a newer iotpipe.
    """

    def __init__(
        self,
        path: Path,
        *,
        retention_ms: int = DEFAULT_RETENTION_MS,
        durability: Durability = "fsync",
        busy_timeout_s: float = 30.0,
        clock_ms: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        self.state = StateDB(
            path, retention_ms=retention_ms, durability=durability, busy_timeout_s=busy_timeout_s
        )
        self.path = self.state.path
        self._clock_ms = clock_ms
        try:
            with self.state.transaction() as conn:
                conn.execute(READINGS_SCHEMA)
        except BaseException:
            self.state.close()
            raise

    def write(self, messages: Sequence[Message], statuses: Sequence[DeviceStatus]) -> WriteResult:
        """Store a batch in one transaction; raise ``StoreUnavailable`` if SQLite cannot now.

        Returns:
            What was done. ``readings`` counts rows actually inserted: a reading whose key
            (site, device, sensor, ts_ms) is already stored is not stored again.
        """
        result = WriteResult()
        with self.state.transaction() as conn:
            new, duplicates = self.state.unseen(conn, messages)
            fresh = [messages[i] for i in new]
            inserted = self._insert_readings(conn, fresh)
            self.state.record(
                conn, fresh, [messages[i] for i in duplicates], result, self._clock_ms()
            )
            self.state.update_devices(conn, statuses)
        result.readings = inserted
        return result

    @staticmethod
    def _insert_readings(conn: sqlite3.Connection, messages: Sequence[Message]) -> int:
        """Insert the readings of ``messages``; return how many rows were new."""
        before = conn.total_changes
        conn.executemany(_INSERT_READING, reading_rows(messages))
        return conn.total_changes - before

    def prune(self, now_ms: int) -> int:
        """Forget message ids older than the retention window; return how many were dropped."""
        return self.state.prune(now_ms)

    def check(self) -> None:
        """Raise ``StoreUnavailable`` when the file cannot be read."""
        self.state.check()

    def close(self) -> None:
        """Close the file."""
        self.state.close()

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

Rollups (schema version 2): ``rollup_1m`` and ``rollup_1h`` hold, per sensor and minute or hour
(UTC, aligned to the epoch), the count, sum, min and max of its number and boolean (0/1) values,
so a month of a 1 Hz sensor is 720 hourly rows instead of 2.6 million readings. They count only
readings really inserted, so a reading refused by ``INSERT OR IGNORE`` adds nothing, and the
aggregates are exactly-once too. :meth:`SQLiteStore.write` adds a batch's inserted readings to
them itself, aggregated per sensor and bucket: one upsert per bucket instead of two per reading
(a per-row trigger cost a third of the write rate). An ``AFTER INSERT`` trigger on ``readings``
maintains them for every other writer (an older iotpipe sharing the file) and for batches of
fewer than :data:`_BATCH_ROLLUP_ROWS` readings: a writer that aggregates marks its transaction
with the ``meta`` row :data:`_ROLLUP_MARK` (inserted and deleted inside the transaction, so
never committed), and the trigger skips rows inserted under that mark. A trigger without that
condition (a file written before) is replaced when the store opens.
An ``AFTER INSERT`` trigger appends each inserted reading's key to ``readings_feed``, a numbered
journal of the latest :data:`FEED_KEEP` insertions (in commit order, across every writer
process) that the dashboard's live view follows. A version 1 store is migrated when a
:class:`SQLiteStore` opens it: tables, triggers and a backfill from ``readings`` in one
transaction.

Confirmations (added with receipts, still schema version 2: an additive table that older
iotpipe versions ignore): ``confirmations`` holds per device the latest summary of the time
from reading to stored-and-confirmed (:class:`~consumers.store.Confirmation`), replaced at most
about once a second by :meth:`SQLiteStore.record_confirmations`. A store opened by an older
version lacks it until a consumer of this version opens the file; readers check for it.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from consumers.state import DEFAULT_RETENTION_MS, SCHEMA_VERSION, Durability, StateDB
from consumers.store import Confirmation, DeviceStatus, Message, Value, WriteResult

log = logging.getLogger(__name__)

__all__ = ["CONFIRMATIONS_SCHEMA", "FEED_KEEP", "READINGS_SCHEMA", "ROLLUPS", "SQLiteStore"]

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

ROLLUPS: dict[str, int] = {"rollup_1m": 60_000, "rollup_1h": 3_600_000}
"""The rollup tables and their bucket widths in milliseconds."""
FEED_KEEP = 100_000
"""How many of the latest inserted readings ``readings_feed`` keeps (a live view that falls
further behind skips ahead)."""

_ROLLUP_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
    site      TEXT NOT NULL,
    device    TEXT NOT NULL,
    sensor    TEXT NOT NULL,
    bucket_ms INTEGER NOT NULL,  -- bucket start: reading time rounded down to {width} ms
    n         INTEGER NOT NULL,  -- number and boolean readings in the bucket
    sum       REAL NOT NULL,     -- booleans count as 0/1
    min       REAL NOT NULL,
    max       REAL NOT NULL,
    PRIMARY KEY (site, device, sensor, bucket_ms)
) WITHOUT ROWID
"""
# Floor to the bucket (SQLite's % truncates toward zero; this also holds before 1970).
_BUCKET = "{ts} - ({ts} % {width} + {width}) % {width}"
_ROLLUP_UPSERT = """
    INSERT INTO {table} (site, device, sensor, bucket_ms, n, sum, min, max)
    VALUES (NEW.site, NEW.device, NEW.sensor, {bucket}, 1,
            coalesce(NEW.value_num, NEW.value_bool), coalesce(NEW.value_num, NEW.value_bool),
            coalesce(NEW.value_num, NEW.value_bool))
    ON CONFLICT (site, device, sensor, bucket_ms) DO UPDATE SET
        n = n + 1, sum = sum + excluded.sum,
        min = min(min, excluded.min), max = max(max, excluded.max);
"""
_BATCH_ROLLUP_ROWS = 16
"""From this many readings on, a write aggregates the rollups itself (fewer: the trigger does,
which costs less than the writer's few extra statements)."""
_ROLLUP_MARK = "rollups_by_writer"
"""The ``meta`` key a writer holds inside its transaction while it adds rollups itself (the
trigger's condition spells it out)."""
_ROLLUP_TRIGGER = (
    "CREATE TRIGGER IF NOT EXISTS readings_rollup AFTER INSERT ON readings"  # noqa: S608 (constants)
    " WHEN (NEW.value_num IS NOT NULL OR NEW.value_bool IS NOT NULL)"
    " AND NOT EXISTS (SELECT 1 FROM meta WHERE key = 'rollups_by_writer') BEGIN"
    + "".join(
        _ROLLUP_UPSERT.format(table=table, bucket=_BUCKET.format(ts="NEW.ts_ms", width=width))
        for table, width in ROLLUPS.items()
    )
    + "END"
)
# A batch's aggregates of one bucket, added to what the bucket holds.
_ROLLUP_ADD = """
INSERT INTO {table} (site, device, sensor, bucket_ms, n, sum, min, max)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (site, device, sensor, bucket_ms) DO UPDATE SET
    n = n + excluded.n, sum = sum + excluded.sum,
    min = min(min, excluded.min), max = max(max, excluded.max)
"""
_MARK_SET = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, 'batch')"
_MARK_CLEAR = "DELETE FROM meta WHERE key = ?"
_ROLLUP_BACKFILL = """
INSERT INTO {table} (site, device, sensor, bucket_ms, n, sum, min, max)
SELECT site, device, sensor, {bucket} AS bucket, count(*), sum(v), min(v), max(v)
FROM (SELECT site, device, sensor, ts_ms, coalesce(value_num, value_bool) AS v FROM readings)
WHERE v IS NOT NULL
GROUP BY site, device, sensor, bucket
"""
# The hourly rollup of a backfill is built from the minutes: 60 times fewer rows to read.
_ROLLUP_1H_FROM_1M = """
INSERT INTO rollup_1h (site, device, sensor, bucket_ms, n, sum, min, max)
SELECT site, device, sensor, {bucket} AS bucket, sum(n), sum(sum), min(min), max(max)
FROM rollup_1m GROUP BY site, device, sensor, bucket
"""
# seq is an INTEGER PRIMARY KEY (the rowid): max + 1 on insert, and pruning never deletes the
# newest row, so numbers only grow. Assigned inside the write transaction, they follow commit
# order across processes: a reader never sees seq n + 1 committed before n.
_FEED_SCHEMA = """
CREATE TABLE IF NOT EXISTS readings_feed (
    seq    INTEGER PRIMARY KEY,  -- insertion order
    site   TEXT NOT NULL,
    device TEXT NOT NULL,
    sensor TEXT NOT NULL,
    ts_ms  INTEGER NOT NULL      -- with site, device and sensor: the reading's key
)
"""
_FEED_TRIGGER = """
CREATE TRIGGER IF NOT EXISTS readings_feed AFTER INSERT ON readings BEGIN
    INSERT INTO readings_feed (site, device, sensor, ts_ms)
    VALUES (NEW.site, NEW.device, NEW.sensor, NEW.ts_ms);
END
"""
CONFIRMATIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS confirmations (
    site         TEXT NOT NULL,
    device       TEXT NOT NULL,
    last_ms      INTEGER NOT NULL,  -- reading -> receipt confirmed, latest receipt's newest
    p50_ms       INTEGER NOT NULL,  -- over the last `envelopes` envelopes
    p99_ms       INTEGER NOT NULL,
    envelopes    INTEGER NOT NULL,
    confirmed_ms INTEGER NOT NULL,  -- when the latest receipt was confirmed, epoch ms
    PRIMARY KEY (site, device)
) WITHOUT ROWID
"""
_UPSERT_CONFIRMATION = (
    "INSERT OR REPLACE INTO confirmations"
    " (site, device, last_ms, p50_ms, p99_ms, envelopes, confirmed_ms)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_PRUNE_FEED = "DELETE FROM readings_feed WHERE seq <= (SELECT max(seq) FROM readings_feed) - ?"
_FEED_END = "SELECT coalesce(max(seq), 0) FROM readings_feed"
_FEED_SINCE = "SELECT site, device, sensor, ts_ms FROM readings_feed WHERE seq > ?"

_Row = tuple[
    str, str, str, int, float | int | None, int | None, str | None, str | None, str, str | None
]
_Bucket = tuple[str, str, str, int]  # site, device, sensor, bucket_ms
_Aggregate = list[float]  # n, sum, min, max


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


def first_of_each_key(rows: Sequence[_Row], keys: Iterable[tuple[object, ...]]) -> list[_Row]:
    """The ``rows`` an ``INSERT OR IGNORE`` of them inserted, knowing the keys it inserted:
    for each key, the first row that has it (a later one with the same key was refused)."""
    new = set(keys)
    inserted: list[_Row] = []
    for row in rows:
        key = row[:4]
        if key in new:
            new.discard(key)
            inserted.append(row)
    return inserted


def rollup_rows(rows: Sequence[_Row]) -> dict[str, list[tuple[object, ...]]]:
    """The rows of :data:`_ROLLUP_ADD` for each rollup table: ``rows`` (inserted readings)
    aggregated per sensor and bucket; strings count nowhere, booleans as 0/1."""
    minutes: dict[_Bucket, _Aggregate] = {}
    width = ROLLUPS["rollup_1m"]
    for site, device, sensor, ts_ms, num, flag, *_ in rows:
        value = num if num is not None else flag
        if value is None:
            continue
        key = (site, device, sensor, ts_ms - ts_ms % width)  # floor, also before 1970
        aggregate = minutes.get(key)
        if aggregate is None:
            minutes[key] = [1, value, value, value]
        else:
            aggregate[0] += 1
            aggregate[1] += value
            aggregate[2] = min(aggregate[2], value)
            aggregate[3] = max(aggregate[3], value)
    out = {"rollup_1m": [(*key, *aggregate) for key, aggregate in minutes.items()]}
    # The wider tables from the minutes: a batch spans few of them.
    for table, width in ROLLUPS.items():
        if table == "rollup_1m":
            continue
        wider: dict[_Bucket, _Aggregate] = {}
        for (site, device, sensor, minute), (n, total, low, high) in minutes.items():
            key = (site, device, sensor, minute - minute % width)
            aggregate = wider.get(key)
            if aggregate is None:
                wider[key] = [n, total, low, high]
            else:
                aggregate[0] += n
                aggregate[1] += total
                aggregate[2] = min(aggregate[2], low)
                aggregate[3] = max(aggregate[3], high)
        out[table] = [(*key, *aggregate) for key, aggregate in wider.items()]
    return out


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
                self._migrate(conn)
        except BaseException:
            self.state.close()
            raise

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create the rollups, the live feed and the confirmations; backfill a version 1 store.

        Runs inside the opening transaction, so concurrent openers of a version 1 file agree:
        the first one migrates, the others find the tables.
        """
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        for table, width in ROLLUPS.items():
            conn.execute(_ROLLUP_TABLE.format(table=table, width=width))
        conn.execute(_FEED_SCHEMA)
        conn.execute(CONFIRMATIONS_SCHEMA)
        trigger = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = 'readings_rollup'"
        ).fetchone()
        if trigger is not None and _ROLLUP_MARK not in trigger[0]:
            # Written before writers added their own rollups: it would count their rows twice.
            conn.execute("DROP TRIGGER readings_rollup")
        conn.execute(_ROLLUP_TRIGGER)
        conn.execute(_FEED_TRIGGER)
        if not tables >= set(ROLLUPS):
            self._backfill(conn)
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version' AND CAST(value AS INTEGER) < ?",
            (str(SCHEMA_VERSION), SCHEMA_VERSION),
        )

    def _backfill(self, conn: sqlite3.Connection) -> None:
        """Fill fresh rollup tables from the stored readings (a version 1 store)."""
        began = time.perf_counter()
        for table in ROLLUPS:
            conn.execute(f"DELETE FROM {table}")  # noqa: S608 (table names are constants)
        minute = ROLLUPS["rollup_1m"]
        conn.execute(
            _ROLLUP_BACKFILL.format(
                table="rollup_1m", bucket=_BUCKET.format(ts="ts_ms", width=minute)
            )
        )
        hour = ROLLUPS["rollup_1h"]
        conn.execute(_ROLLUP_1H_FROM_1M.format(bucket=_BUCKET.format(ts="bucket_ms", width=hour)))
        minutes = conn.execute("SELECT count(*) FROM rollup_1m").fetchone()[0]
        if minutes:
            log.info(
                "store migrated to schema version %d path=%s rollup_1m_rows=%d seconds=%.1f",
                SCHEMA_VERSION,
                self.path,
                minutes,
                time.perf_counter() - began,
            )

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
            if inserted:
                conn.execute(_PRUNE_FEED, (FEED_KEEP,))
            self.state.record(
                conn, fresh, [messages[i] for i in duplicates], result, self._clock_ms()
            )
            self.state.update_devices(conn, statuses)
        result.readings = inserted
        return result

    @staticmethod
    def _insert_readings(conn: sqlite3.Connection, messages: Sequence[Message]) -> int:
        """Insert the readings of ``messages`` and add them to the rollups; return how many
        rows were new. Inside the write transaction."""
        rows = reading_rows(messages)
        if len(rows) < _BATCH_ROLLUP_ROWS:  # the trigger adds them, cheaper for so few
            return int(conn.executemany(_INSERT_READING, rows).rowcount) if rows else 0
        conn.execute(_MARK_SET, (_ROLLUP_MARK,))  # the trigger leaves the rollups to us
        fed = conn.execute(_FEED_END).fetchone()[0]
        if conn.executemany(_INSERT_READING, rows).rowcount == len(rows):
            inserted = rows
        else:
            # Some were refused (their key is stored, or twice in the batch). The feed trigger
            # numbered exactly the rows inserted, so it tells which, for the rollups count those.
            inserted = first_of_each_key(rows, conn.execute(_FEED_SINCE, (fed,)))
        for table, aggregates in rollup_rows(inserted).items():
            conn.executemany(_ROLLUP_ADD.format(table=table), aggregates)
        conn.execute(_MARK_CLEAR, (_ROLLUP_MARK,))
        return len(inserted)

    def record_confirmations(self, confirmations: Sequence[Confirmation]) -> None:
        """Replace these devices' confirmation summaries, in one small transaction."""
        rows = [
            (c.site, c.device, c.last_ms, c.p50_ms, c.p99_ms, c.envelopes, c.confirmed_ms)
            for c in confirmations
        ]
        with self.state.transaction() as conn:
            conn.executemany(_UPSERT_CONFIRMATION, rows)

    def prune(self, now_ms: int) -> int:
        """Forget message ids older than the retention window; return how many were dropped."""
        return self.state.prune(now_ms)

    def check(self) -> None:
        """Raise ``StoreUnavailable`` when the file cannot be read."""
        self.state.check()

    def close(self) -> None:
        """Close the file."""
        self.state.close()

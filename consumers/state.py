"""The consumers' state: seen message ids, per-boot completeness, sensor types, device registry.

One SQLite file, shared by every store: the SQLite store keeps its readings in the same file (so
readings and seen ids commit together), the InfluxDB store keeps only this state locally. Several
consumer *processes* may write one file at once: every write is a ``BEGIN IMMEDIATE``
transaction (one writer at a time, the others wait up to ``busy_timeout_s``), and every decision
that depends on what is stored (is this id new? is this seq out of order?) is taken inside that
transaction, so concurrent writers agree.

Tables (``docs/store.md`` has the full schema and the definitions):

* ``meta``: ``schema_version`` = :data:`SCHEMA_VERSION`; a file with a newer version is refused.
* ``messages``: the ids seen in the last ``retention_ms`` (the dedupe window), pruned by
  :meth:`StateDB.prune`.
* ``streams``: completeness per (site, device, boot): first and highest ``seq``, messages stored,
  out-of-order arrivals, duplicates absorbed. Gaps = ``max_seq - first_seq + 1 - messages``.
* ``sensors``: each sensor's value type, pinned to the first seen, and how often it changed.
* ``devices``: the registry (latest status by its own timestamp, agent) and last telemetry time.

Durability: ``"fsync"`` (default) commits with ``synchronous=FULL``, so an acknowledged batch
survives power loss; ``"process"`` uses ``synchronous=NORMAL``: it survives a crash of the
consumer, but power loss may undo the last commits (never corrupting the file).

Errors: SQLite's "locked", "disk full", "I/O error" and "read-only" become
:class:`~consumers.store.StoreUnavailable` (retry later); a file that is not an iotpipe state
file, or was written by a newer iotpipe, is a :class:`~iotpipe.errors.ConfigError`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from consumers.store import DeviceStatus, Message, StoreUnavailable, Value, WriteResult
from iotpipe.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_RETENTION_MS",
    "SCHEMA_VERSION",
    "Durability",
    "StateDB",
    "value_kind",
]

Durability = Literal["fsync", "process"]

SCHEMA_VERSION = 2
"""The layout this code writes; a file with a higher ``meta.schema_version`` is refused.

Version 2 added the SQLite store's rollup tables and live feed (:mod:`consumers.sqlite_store`
migrates a version 1 store when it opens it); the state tables are the same in both.
"""
DEFAULT_RETENTION_MS = 7 * 86_400_000
"""How long message ids are remembered by default: 7 days."""

# Ids are looked up in chunks: one IN (...) per chunk, well below SQLite's variable limit.
_LOOKUP_CHUNK = 500
# Page cache per connection, in KiB (measured: +25% write rate at a million readings).
_CACHE_KIB = 32 * 1024
# Prune deletes this many ids per transaction, so writers never wait long behind it.
_PRUNE_CHUNK = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (
    id        TEXT PRIMARY KEY,     -- envelope id: the dedupe key
    site      TEXT NOT NULL,
    device    TEXT NOT NULL,
    boot      TEXT NOT NULL,
    seq       INTEGER NOT NULL,
    stored_ms INTEGER NOT NULL      -- consumer clock at commit, pruned after retention_ms
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_stored_ms ON messages (stored_ms);
CREATE TABLE IF NOT EXISTS streams (
    site         TEXT NOT NULL,
    device       TEXT NOT NULL,
    boot         TEXT NOT NULL,
    first_seq    INTEGER NOT NULL,  -- lowest seq stored
    max_seq      INTEGER NOT NULL,  -- highest seq stored
    messages     INTEGER NOT NULL,  -- messages stored
    out_of_order INTEGER NOT NULL,  -- stored after a higher seq of the same boot
    duplicates   INTEGER NOT NULL,  -- copies absorbed by dedupe
    first_ms     INTEGER NOT NULL,  -- earliest reading time stored
    last_ms      INTEGER NOT NULL,  -- latest reading time stored
    PRIMARY KEY (site, device, boot)
);
CREATE TABLE IF NOT EXISTS sensors (
    site         TEXT NOT NULL,
    device       TEXT NOT NULL,
    sensor       TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('number', 'boolean', 'string')),
    unit         TEXT,
    type_changes INTEGER NOT NULL,
    last_ts_ms   INTEGER NOT NULL,
    PRIMARY KEY (site, device, sensor)
);
CREATE TABLE IF NOT EXISTS devices (
    site         TEXT NOT NULL,
    device       TEXT NOT NULL,
    state        TEXT,              -- online | offline | NULL (no status seen)
    state_ts_ms  INTEGER,
    agent        TEXT,
    last_seen_ms INTEGER,           -- latest reading time stored
    PRIMARY KEY (site, device)
);
"""

_UPSERT_STREAM = """
INSERT INTO streams (site, device, boot, first_seq, max_seq, messages, out_of_order, duplicates,
                     first_ms, last_ms)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (site, device, boot) DO UPDATE SET
    first_seq = excluded.first_seq, max_seq = excluded.max_seq, messages = excluded.messages,
    out_of_order = excluded.out_of_order, duplicates = excluded.duplicates,
    first_ms = excluded.first_ms, last_ms = excluded.last_ms
"""
_UPSERT_SENSOR = """
INSERT INTO sensors (site, device, sensor, kind, unit, type_changes, last_ts_ms)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (site, device, sensor) DO UPDATE SET
    unit = excluded.unit, type_changes = excluded.type_changes, last_ts_ms = excluded.last_ts_ms
"""
_TOUCH_DEVICE = """
INSERT INTO devices (site, device, last_seen_ms) VALUES (?, ?, ?)
ON CONFLICT (site, device) DO UPDATE SET
    last_seen_ms = max(coalesce(last_seen_ms, excluded.last_seen_ms), excluded.last_seen_ms)
"""
# Only a newer status replaces the state, so redelivered or reordered statuses change nothing.
_UPSERT_STATUS = """
INSERT INTO devices (site, device, state, state_ts_ms, agent) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (site, device) DO UPDATE SET
    state = excluded.state, state_ts_ms = excluded.state_ts_ms, agent = excluded.agent
WHERE devices.state_ts_ms IS NULL OR excluded.state_ts_ms > devices.state_ts_ms
"""

# Sensors whose type change was already logged by this process (one WARNING per sensor).
_warned_type_changes: set[tuple[str, str, str]] = set()
_warned_lock = threading.Lock()


def value_kind(value: Value) -> Literal["number", "boolean", "string"]:
    """Name the contract type of a reading value (a boolean is not a number)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    return "number"


def unavailable_reason(err: sqlite3.Error, path: Path, busy_timeout_s: float) -> str:
    """Word an SQLite error for a :class:`StoreUnavailable`, naming the file and the likely cause."""
    name = getattr(err, "sqlite_errorname", "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        cause = f"another writer held the lock for more than {busy_timeout_s:g} s"
    elif name == "SQLITE_FULL":
        cause = "the disk is full"
    elif name.startswith("SQLITE_READONLY"):
        cause = "the file or its directory is read-only"
    elif name.startswith("SQLITE_IOERR"):
        cause = "the disk reported an I/O error"
    elif name.startswith("SQLITE_CANTOPEN"):
        cause = "missing directory or no permission"
    else:
        cause = "try again later"
    return f"sqlite {path}: {err} ({cause})"


@dataclass(slots=True)
class StreamRow:
    """A ``streams`` row being updated in memory while a batch is recorded (SQLite and
    PostgreSQL stores alike)."""

    first_seq: int
    max_seq: int
    messages: int = 0
    out_of_order: int = 0
    duplicates: int = 0
    first_ms: int | None = None
    last_ms: int | None = None

    def add(self, message: Message, top: int) -> bool:
        """Count a stored ``message`` of this stream, whose highest seq so far is ``top``.

        Returns True if it arrived out of order (below ``top``).
        """
        late = message.seq < top
        if late:
            self.out_of_order += 1
        self.first_seq = min(self.first_seq, message.seq)
        self.max_seq = max(top, message.seq)
        self.messages += 1
        for reading in message.readings:
            ts = reading.ts_ms
            self.first_ms = ts if self.first_ms is None else min(self.first_ms, ts)
            self.last_ms = ts if self.last_ms is None else max(self.last_ms, ts)
        return late

    def row(self) -> tuple[int, ...]:
        """The values after the key, in ``_UPSERT_STREAM`` order."""
        return (
            self.first_seq,
            self.max_seq,
            self.messages,
            self.out_of_order,
            self.duplicates,
            self.first_ms or 0,
            self.last_ms or 0,
        )


@dataclass(slots=True)
class _Sensor:
    """A ``sensors`` row being updated in memory during :meth:`StateDB.record`."""

    kind: str
    unit: str | None
    type_changes: int
    last_ts_ms: int


class StateDB:
    """The dedupe, completeness and registry state in one SQLite file.

    Writes go through :meth:`transaction`; :meth:`unseen`, :meth:`record` and
    :meth:`update_devices` take the connection it yields, so a store can add its own statements
    (the SQLite store's readings) to the same atomic commit. One instance may be shared by
    threads: transactions are serialised by a lock.

    Args:
        path: the SQLite file; it and its parent directories are created if missing.
        retention_ms: how long a message id is remembered (the dedupe window).
        durability: ``"fsync"`` (a commit survives power loss) or ``"process"`` (it survives a
            crash of the process).
        busy_timeout_s: how long a write waits for another process's transaction.

    Raises:
        StoreUnavailable: the file cannot be opened or written now (locked, read-only, disk
            full, I/O error).
        ConfigError: the file is not an iotpipe state file, or was written by a newer iotpipe.
    """

    def __init__(
        self,
        path: Path,
        *,
        retention_ms: int = DEFAULT_RETENTION_MS,
        durability: Durability = "fsync",
        busy_timeout_s: float = 30.0,
    ) -> None:
        if durability not in ("fsync", "process"):
            raise ConfigError("durability", durability, "expected 'fsync' or 'process'")
        if retention_ms <= 0:
            raise ConfigError("retention_ms", retention_ms, "must be > 0")
        self.path = Path(path)
        self.retention_ms = retention_ms
        self.durability = durability
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn = self._connect()
        try:
            self._create_schema()
        except BaseException:
            self._conn.close()
            raise

    # -- connection and transactions ----------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """Open the file with the pragmas every write relies on."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StoreUnavailable(
                f"sqlite {self.path}: cannot create its directory: {err}"
            ) from err
        try:
            # Autocommit mode: transactions are explicit BEGIN IMMEDIATE ... COMMIT.
            conn = sqlite3.connect(
                self.path,
                isolation_level=None,
                timeout=self.busy_timeout_s,
                check_same_thread=False,
            )
        except sqlite3.OperationalError as err:
            raise self._unavailable(err) from err
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            synchronous = "FULL" if self.durability == "fsync" else "NORMAL"
            conn.execute(f"PRAGMA synchronous = {synchronous}")
            # Inserts land all over the B-trees (ids, per-sensor keys); a larger page cache keeps
            # their upper levels in memory once the file outgrows SQLite's 2 MiB default.
            conn.execute(f"PRAGMA cache_size = -{_CACHE_KIB}")
        except sqlite3.OperationalError as err:
            conn.close()
            raise self._unavailable(err) from err
        except sqlite3.DatabaseError as err:
            conn.close()
            raise self._not_ours(str(err)) from err
        return conn

    def _create_schema(self) -> None:
        """Create missing tables; refuse foreign files and newer schemas."""
        with self.transaction() as conn:
            try:
                tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
            except sqlite3.DatabaseError as err:
                raise self._not_ours(str(err)) from err
            if tables and "meta" not in tables:
                raise self._not_ours("it has tables but no iotpipe meta table")
            # Not executescript(): it would COMMIT the transaction this runs in.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0])
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    "store",
                    self.path,
                    f"written by a newer iotpipe (schema version {version}); this version "
                    f"reads schema version {SCHEMA_VERSION}: upgrade iotpipe",
                )

    def _not_ours(self, why: str) -> ConfigError:
        return ConfigError("store", self.path, f"not an iotpipe store or state file ({why})")

    def _unavailable(self, err: sqlite3.Error) -> StoreUnavailable:
        return StoreUnavailable(unavailable_reason(err, self.path, self.busy_timeout_s))

    def transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        """Run a write transaction: ``BEGIN IMMEDIATE`` ... ``COMMIT``, ``ROLLBACK`` on error.

        Yields:
            The connection; use it only inside the ``with`` block.

        Raises:
            StoreUnavailable: SQLite reported the file locked, full, read-only or failing
                (nothing of the transaction is committed).
        """
        return self._transaction()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as err:
                raise self._unavailable(err) from err
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as err:
                self._rollback()
                if isinstance(err, sqlite3.OperationalError):
                    raise self._unavailable(err) from err
                raise

    def _rollback(self) -> None:
        # A failed COMMIT or an I/O error may already have ended the transaction.
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error as err:
                log.warning("rollback failed path=%s error=%s", self.path, err)

    def check(self) -> None:
        """Run a trivial query; raise :class:`StoreUnavailable` if the file cannot be read."""
        with self._lock:
            try:
                self._conn.execute("SELECT count(*) FROM meta").fetchone()
            except sqlite3.Error as err:
                raise self._unavailable(err) from err

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            self._conn.close()

    # -- dedupe -------------------------------------------------------------------------------

    def unseen(
        self, conn: sqlite3.Connection, messages: Sequence[Message]
    ) -> tuple[list[int], list[int]]:
        """Split a batch into new messages and duplicates, without writing anything.

        A message is new if its id is neither stored nor carried by an earlier message of the
        same batch. Call it inside :meth:`transaction` so the answer still holds at commit.

        Returns:
            (indices of new messages, indices of duplicates), both in batch order.
        """
        seen = self._stored_ids(conn, (m.id for m in messages))
        new: list[int] = []
        duplicates: list[int] = []
        for index, message in enumerate(messages):
            if message.id in seen:
                duplicates.append(index)
            else:
                seen.add(message.id)
                new.append(index)
        return new, duplicates

    @staticmethod
    def _stored_ids(conn: sqlite3.Connection, ids: Iterable[str]) -> set[str]:
        """Return which of ``ids`` are in the ``messages`` table."""
        unique = list(dict.fromkeys(ids))
        found: set[str] = set()
        for start in range(0, len(unique), _LOOKUP_CHUNK):
            chunk = unique[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            sql = f"SELECT id FROM messages WHERE id IN ({marks})"  # noqa: S608 (only ? marks)
            found.update(row[0] for row in conn.execute(sql, chunk))
        return found

    # -- recording a batch --------------------------------------------------------------------

    def record(
        self,
        conn: sqlite3.Connection,
        messages: Sequence[Message],
        duplicates: Sequence[Message],
        result: WriteResult,
        now_ms: int,
    ) -> list[int]:
        """Record stored messages and absorbed duplicates; update completeness and registry.

        Call it inside :meth:`transaction`, after writing the readings of ``messages``.

        Args:
            conn: the connection :meth:`transaction` yielded.
            messages: the messages just stored (the new ones :meth:`unseen` found).
            duplicates: the messages :meth:`unseen` found already stored.
            result: filled in: ``messages``, ``readings``, ``out_of_order``, ``type_changes``
                and ``duplicates`` are incremented.
            now_ms: the consumer's clock, the start of each id's retention window.

        Returns:
            Indices into ``messages`` of those whose id was recorded meanwhile by another
            process (or repeated within ``messages``): they count as duplicates, not as stored.
        """
        late = self._late_duplicates(conn, messages)
        late_set = set(late)
        stored = [m for i, m in enumerate(messages) if i not in late_set]
        conn.executemany(
            "INSERT OR IGNORE INTO messages (id, site, device, boot, seq, stored_ms)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(m.id, m.site, m.device, m.boot, m.seq, now_ms) for m in stored],
        )
        result.messages += len(stored)
        result.readings += sum(len(m.readings) for m in stored)
        result.duplicates += len(duplicates) + len(late)
        late_copies = [messages[i] for i in late]
        result.out_of_order += self._update_streams(conn, stored, [*duplicates, *late_copies])
        result.type_changes += self._update_sensors(conn, stored)
        self._touch_devices(conn, stored)
        return late

    def _late_duplicates(self, conn: sqlite3.Connection, messages: Sequence[Message]) -> list[int]:
        """Indices of messages already stored, or repeated earlier in ``messages``."""
        seen = self._stored_ids(conn, (m.id for m in messages))
        late: list[int] = []
        for index, message in enumerate(messages):
            if message.id in seen:
                late.append(index)
            seen.add(message.id)
        return late

    def _update_streams(
        self, conn: sqlite3.Connection, stored: Sequence[Message], duplicates: Sequence[Message]
    ) -> int:
        """Fold stored messages and duplicates into ``streams``; return the out-of-order count."""
        streams: dict[tuple[str, str, str], StreamRow] = {}
        out_of_order = 0
        for message in stored:
            stream = self._stream(conn, streams, message)
            out_of_order += stream.add(message, stream.max_seq)
        for message in duplicates:
            self._stream(conn, streams, message).duplicates += 1
        conn.executemany(
            _UPSERT_STREAM,
            [(*key, *s.row()) for key, s in streams.items()],
        )
        return out_of_order

    @staticmethod
    def _stream(
        conn: sqlite3.Connection,
        streams: dict[tuple[str, str, str], StreamRow],
        message: Message,
    ) -> StreamRow:
        """The in-memory row of ``message``'s stream, loaded from the table on first use."""
        key = (message.site, message.device, message.boot)
        stream = streams.get(key)
        if stream is None:
            row = conn.execute(
                "SELECT first_seq, max_seq, messages, out_of_order, duplicates, first_ms, last_ms"
                " FROM streams WHERE site = ? AND device = ? AND boot = ?",
                key,
            ).fetchone()
            stream = (
                StreamRow(*row) if row else StreamRow(first_seq=message.seq, max_seq=message.seq)
            )
            streams[key] = stream
        return stream

    def _update_sensors(self, conn: sqlite3.Connection, stored: Sequence[Message]) -> int:
        """Pin each new sensor's type, count type changes; return the readings that changed type."""
        sensors: dict[tuple[str, str, str], _Sensor] = {}
        loaded: set[tuple[str, str]] = set()
        changes = 0
        for message in stored:
            if (message.site, message.device) not in loaded:
                sensors.update(self._load_sensors(conn, message.site, message.device))
                loaded.add((message.site, message.device))
            for reading in message.readings:
                key = (message.site, message.device, reading.sensor)
                kind = value_kind(reading.value)
                sensor = sensors.get(key)
                if sensor is None:
                    sensors[key] = _Sensor(kind, reading.unit, 0, reading.ts_ms)
                    continue
                if kind != sensor.kind:
                    sensor.type_changes += 1
                    changes += 1
                    _warn_type_change(key, sensor.kind, kind)
                sensor.unit = reading.unit if reading.unit is not None else sensor.unit
                sensor.last_ts_ms = max(sensor.last_ts_ms, reading.ts_ms)
        conn.executemany(
            _UPSERT_SENSOR,
            [(*key, s.kind, s.unit, s.type_changes, s.last_ts_ms) for key, s in sensors.items()],
        )
        return changes

    @staticmethod
    def _load_sensors(
        conn: sqlite3.Connection, site: str, device: str
    ) -> dict[tuple[str, str, str], _Sensor]:
        rows = conn.execute(
            "SELECT sensor, kind, unit, type_changes, last_ts_ms FROM sensors"
            " WHERE site = ? AND device = ?",
            (site, device),
        )
        return {(site, device, row[0]): _Sensor(*row[1:]) for row in rows}

    @staticmethod
    def _touch_devices(conn: sqlite3.Connection, stored: Sequence[Message]) -> None:
        """Set each device's ``last_seen_ms`` to its latest reading time stored."""
        last_seen: dict[tuple[str, str], int] = {}
        for message in stored:
            if not message.readings:
                continue
            key = (message.site, message.device)
            latest = max(r.ts_ms for r in message.readings)
            last_seen[key] = max(latest, last_seen.get(key, latest))
        conn.executemany(_TOUCH_DEVICE, [(*key, ts) for key, ts in last_seen.items()])

    # -- registry and retention ---------------------------------------------------------------

    def update_devices(self, conn: sqlite3.Connection, statuses: Sequence[DeviceStatus]) -> None:
        """Apply status messages to the registry; only a newer status ``ts`` replaces the state."""
        conn.executemany(
            _UPSERT_STATUS, [(s.site, s.device, s.state, s.ts_ms, s.agent) for s in statuses]
        )

    def prune(self, now_ms: int) -> int:
        """Forget message ids stored before ``now_ms - retention_ms``.

        Deletes in chunks of a few thousand ids per transaction, so concurrent writers wait
        for one chunk at most.

        Returns:
            How many ids were forgotten.

        Raises:
            StoreUnavailable: the file is locked, full, read-only or failing.
        """
        cutoff = now_ms - self.retention_ms
        dropped = 0
        while True:
            with self.transaction() as conn:
                deleted = conn.execute(
                    "DELETE FROM messages WHERE id IN"
                    " (SELECT id FROM messages WHERE stored_ms < ? LIMIT ?)",
                    (cutoff, _PRUNE_CHUNK),
                ).rowcount
            dropped += deleted
            if deleted < _PRUNE_CHUNK:
                return dropped


def _warn_type_change(key: tuple[str, str, str], pinned: str, got: str) -> None:
    """Log a sensor's first type change seen by this process (later ones are only counted)."""
    with _warned_lock:
        if key in _warned_type_changes:
            return
        _warned_type_changes.add(key)
    site, device, sensor = key
    log.warning(
        "sensor type changed site=%s device=%s sensor=%s pinned=%s got=%s"
        " (stored anyway; further changes of this sensor are only counted)",
        site,
        device,
        sensor,
        pinned,
        got,
    )

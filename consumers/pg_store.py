"""The PostgreSQL store of record: one server shared by any number of consumer hosts.

Each :meth:`PostgresStore.write` is one transaction: claim the batch's ids in ``seen_ids``,
insert the readings of the ids this transaction claimed, add them to the rollups and fold the
batch into completeness (``streams``), sensor types (``sensors``) and the registry (``devices``).
The consumer acknowledges AMQP only after the commit, so the effect is exactly-once per id across
hosts, with no Redis:

* ``INSERT INTO seen_ids ... ON CONFLICT DO NOTHING RETURNING id`` claims ids. When another host
  holds a copy of the same message (a redelivery) in an open transaction, PostgreSQL makes this
  insert wait for that transaction: if it commits, the id is not returned here and its readings
  are skipped (a duplicate); if it rolls back, this transaction claims it.
* Every table is written in one order (ids, readings, rollups, streams, sensors, devices) and
  rows within a statement sorted by key, so two writers never wait on each other in a cycle; a
  deadlock or serialization failure that happens anyway rolls back and is retried.
* Counters are added as deltas (``messages = streams.messages + excluded.messages``, ``least``
  and ``greatest`` for bounds), so concurrent batches of one device add up. The existing
  ``streams`` rows of a batch are locked (``FOR UPDATE``) before out-of-order arrivals are
  counted against their highest seq.

``readings`` is partitioned by range on ``ts_ms``, one partition per UTC month
(``readings_y2026m12``), created on demand before the batch transaction (under an advisory
lock, so concurrent hosts do not race on the catalog). ``rollup_1m``/``rollup_1h`` are the SQLite
store's (:data:`~consumers.sqlite_store.ROLLUPS`), maintained by the writer from the readings it
really inserted.

``schema_version`` holds the layout version (:data:`PG_SCHEMA_VERSION`); a database with a
newer one is refused, an older one will be migrated by the release that changes it.

Durability: ``fsync`` commits with ``synchronous_commit = on`` (the server's WAL is flushed
before the commit returns); ``process`` with ``off`` (a server crash may lose the last few
hundred milliseconds of acknowledged batches: the consumer's guarantee then rests on the server).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors

from consumers.sqlite_store import ROLLUPS, first_of_each_key, reading_rows, rollup_rows
from consumers.state import DEFAULT_RETENTION_MS, Durability, StreamRow, value_kind
from consumers.store import Confirmation, DeviceStatus, Message, StoreUnavailable, WriteResult
from iotpipe.errors import ConfigError
from iotpipe.schema import redact_url

log = logging.getLogger(__name__)

__all__ = ["PG_SCHEMA_VERSION", "PostgresStore", "connect_readonly", "is_pg_error", "month_range"]

PG_SCHEMA_VERSION = 1
"""The layout this code writes in a PostgreSQL database."""

_CONNECT_TIMEOUT_S = 10
_DAY_MS = 86_400_000
_RETRIES = 3  # attempts of a batch that hit a deadlock or serialization failure
_PRUNE_CHUNK = 10_000
_SCHEMA_LOCK = 0x10770E  # advisory lock key: schema creation and partition creation

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS schema_version (
        version    INTEGER NOT NULL,
        applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )""",
    """CREATE TABLE IF NOT EXISTS seen_ids (
        id        TEXT PRIMARY KEY,     -- envelope id: the dedupe key
        site      TEXT NOT NULL,
        device    TEXT NOT NULL,
        boot      TEXT NOT NULL,
        seq       BIGINT NOT NULL,
        stored_ms BIGINT NOT NULL       -- consumer clock at commit, pruned after retention
    )""",
    "CREATE INDEX IF NOT EXISTS seen_ids_stored_ms ON seen_ids (stored_ms)",
    """CREATE TABLE IF NOT EXISTS readings (
        site       TEXT NOT NULL,
        device     TEXT NOT NULL,
        sensor     TEXT NOT NULL,
        ts_ms      BIGINT NOT NULL,     -- reading time, Unix epoch milliseconds
        value_num  DOUBLE PRECISION,    -- numbers
        value_bool SMALLINT,            -- booleans, 0 or 1
        value_str  TEXT,                -- strings
        unit       TEXT,
        msg_id     TEXT NOT NULL,       -- the envelope id that brought it
        tags       TEXT,                -- the message's tags as JSON, or NULL
        PRIMARY KEY (site, device, sensor, ts_ms)
    ) PARTITION BY RANGE (ts_ms)""",
    *(
        f"""CREATE TABLE IF NOT EXISTS {table} (
        site      TEXT NOT NULL,
        device    TEXT NOT NULL,
        sensor    TEXT NOT NULL,
        bucket_ms BIGINT NOT NULL,      -- bucket start: reading time floored to {width} ms
        n         BIGINT NOT NULL,
        sum       DOUBLE PRECISION NOT NULL,
        min       DOUBLE PRECISION NOT NULL,
        max       DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (site, device, sensor, bucket_ms)
    )"""
        for table, width in ROLLUPS.items()
    ),
    """CREATE TABLE IF NOT EXISTS streams (
        site         TEXT NOT NULL,
        device       TEXT NOT NULL,
        boot         TEXT NOT NULL,
        first_seq    BIGINT NOT NULL,
        max_seq      BIGINT NOT NULL,
        messages     BIGINT NOT NULL,
        out_of_order BIGINT NOT NULL,
        duplicates   BIGINT NOT NULL,
        first_ms     BIGINT NOT NULL,
        last_ms      BIGINT NOT NULL,
        PRIMARY KEY (site, device, boot)
    )""",
    """CREATE TABLE IF NOT EXISTS sensors (
        site         TEXT NOT NULL,
        device       TEXT NOT NULL,
        sensor       TEXT NOT NULL,
        kind         TEXT NOT NULL CHECK (kind IN ('number', 'boolean', 'string')),
        unit         TEXT,
        type_changes BIGINT NOT NULL,
        last_ts_ms   BIGINT NOT NULL,
        PRIMARY KEY (site, device, sensor)
    )""",
    """CREATE TABLE IF NOT EXISTS devices (
        site         TEXT NOT NULL,
        device       TEXT NOT NULL,
        state        TEXT,
        state_ts_ms  BIGINT,
        agent        TEXT,
        last_seen_ms BIGINT,
        PRIMARY KEY (site, device)
    )""",
    """CREATE TABLE IF NOT EXISTS confirmations (
        site         TEXT NOT NULL,
        device       TEXT NOT NULL,
        last_ms      BIGINT NOT NULL,
        p50_ms       BIGINT NOT NULL,
        p99_ms       BIGINT NOT NULL,
        envelopes    BIGINT NOT NULL,
        confirmed_ms BIGINT NOT NULL,
        PRIMARY KEY (site, device)
    )""",
]

_CLAIM_IDS = """
INSERT INTO seen_ids (id, site, device, boot, seq, stored_ms)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::bigint[], %b::bigint[])
ORDER BY 1
ON CONFLICT (id) DO NOTHING
RETURNING id
"""
_INSERT_READINGS = """
INSERT INTO readings (site, device, sensor, ts_ms, value_num, value_bool, value_str, unit,
                      msg_id, tags)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::bigint[], %b::float8[],
                     %b::smallint[], %b::text[], %b::text[], %b::text[], %b::text[])
ON CONFLICT DO NOTHING
RETURNING site, device, sensor, ts_ms
"""
_ROLLUP_ADD = """
INSERT INTO {table} AS r (site, device, sensor, bucket_ms, n, sum, min, max)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::bigint[], %b::bigint[],
                     %b::float8[], %b::float8[], %b::float8[])
ON CONFLICT (site, device, sensor, bucket_ms) DO UPDATE SET
    n = r.n + excluded.n, sum = r.sum + excluded.sum,
    min = least(r.min, excluded.min), max = greatest(r.max, excluded.max)
"""
_LOCK_STREAMS = """
SELECT site, device, boot, max_seq FROM streams
WHERE (site, device, boot) IN (SELECT * FROM unnest(%b::text[], %b::text[], %b::text[]))
ORDER BY site, device, boot
FOR UPDATE
"""
_ADD_STREAMS = """
INSERT INTO streams AS s (site, device, boot, first_seq, max_seq, messages, out_of_order,
                          duplicates, first_ms, last_ms)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::bigint[], %b::bigint[],
                     %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[], %b::bigint[])
ON CONFLICT (site, device, boot) DO UPDATE SET
    first_seq = least(s.first_seq, excluded.first_seq),
    max_seq = greatest(s.max_seq, excluded.max_seq),
    messages = s.messages + excluded.messages,
    out_of_order = s.out_of_order + excluded.out_of_order,
    duplicates = s.duplicates + excluded.duplicates,
    -- a stream seen only through duplicates so far has no reading times (0, 0) yet
    first_ms = CASE WHEN excluded.messages = 0 THEN s.first_ms
                    WHEN s.messages = 0 THEN excluded.first_ms
                    ELSE least(s.first_ms, excluded.first_ms) END,
    last_ms = greatest(s.last_ms, excluded.last_ms)
"""
_SENSORS_OF = """
SELECT site, device, sensor, kind FROM sensors
WHERE (site, device) IN (SELECT * FROM unnest(%b::text[], %b::text[]))
"""
_ADD_SENSORS = """
INSERT INTO sensors AS s (site, device, sensor, kind, unit, type_changes, last_ts_ms)
SELECT * FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::bigint[],
                     %b::bigint[])
ON CONFLICT (site, device, sensor) DO UPDATE SET
    unit = coalesce(excluded.unit, s.unit),
    type_changes = s.type_changes + excluded.type_changes,
    last_ts_ms = greatest(s.last_ts_ms, excluded.last_ts_ms)
"""
_TOUCH_DEVICES = """
INSERT INTO devices AS d (site, device, last_seen_ms)
SELECT * FROM unnest(%b::text[], %b::text[], %b::bigint[])
ON CONFLICT (site, device) DO UPDATE SET
    last_seen_ms = greatest(d.last_seen_ms, excluded.last_seen_ms)
"""
# Only a newer status replaces the state, so redelivered or reordered statuses change nothing.
_UPSERT_STATUS = """
INSERT INTO devices AS d (site, device, state, state_ts_ms, agent) VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (site, device) DO UPDATE SET
    state = excluded.state, state_ts_ms = excluded.state_ts_ms, agent = excluded.agent
WHERE d.state_ts_ms IS NULL OR excluded.state_ts_ms > d.state_ts_ms
"""
_UPSERT_CONFIRMATION = """
INSERT INTO confirmations (site, device, last_ms, p50_ms, p99_ms, envelopes, confirmed_ms)
VALUES (%s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (site, device) DO UPDATE SET
    last_ms = excluded.last_ms, p50_ms = excluded.p50_ms, p99_ms = excluded.p99_ms,
    envelopes = excluded.envelopes, confirmed_ms = excluded.confirmed_ms
"""
_PARTITIONS = """
SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid
WHERE i.inhparent = 'readings'::regclass
"""
_PRUNE = """
DELETE FROM seen_ids WHERE id IN (SELECT id FROM seen_ids WHERE stored_ms < %s LIMIT %s)
"""

# Transient server states: the batch is retried by the consumer (StoreUnavailable).
_RETRYABLE = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
# Connection failures that are a wrong URL or role, not an outage: refused at start-up.
_MISTAKES = ("does not exist", "authentication failed", "no password supplied", "invalid")


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def month_range(ts_ms: int) -> tuple[str, int, int]:
    """The monthly partition holding ``ts_ms``: (table name, first ms, first ms of next month)."""
    moment = datetime.fromtimestamp(ts_ms / 1000, UTC)
    start = datetime(moment.year, moment.month, 1, tzinfo=UTC)
    after = datetime(moment.year + moment.month // 12, moment.month % 12 + 1, 1, tzinfo=UTC)
    name = f"readings_y{start.year:04d}m{start.month:02d}"
    return name, int(start.timestamp() * 1000), int(after.timestamp() * 1000)


def _columns(rows: Sequence[Sequence[Any]], width: int) -> list[list[Any]]:
    """Transpose rows into ``width`` column lists (the arrays ``unnest`` takes)."""
    if not rows:
        return [[] for _ in range(width)]
    return [list(column) for column in zip(*rows, strict=True)]


def is_pg_error(err: BaseException) -> bool:
    """Whether ``err`` is a psycopg error (for readers that do not import psycopg)."""
    return isinstance(err, psycopg.Error)


def _floats(column: list[Any]) -> list[float | None]:
    """A numeric column as floats (psycopg dumps a list of one type)."""
    return [None if v is None else float(v) for v in column]


def connect_readonly(url: str) -> psycopg.Connection[Any]:
    """Open a read-only connection (for ``export``, ``stats``) and check the schema version.

    Raises:
        ConfigError: the server cannot be reached, or the database is not an iotpipe store or
            was written by a newer iotpipe.
    """
    try:
        conn = psycopg.connect(url, connect_timeout=_CONNECT_TIMEOUT_S, autocommit=True)
    except psycopg.Error as err:
        raise ConfigError("store", redact_url(url), f"cannot connect: {_first_line(err)}") from None
    try:
        conn.execute("SET default_transaction_read_only = on")
        version = _schema_version(conn)
    except psycopg.Error as err:
        conn.close()
        raise ConfigError("store", redact_url(url), f"cannot read: {_first_line(err)}") from None
    if version is None:
        conn.close()
        raise ConfigError("store", redact_url(url), "not an iotpipe store (no schema_version)")
    if version > PG_SCHEMA_VERSION:
        conn.close()
        raise ConfigError(
            "store",
            redact_url(url),
            f"written by a newer iotpipe (schema version {version}); upgrade iotpipe to read it",
        )
    return conn


def _schema_version(conn: psycopg.Connection[Any]) -> int | None:
    """The database's schema version, or ``None`` without a ``schema_version`` table."""
    if conn.execute("SELECT to_regclass('schema_version')").fetchone() in (None, (None,)):
        return None
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


class PostgresStore:
    """A :class:`~consumers.store.Store` writing to a PostgreSQL database shared by many hosts.

    Args:
        url: a libpq connection URL (``postgresql://user@host:5432/db``); a password is better
            kept in ``PGPASSWORD`` or ``~/.pgpass`` than in the URL.
        retention_ms: how long message ids are remembered for dedupe.
        durability: ``"fsync"`` (``synchronous_commit = on``) or ``"process"`` (``off``).
        clock_ms: the consumer's clock (Unix epoch milliseconds), when ids were stored.

    A server that cannot be reached at start-up is an outage: the store opens, and the schema
    is created or checked by the first write (the consumer holds its batch and retries).

    Raises:
        ConfigError: the database or role does not exist, the password was refused, or the
            database was written by a newer iotpipe.
    """

    def __init__(
        self,
        url: str,
        *,
        retention_ms: int = DEFAULT_RETENTION_MS,
        durability: Durability = "fsync",
        clock_ms: Callable[[], int] = _wall_clock_ms,
    ) -> None:
        if retention_ms <= 0:
            raise ConfigError("retention_ms", retention_ms, "must be > 0")
        self.url = url
        self.retention_ms = retention_ms
        self._synchronous = "on" if durability == "fsync" else "off"
        self._clock_ms = clock_ms
        self._conn: psycopg.Connection[Any] | None = None
        self._partitions: set[str] = set()
        self._schema_ready = False
        try:
            self._ensure_schema()
        except StoreUnavailable as err:
            if any(word in str(err) for word in _MISTAKES):
                raise ConfigError(
                    "store", redact_url(url), _first_line(err.__cause__ or err)
                ) from None
            # A server down at start-up is an outage like any other: the first write retries.
            log.warning("store unavailable at start-up, retrying on the first batch: %s", err)

    def _ensure_schema(self) -> None:
        """Create or check the schema once per store object."""
        if not self._schema_ready:
            with self._transaction() as conn:
                self._create_schema(conn)
            self._schema_ready = True

    # -- connection ---------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection, (re)connecting after a failure."""
        if self._conn is None or self._conn.closed:
            try:
                conn = psycopg.connect(self.url, connect_timeout=_CONNECT_TIMEOUT_S)
                conn.execute(f"SET synchronous_commit = {self._synchronous}")
                conn.commit()
            except psycopg.Error as err:
                raise self._unavailable(err) from err
            self._conn = conn
            self._partitions.clear()
        return self._conn

    def _unavailable(self, err: BaseException) -> StoreUnavailable:
        return StoreUnavailable(f"postgresql {redact_url(self.url)}: {_first_line(err)}")

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection[Any]]:
        """One transaction; a server or connection failure becomes ``StoreUnavailable``."""
        conn = self._connection()
        try:
            with conn.transaction():
                yield conn
        except _RETRYABLE as err:  # rolled back; the connection stays usable
            raise self._unavailable(err) from err
        except (psycopg.OperationalError, psycopg.InterfaceError) as err:
            self._drop_connection()
            raise self._unavailable(err) from err

    def _drop_connection(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except psycopg.Error:
                log.debug("closing a failed connection failed", exc_info=True)
            self._conn = None

    def _create_schema(self, conn: psycopg.Connection[Any]) -> None:
        """Create missing tables under the schema lock; refuse a newer schema version.

        A database at this version is left alone: DDL such as ``CREATE INDEX IF NOT EXISTS``
        takes a lock that waits for (and then holds up) the other hosts' write transactions.
        """
        version = _schema_version(conn)
        if version == PG_SCHEMA_VERSION:
            return
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        version = _schema_version(conn)  # another host may have created it meanwhile
        if version is None:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (PG_SCHEMA_VERSION,))
        elif version > PG_SCHEMA_VERSION:
            raise ConfigError(
                "store",
                redact_url(self.url),
                f"written by a newer iotpipe (schema version {version}); this version "
                f"writes schema version {PG_SCHEMA_VERSION}: upgrade iotpipe",
            )

    def _ensure_partitions(self, messages: Sequence[Message]) -> None:
        """Create the monthly ``readings`` partitions this batch needs (own transaction)."""
        # Distinct days first: a batch spans few, and month_range per reading costs.
        days = {r.ts_ms // _DAY_MS for message in messages for r in message.readings}
        needed = {month_range(day * _DAY_MS) for day in days}
        missing = sorted(p for p in needed if p[0] not in self._partitions)
        if not missing:
            return
        with self._transaction() as conn:
            # Created already (by another host): no DDL, which would lock the readings table.
            self._partitions.update(row[0] for row in conn.execute(_PARTITIONS))
        missing = [p for p in missing if p[0] not in self._partitions]
        if not missing:
            return
        with self._transaction() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for name, start, end in missing:
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {name} PARTITION OF readings"
                    f" FOR VALUES FROM ({start}) TO ({end})"
                )
        self._partitions.update(name for name, _, _ in missing)

    # -- writing ------------------------------------------------------------------------------

    def write(self, messages: Sequence[Message], statuses: Sequence[DeviceStatus]) -> WriteResult:
        """Store a batch in one transaction; raise ``StoreUnavailable`` if PostgreSQL cannot now.

        Returns:
            What was done. ``readings`` counts rows actually inserted.
        """
        self._ensure_schema()
        self._ensure_partitions(messages)
        for attempt in range(1, _RETRIES + 1):
            try:
                with self._transaction() as conn:
                    return self._write(conn, messages, statuses)
            except StoreUnavailable as err:
                if attempt == _RETRIES or not isinstance(err.__cause__, _RETRYABLE):
                    raise
                log.info("batch retried after %s attempt=%d", type(err.__cause__).__name__, attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _write(
        self,
        conn: psycopg.Connection[Any],
        messages: Sequence[Message],
        statuses: Sequence[DeviceStatus],
    ) -> WriteResult:
        result = WriteResult()
        now_ms = self._clock_ms()
        claimed = self._claim(conn, messages, now_ms)
        fresh: list[Message] = []
        duplicates: list[Message] = []
        for message in messages:
            if message.id in claimed:
                claimed.discard(message.id)  # a second copy in the batch is a duplicate
                fresh.append(message)
            else:
                duplicates.append(message)
        result.readings = self._insert_readings(conn, fresh)
        result.messages = len(fresh)
        result.duplicates = len(duplicates)
        result.out_of_order = self._add_streams(conn, fresh, duplicates)
        result.type_changes = self._add_sensors(conn, fresh)
        self._touch_devices(conn, fresh)
        for status in sorted(statuses, key=lambda s: (s.site, s.device)):
            conn.execute(
                _UPSERT_STATUS,
                (status.site, status.device, status.state, status.ts_ms, status.agent),
            )
        return result

    @staticmethod
    def _claim(conn: psycopg.Connection[Any], messages: Sequence[Message], now_ms: int) -> set[str]:
        """Insert the batch's ids into ``seen_ids``; return those this transaction claimed."""
        rows = [(m.id, m.site, m.device, m.boot, m.seq, now_ms) for m in messages]
        cursor = conn.execute(_CLAIM_IDS, _columns(rows, 6))
        return {row[0] for row in cursor.fetchall()}

    @staticmethod
    def _insert_readings(conn: psycopg.Connection[Any], messages: Sequence[Message]) -> int:
        """Insert the readings of ``messages`` and add those inserted to the rollups."""
        rows = reading_rows(messages)
        if not rows:
            return 0
        # Sorted by key: concurrent writers take the rows' locks in one order.
        rows.sort(key=lambda row: row[:4])
        params = _columns(rows, 10)
        params[4] = _floats(params[4])  # one array type: ints and floats mixed become float8
        keys = conn.execute(_INSERT_READINGS, params).fetchall()
        inserted = rows if len(keys) == len(rows) else first_of_each_key(rows, keys)
        for table, aggregates in rollup_rows(inserted).items():
            aggregates.sort(key=lambda row: row[:4])
            params = _columns(aggregates, 8)
            conn.execute(
                _ROLLUP_ADD.format(table=table), params[:5] + [_floats(c) for c in params[5:]]
            )
        return len(inserted)

    @staticmethod
    def _add_streams(
        conn: psycopg.Connection[Any], stored: Sequence[Message], duplicates: Sequence[Message]
    ) -> int:
        """Add the batch to ``streams`` (rows locked first); return the out-of-order count."""
        keys = sorted({(m.site, m.device, m.boot) for m in (*stored, *duplicates)})
        if not keys:
            return 0
        highest = {
            (site, device, boot): max_seq
            for site, device, boot, max_seq in conn.execute(_LOCK_STREAMS, _columns(keys, 3))
        }
        # What the batch adds to each row (the SQL adds counts and widens seq and time ranges).
        deltas: dict[tuple[str, str, str], StreamRow] = {}
        out_of_order = 0
        for message in stored:
            key = (message.site, message.device, message.boot)
            delta = deltas.setdefault(key, StreamRow(message.seq, message.seq))
            out_of_order += delta.add(message, max(highest.get(key, message.seq), delta.max_seq))
        for message in duplicates:
            key = (message.site, message.device, message.boot)
            deltas.setdefault(key, StreamRow(message.seq, message.seq)).duplicates += 1
        rows = [(*key, *d.row()) for key, d in sorted(deltas.items())]
        conn.execute(_ADD_STREAMS, _columns(rows, 10))
        return out_of_order

    @staticmethod
    def _add_sensors(conn: psycopg.Connection[Any], stored: Sequence[Message]) -> int:
        """Pin new sensors' types, add type changes; return the readings that changed type."""
        devices = sorted({(m.site, m.device) for m in stored})
        if not devices:
            return 0
        pinned = {
            (site, device, sensor): kind
            for site, device, sensor, kind in conn.execute(_SENSORS_OF, _columns(devices, 2))
        }
        # key -> [kind, unit, type changes, last_ts_ms]
        rows: dict[tuple[str, str, str], list[Any]] = {}
        changes = 0
        for message in stored:
            for reading in message.readings:
                key = (message.site, message.device, reading.sensor)
                kind = value_kind(reading.value)
                pinned.setdefault(key, kind)
                row = rows.setdefault(key, [pinned[key], None, 0, reading.ts_ms])
                if kind != pinned[key]:
                    row[2] += 1
                    changes += 1
                row[1] = reading.unit if reading.unit is not None else row[1]
                row[3] = max(row[3], reading.ts_ms)
        flat = [(*key, *row) for key, row in sorted(rows.items())]
        conn.execute(_ADD_SENSORS, _columns(flat, 7))
        return changes

    @staticmethod
    def _touch_devices(conn: psycopg.Connection[Any], stored: Sequence[Message]) -> None:
        """Raise each device's ``last_seen_ms`` to its latest reading time stored."""
        last_seen: dict[tuple[str, str], int] = {}
        for message in stored:
            if message.readings:
                key = (message.site, message.device)
                latest = max(r.ts_ms for r in message.readings)
                last_seen[key] = max(latest, last_seen.get(key, latest))
        if last_seen:
            rows = [(*key, ts) for key, ts in sorted(last_seen.items())]
            conn.execute(_TOUCH_DEVICES, _columns(rows, 3))

    def record_confirmations(self, confirmations: Sequence[Confirmation]) -> None:
        """Replace these devices' confirmation summaries, in one small transaction."""
        self._ensure_schema()
        rows = sorted(
            (c.site, c.device, c.last_ms, c.p50_ms, c.p99_ms, c.envelopes, c.confirmed_ms)
            for c in confirmations
        )
        with self._transaction() as conn, conn.cursor() as cursor:
            cursor.executemany(_UPSERT_CONFIRMATION, rows)

    # -- upkeep -------------------------------------------------------------------------------

    def prune(self, now_ms: int) -> int:
        """Forget message ids older than the retention window, a chunk per transaction."""
        self._ensure_schema()
        cutoff = now_ms - self.retention_ms
        dropped = 0
        while True:
            with self._transaction() as conn:
                deleted = conn.execute(_PRUNE, (cutoff, _PRUNE_CHUNK)).rowcount
            dropped += deleted
            if deleted < _PRUNE_CHUNK:
                return dropped

    def check(self) -> None:
        """Raise ``StoreUnavailable`` when the server cannot be reached."""
        self._ensure_schema()
        with self._transaction() as conn:
            conn.execute("SELECT 1")

    def close(self) -> None:
        """Close the connection (idempotent)."""
        self._drop_connection()

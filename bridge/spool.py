"""The bridge's local durable spool: messages RabbitMQ has not confirmed yet, kept on disk.

The bridge acknowledges an MQTT message once RabbitMQ confirmed it *or* once it is committed
here. When RabbitMQ is back, the spool drains oldest-first into it, and an entry is deleted only
after its publisher confirm. This module knows nothing about MQTT or AMQP: an entry is an
exchange, a routing key, a body, optional properties and the time it was received.

Durability (``durability=``):

* ``"fsync"`` (default): SQLite WAL with ``synchronous=FULL``. The WAL is fsynced at every
  commit, so a committed entry survives SIGKILL *and* power loss (as far as the storage honours
  fsync; cheap SD cards may not).
* ``"process"``: WAL with ``synchronous=NORMAL``. A commit is in the OS page cache, not yet on
  the medium: it survives SIGKILL and any crash of the bridge, but power loss can lose the last
  commits (never corrupts the file). Measured here: 8x faster for single-entry commits, no
  difference for groups of 1000 (``bench/bench_spool.py``); on an SD card, whose fsync takes
  milliseconds, single commits differ far more.

Group commits keep fsyncs few: :meth:`Spool.append_many` commits a whole batch in one
transaction, and :class:`SpoolWriter` gathers single messages from the MQTT thread into such
batches on its own thread, calling back with the tokens it committed.

Draining: :meth:`Spool.peek_oldest` hands out the oldest entries and marks them *in flight*
(in memory, so two drainers never send the same entry); :meth:`Spool.delete` removes them after
their confirms, :meth:`Spool.release` makes them eligible again after a failed publish. After a
restart nothing is in flight: an entry confirmed but not yet deleted before a crash is sent again
with the same id (at-least-once; the consumers deduplicate on the envelope id).

Ids increase in append order and are the drain order. They are never reused while a spool is
open; after a restart with an *empty* spool they start again at 1 (no ``AUTOINCREMENT``: its
bookkeeping page would be one more page written per commit). Do not keep ids across restarts.

Budget: ``max_bytes`` bounds the *accounted* size (payload bytes plus :data:`ROW_OVERHEAD` per
entry, which tracks SQLite's real use within a few percent for bodies of a few hundred bytes).
A batch that would not fit raises :class:`SpoolFull` and nothing is written; the spool never
deletes data to make room. The file itself can exceed ``max_bytes`` by the WAL (about 4 MiB,
trimmed to ``journal_size_limit``) and partly filled pages, so leave that much headroom on disk.

Space and SD-card wear: no ``auto_vacuum`` (its pointer-map pages add a write to most commits);
pages freed by draining go to SQLite's free list and are reused by the next appends, so the file
stays at its high-water mark while in use. When a drain leaves the spool *empty* and more than
``reclaim_above`` bytes are free, the file is ``VACUUM``-ed: with no rows that rewrites two
pages and truncates the file, instead of copying the whole database.

Only one process may open a spool: the connection uses ``locking_mode=EXCLUSIVE`` (which also
keeps the WAL index in memory, no ``-shm`` file), and a second opener gets :class:`SpoolError`.

Errors::

    IotpipeError (iotpipe.errors)
    ├── SpoolError   the spool file cannot be opened or used (corrupt, unwritable, locked, I/O)
    └── SpoolFull    a batch does not fit in the budget (or the disk is full): back-pressure
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Literal, NamedTuple, Self, TypeVar

from iotpipe.errors import ConfigError, IotpipeError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ROW_OVERHEAD",
    "DrainRate",
    "Durability",
    "Entry",
    "Properties",
    "Spool",
    "SpoolEntry",
    "SpoolError",
    "SpoolFull",
    "SpoolWriter",
]

Durability = Literal["fsync", "process"]

#: Message properties as stored: a JSON-able dict (returned parsed), opaque bytes, or nothing.
Properties = Mapping[str, Any] | bytes | None

DEFAULT_MAX_BYTES = 512 * 1024 * 1024

#: Bytes accounted per entry on top of its payload: record header, rowid, ``received_at``,
#: ``size``, cell pointer and the slack of B-tree pages (measured: ~53 bytes for 630-byte rows).
ROW_OVERHEAD = 56

#: ``PRAGMA application_id`` of a spool file ("iotp"), so another SQLite file is not mistaken
#: for one.
APPLICATION_ID = 0x696F7470
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE spool (
    id          INTEGER PRIMARY KEY,  -- drain order; never reused while the process runs
    received_at REAL    NOT NULL,     -- Unix time the bridge received the message
    size        INTEGER NOT NULL,     -- accounted bytes: payload + ROW_OVERHEAD
    exchange    TEXT    NOT NULL,
    routing_key TEXT    NOT NULL,
    props,                            -- JSON text (a dict), BLOB (opaque bytes) or NULL
    body        BLOB    NOT NULL      -- last, so scans of the columns above skip overflow pages
)
"""
_INSERT = (
    "INSERT INTO spool (id, received_at, size, exchange, routing_key, props, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_PEEK = (
    "SELECT id, exchange, routing_key, body, props, received_at, size FROM spool"
    " WHERE id >= ? ORDER BY id LIMIT ?"
)
_DELETE_RANGE = "DELETE FROM spool WHERE id BETWEEN ? AND ?"
_MEASURE_RANGE = "SELECT count(*), coalesce(sum(size), 0) FROM spool WHERE id BETWEEN ? AND ?"

# Built once: json.dumps/loads with arguments build a new encoder on every call.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_JSON_DECODER = json.JSONDecoder()

#: The WAL is trimmed back to this size after a checkpoint if a large transaction grew it.
_JOURNAL_SIZE_LIMIT = 8 * 1024 * 1024

# (received_at, size, exchange, routing_key, props, body): an entry encoded for its INSERT.
_Row = tuple[float, int, str, str, str | bytes | None, bytes]


# -- errors -----------------------------------------------------------------------------------


class SpoolError(IotpipeError):
    """The spool file cannot be opened or used: corrupt, not a spool, unwritable, locked, I/O.

    Attributes:
        path: the spool file.
        reason: what is wrong, and what to do about it where that is known.
    """

    exit_code = 2

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"spool {self.path}: {reason}")


# The name the bridge checks for; "Full" reads better than "FullError" here.
class SpoolFull(IotpipeError):  # noqa: N818
    """A batch does not fit: nothing of it was written. Retry after draining; do not acknowledge.

    Attributes:
        needed: accounted bytes of the refused batch.
        free: accounted bytes still free in the budget (``max_bytes - bytes``).
        max_bytes: the budget.
        depth: entries in the spool.
        disk: True if the file system, not the budget, ran out of space.
    """

    def __init__(
        self, needed: int, free: int, max_bytes: int, depth: int, *, disk: bool = False
    ) -> None:
        self.needed = needed
        self.free = free
        self.max_bytes = max_bytes
        self.depth = depth
        self.disk = disk
        if disk:
            what = f"the disk is full ({needed} bytes to write, {depth} entries spooled)"
        else:
            what = (
                f"{needed} bytes do not fit in the {free} bytes left of max_bytes={max_bytes}"
                f" ({depth} entries spooled)"
            )
        super().__init__(f"spool full: {what}")


# -- entries ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """A message to spool.

    Attributes:
        exchange: AMQP exchange to publish to.
        routing_key: AMQP routing key.
        body: the payload, exactly as received.
        properties: a JSON-able dict (comes back parsed: tuples as lists), opaque bytes, or None.
        received_at: Unix time the bridge received it (metrics: ``oldest_age_seconds``).
    """

    exchange: str
    routing_key: str
    body: bytes
    properties: Properties = None
    received_at: float = field(default_factory=time.time)


class SpoolEntry(NamedTuple):
    """An entry read back from the spool, with its id (pass it to ``delete`` / ``release``).

    A named tuple rather than a dataclass: the drain builds thousands per second.
    """

    id: int
    exchange: str
    routing_key: str
    body: bytes
    properties: dict[str, Any] | bytes | None
    received_at: float


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def _encode(entry: Entry) -> _Row:
    """Check one entry and turn it into its row (props serialised, size accounted)."""
    if not isinstance(entry.exchange, str) or not isinstance(entry.routing_key, str):
        raise TypeError("exchange and routing_key must be str")
    if not isinstance(entry.body, bytes | bytearray | memoryview):
        raise TypeError(f"body must be bytes, not {type(entry.body).__name__}")
    body = bytes(entry.body)
    props: str | bytes | None
    if entry.properties is None:
        props, props_len = None, 0
    elif isinstance(entry.properties, bytes | bytearray):
        props = bytes(entry.properties)
        props_len = len(props)
    elif isinstance(entry.properties, Mapping):
        # ASCII-only JSON, so its length in characters is its length in bytes.
        mapping = entry.properties
        props = _JSON_ENCODER.encode(mapping if isinstance(mapping, dict) else dict(mapping))
        props_len = len(props)
    else:
        raise TypeError(
            f"properties must be a dict, bytes or None, not {type(entry.properties).__name__}"
        )
    received_at = float(entry.received_at)
    if not math.isfinite(received_at):
        raise ValueError(f"received_at must be finite, not {entry.received_at!r}")
    size = (
        len(body)
        + _utf8_len(entry.exchange)
        + _utf8_len(entry.routing_key)
        + props_len
        + ROW_OVERHEAD
    )
    return (received_at, size, entry.exchange, entry.routing_key, props, body)


def _decode(row: tuple[Any, ...]) -> SpoolEntry:
    entry_id, exchange, routing_key, body, props, received_at, _size = row
    properties = _JSON_DECODER.decode(props) if isinstance(props, str) else props
    return SpoolEntry(entry_id, exchange, routing_key, body, properties, received_at)


def _ranges(ids: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted ids as inclusive runs of consecutive ids: a drain deletes a few long runs."""
    runs: list[tuple[int, int]] = []
    first = last = ids[0]
    for entry_id in ids[1:]:
        if entry_id != last + 1:
            runs.append((first, last))
            first = entry_id
        last = entry_id
    runs.append((first, last))
    return runs


def _error_name(err: sqlite3.Error) -> str:
    return str(getattr(err, "sqlite_errorname", "") or "")


# -- the spool --------------------------------------------------------------------------------


class Spool:
    """A durable FIFO of messages on local disk (one SQLite file). Thread-safe.

    Args:
        path: the spool file; its directory is created if missing.
        max_bytes: budget of accounted bytes (see the module docstring).
        durability: ``"fsync"`` (power-loss safe, default) or ``"process"`` (crash safe).
        reclaim_above: when a delete empties the spool and more than this many bytes of the
            file are free pages, VACUUM it (cheap when empty); None never shrinks the file.
        lock_timeout: seconds to wait for another process to release the file.
        clock: Unix time, for ``oldest_age_seconds``.

    Raises:
        SpoolError: the file cannot be created or opened, is corrupt, is not a spool, or is
            held by another process.
        ConfigError: a bad argument.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        durability: Durability = "fsync",
        reclaim_above: int | None = 16 * 1024 * 1024,
        lock_timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if durability not in ("fsync", "process"):
            raise ConfigError("spool.durability", durability, '"fsync" or "process"')
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigError("spool.max_bytes", max_bytes, "a positive number of bytes")
        if reclaim_above is not None and reclaim_above < 0:
            raise ConfigError("spool.reclaim_above", reclaim_above, "bytes >= 0, or None")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.durability: Durability = durability
        self.reclaim_above = reclaim_above
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}  # id -> accounted size
        # Every row with an id below this is in flight: peeks start here instead of skipping
        # the whole in-flight prefix again.
        self._scan_from = 0
        self._oldest: float | None = None  # received_at of the oldest row, if known
        self._conn: sqlite3.Connection | None
        self._conn, (depth, total, last_id) = self._open(lock_timeout)
        self._depth: int = depth
        self._bytes: int = total
        self._next_id: int = last_id + 1
        log.info(
            "spool opened path=%s durability=%s depth=%d bytes=%d max_bytes=%d",
            self.path,
            durability,
            depth,
            total,
            max_bytes,
        )

    def _open(self, lock_timeout: float) -> tuple[sqlite3.Connection, tuple[int, int, int]]:
        """Open (or create) the file; return the connection and (depth, bytes, last id)."""
        parent = self.path.parent
        if parent.exists() and not parent.is_dir():
            raise SpoolError(self.path, f"{parent} is not a directory")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SpoolError(self.path, f"cannot create {parent}: {err.strerror}") from err
        if self.path.is_dir():
            raise SpoolError(self.path, "is a directory; expected a spool file path")
        try:
            conn = sqlite3.connect(
                self.path, timeout=lock_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as err:
            raise self._open_error(err) from err
        try:
            # Exclusive: one owner per spool, and the WAL index lives in memory (no -shm file).
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SpoolError(self.path, f"cannot use WAL journaling (got {mode!r})")
            sync = "FULL" if self.durability == "fsync" else "NORMAL"
            conn.execute(f"PRAGMA synchronous={sync}")
            conn.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._check_schema(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            # Reads every table page once: this is also where a damaged file shows up.
            totals = conn.execute(
                "SELECT count(*), coalesce(sum(size), 0), coalesce(max(id), 0) FROM spool"
            ).fetchone()
        except sqlite3.Error as err:
            conn.close()
            raise self._open_error(err) from err
        except BaseException:
            conn.close()
            raise
        return conn, (int(totals[0]), int(totals[1]), int(totals[2]))

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id == 0 and version == 0 and tables == 0:
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        elif app_id != APPLICATION_ID:
            raise SpoolError(
                self.path, "is an SQLite database but not an iotpipe spool; choose another path"
            )
        elif version > SCHEMA_VERSION:
            raise SpoolError(
                self.path,
                f"was written by a newer iotpipe (spool schema {version}, this one reads"
                f" {SCHEMA_VERSION}); upgrade, or drain it with the newer version first",
            )

    def _open_error(self, err: sqlite3.Error) -> SpoolError:
        name = _error_name(err)
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            reason = "is in use by another process (only one bridge may own a spool)"
        elif name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            reason = (
                f"is corrupt or not an SQLite file ({err}); move it aside to start an empty"
                " spool (`sqlite3 FILE .recover` may salvage its entries)"
            )
        elif name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")):
            reason = (
                f"is not writable ({err}); the bridge needs to write the file and its directory"
            )
        elif name.startswith("SQLITE_CANTOPEN"):
            reason = f"cannot be opened ({err}); check that its directory exists and is writable"
        elif name.startswith("SQLITE_FULL"):
            reason = "cannot be opened: the disk is full"
        else:
            reason = f"cannot be opened: {err}"
        return SpoolError(self.path, reason)

    # -- metrics --------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Entries in the spool, in flight or not (gauge ``iotpipe_bridge_spool_entries``)."""
        return self._depth

    @property
    def bytes(self) -> int:
        """Accounted bytes of the entries in the spool (compared with ``max_bytes``)."""
        return self._bytes

    @property
    def free_bytes(self) -> int:
        """Accounted bytes that still fit in the budget."""
        return max(0, self.max_bytes - self._bytes)

    @property
    def in_flight(self) -> int:
        """Entries handed out by :meth:`peek_oldest` and neither deleted nor released yet."""
        return len(self._in_flight)

    @property
    def oldest_age_seconds(self) -> float:
        """Seconds since the oldest entry was received; 0.0 when the spool is empty."""
        with self._lock:
            if self._depth == 0:
                return 0.0
            if self._oldest is None:
                row = (
                    self._connection()
                    .execute("SELECT received_at FROM spool ORDER BY id LIMIT 1")
                    .fetchone()
                )
                if row is None:
                    return 0.0
                self._oldest = float(row[0])
            return max(0.0, self._clock() - self._oldest)

    @property
    def file_bytes(self) -> int:
        """Bytes the spool's files take on disk now (database + WAL)."""
        total = 0
        for name in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(name).st_size
        return total

    # -- appending ------------------------------------------------------------------------------

    def append_many(self, entries: Iterable[Entry]) -> list[int]:
        """Commit a batch in one transaction; return its ids once it is durable.

        All or nothing: on any error, no entry of the batch is in the spool.

        Raises:
            SpoolFull: the batch does not fit in ``max_bytes`` (or the disk is full).
            SpoolError: the file cannot be written.
            TypeError, ValueError: an entry is malformed (nothing is written).
        """
        return self._append_rows([_encode(entry) for entry in entries])

    def append(self, entry: Entry) -> int:
        """Commit one entry (a batch of one: one fsync per call in ``"fsync"`` mode)."""
        return self._append_rows([_encode(entry)])[0]

    def _append_rows(self, rows: Sequence[_Row]) -> list[int]:
        if not rows:
            return []
        needed = sum(row[1] for row in rows)
        with self._lock:
            conn = self._connection()
            if self._bytes + needed > self.max_bytes:
                raise SpoolFull(needed, self.free_bytes, self.max_bytes, self._depth)
            first = self._next_id
            params = [(first + index, *row) for index, row in enumerate(rows)]
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_INSERT, params)
                conn.execute("COMMIT")
            except sqlite3.Error as err:
                self._rollback(conn)
                raise self._operation_error("append", err, needed) from err
            if self._depth == 0:
                self._oldest = rows[0][0]
            self._next_id = first + len(rows)
            self._depth += len(rows)
            self._bytes += needed
        return list(range(first, first + len(rows)))

    # -- draining -------------------------------------------------------------------------------

    def peek_oldest(self, n: int, exclude_in_flight: bool = True) -> list[SpoolEntry]:
        """Hand out up to ``n`` entries, oldest first, and mark them in flight.

        Args:
            n: at most this many.
            exclude_in_flight: skip entries already in flight (the normal case). False returns
                the oldest ``n`` whether in flight or not (e.g. to resend after a reconnect).
        """
        if n <= 0:
            return []
        found: list[SpoolEntry] = []
        with self._lock:
            conn = self._connection()
            start = self._scan_from if exclude_in_flight else 0
            last = start - 1
            try:
                while len(found) < n:
                    limit = n - len(found)
                    rows = conn.execute(_PEEK, (start, limit)).fetchall()
                    for row in rows:
                        last = row[0]
                        if exclude_in_flight and last in self._in_flight:
                            continue
                        found.append(_decode(row))
                        self._in_flight[last] = row[6]
                    if len(rows) < limit:
                        break  # no more rows
                    start = last + 1
            except sqlite3.Error as err:
                raise self._operation_error("peek", err) from err
            if exclude_in_flight:
                # Everything up to the last row looked at is now in flight.
                self._scan_from = last + 1
        return found

    def release(self, ids: Iterable[int]) -> None:
        """Make in-flight entries eligible again (their publish failed or was not confirmed)."""
        with self._lock:
            released = [entry_id for entry_id in ids if entry_id in self._in_flight]
            if released:
                for entry_id in released:
                    del self._in_flight[entry_id]
                self._scan_from = min(self._scan_from, *released)

    def release_all(self) -> None:
        """Make every in-flight entry eligible again (e.g. the AMQP connection was lost)."""
        with self._lock:
            if self._in_flight:
                self._scan_from = min(self._scan_from, *self._in_flight)
                self._in_flight.clear()

    def delete(self, ids: Iterable[int]) -> int:
        """Delete entries (after their publisher confirms) in one transaction.

        Unknown ids are ignored, so deleting twice is harmless. May VACUUM the file if this
        empties the spool (see ``reclaim_above``).

        Returns:
            How many entries were deleted.
        """
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        with self._lock:
            conn = self._connection()
            # In-flight entries are in the table and their sizes are known; only ids never
            # peeked (or already deleted) have to be looked up.
            known = [entry_id for entry_id in wanted if entry_id in self._in_flight]
            unknown = [entry_id for entry_id in wanted if entry_id not in self._in_flight]
            count = len(known)
            freed = sum(self._in_flight[entry_id] for entry_id in known)
            try:
                conn.execute("BEGIN IMMEDIATE")
                if unknown:
                    for run in _ranges(unknown):
                        found, size = conn.execute(_MEASURE_RANGE, run).fetchone()
                        count += found
                        freed += size
                conn.executemany(_DELETE_RANGE, _ranges(wanted))
                conn.execute("COMMIT")
            except sqlite3.Error as err:
                self._rollback(conn)
                raise self._operation_error("delete", err) from err
            for entry_id in known:
                del self._in_flight[entry_id]
            self._depth -= count
            self._bytes -= freed
            self._oldest = None
            if self._depth == 0:
                self._reclaim(conn)
        return count

    def _reclaim(self, conn: sqlite3.Connection) -> None:
        """VACUUM an empty spool whose file holds many free pages (a few page writes)."""
        if self.reclaim_above is None:
            return
        try:
            free_pages = conn.execute("PRAGMA freelist_count").fetchone()[0]
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            if free_pages * page_size <= self.reclaim_above:
                return
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as err:
            # The data is safe either way; only the file stays larger.
            log.warning("spool not vacuumed path=%s error=%s", self.path, err)
            return
        log.info("spool vacuumed path=%s freed_bytes=%d", self.path, free_pages * page_size)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (checkpoints and removes the WAL). Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                self._in_flight.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Spool({str(self.path)!r}, depth={self._depth}, bytes={self._bytes},"
            f" max_bytes={self.max_bytes}, durability={self.durability!r})"
        )

    # -- internals ------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise SpoolError(self.path, "is closed")
        return self._conn

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("spool rollback failed")

    def _operation_error(self, what: str, err: sqlite3.Error, needed: int = 0) -> IotpipeError:
        if _error_name(err).startswith("SQLITE_FULL"):
            return SpoolFull(needed, self.free_bytes, self.max_bytes, self._depth, disk=True)
        return SpoolError(self.path, f"{what} failed: {err}")


# -- group commits ------------------------------------------------------------------------------

T = TypeVar("T")


class SpoolWriter(Generic[T]):
    """Group commits for one producer thread: ``submit()`` never waits for the disk.

    ``submit(entry, token)`` queues an entry in memory; the writer thread commits the queue
    with :meth:`Spool.append_many` when ``max_batch`` entries are waiting or the oldest has
    waited ``max_delay_ms``, then calls ``on_committed(tokens)`` (from the writer thread) with
    the tokens of that batch, in submission order. A token is whatever the caller needs to
    acknowledge the message (an MQTT message id, say); it is reported only after the commit.

    When the spool is full (or another error occurs), the batch stays queued, ``on_error(err)``
    is called, and the writer retries every ``retry_interval`` seconds, committing the part
    that fits first. Nothing is dropped and nothing is reported committed that is not: the
    caller simply gets no acknowledgement, which is the back-pressure. The queue is unbounded;
    it is bounded in practice by how many unacknowledged messages the MQTT broker sends.

    Args:
        spool: where to commit.
        on_committed: called with the tokens of each committed batch.
        max_batch: commit when this many entries are waiting (and at most this many at once).
        max_delay_ms: commit when the oldest waiting entry has waited this long.
        retry_interval: seconds between attempts while the spool is full or failing.
        on_error: called with the exception of each failed commit attempt.
        clock: monotonic seconds (for ``max_delay_ms``).
        name: the writer thread's name.
    """

    def __init__(
        self,
        spool: Spool,
        on_committed: Callable[[list[T]], object],
        *,
        max_batch: int = 1000,
        max_delay_ms: float = 20.0,
        retry_interval: float = 0.5,
        on_error: Callable[[Exception], object] | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "spool-writer",
    ) -> None:
        if max_batch < 1:
            raise ConfigError("spool.max_batch", max_batch, "at least 1")
        if not 0 <= max_delay_ms < math.inf:
            raise ConfigError("spool.max_delay_ms", max_delay_ms, "milliseconds >= 0")
        self.spool = spool
        self.max_batch = max_batch
        self.max_delay = max_delay_ms / 1000.0
        self.retry_interval = retry_interval
        self._on_committed = on_committed
        self._on_error = on_error
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: collections.deque[tuple[_Row, T, float]] = collections.deque()
        self._submitted = 0  # entries accepted by submit()
        self._done = 0  # entries no longer queued: committed, or abandoned at close
        self._abandoned = 0
        self._flush_upto = 0  # commit without waiting for max_delay until _done reaches it
        self._closing = False
        self._stalled = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Entries submitted and not committed yet."""
        return self._submitted - self._done

    @property
    def stalled(self) -> bool:
        """Whether the last commit attempt failed (spool full or failing)."""
        return self._stalled

    def submit(self, entry: Entry, token: T) -> None:
        """Queue ``entry``; ``token`` is passed to ``on_committed`` once it is committed.

        Raises:
            TypeError, ValueError: the entry is malformed (checked here, in the caller's thread).
            SpoolFull: the entry alone is larger than the spool's whole budget.
            SpoolError: the writer is closed.
        """
        row = _encode(entry)
        if row[1] > self.spool.max_bytes:
            raise SpoolFull(row[1], self.spool.free_bytes, self.spool.max_bytes, self.spool.depth)
        with self._cond:
            if self._closing:
                raise SpoolError(self.spool.path, "writer is closed")
            self._queue.append((row, token, self._clock()))
            self._submitted += 1
            # The writer only needs waking to start the delay timer or for a full batch.
            if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
                self._cond.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Commit everything submitted so far now; wait until it is (or ``timeout`` seconds).

        Returns:
            True if everything submitted before the call is committed.
        """
        with self._cond:
            target = self._submitted
            self._flush_upto = max(self._flush_upto, target)
            self._cond.notify_all()
            self._cond.wait_for(
                lambda: self._done >= target or not self._thread.is_alive(), timeout
            )
            return self._done >= target and self._abandoned == 0

    def close(self, timeout: float | None = 10.0) -> bool:
        """Commit what is queued, stop the thread; refuse further submits. Idempotent.

        If a commit fails while closing, the remaining entries are abandoned: they were never
        reported committed, so their messages were never acknowledged.

        Returns:
            True if every submitted entry was committed.
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        return not self._thread.is_alive() and self._abandoned == 0 and self.pending == 0

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the writer thread ----------------------------------------------------------------------

    def _take(self) -> list[tuple[_Row, T, float]] | None:
        """Wait until a batch is due and return it (still queued), or None to stop."""
        with self._cond:
            while True:
                if self._queue:
                    if (
                        self._closing
                        or len(self._queue) >= self.max_batch
                        or self._done < self._flush_upto
                    ):
                        break
                    remaining = self._queue[0][2] + self.max_delay - self._clock()
                    if remaining <= 0:
                        break
                    # Never wait longer than max_delay in real time, so an injected clock
                    # that jumps ahead is noticed.
                    self._cond.wait(min(remaining, self.max_delay))
                elif self._closing:
                    return None
                else:
                    self._cond.wait()
            count = min(len(self._queue), self.max_batch)
            return [self._queue[index] for index in range(count)]

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            rows = [item[0] for item in batch]
            try:
                committed = self._commit(rows)
            except Exception as err:  # the entries stay queued: report, then retry
                if not self._failed(err):
                    return
                continue
            tokens = [item[1] for item in batch[:committed]]
            with self._cond:
                for _ in range(committed):
                    self._queue.popleft()
                self._done += committed
                if self._stalled:
                    log.info("spool writer resumed path=%s", self.spool.path)
                self._stalled = False
                self._cond.notify_all()
            try:
                self._on_committed(tokens)
            except Exception:
                log.exception("spool writer on_committed callback failed")

    def _commit(self, rows: list[_Row]) -> int:
        """Commit ``rows``, or the longest prefix that fits; return how many were committed."""
        try:
            return len(self.spool._append_rows(rows))
        except SpoolFull as full:
            if full.disk:
                raise
            fits, total = 0, 0
            for row in rows:
                if total + row[1] > full.free:
                    break
                total += row[1]
                fits += 1
            if fits == 0:
                raise
            return len(self.spool._append_rows(rows[:fits]))

    def _failed(self, err: Exception) -> bool:
        """Report a failed commit; wait before the retry. False: closing, give up."""
        if self._on_error is not None:
            try:
                self._on_error(err)
            except Exception:
                log.exception("spool writer on_error callback failed")
        with self._cond:
            if not self._stalled:
                log.warning(
                    "spool writer cannot commit path=%s pending=%d error=%s",
                    self.spool.path,
                    len(self._queue),
                    err,
                )
            self._stalled = True
            if self._closing:
                abandoned = len(self._queue)
                self._queue.clear()
                self._abandoned += abandoned
                self._done += abandoned
                self._cond.notify_all()
                log.error(
                    "spool writer closed with entries not committed path=%s abandoned=%d",
                    self.spool.path,
                    abandoned,
                )
                return False
            # Submits notify this condition too; only closing cuts the pause short.
            self._cond.wait_for(lambda: self._closing, self.retry_interval)
            return True


# -- drain rate ---------------------------------------------------------------------------------


class DrainRate:
    """A token bucket bounding how fast the spool drains (pure: no sleeping, injectable clock).

    The bucket holds up to ``burst`` tokens (default: one second's worth) and refills at
    ``per_second``; it starts full. ``math.inf`` means unbounded. Typical use::

        allowed = rate.take(1000)
        if allowed:
            entries = spool.peek_oldest(allowed)
            rate.give_back(allowed - len(entries))
        else:
            time.sleep(rate.wait_time())
    """

    def __init__(
        self,
        per_second: float,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not per_second > 0:
            raise ConfigError("spool.drain_rate", per_second, "messages per second > 0")
        self.per_second = float(per_second)
        self.burst = float(burst) if burst is not None else max(1.0, self.per_second)
        if not self.burst >= 1:
            raise ConfigError("spool.drain_burst", burst, "at least 1")
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        if math.isinf(self.per_second):
            self._tokens = self.burst
        else:
            self._tokens = min(self.burst, self._tokens + elapsed * self.per_second)

    @property
    def available(self) -> int:
        """Whole tokens available now."""
        self._refill()
        return sys.maxsize if math.isinf(self._tokens) else int(self._tokens)

    def take(self, n: int) -> int:
        """Take up to ``n`` tokens; return how many were taken (0 if none are available)."""
        if n <= 0:
            return 0
        self._refill()
        if math.isinf(self._tokens):
            return n
        taken = min(n, int(self._tokens))
        self._tokens -= taken
        return taken

    def give_back(self, n: int) -> None:
        """Return unused tokens (e.g. fewer entries were peeked than were allowed)."""
        if n > 0:
            self._tokens = min(self.burst, self._tokens + n)

    def wait_time(self, n: int = 1) -> float:
        """Seconds until ``n`` tokens (at most ``burst``) will be available; 0.0 if now."""
        self._refill()
        want = min(float(n), self.burst)
        if self._tokens >= want or math.isinf(self.per_second):
            return 0.0
        return (want - self._tokens) / self.per_second

"""A durable FIFO in one SQLite file: the core of the edge outbox and the bridge spool.

Rows are committed in groups (one transaction per :meth:`DurableQueue.append`), handed out
oldest-first by :meth:`~DurableQueue.peek_oldest` and marked *in flight* (in memory, so two
drainers never get the same row), and deleted by id once the far side has them. What a row
holds beyond its ``id`` and accounted ``size`` is the caller's: a :class:`Layout` names the
table, its columns, the schema statements, the ``application_id`` and the schema version. The
outbox (``edge.outbox``) and the spool (``bridge.spool``) are thin wrappers that encode their
entries into rows and decode them back.

File: SQLite in WAL mode, ``locking_mode=EXCLUSIVE`` (one owning process; the WAL index lives
in memory, no ``-shm`` file), no ``auto_vacuum``. ``durability="fsync"`` sets
``synchronous=FULL`` (a commit survives power loss as far as the medium honours fsync);
``"process"`` sets ``synchronous=NORMAL`` (a commit survives a crash of the process, power
loss may lose the last commits, never corrupts the file). After a checkpoint the WAL is trimmed
back to the layout's ``journal_size_limit``.

Schema check at open: an empty file gets the layout's schema, ``application_id`` and
``user_version``; a file with another ``application_id`` is refused (it is some other SQLite
database), and so is one whose ``user_version`` is newer than the layout's (written by a newer
iotpipe). Every SQLite failure becomes the layout's :class:`QueueError` subclass with one line
saying what is wrong and, where known, what to do (in use, corrupt, not writable, disk full).

The file conventions above are :func:`open_sqlite`'s (with :class:`FileKind`,
:func:`write_transaction` and the error helpers), so other iotpipe SQLite files that are not
queues (the embedded broker's state, ``bridge.broker_store``) are opened, checked and written
the same way.

Budget: ``max_bytes`` bounds the sum of the rows' ``size`` column (the caller's accounting).
When an append would exceed it, the queue's :data:`FullPolicy` decides:

* :class:`PushBack` (the bridge): the batch is refused with the layout's :class:`QueueFull`
  subclass and nothing is written or deleted; the caller applies back-pressure.
* :class:`ThinOldest` (the edge): in the same transaction, before the new rows are written,
  take the oldest ``fraction`` of the rows not in flight (at least ``minimum``), delete every
  second of them (the 2nd, 4th, ...), and repeat from the oldest until the new rows fit. Rows
  in flight are never thinned, so the queue may exceed ``max_bytes`` by what is in flight. The
  deleted rows are returned to the caller (:attr:`Appended.thinned`) to be counted and logged.

Ids increase in append order and are the drain order; they are never reused while a queue is
open. After a restart they continue from the largest id left (from 1 when empty): do not keep
ids across restarts. After a restart nothing is in flight.

Errors::

    IotpipeError (iotpipe.errors)
    ├── QueueError   the file cannot be opened or used (e.g. edge.outbox.OutboxError,
    │                bridge.spool.SpoolError, bridge.broker_store.BrokerStoreError)
    └── QueueFull    a batch does not fit and the policy is PushBack (bridge.spool.SpoolFull)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, TypeVar

from iotpipe.closing import Closing
from iotpipe.errors import IotpipeError

log = logging.getLogger(__name__)

__all__ = [
    "Appended",
    "Durability",
    "DurableQueue",
    "FileKind",
    "FullPolicy",
    "Layout",
    "PushBack",
    "QueueError",
    "QueueFull",
    "QueueWrapper",
    "Row",
    "ThinOldest",
    "open_error",
    "open_sqlite",
    "operation_error",
    "write_transaction",
]

Durability = Literal["fsync", "process"]

#: A row as the caller's columns hold it (appending), or as read back (peeking, thinning).
Row = tuple[Any, ...]

T = TypeVar("T")

# -- errors -----------------------------------------------------------------------------------


class QueueError(IotpipeError):
    """The queue file cannot be opened or used: corrupt, not ours, unwritable, locked, I/O.

    Subclasses set :attr:`noun`, the word that starts the message ("spool", "outbox").

    Attributes:
        path: the file.
        reason: what is wrong, and what to do about it where that is known.
    """

    noun: ClassVar[str] = "queue"
    exit_code = 2

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.noun} {self.path}: {reason}")


# "Full" reads better than "FullError" where callers catch it.
class QueueFull(IotpipeError):  # noqa: N818
    """A batch does not fit: nothing of it was written. Retry after draining; do not acknowledge.

    Attributes:
        needed: accounted bytes of the refused batch.
        free: accounted bytes still free in the budget (``max_bytes - bytes``).
        max_bytes: the budget.
        depth: rows in the queue.
        disk: True if the file system, not the budget, ran out of space.
    """

    noun: ClassVar[str] = "queue"

    def __init__(
        self, needed: int, free: int, max_bytes: int, depth: int, *, disk: bool = False
    ) -> None:
        self.needed = needed
        self.free = free
        self.max_bytes = max_bytes
        self.depth = depth
        self.disk = disk
        if disk:
            what = f"the disk is full ({needed} bytes to write, {depth} entries queued)"
        else:
            what = (
                f"{needed} bytes do not fit in the {free} bytes left of max_bytes={max_bytes}"
                f" ({depth} entries queued)"
            )
        super().__init__(f"{self.noun} full: {what}")


# -- what the caller declares -----------------------------------------------------------------


class PushBack:
    """When full, refuse the batch (raise the layout's ``full_error``); never delete data."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return type(other) is PushBack

    def __hash__(self) -> int:
        return hash(PushBack)

    def __repr__(self) -> str:
        return "PushBack()"


class ThinOldest(NamedTuple):
    """When full, thin the oldest rows not in flight (see the module docstring).

    Attributes:
        fraction: share of the rows a pass looks at, oldest first.
        minimum: rows a pass looks at, at least.
    """

    fraction: float = 0.10
    minimum: int = 2


FullPolicy = PushBack | ThinOldest


class Layout(NamedTuple):
    """What one kind of queue file holds: its table, columns, identity and words for errors.

    Attributes:
        noun: what the file is called in messages ("spool").
        owner: what owns it, for advice ("bridge": "only one bridge may own a spool").
        table: the table of rows; it has ``id INTEGER PRIMARY KEY`` and ``size INTEGER``.
        columns: the columns an appended row fills, in the row's order; includes ``size``.
        peek_columns: the columns :meth:`DurableQueue.peek_oldest` returns after ``id`` (the
            row's ``size`` follows them, last).
        schema: the statements that create the tables of an empty file.
        application_id: ``PRAGMA application_id`` of such files.
        schema_version: ``PRAGMA user_version`` written to new files; newer files are refused.
        error: raised for any failure to open or use the file.
        full_error: raised when a batch does not fit under :class:`PushBack`.
        thin_columns: the columns a thinned row carries after ``id`` and ``size``.
        oldest_column: the column :meth:`DurableQueue.oldest` reports for the oldest row.
        journal_size_limit: bytes the WAL is trimmed back to after a checkpoint.
        cache_kib: SQLite's page cache limit for the connection, in KiB; None keeps SQLite's
            default (2000 KiB), which a long backlog read end to end fills.
        logger: where the queue logs (the wrapper's logger, so users filter by component).
    """

    noun: str
    owner: str
    table: str
    columns: tuple[str, ...]
    peek_columns: tuple[str, ...]
    schema: tuple[str, ...]
    application_id: int
    schema_version: int
    error: type[QueueError] = QueueError
    full_error: type[QueueFull] = QueueFull
    thin_columns: tuple[str, ...] = ()
    oldest_column: str | None = None
    journal_size_limit: int = 4 * 1024 * 1024
    cache_kib: int | None = None
    logger: logging.Logger = log

    @property
    def file_kind(self) -> FileKind:
        """What :func:`open_sqlite` needs to know about this layout's files."""
        return FileKind(
            noun=self.noun,
            owner=self.owner,
            schema=self.schema,
            application_id=self.application_id,
            schema_version=self.schema_version,
            error=self.error,
            journal_size_limit=self.journal_size_limit,
            cache_kib=self.cache_kib,
        )


class Appended(NamedTuple):
    """What an append did.

    Attributes:
        ids: the new rows' ids, in order.
        thinned: rows deleted to make room (:class:`ThinOldest`), oldest first, each
            ``(id, size, *thin_columns)``.
    """

    ids: list[int]
    thinned: list[Row]


def _error_name(err: sqlite3.Error) -> str:
    return str(getattr(err, "sqlite_errorname", "") or "")


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


# -- one iotpipe SQLite file -------------------------------------------------------------------


class FileKind(NamedTuple):
    """One kind of iotpipe SQLite file: its identity, its schema and the words its errors use.

    A queue's is its :attr:`Layout.file_kind`; other files (the broker's state) declare their own
    and open it with :func:`open_sqlite`, so every iotpipe SQLite file is opened, checked and
    written the same way.

    Attributes:
        noun: what the file is called in messages ("spool", "broker state").
        owner: what owns it, for advice ("bridge": "only one bridge may own a spool").
        schema: the statements that create the tables of an empty file.
        application_id: ``PRAGMA application_id`` of such files.
        schema_version: ``PRAGMA user_version`` written to new files; newer files are refused.
        error: raised for any failure to open or use the file.
        journal_size_limit: bytes the WAL is trimmed back to after a checkpoint.
        cache_kib: SQLite's page cache limit for the connection, in KiB; None keeps the default.
        newer_advice: what to do with a file written by a newer iotpipe.
    """

    noun: str
    owner: str
    schema: tuple[str, ...]
    application_id: int
    schema_version: int
    error: type[QueueError] = QueueError
    journal_size_limit: int = 4 * 1024 * 1024
    cache_kib: int | None = None
    newer_advice: str = "upgrade, or drain it with the newer version first"


def open_sqlite(
    path: Path,
    kind: FileKind,
    *,
    durability: Durability,
    lock_timeout: float,
    mode: int | None = None,
) -> sqlite3.Connection:
    """Open (or create) an iotpipe SQLite file: our PRAGMAs, then the schema check.

    See the module docstring for the PRAGMAs (WAL, ``locking_mode=EXCLUSIVE``, ``synchronous``
    from ``durability``) and the schema check (``application_id``, ``user_version``). The
    connection is in autocommit mode (use :func:`write_transaction`) and may be used from any
    thread, one at a time.

    Args:
        path: the file; its directory is created if missing.
        kind: what the file holds.
        durability: ``"fsync"`` (survives power loss) or ``"process"`` (survives a crash).
        lock_timeout: seconds to wait for another process to let go of the file.
        mode: permission bits for a new file (e.g. ``0o600``); SQLite gives its WAL the same.
            None leaves it to SQLite and the umask.

    Raises:
        QueueError: (``kind.error``) the file cannot be created or opened, is corrupt, is not
            of this kind, is from a newer version, or is held by another process.
    """
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise kind.error(path, f"{parent} is not a directory")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise kind.error(path, f"cannot create {parent}: {err.strerror}") from err
    if path.is_dir():
        raise kind.error(path, f"is a directory; expected a {kind.noun} file path")
    if mode is not None:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, mode))
        except OSError as err:
            raise kind.error(path, f"cannot create it: {err.strerror}") from err
    try:
        conn = sqlite3.connect(
            path, timeout=lock_timeout, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as err:
        raise open_error(path, kind, err) from err
    try:
        conn.execute("PRAGMA locking_mode=EXCLUSIVE")
        journal = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(journal).lower() != "wal":
            raise kind.error(path, f"cannot use WAL journaling (got {journal!r})")
        sync = "FULL" if durability == "fsync" else "NORMAL"
        conn.execute(f"PRAGMA synchronous={sync}")
        conn.execute(f"PRAGMA journal_size_limit={int(kind.journal_size_limit)}")
        if kind.cache_kib is not None:
            conn.execute(f"PRAGMA cache_size={-int(kind.cache_kib)}")  # negative: KiB
        conn.execute("BEGIN IMMEDIATE")
        try:
            _check_schema(conn, path, kind)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as err:
        conn.close()
        raise open_error(path, kind, err) from err
    except BaseException:
        conn.close()
        raise
    return conn


def _check_schema(conn: sqlite3.Connection, path: Path, kind: FileKind) -> None:
    """Create the schema in an empty file; refuse another application's or a newer file."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    if app_id == 0 and version == 0 and tables == 0:
        for statement in kind.schema:
            conn.execute(statement)
        conn.execute(f"PRAGMA application_id={int(kind.application_id)}")
        conn.execute(f"PRAGMA user_version={int(kind.schema_version)}")
    elif app_id != kind.application_id:
        raise kind.error(
            path, f"is an SQLite database but not an iotpipe {kind.noun}; choose another path"
        )
    elif version > kind.schema_version:
        raise kind.error(
            path,
            f"was written by a newer iotpipe ({kind.noun} schema {version}, this one"
            f" reads {kind.schema_version}); {kind.newer_advice}",
        )


def open_error(path: Path, kind: FileKind, err: sqlite3.Error) -> QueueError:
    """The one-line error for a file that cannot be opened, with what to do about it."""
    noun, owner = kind.noun, kind.owner
    name = _error_name(err)
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        article = "an" if noun[:1] in ("a", "e", "i", "o", "u") else "a"
        reason = f"is in use by another process (only one {owner} may own {article} {noun})"
    elif name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        reason = (
            f"is corrupt or not an SQLite file ({err}); move it aside to start an empty"
            f" {noun} (`sqlite3 FILE .recover` may salvage its entries)"
        )
    elif name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")):
        reason = f"is not writable ({err}); the {owner} needs to write the file and its directory"
    elif name.startswith("SQLITE_CANTOPEN"):
        reason = f"cannot be opened ({err}); check that its directory exists and is writable"
    elif name.startswith("SQLITE_FULL"):
        reason = "cannot be opened: the disk is full"
    else:
        reason = f"cannot be opened: {err}"
    return kind.error(path, reason)


def operation_error(path: Path, kind: FileKind, what: str, err: sqlite3.Error) -> QueueError:
    """The one-line error for a read or write that failed after opening (``what`` failed)."""
    name = _error_name(err)
    if name.startswith("SQLITE_FULL"):
        return kind.error(path, f"{what} failed: the disk is full")
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        advice = f"; the file is damaged: move it aside to start an empty {kind.noun}"
    elif name.startswith(("SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH")):
        advice = f"; the {kind.owner} needs to write the file and its directory"
    else:
        advice = ""
    return kind.error(path, f"{what} failed: {err}{advice}")


def write_transaction(
    conn: sqlite3.Connection,
    work: Callable[[sqlite3.Connection], object],
    *,
    label: str,
    logger: logging.Logger = log,
) -> None:
    """Run ``work(conn)`` in one write transaction: all of it is committed, or none of it.

    Args:
        conn: a connection from :func:`open_sqlite`.
        work: the writes.
        label: names the file in the log line of a failed rollback ("spool path=...").
        logger: where that line goes.

    Raises:
        sqlite3.Error: as raised by SQLite (after the rollback); any other exception of
            ``work`` is re-raised after the rollback too.
    """
    try:
        conn.execute("BEGIN IMMEDIATE")
        work(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                logger.exception("%s rollback failed", label)
        raise


# -- the queue --------------------------------------------------------------------------------


class DurableQueue(Closing):
    """A durable FIFO of rows in one SQLite file, with a byte budget. Thread-safe.

    Args:
        path: the file; its directory is created if missing.
        layout: what the file holds.
        max_bytes: the budget of accounted bytes (the sum of ``size``).
        durability: ``"fsync"`` (survives power loss) or ``"process"`` (survives a crash).
        policy: what happens when an append does not fit (:class:`PushBack`, :class:`ThinOldest`).
        reclaim_above: when a delete empties the queue and more than this many bytes of the
            file are free pages, VACUUM it (with no rows that rewrites two pages and truncates
            the file); None never shrinks the file.
        lock_timeout: seconds to wait for another process to let go of the file.

    Raises:
        QueueError: (the layout's subclass) the file cannot be created or opened, is corrupt,
            is not of this layout, is from a newer version, or is held by another process.
        ValueError: a bad argument.
    """

    def __init__(
        self,
        path: Path | str,
        layout: Layout,
        *,
        max_bytes: int,
        durability: Durability = "fsync",
        policy: FullPolicy = PushBack(),  # noqa: B008 - immutable, like the tuples
        reclaim_above: int | None = None,
        lock_timeout: float = 1.0,
    ) -> None:
        if durability not in ("fsync", "process"):
            raise ValueError(f'durability must be "fsync" or "process", not {durability!r}')
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive number of bytes, not {max_bytes!r}")
        if reclaim_above is not None and reclaim_above < 0:
            raise ValueError(f"reclaim_above must be bytes >= 0 or None, not {reclaim_above!r}")
        self.path = Path(path)
        self.layout = layout
        self.max_bytes = max_bytes
        self.durability: Durability = durability
        self.policy = policy
        self.reclaim_above = reclaim_above
        #: Write transactions committed since the queue was opened.
        self.commits = 0
        self._log = layout.logger
        self._size_at = layout.columns.index("size")
        self._oldest_at = (
            layout.columns.index(layout.oldest_column)
            if layout.oldest_column in layout.columns
            else None
        )
        table = layout.table
        self._insert = (
            f"INSERT INTO {table} (id, {', '.join(layout.columns)})"  # noqa: S608 - our names
            f" VALUES ({', '.join('?' * (len(layout.columns) + 1))})"
        )
        self._peek = (
            f"SELECT id, {', '.join((*layout.peek_columns, 'size'))} FROM {table}"  # noqa: S608
            " WHERE id >= ? ORDER BY id LIMIT ?"
        )
        self._thin_select = (
            f"SELECT {', '.join(('id', 'size', *layout.thin_columns))} FROM {table}"  # noqa: S608
            " ORDER BY id LIMIT ?"
        )
        self._delete_range = f"DELETE FROM {table} WHERE id BETWEEN ? AND ?"  # noqa: S608
        self._measure_range = (
            f"SELECT count(*), coalesce(sum(size), 0) FROM {table}"  # noqa: S608
            " WHERE id BETWEEN ? AND ?"
        )
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}  # id -> accounted size
        # Every row with an id below this is in flight: peeks start here instead of skipping
        # the whole in-flight prefix again.
        self._scan_from = 0
        self._oldest: Any = None  # layout.oldest_column of the oldest row, if known
        self._conn: sqlite3.Connection | None
        self._conn, (depth, total, last_id) = self._open(lock_timeout)
        self._depth: int = depth
        self._bytes: int = total
        self._next_id: int = last_id + 1
        self._log.info(
            "%s opened path=%s durability=%s depth=%d bytes=%d max_bytes=%d",
            layout.noun,
            self.path,
            durability,
            depth,
            total,
            max_bytes,
        )

    # -- opening ----------------------------------------------------------------------------------

    def _open(self, lock_timeout: float) -> tuple[sqlite3.Connection, tuple[int, int, int]]:
        """Open (or create) the file; return the connection and (depth, bytes, last id)."""
        layout = self.layout
        conn = open_sqlite(
            self.path, layout.file_kind, durability=self.durability, lock_timeout=lock_timeout
        )
        try:
            # Reads every table page once: this is also where a damaged file shows up.
            totals = conn.execute(
                f"SELECT count(*), coalesce(sum(size), 0), coalesce(max(id), 0)"  # noqa: S608
                f" FROM {layout.table}"
            ).fetchone()
        except sqlite3.Error as err:
            conn.close()
            raise open_error(self.path, layout.file_kind, err) from err
        return conn, (int(totals[0]), int(totals[1]), int(totals[2]))

    def _operation_error(self, what: str, err: sqlite3.Error, needed: int = 0) -> IotpipeError:
        """The one-line error for a failed read or write after opening."""
        if _error_name(err).startswith("SQLITE_FULL") and isinstance(self.policy, PushBack):
            return self.layout.full_error(
                needed, self.free_bytes, self.max_bytes, self._depth, disk=True
            )
        return operation_error(self.path, self.layout.file_kind, what, err)

    # -- metrics ----------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Rows in the queue, in flight or not."""
        return self._depth

    @property
    def bytes(self) -> int:
        """Accounted bytes of the rows in the queue (compared with ``max_bytes``)."""
        return self._bytes

    @property
    def free_bytes(self) -> int:
        """Accounted bytes that still fit in the budget."""
        return max(0, self.max_bytes - self._bytes)

    @property
    def in_flight(self) -> int:
        """Rows handed out by :meth:`peek_oldest` and neither deleted nor released yet."""
        return len(self._in_flight)

    @property
    def file_bytes(self) -> int:
        """Bytes the queue's files take on disk now (database + WAL)."""
        total = 0
        for name in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(name).st_size
        return total

    def oldest(self) -> Any:
        """The layout's ``oldest_column`` of the oldest row; None when empty (or no column)."""
        column = self.layout.oldest_column
        if column is None:
            return None
        with self._lock:
            if self._depth == 0:
                return None
            if self._oldest is None:
                row = self._read(
                    "read",
                    f"SELECT {column} FROM {self.layout.table} ORDER BY id LIMIT 1",  # noqa: S608
                    (),
                ).fetchone()
                self._oldest = None if row is None else row[0]
            return self._oldest

    # -- appending --------------------------------------------------------------------------------

    def append(
        self,
        rows: Sequence[Row],
        also: Callable[[sqlite3.Connection, list[Row]], object] | None = None,
    ) -> Appended:
        """Commit ``rows`` (in the layout's column order) in one transaction.

        All or nothing: on any error, no row of the batch is in the queue.

        Args:
            rows: the new rows.
            also: called inside the same transaction, after the rows are written, with the
                connection and the rows thinned to make room (e.g. to update a counter).

        Raises:
            QueueFull: (the layout's subclass) the batch does not fit and the policy is
                :class:`PushBack`, or the disk is full.
            QueueError: (the layout's subclass) the file cannot be written.
        """
        if not rows and also is None:
            return Appended([], [])
        size_at = self._size_at
        needed = sum(row[size_at] for row in rows)
        with self._lock:
            conn = self._connection()
            # An empty batch (only ``also``'s work) never needs room, even over budget.
            excess = self._bytes + needed - self.max_bytes if rows else 0
            policy = self.policy
            if excess > 0 and isinstance(policy, PushBack):
                raise self.layout.full_error(needed, self.free_bytes, self.max_bytes, self._depth)
            first = self._next_id
            params = [(first + index, *row) for index, row in enumerate(rows)]
            thinned: list[Row] = []

            def work(conn: sqlite3.Connection) -> None:
                if excess > 0 and isinstance(policy, ThinOldest):
                    thinned.extend(self._thin(conn, policy, excess))
                conn.executemany(self._insert, params)
                if also is not None:
                    also(conn, thinned)

            self._transact("append", conn, work, needed)
            was_empty = self._depth == 0
            self._next_id = first + len(rows)
            self._depth += len(rows) - len(thinned)
            self._bytes += needed - sum(row[1] for row in thinned)
            if thinned:
                self._oldest = None
            elif was_empty and rows and self._oldest_at is not None:
                self._oldest = rows[0][self._oldest_at]
        return Appended(list(range(first, first + len(rows))), thinned)

    def _thin(self, conn: sqlite3.Connection, policy: ThinOldest, excess: int) -> list[Row]:
        """Delete every second of the oldest rows not in flight until ``excess`` bytes are freed."""
        victims: list[Row] = []
        freed = 0
        depth = self._depth
        while freed < excess:
            wanted = max(
                policy.minimum, math.ceil((depth - len(self._in_flight)) * policy.fraction)
            )
            candidates: list[Row] = []
            for row in conn.execute(self._thin_select, (wanted + len(self._in_flight),)):
                if row[0] not in self._in_flight:
                    candidates.append(row)
                    if len(candidates) == wanted:
                        break
            if not candidates:
                self._log.warning(
                    "%s over budget: only entries in flight are left path=%s bytes=%d max_bytes=%d",
                    self.layout.noun,
                    self.path,
                    self._bytes,
                    self.max_bytes,
                )
                break
            chosen = candidates[1::2] if len(candidates) > 1 else candidates
            conn.executemany(self._delete_range, [(row[0], row[0]) for row in chosen])
            victims.extend(chosen)
            freed += sum(row[1] for row in chosen)
            depth -= len(chosen)
            # The next pass starts over from the oldest: the already thinned part is thinned
            # again, so the older the data the sparser it gets.
        return victims

    # -- draining ---------------------------------------------------------------------------------

    def peek_oldest(self, n: int, exclude_in_flight: bool = True) -> list[Row]:
        """Hand out up to ``n`` rows, oldest first, and mark them in flight.

        Args:
            n: at most this many.
            exclude_in_flight: skip rows already in flight (the normal case). False returns
                the oldest ``n`` whether in flight or not (e.g. to resend after a reconnect).

        Returns:
            Rows ``(id, *peek_columns, size)``.
        """
        if n <= 0:
            return []
        found: list[Row] = []
        with self._lock:
            conn = self._connection()
            start = self._scan_from if exclude_in_flight else 0
            last = start - 1
            in_flight = self._in_flight
            try:
                while len(found) < n:
                    limit = n - len(found)
                    rows = conn.execute(self._peek, (start, limit)).fetchall()
                    for row in rows:
                        last = row[0]
                        if exclude_in_flight and last in in_flight:
                            continue
                        found.append(row)
                        in_flight[last] = row[-1]
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
        """Make in-flight rows eligible again (their delivery failed or was not confirmed)."""
        with self._lock:
            released = [entry_id for entry_id in ids if entry_id in self._in_flight]
            if released:
                for entry_id in released:
                    del self._in_flight[entry_id]
                self._scan_from = min(self._scan_from, *released)

    def release_all(self) -> None:
        """Make every in-flight row eligible again (e.g. the connection was lost)."""
        with self._lock:
            if self._in_flight:
                self._scan_from = min(self._scan_from, *self._in_flight)
                self._in_flight.clear()

    def delete(self, ids: Iterable[int]) -> int:
        """Delete rows (once the far side has them) in one transaction.

        Unknown ids are ignored, so deleting twice is harmless. May VACUUM the file if this
        empties the queue (see ``reclaim_above``).

        Returns:
            How many rows were deleted.
        """
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        with self._lock:
            conn = self._connection()
            # In-flight rows are in the table and their sizes are known; only ids never
            # peeked (or already deleted) have to be looked up.
            known = [entry_id for entry_id in wanted if entry_id in self._in_flight]
            unknown = [entry_id for entry_id in wanted if entry_id not in self._in_flight]
            counted = [len(known), sum(self._in_flight[entry_id] for entry_id in known)]

            def work(conn: sqlite3.Connection) -> None:
                if unknown:
                    for run in _ranges(unknown):
                        found, size = conn.execute(self._measure_range, run).fetchone()
                        counted[0] += found
                        counted[1] += size
                conn.executemany(self._delete_range, _ranges(wanted))

            self._transact("delete", conn, work)
            for entry_id in known:
                del self._in_flight[entry_id]
            self._depth -= counted[0]
            self._bytes -= counted[1]
            self._oldest = None
            if self._depth == 0:
                self._scan_from = 0
                self._reclaim(conn)
        return counted[0]

    def _reclaim(self, conn: sqlite3.Connection) -> None:
        """VACUUM an empty queue whose file holds many free pages (a few page writes)."""
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
            self._log.warning("%s not vacuumed path=%s error=%s", self.layout.noun, self.path, err)
            return
        self._log.info(
            "%s vacuumed path=%s freed_bytes=%d",
            self.layout.noun,
            self.path,
            free_pages * page_size,
        )

    # -- the caller's own tables ------------------------------------------------------------------

    def read(self, what: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(conn)`` outside a write transaction, e.g. to read the caller's own tables.

        Raises:
            QueueError: (the layout's subclass) ``work`` failed in SQLite.
        """
        with self._lock:
            conn = self._connection()
            try:
                return work(conn)
            except sqlite3.Error as err:
                raise self._operation_error(what, err) from err

    def transaction(self, what: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work(conn)`` in one write transaction (e.g. on the caller's own tables).

        ``work`` must not touch the queue's table: the queue's counts would go stale.

        Raises:
            QueueError: (the layout's subclass) ``work`` failed in SQLite; nothing committed.
        """
        with self._lock:
            conn = self._connection()
            result: list[T] = []
            self._transact(what, conn, lambda conn: result.append(work(conn)))
            return result[0]

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (checkpoints and removes the WAL). Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                self._in_flight.clear()

    # -- internals --------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise self.layout.error(self.path, "is closed")
        return self._conn

    def _read(self, what: str, sql: str, params: Sequence[Any]) -> sqlite3.Cursor:
        try:
            return self._connection().execute(sql, params)
        except sqlite3.Error as err:
            raise self._operation_error(what, err) from err

    def _transact(
        self,
        what: str,
        conn: sqlite3.Connection,
        work: Callable[[sqlite3.Connection], object],
        needed: int = 0,
    ) -> None:
        """Run ``work(conn)`` in one write transaction; roll back and raise on any error."""
        try:
            write_transaction(
                conn, work, label=f"{self.layout.noun} path={self.path}", logger=self._log
            )
        except sqlite3.Error as err:
            raise self._operation_error(what, err, needed) from err
        self.commits += 1


class QueueWrapper(Closing):
    """Base of the application wrappers (edge outbox, bridge spool) around a :class:`DurableQueue`.

    A subclass sets ``self._queue``; this base reports the queue's gauges and closes it.
    """

    _queue: DurableQueue

    @property
    def depth(self) -> int:
        """Entries in the queue, in flight or not."""
        return self._queue.depth

    @property
    def bytes(self) -> int:
        """Accounted bytes of the entries (compared with the byte budget)."""
        return self._queue.bytes

    @property
    def free_bytes(self) -> int:
        """Accounted bytes that still fit in the budget."""
        return self._queue.free_bytes

    @property
    def in_flight(self) -> int:
        """Entries handed out by ``peek_oldest`` and neither deleted nor released yet."""
        return self._queue.in_flight

    def close(self) -> None:
        """Close the file (checkpoints the WAL). Idempotent."""
        self._queue.close()

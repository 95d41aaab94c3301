"""The edge agent's outbox: every envelope is committed here before it is published.

An envelope is written to a local SQLite file (WAL) and deleted only after the broker's PUBACK,
so a broker outage, a lost uplink, SIGKILL or a power cut loses nothing that was committed. The
file also holds the sequence counter (table ``meta``), committed in the same transaction as the
envelopes that used it: after a restart the agent continues where the last commit left off and
never reuses a published ``seq``.

Durability (``durability=``): ``"fsync"`` (default) uses ``synchronous=FULL``, so a commit
survives power loss as far as the SD card honours fsync; ``"process"`` (``synchronous=NORMAL``)
survives a crash of the agent but may lose the last commits on power loss. Either way the agent
commits in groups (see ``edge.agent``): one transaction per batch of envelopes, not per reading.

Counter and ids: ``boot`` is the first 16 hex digits of the kernel boot id plus 8 random hex
digits minted when this file first sees that boot. ``seq`` starts at 0 with every new ``boot``
(a reboot, or a new outbox file), as the wire contract asks; envelope ids are ``{boot}-{seq}``,
so they stay globally unique even if the state directory is wiped without a reboot.

Budget policy (``max_bytes``): the accounted size of an envelope is its payload and topic plus
:data:`ROW_OVERHEAD` bytes. When a commit would take the outbox past ``max_bytes``, the outbox
is *thinned* in the same transaction, before the new envelopes are written:

1. take the oldest 10 % of the envelopes that are not being published (at least 2);
2. delete every second one of them (the 2nd, 4th, 6th, ... oldest), keeping the 1st, 3rd, ...;
3. repeat until the new envelopes fit.

Old data loses resolution (repeated passes thin the oldest part most), the newest envelopes are
never dropped, and the start of an outage stays visible. Every pass is counted
(``dropped_envelopes``, ``dropped_readings``, persisted in ``meta``) and logged at WARNING with
the seq range and reading times it thinned. Envelopes in flight are never thinned, so the
outbox may exceed ``max_bytes`` by at most the publish window. The file itself can exceed
``max_bytes`` by the WAL (trimmed to 4 MiB) and partly used pages.

Only one process may open an outbox (``locking_mode=EXCLUSIVE``); a second gets
:class:`OutboxError`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import secrets
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, NamedTuple, Self

from iotpipe.errors import IotpipeError

log = logging.getLogger(__name__)

__all__ = [
    "ROW_OVERHEAD",
    "Counter",
    "Durability",
    "FillRate",
    "Outbox",
    "OutboxEntry",
    "OutboxError",
    "Pending",
]

Durability = Literal["fsync", "process"]

#: Bytes accounted per envelope on top of its payload and topic (record header, the integer
#: columns, cell pointer and B-tree slack).
ROW_OVERHEAD = 64

#: ``PRAGMA application_id`` of an outbox file ("iote").
APPLICATION_ID = 0x696F7465
SCHEMA_VERSION = 1

#: Fraction of the backlog a thinning pass looks at (the oldest part), and its minimum.
THIN_FRACTION = 0.10
THIN_MIN = 2

_SCHEMA = (
    """CREATE TABLE outbox (
        id         INTEGER PRIMARY KEY,  -- publish order
        created_ms INTEGER NOT NULL,     -- time of the envelope's first reading
        seq        INTEGER NOT NULL,
        readings   INTEGER NOT NULL,
        size       INTEGER NOT NULL,     -- accounted bytes
        topic      TEXT    NOT NULL,
        payload    BLOB    NOT NULL      -- last: scans of the columns above skip overflow pages
    )""",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
)
_INSERT = (
    "INSERT INTO outbox (id, created_ms, seq, readings, size, topic, payload)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_SET_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
_JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024


class OutboxError(IotpipeError):
    """The outbox file cannot be opened or written (corrupt, unwritable, locked, disk full).

    Attributes:
        path: the outbox file.
        reason: what is wrong.
    """

    exit_code = 2

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"outbox {self.path}: {reason}")


@dataclass(frozen=True, slots=True)
class Pending:
    """An envelope to commit."""

    topic: str
    payload: bytes
    seq: int
    readings: int
    created_ms: int


class OutboxEntry(NamedTuple):
    """A committed envelope read back for publishing."""

    id: int
    topic: str
    payload: bytes
    seq: int
    created_ms: int


@dataclass(frozen=True, slots=True)
class Counter:
    """Where the sequence counter stands: the ``boot`` label and the next ``seq``."""

    boot: str
    next_seq: int


class Outbox:
    """A durable FIFO of envelopes in one SQLite file, with the sequence counter. Thread-safe.

    Args:
        path: the file; its directory is created if missing.
        max_bytes: the budget of accounted bytes (see the module docstring).
        durability: ``"fsync"`` (survives power loss) or ``"process"`` (survives a crash).
        lock_timeout: seconds to wait for another process to let go of the file.

    Raises:
        OutboxError: the file cannot be opened, is not an outbox, or is in use.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        max_bytes: int = 64 * 1024 * 1024,
        durability: Durability = "fsync",
        lock_timeout: float = 1.0,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.durability: Durability = durability
        self.commits = 0
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}  # id -> accounted size
        self._scan_from = 0
        self._conn: sqlite3.Connection | None = self._open(lock_timeout)
        conn = self._conn
        depth, total, last_id, oldest = conn.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(max(id), 0), min(created_ms)"
            " FROM outbox"
        ).fetchone()
        self._depth = int(depth)
        self._bytes = int(total)
        self._next_id = int(last_id) + 1
        self._oldest_ms: int | None = None if oldest is None else int(oldest)
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        self.dropped_envelopes = int(meta.get("dropped_envelopes", 0))
        self.dropped_readings = int(meta.get("dropped_readings", 0))
        log.info(
            "outbox opened path=%s durability=%s depth=%d bytes=%d max_bytes=%d",
            self.path,
            durability,
            self._depth,
            self._bytes,
            max_bytes,
        )

    def _open(self, lock_timeout: float) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=lock_timeout, isolation_level=None, check_same_thread=False
            )
        except (OSError, sqlite3.Error) as err:
            raise OutboxError(self.path, f"cannot be opened: {err}") from err
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(self.path, f"cannot use WAL journaling (got {mode!r})")
            sync = "FULL" if self.durability == "fsync" else "NORMAL"
            conn.execute(f"PRAGMA synchronous={sync}")
            conn.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                app_id = conn.execute("PRAGMA application_id").fetchone()[0]
                tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if app_id == 0 and tables == 0:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                elif app_id != APPLICATION_ID:
                    raise OutboxError(self.path, "is an SQLite file but not an iotpipe outbox")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            conn.close()
            name = str(getattr(err, "sqlite_errorname", ""))
            if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
                reason = "is in use by another process (only one agent may own an outbox)"
            else:
                reason = f"cannot be opened: {err}"
            raise OutboxError(self.path, reason) from err
        except BaseException:
            conn.close()
            raise
        return conn

    # -- the counter ------------------------------------------------------------------------------

    def counter(self, kernel_boot: str) -> Counter:
        """The counter for this kernel boot: continued if the file knows it, else a new one.

        A new kernel boot (or a new file) mints a new ``boot`` label and starts ``seq`` at 0;
        that is committed at once, so the label is stable across restarts of the agent.
        """
        with self._lock:
            conn = self._connection()
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("kernel_boot") == kernel_boot and "boot" in meta:
                return Counter(meta["boot"], int(meta.get("next_seq", 0)))
            hexdigits = "".join(c for c in kernel_boot.lower() if c in "0123456789abcdef")
            boot = f"{(hexdigits or secrets.token_hex(8))[:16]}-{secrets.token_hex(4)}"
            self._write(
                conn,
                "counter",
                lambda: conn.executemany(
                    _SET_META,
                    [("kernel_boot", kernel_boot), ("boot", boot), ("next_seq", "0")],
                ),
            )
            log.info("outbox counter restarts boot=%s kernel_boot=%s", boot, kernel_boot)
            return Counter(boot, 0)

    # -- metrics ----------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Envelopes in the outbox, being published or not."""
        return self._depth

    @property
    def bytes(self) -> int:
        """Accounted bytes of the envelopes in the outbox."""
        return self._bytes

    @property
    def free_bytes(self) -> int:
        """Accounted bytes left before thinning starts."""
        return max(0, self.max_bytes - self._bytes)

    @property
    def in_flight(self) -> int:
        """Envelopes handed out by :meth:`peek_oldest`, not yet deleted or released."""
        return len(self._in_flight)

    @property
    def oldest_created_ms(self) -> int | None:
        """Reading time of the oldest envelope (epoch ms), None when empty."""
        with self._lock:
            if self._depth == 0:
                return None
            if self._oldest_ms is None:
                row = self._connection().execute("SELECT min(created_ms) FROM outbox").fetchone()
                self._oldest_ms = None if row[0] is None else int(row[0])
            return self._oldest_ms

    @property
    def file_bytes(self) -> int:
        """Bytes the outbox files take on disk (database + WAL)."""
        total = 0
        for name in (self.path, self.path.with_name(self.path.name + "-wal")):
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(name).st_size
        return total

    # -- writing ----------------------------------------------------------------------------------

    def append(self, items: Sequence[Pending]) -> list[int]:
        """Commit envelopes and the counter after them in one transaction (thinning if full).

        The counter's next ``seq`` becomes ``items[-1].seq + 1``.

        Returns:
            The ids of the new rows, in order.

        Raises:
            OutboxError: the write failed (nothing of it was committed).
        """
        if not items:
            return []
        rows = [
            (
                item.created_ms,
                item.seq,
                item.readings,
                len(item.payload) + len(item.topic) + ROW_OVERHEAD,
                item.topic,
                item.payload,
            )
            for item in items
        ]
        needed = sum(row[3] for row in rows)
        with self._lock:
            conn = self._connection()
            first = self._next_id
            thinned: list[tuple[int, int, int, int, int]] = []

            def work() -> None:
                if self._bytes + needed > self.max_bytes:
                    thinned.extend(self._thin(conn, self._bytes + needed - self.max_bytes))
                conn.executemany(_INSERT, [(first + i, *row) for i, row in enumerate(rows)])
                meta = [("next_seq", str(items[-1].seq + 1))]
                if thinned:
                    meta.append(("dropped_envelopes", str(self.dropped_envelopes + len(thinned))))
                    meta.append(
                        (
                            "dropped_readings",
                            str(self.dropped_readings + sum(t[2] for t in thinned)),
                        )
                    )
                conn.executemany(_SET_META, meta)

            self._write(conn, "append", work)
            self._next_id = first + len(rows)
            if self._depth == 0:
                self._oldest_ms = None
            self._depth += len(rows)
            self._bytes += needed
            if thinned:
                self._account_thinned(thinned)
        return list(range(first, first + len(rows)))

    def _thin(self, conn: sqlite3.Connection, excess: int) -> list[tuple[int, int, int, int, int]]:
        """Delete every second of the oldest 10 % until ``excess`` bytes are freed."""
        victims: list[tuple[int, int, int, int, int]] = []
        freed = 0
        depth = self._depth
        after = 0
        while freed < excess:
            candidates_wanted = max(THIN_MIN, math.ceil((depth - self.in_flight) * THIN_FRACTION))
            candidates: list[tuple[int, int, int, int, int]] = []
            for row in conn.execute(
                "SELECT id, size, readings, seq, created_ms FROM outbox WHERE id > ?"
                " ORDER BY id LIMIT ?",
                (after, candidates_wanted + len(self._in_flight)),
            ):
                if row[0] not in self._in_flight:
                    candidates.append(row)
                    if len(candidates) == candidates_wanted:
                        break
            if not candidates:
                log.warning(
                    "outbox over budget: only envelopes being published are left"
                    " path=%s bytes=%d max_bytes=%d",
                    self.path,
                    self._bytes,
                    self.max_bytes,
                )
                break
            chosen = candidates[1::2] if len(candidates) > 1 else candidates
            conn.executemany("DELETE FROM outbox WHERE id = ?", [(row[0],) for row in chosen])
            victims.extend(chosen)
            freed += sum(row[1] for row in chosen)
            depth -= len(chosen)
            # The next pass starts over from the oldest: the already thinned part is thinned
            # again, so the older the data the sparser it gets.
        return victims

    def _account_thinned(self, thinned: list[tuple[int, int, int, int, int]]) -> None:
        freed = sum(row[1] for row in thinned)
        readings = sum(row[2] for row in thinned)
        self._depth -= len(thinned)
        self._bytes -= freed
        self._oldest_ms = None
        self.dropped_envelopes += len(thinned)
        self.dropped_readings += readings
        log.warning(
            "outbox full: thinned the oldest envelopes dropped=%d readings=%d seq=%d..%d"
            " from_ms=%d to_ms=%d freed_bytes=%d max_bytes=%d dropped_total=%d",
            len(thinned),
            readings,
            min(row[3] for row in thinned),
            max(row[3] for row in thinned),
            min(row[4] for row in thinned),
            max(row[4] for row in thinned),
            freed,
            self.max_bytes,
            self.dropped_envelopes,
        )

    # -- publishing -------------------------------------------------------------------------------

    def peek_oldest(self, n: int) -> list[OutboxEntry]:
        """Hand out up to ``n`` envelopes not yet handed out, oldest first (marks them in flight)."""
        if n <= 0:
            return []
        with self._lock:
            conn = self._connection()
            found: list[OutboxEntry] = []
            try:
                for row in conn.execute(
                    "SELECT id, topic, payload, seq, created_ms, size FROM outbox"
                    " WHERE id >= ? ORDER BY id LIMIT ?",
                    (self._scan_from, n + len(self._in_flight)),
                ):
                    if row[0] in self._in_flight:
                        continue
                    found.append(OutboxEntry(row[0], row[1], row[2], row[3], row[4]))
                    self._in_flight[row[0]] = row[5]
                    if len(found) == n:
                        break
            except sqlite3.Error as err:
                raise OutboxError(self.path, f"read failed: {err}") from err
            if found:
                self._scan_from = found[-1].id + 1
        return found

    def release_all(self) -> None:
        """Make every in-flight envelope eligible for :meth:`peek_oldest` again."""
        with self._lock:
            if self._in_flight:
                self._scan_from = min(self._scan_from, *self._in_flight)
                self._in_flight.clear()

    def delete(self, ids: Iterable[int]) -> int:
        """Delete acknowledged envelopes in one transaction; unknown ids are ignored.

        Returns:
            How many were deleted.
        """
        wanted = sorted(set(ids))
        if not wanted:
            return 0
        with self._lock:
            conn = self._connection()
            counted: list[tuple[int, int]] = []

            def work() -> None:
                for start in range(0, len(wanted), 500):
                    chunk = wanted[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    counted.append(
                        conn.execute(
                            f"SELECT count(*), coalesce(sum(size), 0) FROM outbox"  # noqa: S608
                            f" WHERE id IN ({marks})",
                            chunk,
                        ).fetchone()
                    )
                    conn.execute(f"DELETE FROM outbox WHERE id IN ({marks})", chunk)  # noqa: S608

            self._write(conn, "delete", work)
            for entry_id in wanted:
                self._in_flight.pop(entry_id, None)
            count = sum(c[0] for c in counted)
            self._depth -= count
            self._bytes -= sum(c[1] for c in counted)
            self._oldest_ms = None
            if self._depth == 0:
                self._scan_from = 0
        return count

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (checkpoints the WAL). Idempotent."""
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

    # -- internals --------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(self.path, "is closed")
        return self._conn

    def _write(self, conn: sqlite3.Connection, what: str, work: Callable[[], object]) -> None:
        """Run ``work()`` in one write transaction; roll back and raise on any error."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            work()
            conn.execute("COMMIT")
        except sqlite3.Error as err:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    log.exception("outbox rollback failed")
            name = str(getattr(err, "sqlite_errorname", ""))
            reason = "the disk is full" if name.startswith("SQLITE_FULL") else str(err)
            raise OutboxError(self.path, f"{what} failed: {reason}") from err
        self.commits += 1


class FillRate:
    """Estimates when the outbox will reach its budget from how fast it grew recently.

    Pure (the caller passes the time): ``observe(now, bytes)`` records a sample, and
    :meth:`seconds_until_full` divides the free budget by the net growth over the last
    ``window`` seconds. While the outbox is not growing (published as fast as it is filled),
    the answer is ``math.inf``.
    """

    def __init__(self, window: float = 300.0) -> None:
        self.window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def observe(self, now: float, total_bytes: int) -> None:
        """Record the outbox size at ``now`` (monotonic seconds)."""
        self._samples.append((now, total_bytes))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def growth(self) -> float:
        """Bytes per second gained over the window (negative while draining)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def seconds_until_full(self, free_bytes: int) -> float:
        """Seconds until ``free_bytes`` are used up at the recent growth; inf if not growing."""
        rate = self.growth()
        if rate <= 0:
            return math.inf
        return free_bytes / rate

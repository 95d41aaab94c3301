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
never dropped, and the start of an outage stays visible. What a commit thins is counted
(``dropped_envelopes``, ``dropped_readings``, persisted in ``meta`` in the same transaction)
and logged once at WARNING with the seq range and reading times it thinned. Envelopes in flight are never thinned, so the
outbox may exceed ``max_bytes`` by at most the publish window. The file itself can exceed
``max_bytes`` by the WAL (trimmed back to 4 MiB after a checkpoint) and partly used pages.

The file, its PRAGMAs, the in-flight bookkeeping, the thinning and the error messages are
:class:`iotpipe.durable_queue.DurableQueue`'s (policy :class:`~iotpipe.durable_queue.ThinOldest`);
this module adds the envelope columns, the counter and the drop counts. Only one process may
open an outbox (``locking_mode=EXCLUSIVE``); a second gets :class:`OutboxError`, and so does a
file that is not an outbox or was written by a newer iotpipe (``user_version`` above
:data:`SCHEMA_VERSION`).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import sqlite3
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from iotpipe.durable_queue import (
    Durability,
    DurableQueue,
    Layout,
    QueueError,
    QueueWrapper,
    Row,
    ThinOldest,
)

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

#: Bytes accounted per envelope on top of its payload and topic (record header, the integer
#: columns, cell pointer and B-tree slack).
ROW_OVERHEAD = 64

#: ``PRAGMA application_id`` of an outbox file ("iote").
APPLICATION_ID = 0x696F7465
SCHEMA_VERSION = 1

#: SQLite page cache of the outbox connection, KiB. Envelopes are written once and read once,
#: so a cache barely helps; SQLite's default (2000 KiB) would fill while a long backlog drains
#: and stay resident on a small Pi. Group commits of 1 KB envelopes ran at the same rate.
OUTBOX_CACHE_KIB = 256

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
_SET_META = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"


class OutboxError(QueueError):
    """The outbox file cannot be opened or written (corrupt, unwritable, locked, disk full).

    Attributes:
        path: the outbox file.
        reason: what is wrong, and what to do about it where that is known.
    """

    noun = "outbox"


LAYOUT = Layout(
    noun="outbox",
    owner="agent",
    table="outbox",
    columns=("created_ms", "seq", "readings", "size", "topic", "payload"),
    peek_columns=("topic", "payload", "seq", "created_ms"),
    schema=_SCHEMA,
    application_id=APPLICATION_ID,
    schema_version=SCHEMA_VERSION,
    error=OutboxError,
    thin_columns=("readings", "seq", "created_ms"),
    oldest_column="created_ms",
    journal_size_limit=4 * 1024 * 1024,
    cache_kib=OUTBOX_CACHE_KIB,
    logger=log,
)


class Pending(NamedTuple):
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


class Counter(NamedTuple):
    """Where the sequence counter stands: the ``boot`` label and the next ``seq``."""

    boot: str
    next_seq: int


class Outbox(QueueWrapper):
    """A durable FIFO of envelopes in one SQLite file, with the sequence counter. Thread-safe.

    Args:
        path: the file; its directory is created if missing.
        max_bytes: the budget of accounted bytes (see the module docstring).
        durability: ``"fsync"`` (survives power loss) or ``"process"`` (survives a crash).
        lock_timeout: seconds to wait for another process to let go of the file.

    Raises:
        OutboxError: the file cannot be opened, is not an outbox, is from a newer iotpipe, or
            is in use.
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
        self._queue = DurableQueue(
            path,
            LAYOUT,
            max_bytes=max_bytes,
            durability=durability,
            policy=ThinOldest(THIN_FRACTION, THIN_MIN),
            lock_timeout=lock_timeout,
        )
        self.path = self._queue.path
        self.max_bytes = max_bytes
        self.durability: Durability = durability
        meta = self._queue.read("open", _read_meta)
        self.dropped_envelopes = int(meta.get("dropped_envelopes", 0))
        self.dropped_readings = int(meta.get("dropped_readings", 0))

    # -- the counter ------------------------------------------------------------------------------

    def counter(self, kernel_boot: str) -> Counter:
        """The counter for this kernel boot: continued if the file knows it, else a new one.

        A new kernel boot (or a new file) mints a new ``boot`` label and starts ``seq`` at 0;
        that is committed at once, so the label is stable across restarts of the agent.
        """

        def work(conn: sqlite3.Connection) -> tuple[Counter, bool]:
            meta = _read_meta(conn)
            if meta.get("kernel_boot") == kernel_boot and "boot" in meta:
                return Counter(meta["boot"], int(meta.get("next_seq", 0))), False
            hexdigits = "".join(c for c in kernel_boot.lower() if c in "0123456789abcdef")
            # os.urandom(n).hex() is secrets.token_hex(n), without secrets' imports (hmac).
            boot = f"{(hexdigits or os.urandom(8).hex())[:16]}-{os.urandom(4).hex()}"
            conn.executemany(
                _SET_META, [("kernel_boot", kernel_boot), ("boot", boot), ("next_seq", "0")]
            )
            return Counter(boot, 0), True

        counter, new = self._queue.transaction("counter", work)
        if new:
            log.info("outbox counter restarts boot=%s kernel_boot=%s", counter.boot, kernel_boot)
        return counter

    # -- metrics ----------------------------------------------------------------------------------

    @property
    def commits(self) -> int:
        """Write transactions committed since the outbox was opened."""
        return self._queue.commits

    @property
    def oldest_created_ms(self) -> int | None:
        """Reading time of the oldest envelope (epoch ms), None when empty."""
        oldest = self._queue.oldest()
        return None if oldest is None else int(oldest)

    @property
    def file_bytes(self) -> int:
        """Bytes the outbox files take on disk (database + WAL)."""
        return self._queue.file_bytes

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
        next_seq = str(items[-1].seq + 1)

        def also(conn: sqlite3.Connection, thinned: list[Row]) -> None:
            meta = [("next_seq", next_seq)]
            if thinned:
                meta.append(("dropped_envelopes", str(self.dropped_envelopes + len(thinned))))
                meta.append(
                    ("dropped_readings", str(self.dropped_readings + sum(t[2] for t in thinned)))
                )
            conn.executemany(_SET_META, meta)

        appended = self._queue.append(rows, also)
        if appended.thinned:
            self._account_thinned(appended.thinned)
        return appended.ids

    def _account_thinned(self, thinned: list[Row]) -> None:
        """Count and log what a commit thinned: rows ``(id, size, readings, seq, created_ms)``."""
        freed = sum(row[1] for row in thinned)
        readings = sum(row[2] for row in thinned)
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
        return [OutboxEntry(*row[:5]) for row in self._queue.peek_oldest(n)]

    def release_all(self) -> None:
        """Make every in-flight envelope eligible for :meth:`peek_oldest` again."""
        self._queue.release_all()

    def delete(self, ids: Iterable[int]) -> int:
        """Delete acknowledged envelopes in one transaction; unknown ids are ignored.

        Returns:
            How many were deleted.
        """
        return self._queue.delete(ids)

    # -- lifecycle --------------------------------------------------------------------------------


def _read_meta(conn: sqlite3.Connection) -> dict[str, str]:
    return dict(conn.execute("SELECT key, value FROM meta").fetchall())


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

"""The bridge's local durable spool: messages RabbitMQ has not confirmed yet, kept on disk.

The bridge acknowledges an MQTT message once RabbitMQ confirmed it *or* once it is committed
here. When RabbitMQ is back, the spool drains oldest-first into it, and an entry is deleted only
after its publisher confirm. This module knows nothing about MQTT or AMQP: an entry is an
exchange, a routing key, a body, optional properties and the time it was received.

The file, its PRAGMAs, the in-flight bookkeeping, the budget and the error messages are
:class:`iotpipe.durable_queue.DurableQueue`'s, with the policy
:class:`~iotpipe.durable_queue.PushBack`; this module adds the entry columns and their
encoding, and :class:`SpoolWriter`.

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
open; after a restart they continue from the largest id left, so with an *empty* spool they
start again at 1 (no ``AUTOINCREMENT``: its bookkeeping page would be one more page written per
commit). Do not keep ids across restarts.

Budget: ``max_bytes`` bounds the *accounted* size (payload bytes plus :data:`ROW_OVERHEAD` per
entry, which tracks SQLite's real use within a few percent for bodies of a few hundred bytes).
A batch that would not fit raises :class:`SpoolFull` and nothing is written; the spool never
deletes data to make room. The file itself can exceed ``max_bytes`` by the WAL (it grows with
the largest transaction and is trimmed back to 8 MiB, ``journal_size_limit``, after a
checkpoint) and partly filled pages, so leave that much headroom on disk.

Space and SD-card wear: no ``auto_vacuum`` (its pointer-map pages add a write to most commits);
pages freed by draining go to SQLite's free list and are reused by the next appends, so the file
stays at its high-water mark while in use. When a drain leaves the spool *empty* and more than
``reclaim_above`` bytes are free, the file is ``VACUUM``-ed: with no rows that rewrites two
pages and truncates the file, instead of copying the whole database.

Only one process may open a spool: the connection uses ``locking_mode=EXCLUSIVE`` (which also
keeps the WAL index in memory, no ``-shm`` file), and a second opener gets :class:`SpoolError`,
as does a file that is not a spool or was written by a newer iotpipe.

Errors::

    IotpipeError (iotpipe.errors)
    ├── QueueError (iotpipe.durable_queue)
    │   └── SpoolError   the spool file cannot be opened or used (corrupt, unwritable, locked, I/O)
    └── QueueFull (iotpipe.durable_queue)
        └── SpoolFull    a batch does not fit in the budget (or the disk is full): back-pressure
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

from iotpipe.closing import Closing
from iotpipe.durable_queue import (
    Durability,
    DurableQueue,
    Layout,
    PushBack,
    QueueError,
    QueueFull,
    QueueWrapper,
)
from iotpipe.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ROW_OVERHEAD",
    "Durability",
    "Entry",
    "Properties",
    "Spool",
    "SpoolEntry",
    "SpoolError",
    "SpoolFull",
    "SpoolWriter",
]

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

# Built once: json.dumps/loads with arguments build a new encoder on every call.
_JSON_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_JSON_DECODER = json.JSONDecoder()

# (received_at, size, exchange, routing_key, props, body): an entry encoded for its INSERT.
_Row = tuple[float, int, str, str, str | bytes | None, bytes]


# -- errors -----------------------------------------------------------------------------------


class SpoolError(QueueError):
    """The spool file cannot be opened or used: corrupt, not a spool, unwritable, locked, I/O.

    Attributes:
        path: the spool file.
        reason: what is wrong, and what to do about it where that is known.
    """

    noun = "spool"


# The name the bridge checks for; "Full" reads better than "FullError" here.
class SpoolFull(QueueFull):
    """A batch does not fit: nothing of it was written. Retry after draining; do not acknowledge.

    Attributes:
        needed: accounted bytes of the refused batch.
        free: accounted bytes still free in the budget (``max_bytes - bytes``).
        max_bytes: the budget.
        depth: entries in the spool.
        disk: True if the file system, not the budget, ran out of space.
    """

    noun = "spool"


LAYOUT = Layout(
    noun="spool",
    owner="bridge",
    table="spool",
    columns=("received_at", "size", "exchange", "routing_key", "props", "body"),
    peek_columns=("exchange", "routing_key", "body", "props", "received_at"),
    schema=(_SCHEMA,),
    application_id=APPLICATION_ID,
    schema_version=SCHEMA_VERSION,
    error=SpoolError,
    full_error=SpoolFull,
    oldest_column="received_at",
    journal_size_limit=8 * 1024 * 1024,
    logger=log,
)


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


# -- the spool --------------------------------------------------------------------------------


class Spool(QueueWrapper):
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
        SpoolError: the file cannot be created or opened, is corrupt, is not a spool, was
            written by a newer iotpipe, or is held by another process.
        ConfigError: a bad ``durability`` or ``max_bytes`` (named as the ``[bridge]`` setting).
        ValueError: a bad ``reclaim_above``.
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
            raise ConfigError("bridge.spool_durability", durability, '"fsync" or "process"')
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ConfigError("bridge.spool_max_bytes", max_bytes, "a positive number of bytes")
        self._queue = DurableQueue(
            path,
            LAYOUT,
            max_bytes=max_bytes,
            durability=durability,
            policy=PushBack(),
            reclaim_above=reclaim_above,
            lock_timeout=lock_timeout,
        )
        self.path = self._queue.path
        self.max_bytes = max_bytes
        self.durability: Durability = durability
        self.reclaim_above = reclaim_above
        self._clock = clock

    # -- metrics --------------------------------------------------------------------------------

    @property
    def oldest_age_seconds(self) -> float:
        """Seconds since the oldest entry was received; 0.0 when the spool is empty."""
        oldest = self._queue.oldest()
        return 0.0 if oldest is None else max(0.0, self._clock() - float(oldest))

    @property
    def file_bytes(self) -> int:
        """Bytes the spool's files take on disk now (database + WAL)."""
        return self._queue.file_bytes

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
        return self._queue.append(rows).ids

    # -- draining -------------------------------------------------------------------------------

    def peek_oldest(self, n: int, exclude_in_flight: bool = True) -> list[SpoolEntry]:
        """Hand out up to ``n`` entries, oldest first, and mark them in flight.

        Args:
            n: at most this many.
            exclude_in_flight: skip entries already in flight (the normal case). False returns
                the oldest ``n`` whether in flight or not (e.g. to resend after a reconnect).
        """
        return [_decode(row) for row in self._queue.peek_oldest(n, exclude_in_flight)]

    def release(self, ids: Iterable[int]) -> None:
        """Make in-flight entries eligible again (their publish failed or was not confirmed)."""
        self._queue.release(ids)

    def release_all(self) -> None:
        """Make every in-flight entry eligible again (e.g. the AMQP connection was lost)."""
        self._queue.release_all()

    def delete(self, ids: Iterable[int]) -> int:
        """Delete entries (after their publisher confirms) in one transaction.

        Unknown ids are ignored, so deleting twice is harmless. May VACUUM the file if this
        empties the spool (see ``reclaim_above``).

        Returns:
            How many entries were deleted.
        """
        return self._queue.delete(ids)

    # -- lifecycle ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"Spool({str(self.path)!r}, depth={self.depth}, bytes={self.bytes},"
            f" max_bytes={self.max_bytes}, durability={self.durability!r})"
        )


# -- group commits ------------------------------------------------------------------------------

T = TypeVar("T")


class SpoolWriter(Generic[T], Closing):
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
            raise ValueError(f"max_batch must be at least 1, not {max_batch!r}")
        if not 0 <= max_delay_ms < math.inf:
            raise ValueError(f"max_delay_ms must be milliseconds >= 0, not {max_delay_ms!r}")
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

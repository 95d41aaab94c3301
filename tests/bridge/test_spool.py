"""The bridge's durable spool: FIFO semantics, budget, persistence, group commits, SIGKILL."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bridge.spool import (
    ROW_OVERHEAD,
    Durability,
    Entry,
    Spool,
    SpoolEntry,
    SpoolError,
    SpoolFull,
    SpoolWriter,
)
from iotpipe.errors import ConfigError, IotpipeError
from tests.conftest import wait_for

EXCHANGE = "iotpipe.telemetry"
KEY = "iotpipe.v1.home.pi.telemetry"


def entry(n: int, *, size: int = 10, properties: object = None) -> Entry:
    """Entry number ``n``: its body starts with ``n`` so the order can be checked."""
    body = f"m{n}:".encode().ljust(size, b"x")
    return Entry(EXCHANGE, KEY, body, properties, received_at=1000.0 + n)  # type: ignore[arg-type]


def cost(item: Entry) -> int:
    """Accounted bytes of one entry without properties (what the spool charges the budget)."""
    return len(item.body) + len(item.exchange) + len(item.routing_key) + ROW_OVERHEAD


def bodies(entries: list[SpoolEntry]) -> list[bytes]:
    """The bodies of ``entries``, in order."""
    return [item.body for item in entries]


class FakeClock:
    """A clock that moves only when told to, and counts how often it was read."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.reads = 0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self.reads += 1
            return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        with self._lock:
            self.now += seconds


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where the test's spool lives."""
    return tmp_path / "spool" / "bridge.spool"


@pytest.fixture
def spool(path: Path) -> Iterator[Spool]:
    """An empty spool with the default (fsync) durability."""
    with Spool(path) as opened:
        yield opened


# -- append, peek, delete, release --------------------------------------------------------------


def test_append_many_returns_increasing_ids_and_peek_is_oldest_first(spool: Spool) -> None:
    """Ids increase in append order across batches, and peek hands entries out oldest first."""
    first = spool.append_many([entry(0), entry(1), entry(2)])
    second = spool.append_many([entry(3), entry(4)])
    assert first + second == sorted(first + second)
    assert len(set(first + second)) == 5
    peeked = spool.peek_oldest(10)
    assert [item.id for item in peeked] == first + second
    assert bodies(peeked) == [entry(n).body for n in range(5)]
    assert spool.depth == 5
    assert spool.append_many([]) == []


def test_entries_round_trip_with_their_properties(spool: Spool) -> None:
    """Exchange, routing key, body, JSON properties, raw-bytes properties and receive time survive."""
    props = {"message_id": "abc", "headers": {"x-iotpipe-site": "home"}, "delivery_mode": 2}
    spool.append_many(
        [
            Entry("ex1", "a.b", b"\x00\xffbinary", props, received_at=12.5),
            Entry("ex2", "c.d", b"raw", b"\x01opaque", received_at=13.0),
            Entry("ex3", "e.f", b"none", received_at=14.0),
        ]
    )
    one, two, three = spool.peek_oldest(3)
    assert (one.exchange, one.routing_key, one.body) == ("ex1", "a.b", b"\x00\xffbinary")
    assert one.properties == props
    assert one.received_at == 12.5
    assert two.properties == b"\x01opaque"
    assert three.properties is None


def test_peek_marks_entries_in_flight_so_they_are_not_handed_out_twice(spool: Spool) -> None:
    """A second peek skips entries already in flight and continues with the next oldest."""
    spool.append_many([entry(n) for n in range(5)])
    first = spool.peek_oldest(2)
    second = spool.peek_oldest(2)
    third = spool.peek_oldest(2)
    assert bodies(first + second + third) == [entry(n).body for n in range(5)]
    assert spool.peek_oldest(2) == []
    assert spool.in_flight == 5


def test_release_makes_entries_eligible_again_in_oldest_first_order(spool: Spool) -> None:
    """Released entries come back before newer ones, oldest first; still-in-flight ones do not."""
    ids = spool.append_many([entry(n) for n in range(6)])
    spool.peek_oldest(4)
    spool.release([ids[2], ids[0]])
    assert [item.id for item in spool.peek_oldest(10)] == [ids[0], ids[2], ids[4], ids[5]]
    spool.release_all()
    assert spool.in_flight == 0
    assert [item.id for item in spool.peek_oldest(10)] == ids


def test_peek_including_in_flight_returns_the_oldest_regardless(spool: Spool) -> None:
    """exclude_in_flight=False returns the oldest entries even when they are in flight."""
    ids = spool.append_many([entry(n) for n in range(3)])
    spool.peek_oldest(2)
    assert [item.id for item in spool.peek_oldest(3, exclude_in_flight=False)] == ids
    assert spool.peek_oldest(3) == []


def test_delete_removes_entries_and_updates_depth_and_bytes(spool: Spool) -> None:
    """Deleted entries are gone, depth and bytes shrink, and deleting again or unknown ids is a no-op."""
    items = [entry(n) for n in range(4)]
    ids = spool.append_many(items)
    assert spool.bytes == sum(cost(item) for item in items)
    peeked = spool.peek_oldest(2)
    assert spool.delete(item.id for item in peeked) == 2
    assert spool.delete([ids[0], ids[1], 10_000]) == 0
    assert spool.depth == 2
    assert spool.bytes == cost(items[2]) + cost(items[3])
    assert spool.in_flight == 0
    assert bodies(spool.peek_oldest(10)) == [items[2].body, items[3].body]


def test_delete_removes_exactly_the_given_ids(spool: Spool) -> None:
    """Deleting a mix of peeked and never-peeked ids with gaps leaves the ids in between."""
    items = [entry(n) for n in range(8)]
    ids = spool.append_many(items)
    spool.peek_oldest(3)
    gone = [ids[0], ids[2], ids[5], ids[6]]
    assert spool.delete(gone) == 4
    kept = [1, 3, 4, 7]
    assert spool.bytes == sum(cost(items[n]) for n in kept)
    assert spool.in_flight == 1  # ids[1] is still in flight
    assert [item.id for item in spool.peek_oldest(10, exclude_in_flight=False)] == [
        ids[n] for n in kept
    ]


def test_delete_of_more_ids_than_one_sql_statement_takes(spool: Spool) -> None:
    """Deleting thousands of ids at once works and empties the spool exactly."""
    ids = spool.append_many([entry(n) for n in range(2500)])
    assert spool.delete(ids) == 2500
    assert (spool.depth, spool.bytes) == (0, 0)


def test_concurrent_drainers_never_receive_the_same_entry(spool: Spool) -> None:
    """Two threads peeking and deleting while a third appends each get disjoint entries, all of them."""
    total = 3000
    seen: list[list[int]] = [[], []]
    appended = threading.Event()

    def append() -> None:
        for start in range(0, total, 100):
            spool.append_many([entry(n) for n in range(start, start + 100)])
        appended.set()

    def drain(mine: list[int]) -> None:
        while not (appended.is_set() and spool.depth == 0):
            batch = spool.peek_oldest(37)
            mine.extend(item.id for item in batch)
            spool.delete(item.id for item in batch)

    threads = [threading.Thread(target=append)]
    threads += [threading.Thread(target=drain, args=(mine,)) for mine in seen]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    assert not set(seen[0]) & set(seen[1])
    assert len(seen[0]) + len(seen[1]) == total


# -- budget -------------------------------------------------------------------------------------


def test_a_batch_over_budget_is_refused_and_nothing_is_deleted(path: Path) -> None:
    """SpoolFull refuses the whole batch; every entry already spooled stays, then it fits after a drain."""
    items = [entry(n, size=100) for n in range(10)]
    budget = sum(cost(item) for item in items) + cost(items[0]) // 2
    with Spool(path, max_bytes=budget) as spool:
        ids = spool.append_many(items)
        with pytest.raises(SpoolFull) as refused:
            spool.append_many([entry(10, size=100), entry(11, size=100)])
        assert isinstance(refused.value, IotpipeError)
        assert refused.value.needed == 2 * cost(items[0])
        assert refused.value.free == budget - spool.bytes
        assert not refused.value.disk
        assert "spool full" in str(refused.value)
        assert spool.depth == 10
        assert [item.id for item in spool.peek_oldest(20)] == ids
        spool.release_all()
        with pytest.raises(SpoolFull):
            spool.append_many([entry(10, size=100)])  # one alone does not fit either
        spool.delete(ids[:1])
        assert len(spool.append_many([entry(10, size=100)])) == 1


def test_a_full_disk_raises_spool_full_and_writes_nothing(spool: Spool) -> None:
    """When SQLite reports the disk full, the batch is rolled back and SpoolFull(disk=True) raised."""
    ids = spool.append_many([entry(0)])
    queue = spool._queue
    pages = queue.read("test", lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    # The file may not grow: SQLite reports "database or disk is full".
    queue.read("test", lambda conn: conn.execute(f"PRAGMA max_page_count={pages}"))
    depth, used = spool.depth, spool.bytes
    with pytest.raises(SpoolFull) as refused:
        spool.append_many([entry(n, size=2000) for n in range(1, 50)])
    assert refused.value.disk
    assert (spool.depth, spool.bytes) == (depth, used)
    assert [item.id for item in spool.peek_oldest(100)] == ids


def test_a_malformed_entry_fails_its_whole_batch(spool: Spool) -> None:
    """A batch with a malformed entry raises before anything of it is written."""
    bad = Entry(EXCHANGE, KEY, "text, not bytes")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        spool.append_many([entry(0), bad])
    not_json = Entry(EXCHANGE, KEY, b"x", {"t": object()})
    with pytest.raises(TypeError):
        spool.append_many([entry(0), not_json])
    assert spool.depth == 0


# -- persistence --------------------------------------------------------------------------------


@pytest.mark.parametrize("durability", ["fsync", "process"])
def test_entries_survive_reopen_and_nothing_is_in_flight_afterwards(
    path: Path, durability: Durability
) -> None:
    """After close and reopen every entry is there, in order, eligible again, with the same ids."""
    with Spool(path, durability=durability) as spool:
        ids = spool.append_many([entry(n, properties={"n": n}) for n in range(5)])
        spool.peek_oldest(3)  # confirmed but not deleted: must be sent again
        spool.delete(ids[:1])
        depth, used = spool.depth, spool.bytes
    with Spool(path, durability=durability) as spool:
        assert (spool.depth, spool.bytes, spool.in_flight) == (depth, used, 0)
        again = spool.peek_oldest(10)
        assert [item.id for item in again] == ids[1:]
        assert [item.properties for item in again] == [{"n": n} for n in range(1, 5)]
        assert spool.append_many([entry(5)])[0] > ids[-1]


def test_oldest_age_follows_the_oldest_entry(path: Path) -> None:
    """oldest_age_seconds is the age of the oldest entry by the injected clock, 0 when empty."""
    with Spool(path, clock=lambda: 2000.0) as spool:
        assert spool.oldest_age_seconds == 0.0
        ids = spool.append_many([entry(0), entry(5)])  # received at 1000 and 1005
        assert spool.oldest_age_seconds == 1000.0
        spool.delete(ids[:1])
        assert spool.oldest_age_seconds == 995.0
        spool.delete(ids[1:])
        assert spool.oldest_age_seconds == 0.0


def test_an_emptied_spool_gives_its_file_space_back(path: Path) -> None:
    """Draining a large spool to empty shrinks the file, and ids keep increasing afterwards."""
    with Spool(path, durability="process", reclaim_above=0) as spool:
        ids = spool.append_many([entry(n, size=1000) for n in range(3000)])
        large = spool.file_bytes
        assert large > 3_000_000
        spool.delete(ids[:-1])
        assert spool.file_bytes >= large  # not empty yet: free pages are kept for reuse
        spool.delete(ids[-1:])
        assert spool.file_bytes < 100_000
        assert spool.append_many([entry(0)])[0] > ids[-1]


def test_reclaim_can_be_turned_off(path: Path) -> None:
    """With reclaim_above=None the file keeps its size after the spool empties."""
    with Spool(path, durability="process", reclaim_above=None) as spool:
        ids = spool.append_many([entry(n, size=1000) for n in range(1000)])
        spool.delete(ids)
        assert spool.file_bytes > 1_000_000


# -- opening errors -----------------------------------------------------------------------------


def test_a_second_owner_is_refused_while_the_spool_is_open(spool: Spool, path: Path) -> None:
    """Only one process (or Spool) may own a file: the second gets a one-line SpoolError."""
    with pytest.raises(SpoolError, match="in use by another process") as refused:
        Spool(path, lock_timeout=0.05)
    assert refused.value.path == str(path)
    assert "\n" not in str(refused.value)


def test_a_corrupt_file_raises_one_clear_spool_error(path: Path) -> None:
    """A file that is not SQLite raises SpoolError naming the path and what to do."""
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database " * 200)
    with pytest.raises(SpoolError, match="corrupt or not an SQLite file") as refused:
        Spool(path)
    assert str(path) in str(refused.value)
    assert refused.value.exit_code == 2


def test_another_sqlite_database_is_not_taken_for_a_spool(path: Path) -> None:
    """An SQLite file with other tables is refused, not modified."""
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE readings (ts INTEGER)")
    other.close()
    with pytest.raises(SpoolError, match="not an iotpipe spool"):
        Spool(path)


#: A spool file exactly as the bridge before the shared durable queue wrote it.
OLD_SPOOL = (
    "PRAGMA journal_mode=WAL",
    """
CREATE TABLE spool (
    id          INTEGER PRIMARY KEY,  -- drain order; never reused while the process runs
    received_at REAL    NOT NULL,     -- Unix time the bridge received the message
    size        INTEGER NOT NULL,     -- accounted bytes: payload + ROW_OVERHEAD
    exchange    TEXT    NOT NULL,
    routing_key TEXT    NOT NULL,
    props,                            -- JSON text (a dict), BLOB (opaque bytes) or NULL
    body        BLOB    NOT NULL      -- last, so scans of the columns above skip overflow pages
)
""",
    "PRAGMA application_id=1768911984",  # 0x696F7470, "iotp"
    "PRAGMA user_version=1",
)


def test_a_spool_written_by_the_earlier_bridge_opens_and_drains(path: Path) -> None:
    """A file from before the shared queue keeps its entries, budget accounting and order."""
    path.parent.mkdir(parents=True)
    raw = sqlite3.connect(path, isolation_level=None)
    for statement in OLD_SPOOL:
        raw.execute(statement)
    items = [entry(n) for n in range(3)]
    raw.executemany(
        "INSERT INTO spool VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (n + 1, item.received_at, cost(item), item.exchange, item.routing_key, props, item.body)
            for n, (item, props) in enumerate(zip(items, ['{"a":1}', b"raw", None], strict=True))
        ],
    )
    raw.close()
    with Spool(path, clock=lambda: 1010.0) as spool:
        assert (spool.depth, spool.bytes) == (3, sum(cost(item) for item in items))
        assert spool.oldest_age_seconds == 10.0
        drained = spool.peek_oldest(10)
        assert bodies(drained) == [item.body for item in items]
        assert [item.properties for item in drained] == [{"a": 1}, b"raw", None]
        assert spool.append_many([entry(3)]) == [4]


def test_a_spool_from_a_newer_version_is_refused(path: Path) -> None:
    """A spool file with a newer schema version is refused instead of misread."""
    Spool(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version=99")
    raw.close()
    with pytest.raises(SpoolError, match="newer iotpipe"):
        Spool(path)


@pytest.mark.parametrize("where", ["under-a-file", "a-directory"])
def test_an_unusable_path_raises_spool_error(tmp_path: Path, where: str) -> None:
    """A path under a regular file, or a directory, raises SpoolError naming the path."""
    blocker = tmp_path / "blocker"
    if where == "under-a-file":
        blocker.write_text("")
        target = blocker / "bridge.spool"
    else:
        blocker.mkdir()
        target = blocker
    with pytest.raises(SpoolError) as refused:
        Spool(target)
    assert str(target) in str(refused.value)


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("bridge.spool_durability", {"durability": "sometimes"}),
        ("bridge.spool_max_bytes", {"max_bytes": 0}),
    ],
)
def test_bad_settings_raise_config_error(path: Path, field: str, kwargs: dict[str, object]) -> None:
    """Bad settings raise ConfigError naming the [bridge] setting they come from."""
    with pytest.raises(ConfigError) as refused:
        Spool(path, **kwargs)  # type: ignore[arg-type]
    assert refused.value.field == field


def test_bad_arguments_that_are_no_setting_raise_value_error(path: Path) -> None:
    """A negative reclaim_above, or a writer batch below 1, is a programming error: ValueError."""
    with pytest.raises(ValueError, match="reclaim_above"):
        Spool(path, reclaim_above=-1)
    with Spool(path) as spool, pytest.raises(ValueError, match="max_batch"):
        SpoolWriter(spool, print, max_batch=0)


def test_a_closed_spool_refuses_work(path: Path) -> None:
    """Using a closed spool raises SpoolError; closing twice is fine."""
    spool = Spool(path)
    spool.close()
    spool.close()
    with pytest.raises(SpoolError, match="closed"):
        spool.append_many([entry(0)])


# -- group commits ------------------------------------------------------------------------------


class Committed:
    """Records ``on_committed`` calls, with the spool's depth seen at each call."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.batches: list[list[int]] = []
        self.depths: list[int] = []
        self.at: list[float] = []

    def __call__(self, tokens: list[int]) -> None:
        self.depths.append(self.spool.depth)
        self.at.append(time.monotonic())
        self.batches.append(tokens)

    @property
    def tokens(self) -> list[int]:
        """Every committed token, in order."""
        return [token for batch in self.batches for token in batch]


def test_writer_commits_by_batch_size_before_the_delay(spool: Spool) -> None:
    """With time frozen, full batches commit at once and the remainder waits for a flush."""
    committed = Committed(spool)
    clock = FakeClock()
    with SpoolWriter(spool, committed, max_batch=10, max_delay_ms=50, clock=clock) as writer:
        for n in range(25):
            writer.submit(entry(n), n)
        wait_for(lambda: len(committed.batches) == 2, what="two full batches")
        assert committed.batches == [list(range(10)), list(range(10, 20))]
        reads = clock.reads
        wait_for(lambda: clock.reads > reads + 3, what="the writer to re-check the delay")
        assert len(committed.batches) == 2
        assert writer.pending == 5
        assert writer.flush(timeout=10)
        assert committed.batches[2:] == [list(range(20, 25))]
    assert spool.depth == 25


def test_writer_commits_a_partial_batch_when_the_delay_expires(spool: Spool) -> None:
    """Entries below max_batch commit together once the oldest has waited max_delay (injected clock)."""
    committed = Committed(spool)
    clock = FakeClock()
    with SpoolWriter(spool, committed, max_batch=1000, max_delay_ms=20, clock=clock) as writer:
        for n in range(3):
            writer.submit(entry(n), n)
        reads = clock.reads
        wait_for(lambda: clock.reads > reads + 3, what="the writer to re-check the delay")
        assert committed.batches == []
        clock.advance(0.019)
        reads = clock.reads
        wait_for(lambda: clock.reads > reads + 3, what="the writer to re-check the delay")
        assert committed.batches == []
        clock.advance(0.002)
        wait_for(lambda: committed.batches, what="the delayed commit")
        assert committed.batches == [[0, 1, 2]]


def test_writer_with_the_real_clock_commits_after_max_delay(spool: Spool) -> None:
    """With the real clock, a lone entry is committed no sooner than max_delay after its submit."""
    committed = Committed(spool)
    with SpoolWriter(spool, committed, max_batch=1000, max_delay_ms=100) as writer:
        submitted = time.monotonic()
        writer.submit(entry(0), 0)
        wait_for(lambda: committed.batches, what="the delayed commit")
    assert committed.at[0] - submitted >= 0.1
    assert committed.tokens == [0]


def test_writer_reports_tokens_only_after_their_commit(spool: Spool) -> None:
    """At every callback the spool already holds every entry reported so far, in submit order."""
    committed = Committed(spool)
    with SpoolWriter(spool, committed, max_batch=64, max_delay_ms=1) as writer:
        for n in range(1000):
            writer.submit(entry(n), n)
        assert writer.flush(timeout=30)
    assert committed.tokens == list(range(1000))
    reported = 0
    for batch, depth in zip(committed.batches, committed.depths, strict=True):
        reported += len(batch)
        assert depth >= reported
    assert bodies(spool.peek_oldest(1000)) == [entry(n).body for n in range(1000)]


def test_writer_waits_while_the_spool_is_full_and_resumes_after_a_drain(path: Path) -> None:
    """When full, the writer reports errors, commits what fits, acknowledges nothing more, and resumes."""
    size = cost(entry(0, size=100))
    errors: list[Exception] = []
    with Spool(path, max_bytes=5 * size) as spool:
        old = spool.append_many([entry(n, size=100) for n in range(100, 103)])
        committed = Committed(spool)
        with SpoolWriter(
            spool,
            committed,
            max_batch=100,
            max_delay_ms=0,
            retry_interval=0.01,
            on_error=errors.append,
        ) as writer:
            for n in range(4):
                writer.submit(entry(n, size=100), n)
            wait_for(lambda: errors, what="the first SpoolFull")
            assert isinstance(errors[0], SpoolFull)
            wait_for(lambda: committed.tokens == [0, 1], what="the part that fits")
            assert writer.stalled
            assert writer.pending == 2
            assert spool.depth == 5
            spool.delete(old)
            wait_for(lambda: committed.tokens == [0, 1, 2, 3], what="the rest after a drain")
            assert not writer.stalled
        assert bodies(spool.peek_oldest(10)) == [entry(n, size=100).body for n in range(4)]


def test_writer_close_commits_what_is_queued_and_refuses_more(spool: Spool) -> None:
    """close() commits the queue before stopping; submit() afterwards raises SpoolError."""
    committed = Committed(spool)
    writer = SpoolWriter(spool, committed, max_batch=1000, max_delay_ms=60_000)
    for n in range(10):
        writer.submit(entry(n), n)
    assert writer.close(timeout=10)
    assert committed.tokens == list(range(10))
    with pytest.raises(SpoolError, match="closed"):
        writer.submit(entry(10), 10)


def test_writer_closing_on_a_full_spool_abandons_unacknowledged_entries(path: Path) -> None:
    """close() on a full spool returns False and never reports the entries it could not commit."""
    with Spool(path, max_bytes=cost(entry(0))) as spool:
        spool.append_many([entry(0)])
        committed = Committed(spool)
        writer = SpoolWriter(spool, committed, max_batch=1000, max_delay_ms=60_000)
        writer.submit(entry(1), 1)
        assert not writer.close(timeout=10)
        assert committed.batches == []
        assert spool.depth == 1


def test_writer_checks_entries_in_the_callers_thread(spool: Spool) -> None:
    """A malformed entry, or one larger than the whole budget, raises from submit()."""
    with SpoolWriter(spool, Committed(spool)) as writer:
        with pytest.raises(TypeError):
            writer.submit(Entry(EXCHANGE, KEY, b"x", "not a dict"), 0)  # type: ignore[arg-type]
        with pytest.raises(SpoolFull):
            writer.submit(Entry(EXCHANGE, KEY, bytes(spool.max_bytes)), 1)
        assert writer.pending == 0


# -- SIGKILL ------------------------------------------------------------------------------------

#: Appends batches forever; prints each batch's ids only after append_many returned, and every
#: few batches deletes the oldest entries and prints "d" + their ids after delete returned.
CHILD = r"""
import sys
from bridge.spool import Entry, Spool

spool = Spool(sys.argv[1], durability=sys.argv[2])
seq = 0
while True:
    ids = spool.append_many([Entry("x", "k", b"m%d" % (seq + i)) for i in range(50)])
    seq += 50
    sys.stdout.write(" ".join(map(str, ids)) + "\n")
    sys.stdout.flush()
    if seq % 200 == 0:
        old = [item.id for item in spool.peek_oldest(60)]
        spool.delete(old)
        sys.stdout.write("d " + " ".join(map(str, old)) + "\n")
        sys.stdout.flush()
"""


@pytest.mark.parametrize("durability", ["fsync", "process"])
@pytest.mark.parametrize("run", range(3))
def test_sigkill_loses_no_committed_entry(tmp_path: Path, durability: str, run: int) -> None:
    """A writer SIGKILLed mid-stream loses no entry it reported committed, and revives no deleted one."""
    path = tmp_path / "killed.spool"
    lines_before_kill = 5 + 11 * run
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), durability],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as child:
        assert child.stdout is not None
        watchdog = threading.Timer(60, child.kill)
        watchdog.start()
        try:
            output = b"".join(child.stdout.readline() for _ in range(lines_before_kill))
            child.kill()  # SIGKILL, wherever the child is: most likely inside a commit
            output += child.stdout.read()
            child.wait()
        finally:
            watchdog.cancel()
        errors = child.stderr.read() if child.stderr else b""
    assert child.returncode == -9, errors.decode()
    complete = output.split(b"\n")[:-1]  # a line cut short by the kill is not a report
    committed: set[int] = set()
    deleted: set[int] = set()
    for line in complete:
        words = line.split()
        if words[:1] == [b"d"]:
            deleted.update(int(word) for word in words[1:])
        else:
            committed.update(int(word) for word in words)
    assert len(committed) >= 50 * (lines_before_kill // 2)

    with Spool(path, durability="process") as spool:
        present = {item.id: item for item in spool.peek_oldest(10**6)}
        assert spool.depth == len(present)
    assert not (committed - deleted) - present.keys(), "committed entries were lost"
    assert not deleted & present.keys(), "deleted entries came back"
    for entry_id, item in present.items():
        assert item.body == b"m%d" % (entry_id - 1)

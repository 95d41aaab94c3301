"""The core durable queue: both full policies, the schema check, fix-it errors, in-flight rows."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from iotpipe.durable_queue import (
    DurableQueue,
    Layout,
    PushBack,
    QueueError,
    QueueFull,
    Row,
    ThinOldest,
)
from iotpipe.errors import IotpipeError


class ItemError(QueueError):
    """The test layout's error: its messages start with "items"."""

    noun = "items"


class ItemsFull(QueueFull):
    """The test layout's full error."""

    noun = "items"


LAYOUT = Layout(
    noun="items",
    owner="test",
    table="items",
    columns=("size", "label"),
    peek_columns=("label",),
    schema=(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, size INTEGER NOT NULL, label TEXT NOT NULL)",
        "CREATE TABLE extra (value INTEGER NOT NULL)",
    ),
    application_id=0x74657374,
    schema_version=3,
    error=ItemError,
    full_error=ItemsFull,
    thin_columns=("label",),
    oldest_column="label",
)

SIZE = 100


def rows(*labels: int) -> list[Row]:
    """One row of SIZE accounted bytes per label."""
    return [(SIZE, f"n{label}") for label in labels]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    """Where the test's queue lives."""
    return tmp_path / "queue" / "items.db"


@pytest.fixture
def queue(path: Path) -> Iterator[DurableQueue]:
    """An empty push-back queue of ten rows' budget."""
    with DurableQueue(path, LAYOUT, max_bytes=10 * SIZE, durability="process") as opened:
        yield opened


# -- FIFO, in flight ----------------------------------------------------------------------------


def test_rows_come_out_oldest_first_once_each_until_released(queue: DurableQueue) -> None:
    """Peeks hand out each row once; released rows come back first; deleted rows are gone."""
    ids = queue.append(rows(0, 1, 2, 3)).ids
    assert ids == list(range(ids[0], ids[0] + 4))
    first = queue.peek_oldest(2)
    assert [row[0] for row in first] == ids[:2]
    assert first[0] == (ids[0], "n0", SIZE)  # id, peek columns, size
    assert [row[0] for row in queue.peek_oldest(10)] == ids[2:]
    assert queue.in_flight == 4
    queue.release([ids[1]])
    assert [row[0] for row in queue.peek_oldest(10)] == [ids[1]]
    assert queue.delete(ids[:2]) == 2
    assert queue.delete(ids[:2]) == 0
    assert (queue.depth, queue.bytes, queue.in_flight) == (2, 2 * SIZE, 2)
    queue.release_all()
    assert [row[0] for row in queue.peek_oldest(10)] == ids[2:]


def test_oldest_follows_appends_and_deletes(queue: DurableQueue) -> None:
    """oldest() reports the oldest row's column, None when empty."""
    assert queue.oldest() is None
    ids = queue.append(rows(5, 6)).ids
    assert queue.oldest() == "n5"
    queue.delete(ids[:1])
    assert queue.oldest() == "n6"
    queue.delete(ids[1:])
    assert queue.oldest() is None


def test_counts_survive_reopening(path: Path) -> None:
    """Depth, bytes and the next id are recounted from the file; nothing is in flight."""
    with DurableQueue(path, LAYOUT, max_bytes=10 * SIZE) as queue:
        ids = queue.append(rows(0, 1, 2)).ids
        queue.peek_oldest(3)
    with DurableQueue(path, LAYOUT, max_bytes=10 * SIZE) as queue:
        assert (queue.depth, queue.bytes, queue.in_flight) == (3, 3 * SIZE, 0)
        assert queue.append(rows(3)).ids == [ids[-1] + 1]


# -- push back ----------------------------------------------------------------------------------


def test_push_back_refuses_a_batch_that_does_not_fit_and_keeps_everything(
    queue: DurableQueue,
) -> None:
    """Under PushBack an over-budget batch raises the layout's full error and writes nothing."""
    queue.append(rows(*range(9)))
    with pytest.raises(ItemsFull) as refused:
        queue.append(rows(9, 10))
    assert isinstance(refused.value, QueueFull)
    assert (refused.value.needed, refused.value.free, refused.value.depth) == (2 * SIZE, SIZE, 9)
    assert str(refused.value).startswith("items full: ")
    assert queue.depth == 9
    assert len(queue.append(rows(9)).ids) == 1


def test_push_back_reports_a_full_disk_as_full(queue: DurableQueue) -> None:
    """SQLite's "disk full" under PushBack is back-pressure (disk=True), and rolls back."""
    queue.append(rows(0))
    pages = queue.read("test", lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
    queue.read("test", lambda conn: conn.execute(f"PRAGMA max_page_count={pages}"))
    with pytest.raises(ItemsFull) as refused:
        queue.append([(1, "x" * 5000) for _ in range(5)])
    assert refused.value.disk
    assert (queue.depth, queue.bytes) == (1, SIZE)


# -- thin the oldest ----------------------------------------------------------------------------


def test_thinning_drops_every_second_of_the_oldest_tenth_but_not_in_flight(path: Path) -> None:
    """Past the budget the 2nd, 4th... of the oldest 10 % not in flight go, in the same commit."""
    with DurableQueue(path, LAYOUT, max_bytes=100 * SIZE, policy=ThinOldest()) as queue:
        queue.append(rows(*range(100)))
        queue.peek_oldest(2)  # n0, n1 are in flight
        seen: list[list[Row]] = []
        appended = queue.append(rows(100), lambda _conn, thinned: seen.append(list(thinned)))
        assert [row[2] for row in appended.thinned] == ["n3", "n5", "n7", "n9", "n11"]
        assert all(row[1] == SIZE for row in appended.thinned)  # (id, size, *thin_columns)
        assert seen == [appended.thinned]
        assert (queue.depth, queue.bytes) == (96, 96 * SIZE)
        queue.release_all()
        kept = [row[1] for row in queue.peek_oldest(1000)]
        assert kept[:7] == ["n0", "n1", "n2", "n4", "n6", "n8", "n10"]
        assert kept[-1] == "n100"


def test_thinning_repeats_from_the_oldest_until_the_batch_fits(path: Path) -> None:
    """A batch bigger than one pass frees is still taken whole; the oldest row survives."""
    with DurableQueue(path, LAYOUT, max_bytes=50 * SIZE, policy=ThinOldest()) as queue:
        queue.append(rows(*range(50)))
        appended = queue.append(rows(*range(50, 70)))
        assert len(appended.thinned) == 20
        assert queue.bytes <= 50 * SIZE
        kept = [row[1] for row in queue.peek_oldest(1000)]
        assert kept[0] == "n0"
        assert kept[-20:] == [f"n{n}" for n in range(50, 70)]


def test_thinning_stops_when_only_rows_in_flight_are_left(path: Path) -> None:
    """With everything in flight nothing is thinned: the queue goes over budget instead."""
    with DurableQueue(path, LAYOUT, max_bytes=3 * SIZE, policy=ThinOldest()) as queue:
        queue.append(rows(0, 1, 2))
        queue.peek_oldest(3)
        appended = queue.append(rows(3))
        assert appended.thinned == []
        assert queue.bytes == 4 * SIZE


def test_thinning_reports_a_full_disk_as_an_error(path: Path) -> None:
    """Under ThinOldest "disk full" is an error of the layout (no back-pressure to apply)."""
    with DurableQueue(path, LAYOUT, max_bytes=10**9, policy=ThinOldest()) as queue:
        pages = queue.read("test", lambda conn: conn.execute("PRAGMA page_count").fetchone()[0])
        queue.read("test", lambda conn: conn.execute(f"PRAGMA max_page_count={pages}"))
        with pytest.raises(ItemError, match="append failed: the disk is full"):
            queue.append([(1, "x" * 5000) for _ in range(5)])
        assert queue.depth == 0


# -- transactions -------------------------------------------------------------------------------


def test_a_failing_also_rolls_back_the_append(queue: DurableQueue) -> None:
    """The caller's work in the same transaction fails: the rows are not committed either."""

    def broken(conn: sqlite3.Connection, _thinned: list[Row]) -> None:
        conn.execute("INSERT INTO missing VALUES (1)")

    with pytest.raises(ItemError, match="append failed: no such table"):
        queue.append(rows(0), broken)
    assert queue.depth == 0
    assert queue.peek_oldest(10) == []


def test_transaction_commits_the_callers_tables_and_counts_commits(queue: DurableQueue) -> None:
    """transaction() runs work in one commit and returns its result; read() sees it."""
    before = queue.commits
    result = queue.transaction("extra", lambda conn: conn.execute("INSERT INTO extra VALUES (7)"))
    assert result.rowcount == 1
    assert queue.commits == before + 1
    total = queue.read("extra", lambda conn: conn.execute("SELECT sum(value) FROM extra"))
    assert total.fetchone()[0] == 7


# -- opening and errors -------------------------------------------------------------------------


def test_a_new_file_carries_the_layouts_identity(queue: DurableQueue, path: Path) -> None:
    """An empty file gets the layout's application_id and user_version."""
    queue.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA application_id").fetchone()[0] == LAYOUT.application_id
        assert raw.execute("PRAGMA user_version").fetchone()[0] == LAYOUT.schema_version
    raw.close()


def test_the_page_cache_is_the_layouts_or_sqlites_default(path: Path) -> None:
    """A layout's cache_kib caps the connection's page cache; without one SQLite's default holds."""

    def cache_size(conn: sqlite3.Connection) -> int:
        return int(conn.execute("PRAGMA cache_size").fetchone()[0])

    small = LAYOUT._replace(cache_kib=256)
    with DurableQueue(path, small, max_bytes=10 * SIZE, durability="process") as queue:
        assert queue.read("test", cache_size) == -256
    with DurableQueue(path, LAYOUT, max_bytes=10 * SIZE, durability="process") as queue:
        assert queue.read("test", cache_size) == -2000


def test_a_file_from_a_newer_version_is_refused(path: Path) -> None:
    """A file whose user_version is above the layout's is refused with a clear message."""
    DurableQueue(path, LAYOUT, max_bytes=SIZE).close()
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version=4")
    raw.close()
    with pytest.raises(ItemError, match=r"newer iotpipe \(items schema 4, this one reads 3\)"):
        DurableQueue(path, LAYOUT, max_bytes=SIZE)


def test_another_applications_file_is_refused_unchanged(path: Path) -> None:
    """An SQLite file with another application_id is not taken for a queue."""
    path.parent.mkdir(parents=True)
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE readings (ts INTEGER)")
    raw.close()
    with pytest.raises(ItemError, match="not an iotpipe items; choose another path"):
        DurableQueue(path, LAYOUT, max_bytes=SIZE)
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA application_id").fetchone()[0] == 0
    raw.close()


def test_errors_are_one_line_with_advice(path: Path) -> None:
    """In use, corrupt, and closed each give one line naming the path and what to do."""
    with DurableQueue(path, LAYOUT, max_bytes=SIZE), pytest.raises(ItemError) as busy:
        DurableQueue(path, LAYOUT, max_bytes=SIZE, lock_timeout=0.05)
    assert "in use by another process (only one test may own an items)" in str(busy.value)
    corrupt = path.with_name("corrupt.db")
    corrupt.write_bytes(b"not a database " * 300)
    with pytest.raises(ItemError, match="corrupt or not an SQLite file") as broken:
        DurableQueue(corrupt, LAYOUT, max_bytes=SIZE)
    assert "move it aside to start an empty items" in str(broken.value)
    closed = DurableQueue(path, LAYOUT, max_bytes=SIZE)
    closed.close()
    with pytest.raises(ItemError, match="is closed"):
        closed.peek_oldest(1)
    for error in (busy.value, broken.value):
        assert isinstance(error, IotpipeError)
        assert error.exit_code == 2
        assert str(path.parent) in str(error)
        assert "\n" not in str(error)


def test_bad_arguments_raise_value_error(path: Path) -> None:
    """The core names no settings: bad arguments are programming errors."""
    for kwargs in ({"max_bytes": 0}, {"max_bytes": True}, {"reclaim_above": -1}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            DurableQueue(path, LAYOUT, **{"max_bytes": SIZE, **kwargs})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="durability"):
        DurableQueue(path, LAYOUT, max_bytes=SIZE, durability="never")  # type: ignore[arg-type]


def test_the_policy_defaults_to_push_back(queue: DurableQueue) -> None:
    """Without a policy the queue never deletes data to make room."""
    assert queue.policy == PushBack()

"""The edge outbox: group commits, order, delete on acknowledgement, budget, counter."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import pytest

from edge.outbox import ROW_OVERHEAD, FillRate, Outbox, OutboxError, Pending

TOPIC = "iotpipe/v1/s/d/telemetry"


def pending(seq: int, size: int = 100, readings: int = 3) -> Pending:
    return Pending(TOPIC, b"x" * size, seq, readings, 1_000_000 + seq)


def accounted(size: int = 100) -> int:
    return size + len(TOPIC) + ROW_OVERHEAD


def test_a_group_is_one_commit_and_survives_reopening(tmp_path: Path) -> None:
    """Fifty envelopes appended together take one transaction and are all there after reopen."""
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        outbox.counter("boot-a")
        before = outbox.commits
        ids = outbox.append([pending(seq) for seq in range(50)])
        assert outbox.commits == before + 1
        assert ids == list(range(ids[0], ids[0] + 50))
    with Outbox(path) as outbox:
        assert outbox.depth == 50
        assert outbox.bytes == 50 * accounted()
        assert [entry.seq for entry in outbox.peek_oldest(100)] == list(range(50))


def test_peek_is_oldest_first_and_delete_only_removes_acknowledged(tmp_path: Path) -> None:
    """Entries come out in commit order, each once, and stay until deleted."""
    with Outbox(tmp_path / "outbox.db") as outbox:
        outbox.append([pending(seq) for seq in range(10)])
        first = outbox.peek_oldest(4)
        second = outbox.peek_oldest(4)
        assert [e.seq for e in first] == [0, 1, 2, 3]
        assert [e.seq for e in second] == [4, 5, 6, 7]
        assert outbox.in_flight == 8
        assert outbox.delete(e.id for e in first) == 4
        assert outbox.delete(e.id for e in first) == 0  # twice is harmless
        outbox.release_all()  # e.g. the connection was lost before the PUBACKs
        assert [e.seq for e in outbox.peek_oldest(100)] == [4, 5, 6, 7, 8, 9]
        assert outbox.depth == 6
        assert outbox.bytes == 6 * accounted()
        assert outbox.oldest_created_ms == 1_000_004


def test_counter_continues_across_reopen_and_restarts_with_a_new_boot(tmp_path: Path) -> None:
    """The next seq is committed with the envelopes; a new kernel boot starts a new counter."""
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        counter = outbox.counter("11111111-2222-3333-4444-555555555555")
        assert counter.next_seq == 0
        assert counter.boot.startswith("1111111122223333-")
        outbox.append([pending(0), pending(1), pending(2)])
    with Outbox(path) as outbox:
        again = outbox.counter("11111111-2222-3333-4444-555555555555")
        assert again == type(counter)(counter.boot, 3)
        rebooted = outbox.counter("99999999-2222-3333-4444-555555555555")
        assert rebooted.next_seq == 0
        assert rebooted.boot != counter.boot
    # A wiped state directory mints a new label even within the same kernel boot.
    with Outbox(tmp_path / "other.db") as fresh:
        assert fresh.counter("11111111-2222-3333-4444-555555555555").boot != counter.boot


def test_a_full_budget_thins_every_second_of_the_oldest_tenth(tmp_path: Path) -> None:
    """Past the budget, the 2nd, 4th... of the oldest 10 % go; the newest and in-flight stay."""
    budget = 100 * accounted()
    path = tmp_path / "outbox.db"
    with Outbox(path, max_bytes=budget) as outbox:
        outbox.append([pending(seq) for seq in range(100)])
        in_flight = outbox.peek_oldest(2)  # seq 0, 1 are being published
        outbox.append([pending(100)])
        # Candidates: the oldest 10 % not in flight: seq 2..11; every second one goes.
        assert outbox.dropped_envelopes == 5
        assert outbox.dropped_readings == 15
        assert outbox.depth == 96
        assert outbox.bytes <= budget
        outbox.release_all()
        seqs = [e.seq for e in outbox.peek_oldest(1000)]
        assert seqs[:8] == [0, 1, 2, 4, 6, 8, 10, 12]
        assert seqs[-1] == 100
        assert {e.seq for e in in_flight} <= set(seqs)
    with Outbox(path, max_bytes=budget) as outbox:
        assert outbox.dropped_envelopes == 5  # persisted


def test_a_batch_bigger_than_a_pass_thins_repeatedly(tmp_path: Path) -> None:
    """Passes repeat until the new envelopes fit, and the new ones are all kept."""
    budget = 50 * accounted()
    with Outbox(tmp_path / "outbox.db", max_bytes=budget) as outbox:
        outbox.append([pending(seq) for seq in range(50)])
        outbox.append([pending(seq) for seq in range(50, 70)])
        seqs = [e.seq for e in outbox.peek_oldest(1000)]
        assert seqs[-20:] == list(range(50, 70))
        assert outbox.bytes <= budget
        assert outbox.dropped_envelopes == 50 + 20 - len(seqs)
        assert seqs[0] == 0  # the start of the outage stays visible


def test_a_second_process_cannot_open_the_outbox(tmp_path: Path) -> None:
    """Only one agent owns an outbox file."""
    path = tmp_path / "outbox.db"
    with Outbox(path) as outbox:
        outbox.append([pending(0)])
        with pytest.raises(OutboxError, match="in use"):
            Outbox(path, lock_timeout=0.1)


def test_another_sqlite_file_is_refused(tmp_path: Path) -> None:
    """A database that is not an outbox is not used as one."""
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    with pytest.raises(OutboxError, match="not an iotpipe outbox"):
        Outbox(path)


def test_fill_rate_estimates_time_until_full() -> None:
    """Free bytes divided by the recent net growth; infinite while not growing."""
    rate = FillRate(window=100.0)
    assert rate.seconds_until_full(1000) == math.inf
    rate.observe(0.0, 0)
    rate.observe(10.0, 1000)  # 100 B/s
    assert rate.seconds_until_full(5000) == pytest.approx(50.0)
    rate.observe(20.0, 500)  # draining faster than filling over the window
    assert rate.seconds_until_full(5000) == pytest.approx(200.0)
    rate.observe(200.0, 0)
    assert rate.seconds_until_full(5000) == math.inf


#: An outbox file exactly as the agent before the shared durable queue wrote it.
OLD_OUTBOX = (
    "PRAGMA journal_mode=WAL",
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
    "PRAGMA application_id=1768911973",  # 0x696F7465, "iote"
    "PRAGMA user_version=1",
)


def test_an_outbox_written_by_the_earlier_agent_opens_and_continues(tmp_path: Path) -> None:
    """A file from before the shared queue keeps its envelopes, counter and drop counts."""
    path = tmp_path / "outbox.db"
    raw = sqlite3.connect(path, isolation_level=None)
    for statement in OLD_OUTBOX:
        raw.execute(statement)
    raw.executemany(
        "INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?)",
        [(n + 1, 1_000_000 + n, n, 3, accounted(), TOPIC, b"x" * 100) for n in range(5)],
    )
    raw.executemany(
        "INSERT INTO meta VALUES (?, ?)",
        [
            ("kernel_boot", "k1"),
            ("boot", "abcd-0001"),
            ("next_seq", "5"),
            ("dropped_envelopes", "7"),
            ("dropped_readings", "21"),
        ],
    )
    raw.close()
    with Outbox(path) as outbox:
        assert (outbox.depth, outbox.bytes) == (5, 5 * accounted())
        assert (outbox.dropped_envelopes, outbox.dropped_readings) == (7, 21)
        assert outbox.counter("k1") == type(outbox.counter("k1"))("abcd-0001", 5)
        assert outbox.oldest_created_ms == 1_000_000
        assert [entry.seq for entry in outbox.peek_oldest(10)] == [0, 1, 2, 3, 4]
        assert outbox.append([pending(5)]) == [6]


def test_an_outbox_from_a_newer_agent_is_refused(tmp_path: Path) -> None:
    """A file with a newer schema version is refused instead of misread."""
    path = tmp_path / "outbox.db"
    Outbox(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version=2")
    raw.close()
    with pytest.raises(OutboxError, match="newer iotpipe"):
        Outbox(path)

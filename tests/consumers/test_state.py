"""StateDB: dedupe, completeness, sensor type pinning, registry, retention and SQLite errors."""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from consumers.state import SCHEMA_VERSION, StateDB
from consumers.store import DeviceStatus, Message, Reading, StoreUnavailable, Value, WriteResult
from iotpipe.errors import ConfigError

T0 = 1_764_144_000_000  # 2025-11-26T08:00:00Z


def msg(
    seq: int,
    *,
    id: str | None = None,
    device: str = "pi-1",
    boot: str = "b1",
    site: str = "home",
    values: dict[str, Value] | None = None,
    tags: dict[str, str] | None = None,
) -> Message:
    """A telemetry message with one reading per sensor, at T0 + seq seconds."""
    readings = tuple(
        Reading(sensor, T0 + seq * 1000, value, "Cel" if sensor == "temperature" else None)
        for sensor, value in (values or {"temperature": 20.0 + seq}).items()
    )
    return Message(
        id=id or f"{site}-{device}-{boot}-{seq}",
        site=site,
        device=device,
        seq=seq,
        boot=boot,
        readings=readings,
        tags=tags or {},
    )


def record(state: StateDB, messages: list[Message], now_ms: int = T0) -> WriteResult:
    """Run unseen + record in one transaction, as a store does."""
    result = WriteResult()
    with state.transaction() as conn:
        new, duplicates = state.unseen(conn, messages)
        state.record(
            conn, [messages[i] for i in new], [messages[i] for i in duplicates], result, now_ms
        )
    return result


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateDB]:
    db = StateDB(tmp_path / "state" / "state.db", busy_timeout_s=1.0)
    yield db
    db.close()


def stream_row(path: Path, device: str = "pi-1", boot: str = "b1") -> tuple[int, ...]:
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT first_seq, max_seq, messages, out_of_order, duplicates FROM streams"
            " WHERE device = ? AND boot = ?",
            (device, boot),
        ).fetchone()
    conn.close()
    return tuple(row)


def test_creates_directories_and_schema_version(tmp_path: Path) -> None:
    """A new file gets its parent directories, WAL mode and schema_version 1."""
    path = tmp_path / "a" / "b" / "state.db"
    StateDB(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    version = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]
    assert version == str(SCHEMA_VERSION)
    conn.close()


def test_unseen_finds_duplicates_within_a_batch(state: StateDB) -> None:
    """An id repeated inside one batch is new once, then a duplicate."""
    batch = [msg(0), msg(1), msg(0), msg(2), msg(1)]
    with state.transaction() as conn:
        assert state.unseen(conn, batch) == ([0, 1, 3], [2, 4])


def test_dedupe_across_batches_and_reopen(tmp_path: Path) -> None:
    """Ids recorded in one batch are duplicates in the next, also after reopening the file."""
    path = tmp_path / "state.db"
    first = StateDB(path)
    assert record(first, [msg(0), msg(1)]).messages == 2
    result = record(first, [msg(1), msg(2)])
    assert (result.messages, result.duplicates) == (1, 1)
    first.close()
    again = StateDB(path)
    result = record(again, [msg(0), msg(1), msg(2), msg(3)])
    again.close()
    assert (result.messages, result.duplicates, result.readings) == (1, 3, 1)


def test_completeness_worked_example(state: StateDB) -> None:
    """seq 0,1,2,5,3 then a copy of 2: 1 gap (4), 1 out of order (3), 1 duplicate."""
    first = record(state, [msg(0), msg(1), msg(2), msg(5)])
    second = record(state, [msg(3), msg(2)])
    assert first.out_of_order == 0
    assert (second.messages, second.out_of_order, second.duplicates) == (1, 1, 1)
    first_seq, max_seq, messages, out_of_order, duplicates = stream_row(state.path)
    assert (first_seq, max_seq, messages, out_of_order, duplicates) == (0, 5, 5, 1, 1)
    assert (max_seq - first_seq + 1) - messages == 1  # seq 4 is missing


def test_out_of_order_within_one_batch(state: StateDB) -> None:
    """A lower seq after a higher one in the same batch is out of order."""
    assert record(state, [msg(7), msg(6), msg(8)]).out_of_order == 1
    assert stream_row(state.path)[:2] == (6, 8)


def test_each_boot_is_its_own_stream(state: StateDB) -> None:
    """A new boot restarting at seq 0 is not out of order and has its own counters."""
    record(state, [msg(10), msg(11)])
    result = record(state, [msg(0, boot="b2"), msg(1, boot="b2")])
    assert result.out_of_order == 0
    assert stream_row(state.path, boot="b2") == (0, 1, 2, 0, 0)


def test_record_reports_ids_recorded_meanwhile(tmp_path: Path) -> None:
    """An id another process recorded between unseen and record comes back as a duplicate."""
    path = tmp_path / "state.db"
    mine, other = StateDB(path), StateDB(path)
    batch = [msg(0), msg(1)]
    with mine.transaction() as conn:
        new, _ = mine.unseen(conn, batch)
    assert new == [0, 1]
    record(other, [msg(1)])
    result = WriteResult()
    with mine.transaction() as conn:
        late = mine.record(conn, batch, [], result, T0)
    mine.close()
    other.close()
    assert late == [1]
    assert (result.messages, result.duplicates, result.readings) == (1, 1, 1)
    assert stream_row(path)[2:] == (2, 1, 1)  # seq 0 came after seq 1: out of order


def test_sensor_type_is_pinned_to_the_first(
    state: StateDB, caplog: pytest.LogCaptureFixture
) -> None:
    """Number then strings: counted as type changes, logged once, never an error."""
    with caplog.at_level(logging.WARNING, logger="consumers.state"):
        record(state, [msg(0, values={"mode-pin": 1.5})])
        first = record(state, [msg(1, values={"mode-pin": "eco"})])
        second = record(state, [msg(2, values={"mode-pin": "off"}), msg(3, values={"mode-pin": 2})])
    assert (first.type_changes, second.type_changes) == (1, 1)
    warnings = [r for r in caplog.records if "mode-pin" in r.getMessage()]
    assert len(warnings) == 1
    conn = sqlite3.connect(state.path)
    row = conn.execute(
        "SELECT kind, type_changes FROM sensors WHERE sensor = 'mode-pin'"
    ).fetchone()
    conn.close()
    assert row == ("number", 2)


def test_boolean_is_not_a_number(state: StateDB) -> None:
    """true after a number is a type change (bool is an int in Python, not in the contract)."""
    record(state, [msg(0, values={"relay-kind": 0})])
    assert record(state, [msg(1, values={"relay-kind": True})]).type_changes == 1


def test_status_newer_wins(state: StateDB) -> None:
    """Only a status with a newer ts replaces the state; redelivery and reordering change nothing."""

    def apply(*statuses: DeviceStatus) -> tuple[str, int, str]:
        with state.transaction() as conn:
            state.update_devices(conn, statuses)
            row = conn.execute("SELECT state, state_ts_ms, agent FROM devices").fetchone()
        return tuple(row)

    online = DeviceStatus("home", "pi-1", "online", T0 + 200, "edge/1.0")
    assert apply(online) == ("online", T0 + 200, "edge/1.0")
    assert apply(DeviceStatus("home", "pi-1", "offline", T0 + 100, "edge/0.9")) == apply(online)
    offline = DeviceStatus("home", "pi-1", "offline", T0 + 300, "edge/1.0")
    assert apply(offline, online) == ("offline", T0 + 300, "edge/1.0")


def test_last_seen_is_the_latest_reading_time(state: StateDB) -> None:
    """Telemetry sets last_seen_ms to its latest reading time, never moving it back."""
    record(state, [msg(5), msg(2)])
    record(state, [msg(1)])
    conn = sqlite3.connect(state.path)
    assert conn.execute("SELECT last_seen_ms FROM devices").fetchone()[0] == T0 + 5000
    conn.close()


def test_prune_forgets_ids_past_retention(tmp_path: Path) -> None:
    """prune drops ids stored before now - retention; a pruned id is new again."""
    state = StateDB(tmp_path / "state.db", retention_ms=1000)
    record(state, [msg(0)], now_ms=T0)
    record(state, [msg(1)], now_ms=T0 + 600)
    assert state.prune(T0 + 1500) == 1
    assert state.prune(T0 + 1500) == 0
    with state.transaction() as conn:
        assert state.unseen(conn, [msg(0), msg(1)]) == ([0], [1])
    state.close()


def test_locked_file_is_unavailable(state: StateDB) -> None:
    """A writer holding the lock past busy_timeout gives StoreUnavailable, not a hang or crash."""
    slow = StateDB(state.path, busy_timeout_s=0.05)
    blocker = sqlite3.connect(state.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreUnavailable, match="locked"), slow.transaction():
            pass
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with slow.transaction():  # usable again once the lock is gone
        pass
    slow.close()


def test_error_in_transaction_rolls_back(state: StateDB) -> None:
    """An exception inside transaction() leaves nothing of the transaction behind."""

    def fail_midway() -> None:
        with state.transaction() as conn:
            state.record(conn, [msg(0)], [], WriteResult(), T0)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_midway()
    with state.transaction() as conn:
        assert state.unseen(conn, [msg(0)]) == ([0], [])


def _unprivileged(attempt: Callable[[], str]) -> str:
    """Run ``attempt`` as an unprivileged user (root ignores file permissions)."""
    if os.geteuid() != 0:
        return attempt()
    ctx = multiprocessing.get_context("fork")
    answer = ctx.SimpleQueue()

    def child() -> None:
        os.setgid(65534)
        os.setuid(65534)  # nobody
        answer.put(attempt())

    proc = ctx.Process(target=child)
    proc.start()
    proc.join(30)
    return str(answer.get()) if not answer.empty() else f"child exit {proc.exitcode}"


def _open_and_write(path: Path) -> str:
    """Open a StateDB at ``path`` and record one message; say what happened."""
    try:
        state = StateDB(path, busy_timeout_s=0.1)
        try:
            record(state, [msg(99)])
        finally:
            state.close()
    except StoreUnavailable as err:
        return f"StoreUnavailable: {err}"
    return "written"


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory anyone may traverse (tmp_path's parents are private to the test's user)."""
    path = Path(tempfile.mkdtemp(prefix="iotpipe-state-"))
    path.chmod(0o755)
    yield path
    path.chmod(0o755)
    shutil.rmtree(path)


def test_read_only_directory_is_unavailable(public_dir: Path) -> None:
    """A directory without write permission gives StoreUnavailable naming the file."""
    public_dir.chmod(0o555)
    outcome = _unprivileged(lambda: _open_and_write(public_dir / "sub" / "state.db"))
    assert outcome.startswith("StoreUnavailable: ")
    assert "state.db" in outcome
    outcome = _unprivileged(lambda: _open_and_write(public_dir / "state.db"))
    assert outcome.startswith("StoreUnavailable: ")


def test_read_only_file_is_unavailable(public_dir: Path) -> None:
    """A store file without write permission gives StoreUnavailable, not a crash."""
    path = public_dir / "state.db"
    StateDB(path).close()
    path.chmod(0o444)
    public_dir.chmod(0o555)
    outcome = _unprivileged(lambda: _open_and_write(path))
    assert outcome.startswith("StoreUnavailable: "), outcome


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    """A file written by a newer iotpipe is refused with a clear ConfigError."""
    path = tmp_path / "state.db"
    StateDB(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"UPDATE meta SET value = '{SCHEMA_VERSION + 1}' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(ConfigError, match="newer iotpipe"):
        StateDB(path)


@pytest.mark.parametrize("kind", ["foreign-sqlite", "text"])
def test_foreign_file_is_refused(tmp_path: Path, kind: str) -> None:
    """Another application's SQLite file, or a text file, is not taken over."""
    path = tmp_path / "other.db"
    if kind == "text":
        path.write_text("hello, this is not a database\n" * 100)
    else:
        conn = sqlite3.connect(path)
        conn.execute("CREATE TABLE invoices (id INTEGER)")
        conn.close()
    with pytest.raises(ConfigError, match="not an iotpipe"):
        StateDB(path)

"""Rollups and the live feed of the SQLite store: exactly the raw readings' aggregates, always."""

from __future__ import annotations

import logging
import random
import sqlite3
from pathlib import Path

import pytest

from consumers import sqlite_store
from consumers.sqlite_store import ROLLUPS, SQLiteStore
from consumers.state import SCHEMA_VERSION
from consumers.store import Message, Reading, Value
from tests.consumers.test_state import T0

Aggregates = dict[tuple[str, str, str, int], tuple[int, float, float, float]]


def rollup(path: Path, table: str) -> Aggregates:
    """A rollup table's rows by key."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            f"SELECT site, device, sensor, bucket_ms, n, sum, min, max FROM {table}"
        ).fetchall()
    conn.close()
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}  # type: ignore[misc]


def brute_force(path: Path, width: int) -> Aggregates:
    """The same aggregates by GROUP BY over the raw readings (numbers, booleans as 0/1)."""
    with sqlite3.connect(path) as conn:
        rows = conn.execute(
            "SELECT site, device, sensor, ts_ms - ts_ms % ? AS b, count(*), sum(v), min(v), max(v)"
            " FROM (SELECT *, coalesce(value_num, value_bool) AS v FROM readings)"
            " WHERE v IS NOT NULL GROUP BY site, device, sensor, b",
            (width,),
        ).fetchall()
    conn.close()
    return {tuple(row[:4]): tuple(row[4:]) for row in rows}  # type: ignore[misc]


def assert_rollups_match(path: Path) -> None:
    for table, width in ROLLUPS.items():
        assert rollup(path, table) == brute_force(path, width), table


def random_message(rng: random.Random, n: int) -> Message:
    """A message of 1-4 readings, numbers (exact quarters, so sums are exact), booleans, strings."""
    device = rng.choice(["pi-1", "pi-2", "pi-3"])
    ts = T0 + rng.randrange(0, 3 * 3_600_000, 250)  # three hours: minute and hour boundaries
    values: dict[str, Value] = {
        "temperature": rng.randint(-400, 400) / 4,
        "count": rng.randint(0, 10),
        "door": rng.random() < 0.3,
        "mode": rng.choice(["eco", "boost"]),
    }
    chosen = rng.sample(sorted(values), rng.randint(1, 4))
    readings = tuple(Reading(s, ts, values[s], None) for s in chosen)
    return Message(id=f"m{n}", site="home", device=device, seq=n, boot="b", readings=readings)


@pytest.mark.parametrize("seed", range(5))
def test_rollups_equal_group_by_after_random_batches_with_duplicates(
    tmp_path: Path, seed: int
) -> None:
    """Batches with redelivered ids and re-minted copies leave rollups equal to a GROUP BY."""
    rng = random.Random(seed)
    store = SQLiteStore(tmp_path / "t.db")
    sent: list[Message] = []
    for batch_no in range(30):
        batch: list[Message] = []
        for _ in range(rng.randint(1, 40)):
            roll = rng.random()
            if sent and roll < 0.2:
                batch.append(rng.choice(sent))  # a redelivery: same id
            elif sent and roll < 0.3:
                copy = rng.choice(sent)  # the same readings under a new id
                batch.append(
                    Message(
                        f"{copy.id}-again-{batch_no}",
                        copy.site,
                        copy.device,
                        copy.seq,
                        copy.boot,
                        copy.readings,
                    )
                )
            else:
                batch.append(random_message(rng, len(sent) + len(batch) + 1000 * batch_no))
        store.write(batch, [])
        sent.extend(batch)
        assert_rollups_match(store.path)
    store.close()


def test_write_result_counts_readings_not_rollup_rows(tmp_path: Path) -> None:
    """WriteResult.readings counts inserted readings only, not the triggers' rollup rows."""
    store = SQLiteStore(tmp_path / "t.db")
    first = Message(
        "a", "home", "pi", 0, "b", (Reading("t", T0, 1.5, None), Reading("u", T0, 2, None))
    )
    again = Message("b", "home", "pi", 1, "b", first.readings)  # same keys, another id
    assert store.write([first], []).readings == 2
    assert store.write([again], []).readings == 0
    store.close()
    assert sum(row[0] for row in rollup(store.path, "rollup_1m").values()) == 2


def test_booleans_roll_up_as_zero_and_one(tmp_path: Path) -> None:
    """Three true and one false in a minute: n 4, sum 3 (mean 0.75), min 0, max 1."""
    store = SQLiteStore(tmp_path / "t.db")
    flags = [True, False, True, True]
    store.write(
        [
            Message(f"m{i}", "home", "pi", i, "b", (Reading("door", T0 + i * 1000, flag, None),))
            for i, flag in enumerate(flags)
        ],
        [],
    )
    store.close()
    for table in ROLLUPS:
        assert list(rollup(store.path, table).values()) == [(4, 3.0, 0.0, 1.0)]


def test_strings_are_not_rolled_up(tmp_path: Path) -> None:
    """String readings are stored but add no rollup row."""
    store = SQLiteStore(tmp_path / "t.db")
    store.write([Message("m", "home", "pi", 0, "b", (Reading("mode", T0, "eco", None),))], [])
    store.close()
    for table in ROLLUPS:
        assert rollup(store.path, table) == {}


def test_large_batch_with_refused_readings_rolls_up_only_the_inserted(tmp_path: Path) -> None:
    """A batch the writer aggregates itself counts a key stored before, or twice in it, once."""
    store = SQLiteStore(tmp_path / "t.db")
    first = [
        Message(f"a{i}", "home", "pi", i, "b", (Reading("t", T0 + i * 1000, i / 4, None),))
        for i in range(10)
    ]
    store.write(first, [])
    # 30 readings: 10 keys already stored (new ids), 10 new ones, each of those twice.
    again = [Message(f"b{m.seq}", m.site, m.device, m.seq, m.boot, m.readings) for m in first]
    fresh = [
        Message(f"c{i}", "home", "pi", 100 + i, "b", (Reading("t", T0 + 90_000 + i, 9.0, None),))
        for i in range(10)
    ]
    twice = [Message(f"d{m.seq}", m.site, m.device, m.seq, m.boot, m.readings) for m in fresh]
    assert len(again + fresh + twice) >= sqlite_store._BATCH_ROLLUP_ROWS
    assert store.write([*again, *fresh, *twice], []).readings == 10
    store.close()
    assert_rollups_match(store.path)
    assert sum(row[0] for row in rollup(store.path, "rollup_1h").values()) == 20


def test_rows_inserted_by_an_older_writer_are_rolled_up_by_the_trigger(tmp_path: Path) -> None:
    """Readings another writer inserts without aggregating (an older iotpipe) still count."""
    rng = random.Random(11)
    store = SQLiteStore(tmp_path / "t.db")
    store.write([random_message(rng, n) for n in range(100)], [])
    with sqlite3.connect(store.path) as conn:  # as an older iotpipe writes: rows only
        conn.executemany(
            sqlite_store._INSERT_READING,
            sqlite_store.reading_rows([random_message(rng, n) for n in range(100, 200)]),
        )
    conn.close()
    store.write([random_message(rng, n) for n in range(200, 300)], [])
    store.close()
    assert_rollups_match(store.path)
    with sqlite3.connect(store.path) as conn:
        marks = conn.execute("SELECT count(*) FROM meta WHERE key = 'rollups_by_writer'")
        assert marks.fetchone() == (0,)  # the mark never outlives a transaction
    conn.close()


def test_a_trigger_written_before_is_replaced_on_open(tmp_path: Path) -> None:
    """A store whose trigger counts every row is given the new one: no reading counted twice."""
    rng = random.Random(5)
    path = tmp_path / "t.db"
    store = SQLiteStore(path)
    store.write([random_message(rng, n) for n in range(100)], [])
    store.close()
    old = sqlite_store._ROLLUP_TRIGGER.replace(
        " AND NOT EXISTS (SELECT 1 FROM meta WHERE key = 'rollups_by_writer')", ""
    )
    assert old != sqlite_store._ROLLUP_TRIGGER
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TRIGGER readings_rollup")
        conn.execute(old)
    conn.close()
    store = SQLiteStore(path)
    store.write([random_message(rng, n) for n in range(100, 300)], [])
    store.close()
    assert_rollups_match(path)


def make_v1(path: Path, messages: list[Message]) -> None:
    """A schema version 1 store holding ``messages``: no rollups, no feed, no triggers."""
    store = SQLiteStore(path)
    store.write(messages, [])
    store.close()
    with sqlite3.connect(path) as conn:
        for trigger in ("readings_rollup", "readings_feed"):
            conn.execute(f"DROP TRIGGER {trigger}")
        for table in (*ROLLUPS, "readings_feed"):
            conn.execute(f"DROP TABLE {table}")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.close()


def test_version_1_store_is_migrated_on_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Opening a v1 store backfills the rollups, logs the time taken and sets version 2."""
    rng = random.Random(7)
    path = tmp_path / "v1.db"
    make_v1(path, [random_message(rng, n) for n in range(500)])
    with caplog.at_level(logging.INFO, logger="consumers.sqlite_store"):
        store = SQLiteStore(path)
    assert any("migrated" in r.message and "seconds=" in r.message for r in caplog.records)
    assert_rollups_match(path)
    # Writes after the migration keep them exact.
    store.write([random_message(rng, n) for n in range(500, 700)], [])
    store.close()
    assert_rollups_match(path)
    with sqlite3.connect(path) as conn:
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    conn.close()
    assert version == (str(SCHEMA_VERSION),)
    assert SCHEMA_VERSION == 2


def test_reopening_a_migrated_store_does_not_backfill_again(tmp_path: Path) -> None:
    """A second open finds the rollups and leaves them alone (no double counting)."""
    rng = random.Random(3)
    path = tmp_path / "v1.db"
    make_v1(path, [random_message(rng, n) for n in range(100)])
    SQLiteStore(path).close()
    SQLiteStore(path).close()
    assert_rollups_match(path)


def test_feed_numbers_inserted_readings_and_keeps_the_latest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each inserted reading gets the next feed number; refused copies none; old ones are pruned."""
    monkeypatch.setattr(sqlite_store, "FEED_KEEP", 10)
    store = SQLiteStore(tmp_path / "t.db")
    batch = [
        Message(f"m{i}", "home", "pi", i, "b", (Reading("t", T0 + i, 1.0, None),))
        for i in range(25)
    ]
    store.write(batch[:8], [])
    store.write(batch, [])  # 8 duplicates, 17 new
    store.write(batch, [])  # nothing new
    store.close()
    with sqlite3.connect(store.path) as conn:
        rows = conn.execute("SELECT seq, ts_ms FROM readings_feed ORDER BY seq").fetchall()
    conn.close()
    assert [seq for seq, _ in rows] == list(range(16, 26))  # the latest FEED_KEEP
    assert [ts - T0 for _, ts in rows] == list(range(15, 25))

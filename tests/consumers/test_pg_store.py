"""The PostgreSQL store against the running server: what it stores, how racing hosts agree.

The module works in a database of its own on the shared server (127.0.0.1:5432), created for it
and dropped afterwards; each test writes its own site, so tests never see each other's rows.
"""

from __future__ import annotations

import json
import random
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest

from consumers.pg_store import PG_SCHEMA_VERSION, PostgresStore, connect_readonly, month_range
from consumers.query import DeviceStats, iter_readings, store_stats
from consumers.settings import PostgresTarget, parse_store
from consumers.sqlite_store import SQLiteStore
from consumers.store import DeviceStatus, Message, StoreUnavailable, WriteResult
from iotpipe.errors import ConfigError
from tests.consumers.test_query_cli import config_error, run
from tests.consumers.test_state import T0, msg
from tests.postgres import SHARED, scratch_database, shared_server_up

pytestmark = pytest.mark.skipif(not shared_server_up(), reason="no PostgreSQL on 127.0.0.1:5432")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture
def site() -> str:
    return f"s{uuid.uuid4().hex[:8]}"


@pytest.fixture
def pg(pg_url: str) -> Iterator[PostgresStore]:
    store = PostgresStore(pg_url)
    yield store
    store.close()


def _batches(site: str) -> list[list[Message]]:
    """Batches with a gap (seq 3, 4), an out-of-order arrival, copies, mixed value types."""
    values = {"temperature": 21.5, "count": 3, "door": True, "mode": "eco"}
    first = [msg(s, site=site, values=values, tags={"room": "hall"}) for s in (0, 1, 2, 6)]
    second = [
        msg(5, site=site),  # below seq 6: out of order
        msg(1, site=site, values=values, tags={"room": "hall"}),  # a copy
        msg(7, site=site, values={"temperature": "hot"}),  # a type change
        msg(0, site=site, device="pi-2"),
        msg(0, site=site, device="pi-2"),  # a copy within the batch
    ]
    return [first, second]


def _devices(location: Path | PostgresTarget, site: str) -> list[DeviceStats]:
    return [d for d in store_stats(location).devices if d.site == site]


def test_same_batches_store_the_same_as_sqlite(
    pg: PostgresStore, site: str, tmp_path: Path
) -> None:
    """Readings, export rows, completeness and write results equal the SQLite store's."""
    sqlite = SQLiteStore(tmp_path / "telemetry.db")
    status = [DeviceStatus(site, "pi-1", "online", T0, "edge/1")]
    results: list[tuple[WriteResult, WriteResult]] = []
    for batch in _batches(site):
        results.append((pg.write(batch, status), sqlite.write(batch, status)))
    sqlite.close()
    for got, want in results:
        assert got == want
    assert results[1][0].out_of_order == 1
    assert results[1][0].duplicates == 2
    target = PostgresTarget(pg.url)
    pg_rows = [r.as_dict() for r in iter_readings(target, site=site)]
    assert pg_rows == [r.as_dict() for r in iter_readings(tmp_path / "telemetry.db")]
    assert len(pg_rows) == 4 * 4 + 1 + 1 + 1
    devices = _devices(target, site)
    assert devices == _devices(tmp_path / "telemetry.db", site)
    assert devices[0].gaps == 2
    assert devices[0].state == "online"


def test_rollups_hold_the_inserted_readings(pg: PostgresStore, site: str) -> None:
    """rollup_1m and rollup_1h add up, per sensor, exactly the number readings stored."""
    batch = [msg(s, site=site, values={"t": s % 7 + 0.5, "on": s % 2 == 0}) for s in range(400)]
    pg.write(batch[:250], [])
    pg.write(batch[200:], [])  # 50 copies add nothing
    with psycopg.connect(pg.url) as conn:
        want = conn.execute(
            "SELECT sensor, count(*), sum(coalesce(value_num, value_bool)) FROM readings"
            " WHERE site = %s GROUP BY sensor ORDER BY sensor",
            (site,),
        ).fetchall()
        for table in ("rollup_1m", "rollup_1h"):
            got = conn.execute(
                f"SELECT sensor, sum(n), sum(sum) FROM {table} WHERE site = %s"
                " GROUP BY sensor ORDER BY sensor",
                (site,),
            ).fetchall()
            assert [(s, int(n), float(t)) for s, n, t in got] == [
                (s, n, float(t)) for s, n, t in want
            ]
    assert want[0][1] == 400


def test_readings_land_in_monthly_partitions(pg: PostgresStore, site: str) -> None:
    """A batch spanning a month boundary creates both months' partitions and fills each."""
    start, end = month_range(T0)[1:]
    late = msg(0, site=site, id=f"{site}-late")
    early = replace(late, id=f"{site}-early", readings=(replace(late.readings[0], ts_ms=end - 1),))
    nextm = replace(late, id=f"{site}-next", readings=(replace(late.readings[0], ts_ms=end),))
    assert pg.write([early, nextm], []).readings == 2
    with psycopg.connect(pg.url) as conn:
        rows = conn.execute(
            "SELECT tableoid::regclass::text, ts_ms FROM readings WHERE site = %s ORDER BY ts_ms",
            (site,),
        ).fetchall()
    assert rows == [(month_range(end - 1)[0], end - 1), (month_range(end)[0], end)]
    assert rows[0][0] != rows[1][0]
    assert start < end


def test_racing_hosts_store_each_reading_once(pg_url: str, site: str) -> None:
    """Three writers given the same messages in different orders, at once: each id once."""
    messages = [msg(s // 5, site=site, device=f"d{s % 5}") for s in range(3000)]
    results: list[WriteResult] = []
    errors: list[BaseException] = []
    retries: list[int] = []

    def host(seed: int) -> None:
        store = PostgresStore(pg_url)
        order = messages[:]
        random.Random(seed).shuffle(order)
        try:
            for i in range(0, len(order), 200):
                for attempt in range(10):
                    try:
                        results.append(store.write(order[i : i + 200], []))
                        break
                    except StoreUnavailable:  # a deadlock victim: the consumer retries too
                        retries.append(attempt)
                else:
                    raise AssertionError("a batch failed 10 times")
        except BaseException as err:
            errors.append(err)
        finally:
            store.close()

    threads = [threading.Thread(target=host, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert sum(r.messages for r in results) == 3000
    assert sum(r.duplicates for r in results) == 6000
    stats = [d for d in store_stats(PostgresTarget(pg_url)).devices if d.site == site]
    assert sum(d.messages for d in stats) == 3000
    assert sum(d.duplicates for d in stats) == 6000
    assert sum(d.gaps for d in stats) == 0
    ids = [row.id for row in iter_readings(PostgresTarget(pg_url), site=site)]
    assert len(ids) == len(set(ids)) == 3000
    print(f"batches retried by the racing writers: {len(retries)}")


def test_a_copy_waits_for_the_open_transaction_holding_its_id(pg_url: str, site: str) -> None:
    """A second host's copy blocks on the first host's uncommitted claim, then is a duplicate."""
    m = msg(0, site=site)
    with psycopg.connect(pg_url) as holder:
        holder.execute(
            "INSERT INTO seen_ids VALUES (%s, %s, %s, %s, %s, %s)",
            (m.id, site, "pi-1", "b1", 0, T0),
        )
        store = PostgresStore(pg_url)
        outcome: list[WriteResult] = []
        writer = threading.Thread(target=lambda: outcome.append(store.write([m], [])))
        writer.start()
        writer.join(1.0)
        assert writer.is_alive(), "the copy waited for the open claim"
        holder.commit()
    writer.join(30)
    store.close()
    assert outcome[0].duplicates == 1
    assert outcome[0].readings == 0


def test_prune_forgets_old_ids_only(pg: PostgresStore, site: str) -> None:
    """prune drops ids stored before the retention window and keeps the rest."""
    store = PostgresStore(pg.url, clock_ms=lambda: T0)
    store.write([msg(0, site=site)], [])
    store.close()
    with psycopg.connect(pg.url) as conn:

        def mine() -> int:
            row = conn.execute("SELECT count(*) FROM seen_ids WHERE site = %s", (site,)).fetchone()
            return int(row[0]) if row else -1

        pg.prune(T0 + pg.retention_ms - 1)
        assert mine() == 1
        assert pg.prune(T0 + pg.retention_ms + 1) >= 1
        assert mine() == 0
    assert pg.write([msg(0, site=site)], []).readings == 0, "the reading key still refuses it"


def test_newer_schema_is_refused() -> None:
    """A database written by a newer iotpipe is a ConfigError for the store and the readers."""
    with scratch_database() as url:
        PostgresStore(url).close()
        with psycopg.connect(url) as conn:
            conn.execute(
                "INSERT INTO schema_version (version) VALUES (%s)", (PG_SCHEMA_VERSION + 1,)
            )
        with pytest.raises(ConfigError, match="newer iotpipe"):
            PostgresStore(url)
        with pytest.raises(ConfigError, match="newer iotpipe"):
            connect_readonly(url)


def test_unreachable_server_is_unavailable_and_urls_are_checked() -> None:
    """No server: StoreUnavailable on write (retry later); no such database or a URL without
    one: a ConfigError."""
    down = PostgresStore("postgresql://iotpipe@127.0.0.1:1/x")  # opens: an outage, not a mistake
    with pytest.raises(StoreUnavailable, match="postgresql"):
        down.write([msg(0)], [])
    with pytest.raises(StoreUnavailable, match="postgresql"):
        down.check()
    with pytest.raises(ConfigError, match="does not exist"):
        PostgresStore(SHARED.rsplit("/", 1)[0] + "/iotpipe_no_such_db")
    assert parse_store("postgres://u@h/db") == PostgresTarget("postgres://u@h/db")
    with pytest.raises(ConfigError, match="no database"):
        parse_store("postgresql://u:secret@h:5432/")
    assert str(PostgresTarget("postgresql://u:secret@h/db")) == "postgresql://u:***@h/db"


def test_export_and_stats_commands_read_postgres(pg: PostgresStore, site: str) -> None:
    """iotpipe export and stats --json work on a postgresql:// store."""
    for batch in _batches(site):
        pg.write(batch, [])
    result = run("export", "--store", pg.url, "--site", site, "--format", "jsonl")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 19
    assert {line["site"] for line in lines} == {site}
    result = run("stats", "--store", pg.url, "--json")
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)
    mine = [d for d in figures["devices"] if d["site"] == site]
    assert [d["device"] for d in mine] == ["pi-1", "pi-2"]
    assert mine[0]["gaps"] == 2
    bad = run("stats", "--store", "postgresql://iotpipe@127.0.0.1:1/x")
    assert "cannot connect" in config_error(bad)


def test_dashboard_api_answers_the_same_on_postgres_as_on_sqlite(
    pg: PostgresStore, site: str, tmp_path: Path
) -> None:
    """/api/v1 sites, devices, device and series (raw, 1 m and 1 h sources, strings) answer
    the same JSON over a PostgreSQL store as over a SQLite store holding the same batches."""
    from fastapi.testclient import TestClient

    from consumers.dashboard.app import create_app

    sqlite = SQLiteStore(tmp_path / "telemetry.db")
    values_of = lambda s: {"t": s % 13 * 0.5, "on": s % 3 == 0, "mode": f"m{s % 4}"}  # noqa: E731
    batch = [msg(s * 7, site=site, values=values_of(s)) for s in range(2000)]
    status = [DeviceStatus(site, "pi-1", "online", T0, "edge/1")]
    for i in range(0, len(batch), 500):
        pg.write(batch[i : i + 500], status)
        sqlite.write(batch[i : i + 500], status)
    sqlite.close()
    apps = [TestClient(create_app(PostgresTarget(pg.url))), TestClient(create_app(sqlite.path))]
    span = {"from": T0, "to": T0 + 2000 * 7000}
    sources: set[bool] = set()  # read from a rollup (True) or the raw readings (False)
    hourly = False
    for path, params in [
        ("/api/v1/sites", {}),
        ("/api/v1/devices", {"site": site}),
        (f"/api/v1/devices/{site}/pi-1", {}),
        ("/api/v1/series", {"site": site, "device": "pi-1", "sensor": "t", "points": 5000}),
        ("/api/v1/series", {"site": site, "device": "pi-1", "sensor": "t", "points": 200}),
        (
            "/api/v1/series",  # 40 h in 10 points: 4 h buckets, from rollup_1h
            {
                "site": site,
                "device": "pi-1",
                "sensor": "on",
                "points": 10,
                "from": T0 - 20 * 3_600_000,
                "to": T0 + 20 * 3_600_000,
            },
        ),
        ("/api/v1/series", {"site": site, "device": "pi-1", "sensor": "mode", "points": 50}),
    ]:
        got, want = (app.get(path, params=span | params) for app in apps)
        assert got.status_code == want.status_code == 200, (path, got.text)
        body = got.json()
        if path == "/api/v1/sites":
            body = {"sites": [s for s in body["sites"] if s["site"] == site]}
        assert body == want.json(), path
        if path == "/api/v1/series" and "bucket_ms" in body and body["kind"] != "string":
            sources.add(body["bucket_ms"] % 60_000 == 0)
            hourly = hourly or body["bucket_ms"] % 3_600_000 == 0
    assert (
        apps[0]
        .get("/api/v1/series", params=span | {"site": site, "device": "pi-1", "sensor": "nope"})
        .status_code
        == 404
    )
    assert sources == {True, False}
    assert hourly, "one series read rollup_1h"
    assert apps[0].get("/api/v1/live").status_code == 503  # no live feed in PostgreSQL

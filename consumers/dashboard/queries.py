"""The dashboard's reads of a store: sites, devices, downsampled series, the live feed.

Every function takes a connection from :func:`open_store` (read-only, ``mode=ro``: it never
blocks or changes a running consumer) and returns JSON-able dicts shaped as ``docs/api.md``
says. A PostgreSQL store (:class:`~consumers.settings.PostgresTarget`) is read through
:class:`PgReader`, which takes the same SQL (``?`` and ``:name`` placeholders) in one read-only
repeatable-read transaction; it has no live feed (``/api/v1/live`` answers 503). Errors are :class:`QueryError` subclasses carrying their HTTP status::

    QueryError                 (an IotpipeError)
    ├── ParameterError         400: a query parameter is malformed or out of range
    ├── NotFoundError          404: unknown site, device or sensor
    └── StoreUnreadableError   503: the store file is missing, not iotpipe's, or failing

Series pick their source by bucket width (:func:`bucket_width`): whole hours read
``rollup_1h``, whole minutes ``rollup_1m``, seconds the raw readings, so a 30-day series reads
at most a few thousand rows whatever the data rate.
"""

from __future__ import annotations

import math
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from consumers.query import (
    DeviceStats,
    Location,
    device_stats,
    has_table,
    open_readonly,
    reading_value,
)
from consumers.settings import PostgresTarget
from consumers.sqlite_store import ROLLUPS
from iotpipe.errors import ConfigError, IotpipeError

__all__ = [
    "MAX_POINTS",
    "MIN_POINTS",
    "NotFoundError",
    "ParameterError",
    "QueryError",
    "StoreUnreadableError",
    "bucket_width",
    "device",
    "devices",
    "feed_head",
    "feed_since",
    "open_store",
    "series",
    "sites",
]

MIN_POINTS = 10
MAX_POINTS = 5000
_SECOND, _MINUTE, _HOUR = 1000, 60_000, 3_600_000


class QueryError(IotpipeError):
    """A request the store cannot answer; ``status`` is the HTTP status to answer with."""

    status = 500

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


class ParameterError(QueryError):
    """A query parameter is malformed or out of range."""

    status = 400


class NotFoundError(QueryError):
    """No such site, device or sensor in the store."""

    status = 404


class StoreUnreadableError(QueryError):
    """The store file is missing, not an iotpipe store, or cannot be read now."""

    status = 503


# -- opening ------------------------------------------------------------------------------------


_NAMED = re.compile(r"(?<![:\w]):([a-z_]+)")


class PgReader:
    """A psycopg connection taking the sqlite3-style SQL of this module.

    ``?`` becomes ``%s``, ``:name`` becomes ``%(name)s`` and a literal ``%`` (SQL's modulo)
    ``%%``, only when parameters are given (psycopg leaves SQL without them untouched).
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Any = None) -> Any:
        """Run one statement; returns the psycopg cursor (iterable, ``fetchone``, ``fetchall``)."""
        if not params:
            return self._conn.execute(sql)
        converted = _NAMED.sub(r"%(\1)s", sql.replace("%", "%%").replace("?", "%s"))
        return self._conn.execute(converted, params)

    def has_table(self, name: str) -> bool:
        """Whether the database has this table (or view)."""
        row = self._conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
        return row is not None and row[0] is not None


Reader = sqlite3.Connection | PgReader
"""What :func:`open_store` yields and every query takes."""


@contextmanager
def open_store(path: Location) -> Iterator[Reader]:
    """Open the store read-only for one request, in one read transaction (a consistent view).

    Yields a sqlite3 connection, or a :class:`PgReader` for a PostgreSQL store.

    Raises:
        StoreUnreadableError: the file is missing, not an iotpipe store with readings, the
            server cannot be reached, or the database failed while the block ran.
    """
    if isinstance(path, PostgresTarget):
        with _open_pg(path) as reader:
            yield reader
        return
    if not path.is_file():
        raise StoreUnreadableError(
            f"store {path} does not exist (yet): is iotpipe consume writing to it?"
        )
    try:
        conn = open_readonly(path)
    except ConfigError as err:
        raise StoreUnreadableError(f"store {path}: {err.allowed}") from None
    try:
        if not has_table(conn, "readings"):
            raise StoreUnreadableError(
                f"store {path} has no readings (an InfluxDB consumer's state file?): "
                "the dashboard reads SQLite and PostgreSQL stores"
            )
        conn.execute("BEGIN")
        yield conn
    except sqlite3.Error as err:
        raise StoreUnreadableError(f"store {path}: {err}") from err
    finally:
        conn.close()


@contextmanager
def _open_pg(target: PostgresTarget) -> Iterator[PgReader]:
    from consumers.pg_store import connect_readonly, is_pg_error

    try:
        conn = connect_readonly(target.url)
    except ConfigError as err:
        raise StoreUnreadableError(f"store {target}: {err.allowed}") from None
    try:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        yield PgReader(conn)
    except Exception as err:
        if is_pg_error(err):
            raise StoreUnreadableError(f"store {target}: {err}") from err
        raise
    finally:
        conn.close()


# -- sites and devices --------------------------------------------------------------------------


def _device_dict(
    stats: DeviceStats, sensors: int, confirmed: tuple[int, int, int, int, int] | None
) -> dict[str, Any]:
    latency = None
    if confirmed is not None:
        last, p50, p99, envelopes, _at = confirmed
        latency = {"p50": p50, "p99": p99, "last": last, "envelopes": envelopes}
    return {
        "site": stats.site,
        "device": stats.device,
        "state": stats.state,
        "state_ms": stats.state_ts_ms,
        "agent": stats.agent,
        "last_seen_ms": stats.last_seen_ms,
        "messages": stats.messages,
        "gaps": stats.gaps,
        "duplicates": stats.duplicates,
        "out_of_order": stats.out_of_order,
        "completeness": stats.completeness,
        "sensors": sensors,
        "confirmed_latency_ms": latency,
        "last_confirmed_ms": confirmed[4] if confirmed is not None else None,
    }


def _confirmations(
    conn: Reader,
) -> dict[tuple[str, str], tuple[int, int, int, int, int]]:
    """(last, p50, p99, envelopes, confirmed_ms) per device; none in a store without the table."""
    if not has_table(conn, "confirmations"):
        return {}  # written by an older consumer, or receipts were never confirmed
    return {
        (site, device): (last, p50, p99, envelopes, at)
        for site, device, last, p50, p99, envelopes, at in conn.execute(
            "SELECT site, device, last_ms, p50_ms, p99_ms, envelopes, confirmed_ms"
            " FROM confirmations"
        )
    }


def _all_devices(conn: Reader) -> list[dict[str, Any]]:
    """Every registered device with its completeness and confirmation figures, by site, device."""
    counts = {
        (site, device): n
        for site, device, n in conn.execute(
            "SELECT site, device, count(*) FROM sensors GROUP BY site, device"
        )
    }
    confirmed = _confirmations(conn)
    return [
        _device_dict(
            stats,
            counts.get((stats.site, stats.device), 0),
            confirmed.get((stats.site, stats.device)),
        )
        for stats in device_stats(conn)
    ]


def sites(conn: Reader) -> list[dict[str, Any]]:
    """One entry per site: devices, how many are ``online``, the latest reading time."""
    out: dict[str, dict[str, Any]] = {}
    for row in _all_devices(conn):
        site = out.setdefault(
            row["site"], {"site": row["site"], "devices": 0, "online": 0, "last_seen_ms": None}
        )
        site["devices"] += 1
        site["online"] += row["state"] == "online"
        seen = row["last_seen_ms"]
        if seen is not None and (site["last_seen_ms"] is None or seen > site["last_seen_ms"]):
            site["last_seen_ms"] = seen
    return list(out.values())


def devices(conn: Reader, site: str | None = None) -> list[dict[str, Any]]:
    """Every device (of ``site``, when given) with its completeness figures.

    Raises:
        NotFoundError: ``site`` has no device.
    """
    rows = _all_devices(conn)
    if site is None:
        return rows
    mine = [row for row in rows if row["site"] == site]
    if not mine:
        raise NotFoundError(f"unknown site {site!r}")
    return mine


def device(conn: Reader, site: str, name: str) -> dict[str, Any]:
    """One device as in :func:`devices`, plus ``sensor_list``.

    Raises:
        NotFoundError: no such device.
    """
    found = [row for row in _all_devices(conn) if row["site"] == site and row["device"] == name]
    if not found:
        raise NotFoundError(f"unknown device {site}/{name}")
    sensor_list = [
        {"sensor": s, "kind": kind, "unit": unit, "last_ts_ms": last, "type_changes": changes}
        for s, kind, unit, last, changes in conn.execute(
            "SELECT sensor, kind, unit, last_ts_ms, type_changes FROM sensors"
            " WHERE site = ? AND device = ? ORDER BY sensor",
            (site, name),
        )
    ]
    return {**found[0], "sensor_list": sensor_list}


# -- series -------------------------------------------------------------------------------------


def _round_up(ms: int) -> int:
    """Round a width up to whole seconds (up to a minute), minutes (up to an hour) or hours."""
    for unit in (_SECOND, _MINUTE):
        if ms <= unit * 60:
            return max(unit, math.ceil(ms / unit) * unit)
    return math.ceil(ms / _HOUR) * _HOUR


def _buckets(from_ms: int, to_ms: int, width: int) -> int:
    """How many epoch-aligned buckets of ``width`` overlap [from_ms, to_ms]."""
    return to_ms // width - from_ms // width + 1


def bucket_width(from_ms: int, to_ms: int, points: int) -> int:
    """The bucket width for a series: at least (to - from) / points, in whole s, min or h.

    Buckets are aligned to the epoch (``t = ts - ts mod width``), so those of whole minutes and
    hours are unions of rollup buckets. The width is widened until at most ``points`` buckets
    overlap the range.
    """
    width = _round_up(max(1, math.ceil((to_ms - from_ms) / points)))
    while _buckets(from_ms, to_ms, width) > points:
        width = _round_up(width + 1)
    return width


def _sensor(conn: Reader, site: str, name: str, sensor: str) -> tuple[str, str | None]:
    """(kind, unit) of a sensor; :class:`NotFoundError` naming what is unknown."""
    row = conn.execute(
        "SELECT kind, unit FROM sensors WHERE site = ? AND device = ? AND sensor = ?",
        (site, name, sensor),
    ).fetchone()
    if row is not None:
        return str(row[0]), row[1]
    known = conn.execute(
        "SELECT 1 FROM devices WHERE site = ? AND device = ?", (site, name)
    ).fetchone()
    if known is None:
        raise NotFoundError(f"unknown device {site}/{name}")
    raise NotFoundError(f"unknown sensor {sensor!r} of {site}/{name}")


# t: the bucket start (SQLite's % truncates toward zero, hence the double modulo).
_RAW_BUCKETS = """
SELECT ts_ms - (ts_ms % :width + :width) % :width AS t, count(v), sum(v), min(v), max(v)
FROM (SELECT ts_ms, coalesce(value_num, value_bool) AS v FROM readings
      WHERE site = :site AND device = :device AND sensor = :sensor
        AND ts_ms >= :lo AND ts_ms < :hi) AS r
WHERE v IS NOT NULL
GROUP BY t ORDER BY t
"""
_ROLLUP_BUCKETS = """
SELECT bucket_ms - (bucket_ms % :width + :width) % :width AS t,
       CAST(sum(n) AS BIGINT), sum(sum), min(min), max(max)
FROM {table}
WHERE site = :site AND device = :device AND sensor = :sensor
  AND bucket_ms >= :lo AND bucket_ms < :hi
GROUP BY t ORDER BY t
"""
_LATEST_STRINGS = """
SELECT ts_ms, value_str FROM readings
WHERE site = ? AND device = ? AND sensor = ? AND ts_ms >= ? AND ts_ms <= ?
  AND value_str IS NOT NULL
ORDER BY ts_ms DESC LIMIT ?
"""


def series_source(conn: Reader, width: int) -> str:
    """The table a series of buckets ``width`` wide reads: a rollup when one divides it."""
    for table, size in sorted(ROLLUPS.items(), key=lambda item: -item[1]):
        if width % size == 0 and has_table(conn, table):
            return table
    return "readings"


def series(
    conn: Reader,
    site: str,
    name: str,
    sensor: str,
    *,
    from_ms: int,
    to_ms: int,
    points: int,
) -> dict[str, Any]:
    """A sensor's readings in [from_ms, to_ms], one entry per bucket that has data.

    Numbers and booleans (as 0/1) give ``{t, min, mean, max, n}`` per bucket, over whole
    buckets (the first and last may reach outside the range). Strings give the latest
    ``points`` readings in the range, oldest first, as ``{t, value}``.

    Raises:
        NotFoundError: no such device or sensor.
    """
    kind, unit = _sensor(conn, site, name, sensor)
    width = bucket_width(from_ms, to_ms, points)
    out: dict[str, Any] = {
        "site": site,
        "device": name,
        "sensor": sensor,
        "kind": kind,
        "unit": unit,
        "from_ms": from_ms,
        "to_ms": to_ms,
        "bucket_ms": width,
    }
    if kind == "string":
        rows = conn.execute(_LATEST_STRINGS, (site, name, sensor, from_ms, to_ms, points))
        out["points"] = [{"t": t, "value": value} for t, value in reversed(rows.fetchall())]
        return out
    source = series_source(conn, width)
    sql = _RAW_BUCKETS if source == "readings" else _ROLLUP_BUCKETS.format(table=source)
    params = {
        "site": site,
        "device": name,
        "sensor": sensor,
        "width": width,
        "lo": from_ms - from_ms % width,
        "hi": to_ms - to_ms % width + width,
    }
    out["points"] = [
        {"t": t, "min": low, "mean": total / n, "max": high, "n": n}
        for t, n, total, low, high in conn.execute(sql, params)
        if n
    ]
    return out


# -- live feed ----------------------------------------------------------------------------------


def feed_head(conn: Reader) -> int:
    """The newest ``readings_feed`` number (0 when empty): follow the feed from there.

    Raises:
        StoreUnreadableError: the store has no feed yet (schema version 1, not yet migrated).
    """
    if not has_table(conn, "readings_feed"):
        raise StoreUnreadableError(
            "the store has no live feed yet (schema version 1): it is added when "
            "iotpipe consume of this version opens it"
        )
    return int(conn.execute("SELECT coalesce(max(seq), 0) FROM readings_feed").fetchone()[0])


_FEED = """
SELECT f.seq, f.site, f.device, f.sensor, f.ts_ms, r.value_num, r.value_bool, r.value_str
FROM readings_feed AS f
JOIN readings AS r USING (site, device, sensor, ts_ms)
WHERE f.seq > ? AND f.seq <= ?{filters}
ORDER BY f.seq
"""


def feed_since(
    conn: Reader,
    cursor: int,
    *,
    site: str | None = None,
    device: str | None = None,
    limit: int = 5000,
) -> tuple[list[dict[str, Any]], int]:
    """Readings inserted after ``cursor`` (at most ``limit`` feed entries), and the new cursor.

    The cursor is the feed's insertion number, not a reading time, so late data (a backlog
    drained after an outage, readings with old timestamps) is delivered like any other.

    Raises:
        StoreUnreadableError: the store has no feed (schema version 1).
    """
    head = feed_head(conn)
    if head <= cursor:
        # head < cursor: the file was replaced by a younger one; follow its feed instead.
        return [], head
    # A reader more than FEED_KEEP readings behind skips what was pruned.
    oldest = conn.execute("SELECT min(seq) FROM readings_feed").fetchone()[0]
    cursor = max(cursor, int(oldest) - 1)
    upto = min(head, cursor + limit)
    filters = ""
    params: list[object] = [cursor, upto]
    for column, value in (("site", site), ("device", device)):
        if value is not None:
            filters += f" AND f.{column} = ?"
            params.append(value)
    rows = conn.execute(_FEED.format(filters=filters), params)
    readings = [
        {
            "site": r_site,
            "device": r_device,
            "sensor": sensor,
            "t": ts_ms,
            "value": reading_value(num, flag, text),
        }
        for _seq, r_site, r_device, sensor, ts_ms, num, flag, text in rows
    ]
    return readings, upto

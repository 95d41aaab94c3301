"""The read side of a store file: readings for export, and completeness figures.

Everything here opens the file read-only (``mode=ro``), so it never blocks or changes a running
consumer: readers of a WAL file see the last committed batch. Works on a SQLite store file
(readings and state) and, for :func:`store_stats`, on a bare state file of an InfluxDB consumer.

A file that is missing, is not SQLite, or lacks iotpipe's ``meta`` table gives a
:class:`~iotpipe.errors.ConfigError` naming the path.

``iotpipe export``/``stats`` (:mod:`consumers.query_cli`) use :func:`iter_readings` and
:func:`store_stats`; the dashboard (:mod:`consumers.dashboard.queries`) builds on the same
pieces per request: :func:`open_readonly`, :func:`has_table`, :func:`device_stats` and
:func:`reading_value`.

:func:`iter_readings`, :func:`store_stats` and :func:`seq_gaps` also read a PostgreSQL store
(a :class:`~consumers.settings.PostgresTarget`) over a read-only session: the same SQL, with
PostgreSQL's placeholders and its ``seen_ids`` table in place of ``messages``.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from consumers.settings import PostgresTarget
from consumers.state import SCHEMA_VERSION
from consumers.store import Value
from iotpipe.errors import ConfigError

__all__ = [
    "DeviceStats",
    "ExportRow",
    "StoreStats",
    "device_stats",
    "format_ms",
    "has_table",
    "iter_readings",
    "open_readonly",
    "reading_value",
    "seq_gaps",
    "store_stats",
]


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One stored reading, as ``iotpipe export`` writes it.

    Attributes:
        id: the envelope id of the message that brought it.
        ts: reading time, RFC 3339 UTC with milliseconds (``2026-11-26T08:15:02.125Z``).
        value: a number, boolean or string. Numbers come back as floats, or as ints when they
            are whole (stored as REAL: 21 and 21.0 are the same number).
        unit: the unit, or ``None``.
        tags: the message's tags (empty when it had none).
    """

    id: str
    site: str
    device: str
    sensor: str
    ts: str
    value: Value
    unit: str | None
    tags: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The row as a JSON-able dict, fields in export order."""
        return {
            "id": self.id,
            "site": self.site,
            "device": self.device,
            "sensor": self.sensor,
            "ts": self.ts,
            "value": self.value,
            "unit": self.unit,
            "tags": self.tags,
        }


@dataclass(frozen=True, slots=True)
class DeviceStats:
    """Registry and completeness of one device (summed over its boots).

    Attributes:
        state: ``online``/``offline`` from its latest status message, or ``None``.
        state_ts_ms: that status's own time.
        agent: the agent named by that status.
        last_seen_ms: its latest reading time stored.
        messages: messages stored.
        gaps: messages missing from the seq ranges stored (per boot, never below 0).
        duplicates: copies absorbed by dedupe.
        out_of_order: messages stored after a higher seq of the same boot.
        type_changes: readings whose value type differed from their sensor's pinned type.
        boots: distinct boots seen.
    """

    site: str
    device: str
    state: str | None
    state_ts_ms: int | None
    agent: str | None
    last_seen_ms: int | None
    messages: int
    gaps: int
    duplicates: int
    out_of_order: int
    type_changes: int
    boots: int

    @property
    def completeness(self) -> float | None:
        """Stored / (stored + gaps), or ``None`` with nothing stored."""
        expected = self.messages + self.gaps
        return self.messages / expected if expected else None


@dataclass(frozen=True, slots=True)
class StoreStats:
    """Totals of a store or state file, and one row per device.

    Attributes:
        readings: rows in the readings table, or ``None`` for a state file without readings.
        messages: messages stored, over all time.
        seen_ids: message ids remembered for dedupe (the retention window).
        sensors: how many sensors are registered.
        duplicates, out_of_order, gaps, type_changes: summed over every device.
        devices: one row per registered device, ordered by site and device.
    """

    path: str
    readings: int | None
    messages: int
    seen_ids: int
    sensors: int
    duplicates: int
    out_of_order: int
    gaps: int
    type_changes: int
    devices: list[DeviceStats]


def format_ms(ms: int) -> str:
    """Format Unix epoch milliseconds as RFC 3339 UTC with milliseconds and ``Z``."""
    seconds, millis = divmod(ms, 1000)
    moment = datetime.fromtimestamp(seconds, UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{millis:03d}Z"


def open_readonly(path: Path) -> sqlite3.Connection:
    """Open an iotpipe store or state file read-only and check its schema version.

    Readers of a WAL file see the last committed batch; the connection never blocks or changes
    the consumer writing it. The caller closes it.

    Raises:
        ConfigError: the file is missing, not SQLite, not iotpipe's, or newer than this code.
    """
    if not path.is_file():
        raise ConfigError("store", path, "no such file")
    try:
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as err:
        raise ConfigError("store", path, f"cannot open it: {err}") from err
    try:
        _check_meta(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _check_meta(conn: sqlite3.Connection, path: Path) -> None:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as err:
        raise ConfigError("store", path, f"not an iotpipe store ({err})") from err
    if row is None:
        raise ConfigError("store", path, "not an iotpipe store (no schema_version)")
    if int(row[0]) > SCHEMA_VERSION:
        raise ConfigError(
            "store",
            path,
            f"written by a newer iotpipe (schema version {row[0]}); upgrade iotpipe to read it",
        )


Location = Path | PostgresTarget
"""What the read side opens: a SQLite store or state file, or a PostgreSQL store."""


@dataclass(frozen=True, slots=True)
class _Reader:
    """An open store of either kind, with what differs between their SQL."""

    rows: Callable[[str, Sequence[object]], Iterable[tuple[Any, ...]]]
    close: Callable[[], None]
    mark: str  # the parameter placeholder
    seen_table: str  # where seen ids are kept
    has_readings: bool
    conn: Any  # the connection (sqlite3 or psycopg): device_stats runs on it


def _open(location: Location) -> _Reader:
    """Open a store read-only and check its schema version.

    Raises:
        ConfigError: the store is missing, unreachable, not iotpipe's, or newer than this code.
    """
    if isinstance(location, PostgresTarget):
        from consumers.pg_store import connect_readonly

        pg = connect_readonly(location.url)
        return _Reader(
            rows=lambda sql, params: pg.cursor().stream(sql, params),
            close=pg.close,
            mark="%s",
            seen_table="seen_ids",
            has_readings=True,
            conn=pg,
        )
    conn = open_readonly(location)
    return _Reader(
        rows=conn.execute,
        close=conn.close,
        mark="?",
        seen_table="messages",
        has_readings=has_table(conn, "readings"),
        conn=conn,
    )


def has_table(conn: Any, name: str) -> bool:
    """Whether the store has a table called ``name`` (a state file has no ``readings``).

    ``conn``: a sqlite3 connection, or a reader with its own ``has_table`` (PostgreSQL).
    """
    if not isinstance(conn, sqlite3.Connection):
        return bool(conn.has_table(name))
    sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
    return conn.execute(sql, (name,)).fetchone() is not None


def reading_value(num: float | None, flag: int | None, text: str | None) -> Value:
    """Rebuild a reading value from its three columns (``value_num``, ``value_bool``, ``value_str``).

    Booleans and strings come back as such; numbers as ints when whole, else floats.
    """
    if flag is not None:
        return bool(flag)
    if text is not None:
        return text
    assert num is not None  # the store sets exactly one column
    # REAL holds every whole number up to 2**53 exactly; show those as integers.
    if num.is_integer() and abs(num) <= 2**53:
        return int(num)
    return num


_SELECT_READINGS = (
    "SELECT msg_id, site, device, sensor, ts_ms, value_num, value_bool, value_str, unit, tags"
    " FROM readings"
)


def iter_readings(
    path: Location,
    *,
    site: str | None = None,
    device: str | None = None,
    sensor: str | None = None,
    since_ms: int | None = None,
    until_ms: int | None = None,
) -> Iterator[ExportRow]:
    """Iterate over stored readings, ordered by site, device, sensor and time.

    The file is opened and checked at once (errors surface before the first row); rows are
    then streamed, so an export of any size runs in constant memory.

    Args:
        path: a SQLite store file or a PostgreSQL store.
        site, device, sensor: keep only readings with these exact names.
        since_ms: keep readings at or after this time (Unix epoch milliseconds).
        until_ms: keep readings before this time.

    Raises:
        ConfigError: the file is missing, not an iotpipe store, or has no readings table (a
            state file of an InfluxDB consumer).
    """
    reader = _open(path)
    if not reader.has_readings:
        reader.close()
        raise ConfigError(
            "store",
            path,
            "a state file without readings (an InfluxDB consumer's); export reads SQLite stores",
        )
    where, params = _filters(site, device, sensor, since_ms, until_ms, mark=reader.mark)
    # The clause holds placeholders only; the values travel as parameters.
    sql = f"{_SELECT_READINGS}{where} ORDER BY site, device, sensor, ts_ms"
    return _rows(reader, sql, params)


def _filters(
    site: str | None,
    device: str | None,
    sensor: str | None,
    since_ms: int | None,
    until_ms: int | None,
    *,
    mark: str = "?",
) -> tuple[str, list[object]]:
    """Build the WHERE clause (with ``mark`` placeholders) and its parameters."""
    clauses: list[str] = []
    params: list[object] = []
    for column, value in (("site", site), ("device", device), ("sensor", sensor)):
        if value is not None:
            clauses.append(f"{column} = {mark}")
            params.append(value)
    if since_ms is not None:
        clauses.append(f"ts_ms >= {mark}")
        params.append(since_ms)
    if until_ms is not None:
        clauses.append(f"ts_ms < {mark}")
        params.append(until_ms)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _rows(reader: _Reader, sql: str, params: list[object]) -> Iterator[ExportRow]:
    """Stream the query's rows as :class:`ExportRow`; close the connection at the end."""
    try:
        for msg_id, site, device, sensor, ts_ms, num, flag, text, unit, tags in reader.rows(
            sql, params
        ):
            yield ExportRow(
                id=msg_id,
                site=site,
                device=device,
                sensor=sensor,
                ts=format_ms(ts_ms),
                value=reading_value(num, flag, text),
                unit=unit,
                tags=json.loads(tags) if tags else {},
            )
    finally:
        reader.close()


# Portable between SQLite and PostgreSQL: no two-argument max(), sums cast back to integers.
_GAP = (
    "CASE WHEN max_seq - first_seq + 1 - messages > 0"
    " THEN max_seq - first_seq + 1 - messages ELSE 0 END"
)
_PER_DEVICE = f"""
SELECT d.site, d.device, d.state, d.state_ts_ms, d.agent, d.last_seen_ms,
       coalesce(s.messages, 0), coalesce(s.gaps, 0), coalesce(s.duplicates, 0),
       coalesce(s.out_of_order, 0), coalesce(t.type_changes, 0), coalesce(s.boots, 0)
FROM devices AS d
LEFT JOIN (
    SELECT site, device, CAST(sum(messages) AS BIGINT) AS messages,
           CAST(sum({_GAP}) AS BIGINT) AS gaps,
           CAST(sum(duplicates) AS BIGINT) AS duplicates,
           CAST(sum(out_of_order) AS BIGINT) AS out_of_order, count(*) AS boots
    FROM streams GROUP BY site, device
) AS s USING (site, device)
LEFT JOIN (
    SELECT site, device, CAST(sum(type_changes) AS BIGINT) AS type_changes
    FROM sensors GROUP BY site, device
) AS t USING (site, device)
ORDER BY d.site, d.device
"""  # noqa: S608 (constants only)


def device_stats(conn: Any) -> list[DeviceStats]:
    """Every registered device with its completeness figures, ordered by site and device.

    ``conn``: a sqlite3 or psycopg connection (the query is portable).
    """
    return [DeviceStats(*row) for row in conn.execute(_PER_DEVICE)]


def store_stats(path: Location) -> StoreStats:
    """Read totals and per-device completeness from a store or state file.

    Counting the readings reads the whole readings table: a few seconds for tens of millions.

    Raises:
        ConfigError: the file is missing or not an iotpipe store or state file.
    """
    reader = _open(path)
    try:
        devices = device_stats(reader.conn)
        readings = None
        if reader.has_readings:
            readings = _count(reader, "readings")
        seen_ids = _count(reader, reader.seen_table)
        sensors = _count(reader, "sensors")
    finally:
        reader.close()
    return StoreStats(
        path=str(path),
        readings=readings,
        messages=sum(d.messages for d in devices),
        seen_ids=seen_ids,
        sensors=sensors,
        duplicates=sum(d.duplicates for d in devices),
        out_of_order=sum(d.out_of_order for d in devices),
        gaps=sum(d.gaps for d in devices),
        type_changes=sum(d.type_changes for d in devices),
        devices=devices,
    )


def _count(reader: _Reader, table: str) -> int:
    sql = f"SELECT count(*) FROM {table}"  # noqa: S608 (table names are constants)
    return _scalar(reader, sql)


def _scalar(reader: _Reader, sql: str) -> int:
    """The single integer a parameterless query answers (both drivers have ``execute``)."""
    return int(reader.conn.execute(sql).fetchone()[0])


_GAPS = f"SELECT CAST(coalesce(sum({_GAP}), 0) AS BIGINT) FROM streams"  # noqa: S608 (constant)


def seq_gaps(path: Location) -> int:
    """Missing ``seq`` values over every device and boot (cheap: reads the streams table only).

    Raises:
        ConfigError: the file is missing or not an iotpipe store or state file.
    """
    reader = _open(path)
    try:
        return _scalar(reader, _GAPS)
    finally:
        reader.close()

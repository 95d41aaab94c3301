"""The read side: readings for export and completeness figures, from store and state files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from consumers.query import format_ms, iter_readings, store_stats
from consumers.sqlite_store import SQLiteStore
from consumers.state import StateDB
from consumers.store import DeviceStatus, Value
from iotpipe.errors import ConfigError
from tests.consumers.test_state import T0, msg, record


@pytest.fixture
def store_file(tmp_path: Path) -> Path:
    """A store with two devices: pi-1 has a gap, a late message and a duplicate."""
    path = tmp_path / "telemetry.db"
    store = SQLiteStore(path)
    values: dict[str, Value] = {"temperature": 21.5, "count": 3, "door": False, "mode": "eco"}
    store.write([msg(0, values=values, tags={"room": "kitchen"}), msg(1), msg(3)], [])
    store.write([msg(2), msg(2), msg(0, device="pi-2", site="lab")], [])
    store.write([], [DeviceStatus("home", "pi-1", "online", T0 - 5000, "edge/1.2")])
    store.close()
    return path


def test_format_ms_is_rfc3339_with_milliseconds() -> None:
    """Epoch ms come out as UTC with exactly three fraction digits and Z."""
    assert format_ms(0) == "1970-01-01T00:00:00.000Z"
    assert format_ms(T0 + 125) == "2025-11-26T08:00:00.125Z"


def test_iter_readings_values_and_order(store_file: Path) -> None:
    """Rows come ordered by site, device, sensor, time, with values in their own types."""
    rows = list(iter_readings(store_file))
    keys = [(r.site, r.device, r.sensor, r.ts) for r in rows]
    assert keys == sorted(keys)
    first = {r.sensor: r for r in rows if r.id == "home-pi-1-b1-0"}
    assert first["temperature"].value == 21.5
    assert first["temperature"].unit == "Cel"
    assert first["count"].value == 3
    assert isinstance(first["count"].value, int)
    assert first["door"].value is False
    assert first["mode"].value == "eco"
    assert first["mode"].tags == {"room": "kitchen"}
    assert first["mode"].ts == "2025-11-26T08:00:00.000Z"
    assert len(rows) == 4 + 3 + 1


def test_iter_readings_filters(store_file: Path) -> None:
    """site/device/sensor match exactly; since is inclusive, until exclusive."""
    assert {r.device for r in iter_readings(store_file, site="lab")} == {"pi-2"}
    assert {r.site for r in iter_readings(store_file, device="pi-1")} == {"home"}
    assert [r.value for r in iter_readings(store_file, sensor="door")] == [False]
    window = iter_readings(store_file, device="pi-1", since_ms=T0 + 1000, until_ms=T0 + 3000)
    assert [r.ts[17:23] for r in window if r.sensor == "temperature"] == ["01.000", "02.000"]


def test_iter_readings_while_a_writer_holds_the_lock(store_file: Path) -> None:
    """Reading never waits for a consumer's open write transaction (WAL)."""
    writer = sqlite3.connect(store_file, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("DELETE FROM readings")
    try:
        assert len(list(iter_readings(store_file))) == 8
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_errors_for_missing_foreign_and_state_only_files(tmp_path: Path) -> None:
    """Missing, non-iotpipe and readings-less files give one-line ConfigErrors."""
    with pytest.raises(ConfigError, match="no such file"):
        iter_readings(tmp_path / "nope.db")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE x (y)").connection.close()
    with pytest.raises(ConfigError, match="not an iotpipe store"):
        iter_readings(other)
    text = tmp_path / "notes.txt"
    text.write_text("not sqlite\n" * 200)
    with pytest.raises(ConfigError, match="not an iotpipe store"):
        store_stats(text)
    state = tmp_path / "state.db"
    StateDB(state).close()
    with pytest.raises(ConfigError, match="export reads SQLite stores"):
        iter_readings(state)


def test_store_stats_figures(store_file: Path) -> None:
    """Totals and per-device rows match what was written (worked example in the fixture)."""
    stats = store_stats(store_file)
    assert (stats.readings, stats.messages, stats.seen_ids) == (8, 5, 5)
    assert (len(stats.devices), stats.sensors) == (2, 5)
    assert (stats.duplicates, stats.out_of_order, stats.gaps, stats.type_changes) == (1, 1, 0, 0)
    home, lab = stats.devices  # ordered by site, device
    assert (lab.site, lab.device, lab.state, lab.messages, lab.boots) == ("lab", "pi-2", None, 1, 1)
    assert (home.state, home.state_ts_ms, home.agent) == ("online", T0 - 5000, "edge/1.2")
    assert home.last_seen_ms == T0 + 3000
    assert (home.messages, home.gaps, home.duplicates, home.out_of_order) == (4, 0, 1, 1)
    assert home.completeness == 1.0


def test_store_stats_on_a_bare_state_file(tmp_path: Path) -> None:
    """A state file (InfluxDB consumer) has no readings count but the same completeness."""
    path = tmp_path / "state.db"
    state = StateDB(path)
    record(state, [msg(0), msg(1), msg(4), msg(4, boot="b2"), msg(5, boot="b2")])
    state.close()
    stats = store_stats(path)
    assert stats.readings is None
    assert (stats.messages, stats.gaps, len(stats.devices)) == (5, 2, 1)
    (device,) = stats.devices
    assert (device.boots, device.gaps) == (2, 2)
    assert device.completeness == pytest.approx(5 / 7)

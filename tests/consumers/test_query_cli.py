"""``iotpipe export`` and ``iotpipe stats``: output formats, store URLs, and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from consumers.query import iter_readings
from consumers.query_cli import export, stats
from consumers.settings import store_path
from consumers.sqlite_store import SQLiteStore
from consumers.state import StateDB
from consumers.store import DeviceStatus, Value
from iotpipe.errors import ConfigError
from tests.consumers.test_state import T0, msg, record

# The lead mounts the commands on the iotpipe root; the test mounts them the same way.
app = typer.Typer(rich_markup_mode="rich", pretty_exceptions_enable=False)
app.command("export")(export)
app.command("stats")(stats)


def run(*args: str) -> Result:
    """Invoke a command; errors stay in ``result.exception`` as the root CLI would see them."""
    return CliRunner().invoke(app, list(args))


def config_error(result: Result) -> str:
    """The one line the root CLI prints for a ConfigError, checking it is one (exit 2)."""
    assert isinstance(result.exception, ConfigError), result.output
    assert result.exception.exit_code == 2
    line = str(result.exception)
    assert "\n" not in line
    return line


@pytest.fixture
def store_file(tmp_path: Path) -> Path:
    path = tmp_path / "telemetry.db"
    store = SQLiteStore(path)
    values: dict[str, Value] = {"temperature": 21.5, "count": 3, "door": True, "mode": "eco, auto"}
    store.write([msg(0, values=values, tags={"room": "kitchen"}), msg(1), msg(3)], [])
    store.write([msg(0, device="pi-2")], [DeviceStatus("home", "pi-1", "online", T0, "edge/1")])
    store.close()
    return path


def test_export_jsonl_round_trip(store_file: Path) -> None:
    """JSON lines on stdout carry exactly what iter_readings returns."""
    result = run("export", "--store", str(store_file))
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines == [row.as_dict() for row in iter_readings(store_file)]
    assert list(lines[0]) == ["id", "site", "device", "sensor", "ts", "value", "unit", "tags"]


def test_export_csv_to_file_round_trip(store_file: Path, tmp_path: Path) -> None:
    """CSV to a file: header, one line per reading, a final count on stderr."""
    out = tmp_path / "out.csv"
    result = run("export", "--store", str(store_file), "--format", "csv", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"exported 7 readings to {out}"
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "site", "device", "sensor", "ts", "value", "unit", "tags"]
    expected = list(iter_readings(store_file))
    assert [r["ts"] for r in rows] == [e.ts for e in expected]
    by_sensor = {r["sensor"]: r for r in rows if r["id"] == "home-pi-1-b1-0"}
    assert by_sensor["door"]["value"] == "true"
    assert by_sensor["mode"]["value"] == "eco, auto"
    assert by_sensor["count"]["value"] == "3"
    assert json.loads(by_sensor["mode"]["tags"]) == {"room": "kitchen"}
    assert by_sensor["temperature"]["unit"] == "Cel"


def test_export_filters(store_file: Path) -> None:
    """--device/--sensor/--since/--until narrow the export."""
    result = run(
        "export",
        "--store",
        f"sqlite:///{store_file}",  # absolute: four slashes
        "--device",
        "pi-1",
        "--sensor",
        "temperature",
        "--since",
        "2025-11-26T08:00:01Z",
        "--until",
        str(T0 + 3000),
    )
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["value"] for line in result.stdout.splitlines()] == [21.0]


@pytest.mark.parametrize("form", ["sqlite:///{rel}", "sqlite:{rel}", "{rel}", "sqlite:///{abs}"])
def test_store_url_forms(
    store_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, form: str
) -> None:
    """sqlite:///relative, sqlite:relative, a plain path and sqlite:////absolute all work."""
    monkeypatch.chdir(tmp_path)
    url = form.format(rel=store_file.name, abs=store_file)
    assert Path(store_path(url)).resolve() == store_file.resolve()  # type: ignore[arg-type]
    assert run("export", "--store", url, "--sensor", "door").stdout.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--store", "influxdb://influx:8086"], "InfluxDB's own tools"),
        (["--store", "mysql://db/x"], "unknown store type"),
        (["--store", "postgresql://iotpipe@127.0.0.1:1/x"], "cannot connect"),
        (["--store", "postgresql://127.0.0.1"], "no database"),
        (["--store", "sqlite://host/x.db"], "sqlite:///relative.db"),
        (["--store", "missing.db"], "no such file"),
        (["--store", "{store}", "--since", "yesterday"], "relative (-1h, -7d)"),
        (["--store", "{store}", "--output", "/nonexistent/dir/out.csv"], "cannot write it"),
    ],
)
def test_export_errors_are_one_line(store_file: Path, args: list[str], expected: str) -> None:
    """Bad input ends in one ConfigError line (exit 2), never a traceback or a stray file."""
    result = run("export", *[a.format(store=store_file) for a in args])
    assert expected in config_error(result)


def test_export_rejects_an_unknown_format(store_file: Path) -> None:
    """An unknown --format is a usage error (exit 2) naming the choices."""
    result = run("export", "--store", str(store_file), "--format", "xml")
    assert result.exit_code == 2
    assert "jsonl" in result.output


def test_stats_table(store_file: Path) -> None:
    """The table shows totals and a row per device."""
    result = run("stats", "--store", str(store_file))
    assert result.exit_code == 0, result.output
    assert "readings 7 · messages 4" in result.stdout
    assert "gaps 1" in result.stdout
    assert "home/pi-1" in result.stdout
    assert "home/pi-2" in result.stdout
    assert "online" in result.stdout


def test_stats_json(store_file: Path) -> None:
    """--json prints the same figures for machines."""
    result = run("stats", "--store", str(store_file), "--json")
    figures = json.loads(result.stdout)
    assert (figures["readings"], figures["messages"], figures["gaps"]) == (7, 4, 1)
    pi1 = figures["devices"][0]
    assert (pi1["device"], pi1["state"], pi1["gaps"]) == ("pi-1", "online", 1)
    assert pi1["completeness"] == pytest.approx(3 / 4)


def test_stats_of_an_influxdb_store_reads_the_state_file(tmp_path: Path) -> None:
    """For influxdb:// the figures come from --state; a missing one is a clear error."""
    state_path = tmp_path / "state.db"
    state = StateDB(state_path)
    record(state, [msg(0), msg(2)])
    state.close()
    result = run("stats", "--store", "influxdb://influx:8086", "--state", str(state_path), "--json")
    figures = json.loads(result.stdout)
    assert (figures["readings"], figures["messages"], figures["gaps"]) == (None, 2, 1)
    missing = run("stats", "--store", "influxdb://influx:8086", "--state", "nope.db")
    assert "--state" in config_error(missing)


def test_help_has_examples() -> None:
    """Each command's help ends with examples."""
    for command in ("export", "stats"):
        result = run(command, "--help")
        assert result.exit_code == 0
        assert "Examples" in result.stdout

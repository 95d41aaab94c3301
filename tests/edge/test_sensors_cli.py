"""``iotpipe edge sensors``: one read of every sensor, a table, and the exit status."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner, Result

from edge.cli_sensors import sensors
from iotpipe.errors import ConfigError
from tests.edge.fixtures import PROBE_A, PROBE_B, copy_tree

# The lead mounts the command under `iotpipe edge`; the test mounts it the same way.
app = typer.Typer(rich_markup_mode="rich", pretty_exceptions_enable=False)
app.command("sensors")(sensors)
app.command("other")(lambda: None)  # two commands, so `sensors` is a subcommand as when mounted


def run(*args: str) -> Result:
    """Invoke the command; errors stay in ``result.exception`` as the root CLI would see them."""
    return CliRunner().invoke(app, ["sensors", *args], env={"COLUMNS": "200"})


def write_config(tmp_path: Path, sensors_toml: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(f'[edge]\nsite = "home"\nstate_dir = "{tmp_path}"\n\n{sensors_toml}')
    return path


@pytest.fixture
def sys_root(tmp_path: Path) -> Path:
    return copy_tree(tmp_path)


def test_all_sensors_read(tmp_path: Path, sys_root: Path) -> None:
    """Every reading is printed with its unit, and the exit status is 0."""
    proc = copy_tree(tmp_path, "proc")
    config = write_config(
        tmp_path,
        f'[[edge.sensors]]\ntype = "thermal"\nroot = "{sys_root}"\n\n'
        f'[[edge.sensors]]\ntype = "ds18b20"\nroot = "{sys_root}"\n'
        f'devices = {{ "{PROBE_A}" = "living_room" }}\n\n'
        f'[[edge.sensors]]\ntype = "system"\nproc = "{proc}"\ndisk_path = "{tmp_path}"\n\n'
        '[[edge.sensors]]\ntype = "simulated"\nseed = 1\nsensors = ["door"]\n',
    )
    result = run("--config", str(config))
    assert result.exit_code == 0, result.output
    out = result.output
    assert row(out, "cpu.temperature") == ["thermal", "cpu.temperature", "48.312", "Cel"]
    assert row(out, "living_room") == ["ds18b20", "living_room", "23.125", "Cel"]
    assert row(out, f"temperature.{PROBE_B}")[2:] == ["-10.125", "Cel"]
    assert row(out, "cpu.load15") == ["system", "cpu.load15", "0.59", "1"]
    assert row(out, "memory.available")[3] == "By"
    assert row(out, "door")[0] == "simulated"
    assert "all 4 sensors read" in out


def row(output: str, reading: str) -> list[str]:
    """The cells of the table row of ``reading``."""
    lines = [line.split() for line in output.splitlines()]
    return next(cells for cells in lines if len(cells) > 1 and cells[1] == reading)


def test_failing_sensor_exit_1_and_the_others_still_read(tmp_path: Path, sys_root: Path) -> None:
    """A failing sensor shows its error, the others their readings, and the exit status is 1."""
    shutil.rmtree(sys_root / "bus")
    (sys_root / "bus/w1/devices").mkdir(parents=True)
    config = write_config(
        tmp_path,
        f'[[edge.sensors]]\ntype = "ds18b20"\nroot = "{sys_root}"\n\n'
        f'[[edge.sensors]]\ntype = "thermal"\nroot = "{sys_root}"\n',
    )
    result = run("--config", str(config))
    assert result.exit_code == 1, result.output
    assert "error: no DS18B20 probes" in result.output
    assert "48.312" in result.output
    assert "1 of 2 sensors failed: ds18b20" in result.output


def test_bme280_without_a_bus(tmp_path: Path) -> None:
    """On a machine without /dev/i2c-N the BME280 fails cleanly (exit 1, not a traceback)."""
    config = write_config(tmp_path, '[[edge.sensors]]\ntype = "bme280"\nbus = 250\n')
    result = run("--config", str(config))
    assert result.exit_code == 1, result.output
    assert "error: cannot open /dev/i2c-250" in result.output


def config_error(result: Result) -> str:
    """The one line the root CLI prints for a ConfigError, checking it is one (exit 2)."""
    assert isinstance(result.exception, ConfigError), result.output
    assert result.exception.exit_code == 2
    return str(result.exception)


def test_invalid_sensor_table_is_a_config_error(tmp_path: Path) -> None:
    """A bad value names the sensor's field and the value."""
    config = write_config(tmp_path, '[[edge.sensors]]\ntype = "dht22"\ninterval = 1\n')
    line = config_error(run("--config", str(config)))
    assert "edge.sensors.0.interval=1" in line
    assert "greater than or equal to 2" in line


def test_duplicate_names_are_a_config_error(tmp_path: Path) -> None:
    """Two unnamed sensors of one type are refused before anything is read."""
    config = write_config(
        tmp_path, '[[edge.sensors]]\ntype = "system"\n[[edge.sensors]]\ntype = "system"\n'
    )
    assert "sensor names must be unique" in config_error(run("--config", str(config)))


def test_missing_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No --config and no $IOTPIPE_CONFIG, or a missing file, are config errors."""
    monkeypatch.delenv("IOTPIPE_CONFIG", raising=False)
    assert "--config" in config_error(run())
    assert "no such file" in config_error(run("--config", str(tmp_path / "nope.toml")))


def test_no_sensors_configured(tmp_path: Path) -> None:
    """A config without sensor tables says how to add one and exits 1."""
    result = run("--config", str(write_config(tmp_path, "")))
    assert result.exit_code == 1
    assert "add [[edge.sensors]] tables" in result.output


def test_help_has_examples() -> None:
    """The help page shows the examples, TOML tables included."""
    result = CliRunner().invoke(app, ["sensors", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "iotpipe edge sensors --config edge.toml" in result.output
    assert "[[edge.sensors]]" in result.output

"""Choosing drivers from config tables: the discriminated union, unique names, safe reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.sensors import build_drivers, parse_sensors, read_safely
from edge.sensors.base import Sample, SensorError
from edge.sensors.bme280 import BME280Driver
from edge.sensors.thermal import ThermalDriver
from iotpipe.errors import ConfigError


def test_type_picks_the_model_and_driver() -> None:
    """Each table's type selects its model; building opens no hardware."""
    parsed = parse_sensors(
        [
            {"type": "thermal"},
            {"type": "bme280", "address": 0x77, "name": "outdoor", "prefix": "out"},
        ]
    )
    drivers = build_drivers(parsed)
    assert [type(d) for d in drivers] == [ThermalDriver, BME280Driver]
    assert [(d.name, d.interval) for d in drivers] == [("thermal", 10.0), ("outdoor", 30.0)]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"type": "lidar"}, r"edge\.sensors\.0\.type=.*does not match any of the expected tags"),
        ({"type": "thermal", "intervall": 5}, r"edge\.sensors\.0\.intervall=5: unknown setting"),
        ({"type": "thermal", "interval": 0.1}, r"\.interval=0\.1: .*greater than or equal to 1"),
        ({"type": "thermal", "name": "cpu temp"}, r"\.name='cpu temp': .*1-64 characters"),
        ({"interval": 5}, r"edge\.sensors\.0\.type=None: required, one of: 'thermal'"),
    ],
)
def test_bad_tables(table: dict[str, object], message: str) -> None:
    """Unknown or missing types, typos, bad bounds and bad names are one-line ConfigErrors."""
    with pytest.raises(ConfigError, match=message):
        parse_sensors([table])


def test_duplicate_sensor_names() -> None:
    """Two sensors of one type without names collide: a ConfigError names the field."""
    parsed = parse_sensors([{"type": "ds18b20"}, {"type": "ds18b20"}])
    with pytest.raises(ConfigError, match=r"edge\.sensors\.1\.name='ds18b20'"):
        build_drivers(parsed)


def test_duplicate_reading_names() -> None:
    """Two BME280s without a prefix would both publish 'temperature': refused."""
    parsed = parse_sensors([{"type": "bme280", "name": "a"}, {"type": "dht22", "name": "b"}])
    with pytest.raises(
        ConfigError, match="'temperature': reading name also produced by sensor 'a'"
    ):
        build_drivers(parsed)


class Broken:
    """A driver that fails in the given way."""

    name = "broken"
    interval = 1.0

    def __init__(self, error: Exception) -> None:
        self.error = error

    def read(self) -> list[Sample]:
        raise self.error

    def close(self) -> None:
        pass


def test_read_safely_logs_and_keeps_partial_samples(caplog: pytest.LogCaptureFixture) -> None:
    """A SensorError is logged; good samples that came with it are returned."""
    good = Sample("temperature.a", 1.0, "Cel", 0)
    samples, error = read_safely(Broken(SensorError("probe b: CRC", samples=[good])))
    assert samples == [good]
    assert str(error) == "probe b: CRC"
    assert "sensor read failed sensor=broken error=probe b: CRC" in caplog.text


def test_read_safely_contains_driver_bugs(caplog: pytest.LogCaptureFixture) -> None:
    """Any other exception becomes a SensorError, logged with its traceback."""
    samples, error = read_safely(Broken(ZeroDivisionError("oops")))
    assert samples == []
    assert str(error) == "driver error: ZeroDivisionError: oops"
    assert "Traceback" in caplog.text


def test_sample_config_in_docs_validates(tmp_path: Path) -> None:
    """Every sensor example of docs/edge-sensors.md is a valid [[edge.sensors]] table."""
    import tomllib

    docs = Path(__file__).parents[2] / "docs" / "edge-sensors.md"
    blocks = docs.read_text().split("```toml\n")[1:]
    assert blocks
    for block in blocks:
        data = tomllib.loads(block.split("```", 1)[0])
        build_drivers(parse_sensors(data["edge"]["sensors"]))

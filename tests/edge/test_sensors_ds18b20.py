"""The DS18B20 driver: w1_slave parsing and the error cases of real 1-Wire buses."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.sensors.base import Sample, SensorError
from edge.sensors.ds18b20 import DS18B20Config, parse_w1_slave
from iotpipe.errors import ConfigError
from tests.edge.fixtures import PROBE_A, PROBE_B, W1_GOOD, copy_tree, fixed_clock

T0 = fixed_clock()


def test_parse_good_read() -> None:
    """The t= value of a YES-CRC read is the temperature in millidegrees."""
    assert parse_w1_slave(W1_GOOD) == 23.125


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty read"),
        ("\n", "empty read"),
        (
            "72 01 4b 46 7f ff 0e 10 57 : crc=12 NO\n72 01 4b 46 7f ff 0e 10 57 t=23125\n",
            "CRC check failed",
        ),
        (
            "00 00 00 00 00 00 00 00 00 : crc=00 YES\n00 00 00 00 00 00 00 00 00 t=0\n",
            "all-zero read",
        ),
        (
            "50 05 4b 46 7f ff 0c 10 1c : crc=1c YES\n50 05 4b 46 7f ff 0c 10 1c t=85000\n",
            "85 Cel power-on value",
        ),
        ("72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n", "malformed"),
        (
            "ff ff ff ff ff ff ff ff ff : crc=ff YES\nff ff ff ff ff ff ff ff ff t=-62\n",
            "all-ones read",
        ),
        (
            "90 08 4b 46 7f ff 10 10 aa : crc=aa YES\n90 08 4b 46 7f ff 10 10 aa t=137000\n",
            "implausible",
        ),
    ],
)
def test_parse_errors(text: str, reason: str) -> None:
    """CRC NO, empty, all-zero, 85 Cel power-on and garbage reads are errors, not readings."""
    with pytest.raises(SensorError, match=reason):
        parse_w1_slave(text)


def test_discovers_every_probe(tmp_path: Path) -> None:
    """Every 28-* device is read and named temperature.<id>."""
    driver = DS18B20Config(root=copy_tree(tmp_path)).driver(clock=fixed_clock)
    assert driver.interval == 30.0
    assert driver.read() == [
        Sample(f"temperature.{PROBE_A}", 23.125, "Cel", T0),
        Sample(f"temperature.{PROBE_B}", -10.125, "Cel", T0),
    ]


def test_configured_names_and_only_listed(tmp_path: Path) -> None:
    """A probe listed in devices gets its configured name; only_listed skips the rest."""
    config = DS18B20Config(root=copy_tree(tmp_path), devices={PROBE_B: "freezer"}, only_listed=True)
    assert config.reading_names() == ["freezer"]
    assert [(s.sensor, s.value) for s in config.driver().read()] == [("freezer", -10.125)]


def test_bad_probe_fails_the_read_and_keeps_the_good_one(tmp_path: Path) -> None:
    """One probe's CRC error raises, naming it; the other probe's reading is in err.samples."""
    root = copy_tree(tmp_path)
    (root / f"bus/w1/devices/{PROBE_B}/w1_slave").write_text(
        "5e ff 4b 46 7f ff 02 10 c9 : crc=00 NO\n5e ff 4b 46 7f ff 02 10 c9 t=-10125\n"
    )
    with pytest.raises(SensorError, match=f"{PROBE_B}: CRC check failed") as caught:
        DS18B20Config(root=root).driver(clock=fixed_clock).read()
    assert caught.value.samples == (Sample(f"temperature.{PROBE_A}", 23.125, "Cel", T0),)


def test_listed_probe_missing(tmp_path: Path) -> None:
    """A listed probe that is not on the bus is an error naming it."""
    config = DS18B20Config(root=copy_tree(tmp_path), devices={"28-000000000bad": "attic"})
    with pytest.raises(SensorError, match="28-000000000bad: not on the bus"):
        config.driver().read()


def test_no_probes_points_at_the_overlay(tmp_path: Path) -> None:
    """An empty bus says how to enable 1-Wire."""
    (tmp_path / "bus/w1/devices").mkdir(parents=True)
    with pytest.raises(SensorError, match="dtoverlay=w1-gpio"):
        DS18B20Config(root=tmp_path).driver().read()


def test_config_bounds() -> None:
    """The interval cannot be shorter than a conversion allows; device ids are checked."""
    with pytest.raises(ConfigError, match="greater than or equal to 2"):
        DS18B20Config(interval=1.0)
    with pytest.raises(ConfigError, match="not a DS18B20 id"):
        DS18B20Config(devices={"10-000802b4": "old"})
    with pytest.raises(ConfigError, match="1-64 characters"):
        DS18B20Config(devices={PROBE_A: "bad name"})

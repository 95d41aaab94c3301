"""The thermal driver: SoC temperature from /sys/class/thermal fixture trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.sensors.base import Sample, SensorError
from edge.sensors.thermal import ThermalConfig, parse_millidegrees
from tests.edge.fixtures import copy_tree, fixed_clock

T0 = fixed_clock()


def test_reads_every_zone_named_by_number(tmp_path: Path) -> None:
    """Zone 0 is cpu.temperature, other zones thermal.zoneN, millidegrees become Cel."""
    root = copy_tree(tmp_path)
    driver = ThermalConfig(root=root).driver(clock=fixed_clock)
    assert driver.name == "thermal"
    assert driver.read() == [
        Sample("cpu.temperature", 48.312, "Cel", T0),
        Sample("thermal.zone1", 51.0, "Cel", T0),
    ]


def test_configured_zones_and_prefix(tmp_path: Path) -> None:
    """Only the listed zones are read, and the prefix goes in front of the reading name."""
    root = copy_tree(tmp_path)
    config = ThermalConfig(root=root, zones=[0], prefix="soc", name="cpu")
    assert config.reading_names() == ["soc.cpu.temperature"]
    assert [s.sensor for s in config.driver().read()] == ["soc.cpu.temperature"]


def test_failing_zone_fails_the_read_but_keeps_the_others(tmp_path: Path) -> None:
    """A garbage zone raises SensorError naming it; the good zone rides in err.samples."""
    root = copy_tree(tmp_path)
    (root / "class/thermal/thermal_zone1/temp").write_text("garbage\n")
    with pytest.raises(SensorError, match="thermal_zone1/temp: not millidegrees") as caught:
        ThermalConfig(root=root).driver(clock=fixed_clock).read()
    assert caught.value.samples == (Sample("cpu.temperature", 48.312, "Cel", T0),)


def test_no_zones_is_an_error(tmp_path: Path) -> None:
    """A machine without thermal zones fails the read with a clear reason."""
    (tmp_path / "class/thermal").mkdir(parents=True)
    with pytest.raises(SensorError, match="no thermal zones"):
        ThermalConfig(root=tmp_path).driver().read()


def test_missing_configured_zone(tmp_path: Path) -> None:
    """A configured zone that does not exist fails with the OS error."""
    root = copy_tree(tmp_path)
    with pytest.raises(SensorError, match="thermal_zone7/temp: No such file"):
        ThermalConfig(root=root, zones=[7]).driver().read()


@pytest.mark.parametrize(
    ("text", "reason"),
    [("", "empty read"), ("-273000\n", "implausible"), ("999999\n", "implausible")],
)
def test_parse_rejects(text: str, reason: str) -> None:
    """Empty and physically impossible values are errors, not readings."""
    with pytest.raises(SensorError, match=reason):
        parse_millidegrees(text, "temp")


def test_negative_millidegrees_parse() -> None:
    """Sub-zero zones (signed millidegrees) are readings."""
    assert parse_millidegrees("-5250\n", "temp") == -5.25

"""The simulated driver: the simulator's profiles as a sensor."""

from __future__ import annotations

import pytest

from edge.sensors.simulated import SimulatedConfig
from iotpipe.errors import ConfigError
from tests.edge.fixtures import fixed_clock

T0 = fixed_clock()


def test_default_signals_with_units() -> None:
    """By default temperature, humidity and pressure, in the simulator's units and ranges."""
    samples = SimulatedConfig(seed=1).driver(clock=fixed_clock).read()
    assert [(s.sensor, s.unit, s.ts_ms) for s in samples] == [
        ("temperature", "Cel", T0),
        ("humidity", "%RH", T0),
        ("pressure", "Pa", T0),
    ]
    values = [float(s.value) for s in samples]
    assert 0 < values[0] < 40
    assert 0 <= values[1] <= 100
    assert 98_000 <= values[2] <= 104_000


def test_same_seed_same_readings() -> None:
    """Two drivers with one seed read the same values at the same times."""
    config = SimulatedConfig(seed=7, sensors=["temperature", "power", "door"], prefix="sim")
    a, b = config.driver(clock=fixed_clock), config.driver(clock=fixed_clock)
    assert a.read() == b.read()
    sensors = [s.sensor for s in a.read()]
    assert sensors == ["sim.temperature", "sim.power", "sim.door"] == config.reading_names()
    assert isinstance(a.read()[2].value, bool)


def test_values_change_over_time() -> None:
    """Later reads follow the signal (a clock an hour on gives another temperature)."""
    now = [T0]
    driver = SimulatedConfig(seed=3, sensors=["temperature"]).driver(clock=lambda: now[0])
    first = driver.read()[0].value
    now[0] += 3_600_000
    assert driver.read()[0].value != first


def test_unknown_signal_is_rejected() -> None:
    """Only the simulator's sensor names are accepted."""
    with pytest.raises(ConfigError, match="temperature"):
        SimulatedConfig(sensors=["voltage"])  # type: ignore[list-item]

"""Sensor drivers of the edge agent, one module each, chosen by a config's ``type``.

    thermal     CPU/SoC temperature, /sys/class/thermal/thermal_zone*/temp      Cel
    ds18b20     1-Wire probes, /sys/bus/w1/devices/28-*/w1_slave               Cel
    bme280      I2C temperature/humidity/pressure (smbus2)                      Cel %RH Pa
    dht22       IIO dht11 driver, in_temp_input / in_humidityrelative_input     Cel %RH
    system      /proc/loadavg, /proc/meminfo, disk usage                        1 By %
    simulated   the simulator's signal profiles                                 as profiled

The agent validates ``[[edge.sensors]]`` tables as :data:`SensorConfig` and calls
:func:`build_drivers`. :data:`DRIVERS` names each driver's config class; its module is imported
only when a table names its type (the agent's footprint: most Pis run one or two drivers). Driver modules import only the standard library and :mod:`iotpipe.schema`
(no pydantic: the agent's footprint); hardware
libraries (smbus2) are imported when a driver first touches its hardware, so a box without them
still runs every other driver.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from edge.sensors.base import Driver, Sample, SensorError
from iotpipe.errors import ConfigError
from iotpipe.schema import LazyTagged, convert

if TYPE_CHECKING:
    from edge.sensors.bme280 import BME280Config
    from edge.sensors.dht22 import DHT22Config
    from edge.sensors.ds18b20 import DS18B20Config
    from edge.sensors.simulated import SimulatedConfig
    from edge.sensors.system import SystemConfig
    from edge.sensors.thermal import ThermalConfig

__all__ = [
    "DRIVERS",
    "BME280Config",
    "DHT22Config",
    "DS18B20Config",
    "Driver",
    "Sample",
    "SensorConfig",
    "SensorError",
    "SimulatedConfig",
    "SystemConfig",
    "ThermalConfig",
    "build_driver",
    "build_drivers",
    "parse_sensors",
    "read_safely",
]

log = logging.getLogger(__name__)

#: Each ``type`` -> its config class, ``module:Class`` (imported when a table names it).
DRIVERS = {
    "thermal": "edge.sensors.thermal:ThermalConfig",
    "ds18b20": "edge.sensors.ds18b20:DS18B20Config",
    "bme280": "edge.sensors.bme280:BME280Config",
    "dht22": "edge.sensors.dht22:DHT22Config",
    "system": "edge.sensors.system:SystemConfig",
    "simulated": "edge.sensors.simulated:SimulatedConfig",
}

_LAZY = LazyTagged(DRIVERS)

#: One ``[[edge.sensors]]`` table, told apart by its ``type``.
if TYPE_CHECKING:
    SensorConfig = (
        ThermalConfig | DS18B20Config | BME280Config | DHT22Config | SystemConfig | SimulatedConfig
    )
else:
    SensorConfig = _LAZY

_CONFIGS = {path.rpartition(":")[2]: tag for tag, path in DRIVERS.items()}


def __getattr__(name: str) -> Any:
    """The config classes by name (``from edge.sensors import ThermalConfig``), imported now."""
    if name in _CONFIGS:
        return _LAZY.section(_CONFIGS[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_sensors(tables: Sequence[Mapping[str, Any]]) -> list[SensorConfig]:
    """Validate ``[[edge.sensors]]`` tables as the agent does, each by its ``type``.

    Raises:
        ConfigError: a table is invalid (the field is named from ``edge.sensors`` on).
    """
    try:
        parsed: list[SensorConfig] = convert(list[SensorConfig], tables)
    except ConfigError as err:
        raise ConfigError(f"edge.sensors.{err.field}", err.value, err.allowed) from None
    except ValueError as err:
        raise ConfigError("edge.sensors", tables, str(err)) from None
    return parsed


def build_driver(config: SensorConfig) -> Driver:
    """The driver for one sensor config; nothing is opened until its first read."""
    return config.driver()


def build_drivers(configs: Iterable[SensorConfig]) -> list[Driver]:
    """Drivers for every configured sensor.

    Raises:
        ConfigError: two sensors share a name, or two would publish the same reading name
            (readings are identified by sensor name and time: one would overwrite the other).
    """
    configs = list(configs)
    names: set[str] = set()
    for index, config in enumerate(configs):
        if config.sensor_name in names:
            raise ConfigError(
                f"edge.sensors.{index}.name",
                config.sensor_name,
                "sensor names must be unique (set name = ... on each sensor of a type)",
            )
        names.add(config.sensor_name)
    seen: dict[str, str] = {}
    for config in configs:
        for reading in config.reading_names():
            other = seen.setdefault(reading, config.sensor_name)
            if other != config.sensor_name:
                raise ConfigError(
                    f"edge.sensors.{config.sensor_name}",
                    reading,
                    f"reading name also produced by sensor {other!r} (set prefix = ...)",
                )
    return [build_driver(config) for config in configs]


def read_safely(driver: Driver) -> tuple[list[Sample], SensorError | None]:
    """Read once, never raising: (good samples, the error if the read failed).

    A :class:`SensorError` is logged at WARNING; any other exception is a driver bug, logged with
    its traceback and reported as a SensorError, so one bad driver never stops the others.
    """
    try:
        return driver.read(), None
    except SensorError as err:
        log.warning("sensor read failed sensor=%s error=%s", driver.name, err)
        return list(err.samples), err
    except Exception as err:
        log.exception("sensor driver crashed sensor=%s", driver.name)
        return [], SensorError(f"driver error: {type(err).__name__}: {err}")

"""What every sensor driver provides: samples, errors, and the driver protocol.

A driver reads one kind of hardware (or procfs/sysfs file, or a simulated signal) and returns
:class:`Sample` values. A failed read raises :class:`SensorError` with a readable reason; the
agent logs and counts it and goes on with the other sensors. Hardware libraries (smbus2, ...)
are imported inside the driver that needs them, only when it is configured.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from iotpipe.schema import Schema, setting
from iotpipe.wire import SENSOR_RULE, is_valid_sensor

#: A reading's value, as the wire contract allows: a finite number, a boolean or a string.
Value = float | int | bool | str


class Sample(NamedTuple):
    """One reading of one sensor: the wire contract's ``readings[]`` item, time resolved."""

    sensor: str
    value: Value
    unit: str | None
    ts_ms: int


class SensorError(Exception):
    """A read failed (no device, bad CRC, timeout, implausible value...): skip this reading.

    A driver that reads several devices (every DS18B20 probe on the bus, every thermal zone)
    raises it when any one of them fails; the readings of the others that did succeed travel in
    :attr:`samples`, so the caller may still publish them while counting the failure.

    Attributes:
        samples: good readings taken in the same read, if any (empty for a single device).
    """

    def __init__(self, message: str, *, samples: Sequence[Sample] = ()) -> None:
        super().__init__(message)
        self.samples: tuple[Sample, ...] = tuple(samples)


class Driver(Protocol):
    """A configured sensor."""

    @property
    def name(self) -> str:
        """The configured name (unique per agent), used in logs and metrics."""
        ...

    @property
    def interval(self) -> float:
        """Seconds between reads."""
        ...

    def read(self) -> list[Sample]:
        """Read once; raise :class:`SensorError` on failure (never return partial garbage)."""
        ...

    def close(self) -> None:
        """Release files and buses."""
        ...


def wall_ms() -> int:
    """Now, as Unix epoch milliseconds: the default clock of every driver."""
    return time.time_ns() // 1_000_000


#: A clock returning Unix epoch milliseconds (injected into drivers so tests fix the time).
WallClock = Callable[[], int]


def check_reading_name(value: str) -> None:
    """A sensor or reading name as the wire contract allows it: 1-64 of ``A-Z a-z 0-9 _ - .``.

    Raises:
        ValueError: it is not.
    """
    if not is_valid_sensor(value):
        raise ValueError(f"must be {SENSOR_RULE} (wire contract)")


def _sensor_name(value: str) -> None:
    if value:
        check_reading_name(value)


class DriverConfig(Schema):
    """Settings every driver has; each driver's model adds a ``type`` tag and its own fields.

    Subclasses narrow ``interval`` with their own default and bounds (a DS18B20 conversion takes
    750 ms, a DHT22 must rest 2 s between reads).
    """

    name: str = setting(
        "",
        "unique name of this sensor in logs and metrics; default: its type",
        check=_sensor_name,
    )
    prefix: str = setting(
        "",
        "prepended to every reading name as '<prefix>.' (two BME280s: "
        "'indoor', 'outdoor'); empty = none",
        pattern=r"^([A-Za-z0-9_-][A-Za-z0-9_.-]{0,31})?$",
    )
    interval: float = setting(30.0, "seconds between reads", ge=1.0, le=86_400.0)

    @property
    def sensor_name(self) -> str:
        """The configured name, or the type tag when none is set."""
        return self.name or str(getattr(self, "type", type(self).__name__))

    def reading(self, base: str) -> str:
        """The reading name for ``base`` (``temperature``) with the configured prefix."""
        return f"{self.prefix}.{base}" if self.prefix else base

    def reading_names(self) -> Iterable[str]:
        """The reading names this sensor is known to produce before it runs (may be partial)."""
        return ()


def read_text(path: Path) -> str:
    """The content of a small sysfs/procfs file.

    Raises:
        SensorError: the file cannot be read (names the file and the OS error).
    """
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError as err:
        raise SensorError(f"{path}: {err.strerror or err}") from None

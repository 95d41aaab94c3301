"""DS18B20 1-Wire temperature probes, through the kernel's w1-therm driver.

Each probe appears as ``/sys/bus/w1/devices/28-<serial>/w1_slave`` (family code 28). Reading
the file starts a conversion (about 750 ms at 12 bits) and returns two lines: the nine scratchpad
bytes with the kernel's CRC verdict, then the same bytes and the temperature in millidegrees::

    72 01 4b 46 7f ff 0e 10 57 : crc=57 YES
    72 01 4b 46 7f ff 0e 10 57 t=23125

Errors, not readings: a ``NO`` CRC verdict (noise, a long cable), an empty read (probe gone),
all-zero bytes (data line held low, missing pull-up) and 85 °C, the scratchpad's power-on value,
which means no conversion happened (usually a parasite-power supply too weak for it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from edge.sensors.base import (
    DriverConfig,
    Sample,
    SensorError,
    WallClock,
    check_reading_name,
    read_text,
    wall_ms,
)
from iotpipe.schema import setting

#: Millidegrees of the power-on reset scratchpad: no conversion took place.
POWER_ON_MILLIDEGREES = 85_000
#: The DS18B20's measuring range, °C.
_RANGE_CEL = (-55.0, 125.0)
_FAMILY = "28-"


def _check_devices(devices: dict[str, str]) -> None:
    for device, reading in devices.items():
        if not device.startswith(_FAMILY) or "/" in device or len(device) > 64:
            raise ValueError(f"{device!r} is not a DS18B20 id (28-xxxxxxxxxxxx)")
        try:
            check_reading_name(reading)
        except ValueError as err:
            raise ValueError(f"{device}: {err}") from None


class DS18B20Config(DriverConfig):
    """``type = "ds18b20"``: every DS18B20 on the 1-Wire bus, or the listed ones."""

    type: Literal["ds18b20"] = "ds18b20"
    interval: float = setting(
        30.0, "seconds between reads (a conversion takes 0.75 s)", ge=2.0, le=86_400.0
    )
    root: Path = setting(Path("/sys"), "sysfs mount point")
    devices: dict[str, str] = setting(
        {},
        "probe id (28-xxxxxxxxxxxx) -> reading name; listed probes must answer, "
        "others found on the bus are read as temperature.<id>",
        check=_check_devices,
    )
    only_listed: bool = setting(False, "read only the probes listed in devices")

    def reading_names(self) -> list[str]:
        """Reading names of the listed probes."""
        return [self.reading(name) for name in self.devices.values()]

    def driver(self, *, clock: WallClock = wall_ms) -> DS18B20Driver:
        """Build the driver."""
        return DS18B20Driver(self, clock=clock)


def parse_w1_slave(text: str, where: str = "w1_slave") -> float:
    """Degrees Celsius from the content of a ``w1_slave`` file.

    Raises:
        SensorError: empty, CRC not ``YES``, all-zero or all-ones scratchpad, the 85 °C power-on value,
            malformed, or outside the probe's range.
    """
    lines = text.strip().splitlines()
    if not lines:
        raise SensorError(f"{where}: empty read (probe disconnected?)")
    if len(lines) < 2 or "crc=" not in lines[0] or "t=" not in lines[1]:
        raise SensorError(f"{where}: malformed read {text.strip()[:80]!r}")
    if not lines[0].rstrip().endswith("YES"):
        raise SensorError(f"{where}: CRC check failed (noise on the line?)")
    scratchpad = lines[0].split(":", 1)[0].split()
    if scratchpad and all(byte == "00" for byte in scratchpad):
        raise SensorError(f"{where}: all-zero read (data line held low? missing pull-up?)")
    if scratchpad and all(byte.lower() == "ff" for byte in scratchpad):
        raise SensorError(f"{where}: all-ones read (no probe answered: open data line?)")
    raw = lines[1].rsplit("t=", 1)[1].strip()
    try:
        millidegrees = int(raw)
    except ValueError:
        raise SensorError(f"{where}: malformed temperature {raw[:16]!r}") from None
    if millidegrees == POWER_ON_MILLIDEGREES:
        raise SensorError(f"{where}: 85 Cel power-on value, no conversion (weak power supply?)")
    celsius = millidegrees / 1000.0
    low, high = _RANGE_CEL
    if not low <= celsius <= high:
        raise SensorError(f"{where}: implausible temperature {celsius:g} Cel")
    return celsius


class DS18B20Driver:
    """Reads the DS18B20 probes of one 1-Wire bus master."""

    def __init__(self, config: DS18B20Config, *, clock: WallClock = wall_ms) -> None:
        self.config = config
        self._clock = clock
        self._base = config.root / "bus" / "w1" / "devices"

    @property
    def name(self) -> str:
        """The configured name."""
        return self.config.sensor_name

    @property
    def interval(self) -> float:
        """Seconds between reads."""
        return self.config.interval

    def _devices(self) -> list[str]:
        listed = list(self.config.devices)
        if self.config.only_listed:
            return listed
        try:
            found = sorted(p.name for p in self._base.glob(f"{_FAMILY}*"))
        except OSError as err:
            raise SensorError(f"{self._base}: {err.strerror or err}") from None
        devices = listed + [d for d in found if d not in self.config.devices]
        if not devices:
            raise SensorError(f"no DS18B20 probes under {self._base} (is dtoverlay=w1-gpio set?)")
        return devices

    def read(self) -> list[Sample]:
        """Read every probe; a failing probe fails the read (the others ride in the error)."""
        samples: list[Sample] = []
        errors: list[str] = []
        for device in self._devices():
            path = self._base / device / "w1_slave"
            try:
                if not path.parent.is_dir():
                    raise SensorError(f"{device}: not on the bus")
                celsius = parse_w1_slave(read_text(path), device)
            except SensorError as err:
                errors.append(str(err))
                continue
            base = self.config.devices.get(device, f"temperature.{device}")
            samples.append(Sample(self.config.reading(base), celsius, "Cel", self._clock()))
        if errors:
            raise SensorError("; ".join(errors), samples=samples)
        return samples

    def close(self) -> None:
        """Nothing to release: every read opens and closes its files."""

"""CPU/SoC temperature from the kernel's thermal zones (``/sys/class/thermal``).

Each ``thermal_zone<N>/temp`` file holds one integer in millidegrees Celsius (``48312`` =
48.312 °C). On a Raspberry Pi ``thermal_zone0`` is the SoC (``cpu-thermal``), so zone 0 is
reported as ``cpu.temperature`` and any other zone as ``thermal.zone<N>``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from edge.sensors.base import DriverConfig, Sample, SensorError, WallClock, read_text, wall_ms
from iotpipe.schema import setting

_ZONE_RE = re.compile(r"^thermal_zone(\d+)$")
#: Below or above these a zone is broken, not hot or cold (millidegrees are signed).
_PLAUSIBLE_CEL = (-60.0, 150.0)


class ThermalConfig(DriverConfig):
    """``type = "thermal"``: the SoC temperature, and any other thermal zone."""

    type: Literal["thermal"] = "thermal"
    interval: float = setting(10.0, "seconds between reads", ge=1.0, le=86_400.0)
    root: Path = setting(Path("/sys"), "sysfs mount point")
    zones: list[int] | None = setting(
        None, "zone numbers to read (thermal_zone<N>); default: every zone found"
    )

    def reading_names(self) -> list[str]:
        """Reading names of the configured zones (none known before discovery)."""
        return [self.reading(zone_reading(n)) for n in self.zones or []]

    def driver(self, *, clock: WallClock = wall_ms) -> ThermalDriver:
        """Build the driver."""
        return ThermalDriver(self, clock=clock)


def zone_reading(zone: int) -> str:
    """The reading name of thermal zone ``zone``."""
    return "cpu.temperature" if zone == 0 else f"thermal.zone{zone}"


def parse_millidegrees(text: str, where: str) -> float:
    """Degrees Celsius from a sysfs millidegree file's content.

    Raises:
        SensorError: empty, not an integer, or outside any plausible temperature.
    """
    stripped = text.strip()
    if not stripped:
        raise SensorError(f"{where}: empty read")
    try:
        celsius = int(stripped) / 1000.0
    except ValueError:
        raise SensorError(f"{where}: not millidegrees: {stripped[:32]!r}") from None
    low, high = _PLAUSIBLE_CEL
    if not low <= celsius <= high:
        raise SensorError(f"{where}: implausible temperature {celsius:g} Cel")
    return celsius


class ThermalDriver:
    """Reads every configured (or discovered) thermal zone."""

    def __init__(self, config: ThermalConfig, *, clock: WallClock = wall_ms) -> None:
        self.config = config
        self._clock = clock
        self._base = config.root / "class" / "thermal"

    @property
    def name(self) -> str:
        """The configured name."""
        return self.config.sensor_name

    @property
    def interval(self) -> float:
        """Seconds between reads."""
        return self.config.interval

    def _zones(self) -> list[int]:
        if self.config.zones is not None:
            return sorted(set(self.config.zones))
        try:
            entries = [_ZONE_RE.match(p.name) for p in self._base.iterdir()]
        except OSError as err:
            raise SensorError(f"{self._base}: {err.strerror or err}") from None
        zones = sorted(int(m.group(1)) for m in entries if m)
        if not zones:
            raise SensorError(f"no thermal zones under {self._base}")
        return zones

    def read(self) -> list[Sample]:
        """Read every zone; a failing zone fails the read (the others ride in the error)."""
        ts = self._clock()
        samples: list[Sample] = []
        errors: list[str] = []
        for zone in self._zones():
            path = self._base / f"thermal_zone{zone}" / "temp"
            try:
                celsius = parse_millidegrees(read_text(path), str(path))
            except SensorError as err:
                errors.append(str(err))
                continue
            samples.append(Sample(self.config.reading(zone_reading(zone)), celsius, "Cel", ts))
        if errors:
            raise SensorError("; ".join(errors), samples=samples)
        return samples

    def close(self) -> None:
        """Nothing to release: every read opens and closes its files."""

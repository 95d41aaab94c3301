"""A simulated sensor: the simulator's signal profiles, so a Pi without sensors still reports.

The readings come from :mod:`iotpipe.signals` (daily temperature cycle, anti-correlated
humidity, a pressure random walk, power steps, battery drain, door and motion events), built
exactly as ``iotpipe simulate`` builds one device's (:func:`iotpipe.signals.build_signals`), and
evaluated at the wall-clock time of each read.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Literal

from edge.sensors.base import DriverConfig, Sample, WallClock, wall_ms
from iotpipe.schema import setting
from iotpipe.signals import SENSORS, Profiles, SensorName

if TYPE_CHECKING:
    from iotpipe.signals import Signal


class SimulatedConfig(DriverConfig):
    """``type = "simulated"``: simulated signals, named like the simulator's sensors."""

    type: Literal["simulated"] = "simulated"
    interval: float = setting(10.0, "seconds between reads", ge=0.1, le=86_400.0)
    sensors: list[SensorName] = setting(
        ["temperature", "humidity", "pressure"],
        f"signals to report, of: {', '.join(SENSORS)}",
        min_length=1,
    )
    seed: int | None = setting(None, "random seed (same seed, same signals); none = random")
    profiles: Profiles = setting(Profiles(), "signal shapes, as [simulate.profiles]")

    def reading_names(self) -> list[str]:
        """The configured signals (with the prefix)."""
        return [self.reading(name) for name in dict.fromkeys(self.sensors)]

    def driver(self, *, clock: WallClock = wall_ms) -> SimulatedDriver:
        """Build the driver."""
        return SimulatedDriver(self, clock=clock)


class SimulatedDriver:
    """Evaluates the configured signal profiles at each read's time."""

    def __init__(self, config: SimulatedConfig, *, clock: WallClock = wall_ms) -> None:
        self.config = config
        self._clock = clock
        self._signals: dict[SensorName, Signal] | None = None

    @property
    def name(self) -> str:
        """The configured name."""
        return self.config.sensor_name

    @property
    def interval(self) -> float:
        """Seconds between reads."""
        return self.config.interval

    def _build(self) -> dict[SensorName, Signal]:
        if self._signals is None:
            from iotpipe.signals import build_signals

            rng = random.Random(self.config.seed)
            sensors = list(dict.fromkeys(self.config.sensors))
            self._signals = build_signals(rng, sensors, self.config.profiles)
        return self._signals

    def read(self) -> list[Sample]:
        """The value of every signal now (numbers rounded as the simulator rounds them)."""
        signals = self._build()
        ts = self._clock()
        t = ts / 1000.0
        samples: list[Sample] = []
        for name, signal in signals.items():
            value = signal(t)
            if not isinstance(value, bool):
                decimals = getattr(getattr(self.config.profiles, name), "decimals", 2)
                value = round(value, int(decimals))
            samples.append(Sample(self.config.reading(name), value, signal.unit, ts))
        return samples

    def close(self) -> None:
        """Nothing to release."""

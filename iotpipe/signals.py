"""Signal profiles: what one simulated sensor reads at a given time.

Each profile is a small object called with the simulated time ``t`` (Unix seconds, as a float)
and returning the reading at that instant. A profile draws its randomness from the
:class:`random.Random` it is given and keeps only the state its signal needs (the last drift,
the current load level, the next door event), so the same ``Random`` seed and the same sequence
of times always give the same readings: profiles are pure apart from that explicit state.

Times must not go backwards; a repeated time returns the cached reading without drawing again,
which is how :class:`Humidity` reads the temperature of the same instant.

    Temperature   daily cosine cycle + slowly wandering drift + white noise     Cel
    Humidity      anti-correlated with a Temperature, noise, clamped 0..100     %RH
    Pressure      random walk reflected into [low, high]                        Pa
    Power         load steps between levels at random (exponential) times      W
    Battery       linear drain, monotone, never below 0                         %
    Binary        two-state events (door open/closed, motion on/off)            1

Also here: the profiles' settings (:class:`Profiles`, the ``[simulate.profiles]`` tables) and
:func:`build_signals`, which makes one device's signals from them. They live in the shared core
because two components use them: ``iotpipe simulate`` and the edge agent's ``simulated`` driver.
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Sequence
from typing import Literal, Protocol

from iotpipe.errors import ConfigError
from iotpipe.schema import Schema, setting

DAY = 86_400.0
HOUR = 3_600.0
_OMEGA = 2.0 * math.pi / DAY  # the daily cycle's angular frequency, rad/s
_cos = math.cos


# AS241's coefficients, highest power first: (numerator, denominator) near the median
# (|p - 0.5| <= 0.425), and in the tails.
_AS241_CENTRAL = (
    (2.5090809287301226727e3, 3.3430575583588128105e4, 6.7265770927008700853e4,
     4.5921953931549871457e4, 1.3731693765509461125e4, 1.9715909503065514427e3,
     1.3314166789178437745e2, 3.3871328727963666080e0),
    (5.2264952788528545610e3, 2.8729085735721942674e4, 3.9307895800092710610e4,
     2.1213794301586595867e4, 5.3941960214247511077e3, 6.8718700749205790830e2,
     4.2313330701600911252e1, 1.0),
)  # fmt: skip
_AS241_TAIL = (
    (7.7454501427834140764e-4, 2.2723844989269184583e-2, 2.4178072517745061177e-1,
     1.2704582524523683826e0, 3.6478483247632046050e0, 5.7694972214606914055e0,
     4.6303378461565452959e0, 1.4234371107496835773e0),
    (1.0507500716444168432e-9, 5.4759380849953449460e-4, 1.5198666563616457197e-2,
     1.4810397642748007459e-1, 6.8976733498510000455e-1, 1.6763848301838038494e0,
     2.0531916266377588219e0, 1.0),
)  # fmt: skip


def _horner(coefficients: tuple[float, ...], x: float) -> float:
    acc = coefficients[0]
    for c in coefficients[1:]:
        acc = acc * x + c
    return acc


def normal_quantile(p: float) -> float:
    """The standard normal distribution's quantile at ``p``, for ``exp(-25) <= p <= 1 - exp(-25)``.

    Wichura's algorithm AS241 (Applied Statistics 37(3), 1988) evaluated in the same order as
    :mod:`statistics` does for ``NormalDist().inv_cdf``, so the floats are the same (a test
    compares the whole noise table). Written out because importing :mod:`statistics` (with
    :mod:`decimal` and :mod:`fractions`) costs the edge agent ~0.8 MB of resident memory.
    """
    q = p - 0.5
    if math.fabs(q) <= 0.425:
        r = 0.180625 - q * q
        num, den = _AS241_CENTRAL
        return _horner(num, r) * q / _horner(den, r)
    r = math.sqrt(-math.log(p if q <= 0.0 else 1.0 - p)) - 1.6  # <= 5 - 1.6 in this domain
    num, den = _AS241_TAIL
    x = _horner(num, r) / _horner(den, r)
    return -x if q < 0.0 else x


# Noise comes from a table of standard-normal quantiles indexed by one uniform draw: 3x cheaper
# than random.gauss() (this is the simulator's hot path), as deterministic, and indistinguishable
# from a true normal at sensor resolution (4096 levels, tails cut at +-3.7 sigma). Kept as an
# array of doubles (32 KiB) rather than a tuple of floats (128 KiB): the edge agent runs it too.
_NZ = 4096
_Z = array("d", (normal_quantile((i + 0.5) / _NZ) for i in range(_NZ)))

_JSON_BOOL = (b"false", b"true")

#: Simulated seconds between updates of the temperature's slow drift.
_DRIFT_STEP = 10.0


class Signal(Protocol):
    """A sensor profile: the reading at simulated time ``t`` (seconds since the Unix epoch)."""

    unit: str

    def __call__(self, t: float) -> float | bool:
        """The reading at time ``t``."""
        ...


class Temperature:
    """Air temperature: a daily cycle, a slow drift and white noise.

    ``value(t) = mean + amplitude * cos(2 pi (hour(t) - peak_hour) / 24) + drift(t) + noise``,
    where ``hour(t)`` is the UTC hour of day and ``drift`` is an Ornstein-Uhlenbeck process (a
    random walk pulled back towards 0) with standard deviation ``drift`` and correlation time
    ``drift_hours``: it wanders by about ``drift`` degrees over a few hours and never runs away.

    Attributes:
        mean: the device's own mean (the fleet mean plus this device's offset).
    """

    unit = "Cel"

    def __init__(
        self,
        rng: random.Random,
        *,
        mean: float = 21.0,
        amplitude: float = 3.0,
        peak_hour: float = 15.0,
        noise: float = 0.1,
        drift: float = 0.5,
        drift_hours: float = 6.0,
    ) -> None:
        self._rand = rng.random
        self.mean = mean
        self.amplitude = amplitude
        self._phase = peak_hour * HOUR
        self.noise = noise
        self.drift_sd = drift
        self._tau = max(drift_hours, 1e-6) * HOUR
        self._drift = rng.gauss(0.0, drift) if drift > 0 else 0.0
        self._drift_t: float | None = None
        self._last_t: float | None = None
        self._last = mean
        self._dt = -1.0
        self._decay = 1.0
        self._kick = 0.0

    def cycle(self, t: float) -> float:
        """The noise-free daily component at ``t`` (peaks at ``peak_hour`` UTC)."""
        return self.amplitude * _cos(_OMEGA * (t - self._phase))

    def __call__(self, t: float) -> float:
        """The temperature at ``t``."""
        last_t = self._last_t
        if last_t is not None and t <= last_t:
            return self._last
        self._last_t = t
        drift_t = self._drift_t
        if drift_t is None:
            self._drift_t = t
        elif t - drift_t >= _DRIFT_STEP and self.drift_sd > 0:
            # The drift wanders over hours, so stepping it every few seconds is exact enough
            # (the OU update is exact for any step) and spares the hot path most updates.
            dt = t - drift_t
            self._drift_t = t
            if dt != self._dt:  # sampling is regular, so the coefficients are cached
                self._dt = dt
                self._decay = math.exp(-dt / self._tau)
                self._kick = self.drift_sd * math.sqrt(1.0 - self._decay * self._decay)
            self._drift = self._drift * self._decay + self._kick * _Z[int(self._rand() * _NZ)]
        value = self.mean + self.amplitude * _cos(_OMEGA * (t - self._phase)) + self._drift
        if self.noise > 0:
            value += self.noise * _Z[int(self._rand() * _NZ)]
        self._last = value
        return value


class Humidity:
    """Relative humidity, falling as the temperature rises (same air, same room).

    ``value(t) = mean - per_degree * (temperature(t) - temperature.mean) + noise``, clamped to
    0..100 %RH.
    """

    unit = "%RH"

    def __init__(
        self,
        rng: random.Random,
        temperature: Temperature,
        *,
        mean: float = 45.0,
        per_degree: float = 2.5,
        noise: float = 0.5,
    ) -> None:
        self._rand = rng.random
        self.temperature = temperature
        self.mean = mean
        self.per_degree = per_degree
        self.noise = noise
        self._last_t: float | None = None
        self._last = mean

    def __call__(self, t: float) -> float:
        """The relative humidity at ``t``."""
        if self._last_t is not None and t <= self._last_t:
            return self._last
        self._last_t = t
        temperature = self.temperature
        # Usually the temperature was just sampled at t: read its cache, skip the call.
        celsius = temperature._last if temperature._last_t == t else temperature(t)
        value = self.mean - self.per_degree * (celsius - temperature.mean)
        if self.noise > 0:
            value += self.noise * _Z[int(self._rand() * _NZ)]
        value = min(100.0, max(0.0, value))
        self._last = value
        return value


class Pressure:
    """Barometric pressure: a random walk reflected back into ``[low, high]``.

    Each step adds ``N(0, step * sqrt(dt))`` Pa, so the walk's spread grows like a real
    barometer's over hours, while the reflection keeps it within weather-like bounds.
    """

    unit = "Pa"

    def __init__(
        self,
        rng: random.Random,
        *,
        start: float = 101_325.0,
        step: float = 2.0,
        low: float = 98_000.0,
        high: float = 104_000.0,
    ) -> None:
        if not low < high:
            raise ValueError("pressure low must be below high")
        self._rand = rng.random
        self.step = step
        self.low = low
        self.high = high
        self._value = min(high, max(low, start))
        self._last_t: float | None = None
        self._dt = -1.0
        self._sd = 0.0

    def __call__(self, t: float) -> float:
        """The pressure at ``t``."""
        last_t = self._last_t
        if last_t is not None and t <= last_t:
            return self._value
        self._last_t = t
        if last_t is None:
            return self._value
        dt = t - last_t
        if dt != self._dt:
            self._dt = dt
            self._sd = self.step * math.sqrt(dt)
        value = self._value + self._sd * _Z[int(self._rand() * _NZ)]
        low, high = self.low, self.high
        # Reflect at the walls (a step larger than the band is folded back repeatedly).
        while value > high or value < low:
            value = 2 * high - value if value > high else 2 * low - value
        self._value = value
        return value


class Power:
    """Electrical power: a load that steps between levels at random times, plus noise.

    The load holds each level for an exponentially distributed time with mean ``dwell``
    seconds, then jumps to another level picked at random; the reading is the level times
    ``1 + N(0, noise)``, never below 0.
    """

    unit = "W"

    def __init__(
        self,
        rng: random.Random,
        *,
        levels: Sequence[float] = (8.0, 60.0, 150.0, 900.0),
        dwell: float = 120.0,
        noise: float = 0.02,
    ) -> None:
        if not levels:
            raise ValueError("power needs at least one level")
        self._rng = rng
        self._rand = rng.random
        self.levels = tuple(levels)
        self.dwell = max(dwell, 1e-3)
        self.noise = noise
        self.level = rng.choice(self.levels)
        self._next_switch: float | None = None
        self._last_t: float | None = None
        self._last = self.level

    def __call__(self, t: float) -> float:
        """The power drawn at ``t``."""
        last_t = self._last_t
        if last_t is not None and t <= last_t:
            return self._last
        self._last_t = t
        next_switch = self._next_switch
        if next_switch is None or t >= next_switch:
            self._switch(t)
        value = self.level
        if self.noise > 0:
            value *= 1.0 + self.noise * _Z[int(self._rand() * _NZ)]
            value = value if value > 0.0 else 0.0
        self._last = value
        return value

    def _switch(self, t: float) -> None:
        """Apply every load step due by ``t`` (the first call only schedules the first)."""
        rng = self._rng
        if self._next_switch is None:
            self._next_switch = t + rng.expovariate(1.0 / self.dwell)
        while t >= self._next_switch:
            if len(self.levels) > 1:
                self.level = rng.choice(
                    [lv for lv in self.levels if lv != self.level] or self.levels
                )
            self._next_switch += rng.expovariate(1.0 / self.dwell)


class Battery:
    """Battery charge: drains linearly from ``start`` at ``drain_per_hour`` %, never rises.

    The reading depends only on the time since the first sample, so it is monotone
    non-increasing whatever the sampling rate, and it stops at 0.
    """

    unit = "%"

    def __init__(
        self, rng: random.Random, *, start: float = 100.0, drain_per_hour: float = 0.5
    ) -> None:
        del rng  # the per-device randomness is already in start and drain (see fleet.py)
        self.start = min(100.0, max(0.0, start))
        self._per_second = max(0.0, drain_per_hour) / HOUR
        self._t0: float | None = None

    def __call__(self, t: float) -> float:
        """The charge left at ``t``."""
        t0 = self._t0
        if t0 is None:
            self._t0 = t0 = t
        value = self.start - self._per_second * (t - t0) if t > t0 else self.start
        return value if value > 0.0 else 0.0


class Binary:
    """A two-state event sensor (door open/closed, motion detected/idle).

    The state flips at random times: it stays ``True`` for an exponentially distributed time
    with mean ``on_seconds`` and ``False`` for one with mean ``off_seconds``. A reading is the
    state at ``t``, so a fast sampler sees each event as a run of ``True`` readings.
    """

    unit = "1"

    def __init__(
        self, rng: random.Random, *, on_seconds: float = 30.0, off_seconds: float = 600.0
    ) -> None:
        self._expo = rng.expovariate
        self.on_seconds = max(on_seconds, 1e-3)
        self.off_seconds = max(off_seconds, 1e-3)
        # Start in the stationary distribution so a fleet does not open every door at once.
        self.state = rng.random() < self.on_seconds / (self.on_seconds + self.off_seconds)
        self.events = 0
        self._next_flip: float | None = None

    def __call__(self, t: float) -> bool:
        """The state at ``t``."""
        if self._next_flip is None:
            self._next_flip = t + self._expo(
                1.0 / (self.on_seconds if self.state else self.off_seconds)
            )
        while t >= self._next_flip:
            self.state = not self.state
            if self.state:
                self.events += 1
            self._next_flip += self._expo(
                1.0 / (self.on_seconds if self.state else self.off_seconds)
            )
        return self.state

    def json(self, t: float) -> bytes:
        """The state at ``t`` as JSON (``b"true"``/``b"false"``), for payload templates."""
        next_flip = self._next_flip
        if next_flip is not None and t < next_flip:  # the common case: no event since
            return _JSON_BOOL[self.state]
        return _JSON_BOOL[self(t)]


# ---------------------------------------------------------------------------------------------
# Settings of the profiles, and one device's signals built from them.

SensorName = Literal["temperature", "humidity", "pressure", "power", "battery", "door", "motion"]

#: Every sensor a simulated device can have, in the order readings are written.
SENSORS: tuple[SensorName, ...] = (
    "temperature",
    "humidity",
    "pressure",
    "power",
    "battery",
    "door",
    "motion",
)


class TemperatureProfile(Schema):
    """Temperature (``Cel``): daily cycle + slow drift + noise."""

    mean: float = setting(21.0, "fleet mean, degrees Celsius")
    spread: float = setting(2.0, "each device's mean is offset by up to +-spread", ge=0)
    amplitude: float = setting(3.0, "half the day-night swing", ge=0)
    peak_hour: float = setting(15.0, "UTC hour of the daily maximum", ge=0, lt=24)
    noise: float = setting(0.1, "standard deviation of the white noise", ge=0)
    drift: float = setting(0.5, "standard deviation of the slow drift", ge=0)
    drift_hours: float = setting(6.0, "how slowly the drift wanders (hours)", gt=0)
    decimals: int = setting(2, "digits after the decimal point", ge=1, le=6)


class HumidityProfile(Schema):
    """Relative humidity (``%RH``), anti-correlated with the temperature."""

    mean: float = setting(45.0, "fleet mean, %RH", ge=0, le=100)
    spread: float = setting(5.0, "each device's mean is offset by up to +-spread", ge=0)
    per_degree: float = setting(2.5, "%RH lost per degree above the mean temperature", ge=0)
    noise: float = setting(0.5, "standard deviation of the white noise", ge=0)
    decimals: int = setting(1, "digits after the decimal point", ge=1, le=6)


class PressureProfile(Schema):
    """Barometric pressure (``Pa``): a random walk bounded to [low, high]."""

    mean: float = setting(101_325.0, "fleet mean at start, Pa")
    spread: float = setting(300.0, "each device starts up to +-spread from mean", ge=0)
    step: float = setting(2.0, "walk step, Pa per square-root second", ge=0)
    low: float = setting(98_000.0, "lower bound, Pa")
    high: float = setting(104_000.0, "upper bound, Pa")
    decimals: int = setting(1, "digits after the decimal point", ge=1, le=6)

    def check(self) -> None:
        """``low`` < ``high``."""
        if not self.low < self.high:
            raise ConfigError("low", self.low, "low must be below high")


def _non_negative(levels: list[float]) -> None:
    if any(level < 0 for level in levels):
        raise ValueError("power levels must be >= 0")


class PowerProfile(Schema):
    """Electrical power (``W``): load steps between levels at random times."""

    levels: list[float] = setting(
        [8.0, 60.0, 150.0, 900.0], "loads, W", min_length=1, check=_non_negative
    )
    dwell: float = setting(120.0, "mean seconds a load level is held", gt=0)
    noise: float = setting(0.02, "relative noise (0.02 = 2 %)", ge=0)
    decimals: int = setting(1, "digits after the decimal point", ge=1, le=6)


class BatteryProfile(Schema):
    """Battery charge (``%``): drains linearly, never rises."""

    start_min: float = setting(60.0, "lowest charge at start, %", ge=0, le=100)
    start_max: float = setting(100.0, "highest charge at start, %", ge=0, le=100)
    drain_per_hour: float = setting(0.5, "mean drain, % per hour", ge=0)
    drain_spread: float = setting(0.3, "each device drains +-this fraction", ge=0, lt=1)
    decimals: int = setting(1, "digits after the decimal point", ge=1, le=6)

    def check(self) -> None:
        """``start_min`` <= ``start_max``."""
        if self.start_min > self.start_max:
            raise ConfigError("start_min", self.start_min, "start_min must not exceed start_max")


class BinaryProfile(Schema):
    """A two-state event sensor (``1``): true for ~on_seconds, false for ~off_seconds."""

    on_seconds: float = setting(30.0, "mean seconds in the true state", gt=0)
    off_seconds: float = setting(600.0, "mean seconds in the false state", gt=0)


class DoorProfile(BinaryProfile):
    """A door (``1``): open (true) for ~20 s, closed for ~15 min."""

    on_seconds: float = setting(20.0, "mean seconds open", gt=0)
    off_seconds: float = setting(900.0, "mean seconds closed", gt=0)


class MotionProfile(BinaryProfile):
    """A motion detector (``1``): active (true) for ~30 s, idle for ~5 min."""

    on_seconds: float = setting(30.0, "mean seconds active", gt=0)
    off_seconds: float = setting(300.0, "mean seconds idle", gt=0)


class Profiles(Schema):
    """Signal profiles, one table per sensor."""

    temperature: TemperatureProfile = setting(
        TemperatureProfile(), "[simulate.profiles.temperature]"
    )
    humidity: HumidityProfile = setting(HumidityProfile(), "[simulate.profiles.humidity]")
    pressure: PressureProfile = setting(PressureProfile(), "[simulate.profiles.pressure]")
    power: PowerProfile = setting(PowerProfile(), "[simulate.profiles.power]")
    battery: BatteryProfile = setting(BatteryProfile(), "[simulate.profiles.battery]")
    door: DoorProfile = setting(DoorProfile(), "[simulate.profiles.door]")
    motion: MotionProfile = setting(MotionProfile(), "[simulate.profiles.motion]")


def build_signals(
    rng: random.Random, sensors: Sequence[SensorName], profiles: Profiles
) -> dict[SensorName, Signal]:
    """One device's signal objects, with per-device offsets drawn from ``rng``.

    Humidity follows a temperature signal even when temperature itself is not reported.
    """
    p = profiles
    built: dict[SensorName, Signal] = {}
    temperature: Temperature | None = None
    for name in sensors:  # draw in a fixed order so the seed fully decides the fleet
        if name in ("temperature", "humidity") and temperature is None:
            t = p.temperature
            temperature = Temperature(
                rng,
                mean=t.mean + rng.uniform(-t.spread, t.spread),
                amplitude=t.amplitude,
                peak_hour=t.peak_hour,
                noise=t.noise,
                drift=t.drift,
                drift_hours=t.drift_hours,
            )
        if name == "temperature":
            assert temperature is not None
            built[name] = temperature
        elif name == "humidity":
            assert temperature is not None
            h = p.humidity
            built[name] = Humidity(
                rng,
                temperature,
                mean=min(100.0, max(0.0, h.mean + rng.uniform(-h.spread, h.spread))),
                per_degree=h.per_degree,
                noise=h.noise,
            )
        elif name == "pressure":
            pr = p.pressure
            built[name] = Pressure(
                rng,
                start=pr.mean + rng.uniform(-pr.spread, pr.spread),
                step=pr.step,
                low=pr.low,
                high=pr.high,
            )
        elif name == "power":
            pw = p.power
            built[name] = Power(rng, levels=pw.levels, dwell=pw.dwell, noise=pw.noise)
        elif name == "battery":
            b = p.battery
            built[name] = Battery(
                rng,
                start=rng.uniform(b.start_min, b.start_max),
                drain_per_hour=b.drain_per_hour
                * (1 + rng.uniform(-b.drain_spread, b.drain_spread)),
            )
        else:  # door, motion
            profile = p.door if name == "door" else p.motion
            built[name] = Binary(
                rng, on_seconds=profile.on_seconds, off_seconds=profile.off_seconds
            )
    return built

"""Signal profiles: each looks like the physical quantity it claims, and is deterministic."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotpipe.signals import (
    HOUR,
    Battery,
    Binary,
    Humidity,
    Power,
    Pressure,
    Temperature,
    normal_quantile,
)

#: 2026-11-26T00:00:00Z: a UTC midnight, so hour h of the day is DAY0 + h * HOUR.
DAY0 = 1_795_651_200.0


def test_temperature_daily_cycle_peaks_at_peak_hour() -> None:
    """Without noise or drift, the warmest hour is peak_hour, the coldest 12 h later, mean as set."""
    temp = Temperature(
        random.Random(1), mean=20.0, amplitude=4.0, peak_hour=15.0, noise=0.0, drift=0.0
    )
    day = [temp(DAY0 + h * HOUR) for h in range(24)]
    assert day.index(max(day)) == 15
    assert day.index(min(day)) == 3
    assert max(day) - min(day) == pytest.approx(8.0)
    assert statistics.fmean(day) == pytest.approx(20.0)


def test_temperature_noise_and_drift_stay_near_the_cycle() -> None:
    """Noise and drift move readings off the pure cycle, but only by about their size."""
    rng = random.Random(2)
    temp = Temperature(rng, mean=21.0, amplitude=3.0, noise=0.1, drift=0.5, drift_hours=6.0)
    offsets = [temp(DAY0 + i * 60.0) - 21.0 - temp.cycle(DAY0 + i * 60.0) for i in range(3 * 1440)]
    assert statistics.pstdev(offsets) > 0.05  # not a clean cosine
    assert max(abs(x) for x in offsets) < 3.0  # drift is pulled back, it never runs away


def test_humidity_is_anticorrelated_with_temperature() -> None:
    """Over two days, humidity falls when temperature rises (correlation below -0.8)."""
    rng = random.Random(3)
    temp = Temperature(rng, amplitude=4.0, noise=0.1, drift=0.3)
    hum = Humidity(rng, temp, mean=45.0, per_degree=2.5, noise=0.5)
    times = [DAY0 + i * 600.0 for i in range(2 * 144)]
    humidity, temperature = [], []
    for t in times:
        humidity.append(hum(t))  # humidity first: it makes the temperature sample t itself
        temperature.append(temp(t))  # the same instant again: the cached reading
    assert statistics.correlation(temperature, humidity) < -0.8
    assert all(0.0 <= h <= 100.0 for h in humidity)


def test_humidity_is_clamped_to_0_100() -> None:
    """Extreme coupling cannot push relative humidity outside 0..100 %RH."""
    rng = random.Random(4)
    temp = Temperature(rng, amplitude=30.0, noise=0.0, drift=0.0)
    hum = Humidity(rng, temp, mean=50.0, per_degree=50.0, noise=0.0)
    values = [hum(DAY0 + h * HOUR) for h in range(24)]
    assert min(values) == 0.0
    assert max(values) == 100.0


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    step=st.floats(0.1, 5000.0),
    dt=st.floats(0.01, 3600.0),
    width=st.floats(1.0, 10_000.0),
)
def test_pressure_walk_stays_within_bounds(seed: int, step: float, dt: float, width: float) -> None:
    """Whatever the step and sampling interval, the reflected walk never leaves [low, high]."""
    low = 100_000.0
    walk = Pressure(
        random.Random(seed), start=low + width / 2, step=step, low=low, high=low + width
    )
    values = [walk(DAY0 + i * dt) for i in range(200)]
    assert all(low <= v <= low + width for v in values)


def test_pressure_wanders() -> None:
    """The walk moves, by roughly step x sqrt(time)."""
    walk = Pressure(random.Random(5), step=2.0)
    values = [walk(DAY0 + i * 1.0) for i in range(3600)]
    moves = [b - a for a, b in itertools.pairwise(values)]
    assert 1.5 < statistics.pstdev(moves) < 2.5


def test_power_steps_between_levels() -> None:
    """Power sits near one configured level at a time and switches about duration/dwell times."""
    levels = (10.0, 100.0, 1000.0)
    power = Power(random.Random(6), levels=levels, dwell=60.0, noise=0.01)
    switches = 0
    previous = power.level
    for i in range(3600):
        value = power(DAY0 + i)
        assert any(abs(value - level) <= 0.06 * level for level in levels)
        if power.level != previous:
            switches += 1
            previous = power.level
    assert 30 <= switches <= 100  # ~60 expected


@settings(max_examples=50, deadline=None)
@given(
    start=st.floats(0.0, 100.0),
    drain=st.floats(0.0, 100.0),
    gaps=st.lists(st.floats(0.0, 10 * HOUR), min_size=1, max_size=50),
)
def test_battery_never_rises_and_never_goes_negative(
    start: float, drain: float, gaps: list[float]
) -> None:
    """Battery charge is monotone non-increasing and bounded to 0..100 for any sampling."""
    battery = Battery(random.Random(0), start=start, drain_per_hour=drain)
    t = DAY0
    last = battery(t)
    for gap in gaps:
        t += gap
        value = battery(t)
        assert 0.0 <= value <= last <= 100.0
        last = value


def test_battery_drains_at_the_configured_rate() -> None:
    """After ten hours at 2 %/h a battery that started at 90 % reads 70 %."""
    battery = Battery(random.Random(0), start=90.0, drain_per_hour=2.0)
    battery(DAY0)
    assert battery(DAY0 + 10 * HOUR) == pytest.approx(70.0)


def test_binary_events_are_booleans_with_the_configured_duty_cycle() -> None:
    """A door is a boolean, open about on/(on+off) of the time, in many separate events."""
    door = Binary(random.Random(7), on_seconds=30.0, off_seconds=270.0)
    states = [door(DAY0 + i) for i in range(86_400)]
    assert all(isinstance(s, bool) for s in states)
    assert 0.06 < sum(states) / len(states) < 0.14  # 0.1 expected
    assert door.events > 200  # ~288 openings a day
    rising = sum(1 for a, b in itertools.pairwise(states) if b and not a)
    assert rising <= door.events


def test_same_seed_same_signal() -> None:
    """Two profiles built from equal seeds give identical readings; another seed differs."""

    def run(seed: int) -> list[float]:
        rng = random.Random(seed)
        temp = Temperature(rng)
        hum = Humidity(rng, temp)
        pressure = Pressure(rng)
        return [v for i in range(100) for v in (hum(DAY0 + i), temp(DAY0 + i), pressure(DAY0 + i))]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_repeated_time_returns_the_same_reading() -> None:
    """Asking twice for the same instant draws no new noise: the reading is cached."""
    rng = random.Random(8)
    for signal in (Temperature(rng), Pressure(rng), Power(rng)):
        first = signal(DAY0)
        assert signal(DAY0) == first
        second = signal(DAY0 + 1)
        assert signal(DAY0 + 1) == second


def test_normal_quantile_gives_the_floats_of_statistics_noise_table() -> None:
    """Every point of the 4096-level noise table equals NormalDist().inv_cdf's float exactly."""
    standard = statistics.NormalDist()
    for i in range(4096):
        p = (i + 0.5) / 4096
        assert normal_quantile(p) == standard.inv_cdf(p), p


@given(st.floats(min_value=1.4e-11, max_value=1.0 - 1.4e-11))
def test_normal_quantile_matches_statistics_over_its_domain(p: float) -> None:
    """Across its whole domain the quantile is NormalDist().inv_cdf's float, bit for bit."""
    assert normal_quantile(p) == statistics.NormalDist().inv_cdf(p)

"""The DHT22 driver: IIO files, retries spaced for the sensor, and a hard deadline."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.sensors.base import Sample, SensorError
from edge.sensors.dht22 import DHT22Config, DHT22Driver
from iotpipe.errors import ConfigError
from tests.edge.fixtures import fixed_clock

T0 = fixed_clock()


def iio_tree(root: Path, temperature: str = "21700\n", humidity: str = "48300\n") -> Path:
    """A sysfs root with one dht11 IIO device holding the given file contents."""
    device = root / "bus" / "iio" / "devices" / "iio:device0"
    device.mkdir(parents=True)
    (device / "name").write_text("dht11\n")
    (device / "in_temp_input").write_text(temperature)
    (device / "in_humidityrelative_input").write_text(humidity)
    return root


class FakeTime:
    """A monotonic clock that only moves when the driver sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def failing_reader(failures: list[int]) -> Callable[[Path], str]:
    """Raise OSError with the next errno of ``failures``, then read the real file."""

    def read(path: Path) -> str:
        if failures:
            code = failures.pop(0)
            raise OSError(code, os.strerror(code))
        return path.read_text()

    return read


def make(
    root: Path, reader: Callable[[Path], str] | None = None, **config: object
) -> tuple[DHT22Driver, FakeTime]:
    fake = FakeTime()
    extra = {"read_file": reader} if reader else {}
    driver = DHT22Driver(
        DHT22Config.from_mapping({"root": root, **config}),
        clock=fixed_clock,
        monotonic=fake.monotonic,
        sleep=fake.sleep,
        **extra,  # type: ignore[arg-type]
    )
    return driver, fake


def test_reads_milli_units(tmp_path: Path) -> None:
    """in_temp_input is milli-Cel, in_humidityrelative_input milli-%RH."""
    driver, fake = make(iio_tree(tmp_path))
    assert driver.read() == [
        Sample("temperature", 21.7, "Cel", T0),
        Sample("humidity", 48.3, "%RH", T0),
    ]
    assert fake.sleeps == []


def test_eio_is_retried_after_the_spacing(tmp_path: Path) -> None:
    """EIO and ETIMEDOUT are retried, each attempt 2 s after the last."""
    driver, fake = make(iio_tree(tmp_path), failing_reader([errno.EIO, errno.ETIMEDOUT]))
    assert [s.value for s in driver.read()] == [21.7, 48.3]
    assert fake.sleeps == [2.0, 2.0]


def test_gives_up_after_the_attempts(tmp_path: Path) -> None:
    """Three failures in a row fail the read with the last OS error and the count."""
    reader = failing_reader([errno.EIO] * 5)
    driver, fake = make(iio_tree(tmp_path), reader, attempts=3, timeout=10.0)
    with pytest.raises(SensorError, match=r"Input/output error \(3 attempts\)"):
        driver.read()
    assert fake.sleeps == [2.0, 2.0]


def test_retries_stop_at_the_timeout(tmp_path: Path) -> None:
    """No attempt starts if its spacing would end past the timeout."""
    reader = failing_reader([errno.EIO] * 5)
    driver, fake = make(iio_tree(tmp_path), reader, attempts=5, timeout=3.5)
    with pytest.raises(SensorError, match=r"\(2 attempts\)"):
        driver.read()
    assert fake.now - 100.0 < 3.5


def test_permanent_errors_are_not_retried(tmp_path: Path) -> None:
    """A directory in place of a file (EISDIR) will not heal: one attempt only."""
    root = iio_tree(tmp_path)
    temp = root / "bus/iio/devices/iio:device0/in_temp_input"
    temp.unlink()
    temp.mkdir()
    driver, fake = make(root)
    with pytest.raises(SensorError, match=r"Is a directory \(1 attempt\)"):
        driver.read()
    assert fake.sleeps == []


def test_blocked_read_times_out_and_blocks_no_one(tmp_path: Path) -> None:
    """A read stuck in the kernel fails at the timeout; reads meanwhile fail at once."""
    release = threading.Event()

    def stuck(path: Path) -> str:
        release.wait(10)
        return path.read_text()

    driver = DHT22Driver(DHT22Config(root=iio_tree(tmp_path), timeout=0.2), read_file=stuck)
    with pytest.raises(SensorError, match=r"no answer within 0\.2 s"):
        driver.read()
    with pytest.raises(SensorError, match="still blocked"):
        driver.read()
    release.set()
    assert driver._worker is not None
    driver._worker.join(5)
    assert [s.value for s in driver.read()] == [21.7, 48.3]


@pytest.mark.parametrize(
    ("temperature", "humidity", "reason"),
    [
        ("", "48300", "malformed"),
        ("95000", "48300", "implausible"),
        ("21000", "120000", "implausible"),
    ],
)
def test_bad_values(tmp_path: Path, temperature: str, humidity: str, reason: str) -> None:
    """Empty, out-of-range temperature or humidity values are errors, not readings."""
    driver, _ = make(iio_tree(tmp_path, temperature, humidity))
    with pytest.raises(SensorError, match=reason):
        driver.read()


def test_missing_device_points_at_the_overlay(tmp_path: Path) -> None:
    """No IIO device says which overlay to load."""
    driver, _ = make(tmp_path)
    with pytest.raises(SensorError, match="dtoverlay=dht11"):
        driver.read()


def test_config_bounds() -> None:
    """The sensor's 2 s rest is enforced, and a read must end before the next is due."""
    with pytest.raises(ConfigError, match="greater than or equal to 2"):
        DHT22Config(interval=1.0)
    with pytest.raises(ConfigError, match="greater than or equal to 2"):
        DHT22Config(retry_spacing=0.5)
    with pytest.raises(ConfigError, match="must be below interval"):
        DHT22Config(interval=5.0, timeout=6.0)
    with pytest.raises(ConfigError, match="String should match pattern"):
        DHT22Config(device="../../etc")

"""DHT22 (AM2302) temperature and humidity, through the kernel's IIO ``dht11`` driver.

With ``dtoverlay=dht11,gpiopin=4`` the kernel bit-bangs the one-wire protocol and exposes
``/sys/bus/iio/devices/iio:device0/in_temp_input`` (milli-°C) and
``in_humidityrelative_input`` (milli-%RH). Reading a file runs a measurement, which blocks for
up to a second or two and often fails (``EIO`` on a checksum error or a missed edge,
``ETIMEDOUT`` when the sensor does not answer): the kernel caches a good measurement for 2 s, so
both files come from one measurement.

A read is therefore a few attempts spaced ``retry_spacing`` seconds apart (the sensor needs 2 s
between measurements), all within ``timeout`` seconds. The files are read in a worker thread,
so a wedged read never blocks the caller past the deadline; while that thread is stuck, further
reads fail at once instead of piling up threads.
"""

from __future__ import annotations

import errno
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from edge.sensors.base import DriverConfig, Sample, SensorError, WallClock, wall_ms
from iotpipe.errors import ConfigError
from iotpipe.schema import setting

TEMPERATURE_FILE = "in_temp_input"
HUMIDITY_FILE = "in_humidityrelative_input"
#: The DHT22's measuring ranges.
_RANGE_CEL = (-40.0, 80.0)
_RANGE_RH = (0.0, 100.0)
#: OS errors a retry may cure; anything else (no such file, permission) will not.
_TRANSIENT = frozenset({errno.EIO, errno.ETIMEDOUT, errno.EAGAIN, errno.EBUSY})


class DHT22Config(DriverConfig):
    """``type = "dht22"``: temperature and humidity of a DHT22 on the IIO dht11 driver."""

    type: Literal["dht22"] = "dht22"
    interval: float = setting(
        30.0, "seconds between reads (the sensor needs 2 s)", ge=2.0, le=86_400.0
    )
    root: Path = setting(Path("/sys"), "sysfs mount point")
    device: str = setting(
        "iio:device0",
        "IIO device of the sensor, under <root>/bus/iio/devices",
        pattern=r"^iio:device\d+$",
    )
    attempts: int = setting(3, "measurements tried per read", ge=1, le=10)
    retry_spacing: float = setting(
        2.0, "seconds between attempts (sensor minimum: 2)", ge=2.0, le=60.0
    )
    timeout: float = setting(
        6.0, "longest a read may take, attempts included, seconds", gt=0.0, le=120.0
    )

    def check(self) -> None:
        """A read, attempts included, must end before the next one is due."""
        if self.timeout >= self.interval:
            raise ConfigError(
                "timeout", self.timeout, f"timeout ({self.timeout:g} s) must be below interval"
            )

    def reading_names(self) -> list[str]:
        """temperature, humidity (with the prefix)."""
        return [self.reading("temperature"), self.reading("humidity")]

    def driver(self, *, clock: WallClock = wall_ms) -> DHT22Driver:
        """Build the driver."""
        return DHT22Driver(self, clock=clock)


def _read_file(path: Path) -> str:
    with path.open("rb", buffering=0) as fh:
        return fh.read(64).decode("ascii", errors="replace")


#: What one attempt produced: the two file contents, or the OSError it raised.
_Outcome = tuple[str, str] | OSError


class DHT22Driver:
    """Reads one DHT22 through its IIO files, with retries and a hard deadline."""

    def __init__(
        self,
        config: DHT22Config,
        *,
        clock: WallClock = wall_ms,
        read_file: Callable[[Path], str] = _read_file,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._clock = clock
        self._read_file = read_file
        self._monotonic = monotonic
        self._sleep = sleep
        self._dir = config.root / "bus" / "iio" / "devices" / config.device
        self._worker: threading.Thread | None = None

    @property
    def name(self) -> str:
        """The configured name."""
        return self.config.sensor_name

    @property
    def interval(self) -> float:
        """Seconds between reads."""
        return self.config.interval

    def _attempt(self, wait: float) -> tuple[str, str]:
        """Read both files in a worker thread, waiting at most ``wait`` seconds.

        Raises:
            OSError: the read failed.
            SensorError: it did not finish in time.
        """
        results: queue.SimpleQueue[_Outcome] = queue.SimpleQueue()

        def work() -> None:
            try:
                temperature = self._read_file(self._dir / TEMPERATURE_FILE)
                humidity = self._read_file(self._dir / HUMIDITY_FILE)
            except OSError as err:
                results.put(err)
            else:
                results.put((temperature, humidity))

        worker = threading.Thread(target=work, name=f"dht22-{self.name}", daemon=True)
        self._worker = worker
        worker.start()
        try:
            outcome = results.get(timeout=max(wait, 0.0))
        except queue.Empty:
            raise SensorError(f"{self._dir}: no answer within {self.config.timeout:g} s") from None
        self._worker = None
        if isinstance(outcome, OSError):
            raise outcome
        return outcome

    def read(self) -> list[Sample]:
        """Measure, retrying transient failures until ``attempts`` or ``timeout`` run out."""
        if self._worker is not None and self._worker.is_alive():
            raise SensorError(f"{self._dir}: the previous read is still blocked in the kernel")
        if not self._dir.is_dir():
            raise SensorError(f"no IIO device {self._dir} (is dtoverlay=dht11,gpiopin=<pin> set?)")
        deadline = self._monotonic() + self.config.timeout
        last = "no attempt fitted in the timeout"
        tried = 0
        for attempt in range(self.config.attempts):
            if attempt:
                if self._monotonic() + self.config.retry_spacing >= deadline:
                    break
                self._sleep(self.config.retry_spacing)
            tried += 1
            try:
                raw = self._attempt(deadline - self._monotonic())
            except OSError as err:
                last = err.strerror or str(err)
                if err.errno not in _TRANSIENT:
                    break
                continue
            return self._samples(*raw)
        raise SensorError(f"{self._dir}: {last} ({tried} attempt{'s' if tried > 1 else ''})")

    def _samples(self, temperature: str, humidity: str) -> list[Sample]:
        try:
            celsius = int(temperature.strip()) / 1000.0
            rh = int(humidity.strip()) / 1000.0
        except ValueError:
            raise SensorError(
                f"{self._dir}: malformed read {temperature.strip()[:16]!r}, "
                f"{humidity.strip()[:16]!r}"
            ) from None
        if not _RANGE_CEL[0] <= celsius <= _RANGE_CEL[1] or not _RANGE_RH[0] <= rh <= _RANGE_RH[1]:
            raise SensorError(f"{self._dir}: implausible reading {celsius:g} Cel, {rh:g} %RH")
        ts = self._clock()
        return [
            Sample(self.config.reading("temperature"), celsius, "Cel", ts),
            Sample(self.config.reading("humidity"), rh, "%RH", ts),
        ]

    def close(self) -> None:
        """Nothing to release (a stuck worker thread is a daemon and ends with the process)."""

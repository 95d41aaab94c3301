"""System metrics of the edge box itself: load, memory and disk.

``/proc/loadavg`` gives the 1, 5 and 15 minute load averages; ``/proc/meminfo`` the total and
available memory (``MemAvailable``, the kernel's own estimate of what can be allocated without
swapping); ``os.statvfs`` on a path the disk's size and the space an unprivileged process may
still use (``df``'s figures: root's reserved blocks count as used).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from edge.sensors.base import DriverConfig, Sample, SensorError, WallClock, read_text, wall_ms
from iotpipe.schema import setting

READINGS = (
    "cpu.load1",
    "cpu.load5",
    "cpu.load15",
    "memory.available",
    "memory.used_percent",
    "disk.used_percent",
    "disk.free",
)


class SystemConfig(DriverConfig):
    """``type = "system"``: load averages, memory and disk usage of this machine."""

    type: Literal["system"] = "system"
    interval: float = setting(60.0, "seconds between reads", ge=1.0, le=86_400.0)
    proc: Path = setting(Path("/proc"), "procfs mount point")
    disk_path: Path = setting(Path("/"), "a path on the file system to report")

    def reading_names(self) -> list[str]:
        """Every reading (with the prefix)."""
        return [self.reading(name) for name in READINGS]

    def driver(self, *, clock: WallClock = wall_ms) -> SystemDriver:
        """Build the driver."""
        return SystemDriver(self, clock=clock)


def parse_loadavg(text: str) -> tuple[float, float, float]:
    """The three load averages from ``/proc/loadavg`` (``0.52 0.58 0.59 1/467 12345``)."""
    try:
        one, five, fifteen = (float(field) for field in text.split()[:3])
    except ValueError:
        raise SensorError(f"/proc/loadavg: malformed {text.strip()[:64]!r}") from None
    return one, five, fifteen


def parse_meminfo(text: str) -> tuple[int, int]:
    """(total, available) bytes from ``/proc/meminfo``.

    Kernels before 3.14 have no ``MemAvailable``; ``MemFree + Buffers + Cached`` stands in.
    """
    kib: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            kib[key.strip()] = int(fields[0])
    if "MemTotal" not in kib or kib["MemTotal"] == 0:
        raise SensorError("/proc/meminfo: no MemTotal")
    available = kib.get("MemAvailable")
    if available is None:
        available = kib.get("MemFree", 0) + kib.get("Buffers", 0) + kib.get("Cached", 0)
    return kib["MemTotal"] * 1024, available * 1024


def disk_usage(stat: os.statvfs_result) -> tuple[float, int]:
    """(used percent, free bytes for unprivileged users), as ``df`` computes them."""
    used = (stat.f_blocks - stat.f_bfree) * stat.f_frsize
    free = stat.f_bavail * stat.f_frsize
    total = used + free
    return (100.0 * used / total if total else 0.0), free


class SystemDriver:
    """Reads load, memory and disk figures."""

    def __init__(
        self,
        config: SystemConfig,
        *,
        clock: WallClock = wall_ms,
        statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
    ) -> None:
        self.config = config
        self._clock = clock
        self._statvfs = statvfs

    @property
    def name(self) -> str:
        """The configured name."""
        return self.config.sensor_name

    @property
    def interval(self) -> float:
        """Seconds between reads."""
        return self.config.interval

    def read(self) -> list[Sample]:
        """Read all three sources; any failing one fails the read."""
        proc = self.config.proc
        load1, load5, load15 = parse_loadavg(read_text(proc / "loadavg"))
        total, available = parse_meminfo(read_text(proc / "meminfo"))
        try:
            used_percent, free = disk_usage(self._statvfs(self.config.disk_path))
        except OSError as err:
            raise SensorError(f"{self.config.disk_path}: {err.strerror or err}") from None
        ts = self._clock()
        r = self.config.reading
        return [
            Sample(r("cpu.load1"), load1, "1", ts),
            Sample(r("cpu.load5"), load5, "1", ts),
            Sample(r("cpu.load15"), load15, "1", ts),
            Sample(r("memory.available"), available, "By", ts),
            Sample(
                r("memory.used_percent"), round(100.0 * (total - available) / total, 2), "%", ts
            ),
            Sample(r("disk.used_percent"), round(used_percent, 2), "%", ts),
            Sample(r("disk.free"), free, "By", ts),
        ]

    def close(self) -> None:
        """Nothing to release."""

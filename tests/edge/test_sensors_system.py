"""The system driver: /proc/loadavg, /proc/meminfo and disk usage."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge.sensors.base import Sample, SensorError
from edge.sensors.system import READINGS, SystemConfig, SystemDriver, parse_meminfo
from tests.edge.fixtures import copy_tree, fixed_clock

T0 = fixed_clock()


def fake_statvfs(path: Path) -> os.statvfs_result:
    """A 1000-block disk of 4 KiB blocks: 300 free, 250 of them for unprivileged users."""
    # (bsize, frsize, blocks, bfree, bavail, files, ffree, favail, flag, namemax)
    return os.statvfs_result((4096, 4096, 1000, 300, 250, 0, 0, 0, 0, 255))


def test_reads_the_real_formats(tmp_path: Path) -> None:
    """Load averages, MemAvailable, and df-style disk figures, with their units."""
    config = SystemConfig(proc=copy_tree(tmp_path, "proc"), disk_path=tmp_path)
    driver = SystemDriver(config, clock=fixed_clock, statvfs=fake_statvfs)
    assert driver.read() == [
        Sample("cpu.load1", 0.52, "1", T0),
        Sample("cpu.load5", 0.58, "1", T0),
        Sample("cpu.load15", 0.59, "1", T0),
        Sample("memory.available", 3264816 * 1024, "By", T0),
        Sample("memory.used_percent", 15.97, "%", T0),
        Sample("disk.used_percent", 73.68, "%", T0),  # 700 / (700 + 250)
        Sample("disk.free", 250 * 4096, "By", T0),
    ]
    assert [s.sensor for s in driver.read()] == list(READINGS) == config.reading_names()


def test_real_statvfs(tmp_path: Path) -> None:
    """os.statvfs on a real path gives sane figures."""
    driver = SystemConfig(proc=copy_tree(tmp_path, "proc"), disk_path=tmp_path).driver()
    values = {s.sensor: s.value for s in driver.read()}
    assert 0.0 <= float(values["disk.used_percent"]) <= 100.0
    assert int(values["disk.free"]) > 0


def test_meminfo_without_memavailable() -> None:
    """Old kernels: MemFree + Buffers + Cached stands in for MemAvailable."""
    text = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n"
    assert parse_meminfo(text) == (1000 * 1024, 420 * 1024)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("loadavg", "", "malformed"),
        ("loadavg", "x y z\n", "malformed"),
        ("meminfo", "", "no MemTotal"),
    ],
)
def test_bad_proc_files(tmp_path: Path, name: str, content: str, reason: str) -> None:
    """Malformed procfs content is a SensorError."""
    proc = copy_tree(tmp_path, "proc")
    (proc / name).write_text(content)
    with pytest.raises(SensorError, match=reason):
        SystemConfig(proc=proc, disk_path=tmp_path).driver().read()


def test_missing_disk_path(tmp_path: Path) -> None:
    """A disk path that does not exist is a SensorError naming it."""
    config = SystemConfig(proc=copy_tree(tmp_path, "proc"), disk_path=tmp_path / "gone")
    with pytest.raises(SensorError, match="gone: No such file"):
        config.driver().read()


def test_missing_proc(tmp_path: Path) -> None:
    """A procfs root without loadavg fails with the file's name."""
    with pytest.raises(SensorError, match="loadavg: No such file"):
        SystemConfig(proc=tmp_path).driver().read()

"""The edge agent's systemd unit passes ``systemd-analyze verify`` with no warnings.

verify checks that ExecStart's binary exists, so it runs with ``--root`` on a scratch tree: the
host's unit directory (for the targets the unit orders itself after), the unit in
etc/systemd/system, and an executable at the unit's real ExecStart path. systemd need not be
running (PID 1): only the ``systemd`` package must be installed. Missing, the test fails.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from edge.provision import unit_file

UNIT = "iotpipe-edge.service"
SYSTEM_UNITS = Path("/usr/lib/systemd/system")


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze not found: apt-get install systemd (make setup does it)")
    return path


def _root(tmp_path: Path, unit: bytes) -> Path:
    """A scratch root holding the system units, ``unit`` and its ExecStart binary."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/systemd/system" / UNIT).write_bytes(unit)
    exec_start = next(
        line.split("=", 1)[1].split()[0]
        for line in unit.decode().splitlines()
        if line.startswith("ExecStart=")
    )
    binary = root / exec_start.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return root


def verify(tmp_path: Path, unit: bytes) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify --root`` on ``unit``."""
    return subprocess.run(
        [_analyze(), "verify", "--man=no", f"--root={_root(tmp_path, unit)}", UNIT],
        capture_output=True,
        text=True,
        check=False,
    )


def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    """systemd-analyze verify prints nothing and succeeds."""
    result = verify(tmp_path, unit_file())
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """A misspelt key is reported, so the clean run above means something."""
    broken = unit_file().replace(b"ProtectHome=yes", b"ProtectHome=yes\nProtectHomes=yes")
    result = verify(tmp_path, broken)
    assert "Unknown key 'ProtectHomes'" in result.stderr


def test_unit_has_the_promised_settings() -> None:
    """Type=notify with a watchdog, a dynamic user with i2c/gpio, credentials, sandboxing."""
    lines = set(unit_file().decode().splitlines())
    for line in (
        "Type=notify",
        "WatchdogSec=30",
        "Restart=on-failure",
        "DynamicUser=yes",
        "SupplementaryGroups=i2c gpio",
        "StateDirectory=iotpipe-edge",
        "LoadCredential=mqtt-password:/etc/iotpipe/credentials/mqtt-password",
        "LoadCredential=mqtt-client.key:/etc/iotpipe/credentials/mqtt-client.key",
        "LoadCredential=edge.toml:/etc/iotpipe/edge.toml",
        "ProtectSystem=strict",
        "DevicePolicy=closed",
        "CapabilityBoundingSet=",
        "NoNewPrivileges=yes",
    ):
        assert line in lines, line

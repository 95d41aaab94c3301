"""The central services' systemd units and ``iotpipe services install``.

The units pass ``systemd-analyze verify`` with no warnings (as the edge unit does, on a scratch
root holding the host's units, ours and an executable at ExecStart); the installer writes them,
the sysusers.d user and the configs into a temporary root with the promised modes and never
overwrites a config or secret; every shipped config loads with its command's settings.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bridge.broker import PasswordFile
from bridge.settings import BridgeSettings, BrokerSettings, UnpackSettings
from consumers.dashboard.tokens import TokenFile
from consumers.settings import ConsumeSettings
from iotpipe import services
from iotpipe.cli import app
from iotpipe.settings import AmqpSettings, MqttSettings, load

SYSTEM_UNITS = Path("/usr/lib/systemd/system")
EXEC = "/opt/iotpipe/venv/bin/iotpipe"
UNITS = [services.unit_name(name) for name in services.SERVICES]


def _analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail("systemd-analyze not found: apt-get install systemd (make setup does it)")
    return path


def _scratch_root(tmp_path: Path, units: dict[str, bytes]) -> Path:
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / SYSTEM_UNITS.relative_to("/"), symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name, text in units.items():
        (root / "etc/systemd/system" / name).write_bytes(text)
    binary = root / EXEC.lstrip("/")
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return root


def verify(tmp_path: Path, units: dict[str, bytes]) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify --root`` on ``units``."""
    root = _scratch_root(tmp_path, units)
    return subprocess.run(
        [_analyze(), "verify", "--man=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        check=False,
    )


def _shipped() -> dict[str, bytes]:
    return {services.unit_name(name): services.unit_text(name, EXEC) for name in services.SERVICES}


def test_units_verify_without_warnings(tmp_path: Path) -> None:
    """systemd-analyze verify prints nothing and succeeds, for all five units."""
    result = verify(tmp_path, _shipped())
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """A misspelt key in one unit is reported, so the clean run above means something."""
    units = _shipped()
    units["iotpipe-bridge.service"] = units["iotpipe-bridge.service"].replace(
        b"ProtectHome=yes", b"ProtectHome=yes\nProtectHomes=yes"
    )
    result = verify(tmp_path, units)
    assert "Unknown key 'ProtectHomes'" in result.stderr


@pytest.mark.parametrize("service", list(services.SERVICES))
def test_units_have_the_promised_settings(service: str) -> None:
    """Type=notify with a watchdog, the iotpipe user, its config as a credential, sandboxing."""
    lines = set(services.unit_text(service, EXEC).decode().splitlines())
    config = services.SERVICES[service]
    for line in (
        "Type=notify",
        "WatchdogSec=30",
        "Restart=on-failure",
        "User=iotpipe",
        f"LoadCredential={config}:/etc/iotpipe/{config}",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        "MemoryDenyWriteExecute=yes",
    ):
        assert line in lines, line
    (exec_start,) = (line for line in lines if line.startswith("ExecStart="))
    assert exec_start.startswith(f"ExecStart={EXEC} --log-level info {service} --config ")
    assert f"--config %d/{config}" in exec_start


def test_units_run_the_installing_iotpipe() -> None:
    """ExecStart names the program given to the installer."""
    text = services.unit_text("bridge", "/usr/local/bin/iotpipe").decode()
    assert "ExecStart=/usr/local/bin/iotpipe --log-level info bridge" in text
    assert EXEC not in text


def _install(root: Path, *args: str) -> str:
    result = CliRunner().invoke(
        app, ["services", "install", "--root", str(root), "--exec", EXEC, *args]
    )
    assert result.exit_code == 0, result.output
    return result.output


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_writes_units_user_and_configs(tmp_path: Path) -> None:
    """Units 0644, /etc/iotpipe 0700, configs and empty secrets 0600, the user, enabled units."""
    root = tmp_path / "target"
    root.mkdir()
    _install(root, "--enable")
    for name in UNITS:
        unit = root / "etc/systemd/system" / name
        assert _mode(unit) == 0o644
        assert unit.read_bytes() == services.unit_text(name[len("iotpipe-") : -8], EXEC)
        assert (root / "etc/systemd/system/multi-user.target.wants" / name).is_symlink()
    etc = root / "etc/iotpipe"
    assert _mode(etc) == 0o700
    written = sorted(p.name for p in etc.iterdir())
    assert written == sorted([*services.SERVICES.values(), *services.INITIAL_SECRETS.values()])
    assert all(_mode(path) == 0o600 for path in etc.iterdir())
    assert TokenFile(etc / "dashboard-tokens").entries() == []
    assert PasswordFile(etc / "broker-passwords").users == {}
    assert "iotpipe:" in (root / "etc/passwd").read_text()
    assert _mode(root / "etc/sysusers.d/iotpipe.conf") == 0o644


def test_install_never_overwrites_configs_and_secrets(tmp_path: Path) -> None:
    """A second install keeps edited configs and secrets and rewrites the units."""
    root = tmp_path / "target"
    root.mkdir()
    _install(root, "bridge", "dashboard")
    etc = root / "etc/iotpipe"
    (etc / "bridge.toml").write_text("# mine\n")
    (etc / "dashboard-tokens").write_text("token line\n")
    unit = root / "etc/systemd/system/iotpipe-bridge.service"
    unit.write_text("stale\n")
    output = _install(root, "bridge", "dashboard")
    assert (etc / "bridge.toml").read_text() == "# mine\n"
    assert (etc / "dashboard-tokens").read_text() == "token line\n"
    assert f"keep   {etc / 'bridge.toml'} (exists)" in output
    assert unit.read_bytes() == services.unit_text("bridge", EXEC)
    assert not (etc / "consume.toml").exists()  # not asked for


def test_dry_run_changes_nothing(tmp_path: Path) -> None:
    """--dry-run lists the steps and writes no file."""
    root = tmp_path / "target"
    root.mkdir()
    output = _install(root, "--dry-run", "consume")
    assert list(root.iterdir()) == []
    assert f"write  {root}/etc/systemd/system/iotpipe-consume.service (0644)" in output
    assert "dry run: nothing was changed" in output


@pytest.mark.parametrize(
    ("executable", "warned"),
    [("/home/ann/.venv/bin/iotpipe", True), ("/root/venv/bin/iotpipe", True),
     ("/opt/iotpipe/venv/bin/iotpipe", False)],
)  # fmt: skip
def test_an_iotpipe_in_a_home_directory_is_warned_about(
    tmp_path: Path, executable: str, warned: bool
) -> None:
    """ProtectHome=yes hides /home and /root: a unit running an iotpipe there would not start."""
    result = CliRunner().invoke(
        app, ["services", "install", "--root", str(tmp_path), "--dry-run", "--exec", executable]
    )
    assert result.exit_code == 0
    assert ("ProtectHome=yes" in result.output) is warned


def test_install_without_root_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Installing into / as a user: one clear line, exit 2, nothing touched."""
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(app, ["services", "install"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "iotpipe: error: installing services needs root: sudo iotpipe services install "
        "(or --root DIR, or --dry-run)"
    ]


def test_unknown_service_is_one_line(tmp_path: Path) -> None:
    """A misspelt service: one line naming the choices, exit 2, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "iotpipe", "services", "install", "--root", str(tmp_path), "brdge"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "iotpipe: error: invalid setting SERVICE='brdge': "
        "one of broker, bridge, unpack, consume, dashboard"
    ]


def test_help_explains_with_examples() -> None:
    """--help names what is written where, and shows examples."""
    result = CliRunner().invoke(app, ["services", "install", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for text in ("/etc/iotpipe", "never overwritten", "Examples", "--dry-run", "--enable"):
        assert text in result.output, text


def _config(name: str) -> Path:
    path = Path(services.__file__).parent / "systemd/etc" / name
    assert path.is_file()
    return path


def test_shipped_configs_load() -> None:
    """Each config /etc/iotpipe gets loads with its command's settings, state under /var/lib."""
    broker = load(BrokerSettings, "broker", config_file=_config("broker.toml"))
    assert broker.state_file == Path("/var/lib/iotpipe/broker/state.db")
    bridge = _config("bridge.toml")
    assert load(BridgeSettings, "bridge", config_file=bridge).spool_path.is_relative_to(
        "/var/lib/iotpipe/bridge"
    )
    load(MqttSettings, "mqtt", config_file=bridge)
    for name, user in (("bridge", "bridge"), ("consume", "consumer"), ("unpack", "unpack")):
        amqp = load(AmqpSettings, "amqp", config_file=_config(f"{name}.toml"))
        assert amqp.url == f"amqp://{user}@127.0.0.1:5672/iotpipe"
    consume = load(ConsumeSettings, "consume", config_file=_config("consume.toml"))
    assert consume.store == "sqlite:////var/lib/iotpipe/consume/telemetry.db"
    dashboard = load(ConsumeSettings, "consume", config_file=_config("dashboard.toml"))
    assert dashboard.store == consume.store
    unpack = load(UnpackSettings, "unpack", config_file=_config("unpack.toml"))
    assert unpack.seen_path == Path("/var/lib/iotpipe/unpack/packs.db")

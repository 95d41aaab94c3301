"""The central services as systemd units: what ``iotpipe services install`` puts where.

The package carries, in ``iotpipe/systemd/``, one unit per service (``units/``), its commented
config (``etc/``) and the ``sysusers.d`` line of the ``iotpipe`` user they run as. Installing:

    /etc/systemd/system/iotpipe-NAME.service   written (0644), ExecStart set to our iotpipe
    /etc/sysusers.d/iotpipe.conf               written (0644), then systemd-sysusers
    /etc/iotpipe/                              0700; configs and login-less secret files (0600),
                                               only where missing: never overwritten

then ``systemctl daemon-reload`` and, asked, ``systemctl enable``. Everything is relative to a
root directory, so a test (or a packager) installs into a scratch tree. :func:`plan` says what
would be done; :func:`apply` does it. docs/services.md describes the units.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from iotpipe.errors import ConfigError, IotpipeError

__all__ = [
    "DEFAULT_EXEC",
    "INITIAL_SECRETS",
    "SERVICES",
    "Action",
    "ServiceError",
    "apply",
    "current_exec",
    "plan",
    "unit_name",
    "unit_text",
]

#: The services, in start order: name -> the config file in /etc/iotpipe it reads.
SERVICES = {
    "broker": "broker.toml",
    "bridge": "bridge.toml",
    "unpack": "unpack.toml",
    "consume": "consume.toml",
    "dashboard": "dashboard.toml",
}

#: Secret files a service's unit loads, copied (0600) when missing so that it starts: no
#: logins in either, so nobody may connect until one is added.
INITIAL_SECRETS = {"broker": "broker-passwords", "dashboard": "dashboard-tokens"}

#: ExecStart's program in the shipped units, replaced by the installing iotpipe's path.
DEFAULT_EXEC = "/opt/iotpipe/venv/bin/iotpipe"

ETC = Path("etc/iotpipe")
UNIT_DIR = Path("etc/systemd/system")
SYSUSERS = Path("etc/sysusers.d/iotpipe.conf")


class ServiceError(IotpipeError):
    """A step of the installation failed (a system command, a file that cannot be written)."""

    exit_code = 2


@dataclass(frozen=True)
class Action:
    """One step: ``kind`` is ``write`` (a file, with ``mode``), ``keep`` (exists, untouched),
    ``mkdir`` or ``run`` (a command, in ``argv``)."""

    kind: str
    path: Path | None = None
    data: bytes = b""
    mode: int = 0o644
    argv: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the report."""
        if self.kind == "run":
            return "run    " + " ".join(self.argv)
        if self.kind == "keep":
            return f"keep   {self.path} (exists)"
        return f"{self.kind:<6} {self.path} ({self.mode:04o})"


def _data(*parts: str) -> bytes:
    return resources.files("iotpipe").joinpath("systemd", *parts).read_bytes()


def unit_name(service: str) -> str:
    """``bridge`` -> ``iotpipe-bridge.service``."""
    return f"iotpipe-{service}.service"


def unit_text(service: str, executable: str = DEFAULT_EXEC) -> bytes:
    """The unit of ``service`` with ExecStart running ``executable``."""
    text = _data("units", unit_name(service))
    return text.replace(f"ExecStart={DEFAULT_EXEC} ".encode(), f"ExecStart={executable} ".encode())


def current_exec() -> str:
    """The ``iotpipe`` script beside this interpreter (a venv's bin/), else the one on PATH."""
    beside = Path(sys.executable).parent / "iotpipe"
    if beside.is_file():
        return str(beside)
    found = shutil.which("iotpipe")
    if found is None:
        raise ConfigError("--exec", None, "no iotpipe script found: name it with --exec PATH")
    return found


def check_names(names: Iterable[str]) -> list[str]:
    """The services named (all when none), in start order.

    Raises:
        ConfigError: an unknown name.
    """
    wanted = list(names) or list(SERVICES)
    for name in wanted:
        if name not in SERVICES:
            raise ConfigError("SERVICE", name, f"one of {', '.join(SERVICES)}")
    return [name for name in SERVICES if name in wanted]


def plan(
    root: Path,
    services: Sequence[str],
    executable: str,
    *,
    enable: bool = False,
    reload: bool = True,
) -> list[Action]:
    """Every step that installs ``services`` under ``root``, in order."""
    live = root.resolve() == Path("/")
    etc = root / ETC
    steps: list[Action] = [
        Action("write", root / SYSUSERS, _data("sysusers.conf")),
        Action("run", argv=_sysusers(root, live)),
        Action("mkdir", etc, mode=0o700),
    ]
    for name in services:
        steps.append(
            Action("write", root / UNIT_DIR / unit_name(name), unit_text(name, executable))
        )
        files = [SERVICES[name]]
        if name in INITIAL_SECRETS:
            files.append(INITIAL_SECRETS[name])
        for filename in files:
            path = etc / filename
            steps.append(
                Action("keep", path)
                if path.exists()
                else Action("write", path, _data("etc", filename), 0o600)
            )
    units = [unit_name(name) for name in services]
    if reload and live:
        steps.append(Action("run", argv=("systemctl", "daemon-reload")))
    if enable:
        at = () if live else (f"--root={root}",)
        steps.append(Action("run", argv=("systemctl", *at, "enable", *units)))
    return steps


def _sysusers(root: Path, live: bool) -> tuple[str, ...]:
    at = () if live else (f"--root={root}",)
    return ("systemd-sysusers", *at, str(root / SYSUSERS))


def apply(steps: Iterable[Action]) -> None:
    """Carry the steps out.

    Raises:
        ServiceError: a file cannot be written or a command failed.
    """
    for step in steps:
        if step.kind == "run":
            _run(step.argv)
        elif step.kind == "mkdir" and step.path is not None:
            _mkdir(step.path, step.mode)
        elif step.kind == "write" and step.path is not None:
            _write(step.path, step.data, step.mode)


def _mkdir(path: Path, mode: int) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(mode)
    except OSError as err:
        raise ServiceError(f"cannot create {path}: {err.strerror}") from None


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` whole (a temporary file renamed over it), with ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        tmp.chmod(mode)  # whatever the umask took away
        tmp.replace(path)
    except OSError as err:
        raise ServiceError(f"cannot write {path}: {err.strerror}") from None


def _run(argv: Sequence[str]) -> None:
    if shutil.which(argv[0]) is None:
        raise ServiceError(f"{argv[0]} not found: is this a systemd system?")
    result = subprocess.run(argv, capture_output=True, text=True, check=False)  # noqa: S603 - our own argv, no shell
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip().splitlines()
        raise ServiceError(
            f"{' '.join(argv)} failed (exit {result.returncode}): {reason[-1] if reason else ''}"
        )

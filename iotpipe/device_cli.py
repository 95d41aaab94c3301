"""``iotpipe device add|revoke|list``: the MQTT logins of devices, in the brokers' password files.

A device logs in as ``{site}/{device}`` (the identity the brokers' ACLs give its own topics).
``iotpipe edge flash|seed`` register a fresh login per card; these commands give one to a device
flashed another way (or rotate it), revoke it, and list who may log in. Both brokers' files
are handled by :mod:`iotpipe.credentials`: the embedded broker re-reads its file at the next
login, Mosquitto on SIGHUP (``--reload-pid``, or ``systemctl reload mosquitto``).
"""

from __future__ import annotations

import inspect
import os
import signal
from pathlib import Path
from typing import Annotated

import typer

from iotpipe.credentials import (
    PasswordFormat,
    list_users,
    new_password,
    remove_user,
    set_password,
)
from iotpipe.errors import ConfigError
from iotpipe.topics import is_valid_name

__all__ = ["add", "app", "list_logins", "revoke"]

app = typer.Typer(
    name="device",
    help="Device logins: give a device its own MQTT password, revoke it, list who may log in.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

Identity = Annotated[
    str,
    typer.Argument(
        metavar="SITE/DEVICE",
        help="The device's identity: its MQTT user name, e.g. home/pi-kitchen.",
        show_default=False,
    ),
]
BrokerPasswordFile = Annotated[
    Path | None,
    typer.Option(
        "--broker-password-file",
        help="The embedded broker's password file (iotpipe broker --password-file).",
        show_default=False,
        dir_okay=False,
    ),
]
MosquittoPasswordFile = Annotated[
    Path | None,
    typer.Option(
        "--mosquitto-password-file",
        help="Mosquitto's password_file (mosquitto_passwd format).",
        show_default=False,
        dir_okay=False,
    ),
]
ReloadPid = Annotated[
    int | None,
    typer.Option(
        "--reload-pid",
        help="Send SIGHUP to this process (Mosquitto) so it re-reads its password file.",
        show_default=False,
    ),
]

_MOSQUITTO_RELOAD = "Mosquitto re-reads it on SIGHUP: systemctl reload mosquitto (or kill -HUP)"


def _files(
    broker_password_file: Path | None, mosquitto_password_file: Path | None
) -> list[tuple[Path, PasswordFormat, str]]:
    """The files given, with their format and option name; at least one."""
    files = [
        (path, kind, option)
        for path, kind, option in (
            (broker_password_file, PasswordFormat.AMQTT, "--broker-password-file"),
            (mosquitto_password_file, PasswordFormat.MOSQUITTO, "--mosquitto-password-file"),
        )
        if path is not None
    ]
    if not files:
        raise ConfigError(
            "--broker-password-file", None, "give it or --mosquitto-password-file (or both)"
        )
    return files


def _check_identity(identity: str) -> None:
    site, _, device = identity.partition("/")
    if not (is_valid_name(site) and is_valid_name(device)):
        raise ConfigError(
            "SITE/DEVICE",
            identity,
            "site and device names of 1-64 characters A-Z a-z 0-9 _ - (e.g. home/pi-kitchen)",
        )


def _signal(pid: int | None, signum: int) -> None:
    """Send ``signum`` to ``pid`` (0: only check that it could be sent); None: nothing."""
    if pid is None:
        return
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise ConfigError("--reload-pid", pid, "no such process") from None
    except PermissionError:
        raise ConfigError(
            "--reload-pid", pid, "not allowed to signal it (run as its user)"
        ) from None


def _reload(pid: int | None, changed_mosquitto: bool) -> None:
    """SIGHUP ``pid``, or say that Mosquitto needs a reload."""
    if pid is not None:
        _signal(pid, signal.SIGHUP)
        typer.echo(f"  sent SIGHUP to process {pid}: it re-reads its password file")
    elif changed_mosquitto:
        typer.echo(f"  {_MOSQUITTO_RELOAD}")


@app.command("add")
def add(
    identity: Identity,
    *,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Write the fresh password here (0600): the file the device's agent reads, "
            "/etc/iotpipe/credentials/mqtt-password on a Pi.",
            show_default=False,
            dir_okay=False,
        ),
    ],
    broker_password_file: BrokerPasswordFile = None,
    mosquitto_password_file: MosquittoPasswordFile = None,
    reload_pid: ReloadPid = None,
) -> None:
    """Give a device a fresh MQTT password of its own (replacing any it had): rotate or add.

    The password (192 random bits) is written to --out only, never printed; its hash goes to
    each broker password file given. The device's old password stops working.
    """
    _check_identity(identity)
    files = _files(broker_password_file, mosquitto_password_file)
    _signal(reload_pid, 0)  # a wrong pid fails before any file changes
    password = new_password()
    for path, kind, option in files:
        set_password(path, identity, password, kind, field=option)
    _write_secret(out, password)
    typer.echo(f"{identity}: fresh password written to {out}")
    for path, kind, _ in files:
        typer.echo(f"  registered in {path} ({kind.value})")
    _reload(reload_pid, mosquitto_password_file is not None)


def _write_secret(path: Path, secret: str) -> None:
    """Write a secret to a new 0600 file (replacing one that was there)."""
    try:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secret + "\n")
    except OSError as err:
        raise ConfigError("--out", path, f"cannot write it ({err.strerror})") from None


@app.command("revoke")
def revoke(
    identity: Identity,
    *,
    broker_password_file: BrokerPasswordFile = None,
    mosquitto_password_file: MosquittoPasswordFile = None,
    reload_pid: ReloadPid = None,
) -> None:
    """Revoke a device: delete its login from the brokers' password files.

    The embedded broker refuses its next connect at once and ends its open connection within
    a second; Mosquitto does both on its reload (--reload-pid). Exit 2 if the device is in none
    of the files.
    """
    files = _files(broker_password_file, mosquitto_password_file)
    for path, _, option in files:
        if not path.is_file():
            raise ConfigError(option, path, "no such file")
    _signal(reload_pid, 0)  # a wrong pid fails before any file changes
    removed = [path for path, _, option in files if remove_user(path, identity, field=option)]
    if not removed:
        raise ConfigError(
            "SITE/DEVICE", identity, f"no such login in {', '.join(str(p) for p, _, _ in files)}"
        )
    for path, _, _ in files:
        typer.echo(f"{identity}: {'removed from' if path in removed else 'was not in'} {path}")
    _reload(reload_pid, mosquitto_password_file in removed)


@app.command("list")
def list_logins(
    *,
    broker_password_file: BrokerPasswordFile = None,
    mosquitto_password_file: MosquittoPasswordFile = None,
) -> None:
    """List the logins (devices and services) in the brokers' password files."""
    for path, kind, option in _files(broker_password_file, mosquitto_password_file):
        users = list_users(path, field=option)
        typer.echo(f"{path} ({kind.value}): {len(users)} logins")
        for user in users:
            typer.echo(f"  {user}")


add.__doc__ = (
    inspect.cleandoc(add.__doc__ or "")
    + """

[bold]Examples[/bold]

  [dim]# a device flashed without iotpipe, or a rotation: new password, old one refused[/dim]
  iotpipe device add home/pi-kitchen --out mqtt-password \\
      --broker-password-file /etc/iotpipe/broker.passwd
  scp mqtt-password pi@pi-kitchen:/tmp/ && ssh pi@pi-kitchen 'sudo install -m 0600 \\
      /tmp/mqtt-password /etc/iotpipe/credentials/ && rm /tmp/mqtt-password && \\
      sudo systemctl restart iotpipe-edge'
  iotpipe device add home/pi-2 -o pi-2.pw --mosquitto-password-file /etc/mosquitto/passwd \\
      --reload-pid "$(pidof mosquitto)"
"""
)
revoke.__doc__ = (
    inspect.cleandoc(revoke.__doc__ or "")
    + """

[bold]Examples[/bold]

  iotpipe device revoke home/pi-kitchen --broker-password-file /etc/iotpipe/broker.passwd
  iotpipe device revoke home/pi-kitchen --mosquitto-password-file /etc/mosquitto/passwd \\
      --reload-pid "$(pidof mosquitto)"
"""
)
list_logins.__doc__ = (
    inspect.cleandoc(list_logins.__doc__ or "")
    + """

[bold]Examples[/bold]

  iotpipe device list --broker-password-file /etc/iotpipe/broker.passwd \\
      --mosquitto-password-file /etc/mosquitto/passwd
"""
)

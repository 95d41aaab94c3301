"""``iotpipe services install``: the central services as systemd units (:mod:`iotpipe.services`)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Annotated

import typer

from iotpipe.services import SERVICES, apply, check_names, current_exec, plan

__all__ = ["app", "install"]

app = typer.Typer(
    name="services",
    help="systemd units for the central services: broker, bridge, unpack, consume, dashboard.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)

_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# all five units, the iotpipe user and /etc/iotpipe; then start what you use[/dim]
  sudo iotpipe services install
  sudo systemctl enable --now iotpipe-bridge iotpipe-consume

  [dim]# only the bridge and the consumer, enabled at boot[/dim]
  sudo iotpipe services install bridge consume --enable

  [dim]# what it would do, touching nothing[/dim]
  iotpipe services install --dry-run

  [dim]# into a scratch tree (a package build, an image)[/dim]
  iotpipe services install --root /tmp/image --exec /opt/iotpipe/venv/bin/iotpipe
"""


@app.command("install")
def install(
    services: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="SERVICE",
            help=f"Services to install: {', '.join(SERVICES)} \\[default: all].",
            show_default=False,
        ),
    ] = None,
    *,
    root: Annotated[
        Path,
        typer.Option("--root", help="Install into this directory tree.", file_okay=False),
    ] = Path("/"),
    executable: Annotated[
        str | None,
        typer.Option(
            "--exec",
            help="The iotpipe the units run. \\[default: the one running this command]",
            show_default=False,
        ),
    ] = None,
    enable: Annotated[
        bool, typer.Option("--enable", help="Enable the units (start at boot).")
    ] = False,
    reload: Annotated[
        bool,
        typer.Option("--reload/--no-reload", help="Run systemctl daemon-reload (--root / only)."),
    ] = True,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the steps, do nothing.")
    ] = False,
) -> None:
    """Install systemd units for the central services, their configs and the iotpipe user.

    Writes /etc/systemd/system/iotpipe-SERVICE.service (Type=notify with a
    watchdog, sandboxed, run as the system user iotpipe made by systemd-sysusers),
    and copies a commented config to /etc/iotpipe/SERVICE.toml (0600) where none
    exists: an existing config or secret file is never overwritten. Then
    systemctl daemon-reload. Needs root for --root /. The RabbitMQ passwords
    come from iotpipe rabbitmq setup --secrets-dir /etc/iotpipe/rabbitmq.
    docs/services.md describes each unit.
    """
    names = check_names(services or [])
    if not dry_run and root.resolve() == Path("/") and os.geteuid() != 0:
        typer.echo(
            "iotpipe: error: installing services needs root: sudo iotpipe services install "
            "(or --root DIR, or --dry-run)",
            err=True,
        )
        raise typer.Exit(2)
    executable = executable or current_exec()
    if Path(executable).is_relative_to("/home") or Path(executable).is_relative_to("/root"):
        typer.echo(
            f"warning: {executable} is under /home or /root, which the units' ProtectHome=yes "
            "hides from the services: install iotpipe elsewhere (e.g. a venv in /opt/iotpipe) "
            "and name it with --exec",
            err=True,
        )
    steps = plan(root, names, executable, enable=enable, reload=reload)
    for step in steps:
        typer.echo(step.describe())
    if dry_run:
        typer.echo("dry run: nothing was changed")
        return
    apply(steps)
    units = " ".join(f"iotpipe-{name}" for name in names)
    typer.echo(f"installed; edit /etc/iotpipe/*.toml, then: systemctl start {units}")


install.__doc__ = inspect.cleandoc(install.__doc__ or "") + _EXAMPLES

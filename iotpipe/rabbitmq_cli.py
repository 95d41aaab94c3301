"""``iotpipe rabbitmq setup``: a vhost and one least-privilege user per component.

The permissions are :data:`iotpipe.rabbitmq.ROLES`; this module adds the options, the password
files and the report. docs/rabbitmq.md explains the table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from iotpipe.errors import ConfigError
from iotpipe.rabbitmq import (
    DEFAULT_VHOST,
    ROLES,
    STORE_QUEUE,
    apply,
    definitions,
    rabbitmqctl,
    roles_for,
    secret_file,
)

__all__ = ["app", "setup"]

app = typer.Typer(
    name="rabbitmq",
    help="RabbitMQ for iotpipe: a vhost and one least-privilege user per component.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)

_DEFAULT_USERS = list(ROLES)


@app.command("setup")
def setup(  # noqa: PLR0917 - typer maps every parameter to an option
    vhost: Annotated[
        str, typer.Option(help="Virtual host to create and grant on.")
    ] = DEFAULT_VHOST,
    user: Annotated[
        list[str] | None,
        typer.Option(
            "--user",
            "-u",
            help=f"Component user to set up (repeatable; {', '.join(ROLES)}) "
            "\\[default: all of them].",
            show_default=False,
        ),
    ] = None,
    reader: Annotated[
        list[str] | None,
        typer.Option(
            "--reader",
            help="A foreign reader user NAME: may declare, bind to iotpipe.telemetry and read only "
            "queues named NAME.* (repeatable).",
            show_default=False,
        ),
    ] = None,
    consumer_queue: Annotated[
        str, typer.Option(help="The queue the consumer reads (\\[consume] queue).")
    ] = STORE_QUEUE,
    secrets_dir: Annotated[
        Path,
        typer.Option(
            help="Directory (0700) of one password file (0600) per user; an existing file is "
            "kept, so write one there first to choose a password."
        ),
    ] = Path("state/rabbitmq-secrets"),
    definitions_file: Annotated[
        Path | None,
        typer.Option(
            "--definitions",
            help="Write a definitions file (password hashes only) for `rabbitmqctl "
            "import_definitions` or load_definitions instead of changing a node.",
            show_default=False,
        ),
    ] = None,
    ctl: Annotated[
        str,
        typer.Option(
            "--rabbitmqctl",
            help="The rabbitmqctl to run (it must reach the node: run as root or the rabbitmq "
            "user, or with the node's Erlang cookie in $HOME).",
        ),
    ] = "rabbitmqctl",
    node: Annotated[
        str | None,
        typer.Option("--node", "-n", help="Node name for rabbitmqctl. \\[default: its own]"),
    ] = None,
) -> None:
    """Create a vhost and least-privilege users (bridge, consumer, unpack, readers) in RabbitMQ.

    Each user may configure, write and read only the exchanges and queues
    its component declares and uses (docs/rabbitmq.md has the table); guest
    keeps no permission on the vhost.

    Passwords are generated once per user and written to SECRETS_DIR/USER
    (0600); they are never printed: point a component at its file with
    \\[amqp] password_file (or IOTPIPE_AMQP__PASSWORD_FILE) and a URL
    without password, amqp://USER@HOST:5672/VHOST. Running setup again keeps
    the passwords and resets the permissions.

    [bold]Examples[/bold]

      sudo iotpipe rabbitmq setup --secrets-dir /etc/iotpipe/rabbitmq
      iotpipe rabbitmq setup --reader grafana --reader audit
      iotpipe rabbitmq setup --definitions definitions.json    # for import_definitions
    """
    roles = roles_for(user or _DEFAULT_USERS, reader or (), consumer_queue=consumer_queue)
    if not vhost or len(vhost.encode()) > 255:
        raise ConfigError("rabbitmq.vhost", vhost, "1 to 255 bytes")
    users = []
    for role in roles:
        path, password, made = secret_file(secrets_dir, role.name)
        users.append((role, password))
        typer.echo(f"{role.name}: password {'written to' if made else 'kept in'} {path}", err=True)
    document = definitions(vhost, users)
    if definitions_file is not None:
        _write_private(definitions_file, json.dumps(document, indent=2) + "\n")
        typer.echo(f"definitions for vhost {vhost!r} written to {definitions_file}", err=True)
    else:
        apply(rabbitmqctl([ctl], node=node), document, vhost=vhost)
        typer.echo(f"vhost {vhost!r} and {len(roles)} users set up on the node", err=True)
    for role in roles:
        typer.echo(
            f"  {role.name:<10} amqp://{role.name}@HOST:5672/{vhost}  "
            f"password_file = {secrets_dir / role.name}"
        )


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (it holds password hashes)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
        path.chmod(0o600)
    except OSError as err:
        raise ConfigError("rabbitmq.definitions", path, err.strerror or str(err)) from None

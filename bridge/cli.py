"""``iotpipe broker``: run the embedded edge broker, or add a user to its password file.

Mounted by :mod:`iotpipe.cli` as a single command (``app.command("broker")(broker)``), so adding a
user is the ``--add-user`` option rather than a ``broker passwd`` subcommand. amqtt's own
``user_mgr`` manages a SQL user database (``amqtt[contrib]``), not this password file, and
``mosquitto_passwd`` writes hashes amqtt cannot read, so neither can do the job.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from iotpipe.options import AmqpUrlOption, ConfigOption, MqttUrlOption, run_in_foreground
from iotpipe.settings import config_path, load

_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# this machine only (127.0.0.1:1883); anyone may connect;[/dim]
  [dim]# counters on http://127.0.0.1:9184/metrics[/dim]
  iotpipe broker

  [dim]# devices log in as {site}/{device}; services by name[/dim]
  iotpipe broker --add-user home/pi-kitchen --password-file passwd
  iotpipe broker --add-user bridge --password-file passwd
  iotpipe broker --host 0.0.0.0 --password-file passwd \\
      --acl-file configs/broker-acl.toml

  [dim]# also MQTT over TLS for the LAN (mqtts://host:8883)[/dim]
  iotpipe broker --host 0.0.0.0 --tls-port 8883 \\
      --tls-cert broker.pem --tls-key broker.key --password-file passwd

  [dim]# sessions, queues and retained messages survive a restart[/dim]
  iotpipe broker --state-file state/broker/state.db

  [dim]# everything from a file (commented sample: configs/broker.toml)[/dim]
  iotpipe broker --config configs/broker.toml

  [dim]# scripted: the password comes from stdin if it is not a terminal[/dim]
  echo "$PW" | iotpipe broker --add-user home/pi-1 --password-file passwd
"""


def broker(
    *,
    config: ConfigOption = None,
    host: Annotated[
        str | None,
        typer.Option(
            "--host",
            help="Address to listen on; 0.0.0.0 = every interface. \\[default: 127.0.0.1]",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", "-p", help="TCP port. \\[default: 1883]", show_default=False),
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option(
            "--password-file",
            help="user:argon2-hash file (amqtt's FileAuthPlugin format). When set, clients must log "
            "in; devices as {site}/{device}.",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    acl_file: Annotated[
        Path | None,
        typer.Option(
            "--acl-file",
            help="TOML ACL (see configs/broker-acl.toml); needs --password-file.",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    tls_port: Annotated[
        int | None,
        typer.Option(
            "--tls-port",
            help="Also listen for MQTT over TLS (mqtts://) on this port, e.g. 8883; needs "
            "--tls-cert and --tls-key. \\[default: 0 = no TLS listener]",
            show_default=False,
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            "--tls-cert",
            help="Server certificate (PEM; intermediates after it) of the --tls-port listener.",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(
            "--tls-key",
            help="Private key (PEM, unencrypted) of --tls-cert.",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(
            "--http-port",
            help="Port of /metrics and /healthz; 0 = a free port. \\[default: 9184]",
            show_default=False,
        ),
    ] = None,
    state_file: Annotated[
        Path | None,
        typer.Option(
            "--state-file",
            help="SQLite file keeping persistent sessions, their queued and unacknowledged "
            "messages, and retained messages across restarts (saved every autosave_interval "
            "seconds and at stop). Default: none, state in memory.",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    add_user: Annotated[
        str | None,
        typer.Option(
            "--add-user",
            metavar="USER",
            help="Add USER to the password file (or change their password) and exit. The password "
            "is prompted for, or read from stdin. A running broker picks it up at the next login.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the embedded MQTT broker (amqtt): zero-install, for an edge box or a laptop.

    MQTT 3.1.1 only (docs/broker.md: how it corrects amqtt's deviations).
    With --state-file, sessions, queued and retained messages survive a restart.
    --tls-port adds an mqtts:// listener next to the plain one (docs/broker.md "TLS").
    Production sites: Mosquitto (configs/mosquitto/). SIGTERM or Ctrl-C stops it.
    """
    from bridge.broker import add_user as write_user
    from bridge.broker import run
    from bridge.settings import BrokerSettings

    flags: dict[str, Any] = {
        "host": host,
        "port": port,
        "password_file": password_file,
        "acl_file": acl_file,
        "tls_port": tls_port,
        "tls_cert_file": tls_cert,
        "tls_key_file": tls_key,
        "http_port": http_port,
        "state_file": state_file,
    }
    settings = load(BrokerSettings, "broker", config_file=config_path(config), overrides=flags)
    if add_user is None:
        run(settings, echo=typer.echo)
        return
    if settings.password_file is None:
        typer.secho(
            "iotpipe: error: --add-user needs --password-file (or broker.password_file)", err=True
        )
        raise typer.Exit(2)
    password = _read_password(add_user)
    created = write_user(settings.password_file, add_user, password)
    verb = "added user" if created else "changed the password of"
    typer.echo(f"{verb} {add_user} in {settings.password_file}")


def _read_password(username: str) -> str:
    if sys.stdin.isatty():
        password: str = typer.prompt(
            f"Password for {username}", hide_input=True, confirmation_prompt=True
        )
        return password
    return sys.stdin.readline().rstrip("\r\n")


# Typer builds the help page from the docstring; the examples are appended here so the docstring
# stays a plain sentence for readers of the code.
broker.__doc__ = inspect.cleandoc(broker.__doc__ or "") + _EXAMPLES


_BRIDGE_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# local Mosquitto/amqtt -> local RabbitMQ, spool in state/bridge/[/dim]
  iotpipe bridge

  [dim]# a gateway reaching RabbitMQ over the WAN, with TLS[/dim]
  iotpipe bridge --mqtt mqtt://bridge:pw@127.0.0.1:1883 \\
      --amqp amqps://iot:pw@rabbit.example.com:5671/telemetry

  [dim]# everything from a file (commented sample: configs/bridge.toml)[/dim]
  iotpipe bridge --config configs/bridge.toml
"""


def bridge(
    *,
    config: ConfigOption = None,
    mqtt: MqttUrlOption = None,
    amqp: AmqpUrlOption = None,
    spool: Annotated[
        Path | None,
        typer.Option(
            "--spool",
            help="Spool file for RabbitMQ outages. \\[default: state/bridge/spool.db]",
            show_default=False,
            dir_okay=False,
        ),
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(
            "--http-port",
            help="Port of /metrics and /healthz. \\[default: 9181]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Forward MQTT telemetry to RabbitMQ: nothing lost, nothing dropped silently.

    Subscribes (QoS 1, persistent session) to iotpipe/v1/+/+/telemetry and
    .../status and checks every message against the wire contract: valid ones
    go to the iotpipe.telemetry exchange, rejected ones to iotpipe.dead
    (routing key bridge.<reason>). A message is acknowledged to MQTT only after
    RabbitMQ confirmed it or it was committed to the local spool, which holds
    messages while RabbitMQ is unreachable. SIGTERM or Ctrl-C: finish, exit 0.
    """

    from bridge.service import Bridge
    from bridge.settings import BridgeSettings
    from iotpipe.settings import AmqpSettings, MqttSettings

    path = config_path(config)
    mqtt_settings = load(MqttSettings, "mqtt", config_file=path, overrides={"url": mqtt})
    amqp_settings = load(AmqpSettings, "amqp", config_file=path, overrides={"url": amqp})
    settings = load(
        BridgeSettings,
        "bridge",
        config_file=path,
        overrides={"spool_path": spool, "http_port": http_port},
    )
    service = Bridge.from_settings(mqtt_settings, amqp_settings, settings)
    run_in_foreground(
        service,
        f"iotpipe bridge {mqtt_settings.broker} -> {amqp_settings.broker}; "
        f"spool {settings.spool_path}; http://{settings.http_host}:{settings.http_port}/metrics",
    )


bridge.__doc__ = inspect.cleandoc(bridge.__doc__ or "") + _BRIDGE_EXAMPLES


_UNPACK_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# on the central RabbitMQ's host: packs from iotpipe.uplink -> iotpipe.telemetry[/dim]
  iotpipe unpack

  [dim]# remote RabbitMQ, pack ids remembered in state/unpack/packs.db[/dim]
  iotpipe unpack --amqp amqps://iot:pw@rabbit.example.com:5671/telemetry

  [dim]# everything from a file (commented sample: configs/unpack.toml)[/dim]
  iotpipe unpack --config configs/unpack.toml
"""


def unpack(
    *,
    config: ConfigOption = None,
    amqp: AmqpUrlOption = None,
    queue: Annotated[
        str | None,
        typer.Option(
            "--queue",
            help="The queue packs arrive on. \\[default: iotpipe.uplink]",
            show_default=False,
        ),
    ] = None,
    http_port: Annotated[
        int | None,
        typer.Option(
            "--http-port",
            help="Port of /metrics and /healthz; 0 = a free port. \\[default: 9185]",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Unpack the packed WAN uplink: site bridges' packs in, standard telemetry messages out.

    The central end of \\[bridge] uplink = "packed" (docs/bridge.md, "Lean WAN
    uplink"): consumes packs from the iotpipe.uplink queue and publishes every
    message in them to iotpipe.telemetry (or iotpipe.dead) with its exact body
    and properties, with publisher confirms; a pack is acknowledged only after
    all its messages were confirmed. A pack already unpacked (same pack id) is
    acknowledged without publishing again; one that cannot be decoded goes to
    iotpipe.dead (routing key unpack.bad_pack). SIGTERM or Ctrl-C: stop, exit 0
    (a pack in hand is redelivered).
    """
    from bridge.settings import UnpackSettings
    from bridge.unpack import Unpacker
    from iotpipe.settings import AmqpSettings

    path = config_path(config)
    amqp_settings = load(AmqpSettings, "amqp", config_file=path, overrides={"url": amqp})
    settings = load(
        UnpackSettings,
        "unpack",
        config_file=path,
        overrides={"queue": queue, "http_port": http_port},
    )
    service = Unpacker.from_settings(amqp_settings, settings)
    run_in_foreground(
        service,
        f"iotpipe unpack {amqp_settings.broker} queue {settings.queue}; "
        f"http://{settings.http_host}:{settings.http_port}/metrics",
    )


unpack.__doc__ = inspect.cleandoc(unpack.__doc__ or "") + _UNPACK_EXAMPLES

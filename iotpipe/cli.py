"""The ``iotpipe`` command: one entry point that mounts each component's subcommands.

Every component keeps its commands in its own ``cli`` module; this root names them in a lazy
table (:data:`COMMANDS`), so a command's module is imported only when that command runs and
``iotpipe --version`` or ``--help`` imports no component. The root handles ``--version`` and
logging, and turns an :class:`~iotpipe.errors.IotpipeError` into one clear line on stderr and a
non-zero exit code (never a traceback for a user mistake).

The installed ``iotpipe`` script enters through :mod:`iotpipe.__main__`, which runs the edge
agent (``iotpipe edge run``) without importing typer; everything else, help included, comes here.
"""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

from iotpipe import __version__
from iotpipe.commands import LazyCommand, LazyGroup
from iotpipe.errors import IotpipeError
from iotpipe.options import ConfigOption, MqttUrlOption, setup_logging
from iotpipe.wire import CONTRACT

#: Every component's command, in help order: name -> ("module:attr", one-line summary).
COMMANDS = {
    "broker": LazyCommand(
        "bridge.cli:broker",
        "Run the embedded MQTT broker (amqtt): zero-install, for an edge box or a laptop.",
    ),
    "bridge": LazyCommand(
        "bridge.cli:bridge",
        "Forward MQTT telemetry to RabbitMQ: nothing lost, nothing dropped silently.",
    ),
    "unpack": LazyCommand(
        "bridge.cli:unpack",
        "Unpack the packed WAN uplink: site bridges' packs in, standard telemetry messages out.",
    ),
    "ingest": LazyCommand(
        "bridge.ingest_cli:app",
        "Ingest rules: map foreign MQTT payloads (Tasmota, ESPHome, Zigbee2MQTT, Shelly, line "
        "protocol, Sparkplug B) to envelopes. See docs/ingest.md.",
    ),
    "simulate": LazyCommand(
        "simulator.cli:simulate",
        "Publish a simulated sensor fleet: realistic signals, faults on demand, every ack counted.",
    ),
    "record": LazyCommand(
        "iotpipe.recording_cli:record",
        "Record MQTT traffic to a file (JSON Lines, see docs/recording.md).",
    ),
    "replay": LazyCommand(
        "iotpipe.recording_cli:replay",
        "Publish a recording to an MQTT broker, in order and with its original timing.",
    ),
    "consume": LazyCommand(
        "consumers.cli:consume", "Store telemetry from RabbitMQ, each reading exactly once."
    ),
    "export": LazyCommand(
        "consumers.query_cli:export",
        "Export stored readings as JSON lines or CSV, ordered by site, device, sensor and time.",
    ),
    "stats": LazyCommand(
        "consumers.query_cli:stats",
        "Show what a store holds: totals and per-device completeness.",
    ),
    "dashboard": LazyCommand(
        "consumers.dashboard.cli:app",
        "Serve the web dashboard and the query API (docs/api.md) over a SQLite store.",
    ),
    "up": LazyCommand(
        "iotpipe.up:up",
        "Run the whole pipeline here: edge broker, RabbitMQ, bridge, consumer, dashboard, fleet.",
    ),
    "rabbitmq": LazyCommand(
        "iotpipe.rabbitmq_cli:app",
        "RabbitMQ for iotpipe: a vhost and one least-privilege user per component.",
    ),
    "status": LazyCommand(
        "iotpipe.status:status",
        "Show each pipeline component's health (/healthz) and main counters.",
    ),
    "device": LazyCommand(
        "iotpipe.device_cli:app",
        "Device logins: give a device its own MQTT password, revoke it, list who may log in.",
    ),
    "ca": LazyCommand(
        "iotpipe.ca_cli:app",
        "A local certificate authority: client certificates for devices, server ones for brokers.",
    ),
    "services": LazyCommand(
        "iotpipe.services_cli:app",
        "systemd units for the central services: broker, bridge, unpack, consume, dashboard.",
    ),
    "edge": LazyCommand(
        "edge.cli:app",
        "The Raspberry Pi edge agent: run it, check the wiring, build an offline bundle, and "
        "provision an SD card image.",
    ),
}


class RootGroup(LazyGroup):
    """The ``iotpipe`` group: ``watch`` defined here, every other command in :data:`COMMANDS`."""

    lazy_commands = COMMANDS


app = typer.Typer(
    cls=RootGroup,
    name="iotpipe",
    help="IoT telemetry pipeline: MQTT edge -> RabbitMQ -> exactly-once time-series stores.\n\n"
    "Start with [bold]iotpipe broker[/bold] and [bold]iotpipe simulate[/bold]; "
    "see each command's --help for examples.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class LogLevel(StrEnum):
    """Log levels accepted by ``--log-level``."""

    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"iotpipe {__version__} (wire contract {CONTRACT})")
        raise typer.Exit


@app.callback()
def root(
    log_level: Annotated[
        LogLevel, typer.Option("--log-level", help="Log verbosity (logs go to stderr).")
    ] = LogLevel.WARNING,
    _version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Set up logging for every subcommand."""
    setup_logging(log_level.value)


@app.command("watch")
def watch_command(
    mqtt: MqttUrlOption = None,
    topic: Annotated[
        list[str] | None,
        typer.Option(
            "--topic", "-t", help="Topic filter to watch (repeatable).", show_default=False
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(help="Stop after this many seconds [default: run until Ctrl-C].", min=0.1),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Show live iotpipe traffic on an MQTT broker: devices, latest readings, rejected messages.

    Every message is checked against the wire contract; rejected ones are counted by reason
    (bad_json, schema, topic_mismatch, too_large, ...).

    [bold]Examples[/bold]

      iotpipe watch                                   # local broker, all iotpipe topics
      iotpipe watch --mqtt mqtt://gw.local:1883 -t 'iotpipe/v1/kitchen/#'
    """
    from iotpipe.settings import MqttSettings, config_path, load
    from iotpipe.watch import watch

    settings = load(MqttSettings, "mqtt", config_file=config_path(config), overrides={"url": mqtt})
    view = watch(settings, topic or ["iotpipe/#"], duration=duration)
    typer.echo(view.summary(), err=True)


def main() -> None:
    """Run the ``iotpipe`` command line."""
    try:
        app(prog_name="iotpipe")
    except IotpipeError as err:
        typer.secho(f"iotpipe: error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.secho("iotpipe: interrupted", err=True)
        sys.exit(130)

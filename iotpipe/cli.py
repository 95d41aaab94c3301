"""The ``iotpipe`` command: one entry point that mounts each component's subcommands.

Every component keeps its commands in its own ``cli`` module; this root only wires them up,
handles ``--version`` and logging, and turns an :class:`~iotpipe.errors.IotpipeError` into one
clear line on stderr and a non-zero exit code (never a traceback for a user mistake).
"""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated

import typer

from iotpipe import __version__
from iotpipe.errors import IotpipeError
from iotpipe.options import ConfigOption, MqttUrlOption, setup_logging

app = typer.Typer(
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
        typer.echo(f"iotpipe {__version__} (wire contract 1.0)")
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


def _mount() -> None:
    from bridge.cli import bridge, broker
    from consumers.cli import consume
    from consumers.dashboard.cli import dashboard
    from consumers.query_cli import export, stats
    from edge.cli import build as edge_commands
    from iotpipe.recording_cli import record, replay
    from iotpipe.status import status
    from iotpipe.up import up
    from simulator.cli import simulate

    app.command("broker")(broker)
    app.command("bridge")(bridge)
    app.command("simulate")(simulate)
    app.command("record")(record)
    app.command("replay")(replay)
    app.command("consume")(consume)
    app.command("export")(export)
    app.command("stats")(stats)
    app.command("dashboard")(dashboard)
    app.command("up")(up)
    app.add_typer(edge_commands(), name="edge")
    app.command("status")(status)


def main() -> None:
    """Run the ``iotpipe`` command line."""
    _mount()
    try:
        app(prog_name="iotpipe")
    except IotpipeError as err:
        typer.secho(f"iotpipe: error: {err}", err=True, fg=typer.colors.RED)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        typer.secho("iotpipe: interrupted", err=True)
        sys.exit(130)

"""``iotpipe edge run``: the Raspberry Pi agent's command.

The ``iotpipe`` root mounts :func:`run` under ``iotpipe edge``. ``python -m edge.cli_run`` runs
the same command alone; ``python -m edge.agent --config FILE`` is the smallest way in (no typer,
no other component's commands imported), for the systemd unit of a small Pi.
"""

from __future__ import annotations

import inspect
from typing import Annotated

import typer

from iotpipe.options import ConfigOption, MqttUrlOption

__all__ = ["main", "run"]

_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# everything from a file (commented sample: configs/edge.toml)[/dim]
  iotpipe edge run --config /etc/iotpipe/edge.toml

  [dim]# the same file, another broker[/dim]
  iotpipe edge run --config edge.toml --mqtt mqtt://pi:secret@gateway.local:1883
"""


def run(
    *,
    config: ConfigOption = None,
    mqtt: MqttUrlOption = None,
    site: Annotated[
        str | None, typer.Option("--site", help="Site name (edge.site).", show_default=False)
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            "--device", help="Device name \\[default: the host name].", show_default=False
        ),
    ] = None,
) -> None:
    """Read the configured sensors and publish their readings, losing nothing on the way.

    Readings are batched into envelopes (wire contract 1.0), committed to a local
    SQLite outbox and published at QoS 1 to iotpipe/v1/<site>/<device>/telemetry;
    an envelope is deleted only after the broker's PUBACK. While the broker is
    unreachable the backlog grows (thinning its oldest part past outbox_max_bytes)
    and drains oldest-first when it is back. Retained status online/offline
    (birth, last will). systemd: Type=notify, WatchdogSec= supported. SIGTERM or
    Ctrl-C: commit, publish what time allows, go offline, exit 0.
    """
    from edge.agent import serve

    serve(config, mqtt_url=mqtt, site=site, device=device)


run.__doc__ = inspect.cleandoc(run.__doc__ or "") + _EXAMPLES


def main() -> None:
    """``python -m edge.cli_run``: the agent alone, with the root's error handling."""
    import sys

    from iotpipe.errors import IotpipeError
    from iotpipe.options import setup_logging

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="rich")

    @app.command()
    def _run(
        config: ConfigOption = None,
        mqtt: MqttUrlOption = None,
        site: Annotated[str | None, typer.Option("--site", show_default=False)] = None,
        device: Annotated[str | None, typer.Option("--device", show_default=False)] = None,
        log_level: Annotated[str, typer.Option("--log-level")] = "info",
    ) -> None:
        setup_logging(log_level)
        run(config=config, mqtt=mqtt, site=site, device=device)

    try:
        app()
    except IotpipeError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()

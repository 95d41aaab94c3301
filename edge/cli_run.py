"""``iotpipe edge run``: the Raspberry Pi agent's command.

The ``iotpipe`` root mounts :func:`run` under ``iotpipe edge``: it gives ``iotpipe edge run
--help``, and runs the agent under :func:`iotpipe.cli.main`. The installed ``iotpipe`` script
runs ``iotpipe edge run`` through :mod:`edge.run` instead, without typer (same options, same
:func:`edge.agent.serve`): the one entry point of the agent, systemd unit included.
"""

from __future__ import annotations

import inspect
from typing import Annotated

import typer

from iotpipe.options import ConfigOption, MqttUrlOption

__all__ = ["run"]

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
    an envelope is deleted only when the store's receipt covers it (receipts =
    "auto" follows what the bridge announces; without receipts, at the broker's
    PUBACK). At most receipt_window envelopes wait for receipts; unreceipted ones
    are resent with the same id. While the pipeline is away or slow the backlog
    grows (thinning its oldest part past outbox_max_bytes) and drains oldest-first
    when it is back. Retained status online/offline (birth, last will). systemd:
    Type=notify, WatchdogSec= supported. SIGTERM or Ctrl-C: commit, publish what
    time allows, go offline, exit 0.
    """
    from edge.agent import serve

    serve(config, mqtt_url=mqtt, site=site, device=device)


run.__doc__ = inspect.cleandoc(run.__doc__ or "") + _EXAMPLES

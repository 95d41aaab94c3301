"""``iotpipe edge sensors``: read every configured sensor once and print what it says.

The wiring check a user runs first on a new Pi: each ``[[edge.sensors]]`` table of the config
file is built, read once and closed; the table shows every reading, or the reason a sensor
failed. Exit status 0 if every sensor read, 1 if any failed, 2 for a config mistake (raised as
:class:`~iotpipe.errors.ConfigError`, which the root command prints as one line).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import typer

from edge.sensors import SensorConfig, build_drivers, read_safely
from iotpipe.errors import ConfigError
from iotpipe.options import ConfigOption
from iotpipe.settings import config_path, load

__all__ = ["load_sensor_configs", "sensors"]

_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# every sensor of the agent's config, read once[/dim]
  iotpipe edge sensors --config edge.toml

  [dim]# the config named by the environment[/dim]
  IOTPIPE_CONFIG=/etc/iotpipe/edge.toml iotpipe edge sensors

  [dim]# edge.toml: one table per sensor (all options: docs/edge-sensors.md)[/dim]
  \\[edge]
  site = "home"
  \\[\\[edge.sensors]]
  type = "ds18b20"
  \\[\\[edge.sensors]]
  type = "bme280"
  address = 0x77
"""


def load_sensor_configs(path: Path) -> list[SensorConfig]:
    """The ``[[edge.sensors]]`` tables of a config file, validated as the agent validates them.

    The whole ``[edge]`` section is loaded (:class:`edge.config.EdgeSettings`, with its
    ``IOTPIPE_EDGE__*`` overrides), so a file this command accepts is one the agent accepts.

    Raises:
        ConfigError: unreadable file, or an invalid setting (names the field and the value).
    """
    from edge.config import EdgeSettings

    return load(EdgeSettings, "edge", config_file=path).sensors


def _format(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}" if abs(value) >= 1e6 else f"{value:.6g}"
    return str(value)


def sensors(*, config: ConfigOption = None) -> None:
    """Read every configured sensor once and print the readings: the wiring check.

    Sensors are the \\[\\[edge.sensors]] tables of the config file. A failing sensor shows
    its error (no device, CRC error, timeout, wrong chip...) and the others are still
    read. Exit status: 0 all read, 1 some failed, 2 the config is invalid.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    path = config_path(config)
    if path is None:
        raise ConfigError("--config", None, "give the edge config file (or set $IOTPIPE_CONFIG)")
    configs = load_sensor_configs(path)
    console = Console(highlight=False)
    if not configs:
        console.print(escape(f"no sensors configured: add [[edge.sensors]] tables to {path}"))
        raise typer.Exit(1)
    drivers = build_drivers(configs)
    table = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold")
    table.add_column("sensor", no_wrap=True)
    table.add_column("reading", overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("unit", no_wrap=True)
    failed: list[str] = []
    # The table shows each failure; the drivers' own warning lines would only repeat it.
    quiet = logging.getLogger("edge.sensors")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        for driver in drivers:
            try:
                samples, error = read_safely(driver)
            finally:
                driver.close()
            for sample in samples:
                table.add_row(
                    escape(driver.name),
                    escape(sample.sensor),
                    escape(_format(sample.value)),
                    escape(sample.unit or ""),
                )
            if error is not None:
                failed.append(driver.name)
                table.add_row(
                    escape(driver.name), f"[red]error: {escape(str(error))}[/red]", "", ""
                )
    finally:
        quiet.setLevel(level)
    console.print(table)
    if failed:
        console.print(
            f"[red]{len(failed)} of {len(drivers)} sensors failed:[/red] {escape(', '.join(failed))}"
        )
        raise typer.Exit(1)
    console.print(f"[green]all {len(drivers)} sensors read[/green]")


sensors.__doc__ = inspect.cleandoc(sensors.__doc__ or "") + _EXAMPLES

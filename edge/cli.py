"""``iotpipe edge``: the Raspberry Pi agent and the tools that put it on a card.

Mounted by :mod:`iotpipe.cli` as a command group. Each subcommand lives in its own module and
is imported when the group is built; heavy imports stay inside the commands.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="edge",
    help="The Raspberry Pi edge agent: run it, check the wiring, build an offline bundle, and "
    "provision an SD card image.\n\n"
    "[bold]On the Pi[/bold]: [bold]iotpipe edge sensors[/bold] (wiring check), "
    "[bold]iotpipe edge run[/bold] (the agent). [bold]On your computer[/bold]: "
    "[bold]iotpipe edge bundle[/bold], then [bold]iotpipe edge flash[/bold].",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def build() -> typer.Typer:
    """The ``edge`` command group with every subcommand."""
    from edge.cli_bundle import bundle
    from edge.cli_flash import flash, inspect, seed
    from edge.cli_run import run
    from edge.cli_sensors import sensors

    app.command("run")(run)
    app.command("sensors")(sensors)
    app.command("bundle")(bundle)
    app.command("flash")(flash)
    app.command("seed")(seed)
    app.command("inspect")(inspect)
    return app

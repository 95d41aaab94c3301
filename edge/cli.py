"""``iotpipe edge``: the Raspberry Pi agent and the tools that put it on a card.

Mounted by :mod:`iotpipe.cli` as a command group. Each subcommand lives in its own module,
imported only when that subcommand runs (:class:`iotpipe.commands.LazyGroup`). The installed
``iotpipe`` script runs ``iotpipe edge run`` through :mod:`edge.run` without typer; the ``run``
command here gives it its ``--help`` (and runs it under ``iotpipe.cli.main``).
"""

from __future__ import annotations

import typer

from iotpipe.commands import LazyCommand, LazyGroup

#: name -> ("module:attr", one-line summary), in help order.
COMMANDS = {
    "run": LazyCommand(
        "edge.cli_run:run",
        "Read the configured sensors and publish their readings, losing nothing on the way.",
    ),
    "sensors": LazyCommand(
        "edge.cli_sensors:sensors",
        "Read every configured sensor once and print the readings: the wiring check.",
    ),
    "bundle": LazyCommand(
        "edge.cli_bundle:bundle",
        "Build an offline install bundle of the edge agent for 64-bit Raspberry Pi OS.",
    ),
    "flash": LazyCommand(
        "edge.cli_flash:flash",
        "Make a ready-to-boot edge image: an official Raspberry Pi OS image plus first-boot setup.",
    ),
    "seed": LazyCommand(
        "edge.cli_flash:seed",
        "Provision a freshly written card in place: the same files as flash, on its mounted "
        "boot partition.",
    ),
    "inspect": LazyCommand(
        "edge.cli_flash:inspect",
        "Show an image's partitions, its first-boot style, and what iotpipe added to it.",
    ),
}


class EdgeGroup(LazyGroup):
    """The ``iotpipe edge`` group."""

    lazy_commands = COMMANDS


app = typer.Typer(
    name="edge",
    cls=EdgeGroup,
    help="The Raspberry Pi edge agent: run it, check the wiring, build an offline bundle, and "
    "provision an SD card image.\n\n"
    "[bold]On the Pi[/bold]: [bold]iotpipe edge sensors[/bold] (wiring check), "
    "[bold]iotpipe edge run[/bold] (the agent). [bold]On your computer[/bold]: "
    "[bold]iotpipe edge bundle[/bold], then [bold]iotpipe edge flash[/bold].",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)

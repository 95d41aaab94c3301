"""``iotpipe edge bundle``: build the agent's offline install bundle (see :mod:`edge.bundle`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edge.bundle import DEFAULT_PLATFORMS, DEFAULT_PYTHONS, build


def bundle(
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Bundle directory to create (must be empty or missing)."),
    ],
    python: Annotated[
        list[str] | None,
        typer.Option(
            "--python",
            help="CPython version to fetch wheels for (repeatable) "
            f"[default: {', '.join(DEFAULT_PYTHONS)}].",
            show_default=False,
        ),
    ] = None,
    platform: Annotated[
        list[str] | None,
        typer.Option(
            "--platform",
            help="pip platform tag of the target (repeatable; older manylinux glibc versions "
            f"are accepted too) [default: {', '.join(DEFAULT_PLATFORMS)}].",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Build an offline install bundle of the edge agent for 64-bit Raspberry Pi OS.

    The bundle holds the wheels of the agent and its dependencies only (not the broker, bridge
    or dashboard ones), install.sh, the systemd unit, SHA256SUMS and VERSION. Needs the package
    index; the Pi that installs it does not.

    [bold]Examples[/bold]

      iotpipe edge bundle --out dist/edge                  # Bookworm (3.11) and Trixie (3.13)
      iotpipe edge bundle --out /tmp/b --python 3.11 --platform manylinux_2_36_x86_64
      # on the Pi:  sudo dist/edge/install.sh
    """
    built = build(
        out,
        tuple(python or DEFAULT_PYTHONS),
        tuple(platform or DEFAULT_PLATFORMS),
        progress=lambda line: typer.echo(line, err=True),
    )
    for version in built.wheels:
        size = built.size(version)
        typer.echo(f"CPython {version}: {len(built.wheels[version])} wheels, {size / 1e6:.1f} MB")

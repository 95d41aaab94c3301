"""``iotpipe edge run`` as the installed ``iotpipe`` script runs it: argparse, not typer.

The agent's process stays small on a Pi: :mod:`iotpipe.__main__` recognises ``edge run`` before
typer is imported and calls :func:`main`, whose whole path imports neither typer, rich nor
pydantic (``tests/edge/test_run.py`` checks). The options are those of
:func:`edge.cli_run.run`, which gives ``iotpipe edge run --help`` (typer's) and runs the same
:func:`edge.agent.serve` under ``iotpipe.cli.main``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, pointing at the full help (argparse's own help is not the one we show)."""
        sys.stderr.write(f"iotpipe edge run: error: {message} (see: iotpipe edge run --help)\n")
        sys.exit(2)


def main(argv: Sequence[str]) -> None:
    """Run the edge agent with ``argv`` (the words after ``iotpipe edge run``).

    Raises:
        IotpipeError: the configuration is invalid, or the outbox cannot be opened.
    """
    from edge.agent import serve

    parser = _Parser(prog="iotpipe edge run", add_help=False, allow_abbrev=False)
    parser.add_argument("--config", "-c", type=Path)
    parser.add_argument("--mqtt")
    parser.add_argument("--site")
    parser.add_argument("--device")
    args = parser.parse_args(argv)
    serve(args.config, mqtt_url=args.mqtt, site=args.site, device=args.device)

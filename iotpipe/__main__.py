"""The ``iotpipe`` script and ``python -m iotpipe``: the command line's front door.

``iotpipe [--log-level LEVEL] edge run ...`` starts the edge agent through :func:`edge.run.main`
before typer is imported, so the agent's process carries neither typer, rich nor pydantic (its
footprint on a small Pi). Every other command line, ``iotpipe edge run --help`` included, goes
to the typer root, :func:`iotpipe.cli.main`.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from iotpipe.logs import LOG_LEVELS

__all__ = ["FAST_COMMANDS", "fast_command", "main"]

#: Commands run without typer: their words -> ``"module:function"`` taking the remaining argv.
FAST_COMMANDS = {("edge", "run"): "edge.run:main"}

_HELP = frozenset({"-h", "--help"})


def fast_command(argv: Sequence[str]) -> tuple[str, list[str], str] | None:
    """``(target, its argv, log level)`` if ``argv`` runs a fast command, else None.

    Only the root option ``--log-level`` may come before the command words; anything else
    there (``--version``, a typo), a ``--help`` after them or an unknown level leaves the
    command line to typer, which answers or explains.
    """
    level, i = "warning", 0
    while i < len(argv) and argv[i].startswith("-"):
        if argv[i] == "--log-level" and i + 1 < len(argv):
            level, i = argv[i + 1], i + 2
        elif argv[i].startswith("--log-level="):
            level, i = argv[i].partition("=")[2], i + 1
        else:
            return None
    if level not in LOG_LEVELS:
        return None
    for words, target in FAST_COMMANDS.items():
        rest = list(argv[i + len(words) :])
        if tuple(argv[i : i + len(words)]) == words and _HELP.isdisjoint(rest):
            return target, rest, level
    return None


def main() -> None:
    """Run ``iotpipe`` with ``sys.argv``."""
    found = fast_command(sys.argv[1:])
    if found is None:
        from iotpipe.cli import main as typer_main

        typer_main()
        return
    from iotpipe.errors import IotpipeError
    from iotpipe.logs import setup_logging

    target, argv, level = found
    setup_logging(level)
    module, _, attr = target.partition(":")
    try:
        getattr(importlib.import_module(module), attr)(argv)
    except IotpipeError as err:
        sys.stderr.write(f"iotpipe: error: {err}\n")
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("iotpipe: interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()

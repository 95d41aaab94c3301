"""``iotpipe edge run`` as the installed ``iotpipe`` script runs it: a small parser, not typer.

The agent's process stays small on a Pi: :mod:`iotpipe.__main__` recognises ``edge run`` before
typer is imported and calls :func:`main`, whose whole path imports neither typer, rich nor
pydantic (``tests/edge/test_run.py`` checks), nor argparse (~0.6 MB resident for four options).
The options are those of :func:`edge.cli_run.run`, which gives ``iotpipe edge run --help``
(typer's) and runs the same :func:`edge.agent.serve` under ``iotpipe.cli.main``; a mistake is
reported in argparse's words, on one line, with exit code 2.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

__all__ = ["OPTIONS", "main", "parse"]

#: Each option's spellings -> its keyword; every option takes one value.
OPTIONS = {
    ("--config", "-c"): "config",
    ("--mqtt",): "mqtt",
    ("--site",): "site",
    ("--device",): "device",
}

_NEGATIVE_NUMBER = re.compile(r"-\d+$|-\d*\.\d+$")


def _fail(message: str) -> NoReturn:
    """One line, pointing at the full help (typer's, not ours)."""
    sys.stderr.write(f"iotpipe edge run: error: {message} (see: iotpipe edge run --help)\n")
    sys.exit(2)


def _is_value(word: str) -> bool:
    """argparse's rule: a word starting with ``-`` is an option, unless ``-`` or a negative number."""
    return not word.startswith("-") or word == "-" or _NEGATIVE_NUMBER.match(word) is not None


def parse(argv: Sequence[str]) -> dict[str, str | None]:
    """The options in ``argv`` (``--opt value``, ``--opt=value``, ``-cvalue``; the last one wins).

    Exits with code 2 and one line on stderr, as argparse would, when an option lacks its value
    or a word is not an option.
    """
    spelling = {name: key for names, key in OPTIONS.items() for name in names}
    values: dict[str, str | None] = dict.fromkeys(OPTIONS.values())
    unknown: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":  # the end of options; nothing may follow here
            unknown.extend(argv[i:])
            break
        name, eq, value = word.partition("=")
        if name in spelling:
            attached: str | None = value if eq else None
        elif word[:2] in spelling and len(word) > 2:  # -cVALUE
            name, attached = word[:2], word[2:]
        else:
            name, attached = word, None
        key = spelling.get(name)
        if key is None:
            unknown.append(word)
        elif attached is not None:
            values[key] = attached
        elif i + 1 < len(argv) and _is_value(argv[i + 1]):
            i += 1
            values[key] = argv[i]
        else:
            names = next(n for n, k in OPTIONS.items() if k == key)
            _fail(f"argument {'/'.join(names)}: expected one argument")
        i += 1
    if unknown:
        _fail(f"unrecognized arguments: {' '.join(unknown)}")
    return values


def main(argv: Sequence[str]) -> None:
    """Run the edge agent with ``argv`` (the words after ``iotpipe edge run``).

    Raises:
        IotpipeError: the configuration is invalid, or the outbox cannot be opened.
    """
    options = parse(argv)
    from edge.agent import serve

    config = options["config"]
    serve(
        Path(config) if config is not None else None,
        mqtt_url=options["mqtt"],
        site=options["site"],
        device=options["device"],
    )

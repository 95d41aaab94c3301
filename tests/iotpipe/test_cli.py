"""The ``iotpipe`` command as a user meets it: version, help, and one-line errors."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

from edge.cli import COMMANDS as EDGE_COMMANDS
from iotpipe import __version__
from iotpipe.cli import COMMANDS as ROOT_COMMANDS
from iotpipe.commands import LazyCommand, load_command

COMMANDS = ["broker", "simulate", "watch", "record", "replay"]


def iotpipe(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a child process."""
    return subprocess.run(
        [sys.executable, "-c", "from iotpipe.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_version() -> None:
    """--version prints the package version and the wire contract version."""
    result = iotpipe("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"iotpipe {__version__} (wire contract 1.2)"


def test_root_help_lists_every_command() -> None:
    """The root --help names every subcommand."""
    result = iotpipe("--help")
    assert result.returncode == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command: str) -> None:
    """Each subcommand's --help explains itself and shows at least one example."""
    result = iotpipe(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout
    assert f"iotpipe {command}" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["watch", "--mqtt", "http://nope"], "mqtt.url"),
        (["watch", "--mqtt", "mqtt://127.0.0.1:1", "--duration", "1"], "cannot connect"),
        (["watch", "--config", "/nonexistent.toml"], "no such file"),
        (["simulate", "--mqtt", "ftp://x"], "mqtt.url"),
        (["replay", "/nonexistent.jsonl"], "nonexistent.jsonl"),
    ],
)
def test_user_mistakes_end_in_one_line_without_traceback(args: list[str], message: str) -> None:
    """A bad URL, an unreachable broker or a missing file gives one clear line and exit != 0."""
    result = iotpipe(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


#: Packages that a command's module pulls in; --version and --help must import none of them.
HEAVY = ("bridge", "consumers", "edge", "simulator", "amqtt", "pika", "fastapi", "pydantic", "paho")

_IMPORTED_AFTER = """
import sys
sys.argv = ["iotpipe", *sys.argv[1:]]
try:
    from iotpipe.cli import main
    main()
except SystemExit:
    pass
sys.stderr.write(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


@pytest.mark.parametrize("args", [["--version"], ["--help"], []])
def test_version_and_help_import_no_component(args: list[str]) -> None:
    """The root's version and help come from the command table, not from imported components."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTED_AFTER, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    imported = set(result.stderr.split())
    assert "typer" in imported  # the probe works
    assert imported.isdisjoint(HEAVY), sorted(imported & set(HEAVY))
    assert "Commands" in result.stdout or result.stdout.startswith("iotpipe ")


def _tables() -> list[tuple[str, str, LazyCommand]]:
    return [("", name, entry) for name, entry in ROOT_COMMANDS.items()] + [
        ("edge ", name, entry) for name, entry in EDGE_COMMANDS.items()
    ]


@pytest.mark.parametrize(
    ("group", "name", "entry"), _tables(), ids=[f"{g}{n}" for g, n, _ in _tables()]
)
def test_every_lazy_command_resolves_and_its_summary_matches(
    group: str, name: str, entry: LazyCommand
) -> None:
    """Each table entry imports, and the summary the listing shows is its help's first paragraph."""
    command = load_command(name, entry.target)
    assert command.name == name
    first = " ".join(inspect.cleandoc(command.help or "").split("\n\n")[0].split())
    assert first == entry.summary, f"iotpipe {group}{name}: update the summary in the table"


def test_edge_help_lists_run_without_importing_the_agent() -> None:
    """``iotpipe edge --help`` lists every edge command from the table alone."""
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTED_AFTER, "edge", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    for name in EDGE_COMMANDS:
        assert f" {name} " in result.stdout
    imported = set(result.stderr.split())
    assert "edge" in imported
    # typer itself imports pydantic once it builds a subcommand's parameter types.
    others = set(HEAVY) - {"edge", "pydantic"}
    assert imported.isdisjoint(others), sorted(imported & others)

"""The ``iotpipe`` command as a user meets it: version, help, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from iotpipe import __version__

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
    assert result.stdout.strip() == f"iotpipe {__version__} (wire contract 1.0)"


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

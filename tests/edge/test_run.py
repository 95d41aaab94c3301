"""``iotpipe edge run``, the agent's one entry point: a small parser before typer, a small footprint."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.run import parse
from iotpipe.__main__ import fast_command

# The installed command: IOTPIPE_CLI (CI: from the wheel, tests/conftest.py) or this venv's.
IOTPIPE = os.environ.get("IOTPIPE_CLI") or str(Path(sys.executable).with_name("iotpipe"))

#: Runs the real entry point, but reports the imported top-level packages instead of looping.
_PROBE = """
import sys
import edge.agent

def report(agent):
    agent.publisher._connect()  # one attempt (refused), as the publisher makes it
    agent._start_http().stop()  # /metrics, as run() starts it
    sys.stderr.write("MODULES " + " ".join(sorted(sys.modules)))

edge.agent.Agent.run = report
sys.argv = ["iotpipe", *sys.argv[1:]]
from iotpipe.__main__ import main
main()
"""


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["edge", "run", "--config", "x.toml"],
            ("edge.run:main", ["--config", "x.toml"], "warning"),
        ),
        (["--log-level", "info", "edge", "run"], ("edge.run:main", [], "info")),
        (["--log-level=debug", "edge", "run", "-c", "a"], ("edge.run:main", ["-c", "a"], "debug")),
        (["edge", "run", "--help"], None),
        (["edge", "run", "-h"], None),
        (["--version", "edge", "run"], None),
        (["--log-level", "loud", "edge", "run"], None),
        (["edge", "sensors"], None),
        (["bridge"], None),
        ([], None),
    ],
)
def test_fast_command_takes_only_edge_run(
    argv: list[str], expected: tuple[str, list[str], str] | None
) -> None:
    """Only ``[--log-level L] edge run ...`` without --help skips typer; the rest goes to typer."""
    assert fast_command(argv) == expected


def _config(tmp_path: Path, http_port: int) -> Path:
    sensors = "".join(
        f'[[edge.sensors]]\ntype = "simulated"\nname = "s{i}"\ninterval = 1.0\n'
        f'sensors = ["{name}"]\nseed = {i}\n'
        for i, name in enumerate(("temperature", "humidity", "pressure", "power", "battery"))
    )
    path = tmp_path / "edge.toml"
    path.write_text(
        '[mqtt]\nurl = "mqtt://127.0.0.1:1"\n\n'
        f'[edge]\nsite = "t"\ndevice = "d"\nstate_dir = "{tmp_path / "state"}"\n'
        f"http_port = {http_port}\nclock_sync_files = []\n\n{sensors}"
    )
    return path


def test_agent_path_imports_neither_pydantic_typer_nor_rich(tmp_path: Path) -> None:
    """The agent built by ``iotpipe edge run`` (simulated sensors, /metrics) skips the heavy libraries.

    Its ``/metrics`` needs neither prometheus_client nor http.server either, and nothing on the
    path imports ``dataclasses`` (which imports ``inspect``), nor an unconfigured sensor driver,
    nor (connecting) the 'idna' codec, nor socketserver (footprint).
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = _config(tmp_path, http_port=port)
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, "edge", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    modules = set(result.stderr.rpartition("MODULES ")[2].split())
    packages = {name.split(".")[0] for name in modules}
    assert {"edge.agent", "paho.mqtt.client", "iotpipe.health"} <= modules  # the probe saw them
    heavy = {"pydantic", "pydantic_core", "typer", "rich", "click", "prometheus_client"}
    assert packages.isdisjoint(heavy), packages & heavy
    assert "http.server" not in modules
    assert modules.isdisjoint({"dataclasses", "inspect"}), modules & {"dataclasses", "inspect"}
    assert "edge.sensors.simulated" in modules
    assert "edge.sensors.bme280" not in modules
    unneeded = {"encodings.idna", "unicodedata", "socketserver", "secrets"}
    assert modules.isdisjoint(unneeded), modules & unneeded


def test_bad_config_is_one_line_through_the_fast_path(tmp_path: Path) -> None:
    """A config mistake under ``iotpipe edge run`` ends in one clear line and exit 2."""
    config = tmp_path / "edge.toml"
    config.write_text('[edge]\nsite = "t"\nbatch_max_readings = 0\n')
    result = subprocess.run(
        [IOTPIPE, "edge", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "iotpipe: error: invalid setting edge.batch_max_readings=0: "
        "Input should be greater than or equal to 1"
    )


def test_unknown_flag_is_one_line_through_the_fast_path() -> None:
    """An unknown flag under ``iotpipe edge run`` says so in one line and points at --help."""
    result = subprocess.run(
        [IOTPIPE, "edge", "run", "--sight", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "iotpipe edge run: error: unrecognized arguments: --sight x (see: iotpipe edge run --help)"
    ]


def test_help_is_typers() -> None:
    """``iotpipe edge run --help`` is the typer command's help, with its examples."""
    result = subprocess.run(
        [IOTPIPE, "edge", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "COLUMNS": "120"},
    )
    assert result.returncode == 0, result.stderr
    assert "Examples" in result.stdout
    assert "--config" in result.stdout
    assert "iotpipe edge run --config /etc/iotpipe/edge.toml" in result.stdout


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"iotpipe edge run: error: {message} (see: iotpipe edge run --help)\n")
        sys.exit(2)


def _argparse(argv: Sequence[str]) -> dict[str, Any]:
    """What ``iotpipe edge run`` parsed with argparse before it had its own parser."""
    parser = _ArgumentParser(prog="iotpipe edge run", add_help=False, allow_abbrev=False)
    parser.add_argument("--config", "-c")
    parser.add_argument("--mqtt")
    parser.add_argument("--site")
    parser.add_argument("--device")
    return vars(parser.parse_args(argv))


def _outcome(function: Callable[[Sequence[str]], dict[str, Any]], argv: list[str]) -> object:
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return function(argv)
    except SystemExit as exit_:
        return exit_.code, err.getvalue()


_WORDS = ["--config", "-c", "-cx.toml", "-c=y", "--site", "--site=s", "--mqtt=", "--device",
          "--sight", "a", "-5", "-1.5", "-", "--", "x=y", "-q"]  # fmt: skip


@given(st.lists(st.sampled_from(_WORDS), max_size=6))
def test_parser_answers_as_argparse_did(argv: list[str]) -> None:
    """Values, repeated options, missing values and unknown words come out as argparse gave them."""
    assert _outcome(parse, argv) == _outcome(_argparse, argv)

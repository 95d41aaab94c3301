"""``iotpipe edge run``, the agent's one entry point: argparse before typer, and a small footprint."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from iotpipe.__main__ import fast_command

IOTPIPE = str(Path(sys.executable).with_name("iotpipe"))

#: Runs the real entry point, but reports the imported top-level packages instead of looping.
_PROBE = """
import sys
import edge.agent

def report(agent):
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

    Its ``/metrics`` needs neither prometheus_client nor http.server either (footprint).
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

"""``iotpipe simulate`` as a user runs it: flags, summary output, exit codes."""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from iotpipe.errors import ConfigError, DeliveryError
from iotpipe.mqtt import Will
from simulator import run
from simulator.cli import simulate
from simulator.link import MemoryLink
from tests.conftest import BrokerInfo, free_port

app = typer.Typer()
app.command("simulate")(simulate)


@app.callback()
def _root() -> None:
    """Make ``simulate`` a named subcommand, as under the real ``iotpipe`` root."""


def iotpipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a child process."""
    return subprocess.run(
        [sys.executable, "-c", "from iotpipe.cli import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def memory_links(monkeypatch: pytest.MonkeyPatch) -> list[MemoryLink]:
    """Replace the MQTT client the run opens with MemoryLinks (collected in the returned list)."""
    links: list[MemoryLink] = []

    def fake_client(_settings: object, *, will: Will | None = None, **_kw: object) -> MemoryLink:
        links.append(MemoryLink(will))
        return links[-1]

    monkeypatch.setattr(run, "MqttLink", fake_client)
    return links


def test_flags_reach_the_simulation(memory_links: list[MemoryLink]) -> None:
    """Fleet, timing and fault flags shape the run; --json prints the summary as one object."""
    result = CliRunner().invoke(
        app,
        [
            "simulate", "--sites", "2", "--devices", "2", "--rate", "max", "--count", "40",
            "--seed", "5", "--connections", "1", "--batch", "2", "--sensors", "temperature,door",
            "--tag", "lab=1", "--fault", "duplicate=0.5", "--no-status", "--json", "--no-progress",
            "--ts-format", "epoch_ms",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["messages"] == 40
    assert summary["readings"] == 40 * 2 * 2
    assert summary["seed"] == 5
    assert summary["status"] == 0
    assert summary["faults"]["duplicate"] > 0
    assert summary["published"] == 40 + summary["faults"]["duplicate"]
    (link,) = memory_links
    first = json.loads(link.messages[0].payload)
    assert first["tags"] == {"lab": "1"}
    assert isinstance(first["ts"], int)
    assert [r["sensor"] for r in first["readings"]] == ["temperature", "door"] * 2
    assert link.messages[0].topic == "iotpipe/v1/site-01/dev-0001/telemetry"


def test_human_summary_and_progress_lines(memory_links: list[MemoryLink]) -> None:
    """Without --json the summary is a few lines on stdout; progress goes to stderr as log lines."""
    result = CliRunner().invoke(app, ["simulate", "--devices", "1", "--rate", "max", "-n", "5"])
    assert result.exit_code == 0, result.output
    assert "messages 5 (35 readings)" in result.stdout
    assert "acknowledged 7, unacknowledged 0" in result.stdout
    assert "simulate elapsed=" in result.stderr
    assert len(memory_links) == 1


def test_lost_acknowledgements_fail_after_the_summary(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unacknowledged publishes print the summary, then raise DeliveryError (exit code 4)."""

    def unacknowledging(
        _settings: object, *, will: Will | None = None, **_kw: object
    ) -> MemoryLink:
        return MemoryLink(will, acknowledge=False)

    monkeypatch.setattr(run, "MqttLink", unacknowledging)
    result = CliRunner().invoke(app, ["simulate", "-n", "3", "--rate", "max", "--json"])
    assert isinstance(result.exception, DeliveryError)
    assert "not acknowledged" in str(result.exception)
    assert DeliveryError.exit_code == 4
    assert json.loads(result.stdout)["unacknowledged"] > 0


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--fault", "duplicate"], "--fault"),
        (["--fault", "flood=0.1"], "simulate.faults.flood"),
        (["--rate", "fast"], "simulate.rate"),
        (["--sensors", "temperature,smell"], "simulate.sensors"),
        (["--device-pattern", "dev"], "simulate.device_pattern"),
    ],
)
def test_bad_flags_are_config_errors(
    args: list[str], field: str, memory_links: list[MemoryLink]
) -> None:
    """A bad flag value fails before connecting, naming the setting."""
    result = CliRunner().invoke(app, ["simulate", *args])
    assert isinstance(result.exception, ConfigError), result.output
    assert result.exception.field.startswith(field)
    assert memory_links == []


def test_unreachable_broker_is_one_line_and_exit_3() -> None:
    """With no broker listening, the real command prints one line and exits 3."""
    result = iotpipe("simulate", "--mqtt", f"mqtt://127.0.0.1:{free_port()}", "-n", "1")
    assert result.returncode == 3
    assert "cannot connect" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.mqtt
def test_real_command_against_a_broker(mqtt_broker: BrokerInfo) -> None:
    """The installed command publishes a small fleet to a real broker and reports every ack."""
    result = iotpipe(
        "simulate", "--mqtt", mqtt_broker.url, "--sites", "2", "--devices", "2",
        "--rate", "max", "--count", "100", "--json", "--no-progress", "--seed", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["messages"] == summary["published"] == 100
    assert summary["acknowledged"] == 100 + summary["status"] == 108
    assert summary["unacknowledged"] == 0


@pytest.mark.mqtt
def test_sigterm_drains_and_exits_cleanly(mosquitto_broker: BrokerInfo) -> None:
    """SIGTERM is a normal stop: the run drains, flushes, prints its summary and exits 0."""
    proc = subprocess.Popen(
        [
            sys.executable, "-c", "from iotpipe.cli import main; main()", "simulate",
            "--mqtt", mosquitto_broker.url, "--devices", "3", "--rate", "20", "--json",
            "--fault", "offline=0.2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stderr, selectors.EVENT_READ)
            assert selector.select(timeout=20), "no progress line within 20 s"
        # Without a pipeline capability on the broker, one line says receipts are off first.
        lines = [proc.stderr.readline(), proc.stderr.readline()]
        assert "simulate elapsed=" in lines[0] or "receipts off" in lines[0]
        assert any("simulate elapsed=" in line for line in lines)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["interrupted"] is True
    assert summary["unacknowledged"] == 0
    assert summary["published"] == summary["messages"] + summary["resent"]


def test_format_flag_reaches_the_simulation(memory_links: list[MemoryLink]) -> None:
    """--format tasmota publishes Tasmota SENSOR messages and LWTs; receipts are off."""
    result = CliRunner().invoke(
        app,
        [
            "simulate", "--format", "tasmota", "--devices", "2", "--connections", "1",
            "--rate", "max", "-n", "4", "--seed", "5", "--json", "--no-progress",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["published"] == 4
    assert summary["receipts"] is False
    (link,) = memory_links
    topics = [m.topic for m in link.messages]
    assert topics.count("tele/dev-0001/SENSOR") == 2
    assert topics.count("tele/dev-0002/LWT") == 2
    assert "Time" in json.loads(link.messages[2].payload)

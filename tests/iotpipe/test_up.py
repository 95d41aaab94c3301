"""``iotpipe up`` and ``iotpipe status``: the whole pipeline as real processes.

Each test runs ``iotpipe up`` in its own working directory (so ``state/`` is private), on free
ports, against the test RabbitMQ with a queue, bindings, sites and bridge client id of its own.
Orphans are found by working directory: every child of ``up`` inherits it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from iotpipe.settings import UpSettings, load
from iotpipe.status import probe
from tests.conftest import IOTPIPE, free_port, wait_for
from tests.rabbitmq import blocking_channel, rabbitmq_bin

SAMPLE = Path(__file__).resolve().parents[2] / "configs" / "up.toml"


def _env() -> dict[str, str]:
    """The environment without IOTPIPE_* settings, so only the test's flags and config count."""
    return {key: value for key, value in os.environ.items() if not key.startswith("IOTPIPE_")}


def processes_in(directory: Path) -> set[int]:
    """Pids of the processes whose working directory is ``directory``."""
    found = set()
    target = directory.resolve()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if Path(os.readlink(entry / "cwd")) == target:
                    found.add(int(entry.name))
    return found


@dataclass
class Rig:
    """A private working directory, ports and config for one ``iotpipe up``."""

    cwd: Path
    config: Path
    amqp: str
    site: str
    queue: str
    mqtt_port: int
    bridge_port: int
    consumer_port: int
    broker_http_port: int

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run an ``iotpipe`` command in the rig's directory and wait for it."""
        return subprocess.run(
            [*IOTPIPE, *args],
            cwd=self.cwd,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def up(self, *args: str) -> subprocess.Popen[str]:
        """Start ``iotpipe up`` in the background (output to up.out / up.err)."""
        return subprocess.Popen(
            [*IOTPIPE, "up", "--config", str(self.config), "--amqp", self.amqp, *args],
            cwd=self.cwd,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=(self.cwd / "up.out").open("w"),
            stderr=(self.cwd / "up.err").open("w"),
            text=True,
        )

    def output(self) -> str:
        """What ``up`` printed so far."""
        return "".join(
            (self.cwd / name).read_text()
            for name in ("up.out", "up.err")
            if (self.cwd / name).exists()
        )

    def components(self) -> dict[str, dict[str, object]]:
        """state/up/components.json by component name (empty while absent)."""
        try:
            listing = json.loads((self.cwd / "state/up/components.json").read_text())
        except (OSError, ValueError):
            return {}
        return {c["name"]: c for c in listing["components"]}

    def stored_readings(self) -> int:
        """Readings in the rig's SQLite store."""
        with contextlib.closing(sqlite3.connect(self.cwd / "state/telemetry.db")) as db:
            return int(db.execute("SELECT count(*) FROM readings").fetchone()[0])


@pytest.fixture
def rig(tmp_path: Path, unique: str, rabbitmq_url: str) -> Iterator[Rig]:
    """A working directory with a config naming this test's queue, sites and client id."""
    site = f"u{unique}"
    queue = f"test.up.{unique}"
    ports = free_port(), free_port(), free_port(), free_port()
    config = tmp_path / "up.toml"
    config.write_text(
        f"[up]\nmqtt_port = {ports[0]}\nbridge_http_port = {ports[1]}\n"
        f"consumer_http_port = {ports[2]}\nbroker_http_port = {ports[3]}\n"
        f'rate = "5"\nfaults = {{}}\n'
        f"dashboard_port = {free_port()}\n"
        f'[bridge]\nclient_id = "bridge-{unique}"\n'
        f'[consume]\nqueue = "{queue}"\nqueue_type = "classic"\n'
        f'bindings = ["iotpipe.v1.{site}-1.#", "iotpipe.v1.{site}-2.#"]\n'
        f'[simulate]\nsite_pattern = "{site}-{{n}}"\n'
    )
    rig = Rig(tmp_path, config, rabbitmq_url, site, queue, *ports)
    try:
        yield rig
    finally:
        for pid in processes_in(tmp_path):  # only if a test failed half-way
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with blocking_channel(rabbitmq_url) as channel:
            channel.queue_delete(queue)


def _assert_no_orphans(rig: Rig) -> None:
    left = processes_in(rig.cwd)
    assert not left, f"processes still running in {rig.cwd}: {left}\n{rig.output()}"


def _healthy_status(rig: Rig) -> subprocess.CompletedProcess[str] | None:
    result = rig.run("status")
    return result if result.returncode == 0 else None


@pytest.mark.rabbitmq
@pytest.mark.mqtt
def test_up_runs_the_pipeline_for_a_duration_and_status_reports_healthy(rig: Rig) -> None:
    """up --duration stores readings, status says healthy meanwhile, and it ends with exit 0."""
    up = rig.up("--duration", "6")
    try:
        wait_for(lambda: "simulator" in rig.components() or up.poll() is not None, 30, "start")
        status = wait_for(lambda: _healthy_status(rig), 20, "iotpipe status to report healthy")
        for name in ("rabbitmq", "broker", "consumer", "bridge", "dashboard", "simulator"):
            assert name in status.stdout
        assert "stored readings" in status.stdout
        # The embedded broker reports itself from its own /metrics.
        assert rig.components()["broker"]["http"] == f"http://127.0.0.1:{rig.broker_http_port}"
        assert re.search(r"sessions \d+, queued \d+, in-flight \d+, dropped 0\b", status.stdout)
        page = rig.components()["dashboard"]["url"]
        with urllib.request.urlopen(page, timeout=5) as resp:
            assert b"iotpipe" in resp.read()
        assert up.wait(timeout=60) == 0, rig.output()
    finally:
        if up.poll() is None:
            up.kill()
    output = rig.output()
    assert "pipeline running" in output
    assert f"mqtt://127.0.0.1:{rig.mqtt_port}" in output
    # The bridge and the simulator use the broker up started, not the default URL.
    logs = rig.cwd / "state" / "up"
    assert (
        f"iotpipe bridge mqtt://127.0.0.1:{rig.mqtt_port} ->" in (logs / "bridge.log").read_text()
    )
    assert "bridge drained" in output
    assert rig.stored_readings() > 0
    # The embedded broker kept its state (the bridge's persistent session) for the next up.
    assert f"state in {Path('state/up/broker-state.db')}" in (logs / "broker.log").read_text()
    assert (logs / "broker-state.db").stat().st_size > 0
    _assert_no_orphans(rig)
    after = rig.run("status")
    assert after.returncode == 1
    assert "nothing is running" in after.stderr


@pytest.mark.rabbitmq
@pytest.mark.mqtt
def test_sigint_stops_every_child_in_order_with_exit_0(rig: Rig) -> None:
    """Ctrl-C (SIGINT to up) stops every child, simulator first, and up exits 0."""
    up = rig.up()
    try:
        consumer = f"http://127.0.0.1:{rig.consumer_port}"
        wait_for(
            lambda: (
                probe(consumer).metrics.get("iotpipe_consumer_stored_readings_total", 0) > 0
                or up.poll() is not None
            ),
            30,
            "the consumer to store readings",
        )
        assert up.poll() is None, rig.output()
        pids = [c["pid"] for c in rig.components().values() if isinstance(c["pid"], int)]
        assert len(pids) == 5, rig.components()  # broker, consumer, bridge, dashboard, simulator
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0, rig.output()
    finally:
        if up.poll() is None:
            up.kill()
    output = rig.output()
    order = [output.index(f"{name} stopped") for name in ("simulator", "bridge", "consumer")]
    assert order == sorted(order), output
    assert output.index("consumer stopped") < output.index("broker stopped")
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"pid {pid} survived\n{output}"
    _assert_no_orphans(rig)
    assert rig.stored_readings() > 0


@pytest.mark.rabbitmq
@pytest.mark.mqtt
def test_edge_port_in_use_is_one_clear_line_and_starts_nothing(rig: Rig) -> None:
    """A taken edge broker port stops up before it starts anything, with one line naming it."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", rig.mqtt_port))
        busy.listen()
        result = rig.run("up", "--config", str(rig.config), "--amqp", rig.amqp)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"up.mqtt_port={rig.mqtt_port}" in lines[0]
    assert "already in use" in lines[0]
    _assert_no_orphans(rig)


@pytest.mark.rabbitmq
@pytest.mark.mqtt
def test_a_component_failing_at_start_stops_the_rest_and_exits_1(rig: Rig) -> None:
    """The consumer cannot bind its port: up names it, shows its log, stops the broker, exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", rig.consumer_port))  # bound, not listening: passes the pre-check
        result = rig.run("up", "--config", str(rig.config), "--amqp", rig.amqp)
    assert result.returncode == 1, result.stderr
    assert "the consumer exited with code" in result.stderr
    assert "cannot listen" in result.stderr  # from the consumer's log tail
    assert "broker stopped" in result.stderr
    _assert_no_orphans(rig)
    assert not (rig.cwd / "state/up/components.json").exists()


def test_status_with_nothing_running_says_so(tmp_path: Path) -> None:
    """iotpipe status without a running up: a clear message and exit 1."""
    result = subprocess.run(
        [*IOTPIPE, "status", "--state-dir", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        check=False,
        env=_env(),
    )
    assert result.returncode == 1
    assert "nothing is running" in result.stderr


@pytest.mark.parametrize("command", ["up", "status"])
def test_help_has_examples(command: str) -> None:
    """up and status explain themselves with examples."""
    result = subprocess.run(
        [*IOTPIPE, command, "--help"], capture_output=True, text=True, check=False, env=_env()
    )
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout
    assert f"iotpipe {command}" in result.stdout


def test_sample_config_loads_as_the_defaults_and_lists_every_option(tmp_path: Path) -> None:
    """configs/up.toml loads as the defaults, and uncommenting its options changes none."""
    assert load(UpSettings, "up", config_file=SAMPLE, environ={}) == UpSettings()
    uncommented = tmp_path / "up.toml"
    uncommented.write_text(
        "\n".join(
            line.removeprefix("# ") if line.startswith("# ") and " = " in line else line
            for line in SAMPLE.read_text().splitlines()
        )
    )
    data = tomllib.loads(uncommented.read_text())
    assert set(data["up"]) == set(UpSettings.model_fields), "every option is in the sample"
    assert load(UpSettings, "up", config_file=uncommented, environ={}) == UpSettings()


@pytest.mark.slow
@pytest.mark.mqtt
def test_up_starts_and_stops_a_private_rabbitmq_node(tmp_path: Path, unique: str) -> None:
    """--rabbitmq private boots a node with its data under state/, gives the bridge and the
    consumer least-privilege users of their own (readings are stored), and stops it on exit."""
    if rabbitmq_bin() is None:
        pytest.fail("rabbitmq-server is not installed: run `make setup`", pytrace=False)
    config = tmp_path / "up.toml"
    config.write_text(
        f'[up]\nrabbitmq = "private"\nrabbitmq_port = {free_port()}\n'
        f"rabbitmq_dist_port = {free_port()}\nmqtt_port = {free_port()}\n"
        f"bridge_http_port = {free_port()}\nconsumer_http_port = {free_port()}\n"
        f"broker_http_port = {free_port()}\ndashboard_port = {free_port()}\n"
        f'[bridge]\nclient_id = "bridge-{unique}"\n'
    )
    result = subprocess.run(
        [*IOTPIPE, "up", "--config", str(config), "--duration", "2", "--rate", "5"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "starting a private RabbitMQ node" in result.stderr
    assert "rabbitmq stopped" in result.stderr
    assert (tmp_path / "state/up/rabbitmq/mnesia").is_dir()
    assert not processes_in(tmp_path), result.stderr
    secrets = tmp_path / "state/up/rabbitmq/secrets"
    assert {p.name: p.stat().st_mode & 0o777 for p in secrets.iterdir()} == {
        "bridge": 0o600,
        "consumer": 0o600,
    }
    logs = tmp_path / "state/up"
    assert re.search(r"amqp://bridge@127\.0\.0\.1:\d+/iotpipe", (logs / "bridge.log").read_text())
    assert re.search(
        r"amqp://consumer@127\.0\.0\.1:\d+/iotpipe", (logs / "consumer.log").read_text()
    )
    with contextlib.closing(sqlite3.connect(tmp_path / "state/telemetry.db")) as db:
        assert db.execute("SELECT count(*) FROM readings").fetchone()[0] > 0

"""A simulated fleet against real brokers (amqtt and Mosquitto), checked by a real subscriber."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from iotpipe.envelope import Envelope, Rejection, Status, decode
from iotpipe.mqtt import Will
from iotpipe.settings import MqttSettings
from iotpipe.testing import Capture
from simulator.link import MqttLink
from simulator.progress import Snapshot
from simulator.run import Simulation, Summary
from simulator.settings import SimulateSettings
from tests.conftest import BrokerInfo, MosquittoProcess, free_port

pytestmark = pytest.mark.mqtt


def run_fleet(url: str, unique: str, progress: Any = None, **overrides: Any) -> Summary:
    """Run the simulator with MqttLink links against ``url`` (unpaced, seeded)."""
    values: dict[str, Any] = {"rate": "max", "seed": 3, "site_pattern": f"s{unique}-{{n}}"}
    values.update(overrides)
    settings = SimulateSettings(**values)
    mqtt = MqttSettings(url=url)

    def connect(index: int, will: Will | None) -> MqttLink:
        return MqttLink(mqtt, client_id=f"sim-{unique}-{index}", will=will)

    sim = Simulation(settings, connect)
    if progress is not None:
        sim.progress = progress
    return sim.run()


def test_fleet_messages_arrive_valid_and_in_seq_order(mqtt_broker: BrokerInfo, unique: str) -> None:
    """Every message arrives and decodes; each device's seq counts up by one; counts match."""
    capture = Capture(mqtt_broker.url, "iotpipe/v1/+/+/telemetry", qos=1).start()
    try:
        summary = run_fleet(mqtt_broker.url, unique, sites=2, devices=3, count=300)
        got = capture.wait(summary.published, timeout=30)
    finally:
        capture.stop()
    assert summary.ok
    assert summary.connections == 6  # a small fleet: one connection (and will) per device
    assert len(got) == summary.published == summary.messages == 300
    seqs: dict[tuple[str, str], list[int]] = defaultdict(list)
    for message in got:
        env = decode(message.topic, message.payload)
        assert isinstance(env, Envelope), env
        seqs[env.site, env.device].append(env.seq)
    assert len(seqs) == 6
    for device_seqs in seqs.values():
        assert device_seqs == list(range(50))


def test_final_status_is_retained_offline(mqtt_broker: BrokerInfo, unique: str) -> None:
    """After a run, a new subscriber gets every device's retained status: offline."""
    summary = run_fleet(mqtt_broker.url, unique, devices=3, count=30)
    assert summary.status == 6
    capture = Capture(mqtt_broker.url, f"iotpipe/v1/s{unique}-1/+/status", qos=1).start()
    try:
        got = capture.wait(3, timeout=10)
    finally:
        capture.stop()
    states = {}
    for message in got:
        status = decode(message.topic, message.payload)
        assert isinstance(status, Status), status
        states[status.device] = status.state
    assert states == {"dev-0001": "offline", "dev-0002": "offline", "dev-0003": "offline"}


def test_faulty_fleet_counts_match_what_arrives(mqtt_broker: BrokerInfo, unique: str) -> None:
    """With every fault on, what arrives matches the summary: valid, rejected, and by id."""
    faults = {
        "duplicate": 0.05,
        "reorder": 0.05,
        "malformed": 0.05,
        "schema": 0.05,
        "oversize": 0.01,
        "mismatch": 0.05,
        "skew": 0.05,
        "offline": 0.02,
    }
    capture = Capture(mqtt_broker.url, "iotpipe/v1/+/+/telemetry", qos=1).start()
    try:
        summary = run_fleet(
            mqtt_broker.url, unique, devices=4, connections=2, count=400, faults=faults
        )
        got = capture.wait(summary.published, timeout=30)
    finally:
        capture.stop()
    assert summary.ok
    assert len(got) == summary.published
    results = [decode(m.topic, m.payload) for m in got]
    valid = [r for r in results if isinstance(r, Envelope)]
    rejected = [r for r in results if isinstance(r, Rejection)]
    assert len(valid) == summary.valid
    assert len(rejected) == summary.rejected
    assert summary.faults.get("oversize", 0) > 0
    ids = Counter(env.id for env in valid)
    repeats = sum(ids.values()) - len(ids)
    # Duplicates repeat a valid id; an offline resend does too, unless it resent a rejected one.
    assert summary.faults["duplicate"] <= repeats <= summary.faults["duplicate"] + summary.resent


@pytest.mark.mosquitto
def test_broker_restart_mid_run_is_survived(tmp_path: Path, unique: str) -> None:
    """Mosquitto restarting mid-run: the simulator reconnects, and every publish is acknowledged."""
    port = free_port()
    broker = MosquittoProcess(tmp_path / "mosquitto", port)
    broker.start()

    class RestartOnce:
        interval = 0.0
        restarted = False

        def update(self, snapshot: Snapshot) -> None:
            if not self.restarted and snapshot.published >= 2000:
                self.restarted = True
                broker.stop()
                broker.start()

        def close(self) -> None:
            return None

    restart = RestartOnce()
    try:
        summary = run_fleet(
            f"mqtt://127.0.0.1:{port}", unique, restart, devices=20, count=6000, status=False
        )
    finally:
        broker.stop()
    assert restart.restarted
    assert summary.reconnects >= 1
    assert summary.published == 6000
    assert summary.ok

"""The edge agent against a private Mosquitto: outages, status, clock tag, sd_notify."""

from __future__ import annotations

import json
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest

from iotpipe.systemd_notify import Notifier
from iotpipe.testing import Capture
from tests.conftest import BrokerInfo, MosquittoProcess, free_port, wait_for
from tests.edge.conftest import FakeDriver, Subscriber, make_settings

pytestmark = [pytest.mark.mqtt, pytest.mark.mosquitto]

if shutil.which("mosquitto") is None:  # pragma: no cover
    pytest.fail("mosquitto is not installed: run `make setup`", pytrace=False)


def first_seen_seqs(envelopes: list[dict[str, Any]]) -> list[int]:
    """Each seq at its first arrival, in arrival order."""
    seen: dict[int, None] = {}
    for env in envelopes:
        seen.setdefault(env["seq"], None)
    return list(seen)


def test_broker_outage_delivers_every_envelope_in_order(
    tmp_path: Path, unique: str, run_agent: Any
) -> None:
    """Broker down for a while: readings keep being committed, and once it is back every
    committed envelope arrives (in seq order, same payload for the same id) and the outbox
    empties."""
    port = free_port()
    broker = MosquittoProcess(tmp_path / "mosquitto", port)
    broker.start()
    url = f"mqtt://127.0.0.1:{port}"
    site = f"t{unique}"
    subscriber = Subscriber(url, f"iotpipe/v1/{site}/+/telemetry", f"sub-{unique}").start()
    driver = FakeDriver(interval=0.02)
    running = run_agent(make_settings(tmp_path / "state", site), url, [driver])
    agent = running.agent
    try:
        wait_for(lambda: len(subscriber.envelopes()) >= 5, 15, "envelopes before the outage")
        broker.stop()
        wait_for(lambda: not agent.stats.connected, 15, "the agent to notice the outage")
        backlog_from = agent.stats.envelopes_committed
        wait_for(
            lambda: (
                agent.outbox.depth >= 20 and agent.stats.envelopes_committed >= backlog_from + 20
            ),
            30,
            "a backlog to build up while the broker is down",
        )
        broker.start()
        wait_for(lambda: agent.stats.connected, 30, "the agent to reconnect")
        wait_for(lambda: agent.stats.reconnects >= 1, 5, "a counted reconnect")
        running.stop()
        committed = agent.stats.envelopes_committed
        assert agent.outbox.dropped_envelopes == 0
        wait_for(
            lambda: len({e["seq"] for e in subscriber.envelopes()}) >= committed,
            30,
            f"all {committed} committed envelopes at the subscriber",
        )
    finally:
        subscriber.stop()
        broker.stop()
    envelopes = subscriber.envelopes()
    assert first_seen_seqs(envelopes) == list(range(committed))
    by_id: dict[str, dict[str, Any]] = {}
    for env in envelopes:
        assert by_id.setdefault(env["id"], env) == env  # a retransmission is the same message
    readings = sum(len(e["readings"]) for e in by_id.values())
    assert readings == agent.stats.readings
    assert [r["value"] for e in by_id.values() for r in e["readings"]] == [
        float(n) for n in range(1, readings + 1)
    ]
    # The outbox is empty at the end: reopen it and look.
    from edge.outbox import Outbox

    with Outbox(tmp_path / "state" / "outbox.db") as outbox:
        assert outbox.depth == 0


def test_status_birth_and_offline_are_retained(
    tmp_path: Path, unique: str, run_agent: Any, mosquitto_broker: BrokerInfo
) -> None:
    """Connecting publishes a retained 'online'; stopping publishes a retained, newer 'offline'."""
    site = f"t{unique}"
    topic = f"iotpipe/v1/{site}/pi1/status"
    running = run_agent(make_settings(tmp_path / "state", site), mosquitto_broker.url, [])
    wait_for(lambda: running.agent.stats.connected, 15, "the agent to connect")
    with Capture(mosquitto_broker.url, topic, qos=1) as capture:
        birth = json.loads(capture.wait(1)[0].payload)
    running.stop()
    assert running.agent.publisher.offline_acknowledged
    with Capture(mosquitto_broker.url, topic, qos=1) as capture:
        retained = capture.wait(1)[0]
    final = json.loads(retained.payload)
    assert retained.retain
    assert (birth["state"], final["state"]) == ("online", "offline")
    assert final["ts"] > birth["ts"]
    assert final["agent"].startswith("iotpipe-edge/")


def test_envelopes_are_tagged_until_the_clock_is_synchronised(
    tmp_path: Path, unique: str, run_agent: Any, mosquitto_broker: BrokerInfo
) -> None:
    """While no sync marker file exists envelopes carry clock=unsynced; afterwards they do not."""
    site = f"t{unique}"
    marker = tmp_path / "synchronized"
    settings = make_settings(tmp_path / "state", site, clock_sync_files=[marker])
    with Capture(mosquitto_broker.url, f"iotpipe/v1/{site}/+/telemetry", qos=1) as capture:
        running = run_agent(settings, mosquitto_broker.url, [FakeDriver()])
        first = json.loads(capture.wait(1)[0].payload)
        marker.touch()
        wait_for(
            lambda: any("tags" not in json.loads(m.payload) for m in capture.messages),
            15,
            "an envelope without the unsynced tag",
        )
        running.stop()
    assert first["tags"] == {"clock": "unsynced"}
    tagged = [
        "tags" in json.loads(m.payload) for m in capture.messages
    ]  # all tagged ones come before all untagged ones
    assert tagged == sorted(tagged, reverse=True)


def test_sd_notify_ready_and_watchdog_on_a_real_socket(
    tmp_path: Path, unique: str, run_agent: Any, mosquitto_broker: BrokerInfo
) -> None:
    """READY=1 once running, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 at the end."""
    name = f"iotpipe-notify-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(b"\0" + name.encode())
        server.settimeout(10)
        notifier = Notifier(environ={"NOTIFY_SOCKET": f"@{name}", "WATCHDOG_USEC": "200000"})
        running = run_agent(
            make_settings(tmp_path / "state", f"t{unique}"),
            mosquitto_broker.url,
            [FakeDriver()],
            notifier=notifier,
        )
        got: list[bytes] = []

        def three_pings() -> bool:
            got.append(server.recv(4096))
            return got.count(b"WATCHDOG=1") >= 3

        wait_for(three_pings, 10, "three watchdog pings")
        running.stop()
        while b"STOPPING=1" not in got:
            got.append(server.recv(4096))
    assert got[0].startswith(b"READY=1")


def test_a_failing_sensor_never_stops_the_others(
    tmp_path: Path, unique: str, run_agent: Any, mosquitto_broker: BrokerInfo
) -> None:
    """Errors and invalid readings are counted per sensor; the good sensor's readings flow."""
    site = f"t{unique}"
    broken = FakeDriver("broken", fail=lambda n: n % 2 == 0)
    nan = FakeDriver("nan", value=lambda n: float("nan"))
    good = FakeDriver("good")
    with Capture(mosquitto_broker.url, f"iotpipe/v1/{site}/+/telemetry", qos=1) as capture:
        running = run_agent(
            make_settings(tmp_path / "state", site), mosquitto_broker.url, [broken, nan, good]
        )
        wait_for(lambda: good.reads >= 20 and len(capture.messages) >= 3, 15, "readings")
        running.stop()
    stats = running.agent.stats
    assert stats.sensor_errors["broken"] >= 5
    assert stats.sensor_errors["nan"] >= 10
    assert stats.readings_invalid == stats.sensor_errors["nan"]
    sensors = {r["sensor"] for m in capture.messages for r in json.loads(m.payload)["readings"]}
    assert sensors == {"broken", "good"}
    assert broken.closed
    assert good.closed


def test_envelopes_are_committed_in_groups(
    tmp_path: Path, unique: str, run_agent: Any, mosquitto_broker: BrokerInfo
) -> None:
    """With commit_max_delay, several sealed envelopes share one transaction."""
    settings = make_settings(
        tmp_path / "state",
        f"t{unique}",
        batch_max_readings=1,
        commit_max_delay=0.5,
        commit_max_envelopes=1000,
    )
    running = run_agent(settings, mosquitto_broker.url, [FakeDriver(interval=0.01)])
    agent = running.agent
    start = agent.outbox.commits
    wait_for(lambda: agent.stats.envelopes_committed >= 100, 15, "100 envelopes")
    running.stop()
    appends = agent.stats.envelopes_committed
    # Deletes after PUBACK are commits too; still far fewer than one per envelope each.
    assert agent.outbox.commits - start < appends

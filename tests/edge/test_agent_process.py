"""The agent as a real process (``iotpipe edge run``, the installed entry point): SIGKILL loses nothing committed,
SIGTERM goes offline and exits 0."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from iotpipe.testing import Capture
from tests.conftest import BrokerInfo, wait_for
from tests.edge.conftest import Subscriber

#: The installed ``iotpipe`` script of this interpreter: the agent's one entry point.
# The installed command: IOTPIPE_CLI (CI: from the wheel, tests/conftest.py) or this venv's.
IOTPIPE = os.environ.get("IOTPIPE_CLI") or str(Path(sys.executable).with_name("iotpipe"))

pytestmark = [pytest.mark.mqtt, pytest.mark.mosquitto, pytest.mark.slow]


def write_config(path: Path, url: str, site: str, state: Path, drain_rate: float) -> Path:
    path.write_text(
        f"""
[mqtt]
url = "{url}"
keepalive = 5

[edge]
site = "{site}"
device = "pi1"
state_dir = "{state}"
batch_max_readings = 6
batch_max_delay = 0.5
commit_max_delay = 0.0
drain_rate = {drain_rate}
http_port = 0
clock_sync_files = []
stats_interval = 1.0

[[edge.sensors]]
type = "simulated"
interval = 0.1
sensors = ["temperature", "humidity", "pressure"]
seed = 1
"""
    )
    return path


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [IOTPIPE, "--log-level", "info", "edge", "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def committed_rows(db: Path) -> list[tuple[int, str, bytes]]:
    """(seq, id, payload) of every envelope in the outbox file, read with plain sqlite3."""
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT seq, payload FROM outbox ORDER BY id").fetchall()
        next_seq = int(conn.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()[0])
    finally:
        conn.close()
    out = [(int(seq), json.loads(payload)["id"], bytes(payload)) for seq, payload in rows]
    return [*out, (next_seq, "", b"")]


def test_sigkill_loses_nothing_committed_and_sigterm_goes_offline(
    tmp_path: Path, unique: str, mosquitto_broker: BrokerInfo
) -> None:
    """Kill -9 mid-stream with a backlog: after a restart every envelope that was in the outbox
    arrives unchanged, seq continues without reuse; then SIGTERM publishes a retained offline
    and exits 0."""
    site = f"t{unique}"
    url = mosquitto_broker.url
    state = tmp_path / "state"
    log = tmp_path / "agent.log"
    subscriber = Subscriber(url, f"iotpipe/v1/{site}/+/telemetry", f"sub-{unique}").start()
    agent: subprocess.Popen[bytes] | None = None
    try:
        # A slow drain, so that a backlog is committed but not yet published at the kill.
        slow = write_config(tmp_path / "slow.toml", url, site, state, drain_rate=1.0)
        agent = start(slow, log)
        wait_for(lambda: len(subscriber.envelopes()) >= 3, 30, "first envelopes")
        wait_for(
            lambda: b"backlog=" in log.read_bytes() and _backlog(log) >= 5,
            30,
            "a backlog of 5 envelopes in the stats log",
        )
        agent.send_signal(signal.SIGKILL)
        assert agent.wait(10) == -signal.SIGKILL
        *in_outbox, (next_seq, _, _) = committed_rows(state / "outbox.db")
        assert len(in_outbox) >= 5
        before_restart = {e["id"] for e in subscriber.envelopes()}
        assert not {row[1] for row in in_outbox} <= before_restart  # really not yet published

        fast = write_config(tmp_path / "fast.toml", url, site, state, drain_rate=100.0)
        agent = start(fast, log)
        wait_for(
            lambda: {row[1] for row in in_outbox} <= {e["id"] for e in subscriber.envelopes()},
            30,
            "every envelope of the killed agent's outbox",
        )
        wait_for(
            lambda: any(e["seq"] >= next_seq for e in subscriber.envelopes()),
            30,
            "envelopes of the restarted agent",
        )
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        subscriber.stop()
    envelopes = subscriber.envelopes()
    payloads: dict[str, bytes] = {}
    for message in subscriber.messages:
        env_id = json.loads(message.payload)["id"]
        assert payloads.setdefault(env_id, message.payload) == message.payload
    for _, env_id, payload in in_outbox:
        assert payloads[env_id] == payload  # delivered exactly as committed
    seqs = sorted({e["seq"] for e in envelopes})
    assert seqs == list(range(seqs[-1] + 1))  # no gap: nothing committed was lost
    assert len({e["boot"] for e in envelopes}) == 1  # same kernel boot: the counter continued
    assert (state / "outbox.db").exists()
    *left, _ = committed_rows(state / "outbox.db")
    assert left == []  # SIGTERM drained the outbox
    with Capture(url, f"iotpipe/v1/{site}/pi1/status", qos=1) as capture:
        status = capture.wait(1)[0]
    assert status.retain
    assert json.loads(status.payload)["state"] == "offline"


def _backlog(log: Path) -> int:
    last: Any = 0
    for line in log.read_text().splitlines():
        if "edge stats" in line:
            last = int(line.split("backlog=")[1].split()[0])
    return int(last)

"""An edge agent of this version sends what a 0.1.0 agent left in its outbox (tests/data/v0.1.0)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from edge.outbox import Outbox
from tests.conftest import MosquittoProcess, free_port, wait_for
from tests.edge.conftest import FakeDriver, Subscriber, make_settings

pytestmark = [pytest.mark.mqtt, pytest.mark.mosquitto]

OLD_OUTBOX = Path(__file__).parents[1] / "data" / "v0.1.0" / "outbox.db"
OLD_TOPIC = "iotpipe/v1/site-01/pi-01/telemetry"


def test_the_agent_sends_a_0_1_0_outbox_then_its_own(
    tmp_path: Path, unique: str, run_agent: Any
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(OLD_OUTBOX, state / "outbox.db")
    port = free_port()
    broker = MosquittoProcess(tmp_path / "mosquitto", port)
    broker.start()
    url = f"mqtt://127.0.0.1:{port}"
    old = Subscriber(url, OLD_TOPIC, f"old-{unique}").start()
    new = Subscriber(url, f"iotpipe/v1/t{unique}/+/telemetry", f"new-{unique}").start()
    try:
        running = run_agent(make_settings(state, f"t{unique}"), url, [FakeDriver(interval=0.02)])
        wait_for(lambda: len(old.envelopes()) >= 3, 20, "the 3 envelopes 0.1.0 left")
        wait_for(lambda: len(new.envelopes()) >= 1, 20, "an envelope of this agent")
        running.stop()
    finally:
        old.stop()
        new.stop()
        broker.stop()
    sent = old.envelopes()
    assert [e["seq"] for e in sent[:3]] == [0, 1, 2]
    assert [r["value"] for r in sent[0]["readings"]] == [21.5, False]
    with Outbox(state / "outbox.db") as outbox:
        assert all(entry.topic != OLD_TOPIC for entry in outbox.peek_oldest(1000))

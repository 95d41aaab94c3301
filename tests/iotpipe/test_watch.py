"""The live traffic view: per-device rows, status, and rejections counted by reason."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from iotpipe.mqtt import Message, MqttClient
from iotpipe.settings import MqttSettings
from iotpipe.watch import TrafficView, watch
from tests.conftest import BrokerInfo


def telemetry(site: str, device: str, seq: int, value: float) -> Message:
    body = {
        "v": "1.0",
        "id": f"{device}-{seq}",
        "site": site,
        "device": device,
        "seq": seq,
        "ts": 1795600000000 + seq,
        "readings": [{"sensor": "temperature", "value": value, "unit": "Cel"}],
    }
    return Message(f"iotpipe/v1/{site}/{device}/telemetry", json.dumps(body).encode())


def test_view_counts_devices_readings_and_rejections() -> None:
    """Valid messages update their device's row; invalid ones are counted by reason."""
    view = TrafficView()
    view.observe(telemetry("s1", "d1", 0, 20.5), now=1.0)
    view.observe(telemetry("s1", "d1", 1, 21.25), now=2.0)
    view.observe(Message("iotpipe/v1/s1/d2/telemetry", b"{not json"), now=2.0)
    spoofed = telemetry("s1", "other", 0, 1.0).payload
    view.observe(Message("iotpipe/v1/s1/d3/telemetry", spoofed), now=2.0)
    status = {"v": "1.0", "site": "s1", "device": "d1", "state": "online", "ts": 1, "agent": "x/1"}
    view.observe(Message("iotpipe/v1/s1/d1/status", json.dumps(status).encode()), now=3.0)

    row = view.devices[("s1", "d1")]
    assert (row.messages, row.readings, row.state) == (2, 2, "online")
    assert row.latest["temperature"] == "21.25 Cel"
    assert view.rejected == {"bad_json": 1, "topic_mismatch": 1}
    assert view.total == 5
    assert "rejected: bad_json=1, topic_mismatch=1" in view.summary(now=3.0)


@pytest.mark.mqtt
def test_watch_sees_live_traffic(amqtt_broker: BrokerInfo, unique: str) -> None:
    """watch() subscribed to a real broker accounts for a message published during the run."""
    settings = MqttSettings(url=amqtt_broker.url)
    publisher = MqttClient(settings, client_id=f"pub-{unique}")
    publisher.connect()
    # A retained message is delivered to watch() as soon as it subscribes.
    status = {"v": "1.0", "site": "s", "device": unique, "state": "online", "ts": 1, "agent": "t"}
    publisher.publish(f"iotpipe/v1/s/{unique}/status", json.dumps(status).encode(), retain=True)
    assert publisher.flush(timeout=10)
    view = watch(settings, ["iotpipe/#"], duration=1.0, console=Console(file=io.StringIO()))
    assert view.devices[("s", unique)].state == "online"
    publisher.disconnect()

"""MqttClient against real brokers: windowed publishing, delivery accounting, clear errors."""

from __future__ import annotations

import pytest

from iotpipe.errors import ConnectError
from iotpipe.mqtt import Message, MqttClient, pump_until
from iotpipe.settings import MqttSettings
from tests.conftest import BrokerInfo, free_port

pytestmark = pytest.mark.mqtt


def test_publish_window_delivers_every_message(mqtt_broker: BrokerInfo, unique: str) -> None:
    """More messages than the in-flight window all arrive, and every one is acknowledged."""
    got: list[Message] = []
    settings = MqttSettings(url=mqtt_broker.url)
    sub = MqttClient(settings, client_id=f"sub-{unique}", on_message=got.append)
    sub.connect()
    sub.subscribe([(f"t/{unique}/#", 1)])
    pub = MqttClient(settings, client_id=f"pub-{unique}", max_inflight=16)
    pub.connect()
    for i in range(500):
        pub.publish(f"t/{unique}/x", str(i).encode(), qos=1)
        assert pub.unacknowledged <= 16
        sub.pump()
    assert pub.flush(timeout=20)
    assert pump_until(sub, lambda: len(got) >= 500, timeout=20)
    assert pub.acknowledged == 500
    assert sorted(int(m.payload) for m in got) == list(range(500))
    pub.disconnect()
    sub.disconnect()


def test_unreachable_broker_is_a_clear_connect_error() -> None:
    """Connecting to a closed port raises ConnectError naming the URL and the reason."""
    port = free_port()
    client = MqttClient(MqttSettings(url=f"mqtt://127.0.0.1:{port}"))
    with pytest.raises(ConnectError, match=f"127.0.0.1:{port}.*refused"):
        client.connect(timeout=2)

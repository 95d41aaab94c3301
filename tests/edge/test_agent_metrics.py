"""The agent's /metrics and /healthz: names, types, help texts and labels as scrapers know them."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from edge.agent import Agent
from edge.systemd_notify import Notifier
from iotpipe.settings import MqttSettings
from tests.conftest import free_port
from tests.edge.conftest import make_settings

#: (name, type, help) of every family, in order: what dashboards and alerts are written against.
FAMILIES = [
    ("iotpipe_edge_readings", "counter", "readings taken"),
    ("iotpipe_edge_readings_invalid", "counter", "readings refused (contract)"),
    ("iotpipe_edge_sensor_errors", "counter", "failed sensor reads"),
    ("iotpipe_edge_envelopes_committed", "counter", "envelopes committed"),
    ("iotpipe_edge_envelopes_published", "counter", "envelopes acknowledged"),
    ("iotpipe_edge_outbox_dropped", "counter", "envelopes thinned (budget)"),
    ("iotpipe_edge_outbox_dropped_readings", "counter", "readings thinned (budget)"),
    ("iotpipe_edge_reconnects", "counter", "MQTT reconnections"),
    ("iotpipe_edge_outbox_envelopes", "gauge", "envelopes waiting (backlog)"),
    ("iotpipe_edge_outbox_bytes", "gauge", "accounted bytes in the outbox"),
    ("iotpipe_edge_outbox_max_bytes", "gauge", "outbox budget"),
    ("iotpipe_edge_outbox_file_bytes", "gauge", "outbox files on disk"),
    (
        "iotpipe_edge_outbox_full_in_seconds",
        "gauge",
        "time until the budget is full at the recent growth (+Inf: not growing)",
    ),
    ("iotpipe_edge_outbox_oldest_age_seconds", "gauge", "age of the oldest waiting reading"),
    ("iotpipe_edge_connected", "gauge", "1 while connected to the broker"),
    ("iotpipe_edge_clock_synced", "gauge", "1 while the clock is synchronised"),
    ("iotpipe_edge_next_seq", "gauge", "sequence number of the next envelope"),
]


def test_metrics_and_healthz_read_back_with_prometheus_clients_parser(tmp_path: Path) -> None:
    """A scrape parsed by prometheus_client gives every family, its samples and labels; /healthz its details."""
    settings = make_settings(tmp_path / "state", "metrics", http_port=free_port())
    agent = Agent(
        settings, MqttSettings(url="mqtt://127.0.0.1:1"), [], notifier=Notifier(environ={})
    )
    agent.stats.readings = 7
    agent.stats.reconnects = 2
    agent.stats.connected = True
    agent.stats.sensor_errors = {"bme280": 3, 'odd"name\\': 1}
    server = agent._start_http()
    base = f"http://127.0.0.1:{settings.http_port}"
    try:
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            content_type = response.headers["Content-Type"]
            text = response.read().decode()
        health_status, health = 200, {}
        try:
            urllib.request.urlopen(f"{base}/healthz", timeout=5).close()
        except urllib.error.HTTPError as err:  # not running: its loops have not started
            health_status, health = err.code, json.loads(err.read())
    finally:
        server.stop()
        agent.outbox.close()
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    parsed = list(text_string_to_metric_families(text))
    assert [(f.name, f.type, f.documentation) for f in parsed] == FAMILIES
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in parsed for s in f.samples
    }
    assert samples[("iotpipe_edge_readings_total", ())] == 7.0
    assert samples[("iotpipe_edge_reconnects_total", ())] == 2.0
    assert samples[("iotpipe_edge_sensor_errors_total", (("sensor", "bme280"),))] == 3.0
    assert samples[("iotpipe_edge_sensor_errors_total", (("sensor", 'odd"name\\'),))] == 1.0
    assert samples[("iotpipe_edge_connected", ())] == 1.0
    assert samples[("iotpipe_edge_outbox_full_in_seconds", ())] == math.inf
    assert samples[("iotpipe_edge_next_seq", ())] == agent.metric_families()[-1].samples[0][1]
    assert len(samples) == len(FAMILIES) + 1  # one sample each, two for the labelled family
    assert health_status == 503
    assert health["healthy"] is False
    assert health["connected"] is True
    assert health["backlog"] == 0

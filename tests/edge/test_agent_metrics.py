"""The agent's /metrics and /healthz: names, types, help texts and labels as scrapers know them."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from edge.agent import Agent
from iotpipe.settings import MqttSettings
from iotpipe.systemd_notify import Notifier
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
    (
        "iotpipe_edge_receipts_active",
        "gauge",
        "1 while envelopes are deleted on their receipt, not on PUBACK",
    ),
    (
        "iotpipe_edge_unconfirmed",
        "gauge",
        "envelopes acknowledged by the broker, not yet receipted",
    ),
    (
        "iotpipe_edge_unconfirmed_oldest_age_seconds",
        "gauge",
        "time since the oldest unconfirmed envelope was acknowledged",
    ),
    (
        "iotpipe_edge_receipt_latency_seconds",
        "gauge",
        "PUBACK to receipt over the last 256 receipted envelopes (NaN: none yet)",
    ),
    ("iotpipe_edge_receipts_received", "counter", "receipts taken in"),
    (
        "iotpipe_edge_envelopes_resent",
        "counter",
        "envelopes published again for want of a receipt",
    ),
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
    next_seq = next(f for f in agent.metric_families() if f.name == "iotpipe_edge_next_seq")
    assert samples[("iotpipe_edge_next_seq", ())] == next_seq.samples[0][1]
    assert samples[("iotpipe_edge_receipts_active", ())] == 0.0  # auto, not yet decided
    assert math.isnan(samples[("iotpipe_edge_receipt_latency_seconds", (("quantile", "0.99"),))])
    # one sample each, two for each labelled family
    assert len(samples) == len(FAMILIES) + 2
    assert health_status == 503
    assert health["healthy"] is False
    assert health["connected"] is True
    assert health["backlog"] == 0
    assert health["receipts"] == "undecided"
    assert health["unconfirmed"] == 0
    assert health["oldest_unconfirmed_age"] is None
    assert health["receipt_latency_p99"] is None

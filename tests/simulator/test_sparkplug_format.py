"""``iotpipe simulate --format sparkplug``: Sparkplug B edge nodes, read with iotpipe.sparkplug."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

import pytest
from pydantic import ValidationError

from bridge.sparkplug import SparkplugIngest
from iotpipe import sparkplug
from iotpipe.mqtt import Message, Will
from iotpipe.settings import MqttSettings
from iotpipe.sparkplug import MessageType, Payload
from iotpipe.testing import Capture
from simulator.link import MemoryLink, MqttLink
from simulator.run import Simulation
from simulator.settings import SimulateSettings
from tests.conftest import BrokerInfo
from tests.simulator.test_formats import (
    START,
    Sample,
    _FakeClock,
    assert_same,
    envelope_samples,
    run,
)


def decoded(message: Message) -> tuple[sparkplug.Topic, Payload]:
    """A message's Sparkplug topic and payload (failing the test when either is not one)."""
    topic = sparkplug.parse_topic(message.topic)
    payload = sparkplug.decode_payload(message.payload)
    assert topic is not None, message.topic
    assert isinstance(payload, Payload), payload
    return topic, payload


def node_messages(messages: list[Message]) -> dict[str, list[tuple[MessageType, Payload]]]:
    """Per edge node: (message type, payload) of each of its messages, in order."""
    out: dict[str, list[tuple[MessageType, Payload]]] = defaultdict(list)
    for m in messages:
        topic, payload = decoded(m)
        out[topic.edge_node_id].append((topic.message_type, payload))
    return out


def samples(messages: list[Message]) -> dict[str, list[tuple[int, Sample]]]:
    """Per node: (timestamp, readings by metric name) of every NDATA, aliases resolved by the
    last NBIRTH."""
    out: dict[str, list[tuple[int, Sample]]] = defaultdict(list)
    for node, items in node_messages(messages).items():
        names: dict[int, str] = {}
        for kind, payload in items:
            if kind is MessageType.NBIRTH:
                names = {m.alias: m.name for m in payload.metrics if m.alias and m.name}
            elif kind is MessageType.NDATA:
                assert payload.timestamp is not None
                values = {names[m.alias]: m.value for m in payload.metrics if m.alias}
                assert all(isinstance(v, float | bool) for v in values.values())
                out[node].append((payload.timestamp, values))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="module")
def envelopes() -> dict[str, list[tuple[int, Sample]]]:
    """The readings an envelope run with the tests' seed publishes."""
    return envelope_samples(run()[1])


def test_data_carries_the_envelope_runs_values(envelopes: Any) -> None:
    """Every NDATA decodes, by the birth's aliases, to what an envelope run of the seed sends."""
    got = samples(run(format="sparkplug")[1])
    assert set(got) == set(envelopes)
    for node, items in got.items():
        assert [ts for ts, _ in items] == [ts for ts, _ in envelopes[node]]
        for (_, sample), (_, want) in zip(items, envelopes[node], strict=True):
            assert set(sample) == set(want)
            assert_same(sample, want)


def test_births_declare_every_alias_the_data_uses() -> None:
    """The NBIRTH names bdSeq, the rebirth control and every sensor with alias, datatype and
    unit; NDATA carries aliases only."""
    _, messages, _ = run(format="sparkplug", sensors=["temperature", "door"], count=6)
    for items in node_messages(messages).values():
        kind, birth = items[0]
        assert kind is MessageType.NBIRTH
        assert birth.seq == 0
        by_name = {m.name: m for m in birth.metrics}
        assert by_name["bdSeq"].value == 0
        assert by_name["Node Control/Rebirth"].value is False
        assert by_name["temperature"].datatype == sparkplug.DataType.DOUBLE
        assert by_name["temperature"].properties == {"engUnit": "Cel"}
        assert by_name["door"].datatype == sparkplug.DataType.BOOLEAN
        declared = {m.alias for m in birth.metrics if m.alias is not None}
        assert declared == {1, 2}
        data = [p for k, p in items if k is MessageType.NDATA]
        assert len(data) == 3
        for payload in data:
            assert {m.alias for m in payload.metrics} == declared
            assert all(m.name is None for m in payload.metrics)


def test_seq_counts_every_message_of_a_node_and_wraps_at_255() -> None:
    """NBIRTH 0, then each NDATA one more, 255 followed by 0."""
    _, messages, _ = run(format="sparkplug", count=600)
    for items in node_messages(messages).values():
        seqs = [p.seq for k, p in items if k is not MessageType.NDEATH]
        assert len(seqs) == 301
        assert seqs == [i % 256 for i in range(301)]
        assert 255 in seqs


def test_the_will_is_the_births_death_certificate() -> None:
    """Each node's MQTT will is an NDEATH with its NBIRTH's bdSeq, QoS 1, not retained; an
    orderly end publishes it too."""
    _, messages, wills = run(format="sparkplug", count=4, status=False)
    assert len(wills) == 2
    for will in wills:
        assert isinstance(will, Will)
        topic, payload = decoded(Message(will.topic, will.payload, will.qos))
        assert topic.message_type is MessageType.NDEATH
        assert (will.qos, will.retain) == (1, False)
        assert [m.value for m in payload.metrics if m.name == "bdSeq"] == [0]
    deaths = [m for m in messages if "/NDEATH/" in m.topic]
    assert len(deaths) == 2
    assert [decoded(d)[1].metrics[0].value for d in deaths] == [0, 0]


def test_an_outage_is_a_new_session() -> None:
    """Offline: NDEATH of the session's bdSeq, then NBIRTH with bdSeq + 1 and seq 0, and the
    held data numbered after it."""
    summary, messages, _ = run(format="sparkplug", count=200, faults={"offline": 0.05})
    assert summary.faults["offline"] > 0
    for items in node_messages(messages).values():
        bdseq, expected_seq = 0, 0
        for kind, payload in items:
            if kind is MessageType.NDEATH:
                assert [m.value for m in payload.metrics] == [bdseq]
                bdseq += 1
            elif kind is MessageType.NBIRTH:
                assert payload.metrics[0].value == bdseq
                assert payload.seq == 0
                expected_seq = 1
            else:
                assert payload.seq == expected_seq
                expected_seq = (expected_seq + 1) % 256
        assert bdseq > 1  # an outage, and the final death


@pytest.mark.parametrize(
    "faults", [{}, {"duplicate": 0.1, "offline": 0.05}, {"reorder": 0.1}], ids=str
)
def test_the_bridge_maps_every_data_message(faults: dict[str, float]) -> None:
    """Through the bridge's SparkplugIngest: every NDATA maps, no data without a birth, no
    gap (a reordered message fills the place kept for it); duplicates map to the same id."""
    summary, messages, _ = run(format="sparkplug", count=600, faults=faults)
    ingest = SparkplugIngest("sim", {}, {})
    ids: list[str] = []
    for m in messages:
        outcome = ingest.handle(m.topic, m.payload, 0)
        assert outcome.error is None, outcome.error
        if "/NDATA/" in m.topic:  # (a birth's values map too, when it has values)
            ids.extend(e.id for e in outcome.mapped)
    assert len(ids) == sum("/NDATA/" in m.topic for m in messages) == summary.published
    assert len(set(ids)) == summary.messages == 600
    assert ingest.gaps == summary.faults.get("reorder", 0)
    assert ingest.late == ingest.gaps
    assert ingest.rebirths == 0


def test_malformed_messages_never_decode_and_use_up_their_seq() -> None:
    """A malformed message is no Sparkplug payload; the node still counted it."""
    summary, messages, _ = run(format="sparkplug", count=100, faults={"malformed": 0.2})
    broken = [
        m
        for m in messages
        if isinstance(sparkplug.decode_payload(m.payload), sparkplug.DecodeError)
    ]
    assert len(broken) == summary.rejected == summary.faults["malformed"] > 0
    ingest = SparkplugIngest("sim", {}, {})
    errors = Counter(
        o.error.what for m in messages if (o := ingest.handle(m.topic, m.payload, 0)).error
    )
    assert errors == {"sparkplug": len(broken)}
    assert ingest.gaps == len(broken)  # each counted missing, as a rejected envelope is


def test_skew_is_refused() -> None:
    """Faults that do not apply to Sparkplug are refused at start."""
    with pytest.raises(ValidationError, match="does not apply to format sparkplug"):
        SimulateSettings(format="sparkplug", faults={"skew": 0.1})


class _Commanding(MemoryLink):
    """A MemoryLink on which a host asks for a rebirth after the ``at``-th publish."""

    def __init__(self, will: Will | None, at: int) -> None:
        super().__init__(will)
        self.at = at

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        mid = super().publish(topic, payload, qos, retain)
        if self.published == self.at:
            node = sparkplug.parse_topic(topic)
            assert node is not None
            self.inject(*sparkplug.rebirth_request(node.group_id, node.edge_node_id, 1))
        return mid


def test_a_rebirth_request_is_answered_with_a_new_birth() -> None:
    """NCMD Node Control/Rebirth: a fresh NBIRTH, same bdSeq, later time, seq from 0; the
    bridge maps it as a new boot without a gap."""
    links: list[_Commanding] = []

    def factory(index: int, will: Will | None) -> MemoryLink:
        del index
        links.append(_Commanding(will, at=100))
        return links[-1]

    clock = _FakeClock()
    settings = SimulateSettings(
        format="sparkplug", seed=5, devices=1, count=300, start=START, rate="max"
    )
    Simulation(settings, factory, clock=clock, wall=lambda: 1.8e9, sleep=clock.sleep).run()
    (link,) = links
    assert link.subscriptions == ["spBv1.0/site-01/NCMD/dev-0001"]
    items = [decoded(m) for m in link.messages]
    births = [(i, p) for i, (t, p) in enumerate(items) if t.message_type is MessageType.NBIRTH]
    assert len(births) == 2
    (_, first), (at, again) = births
    assert 100 < at <= 100 + 64  # answered at the next look at the inbox
    assert again.seq == 0
    assert again.metrics[0].value == first.metrics[0].value == 0
    assert (again.timestamp or 0) > (first.timestamp or 0) > 0
    assert items[at + 1][1].seq == 1
    ingest = SparkplugIngest("sim", {}, {})
    mapped = 0
    for m in link.messages:
        outcome = ingest.handle(m.topic, m.payload, 0)
        assert outcome.error is None
        mapped += len(outcome.mapped) if "/NDATA/" in m.topic else 0
    assert (mapped, ingest.gaps) == (300, 0)


@pytest.mark.mqtt
@pytest.mark.mosquitto
def test_sparkplug_node_through_mosquitto(mosquitto_broker: BrokerInfo, unique: str) -> None:
    """A subscriber on a real Mosquitto sees the NBIRTH, then the NDATA, then the NDEATH."""
    site = f"s{unique}"
    capture = Capture(mosquitto_broker.url, f"spBv1.0/{site}/#", qos=1).start()
    try:
        settings = SimulateSettings(
            format="sparkplug", rate="max", seed=9, devices=1, count=50, site_pattern=site
        )
        mqtt = MqttSettings(url=mosquitto_broker.url)

        def connect(index: int, will: Will | None) -> MqttLink:
            return MqttLink(mqtt, client_id=f"sim-{unique}-{index}", will=will)

        summary = Simulation(settings, connect).run()
        got = capture.wait(summary.published + summary.status, timeout=30)
    finally:
        capture.stop()
    assert summary.ok
    kinds = [decoded(m)[0].message_type for m in got]
    assert kinds == [MessageType.NBIRTH] + [MessageType.NDATA] * 50 + [MessageType.NDEATH]
    assert [decoded(m)[1].seq for m in got[:-1]] == list(range(51))


def test_every_message_is_what_the_codec_encodes() -> None:
    """The hand-written NDATA bytes (and the births, deaths) are exactly what
    iotpipe.sparkplug.encode_payload makes of their decoded content."""
    _, messages, _ = run(format="sparkplug", count=600, faults={"offline": 0.02})
    assert any((decoded(m)[1].seq or 0) >= 128 for m in messages)  # two-byte seq varints
    for m in messages:
        _, payload = decoded(m)
        assert sparkplug.encode_payload(payload) == m.payload


def test_nodes_of_two_sites_may_share_a_name() -> None:
    """Sparkplug topics carry the group (the site): dev-0001 on two sites is two edge nodes."""
    _, messages, _ = run(format="sparkplug", sites=2, device_pattern="dev-{i}", count=8)
    groups = {(t.group_id, t.edge_node_id) for t, _ in map(decoded, messages)}
    assert groups == {(s, d) for s in ("site-01", "site-02") for d in ("dev-1", "dev-2")}

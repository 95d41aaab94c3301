"""Sparkplug B ingest: births and aliases, deaths and rebirths, seq wrap and gaps, identity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.mapping import FormatOutcome, Mapped, Reading
from bridge.sparkplug import REBIRTH_INTERVAL_MS, SparkplugIngest, _lean_data
from consumers.query import store_stats
from consumers.sqlite_store import SQLiteStore
from consumers.store import Message
from iotpipe.envelope import Envelope, decode_telemetry
from iotpipe.sparkplug import (
    REBIRTH_METRIC,
    DataType,
    MessageType,
    Metric,
    Payload,
    build_topic,
    decode_payload,
    encode_payload,
)
from iotpipe.wire import encode_envelope

T0 = 1_764_144_000_000  # 2025-11-26T08:00:00Z
GROUP, NODE = "plant", "gw1"


@dataclass
class EdgeNode:
    """A Sparkplug edge node as the specification says it behaves: one seq for all it sends."""

    bdseq: int = 0
    seq: int = 0
    group: str = GROUP
    node: str = NODE

    def message(
        self,
        kind: MessageType,
        metrics: Sequence[Metric],
        *,
        ts: int,
        device: str | None = None,
        seq: int | None = None,
    ) -> tuple[str, bytes]:
        """The topic and payload of the next message (``seq`` given: that one, not the next)."""
        if seq is None:
            seq, self.seq = self.seq, (self.seq + 1) % 256
        return (
            build_topic(self.group, kind, self.node, device),
            encode_payload(Payload(timestamp=ts, seq=seq, metrics=tuple(metrics))),
        )

    def nbirth(self, ts: int, *, seq: int = 0) -> tuple[str, bytes]:
        """An NBIRTH: bdSeq, the rebirth control, a property and two readings with aliases."""
        self.seq = seq
        return self.message(
            MessageType.NBIRTH,
            [
                Metric("bdSeq", timestamp=ts, datatype=DataType.INT64, value=self.bdseq),
                Metric(REBIRTH_METRIC, timestamp=ts, datatype=DataType.BOOLEAN, value=False),
                Metric("Properties/Hardware Make", 9, ts, DataType.STRING, "acme"),
                Metric("temperature", 1, ts, DataType.DOUBLE, 21.5),
                Metric("Motor/RPM", 2, ts, DataType.INT16, -40),
            ],
            ts=ts,
        )

    def ndata(self, ts: int, value: float, *, seq: int | None = None) -> tuple[str, bytes]:
        """An NDATA with the temperature by alias, sampled 500 ms before it is sent."""
        return self.message(
            MessageType.NDATA, [Metric(alias=1, timestamp=ts - 500, value=value)], ts=ts, seq=seq
        )


def mapped(outcome: FormatOutcome) -> Mapped:
    """The one envelope's worth an outcome must hold."""
    assert outcome.error is None, outcome.error
    assert len(outcome.mapped) == 1
    return outcome.mapped[0]


def ingest() -> SparkplugIngest:
    """The format as a rule would build it: units by sensor name, one static tag."""
    return SparkplugIngest("spb", {"temperature": "Cel", "Motor.RPM": "/min"}, {"line": "1"})


def test_nbirth_and_ndata_by_alias() -> None:
    """The birth's values are readings; NDATA by alias maps to the birth's names and units."""
    fmt, node = ingest(), EdgeNode()
    birth = mapped(fmt.handle(*node.nbirth(T0), T0 + 9))
    assert (birth.site, birth.device, birth.seq, birth.boot) == ("plant", "gw1", 0, f"bdseq-0-{T0}")
    assert birth.ts_ms == T0
    assert birth.tags == {"line": "1"}
    assert birth.readings == (
        Reading("temperature", 21.5, "Cel"),
        Reading("Motor.RPM", -40, "/min"),
    )
    data = mapped(fmt.handle(*node.ndata(T0 + 2000, 22.25), T0 + 2009))
    assert (data.seq, data.boot, data.ts_ms) == (1, f"bdseq-0-{T0}", T0 + 2000)
    assert data.readings == (Reading("temperature", 22.25, "Cel", T0 + 1500),)
    assert data.id.startswith("spb:")
    assert len(data.id) <= 64
    assert fmt.is_online(GROUP, NODE)


def test_dbirth_and_ddata_are_readings_of_the_edge_node() -> None:
    """Device metrics map to sensor <device>.<metric>, engUnit as the unit, in the node's seq."""
    fmt, node = ingest(), EdgeNode()
    fmt.handle(*node.nbirth(T0), T0)
    flow = Metric("Flow/Rate", 7, T0, DataType.FLOAT, 1.5, properties={"engUnit": "L/min"})
    dbirth = mapped(
        fmt.handle(*node.message(MessageType.DBIRTH, [flow], ts=T0, device="pump 1"), T0)
    )
    assert (dbirth.device, dbirth.seq) == ("gw1", 1)
    assert dbirth.readings == (Reading("pump_1.Flow.Rate", 1.5, "L/min"),)
    ddata = node.message(
        MessageType.DDATA,
        [Metric(alias=7, timestamp=T0 + 1000, value=2.0)],
        ts=T0 + 1000,
        device="pump 1",
    )
    out = mapped(fmt.handle(*ddata, T0 + 1000))
    assert (out.seq, out.readings) == (2, (Reading("pump_1.Flow.Rate", 2.0, "L/min"),))
    assert fmt.is_online(GROUP, NODE, "pump 1")
    death = node.message(MessageType.DDEATH, [], ts=T0 + 2000, device="pump 1")
    assert fmt.handle(*death, T0 + 2000) == FormatOutcome()
    assert not fmt.is_online(GROUP, NODE, "pump 1")
    assert mapped(fmt.handle(*node.ndata(T0 + 3000, 1.0), T0 + 3000)).seq == 3  # DDEATH: no gap


def test_data_before_birth_requests_a_rebirth_once_per_interval() -> None:
    """NDATA without a birth: no_birth error, one rebirth NCMD per interval; then birth + data map."""
    fmt, node = ingest(), EdgeNode()
    first = fmt.handle(*node.ndata(T0, 20.0, seq=17), T0)
    assert first.mapped == ()
    assert first.error is not None
    assert first.error.what == "no_birth"
    assert len(first.commands) == 1
    topic, payload = first.commands[0]
    assert topic == "spBv1.0/plant/NCMD/gw1"
    request = decode_payload(payload)
    assert isinstance(request, Payload)
    assert [(m.name, m.value) for m in request.metrics] == [(REBIRTH_METRIC, True)]
    again = fmt.handle(*node.ndata(T0 + 100, 20.0, seq=18), T0 + 100)
    assert again.error is not None
    assert again.error.what == "no_birth"
    assert again.commands == ()
    later = fmt.handle(
        *node.ndata(T0 + REBIRTH_INTERVAL_MS, 20.0, seq=19), T0 + REBIRTH_INTERVAL_MS
    )
    assert len(later.commands) == 1
    assert fmt.rebirths == 2
    mapped(fmt.handle(*node.nbirth(T0 + 6000), T0 + 6000))
    assert mapped(fmt.handle(*node.ndata(T0 + 7000, 20.5), T0 + 7000)).seq == 1


def test_unknown_alias_and_unknown_device_request_a_rebirth() -> None:
    """An alias no birth declared, or DDATA of a device without DBIRTH, is no_birth + rebirth."""
    fmt, node = ingest(), EdgeNode()
    fmt.handle(*node.nbirth(T0), T0)
    stray = node.message(MessageType.NDATA, [Metric(alias=99, value=1.0)], ts=T0 + 1)
    out = fmt.handle(*stray, T0 + 1)
    assert out.error is not None
    assert out.error.what == "no_birth"
    assert len(out.commands) == 1
    ddata = node.message(MessageType.DDATA, [Metric(alias=1, value=1.0)], ts=T0 + 2, device="x")
    out = fmt.handle(*ddata, T0 + REBIRTH_INTERVAL_MS + 2)
    assert out.error is not None
    assert out.error.what == "no_birth"
    assert len(out.commands) == 1


def test_ndeath_then_nbirth_with_new_bdseq_is_a_new_boot() -> None:
    """NDEATH of the current bdSeq marks the node offline; the next NBIRTH starts a new boot."""
    fmt, node = ingest(), EdgeNode()
    fmt.handle(*node.nbirth(T0), T0)
    fmt.handle(*node.ndata(T0 + 1000, 21.0), T0 + 1000)
    death = encode_payload(
        Payload(timestamp=T0 + 2000, metrics=(Metric("bdSeq", value=0, datatype=DataType.INT64),))
    )
    assert (
        fmt.handle(build_topic(GROUP, MessageType.NDEATH, NODE), death, T0 + 2000)
        == FormatOutcome()
    )
    assert not fmt.is_online(GROUP, NODE)
    orphan = fmt.handle(*node.ndata(T0 + 2500, 21.0), T0 + 2500)
    assert orphan.error is not None
    assert orphan.error.what == "no_birth"
    node.bdseq = 1
    reborn = mapped(fmt.handle(*node.nbirth(T0 + 3000), T0 + 3000))
    assert (reborn.boot, reborn.seq) == (f"bdseq-1-{T0 + 3000}", 0)
    assert fmt.is_online(GROUP, NODE)
    # The old connection's death arriving late names bdSeq 0: stale, ignored.
    fmt.handle(build_topic(GROUP, MessageType.NDEATH, NODE), death, T0 + 3100)
    assert fmt.is_online(GROUP, NODE)


def test_rebirth_with_the_same_bdseq_is_a_new_boot() -> None:
    """A rebirth (same bdSeq, seq back to 0) gets its own boot, so seq never restarts in one."""
    fmt, node = ingest(), EdgeNode()
    first = mapped(fmt.handle(*node.nbirth(T0), T0))
    fmt.handle(*node.ndata(T0 + 1000, 21.0), T0 + 1000)
    second = mapped(fmt.handle(*node.nbirth(T0 + 5000), T0 + 5000))
    assert second.boot != first.boot
    assert second.seq == 0
    assert second.id != first.id


def test_seq_wraps_at_255_without_a_gap() -> None:
    """seq 253 (birth), 254, 255, 0, 1 maps to our seq 0..4: strictly increasing, no gap."""
    fmt, node = ingest(), EdgeNode()
    seqs = [mapped(fmt.handle(*node.nbirth(T0, seq=253), T0)).seq]
    for i in range(4):
        seqs.append(mapped(fmt.handle(*node.ndata(T0 + i + 1, 20.0), T0 + i + 1)).seq)
    assert seqs == [0, 1, 2, 3, 4]
    assert fmt.gaps == 0


def test_seq_gap_is_counted_and_a_late_message_fills_it() -> None:
    """A lost seq leaves a hole in our seq; the message arriving late takes exactly that hole."""
    fmt, node = ingest(), EdgeNode()
    fmt.handle(*node.nbirth(T0), T0)
    assert mapped(fmt.handle(*node.ndata(T0 + 1, 1.0, seq=1), T0 + 1)).seq == 1
    assert mapped(fmt.handle(*node.ndata(T0 + 3, 3.0, seq=3), T0 + 3)).seq == 3
    assert fmt.gaps == 1
    assert mapped(fmt.handle(*node.ndata(T0 + 2, 2.0, seq=2), T0 + 4)).seq == 2
    assert fmt.late == 1
    assert mapped(fmt.handle(*node.ndata(T0 + 4, 4.0, seq=4), T0 + 5)).seq == 4


def test_redelivery_maps_to_the_same_id() -> None:
    """The same message twice (also a late copy, also the birth) gives the same id and seq."""
    fmt, node = ingest(), EdgeNode()
    birth = node.nbirth(T0)
    a = mapped(fmt.handle(*birth, T0))
    one = node.ndata(T0 + 1, 1.0)
    b = mapped(fmt.handle(*one, T0 + 1))
    assert mapped(fmt.handle(*one, T0 + 2)) == b
    two = node.ndata(T0 + 3, 2.0)
    c = mapped(fmt.handle(*two, T0 + 3))
    assert mapped(fmt.handle(*one, T0 + 4)) == b
    assert mapped(fmt.handle(*birth, T0 + 5)) == a
    assert len({a.id, b.id, c.id}) == 3
    assert mapped(fmt.handle(*node.ndata(T0 + 6, 3.0), T0 + 6)).seq == 3


def test_ids_are_the_same_in_a_second_bridge() -> None:
    """A replay of the same recording into a fresh format instance mints the same ids."""
    node = EdgeNode()
    messages = [node.nbirth(T0), *(node.ndata(T0 + i, float(i)) for i in range(1, 5))]
    runs = []
    for _ in range(2):
        fmt = ingest()
        runs.append([mapped(fmt.handle(t, p, T0 + 100)).id for t, p in messages])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 5


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 255),
    st.lists(
        st.sampled_from(["ok", "ok", "ok", "lost", "twice", "swap"]), min_size=1, max_size=400
    ),
)
def test_any_delivery_order_keeps_ids_and_counts_exactly_the_lost(
    start: int, fates: list[str]
) -> None:
    """Losses, duplicates and swaps: one id per message, distinct seqs, store gaps = messages lost."""
    node = EdgeNode()
    sent = [
        node.nbirth(T0, seq=start),
        *(node.ndata(T0 + i, float(i)) for i in range(1, len(fates) + 1)),
    ]
    order = [0]
    for index, fate in enumerate(fates, start=1):
        if fate == "twice":
            order += [index, index]
        elif fate == "swap" and len(order) > 1 and order[-1] != 0:
            order.insert(len(order) - 1, index)
        elif fate != "lost":
            order.append(index)
    fmt = ingest()
    ids: dict[int, str] = {}
    seqs: dict[int, int] = {}
    for index in order:
        m = mapped(fmt.handle(*sent[index], T0))
        assert ids.setdefault(index, m.id) == m.id
        assert seqs.setdefault(index, m.seq) == m.seq
    assert len(set(ids.values())) == len(ids)
    assert len(set(seqs.values())) == len(seqs)
    newest = max(seqs)
    lost_before_newest = sum(1 for i in range(newest) if i not in seqs)
    assert max(seqs.values()) - min(seqs.values()) + 1 - len(seqs) == lost_before_newest


def test_a_long_recording_replayed_into_the_same_bridge_keeps_its_ids() -> None:
    """300 messages (past the 8-bit seq's reach) replayed after themselves: the same ids again."""
    node = EdgeNode()
    messages = [node.nbirth(T0), *(node.ndata(T0 + i, float(i)) for i in range(1, 300))]
    fmt = ingest()
    runs = [[mapped(fmt.handle(t, p, T0)).id for t, p in messages] for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 300
    assert fmt.gaps == 0


def test_bad_input_gives_clean_errors() -> None:
    """Garbage, foreign topics, missing seq and unmappable names are MappingErrors; commands ignored."""
    fmt, node = ingest(), EdgeNode()

    def what(topic: str, payload: bytes) -> str | None:
        out = fmt.handle(topic, payload, T0)
        assert out.mapped == ()
        return None if out.error is None else out.error.what

    assert what("spBv1.0/plant/NDATA/gw1", b"\xff\xff\xff") == "sparkplug"
    assert what("iotpipe/v1/a/b/telemetry", b"{}") == "topic"
    assert what("spBv1.0/STATE/scada", b'{"online":true}') is None
    assert (
        what(*node.message(MessageType.NCMD, [Metric(REBIRTH_METRIC, value=True)], ts=T0)) is None
    )
    no_seq = encode_payload(Payload(timestamp=T0, metrics=(Metric("x", value=1.0),)))
    assert what("spBv1.0/plant/NBIRTH/gw1", no_seq) == "seq"
    fmt.handle(*node.nbirth(T0), T0)
    assert what("spBv1.0/plant/NDATA/gw1", no_seq) == "seq"
    long_name = node.message(MessageType.NDATA, [Metric("x" * 65, value=1.0)], ts=T0)
    assert what(*long_name) == "name"
    assert what(*node.message(MessageType.NDATA, [Metric("ok", value=1.0)], ts=10**16)) == "time"


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(list(MessageType)),
            st.sampled_from(["gw1", "gw\ud800", "g w"]),
            st.none() | st.sampled_from(["pump", "x" * 70]),
            st.binary(max_size=60)
            | st.builds(
                lambda seq, alias, value: encode_payload(
                    Payload(T0, seq, (Metric(alias=alias, value=value),))
                ),
                st.integers(0, 255),
                st.integers(0, 3),
                st.floats(allow_nan=True) | st.integers(0, 2**63) | st.text(max_size=3),
            ),
        ),
        max_size=20,
    )
)
def test_handle_never_raises(messages: list[tuple[MessageType, str, str | None, bytes]]) -> None:
    """Any mix of message types, topics and bytes gives an outcome, never an exception."""
    fmt = ingest()
    fmt.handle(*EdgeNode().nbirth(T0), T0)
    for kind, node, device, payload in messages:
        topic = f"spBv1.0/{GROUP}/{kind}/{node}" + ("" if device is None else f"/{device}")
        out = fmt.handle(topic, payload, T0)
        assert isinstance(out, FormatOutcome)
        assert out.error is None or not out.mapped


def test_values_out_of_the_contract_are_skipped() -> None:
    """Null, non-finite, over-long strings and UInt64 beyond 2**63-1 are skipped, not errors."""
    fmt, node = ingest(), EdgeNode()
    fmt.handle(*node.nbirth(T0), T0)
    metrics = [
        Metric("n", datatype=DataType.DOUBLE, is_null=True),
        Metric("inf", datatype=DataType.DOUBLE, value=float("inf")),
        Metric("s", datatype=DataType.STRING, value="x" * 257),
        Metric("big", datatype=DataType.UINT64, value=2**63),
        Metric("ok", datatype=DataType.UINT64, value=2**63 - 1),
    ]
    out = mapped(fmt.handle(*node.message(MessageType.NDATA, metrics, ts=T0 + 1), T0 + 1))
    assert out.readings == (Reading("ok", 2**63 - 1),)
    assert fmt.skipped == 4


def store_message(m: Mapped) -> Message:
    """What the consumer would store of a mapped envelope (through the contract's codec)."""
    body = encode_envelope(
        id=m.id,
        site=m.site,
        device=m.device,
        seq=m.seq,
        ts=m.ts_ms,
        boot=m.boot,
        readings=[(r.sensor, r.value, r.unit, r.ts_ms) for r in m.readings],
        tags=m.tags,
    )
    envelope = decode_telemetry(body)
    assert isinstance(envelope, Envelope), envelope
    return Message.from_envelope(envelope)


def test_store_counts_exactly_the_lost_message(tmp_path: Path) -> None:
    """A run with a wrap, a device, a death, a redelivery and one lost message: the store sees 1 gap."""
    fmt, node = ingest(), EdgeNode()
    sent = [node.nbirth(T0, seq=250)]
    temp = Metric("Temp", 3, T0, DataType.FLOAT, 7.5)
    sent.append(node.message(MessageType.DBIRTH, [temp], ts=T0, device="tank"))
    for i in range(1, 11):
        sent.append(node.ndata(T0 + i * 1000, 20.0 + i))
        ddata = [Metric(alias=3, timestamp=T0 + i * 1000, value=7.0)]
        sent.append(node.message(MessageType.DDATA, ddata, ts=T0 + i * 1000, device="tank"))
    sent.append(node.message(MessageType.DDEATH, [], ts=T0 + 20_000, device="tank"))
    sent.append(node.ndata(T0 + 21_000, 30.0))
    sent.pop(9)  # lost: DDATA seq 3, just after the wrap
    sent.insert(5, sent[4])  # a redelivery
    outcomes = [fmt.handle(t, p, T0 + 30_000) for t, p in sent]
    assert all(o.error is None for o in outcomes)
    envelopes = [m for o in outcomes for m in o.mapped]
    assert fmt.gaps == 1
    store = SQLiteStore(tmp_path / "store.db")
    store.write([store_message(m) for m in envelopes], [])
    store.close()
    stats = store_stats(tmp_path / "store.db")
    [device] = stats.devices
    assert (device.site, device.device, device.boots) == ("plant", "gw1", 1)
    assert device.gaps == 1
    assert device.duplicates == 1
    assert device.messages == len(sent) - 1 - 1  # less the redelivery and the DDEATH


def test_lean_data_decoding_maps_as_the_full_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Data whose every metric is (alias, timestamp, value) is decoded without Metric objects;
    any other shape (a name, a datatype, null, properties, no value) or bad bytes take the
    full decoder. Both make the same outcomes, for a stream of both kinds."""
    node = EdgeNode()
    lean = [
        node.ndata(T0 + 1000, 22.5),
        node.message(
            MessageType.NDATA,
            [Metric(alias=2, timestamp=T0, value=(1 << 32) - 40), Metric(alias=1, value=1.5)],
            ts=T0 + 1100,
        ),
        node.message(MessageType.NDATA, [Metric(alias=2, value=1 << 20)], ts=T0 + 1150),
        node.message(MessageType.DDATA, [Metric(alias=5, value=3.25)], ts=T0 + 1200, device="d1"),
        node.message(MessageType.DDATA, [Metric(alias=5, value=1.0)], ts=T0 + 1250, device="d9"),
        node.message(MessageType.NDATA, [Metric(alias=77, value=1.0)], ts=T0 + 1300),
        node.message(MessageType.NDATA, [Metric(alias=9, value="acme")], ts=T0 + 1350),
        node.message(MessageType.NDATA, [Metric(alias=1, value=2.0)], ts=T0 + 1400, seq=300),
    ]
    full = [
        node.message(MessageType.NDATA, [Metric("temperature", 1, T0, value=20.0)], ts=T0 + 2000),
        node.message(MessageType.NDATA, [Metric("Motor/RPM", value=7)], ts=T0 + 2100),
        node.message(
            MessageType.NDATA,
            [Metric(alias=1, value=1.0), Metric(alias=2, datatype=DataType.INT16, value=-36)],
            ts=T0 + 2200,
        ),
        node.message(
            MessageType.NDATA, [Metric(alias=1, value=1.0), Metric(alias=2, is_null=True)], ts=T0
        ),
        node.message(MessageType.NDATA, [Metric(alias=1, timestamp=T0)], ts=T0 + 2300),
        node.message(
            MessageType.DDATA,
            [Metric(alias=5, value=2.0, properties={"engUnit": "V"})],
            ts=T0 + 2400,
            device="d1",
        ),
        node.message(MessageType.NDATA, [Metric("new/metric", value=4.5)], ts=T0 + 2500),
        ("spBv1.0/plant/NDATA/gw1", b"\xff\xff\xff"),
    ]
    assert all(_lean_data(payload) is not None for _, payload in lean)
    assert all(_lean_data(payload) is None for _, payload in full)
    births = [
        EdgeNode().nbirth(T0),
        node.message(
            MessageType.DBIRTH,
            [Metric("x", 5, T0, DataType.FLOAT, 0.5)],
            ts=T0 + 10,
            device="d1",
            seq=1,
        ),
    ]
    stream = births + lean + full + lean
    fast = ingest()
    made = [fast.handle(topic, payload, T0 + 5000) for topic, payload in stream]
    monkeypatch.setattr("bridge.sparkplug._lean_data", lambda data: None)
    slow = ingest()
    expected = [slow.handle(topic, payload, T0 + 5000) for topic, payload in stream]
    assert made == expected
    assert sum(len(outcome.mapped) for outcome in made) >= 10
    assert {o.error.what for o in made if o.error is not None} >= {"no_birth", "seq"}

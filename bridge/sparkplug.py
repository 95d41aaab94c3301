"""Sparkplug B ingest: births, aliases, deaths and sequence numbers mapped to envelopes.

A Sparkplug edge node publishes an NBIRTH (every metric with its name, alias, datatype and
current value, plus its ``bdSeq``), then NDATA with only aliases; its devices a DBIRTH, then
DDATA. Every message of one edge node after its NBIRTH carries ``seq``, one counter for the
node *and all its devices*, +1 per message, 255 wrapping to 0. :class:`SparkplugIngest` keeps,
per edge node, what that takes to map a data message: the aliases of the births, the counter,
and whether the node and each device are online.

Mapping (``docs/ingest-sparkplug.md`` for users):

- ``site`` = group_id, ``device`` = edge_node_id, each with characters outside the contract's
  name rule replaced by ``_``. A device's metrics are readings of its edge node's envelope,
  sensor ``<device_id>.<metric>``: Sparkplug numbers the messages of a node and its devices in
  one sequence, so one iotpipe device per edge node is what lets the store count exactly the
  messages lost (a lost message cannot be attributed to one of its devices).
- sensor = metric name with ``/`` -> ``.`` and other characters outside the sensor rule -> ``_``;
  ``bdSeq``, ``Node Control/*``, ``Device Control/*`` and ``Properties/*`` are not readings.
- ``boot`` = ``bdseq-<bdSeq>-<NBIRTH timestamp>``: a new one for each NBIRTH, also one answering
  a rebirth request (same bdSeq, seq restarting at 0), so counters never restart within a boot.
- ``seq`` = the node's ``seq`` unwrapped across 255 -> 0 into a counter per boot, minus the
  messages that carry no readings (deaths, births of only control metrics), so the store's gaps
  are exactly the messages lost (or dead-lettered) between the edge node and the bridge.
- ``id`` = ``spb:`` + a hash of (group, node, device, boot, unwrapped seq): a redelivered
  message maps to the same id and is stored once.

Data before a birth (or with an alias no birth declared) is dead-lettered as ``no_birth`` and
answered with a rebirth request (NCMD ``Node Control/Rebirth``), at most once per
:data:`REBIRTH_INTERVAL_MS` per edge node.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bridge.mapping import FormatOutcome, Mapped, MappingError, Reading
from iotpipe.sparkplug import (
    BDSEQ_METRIC,
    DecodeError,
    MessageType,
    Metric,
    Payload,
    Topic,
    decode_payload,
    parse_payload_message,
    parse_topic,
    rebirth_request,
    typed_value,
)
from iotpipe.wire import MAX_READINGS, MAX_TS_MS, MAX_UNIT_LENGTH, MAX_VALUE_LENGTH, Value

__all__ = ["REBIRTH_INTERVAL_MS", "SEQ_WINDOW", "SparkplugIngest"]

REBIRTH_INTERVAL_MS = 5000
"""Least time between two rebirth requests to one edge node: one per burst of unmapped data."""
SEQ_WINDOW = 128
"""A ``seq`` up to this many behind the newest is a late (or repeated) message, not a new one."""
_NOT_READINGS = ("Node Control/", "Device Control/", "Properties/")
_MAX_NAME = 64
_NAME_BAD = re.compile(r"[^A-Za-z0-9_-]")
_SENSOR_BAD = re.compile(r"[^A-Za-z0-9_.-]")
# Rebirth timestamps of nodes without a birth: a flood of made-up node names must not grow
# memory without bound, so the table is cleared when it reaches this size.
_MAX_PENDING_REBIRTHS = 10_000
_NOTHING = FormatOutcome()


@dataclass(frozen=True, slots=True)
class _Alias:
    """What a birth declared for one metric, and what it maps to (worked out once, at birth).

    Attributes:
        name: the metric's name.
        datatype: its datatype.
        sensor: its sensor name, None when it makes no valid one (its values are ``name`` errors).
        unit: its unit.
        reading: whether its values are readings (not ``bdSeq``, ``Node Control/*``, ...).
    """

    name: str
    datatype: int | None
    sensor: str | None
    unit: str | None
    reading: bool


@dataclass(slots=True)
class _Device:
    """A Sparkplug device of an edge node, from its DBIRTH."""

    aliases: dict[int, _Alias] = field(default_factory=dict)
    names: dict[str, _Alias] = field(default_factory=dict)
    online: bool = True


@dataclass(slots=True)
class _Node:
    """One edge node's boot: from its NBIRTH to its NDEATH (or the next NBIRTH).

    ``seqs`` maps each recent unwrapped counter value to the envelope seq it was given (None
    for a message without readings); ``reserved`` maps counter values not received (yet) to
    the envelope seq kept free for them, so a late arrival fills its own gap.
    """

    bdseq: int | None
    boot: str
    site: str | None
    device: str | None
    last_raw: int
    last_count: int
    start: int
    aliases: dict[int, _Alias] = field(default_factory=dict)
    names: dict[str, _Alias] = field(default_factory=dict)
    devices: dict[str, _Device] = field(default_factory=dict)
    next_seq: int = 0
    seqs: dict[int, int | None] = field(default_factory=dict)
    reserved: dict[int, int] = field(default_factory=dict)
    online: bool = True


class SparkplugIngest:
    """Map Sparkplug B messages of one ingest rule to envelopes (a ``StatefulFormat``).

    Args:
        rule: the rule's name (for messages).
        units: sensor name -> unit code; looked up by the full sensor name, then by the metric
            part alone (so one entry covers a metric of every device); a birth's ``engUnit``
            property is the fallback.
        tags: static tags put on every envelope.

    Attributes:
        gaps: seq positions left free: messages lost before the bridge, or dead-lettered here
            after their node's birth (a late arrival fills its position, the count stays).
        late: messages that arrived after a later one of the same edge node.
        rebirths: rebirth requests sent.
        skipped: metrics not mapped (unsupported type, null, a value out of the contract).
    """

    def __init__(self, rule: str, units: Mapping[str, str], tags: Mapping[str, str]) -> None:
        self.rule = rule
        self._units = dict(units)
        self._tags = dict(tags)
        self._nodes: dict[tuple[str, str], _Node] = {}
        self._rebirth_ms: dict[tuple[str, str], int] = {}
        self.gaps = 0
        self.late = 0
        self.rebirths = 0
        self.skipped = 0

    # -- the StatefulFormat entry point ---------------------------------------------------------

    def handle(self, topic: str, payload: bytes, received_ms: int) -> FormatOutcome:  # noqa: PLR0911 - one case per message type
        """Map one message received at ``received_ms`` (epoch ms); never raises for bad input."""
        parsed = parse_topic(topic)
        if parsed is None:
            return _error("topic", f"{topic!r} is not a Sparkplug B topic")
        kind = parsed.message_type
        if kind in (MessageType.STATE, MessageType.NCMD, MessageType.DCMD):
            # A host's state and commands to edge nodes (our own rebirth requests among them).
            return _NOTHING
        if kind is MessageType.NDATA or kind is MessageType.DDATA:
            lean = _lean_data(payload)
            if lean is not None:
                return self._data_message(parsed, lean, received_ms)
        decoded = decode_payload(payload)
        if isinstance(decoded, DecodeError):
            return _error("sparkplug", decoded.message)
        key = (parsed.group_id, parsed.edge_node_id)
        if kind is MessageType.NBIRTH:
            return self._nbirth(parsed, key, decoded, received_ms)
        if kind is MessageType.NDEATH:
            return self._ndeath(key, decoded)
        node = self._nodes.get(key)
        if node is None or not node.online:
            return self._no_birth(parsed, received_ms, "no NBIRTH seen for this edge node")
        if decoded.seq is None or not 0 <= decoded.seq <= 255:
            return _error("seq", f"{kind} seq {decoded.seq!r} is not 0-255")
        if kind is MessageType.DBIRTH:
            assert parsed.device_id is not None
            device = _Device()
            self._learn(device, decoded, f"{parsed.device_id}/")
            node.devices[parsed.device_id] = device
            return self._data(parsed, node, decoded, received_ms, device)
        if kind is MessageType.DDEATH:
            assert parsed.device_id is not None
            device_state = node.devices.get(parsed.device_id)
            placed = self._place(node, decoded.seq, has_readings=False)
            if device_state is not None:
                device_state.online = False
            return FormatOutcome(error=placed) if isinstance(placed, MappingError) else _NOTHING
        return self._data_message(parsed, decoded, received_ms)

    def _data_message(
        self, parsed: Topic, decoded: Payload | _LeanPayload, received_ms: int
    ) -> FormatOutcome:
        """An NDATA or DDATA message (decoded either way): checked as :meth:`handle` does."""
        node = self._nodes.get((parsed.group_id, parsed.edge_node_id))
        if node is None or not node.online:
            return self._no_birth(parsed, received_ms, "no NBIRTH seen for this edge node")
        if decoded.seq is None or not 0 <= decoded.seq <= 255:
            return _error("seq", f"{parsed.message_type} seq {decoded.seq!r} is not 0-255")
        if parsed.message_type is MessageType.NDATA:
            return self._data(parsed, node, decoded, received_ms, node)
        assert parsed.device_id is not None
        device_state = node.devices.get(parsed.device_id)
        if device_state is None:
            return self._no_birth(parsed, received_ms, f"no DBIRTH seen for {parsed.device_id!r}")
        return self._data(parsed, node, decoded, received_ms, device_state)

    def is_online(self, group_id: str, edge_node_id: str, device_id: str | None = None) -> bool:
        """Tell whether an edge node (or one of its devices) is born and not dead."""
        node = self._nodes.get((group_id, edge_node_id))
        if node is None or not node.online:
            return False
        if device_id is None:
            return True
        device = node.devices.get(device_id)
        return device is not None and device.online

    # -- births and deaths ----------------------------------------------------------------------

    def _nbirth(
        self, topic: Topic, key: tuple[str, str], payload: Payload, received_ms: int
    ) -> FormatOutcome:
        if payload.seq is None or not 0 <= payload.seq <= 255:
            return _error("seq", f"NBIRTH seq {payload.seq!r} is not 0-255")
        bdseq = _bdseq(payload)
        boot = f"bdseq-{'none' if bdseq is None else bdseq}-{payload.timestamp or received_ms}"
        node = self._nodes.get(key)
        if node is None or node.boot != boot or not node.online:
            site, device = _name(topic.group_id), _name(topic.edge_node_id)
            node = _Node(bdseq, boot, site, device, payload.seq, payload.seq, payload.seq)
            self._learn(node, payload, "")
            self._nodes[key] = node
            self._rebirth_ms.pop(key, None)
        else:
            # This very birth again: a replay (Sparkplug sends births at QoS 0, so no broker
            # redelivers one). Rewind to it, so the messages after it map to the counts, and so
            # the ids, they had the first time; what was already mapped keeps its seq.
            node.last_raw = node.last_count = node.start
        return self._data(topic, node, payload, received_ms, node)

    def _ndeath(self, key: tuple[str, str], payload: Payload) -> FormatOutcome:
        node = self._nodes.get(key)
        bdseq = _bdseq(payload)
        if node is not None and (bdseq is None or node.bdseq is None or bdseq == node.bdseq):
            node.online = False
        # else: the death of an earlier connection, arriving after the new birth: stale.
        return _NOTHING

    def _no_birth(self, topic: Topic, received_ms: int, why: str) -> FormatOutcome:
        key = (topic.group_id, topic.edge_node_id)
        last = self._rebirth_ms.get(key)
        commands: tuple[tuple[str, bytes], ...] = ()
        if last is None or not 0 <= received_ms - last < REBIRTH_INTERVAL_MS:
            if len(self._rebirth_ms) >= _MAX_PENDING_REBIRTHS:
                self._rebirth_ms.clear()
            self._rebirth_ms[key] = received_ms
            commands = (rebirth_request(topic.group_id, topic.edge_node_id, received_ms),)
            self.rebirths += 1
        return FormatOutcome(
            error=MappingError("no_birth", f"{why}: rebirth requested"), commands=commands
        )

    def _learn(self, scope: _Node | _Device, birth: Payload, prefix: str) -> None:
        """Record each named metric of a birth under its alias and its name."""
        for metric in birth.metrics:
            if metric.name is not None:
                declared = self._declare(metric.name, metric, prefix)
                scope.names[metric.name] = declared
                if metric.alias is not None:
                    scope.aliases[metric.alias] = declared

    def _declare(self, name: str, metric: Metric, prefix: str) -> _Alias:
        """Work out a metric's sensor name and unit (the rule's ``units``, else its engUnit)."""
        sensor = _sensor(prefix + name)
        unit = self._units.get(sensor or "") or self._units.get(_sensor(name) or "")
        if unit is None:
            eng_unit = metric.properties.get("engUnit")
            if type(eng_unit) is str and 0 < len(eng_unit) <= MAX_UNIT_LENGTH:
                unit = eng_unit
        reading = name != BDSEQ_METRIC and not name.startswith(_NOT_READINGS)
        return _Alias(name, metric.datatype, sensor, unit, reading)

    # -- data -----------------------------------------------------------------------------------

    def _data(  # noqa: PLR0911 - one early exit per way a message can fail
        self,
        topic: Topic,
        node: _Node,
        payload: Payload | _LeanPayload,
        received_ms: int,
        scope: _Node | _Device,
    ) -> FormatOutcome:
        site, device = node.site, node.device
        if site is None or device is None:
            return _error(
                "name",
                f"group {topic.group_id!r} / node {topic.edge_node_id!r} make no valid names",
            )
        envelope_ms = payload.timestamp if payload.timestamp is not None else received_ms
        if not 0 <= envelope_ms <= MAX_TS_MS:
            return _error("time", f"payload timestamp {envelope_ms} is not epoch milliseconds")
        prefix = "" if topic.device_id is None else f"{topic.device_id}/"
        readings: list[Reading] = []
        for metric in payload.metrics:
            declared = self._declared(metric, scope, prefix)
            if declared is None:
                return self._no_birth(
                    topic, received_ms, f"alias {metric.alias!r} not in the birth"
                )
            reading = self._reading(declared, metric, envelope_ms)
            if isinstance(reading, MappingError):
                return FormatOutcome(error=reading)
            if reading is not None:
                readings.append(reading)
        if len(readings) > MAX_READINGS:
            return _error("readings", f"{len(readings)} metrics, the limit is {MAX_READINGS}")
        assert payload.seq is not None
        placed = self._place(node, payload.seq, has_readings=bool(readings))
        if isinstance(placed, MappingError):
            return FormatOutcome(error=placed)
        count, seq = placed
        if seq is None:
            return _NOTHING
        identity = (
            f"{topic.group_id}\0{topic.edge_node_id}\0{topic.device_id or ''}\0{node.boot}\0{count}"
        )
        digest = hashlib.blake2b(
            identity.encode(errors="surrogatepass"), digest_size=16
        ).hexdigest()
        mapped = Mapped(
            site=site,
            device=device,
            ts_ms=envelope_ms,
            readings=tuple(readings),
            id=f"spb:{digest}",
            seq=seq,
            boot=node.boot,
            tags=self._tags,
        )
        return FormatOutcome(mapped=(mapped,))

    def _reading(
        self, declared: _Alias, metric: Metric | _LeanMetric, envelope_ms: int
    ) -> Reading | MappingError | None:
        """The reading of one metric; None for a metric that is not one (or is skipped)."""
        if not declared.reading:
            return None
        datatype = metric.datatype if metric.datatype is not None else declared.datatype
        value = typed_value(metric.value, datatype)
        if not _fits(value):
            self.skipped += 1
            return None
        assert value is not None
        if declared.sensor is None:
            return MappingError("name", f"metric {declared.name!r} makes no valid sensor name")
        ts_ms = metric.timestamp
        if ts_ms is not None and not 0 <= ts_ms <= MAX_TS_MS:
            return MappingError(
                "time", f"metric {declared.name!r} timestamp {ts_ms} is not epoch ms"
            )
        return Reading(
            declared.sensor, value, declared.unit, None if ts_ms == envelope_ms else ts_ms
        )

    def _declared(
        self, metric: Metric | _LeanMetric, scope: _Node | _Device, prefix: str
    ) -> _Alias | None:
        """What the birth said of ``metric`` (by alias, else by name); None when it said nothing."""
        if metric.alias is not None:
            return scope.aliases.get(metric.alias)
        if metric.name is None or not isinstance(metric, Metric):  # a lean one has an alias
            return None
        return scope.names.get(metric.name) or self._declare(metric.name, metric, prefix)

    def _place(
        self, node: _Node, raw: int, *, has_readings: bool
    ) -> tuple[int, int | None] | MappingError:
        """Unwrap ``raw`` into the node's counter; give the message its envelope seq.

        Returns ``(count, seq)``: seq None for a message without readings (it takes no seq, so
        the store sees no gap for it).
        """
        delta = (raw - node.last_raw) % 256
        if not node.seqs or delta == 0:
            count = node.last_count  # the birth itself, or the newest message again
        elif delta <= SEQ_WINDOW:
            count = node.last_count + delta
            for missing in range(node.last_count + 1, count):
                if missing not in node.seqs and missing not in node.reserved:
                    node.reserved[missing] = node.next_seq
                    node.next_seq += 1
                    self.gaps += 1
            node.last_raw, node.last_count = raw, count
        else:
            count = node.last_count - (256 - delta)
            if count < node.start:
                return MappingError("seq", f"seq {raw} is older than the edge node's birth")
        if count in node.seqs:
            return count, node.seqs[count]
        if count in node.reserved:
            self.late += 1
            # Only a message with readings fills its reserved place; a late one without stays a
            # gap (rare: a late death certificate).
            seq: int | None = node.reserved.pop(count) if has_readings else None
        elif has_readings:
            seq = node.next_seq
            node.next_seq += 1
        else:
            seq = None
        node.seqs[count] = seq
        _forget_old(node)
        return count, seq


def _forget_old(node: _Node) -> None:
    """Keep only the last 256 counter values: older ones can no longer be told apart."""
    if len(node.seqs) + len(node.reserved) <= 512:
        return
    oldest = node.last_count - 256
    node.seqs = {c: s for c, s in node.seqs.items() if c > oldest}
    node.reserved = {c: s for c, s in node.reserved.items() if c > oldest}


class _LeanMetric(NamedTuple):
    """A data message's metric of the usual shape: an alias, a value as carried, a timestamp."""

    alias: int
    timestamp: int | None
    value: Value
    name: None = None
    datatype: None = None


class _LeanPayload(NamedTuple):
    """An NDATA/DDATA payload whose every metric is a :class:`_LeanMetric`."""

    timestamp: int | None
    seq: int | None
    metrics: tuple[_LeanMetric, ...]


_ALIAS_FIELD, _TIMESTAMP_FIELD = 2, 3
_VALUE_FIELDS = range(10, 16)  # Metric's oneof value int_value ... string_value (not bytes)


def _lean_data(data: bytes) -> _LeanPayload | None:
    """A data payload decoded without building a ``Metric`` per metric (most of the decoding
    cost), or None when any metric is not of the usual shape (alias, timestamp, a scalar value
    and nothing else: a name, a datatype, null, properties, no value, a string that is not
    UTF-8, ...) or the bytes do not parse: those take the full decoder, which reads the same
    usual-shaped metrics as the same values (a value without a datatype is read as carried)."""
    try:
        message: Any = parse_payload_message(data)
    except Exception:  # hostile bytes may fail anywhere inside protobuf: the full path says why
        return None
    metrics = []
    for metric in message.metrics:
        alias = timestamp = value = None
        for descriptor, carried in metric.ListFields():
            number = descriptor.number
            if number == _ALIAS_FIELD:
                alias = carried
            elif number == _TIMESTAMP_FIELD:
                timestamp = carried
            elif number in _VALUE_FIELDS and type(carried) is not bytes:
                value = carried
            else:
                return None
        if alias is None or value is None:
            return None
        metrics.append(_LeanMetric(alias, timestamp, value))
    return _LeanPayload(
        message.timestamp if message.HasField("timestamp") else None,
        message.seq if message.HasField("seq") else None,
        tuple(metrics),
    )


def _bdseq(payload: Payload) -> int | None:
    for metric in payload.metrics:
        if metric.name == BDSEQ_METRIC and type(metric.value) is int:
            return metric.value
    return None


def _fits(value: Value | None) -> bool:
    """Whether ``value`` is a reading value of the contract (else the metric is skipped)."""
    if value is None:
        return False
    if type(value) is str:
        return len(value) <= MAX_VALUE_LENGTH
    if type(value) is int:
        return -(2**63) <= value < 2**63
    return type(value) is not float or math.isfinite(value)


def _name(text: str) -> str | None:
    """A site or device name from a Sparkplug id (characters outside the rule -> ``_``)."""
    name = _NAME_BAD.sub("_", text)
    return name if 0 < len(name) <= _MAX_NAME else None


def _sensor(text: str) -> str | None:
    """A sensor name from a metric name: ``/`` -> ``.``, other characters outside -> ``_``."""
    sensor = _SENSOR_BAD.sub("_", text.replace("/", "."))
    return sensor if 0 < len(sensor) <= _MAX_NAME else None


def _error(what: str, message: str) -> FormatOutcome:
    return FormatOutcome(error=MappingError(what, message))

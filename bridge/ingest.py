"""Ingest rules: foreign MQTT payloads (Tasmota, ESPHome, Zigbee2MQTT, Shelly, line protocol,
Sparkplug B, plain JSON) mapped to wire-contract envelopes. ``docs/ingest.md`` is the user's guide.

A rule (``[[bridge.ingest]]``, :class:`IngestRule`) names a topic filter whose levels may be
captures (``{site}``, ``{device}``, ``{sensor}``, ``{anything}``), templates for site and device,
a payload format and its options, units and static tags; a ``preset`` fills all of that for a
known firmware. Every rule is checked when the settings load: a rule that cannot work stops
the bridge with one line naming it.

:class:`Ingest` holds the compiled rules of one bridge run: :meth:`Ingest.map` finds the first
rule whose filter matches a topic and returns what its format made of the payload (Mapped
envelopes' worth of readings, or a MappingError); ``bridge.service.routed_mapped`` turns a
Mapped into the message the bridge publishes. Identity (the envelope id, its seq and boot) is decided here,
once for every format; ``docs/ingest.md`` says what it guarantees per format.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, ModelWrapValidatorHandler, ValidationError, model_validator

from bridge.formats import (
    FormatError,
    flatten_json,
    parse_json,
    parse_lines,
    plain_value,
    timestamp_ms,
)
from bridge.mapping import FormatOutcome, Mapped, MappingError, Reading, StatefulFormat
from iotpipe.errors import ConfigError
from iotpipe.mqtt import Message
from iotpipe.schema import NestedConfigError
from iotpipe.settings import Section
from iotpipe.topics import check_filter
from iotpipe.wire import (
    ID_PATTERN,
    MAX_INT,
    MAX_READINGS,
    MAX_TAGS,
    MAX_TS_MS,
    MAX_UNIT_LENGTH,
    MAX_VALUE_LENGTH,
    MIN_INT,
    Value,
    is_valid_name,
    reading_problem,
)

log = logging.getLogger(__name__)

__all__ = ["PRESETS", "RETAINED_COPY", "Ingest", "IngestRule", "check_rules"]

Format = Literal["json", "plain", "line", "envelope", "sparkplug"]
Preset = Literal["tasmota", "esphome", "zigbee2mqtt", "shelly"]
TimeFormat = Literal["rfc3339", "epoch_s", "epoch_ms", "local", "auto"]

_CAPTURE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]")
_NOT_SENSOR = re.compile(r"[^A-Za-z0-9_.-]")

# What each preset fills in; the user's keys win (units and tags are merged, the user's on top).
# Sources: each project's published documentation of its MQTT payloads (docs/ingest.md).
PRESETS: dict[str, dict[str, Any]] = {
    # Tasmota: tele/<topic>/SENSOR, {"Time":"2024-01-01T12:00:00","ENERGY":{...},"AM2301":{...}}
    # "Time" is the device's local time without an offset.
    "tasmota": {
        "filter": "tele/{device}/SENSOR",
        "format": "json",
        "time_field": "Time",
        "time_format": "local",
        "ignore": ["TempUnit", "PressureUnit", "SpeedUnit", "TotalStartTime", "Id"],
        "units": {
            "Temperature": "Cel",
            "DewPoint": "Cel",
            "Humidity": "%RH",
            "Pressure": "hPa",
            "Power": "W",
            "ApparentPower": "VA",
            "ReactivePower": "var",
            "Voltage": "V",
            "Current": "A",
            "Total": "kW.h",
            "Today": "kW.h",
            "Yesterday": "kW.h",
            "Illuminance": "lx",
            "CarbonDioxide": "ppm",
        },
    },
    # ESPHome: <node>/<component>/<object_id>/state with the plain state ("21.5", "ON").
    "esphome": {"filter": "{device}/+/{sensor}/state", "format": "plain", "sensor": "{sensor}"},
    # Zigbee2MQTT: zigbee2mqtt/<friendly_name>, flat JSON; last_seen only if configured.
    "zigbee2mqtt": {
        "filter": "zigbee2mqtt/{device}",
        "format": "json",
        "time_field": "last_seen",
        "time_format": "auto",
        "units": {
            "temperature": "Cel",
            "local_temperature": "Cel",
            "humidity": "%RH",
            "pressure": "hPa",
            "battery": "%",
            "voltage": "mV",
            "illuminance_lux": "lx",
            "co2": "ppm",
            "power": "W",
            "energy": "kW.h",
            "current": "A",
        },
    },
    # Shelly Gen2: <id>/events/rpc, {"src":..,"method":"NotifyStatus","params":{"ts":..,...}}
    "shelly": {
        "filter": "{device}/events/rpc",
        "format": "json",
        "root": "params",
        "time_field": "params.ts",
        "time_format": "epoch_s",
        "ignore": ["id", "minute_ts", "tF", "xF"],
        "units": {
            "apower": "W",
            "voltage": "V",
            "current": "A",
            "freq": "Hz",
            "total": "W.h",
            "tC": "Cel",
        },
    },
}


class IngestRule(Section):
    """One ``[[bridge.ingest]]`` table; docs/ingest.md describes every key."""

    name: str = Field(min_length=1, max_length=64, description="unique; named in dead letters")
    preset: Preset | None = Field(None, description="fills filter, format, options and units")
    filter: str = Field(description="MQTT filter; levels may be captures like {device}")
    site: str | None = Field(None, description="template of the site name")
    device: str | None = Field(None, description="template of the device name")
    format: Format = Field(description="json | plain | line | envelope | sparkplug")
    values: dict[str, str] | None = Field(None, description="json: key path -> sensor name")
    ignore: tuple[str, ...] = Field((), description="json: key paths (or last keys) left out")
    separator: str = Field(".", min_length=1, description="json: joins nested keys")
    root: str | None = Field(None, description="json: key path of the object holding values")
    time_field: str | None = Field(None, description="json: key path of the payload's time")
    time_format: TimeFormat = Field("rfc3339", description="json: how time_field is written")
    timezone: str = Field("UTC", description="json: the zone of time_format = 'local'")
    counter_field: str | None = Field(None, description="json: key path of a message counter")
    sensor: str | None = Field(None, description="plain: template of the sensor name")
    device_tag: str = Field("host", min_length=1, description="line: the tag naming the device")
    precision: Literal["ns", "us", "ms", "s"] = Field("ns", description="line: timestamp unit")
    units: dict[str, str] = Field(default_factory=dict, description="sensor -> UCUM unit code")
    tags: dict[str, str] = Field(default_factory=dict, description="static tags")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        """Fill the preset's keys, then site/device/sensor from same-named captures."""
        if not isinstance(data, dict):
            return data
        preset = PRESETS.get(str(data.get("preset")))
        if preset is not None:  # an unknown preset: the Literal names the allowed ones
            merged = {**preset, **data}
            for key in ("units", "tags"):
                mine = data.get(key, {})
                if isinstance(mine, dict):  # anything else: the field's own error
                    merged[key] = {**preset.get(key, {}), **mine}
            data = merged
        levels = str(data.get("filter", "")).split("/")
        for key in ("site", "device", "sensor"):
            if data.get(key) is None and f"{{{key}}}" in levels:
                data = {**data, key: f"{{{key}}}"}
        return data

    @model_validator(mode="wrap")
    @classmethod
    def _named(cls, data: Any, handler: ModelWrapValidatorHandler[IngestRule]) -> IngestRule:
        """Every error of a rule names the rule, not only its position in the list."""
        try:
            return handler(data)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            nested = first.get("ctx", {}).get("error")
            if isinstance(nested, NestedConfigError):
                raise nested from None
            name = data.get("name") if isinstance(data, dict) else None
            field = ".".join(str(part) for part in first["loc"]) or "rule"
            if first["type"] == "extra_forbidden":
                allowed = "unknown setting (check the spelling)"
            elif first["type"] == "missing":
                allowed = "required"
            else:
                allowed = str(first["msg"]).removeprefix("Value error, ")
            value = None if first["type"] == "missing" else first.get("input")
            raise NestedConfigError(
                ConfigError(field, value, f"rule {name!r}: {allowed}")
            ) from None

    @model_validator(mode="after")
    def _check(self) -> IngestRule:
        problem = _rule_problem(self)
        if problem is not None:
            field, value, allowed = problem
            raise NestedConfigError(ConfigError(field, value, f"rule {self.name!r}: {allowed}"))
        return self

    @property
    def captures(self) -> tuple[str, ...]:
        """The capture names of the filter, in level order."""
        return tuple(m.group(1) for m in map(_CAPTURE.fullmatch, self.filter.split("/")) if m)

    @property
    def subscription(self) -> str:
        """The filter as subscribed: every capture a ``+``."""
        return "/".join(
            "+" if _CAPTURE.fullmatch(level) else level for level in self.filter.split("/")
        )


def _rule_problem(rule: IngestRule) -> tuple[str, object, str] | None:  # noqa: PLR0911, PLR0912
    """``(field, value, what is allowed)`` of the first thing that cannot work, or None."""
    levels = rule.filter.split("/")
    for level in levels:
        if ("{" in level or "}" in level) and not _CAPTURE.fullmatch(level):
            return "filter", rule.filter, "a capture must be a whole level, like {device}"
    names = rule.captures
    if len(set(names)) != len(names):
        return "filter", rule.filter, "a capture name appears twice"
    try:
        check_filter(rule.subscription)
    except ValueError as err:
        return "filter", rule.filter, str(err)
    stateful = rule.format in {"envelope", "sparkplug"}
    templates: dict[str, str | None] = {"site": rule.site, "device": rule.device}
    if rule.format == "plain":
        templates["sensor"] = rule.sensor
    for field, template in templates.items():
        if template is None:
            if field == "device" and rule.format == "line":
                continue  # from the device tag
            if not stateful:
                return field, None, f"required with format {rule.format!r}"
            continue
        for used in _CAPTURE.findall(template):
            if used not in names:
                return field, template, f"{{{used}}} is not a capture of filter {rule.filter!r}"
        if not template:
            return field, template, "must not be empty"
    for sensor, unit in rule.units.items():
        if len(unit) > MAX_UNIT_LENGTH:
            return f"units.{sensor}", unit, f"a unit code has at most {MAX_UNIT_LENGTH} characters"
    if len(rule.tags) > MAX_TAGS:
        return "tags", len(rule.tags), f"at most {MAX_TAGS} tags"
    for key, value in rule.tags.items():
        if _NOT_NAME.search(key) or not key or len(value) > MAX_VALUE_LENGTH:
            return f"tags.{key}", value, "tag keys are names (A-Z a-z 0-9 _ -), values short text"
    if rule.time_format == "local":
        try:
            ZoneInfo(rule.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            return "timezone", rule.timezone, "an IANA zone name, like Europe/Berlin"
    return None


def check_rules(rules: Sequence[IngestRule]) -> None:
    """Refuse duplicate rule names.

    Raises:
        ConfigError: two rules share a name.
    """
    seen: set[str] = set()
    for index, rule in enumerate(rules):
        if rule.name in seen:
            raise ConfigError(f"bridge.ingest.{index}.name", rule.name, "rule names must be unique")
        seen.add(rule.name)


# -- matching and mapping ---------------------------------------------------------------------


def _render(template: str, captures: Mapping[str, str]) -> str:
    if template.startswith("{") and template.endswith("}") and template.count("{") == 1:
        found = captures.get(template[1:-1])  # the usual template, one whole capture
        if found is not None:
            return found
    return _CAPTURE.sub(lambda m: captures[m.group(1)], template)


# Site and device names repeat with every message of a device: each is made valid once.
@lru_cache(maxsize=4096)
def _name(value: str) -> str | None:
    """A site or device name made valid: invalid characters -> ``_``, at most 64; None if empty."""
    fixed = _NOT_NAME.sub("_", value)[:64]
    return fixed or None


def _sensor(value: str) -> str | None:
    fixed = _NOT_SENSOR.sub("_", value)[:64]
    return fixed or None


def _digest(*parts: bytes) -> str:
    """A short, stable id: 24 hex digits of BLAKE2b over the parts (length-prefixed).

    One update of the joined parts: the same digest as one update per prefix and part.
    """
    joined = b"".join([len(part).to_bytes(4, "big") + part for part in parts])
    return hashlib.blake2b(joined, digest_size=12).hexdigest()


_ID = re.compile(ID_PATTERN)
_LEAF_TYPES = frozenset({int, float, bool})
_PATHS_REMEMBERED = 4096  # per rule; beyond, new paths are worked out every time


def _path_matches(path: str, entry: str, separator: str) -> bool:
    return path == entry or path.endswith(separator + entry)


@dataclass(frozen=True, slots=True)
class _Group:
    """What a stateless format found for one device at one time (before identity)."""

    site: str
    device: str
    ts_ms: int | None  # None: the payload has no time (the receive time is used)
    readings: list[tuple[str, Value]]
    counter: int | None = None
    tags: Mapping[str, str] | None = None
    identity: bytes = b""  # the time or counter the id is derived from


class _Rule:
    """One compiled rule: its filter's levels, the format's function, its options."""

    def __init__(self, rule: IngestRule, stateful: StatefulFormat | None) -> None:
        self.settings = rule
        self.name = rule.name
        self.levels = rule.filter.split("/")
        self.stateful = stateful
        self._zone = ZoneInfo(rule.timezone) if rule.time_format == "local" else UTC
        self._times: dict[str, int] = {}  # time string -> epoch ms, see _time
        # Payloads of one rule repeat their shape: each key path / sensor is worked out once.
        self._json_paths: dict[str, str | None] = {}
        self.sensors: dict[str, tuple[str, str | None]] = {}  # by raw name, see sensor()
        # The static tags, shared (read-only) by the envelopes of a message without own tags.
        self.tags: Mapping[str, str] = MappingProxyType(dict(rule.tags))
        # envelope and sparkplug rules are mapped by Ingest itself.
        formats: dict[str, Callable[[str, bytes, dict[str, str]], list[_Group]]] = {
            "json": self._json,
            "plain": self._plain,
            "line": self._line,
        }
        self._map = formats.get(rule.format)

    def match(self, topic: str) -> dict[str, str] | None:
        """The captures if ``topic`` matches this rule's filter, else None."""
        parts = topic.split("/")
        captures: dict[str, str] = {}
        levels = self.levels
        for index, level in enumerate(levels):
            if level == "#":
                return captures if not (index == 0 and topic.startswith("$")) else None
            if index >= len(parts):
                return None
            part = parts[index]
            if level == "+" or (level.startswith("{") and level.endswith("}")):
                if index == 0 and part.startswith("$"):
                    return None
                if level != "+":
                    captures[level[1:-1]] = part
            elif level != part:
                return None
        return captures if len(parts) == len(levels) else None

    def unit(self, sensor: str) -> str | None:
        units = self.settings.units
        found = units.get(sensor)
        if found is None:
            tail = sensor.rsplit(self.settings.separator, 1)[-1]
            found = units.get(tail)
        return found

    def groups(self, topic: str, payload: bytes, captures: dict[str, str]) -> list[_Group]:
        """What a stateless format found in the payload, one group per device and time."""
        assert self._map is not None
        return self._map(topic, payload, captures)

    def _site_device(self, captures: Mapping[str, str]) -> tuple[str, str]:
        rule = self.settings
        assert rule.site is not None
        device = rule.device if rule.device is not None else ""
        return _render(rule.site, captures), _render(device, captures)

    # -- formats ----------------------------------------------------------------------------

    def _json(self, topic: str, payload: bytes, captures: dict[str, str]) -> list[_Group]:
        rule = self.settings
        doc = parse_json(payload)
        if not isinstance(doc, dict):
            raise FormatError("json", "payload is not a JSON object")
        sep = rule.separator
        leaves: dict[str, object] = {}
        flatten_json(doc, sep, leaves)
        ts_ms, identity = None, b""
        if rule.time_field is not None and rule.time_field in leaves:
            raw = leaves[rule.time_field]
            ts_ms = self._time(raw)
            identity = f"t{raw}".encode()
        counter = None
        if rule.counter_field is not None and rule.counter_field in leaves:
            raw = leaves[rule.counter_field]
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                raise FormatError("counter", f"{rule.counter_field} = {raw!r} is not a counter")
            counter = raw
            identity += f"c{raw}".encode()
        readings: list[tuple[str, Value]] = []
        if rule.values is not None:
            for path, sensor in rule.values.items():
                value = leaves.get(path)
                if isinstance(value, bool | int | float | str):
                    readings.append((sensor, value))
        else:
            paths = self._json_paths
            for path, value in leaves.items():
                if type(value) not in _LEAF_TYPES:
                    continue
                name = paths[path] if path in paths else self._json_sensor(path)
                if name is not None:
                    readings.append((name, value))  # type: ignore[arg-type]
        site, device = self._site_device(captures)
        return [_Group(site, device, ts_ms, readings, counter, None, identity)]

    def _json_sensor(self, path: str) -> str | None:
        """The sensor a JSON leaf path is read as (None: not a reading); remembered per path."""
        rule = self.settings
        sep = rule.separator
        prefix = f"{rule.root}{sep}" if rule.root else ""
        sensor: str | None = path[len(prefix) :]
        if (
            path in {rule.time_field, rule.counter_field}
            or not path.startswith(prefix)
            or any(_path_matches(path[len(prefix) :], entry, sep) for entry in rule.ignore)
        ):
            sensor = None
        if len(self._json_paths) < _PATHS_REMEMBERED:
            self._json_paths[path] = sensor
        return sensor

    def sensor(self, raw: str) -> tuple[str, str | None]:
        """A raw sensor name made valid, and its unit; remembered per name.

        Raises:
            FormatError: the name is empty.
        """
        known = self.sensors.get(raw)
        if known is not None:
            return known
        sensor = _sensor(raw)
        if sensor is None:
            raise FormatError("name", f"empty sensor name from {raw!r}")
        known = (sensor, self.unit(raw))
        if len(self.sensors) < _PATHS_REMEMBERED:
            self.sensors[raw] = known
        return known

    def _time(self, raw: object) -> int:
        if isinstance(raw, str):
            # A time string repeats for every message of its second (Tasmota's have no
            # fraction): parse each once. Deterministic for the rule (format, zone).
            known = self._times.get(raw)
            if known is None:
                if len(self._times) >= 4096:
                    self._times.clear()
                known = self._times[raw] = self._parse_time(raw)
            return known
        return self._parse_time(raw)

    def _parse_time(self, raw: object) -> int:
        rule = self.settings
        form = rule.time_format
        if form == "auto":
            form = "rfc3339" if isinstance(raw, str) else "epoch_ms"
            if isinstance(raw, int | float) and not isinstance(raw, bool) and raw < 1e11:
                form = "epoch_s"
        try:
            if form in {"epoch_s", "epoch_ms"}:
                if isinstance(raw, bool) or not isinstance(raw, int | float):
                    raise ValueError("not a number")
                ms = int(raw * 1000) if form == "epoch_s" else int(raw)
            else:
                if not isinstance(raw, str):
                    raise ValueError("not a string")
                moment = datetime.fromisoformat(raw)
                if moment.tzinfo is None:
                    if form != "local":
                        raise ValueError("no UTC offset (time_format = 'local' reads local time)")
                    moment = moment.replace(tzinfo=self._zone)
                ms = int(moment.timestamp() * 1000)
        except (ValueError, OverflowError) as err:
            raise FormatError("time", f"{rule.time_field} = {raw!r}: {err}") from None
        if not 0 <= ms <= MAX_TS_MS:
            raise FormatError("time", f"{rule.time_field} = {raw!r} is out of range")
        return ms

    def _plain(self, topic: str, payload: bytes, captures: dict[str, str]) -> list[_Group]:
        value = plain_value(payload)
        assert self.settings.sensor is not None
        sensor = _render(self.settings.sensor, captures)
        site, device = self._site_device(captures)
        return [_Group(site, device, None, [(sensor, value)])]

    def _line(self, topic: str, payload: bytes, captures: dict[str, str]) -> list[_Group]:
        rule = self.settings
        assert rule.site is not None
        site = _render(rule.site, captures)
        groups: dict[tuple[str, int | None], _Group] = {}
        for line in parse_lines(payload):
            tags = dict(line.tags)
            if rule.device is not None:
                device = _render(rule.device, captures)
                tags.pop(rule.device_tag, None)
            else:
                device_tag = tags.pop(rule.device_tag, None)
                if device_tag is None:
                    raise FormatError("device", f"line has no {rule.device_tag!r} tag")
                device = device_tag
            ts = None if line.timestamp is None else timestamp_ms(line.timestamp, rule.precision)
            key = (device, ts)
            group = groups.get(key)
            if group is None:
                identity = b"" if line.timestamp is None else f"t{line.timestamp}".encode()
                group = groups[key] = _Group(site, device, ts, [], None, tags, identity)
            elif isinstance(group.tags, dict):
                group.tags.update(tags)
            for field, value in line.fields.items():
                group.readings.append((f"{line.measurement}{rule.separator}{field}", value))
        return list(groups.values())


#: What :meth:`Ingest.map` returns for a retained copy it does not forward (compare with ``is``).
RETAINED_COPY = FormatOutcome()


class Ingest:
    """The compiled rules of one bridge run and the identity state they share.

    Args:
        rules: the ``[[bridge.ingest]]`` rules, in config order (first match wins).
        run: the boot label of this run's counters (default: the start time and the process id).
        recent: how many no-identity messages are remembered for a redelivery (MQTT DUP flag).
        stateful: builds a rule's stateful format (default: ``bridge.sparkplug.SparkplugIngest``,
            imported only when a sparkplug rule exists).

    Raises:
        ConfigError: duplicate rule names.
    """

    def __init__(
        self,
        rules: Sequence[IngestRule],
        *,
        run: str | None = None,
        recent: int = 10_000,
        stateful: Callable[[IngestRule], StatefulFormat] | None = None,
    ) -> None:
        check_rules(rules)
        build = stateful or _sparkplug
        self.rules = [_Rule(r, build(r) if r.format == "sparkplug" else None) for r in rules]
        self.run = run or f"r{int(time.time()):x}{os.getpid() & 0xFFFF:04x}"
        self._seq: dict[tuple[str, str], int] = {}
        # (rule, topic, bytes) -> the envelopes made, and whether the payload made their ids.
        self._recent: OrderedDict[tuple[str, str, bytes], tuple[tuple[Mapped, ...], bool]] = (
            OrderedDict()
        )
        self._recent_size = recent

    @property
    def subscriptions(self) -> list[str]:
        """The rules' filters as subscribed (captures as ``+``), without repeats."""
        return list(dict.fromkeys(rule.settings.subscription for rule in self.rules))

    def map(
        self,
        topic: str,
        payload: bytes,
        received_ms: int,
        *,
        dup: bool = False,
        retain: bool = False,
    ) -> tuple[str, FormatOutcome] | None:
        """The first matching rule's name and what it made of the message; None if none matches.

        ``dup`` and ``retain`` are the MQTT flags. A retained copy (sent by the broker when the
        bridge subscribes) of a payload with neither time nor counter is :data:`RETAINED_COPY`:
        a stale state, not a new reading, and without an id that would recognise it as the
        reading it once was.

        Never raises: a payload that does not fit is a MappingError, and so is a format's bug
        (``internal``, logged), so that one odd message cannot stop the bridge.
        """
        for rule in self.rules:
            captures = rule.match(topic)
            if captures is None:
                continue
            message = Message(topic, payload, retain=retain, dup=dup)
            try:
                return rule.name, self._apply(rule, captures, message, received_ms)
            except Exception as err:  # a bug must not stop the bridge
                log.exception("ingest rule %s failed on topic %s", rule.name, topic)
                error = MappingError("internal", f"mapping failed: {type(err).__name__}: {err}")
                return rule.name, FormatOutcome(error=error)
        return None

    def _apply(
        self, rule: _Rule, captures: dict[str, str], message: Message, received_ms: int
    ) -> FormatOutcome:
        topic, payload = message.topic, message.payload
        if rule.stateful is not None:
            outcome = rule.stateful.handle(topic, payload, received_ms)
            for made in outcome.mapped:
                problem = _mapped_problem(made)
                if problem is not None:
                    return FormatOutcome(error=problem, commands=outcome.commands)
            return outcome
        key = (rule.name, topic, payload)
        seen = self._recent.get(key)
        if seen is not None and (message.dup or seen[1]):
            # A redelivery (DUP) of a message mapped this run, or the same bytes again of a
            # payload whose time or counter makes its id (a device's resend): the envelopes
            # made the first time, same id and seq, so the store counts a duplicate, not a gap.
            return FormatOutcome(seen[0])
        mapped: tuple[Mapped, ...]
        try:
            if rule.settings.format == "envelope":
                mapped, identity = (self._map_envelope(rule, payload),), True
            else:
                groups = rule.groups(topic, payload, captures)
                identity = all(g.identity for g in groups)
                if message.retain and not any(g.identity for g in groups):
                    return RETAINED_COPY
                mapped = tuple(self._mapped(rule, topic, payload, g, received_ms) for g in groups)
        except FormatError as err:
            return FormatOutcome(error=MappingError(err.what, err.message))
        self._remember(key, mapped, identity)
        return FormatOutcome(mapped)

    def _remember(
        self, key: tuple[str, str, bytes], mapped: tuple[Mapped, ...], identity: bool
    ) -> None:
        recent = self._recent
        recent[key] = (mapped, identity)
        if len(recent) > self._recent_size:
            recent.popitem(last=False)

    def _mapped(
        self, rule: _Rule, topic: str, payload: bytes, group: _Group, received_ms: int
    ) -> Mapped:
        site, device = _name(group.site), _name(group.device)
        if site is None or device is None:
            raise FormatError("name", f"empty site or device name from topic {topic!r}")
        if not group.readings:
            raise FormatError("no_values", "no number or boolean value in the payload")
        if len(group.readings) > MAX_READINGS:
            raise FormatError("too_many", f"more than {MAX_READINGS} values")
        ts_ms = group.ts_ms if group.ts_ms is not None else received_ms
        readings = _readings(rule, group, ts_ms)
        tags = rule.tags
        if group.tags:
            tags = dict(tags)
            for key, value in group.tags.items():
                tag = _name(key)
                if tag is not None and tag not in tags:
                    tags[tag] = value[:MAX_VALUE_LENGTH]
        if len(tags) > MAX_TAGS:
            raise FormatError("tags", f"more than {MAX_TAGS} tags")
        if group.counter is not None:  # the device's own counter
            seq, boot = group.counter, None
        else:  # this run's counter of the device
            seq = self._seq.get((site, device), -1) + 1
            self._seq[(site, device)] = seq
            boot = self.run
        if group.identity:
            # The payload's own time or counter: the same message always gets the same id.
            id_ = _digest(
                rule.name.encode(), topic.encode(), payload, group.identity, device.encode()
            )
        else:
            # Neither: unique per message of this run (a redelivery within the run is
            # recognised by its DUP flag, see Ingest._apply; after a restart it is not).
            id_ = _digest(rule.name.encode(), self.run.encode(), f"{site}/{device}/{seq}".encode())
        return Mapped(site, device, ts_ms, readings, id_, seq, boot, tags)

    def _map_envelope(self, rule: _Rule, payload: bytes) -> Mapped:
        from iotpipe.envelope import Envelope, decode_telemetry

        decoded = decode_telemetry(payload)
        if not isinstance(decoded, Envelope):
            raise FormatError("envelope", str(decoded))
        readings = tuple(
            Reading(
                r.sensor,
                r.value,
                r.unit if r.unit is not None else rule.unit(r.sensor),
                None if r.ts is None else r.time_ms(decoded),
            )
            for r in decoded.readings
        )
        tags = {**rule.settings.tags, **(decoded.tags or {})}
        return Mapped(
            decoded.site,
            decoded.device,
            decoded.timestamp_ms,
            readings,
            decoded.id,
            decoded.seq,
            decoded.boot,
            tags,
        )


def _mapped_problem(mapped: Mapped) -> MappingError | None:
    """Why a stateful format's Mapped cannot go on the wire (a format's bug), or None.

    The contract's rules, with what repeats from message to message (names, sensor and unit
    pairs) checked once: every reading that is not plainly valid gets the full check and its
    one-line reason.
    """
    if not _ID.fullmatch(mapped.id):
        return MappingError("id", f"invalid envelope id {mapped.id!r}")
    if not _valid_names(mapped.site, mapped.device):
        return MappingError("name", f"invalid site/device {mapped.site!r}/{mapped.device!r}")
    if not 1 <= len(mapped.readings) <= MAX_READINGS or len(mapped.tags) > MAX_TAGS:
        return MappingError("value", f"{len(mapped.readings)} readings, {len(mapped.tags)} tags")
    checked = _CHECKED_READINGS
    for r in mapped.readings:
        ts_ms = r.ts_ms if r.ts_ms is not None else mapped.ts_ms
        value = r.value
        kind = type(value)
        if (
            (r.sensor, r.unit) in checked
            and type(ts_ms) is int
            and 0 <= ts_ms <= MAX_TS_MS
            and (
                (kind is float and math.isfinite(value))  # type: ignore[arg-type]
                or kind is bool
                or (kind is int and MIN_INT <= value <= MAX_INT)  # type: ignore[operator]
                or (kind is str and len(value) <= MAX_VALUE_LENGTH)  # type: ignore[arg-type]
            )
        ):
            continue
        problem = reading_problem(r.sensor, r.value, r.unit, ts_ms)
        if problem is not None:
            return MappingError("value", problem)
        if len(checked) < _PATHS_REMEMBERED:
            checked.add((r.sensor, r.unit))  # valid with a valid value: the pair is valid
    return None


#: (sensor, unit) pairs of readings found valid: the parts of the check that need no value.
_CHECKED_READINGS: set[tuple[str, str | None]] = set()


@lru_cache(maxsize=4096)
def _valid_names(site: str, device: str) -> bool:
    return is_valid_name(site) and is_valid_name(device)


def _readings(rule: _Rule, group: _Group, ts_ms: int) -> tuple[Reading, ...]:
    """The group's values as contract readings: names made valid, units added, checked."""
    if not 0 <= ts_ms <= MAX_TS_MS:
        raise FormatError("time", f"time {ts_ms} is out of range")
    readings = []
    known = rule.sensors  # the usual case inline: a method call per reading costs
    for raw_sensor, value in group.readings:
        sensor, unit = known.get(raw_sensor) or rule.sensor(raw_sensor)
        kind = type(value)
        # The contract's value rules, inline: this loop runs once per reading.
        if (
            (kind is float and not math.isfinite(value))  # type: ignore[arg-type]
            or (kind is int and not MIN_INT <= value <= MAX_INT)  # type: ignore[operator]
            or (kind is str and len(value) > MAX_VALUE_LENGTH)  # type: ignore[arg-type]
        ):
            problem = reading_problem(sensor, value, unit, ts_ms)
            raise FormatError("value", f"{raw_sensor}: {problem}")
        readings.append(_new_reading(Reading, (sensor, value, unit, None)))
    return tuple(readings)


#: Builds a Reading from its four fields without the named tuple's ``__new__`` frame.
_new_reading = tuple.__new__


def _sparkplug(rule: IngestRule) -> StatefulFormat:
    """``bridge.sparkplug.SparkplugIngest`` for a sparkplug rule, imported only then."""
    try:
        module = importlib.import_module("bridge.sparkplug")
    except ImportError as err:
        raise ConfigError(
            f"bridge.ingest.{rule.name}.format", "sparkplug", f"not available here: {err}"
        ) from None
    built: StatefulFormat = module.SparkplugIngest(rule.name, rule.units, rule.tags)
    return built

"""Foreign payload formats: what the devices people already own publish, for ``--format``.

Our own envelope (``--format envelope``, the default) is rendered by :class:`simulator.fleet.Device`
from its template; every other format lives here, in a small registry (:data:`FORMATS`), one
class per format written from that project's published documentation of its MQTT messages:

    tasmota      tele/<device>/SENSOR     {"Time":"2026-11-26T09:15:02","AM2301":{...},...}
                 tele/<device>/LWT        Online / Offline (retained)
    esphome      <node>/sensor/<name>/state, <node>/binary_sensor/<name>/state: one plain
                 value per sensor (21.34, ON/OFF); <node>/status online / offline (retained)
    zigbee2mqtt  zigbee2mqtt/<friendly_name>   {"battery":..,"contact":..,"last_seen":..,...}
                 zigbee2mqtt/<friendly_name>/availability {"state":"online"} (retained)
    shelly       <device>/events/rpc      Gen2 NotifyStatus: {"src":..,"params":{"ts":..,...}}
                 <device>/online          true / false (retained)
    line         telegraf/<device>/sensors  InfluxDB line protocol, as Telegraf's MQTT output
                 publishes one metric per message; no availability topic
    sparkplug    spBv1.0/<site>/NDATA/<device>  Sparkplug B protobuf, metrics by alias;
                 NBIRTH on connect, NDEATH as the will; answers NCMD rebirth requests

The values are the simulator's signals (the same seed gives the same values as an envelope run),
written with the simulator's decimals (hPa with two more, so Pa converts back exactly): more
digits than the firmwares' defaults, so tests can compare them with envelopes exactly.

A format is a class with two class attributes (``name``, and ``faults``: the fault kinds that
make sense for it) and a method :meth:`Format.emitter` that makes one device's
:class:`Emitter`, whose :meth:`~Emitter.telemetry` renders a sample as one payload or, when a
sample is several publishes (ESPHome), as ``(topic, payload)`` parts. It is instantiated once per
run with the seed, so a format whose devices share state (a Sparkplug B edge node's ``seq``
0..255 and ``bdSeq``, metric aliases) keeps that state on the instance; an emitter's
:meth:`~Emitter.connect` returns what a device publishes once connected (Sparkplug's NBIRTH and
DBIRTH), :meth:`~Emitter.will` its last will (NDEATH), :meth:`~Emitter.status` what it says
when it goes offline or comes back (a rebirth). Register a new class with :func:`register`.
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple, Protocol, TypeVar

from iotpipe import sparkplug
from iotpipe.signals import SensorName
from iotpipe.wire import State
from simulator.faults import Fault

#: One publish of a message made of several (topic, payload).
Part = tuple[str, bytes]
#: What an emitter renders for one sample: a payload for its :attr:`Emitter.topic`, or parts.
Rendered = bytes | tuple[Part, ...]


class Publication(NamedTuple):
    """A message outside the telemetry stream: availability, a birth, a death."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class DeviceSpec:
    """What a format needs to know of one simulated device.

    Attributes:
        site: the site's name (only line protocol carries it, as a tag).
        name: the device's name: its topic's device part, Tasmota topic, ESPHome node name,
            Zigbee2MQTT friendly name, Shelly id or Telegraf host.
        sensors: the device's sensors, in the order of the values it is given.
        decimals: digits after the point per numeric sensor.
        tags: static tags (line protocol writes them; the others have nowhere to put them).
        rng: the format's own random stream for what the signals do not give (Zigbee link
            quality, mains voltage, an energy counter's start), never the signals' stream.
        units: each sensor's UCUM unit (Sparkplug's births carry them as ``engUnit``).
    """

    site: str
    name: str
    sensors: tuple[SensorName, ...]
    decimals: Mapping[SensorName, int]
    tags: Mapping[str, str]
    rng: random.Random
    units: Mapping[SensorName, str] = field(default_factory=dict)


class Emitter(Protocol):
    """One device speaking a foreign format."""

    #: Where telemetry goes (multipart formats: the device's topic prefix, for messages).
    topic: str

    def telemetry(self, t_ms: int, skew_ms: int, values: Sequence[float | bool]) -> Rendered:
        """The message for one sample of every sensor, taken at ``t_ms``.

        ``skew_ms`` is the device clock's error: added to the time written, if any.
        """
        ...

    def connect(self, t_ms: int) -> list[Publication]:
        """What the device publishes once connected, whatever ``--status`` says (births)."""
        ...

    def status(self, state: State, t_ms: int) -> list[Publication]:
        """What the device publishes going ``online`` or ``offline`` (retained availability)."""
        ...

    def will(self, t_ms: int) -> Publication | None:
        """The device's last will, if its format has one."""
        ...

    def malform(self, payload: bytes, rng: random.Random) -> bytes:
        """``payload`` broken so that no reader of the format can parse it."""
        ...

    #: True when the format's messages are numbered per session at dispatch (Sparkplug B):
    #: the run then calls :meth:`stamp` on each message as it goes out, and treats an outage
    #: as a session ending (:meth:`disconnect`) and a new one starting (:meth:`connect`).
    sessions: ClassVar[bool]

    def stamp(self, payload: bytes, rejected: bool) -> bytes:
        """``payload`` as it is dispatched now (only called when :attr:`sessions`)."""
        ...

    def disconnect(self, t_ms: int) -> list[Publication]:
        """What is published for the device when it drops off the network (its will)."""
        ...

    def commands(self) -> list[str]:
        """The topic filters the device subscribes to for commands."""
        ...

    def command(self, topic: str, payload: bytes, t_ms: int) -> list[Publication]:
        """What the device publishes in answer to a command received on ``topic``."""
        ...


class Format(Protocol):
    """A registered format: makes each device's emitter (and may keep fleet-wide state).

    Instantiated once per run with the run's seed.
    """

    name: ClassVar[str]
    #: The fault kinds that make sense for this format; the others are refused at start.
    faults: ClassVar[frozenset[Fault]]

    def __init__(self, seed: int) -> None:
        """A format for one run with ``seed``."""

    def emitter(self, spec: DeviceSpec) -> Emitter:
        """One device's emitter."""
        ...


_F = TypeVar("_F", bound="type[Format]")

#: Every foreign format by name; ``envelope`` (ours) is not here: :class:`~simulator.fleet.Device`
#: renders it from its template.
FORMATS: dict[str, type[Format]] = {}

ENVELOPE = "envelope"


def register(cls: _F) -> _F:
    """Class decorator: add a format class (a :class:`Format`) to :data:`FORMATS` by ``name``."""
    FORMATS[cls.name] = cls
    return cls


def format_names() -> tuple[str, ...]:
    """Every value ``--format`` accepts, ``envelope`` first."""
    return (ENVELOPE, *FORMATS)


def format_faults(name: str) -> frozenset[Fault]:
    """The fault kinds format ``name`` supports (every kind for the envelope)."""
    if name == ENVELOPE:
        return frozenset(Fault)
    return FORMATS[name].faults


# -- rendering helpers ------------------------------------------------------------------------

_ON_OFF = (b"OFF", b"ON")
_JSON_BOOL = (b"false", b"true")
_QUOTED_ON_OFF = (b'"OFF"', b'"ON"')


def _number(value: float | bool, decimals: int) -> bytes:
    return b"%.*f" % (decimals, value)


def _object(members: Sequence[tuple[bytes, bytes]]) -> bytes:
    """A JSON object from pre-rendered ``(b'"key"', value)`` members."""
    return b"{" + b",".join(key + b":" + value for key, value in members) + b"}"


def _key(name: str) -> bytes:
    return b'"' + name.encode() + b'"'


def truncate_json(payload: bytes, rng: random.Random) -> bytes:
    """Cut a JSON object short: a proper prefix of an object never parses."""
    if len(payload) <= 1:
        return b"{"
    return payload[: rng.randrange(1, len(payload))]


class _Seconds:
    """``time.strftime`` of whole seconds, cached: consecutive messages share the second."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self._second = -1
        self._text = b""

    def __call__(self, t_ms: int) -> bytes:
        second = t_ms // 1000
        if second != self._second:
            self._second = second
            self._text = time.strftime(self.pattern, time.gmtime(second)).encode()
        return self._text


class _Energy:
    """A mains meter: voltage around 230 V, current from power, an energy counter.

    The counter integrates the power over simulated time from a random start, so it only ever
    rises; the voltage wanders by a few volts. Both draw from the format's own stream.
    """

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.total_wh = round(rng.uniform(0.0, 200_000.0), 3)
        self._last_ms: int | None = None

    def sample(self, t_ms: int, power_w: float) -> tuple[float, float]:
        """(voltage, current) at ``t_ms``; adds the energy used since the last sample."""
        if self._last_ms is not None and t_ms > self._last_ms:
            self.total_wh += power_w * (t_ms - self._last_ms) / 3_600_000.0
        self._last_ms = t_ms
        voltage = 230.0 + self.rng.uniform(-3.0, 3.0)
        return voltage, power_w / voltage


class _Sensors:
    """Where each sensor's value sits in the values a device is given."""

    def __init__(self, spec: DeviceSpec) -> None:
        self.index = {name: i for i, name in enumerate(spec.sensors)}
        self.decimals = spec.decimals

    def has(self, *names: SensorName) -> bool:
        """Whether the device has any of ``names``."""
        return any(name in self.index for name in names)

    def number(self, values: Sequence[float | bool], name: SensorName) -> bytes:
        """A numeric reading as the simulator writes it."""
        return _number(values[self.index[name]], self.decimals[name])

    def hectopascals(self, values: Sequence[float | bool]) -> bytes:
        """The pressure in hPa, with two more decimals than in Pa: it converts back exactly."""
        return _number(values[self.index["pressure"]] / 100.0, self.decimals["pressure"] + 2)


class _NoBirth:
    """The default for formats without births, sessions or commands (all but Sparkplug B)."""

    sessions: ClassVar[bool] = False

    def connect(self, t_ms: int) -> list[Publication]:
        """Nothing: availability is :meth:`status`'s job."""
        del t_ms
        return []

    def stamp(self, payload: bytes, rejected: bool) -> bytes:
        """``payload`` unchanged (never called: no sessions)."""
        del rejected
        return payload

    def disconnect(self, t_ms: int) -> list[Publication]:
        """Nothing: going offline is said by :meth:`status` (with ``--status``)."""
        del t_ms
        return []

    def commands(self) -> list[str]:
        """None: these devices take no commands."""
        return []

    def command(self, topic: str, payload: bytes, t_ms: int) -> list[Publication]:
        """Nothing (never called: no subscriptions)."""
        del topic, payload, t_ms
        return []


# -- Tasmota ----------------------------------------------------------------------------------


@register
class Tasmota:
    """Tasmota's teleperiod ``SENSOR`` message and its ``LWT``.

    ``Time`` is the device's local time without a zone; simulated devices run on UTC
    (``Timezone 0``), so it is UTC wall time at one-second resolution. Temperature and humidity
    come as an ``AM2301``, pressure (hPa) as a ``BMP280``, power as the ``ENERGY`` object of a
    metering plug (``Voltage`` around 230, ``Current``, a ``Total`` kWh counter), door and
    motion as ``Switch1`` and ``Switch2`` (``ON``: open, motion). Tasmota reports no battery.
    """

    name: ClassVar[str] = "tasmota"
    faults: ClassVar[frozenset[Fault]] = frozenset(
        {Fault.DUPLICATE, Fault.REORDER, Fault.MALFORMED, Fault.SKEW, Fault.OFFLINE}
    )

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def emitter(self, spec: DeviceSpec) -> Emitter:
        """One Tasmota device, ``spec.name`` as its MQTT topic."""
        return TasmotaDevice(spec)


class TasmotaDevice(_NoBirth):
    """One Tasmota device (see :class:`Tasmota`)."""

    def __init__(self, spec: DeviceSpec) -> None:
        self.topic = f"tele/{spec.name}/SENSOR"
        self.lwt = f"tele/{spec.name}/LWT"
        self.sensors = _Sensors(spec)
        self.energy = _Energy(spec.rng) if self.sensors.has("power") else None
        self._time = _Seconds("%Y-%m-%dT%H:%M:%S")
        self._start = b""  # TotalStartTime: when the counter started, the first report here

    def telemetry(self, t_ms: int, skew_ms: int, values: Sequence[float | bool]) -> Rendered:
        """``{"Time":...,"Switch1":...,"AM2301":{...},"BMP280":{...},"ENERGY":{...},...}``."""
        s = self.sensors
        members = [(b'"Time"', b'"' + self._time(t_ms + skew_ms) + b'"')]
        for switch, sensor in ((b'"Switch1"', "door"), (b'"Switch2"', "motion")):
            if sensor in s.index:
                members.append((switch, _QUOTED_ON_OFF[bool(values[s.index[sensor]])]))
        am2301 = [
            (key, s.number(values, name))
            for key, name in ((b'"Temperature"', "temperature"), (b'"Humidity"', "humidity"))
            if name in s.index
        ]
        if am2301:
            members.append((b'"AM2301"', _object(am2301)))
        if "pressure" in s.index:
            members.append((b'"BMP280"', _object([(b'"Pressure"', s.hectopascals(values))])))
        if self.energy is not None:
            power = float(values[s.index["power"]])
            voltage, current = self.energy.sample(t_ms, power)
            if not self._start:
                self._start = members[0][1]
            members.append(
                (
                    b'"ENERGY"',
                    _object(
                        [
                            (b'"TotalStartTime"', self._start),
                            (b'"Total"', _number(self.energy.total_wh / 1000.0, 3)),
                            (b'"Power"', s.number(values, "power")),
                            (b'"Voltage"', b"%d" % round(voltage)),
                            (b'"Current"', _number(current, 3)),
                        ]
                    ),
                )
            )
        if am2301:
            members.append((b'"TempUnit"', b'"C"'))
        if "pressure" in s.index:
            members.append((b'"PressureUnit"', b'"hPa"'))
        return _object(members)

    def status(self, state: State, t_ms: int) -> list[Publication]:
        """The retained ``LWT``: ``Online`` or ``Offline``."""
        del t_ms
        return [Publication(self.lwt, b"Online" if state == "online" else b"Offline")]

    def will(self, t_ms: int) -> Publication | None:
        """``Offline`` on the ``LWT`` topic, as Tasmota's will."""
        return self.status("offline", t_ms)[0]

    def malform(self, payload: bytes, rng: random.Random) -> bytes:
        """The JSON cut short."""
        return truncate_json(payload, rng)


# -- ESPHome ----------------------------------------------------------------------------------

#: ESPHome's component for each of our sensors, and whether it is binary.
_ESPHOME_COMPONENTS: dict[SensorName, str] = {
    "temperature": "sensor",
    "humidity": "sensor",
    "pressure": "sensor",
    "power": "sensor",
    "battery": "sensor",
    "door": "binary_sensor",
    "motion": "binary_sensor",
}


@register
class ESPHome:
    """ESPHome's MQTT states: one plain-text message per sensor, and the node's status.

    Each sensor is its own entity, named after our sensor (object id ``temperature``, ...):
    ``<node>/sensor/temperature/state`` carries ``21.34`` (pressure in hPa), and
    ``<node>/binary_sensor/door/state`` carries ``ON`` or ``OFF``. The states carry no time and
    no counter. ESPHome retains its states by default; the simulator publishes them without
    the retain flag, so a run leaves no retained telemetry behind on the broker.
    """

    name: ClassVar[str] = "esphome"
    # A plain value has no syntax to break, and no time to skew.
    faults: ClassVar[frozenset[Fault]] = frozenset({Fault.DUPLICATE, Fault.REORDER, Fault.OFFLINE})

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def emitter(self, spec: DeviceSpec) -> Emitter:
        """One ESPHome node named ``spec.name`` (its default topic prefix)."""
        return ESPHomeDevice(spec)


class ESPHomeDevice(_NoBirth):
    """One ESPHome node (see :class:`ESPHome`)."""

    def __init__(self, spec: DeviceSpec) -> None:
        self.topic = spec.name
        self.status_topic = f"{spec.name}/status"
        self.sensors = _Sensors(spec)
        self.topics = [
            f"{spec.name}/{_ESPHOME_COMPONENTS[name]}/{name}/state" for name in spec.sensors
        ]

    def telemetry(self, t_ms: int, skew_ms: int, values: Sequence[float | bool]) -> Rendered:
        """One ``(topic, state)`` per sensor."""
        del t_ms, skew_ms
        s = self.sensors
        parts: list[Part] = []
        for (name, i), topic in zip(s.index.items(), self.topics, strict=True):
            if _ESPHOME_COMPONENTS[name] == "binary_sensor":
                parts.append((topic, _ON_OFF[bool(values[i])]))
            else:
                state = s.hectopascals(values) if name == "pressure" else s.number(values, name)
                parts.append((topic, state))
        return tuple(parts)

    def status(self, state: State, t_ms: int) -> list[Publication]:
        """The retained ``<node>/status``: ``online`` or ``offline``."""
        del t_ms
        return [Publication(self.status_topic, state.encode())]

    def will(self, t_ms: int) -> Publication | None:
        """``offline`` on the status topic, as ESPHome's will."""
        return self.status("offline", t_ms)[0]

    def malform(self, payload: bytes, rng: random.Random) -> bytes:
        """Never called: ``malformed`` is refused for ESPHome."""
        del rng
        return payload


# -- Zigbee2MQTT ------------------------------------------------------------------------------


@register
class Zigbee2MQTT:
    """Zigbee2MQTT's device state message and its availability.

    One JSON object per report on ``zigbee2mqtt/<friendly_name>``, keys in alphabetical order:
    ``battery`` (%), ``contact`` (``true`` when the door is *closed*, as Zigbee contact sensors
    report), ``humidity``, ``last_seen``, ``linkquality`` (0..255), ``occupancy`` (motion),
    ``power`` (W), ``pressure`` (hPa), ``temperature``. ``last_seen`` is always written, as
    Zigbee2MQTT does with ``advanced.last_seen: ISO_8601`` (the default is to leave it out):
    it is the report's time with milliseconds, which gives each report an identity.
    Availability is Zigbee2MQTT 2.x's retained ``{"state":"online"}``.
    """

    name: ClassVar[str] = "zigbee2mqtt"
    faults: ClassVar[frozenset[Fault]] = frozenset(
        {Fault.DUPLICATE, Fault.REORDER, Fault.MALFORMED, Fault.SKEW, Fault.OFFLINE}
    )

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def emitter(self, spec: DeviceSpec) -> Emitter:
        """One Zigbee device with ``spec.name`` as its friendly name."""
        return Zigbee2MQTTDevice(spec)


class Zigbee2MQTTDevice(_NoBirth):
    """One Zigbee device behind Zigbee2MQTT (see :class:`Zigbee2MQTT`)."""

    _MILLIS = tuple(b'%03dZ"' % ms for ms in range(1000))

    def __init__(self, spec: DeviceSpec) -> None:
        self.topic = f"zigbee2mqtt/{spec.name}"
        self.availability = f"zigbee2mqtt/{spec.name}/availability"
        self.sensors = _Sensors(spec)
        self.rng = spec.rng
        self.link_base = spec.rng.randint(40, 200)
        self._time = _Seconds('"%Y-%m-%dT%H:%M:%S.')

    def telemetry(self, t_ms: int, skew_ms: int, values: Sequence[float | bool]) -> Rendered:
        """``{"battery":..,"contact":..,"humidity":..,"last_seen":..,"linkquality":..,...}``."""
        s = self.sensors
        index = s.index
        written = t_ms + skew_ms
        last_seen = self._time(written) + self._MILLIS[written % 1000]
        link = min(255, max(0, self.link_base + self.rng.randint(-12, 12)))
        members: list[tuple[bytes, bytes]] = []
        if "battery" in index:
            members.append((b'"battery"', s.number(values, "battery")))
        if "door" in index:
            members.append((b'"contact"', _JSON_BOOL[not values[index["door"]]]))
        if "humidity" in index:
            members.append((b'"humidity"', s.number(values, "humidity")))
        members.append((b'"last_seen"', last_seen))
        members.append((b'"linkquality"', b"%d" % link))
        if "motion" in index:
            members.append((b'"occupancy"', _JSON_BOOL[bool(values[index["motion"]])]))
        if "power" in index:
            members.append((b'"power"', s.number(values, "power")))
        if "pressure" in index:
            members.append((b'"pressure"', s.hectopascals(values)))
        if "temperature" in index:
            members.append((b'"temperature"', s.number(values, "temperature")))
        return _object(members)

    def status(self, state: State, t_ms: int) -> list[Publication]:
        """The retained availability: ``{"state":"online"}`` or ``{"state":"offline"}``."""
        del t_ms
        return [Publication(self.availability, b'{"state":"%s"}' % state.encode())]

    def will(self, t_ms: int) -> Publication | None:
        """None: availability is Zigbee2MQTT's to publish, not a will of the device's."""
        del t_ms
        return None

    def malform(self, payload: bytes, rng: random.Random) -> bytes:
        """The JSON cut short."""
        return truncate_json(payload, rng)


# -- Shelly Gen2 ------------------------------------------------------------------------------


@register
class Shelly:
    """Shelly Gen2's RPC notifications (``NotifyStatus``) and its ``online`` topic.

    ``<device>/events/rpc`` carries ``{"src":"<device>","dst":"<device>/events",
    "method":"NotifyStatus","params":{"ts":<epoch s, 2 decimals>,...}}`` with one member per
    component: ``switch:0`` (``apower`` W, ``voltage``, ``current``, ``aenergy.total`` Wh) for
    power, ``temperature:0`` (``tC``, ``tF``), ``humidity:0`` (``rh``), ``devicepower:0``
    (``battery.percent``), ``input:0`` (door, ``state`` true when open) and ``input:1``
    (motion). Gen2 devices have no pressure sensor: pressure is left out. A real device sends
    only the components that changed; the simulator sends them all every time.
    """

    name: ClassVar[str] = "shelly"
    faults: ClassVar[frozenset[Fault]] = frozenset(
        {Fault.DUPLICATE, Fault.REORDER, Fault.MALFORMED, Fault.SKEW, Fault.OFFLINE}
    )

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def emitter(self, spec: DeviceSpec) -> Emitter:
        """One Shelly with ``spec.name`` as its id and topic prefix."""
        return ShellyDevice(spec)


class ShellyDevice(_NoBirth):
    """One Shelly Gen2 device (see :class:`Shelly`)."""

    def __init__(self, spec: DeviceSpec) -> None:
        self.topic = f"{spec.name}/events/rpc"
        self.online_topic = f"{spec.name}/online"
        self.sensors = _Sensors(spec)
        self.energy = _Energy(spec.rng) if self.sensors.has("power") else None
        name = _key(spec.name)[1:-1]
        self._head = b'{"src":"%s","dst":"%s/events","method":"NotifyStatus","params":' % (
            name,
            name,
        )

    def telemetry(self, t_ms: int, skew_ms: int, values: Sequence[float | bool]) -> Rendered:
        """The ``NotifyStatus`` notification for one sample."""
        s = self.sensors
        index = s.index
        members = [(b'"ts"', b"%.2f" % ((t_ms + skew_ms) / 1000.0))]
        if self.energy is not None:
            power = float(values[index["power"]])
            voltage, current = self.energy.sample(t_ms, power)
            members.append(
                (
                    b'"switch:0"',
                    _object(
                        [
                            (b'"id"', b"0"),
                            (b'"output"', b"true"),
                            (b'"apower"', s.number(values, "power")),
                            (b'"voltage"', _number(voltage, 1)),
                            (b'"current"', _number(current, 3)),
                            (
                                b'"aenergy"',
                                _object([(b'"total"', _number(self.energy.total_wh, 3))]),
                            ),
                        ]
                    ),
                )
            )
        if "temperature" in index:
            celsius = float(values[index["temperature"]])
            decimals = s.decimals["temperature"]
            members.append(
                (
                    b'"temperature:0"',
                    _object(
                        [
                            (b'"id"', b"0"),
                            (b'"tC"', _number(celsius, decimals)),
                            (b'"tF"', _number(celsius * 1.8 + 32.0, decimals)),
                        ]
                    ),
                )
            )
        if "humidity" in index:
            members.append(
                (
                    b'"humidity:0"',
                    _object([(b'"id"', b"0"), (b'"rh"', s.number(values, "humidity"))]),
                )
            )
        if "battery" in index:
            percent = float(values[index["battery"]])
            battery = _object(
                [
                    (b'"V"', _number(2.4 + 0.6 * percent / 100.0, 2)),
                    (b'"percent"', s.number(values, "battery")),
                ]
            )
            members.append(
                (
                    b'"devicepower:0"',
                    _object(
                        [
                            (b'"id"', b"0"),
                            (b'"battery"', battery),
                            (b'"external"', b'{"present":false}'),
                        ]
                    ),
                )
            )
        for number, sensor in ((0, "door"), (1, "motion")):
            if sensor in index:
                members.append(
                    (
                        b'"input:%d"' % number,
                        _object(
                            [
                                (b'"id"', b"%d" % number),
                                (b'"state"', _JSON_BOOL[bool(values[index[sensor]])]),
                            ]
                        ),
                    )
                )
        return self._head + _object(members) + b"}"

    def status(self, state: State, t_ms: int) -> list[Publication]:
        """The retained ``<device>/online``: ``true`` or ``false``."""
        del t_ms
        return [Publication(self.online_topic, b"true" if state == "online" else b"false")]

    def will(self, t_ms: int) -> Publication | None:
        """``false`` on the ``online`` topic, as Shelly's will."""
        return self.status("offline", t_ms)[0]

    def malform(self, payload: bytes, rng: random.Random) -> bytes:
        """The JSON cut short."""
        return truncate_json(payload, rng)


# -- InfluxDB line protocol (Telegraf's MQTT output) -----------------------------------------

_LINE_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ "})


def escape_tag(text: str) -> str:
    """A tag key or value as line protocol writes it (``,``, ``=`` and space escaped)."""
    return text.translate(_LINE_ESCAPES)


@register
class Line:
    """InfluxDB line protocol, one metric per message, as Telegraf's MQTT output publishes it.

    Telegraf's default topic layout is ``telegraf/<host>/<measurement>``; the simulated device
    is the host and the measurement is ``sensors``: ``telegraf/dev-0001/sensors`` carries
    ``sensors,host=dev-0001,site=site-01,source=simulator temperature=21.34,...,door=false
    1795680902125000000`` (tags sorted by key, fields in sensor order, our units, a
    nanosecond timestamp). Telegraf publishes no availability messages.
    """

    name: ClassVar[str] = "line"
    faults: ClassVar[frozenset[Fault]] = frozenset(
        {Fault.DUPLICATE, Fault.REORDER, Fault.MALFORMED, Fault.SKEW, Fault.OFFLINE}
    )
    measurement: ClassVar[str] = "sensors"

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def emitter(self, spec: DeviceSpec) -> Emitter:
        """One Telegraf agent on host ``spec.name``."""
        return LineDevice(spec, self.measurement)


class LineDevice(_NoBirth):
    """One host publishing through Telegraf (see :class:`Line`)."""

    def __init__(self, spec: DeviceSpec, measurement: str) -> None:
        self.topic = f"telegraf/{spec.name}/{measurement}"
        tags = {key: value for key, value in spec.tags.items() if key not in ("host", "site")}
        tags.update(host=spec.name, site=spec.site)
        series = ",".join(
            [measurement, *(f"{escape_tag(k)}={escape_tag(v)}" for k, v in sorted(tags.items()))]
        )
        self._series = series.encode() + b" "
        self.sensors = _Sensors(spec)
        self._binary = [_ESPHOME_COMPONENTS[name] == "binary_sensor" for name in spec.sensors]
        self._keys = [name.encode() + b"=" for name in spec.sensors]

    def telemetry(self, t_ms: int, skew_ms: int, values: Sequence[float | bool]) -> Rendered:
        """``sensors,host=..,site=.. temperature=21.34,...,door=false <ns>``."""
        decimals = self.sensors.decimals
        fields = [
            key + (_JSON_BOOL[bool(value)] if binary else _number(value, decimals[name]))
            for key, binary, value, name in zip(
                self._keys, self._binary, values, self.sensors.index, strict=True
            )
        ]
        return self._series + b",".join(fields) + b" %d" % ((t_ms + skew_ms) * 1_000_000)

    def status(self, state: State, t_ms: int) -> list[Publication]:
        """Nothing: Telegraf has no availability topic."""
        del state, t_ms
        return []

    def will(self, t_ms: int) -> Publication | None:
        """None: Telegraf sets no will."""
        del t_ms
        return None

    def malform(self, payload: bytes, rng: random.Random) -> bytes:
        """Cut within the measurement and tags: a line without fields never parses.

        (A cut further on could leave a valid line: fewer fields, or a shorter timestamp.)
        """
        space = payload.find(b" ")
        if space <= 1:
            return payload[:1]
        return payload[: rng.randrange(1, space)]


# -- Sparkplug B ------------------------------------------------------------------------------

_SEQ_FIELD = 0x18  # protobuf key of Payload.seq: field 3, varint


_DOUBLE = struct.Struct("<d")


def _varint(n: int) -> bytes:
    """A non-negative integer as a protobuf varint."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _seq_field(seq: int) -> bytes:
    """``Payload.seq`` encoded, to append to a payload encoded without it.

    Protobuf writes fields in number order and seq (3) is the last field a payload here
    carries, so appending it gives the very bytes :func:`iotpipe.sparkplug.encode_payload`
    would.
    """
    return bytes((_SEQ_FIELD, seq)) if seq < 0x80 else bytes((_SEQ_FIELD, seq & 0x7F | 0x80, 1))


@register
class Sparkplug:
    """Sparkplug B 3.0: each device is an edge node of its site's group.

    ``spBv1.0/<site>/NBIRTH/<device>`` on connect: ``bdSeq``, ``Node Control/Rebirth``
    (false) and one metric per sensor named after it, with an alias (1, 2, ... in sensor
    order), its datatype (Double, Boolean for door and motion), its value and an ``engUnit``
    property (the envelope's UCUM code); then ``spBv1.0/<site>/NDATA/<device>``: every metric
    by alias only. Each payload carries its time (epoch ms) and ``seq``, 0..255 wrapping, one
    counter per edge node: the NBIRTH has 0. The last will is the NDEATH with the birth's
    ``bdSeq``; the node answers a rebirth request (NCMD ``Node Control/Rebirth`` = true) with a
    fresh NBIRTH (same bdSeq, seq from 0 again).

    ``seq`` is a session's count of messages *sent*, so it is written when a message is
    dispatched (:meth:`SparkplugNode.stamp`), not when it is rendered: a message held through
    an outage goes out after the new session's NBIRTH with that session's numbers, as an edge
    node's store-and-forward does. An outage is a session: NDEATH when the node drops off,
    then a new NBIRTH with ``bdSeq`` + 1 when it is back. The simulator never publishes
    DBIRTH/DDATA (no Sparkplug devices under the nodes).
    """

    name: ClassVar[str] = "sparkplug"
    #: Its topics carry the site (the group), so device names may repeat across sites.
    topics_name_site: ClassVar[bool] = True
    # No skew: the birth's and data's times come from one clock, ours.
    faults: ClassVar[frozenset[Fault]] = frozenset(
        {Fault.DUPLICATE, Fault.REORDER, Fault.MALFORMED, Fault.OFFLINE}
    )

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def emitter(self, spec: DeviceSpec) -> Emitter:
        """One edge node: group ``spec.site``, edge node id ``spec.name``."""
        return SparkplugNode(spec)


class SparkplugNode:
    """One Sparkplug B edge node (see :class:`Sparkplug`).

    Attributes:
        bdseq: the current session's birth/death sequence number.
        seq: the next message's ``seq``.
    """

    #: Its ``seq`` is per session and written at dispatch: the run calls :meth:`stamp`.
    sessions: ClassVar[bool] = True

    def __init__(self, spec: DeviceSpec) -> None:
        self.group = spec.site
        self.node = spec.name
        self.topic = sparkplug.build_topic(spec.site, sparkplug.MessageType.NDATA, spec.name)
        self.birth_topic = sparkplug.build_topic(spec.site, sparkplug.MessageType.NBIRTH, spec.name)
        self.death_topic = sparkplug.build_topic(spec.site, sparkplug.MessageType.NDEATH, spec.name)
        self.command_topic = sparkplug.build_topic(spec.site, sparkplug.MessageType.NCMD, spec.name)
        self.sensors = spec.sensors
        self.decimals = [spec.decimals.get(name, 0) for name in spec.sensors]
        self.binary = [_ESPHOME_COMPONENTS[name] == "binary_sensor" for name in spec.sensors]
        self.units = spec.units
        # Each NDATA metric up to its value: key and length, alias, datatype, value's key.
        self._heads = [
            bytes((0x12, 6 if binary else 13, 0x10, i + 1, 0x20))
            + bytes((sparkplug.DataType.BOOLEAN if binary else sparkplug.DataType.DOUBLE,))
            for i, binary in enumerate(self.binary)
        ]
        self.bdseq = 0
        self.seq = 0
        self.values: list[float | bool] | None = None  # the last sample, for the births
        self._birth_ms = -1

    # -- data ------------------------------------------------------------------------------

    def _value(self, i: int, value: float | bool) -> float | bool:
        # Rounded as the envelope writes it: the same seed gives the same values.
        if self.binary[i]:
            return bool(value)
        return float(b"%.*f" % (self.decimals[i], value))

    def telemetry(self, t_ms: int, skew_ms: int, values: Sequence[float | bool]) -> Rendered:
        """An NDATA without its ``seq`` (:meth:`stamp` adds it): every metric by alias.

        Written as bytes directly (the simulator's hot path; building protobuf messages is
        about four times slower): the very bytes :func:`iotpipe.sparkplug.encode_payload`
        makes of ``Metric(alias=.., datatype=.., value=..)`` each, which the tests check.
        """
        del skew_ms
        self.values = list(values)
        out = [b"\x08" + _varint(t_ms)]
        for i, value in enumerate(values):
            if self.binary[i]:
                out.append(self._heads[i] + (b"\x70\x01" if value else b"\x70\x00"))
            else:
                out.append(
                    self._heads[i]
                    + b"\x69"
                    + _DOUBLE.pack(float(b"%.*f" % (self.decimals[i], value)))
                )
        return b"".join(out)

    def stamp(self, payload: bytes, rejected: bool) -> bytes:
        """The payload as sent now: with the session's next ``seq`` (a malformed one only uses
        it up: the node counted the message it sent, whatever the wire made of it)."""
        seq = self.seq
        self.seq = (seq + 1) % 256
        return payload if rejected else payload + _seq_field(seq)

    # -- births, deaths, commands ----------------------------------------------------------

    def connect(self, t_ms: int) -> list[Publication]:
        """The NBIRTH of the current session: ``seq`` 0, every metric with name and alias."""
        # Each birth a later time than the last: the birth's time tells a rebirth from a
        # replay of the same birth (``docs/ingest-sparkplug.md``).
        t_ms = max(t_ms, self._birth_ms + 1)
        self._birth_ms = t_ms
        self.seq = 0
        metrics = [
            sparkplug.Metric(
                sparkplug.BDSEQ_METRIC, datatype=sparkplug.DataType.INT64, value=self.bdseq
            ),
            sparkplug.Metric(
                sparkplug.REBIRTH_METRIC, datatype=sparkplug.DataType.BOOLEAN, value=False
            ),
        ]
        for i, name in enumerate(self.sensors):
            unit = self.units.get(name)
            metrics.append(
                sparkplug.Metric(
                    name,
                    alias=i + 1,
                    datatype=sparkplug.DataType.BOOLEAN
                    if self.binary[i]
                    else sparkplug.DataType.DOUBLE,
                    # Before the first sample a birth has no values yet: null, as the spec allows.
                    value=None if self.values is None else self._value(i, self.values[i]),
                    is_null=self.values is None,
                    properties={} if unit is None else {"engUnit": unit},
                )
            )
        payload = sparkplug.encode_payload(
            sparkplug.Payload(timestamp=t_ms, metrics=tuple(metrics))
        )
        return [Publication(self.birth_topic, self.stamp(payload, False), qos=0, retain=False)]

    def _death(self, t_ms: int) -> Publication:
        metric = sparkplug.Metric(
            sparkplug.BDSEQ_METRIC, datatype=sparkplug.DataType.INT64, value=self.bdseq
        )
        payload = sparkplug.encode_payload(sparkplug.Payload(timestamp=t_ms, metrics=(metric,)))
        return Publication(self.death_topic, payload, qos=1, retain=False)

    def will(self, t_ms: int) -> Publication | None:
        """The NDEATH with the current ``bdSeq`` (no seq, as the specification says)."""
        return self._death(t_ms)

    def disconnect(self, t_ms: int) -> list[Publication]:
        """The NDEATH the broker publishes when the node drops off; the next session (its
        birth) has ``bdSeq`` + 1."""
        death = self._death(t_ms)
        self.bdseq = (self.bdseq + 1) % 256
        return [death]

    def status(self, state: State, t_ms: int) -> list[Publication]:
        """Nothing: Sparkplug's availability is its births and deaths."""
        del state, t_ms
        return []

    def commands(self) -> list[str]:
        """The topics the node subscribes to: its NCMD."""
        return [self.command_topic]

    def command(self, topic: str, payload: bytes, t_ms: int) -> list[Publication]:
        """Answer a command: a rebirth request (``Node Control/Rebirth`` = true) with a new
        NBIRTH (same bdSeq); anything else with nothing."""
        if topic != self.command_topic:
            return []
        decoded = sparkplug.decode_payload(payload)
        if isinstance(decoded, sparkplug.DecodeError):
            return []
        if any(m.name == sparkplug.REBIRTH_METRIC and m.value is True for m in decoded.metrics):
            return self.connect(t_ms)
        return []

    def malform(self, payload: bytes, rng: random.Random) -> bytes:
        """Bytes that are no protobuf: a first key of wire type 7 (none exists), then noise."""
        return b"\x0f" + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, len(payload))))

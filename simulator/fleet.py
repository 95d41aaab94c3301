"""The simulated fleet: named devices with their sensors, counters and payload templates.

Encoding is the simulator's hot path, so each device renders its envelope from a bytes ``%``
template built once at start-up by :func:`iotpipe.wire.envelope_template` (constant fields
pre-escaped, one ``%.Nf`` per numeric reading): one format call per message instead of building
and serialising a dict, about 0.6 us instead of 6 (``json.dumps``) or 1.1 (``orjson`` plus
building the dict). The output is ordinary compact JSON; the tests decode it with
``iotpipe.envelope``.

Every random choice comes from a per-device :class:`random.Random` seeded with
``"{seed}/{site}/{device}"``, so a device's ids and readings depend only on the seed and its
name, not on the size or order of the fleet.

With a foreign ``format`` (:mod:`simulator.formats`) a device samples the very same signals and
hands the values to its format's emitter instead of the envelope template, so a seed gives the
same readings in every format. What a format needs beyond the signals (a Zigbee link quality,
a mains voltage) comes from a second stream, ``"{seed}/{site}/{device}/{format}"``, leaving the
signals' stream untouched.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from iotpipe import __version__, signals
from iotpipe.errors import ConfigError
from iotpipe.mqtt import Will
from iotpipe.signals import Profiles, SensorName, build_signals
from iotpipe.wire import (
    NAME_RULE,
    Kind,
    State,
    encode_status,
    envelope_template,
    is_valid_name,
    message_id,
    topic,
)
from simulator import faults
from simulator.formats import FORMATS, DeviceSpec, Emitter, Format, Publication, Rendered
from simulator.settings import SimulateSettings

if TYPE_CHECKING:
    from simulator.faults import Outage, Reorderer

AGENT = f"iotpipe-simulator/{__version__}"

#: A message on its way: (topic, payload, whether the bridge must reject it, its seq).
Outgoing = tuple[str, bytes, bool, int]


class Stamper:
    """Formats epoch milliseconds as the envelope's ``ts`` JSON value (quotes included), as bytes.

    ``rfc3339`` gives ``b'"2026-11-26T08:15:02.125Z"'``; ``epoch_ms`` gives ``b'1795680902125'``.
    The date-time part is cached per second: consecutive messages mostly share it.
    """

    _MILLIS = tuple(f'{ms:03d}Z"'.encode() for ms in range(1000))

    def __init__(self, ts_format: str = "rfc3339") -> None:
        self.rfc3339 = ts_format == "rfc3339"
        self._second = -1
        self._prefix = b""

    def __call__(self, t_ms: int) -> bytes:
        """The JSON text of ``ts`` for ``t_ms``."""
        if not self.rfc3339:
            return b"%d" % t_ms
        second = t_ms // 1000
        if second != self._second:
            self._second = second
            date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._prefix = f'"{date}.'.encode()
        return self._prefix + self._MILLIS[t_ms - second * 1000]


def _decimals(name: SensorName, profiles: Profiles) -> int:
    profile = getattr(profiles, name)
    return int(getattr(profile, "decimals", 0))


class Device:
    """One simulated device: its names, topics, counters, signals and payload template.

    Attributes:
        index: position in the fleet, 0-based.
        site: site name.
        name: device name.
        topic: telemetry topic (the format's, with a foreign format).
        status_topic: retained status topic of the envelope contract.
        emitter: the foreign format's voice of this device, None for envelopes.
        render: renders the next message, :meth:`message` or its foreign twin; the run calls
            this.
        boot: this run's boot id; part of every message id, so ids never repeat across boots.
        seq: the next message's sequence number.
        link: index of the connection that carries this device.
        last: the last payload actually sent (for the offline fault's resend).
        outage: set while the offline fault keeps the device off the network.
        reorder: created when the reorder fault first holds one of its messages back.
    """

    def __init__(
        self,
        index: int,
        site: str,
        name: str,
        *,
        seed: int,
        settings: SimulateSettings,
        stamper: Stamper,
        fmt: Format | None = None,
    ) -> None:
        self.index = index
        self.site = site
        self.name = name
        self.topic = topic(site, name, Kind.TELEMETRY)
        self.status_topic = topic(site, name, Kind.STATUS)
        self.rng = random.Random(f"{seed}/{site}/{name}")
        self.boot = f"{self.rng.getrandbits(64):016x}"
        self.seq = 0
        self.link = 0
        self.last: Outgoing | None = None
        self.outage: Outage[Outgoing] | None = None
        self.reorder: Reorderer[Outgoing] | None = None
        self.signals = build_signals(self.rng, settings.sensors, settings.profiles)
        self.samplers: list[Callable[[float], object]] = [
            s.json if isinstance(s, signals.Binary) else s for s in self.signals.values()
        ]
        self._stamp = stamper
        self.batch = settings.batch
        self.emitter: Emitter | None = None
        #: Writes a session's sequence number into a message as it is dispatched (Sparkplug
        #: B's ``seq``); None for formats whose messages are complete when rendered.
        self.sequencer: Callable[[bytes, bool], bytes] | None = None
        self.render: Callable[[int, int, Sequence[int]], Rendered] = self.message
        if fmt is None:
            self.template = self._template(settings)
            return
        self.template = b""
        self.emitter = fmt.emitter(
            DeviceSpec(
                site=site,
                name=name,
                sensors=tuple(self.signals),
                decimals={n: _decimals(n, settings.profiles) for n in self.signals},
                tags=settings.tags,
                rng=random.Random(f"{seed}/{site}/{name}/{fmt.name}"),
                units={n: signal.unit for n, signal in self.signals.items()},
            )
        )
        self.topic = self.emitter.topic
        if self.emitter.sessions:
            self.sequencer = self.emitter.stamp
        self._calls = list(self.signals.values())
        self.render = self.foreign_message

    def _template(self, settings: SimulateSettings) -> bytes:
        readings = [
            (
                name,
                "%s"
                if isinstance(signal, signals.Binary)
                else f"%.{_decimals(name, settings.profiles)}f",
                signal.unit,
            )
            for name, signal in self.signals.items()
        ]
        return envelope_template(
            site=self.site,
            device=self.name,
            boot=self.boot,
            readings=readings * self.batch,
            reading_ts=self.batch > 1,
            tags=settings.tags,
            # \u escapes, as the simulator has always written them: its bytes stay the same.
            ensure_ascii=True,
        )

    def message(self, t_ms: int, skew_ms: int = 0, step_ms: Sequence[int] = ()) -> bytes:
        """Render the next envelope and advance ``seq``.

        Args:
            t_ms: when the (last) sample is taken, epoch milliseconds of simulated time.
            skew_ms: the device clock's error: added to every written ``ts``, not to the
                time the signals are sampled at.
            step_ms: with ``batch`` > 1, how long before ``t_ms`` each sample is taken (one
                offset per sample, oldest first, the last one 0).

        Returns:
            The UTF-8 JSON payload.
        """
        seq = self.seq
        self.seq = seq + 1
        stamp = self._stamp
        if self.batch == 1:
            t = t_ms / 1000.0
            values = [sample(t) for sample in self.samplers]
            return self.template % (seq, seq, stamp(t_ms + skew_ms), *values)
        args: list[object] = [seq, seq, stamp(t_ms - step_ms[0] + skew_ms)]
        for back in step_ms:
            at = t_ms - back
            t = at / 1000.0
            ts = stamp(at + skew_ms)
            for sample in self.samplers:
                args.append(sample(t))
                args.append(ts)
        return self.template % tuple(args)

    def foreign_message(self, t_ms: int, skew_ms: int = 0, step_ms: Sequence[int] = ()) -> Rendered:
        """Render the next message in the device's foreign format and advance ``seq``.

        Takes the arguments of :meth:`message`; ``step_ms`` is unused (no batches).

        Returns:
            A payload for :attr:`topic`, or (multipart formats) ``(topic, payload)`` parts.
        """
        del step_ms
        assert self.emitter is not None
        self.seq += 1
        t = t_ms / 1000.0
        return self.emitter.telemetry(t_ms, skew_ms, [signal(t) for signal in self._calls])

    def message_id(self, seq: int) -> str:
        """The id of this device's message number ``seq``."""
        return message_id(self.boot, seq)

    def status(self, state: State, t_ms: int) -> bytes:
        """A retained status message (``online`` birth or ``offline`` will) at ``t_ms``."""
        return encode_status(
            site=self.site,
            device=self.name,
            state=state,
            ts=json.loads(self._stamp(t_ms)),
            agent=AGENT,
        )

    def statuses(self, state: State, t_ms: int) -> list[Publication]:
        """What the device publishes going ``state``: the envelope's retained status, or the
        format's own availability message (none for formats without one)."""
        if self.emitter is not None:
            return self.emitter.status(state, t_ms)
        return [Publication(self.status_topic, self.status(state, t_ms))]

    def will(self, t_ms: int) -> Will | None:
        """The last will of a connection that carries only this device, if it has one."""
        if self.emitter is not None:
            pub = self.emitter.will(t_ms)
            return None if pub is None else Will(*pub)
        return Will(self.status_topic, self.status("offline", t_ms), qos=1, retain=True)

    def births(self, t_ms: int) -> list[Publication]:
        """What the device publishes once connected, whatever ``status`` says (formats with
        births: Sparkplug B's NBIRTH)."""
        return [] if self.emitter is None else self.emitter.connect(t_ms)

    def deaths(self, t_ms: int) -> list[Publication]:
        """What is published for the device when it drops off the network, whatever
        ``status`` says (formats with sessions: Sparkplug B's NDEATH)."""
        return [] if self.emitter is None else self.emitter.disconnect(t_ms)

    @property
    def sessions(self) -> bool:
        """Whether the device's format numbers its messages per session (Sparkplug B)."""
        return self.sequencer is not None

    def malform(self, payload: bytes, rng: random.Random) -> bytes:
        """``payload`` cut short so that no reader of its format can parse it."""
        if self.emitter is not None:
            return self.emitter.malform(payload, rng)
        return faults.truncate(payload, rng)


def fleet_names(settings: SimulateSettings) -> list[tuple[str, str]]:
    """The (site, device) names of the whole fleet, site by site.

    Raises:
        ConfigError: a pattern is malformed or makes an invalid or repeated name.
    """
    sites = [
        _format("simulate.site_pattern", settings.site_pattern, n=s, i=s)
        for s in range(1, settings.sites + 1)
    ]
    if len(set(sites)) != len(sites):
        raise ConfigError(
            "simulate.site_pattern", settings.site_pattern, "gives the same name twice; use {n}"
        )
    names: list[tuple[str, str]] = []
    n = 0
    for site in sites:
        devices: set[str] = set()
        for i in range(1, settings.devices + 1):
            n += 1
            device = _format(
                "simulate.device_pattern", settings.device_pattern, n=n, i=i, site=site
            )
            if device in devices:
                raise ConfigError(
                    "simulate.device_pattern",
                    settings.device_pattern,
                    f"gives {site}/{device} twice; number devices with {{n}} or {{i}}",
                )
            devices.add(device)
            names.append((site, device))
    return names


def _unique_across_sites(settings: SimulateSettings, names: list[tuple[str, str]]) -> None:
    """Foreign formats' topics carry no site, so two sites must not share a device name.

    Raises:
        ConfigError: a device name is used on two sites.
    """
    counts = Counter(device for _site, device in names)
    repeated = [device for device, n in counts.items() if n > 1]
    if repeated:
        raise ConfigError(
            "simulate.device_pattern",
            settings.device_pattern,
            f"gives {repeated[0]} on two sites, but {settings.format} topics carry no site; "
            "number devices across the fleet with {n} or put {site} in the pattern",
        )


def _format(field: str, pattern: str, **values: object) -> str:
    try:
        name = pattern.format(**values)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            field, pattern, f"bad pattern ({err}); placeholders: {{n}}, {{i}}, {{site}}"
        ) from None
    if not is_valid_name(name):
        raise ConfigError(field, pattern, f"gives {name!r}; names are {NAME_RULE}")
    return name


class Fleet:
    """Every simulated device, built deterministically from the settings and a seed.

    Attributes:
        seed: the seed used (random when the settings give none; printed in the summary so a
            run can be repeated).
        devices: the devices, site by site.
        stamper: the shared ``ts`` formatter.
    """

    def __init__(self, settings: SimulateSettings, seed: int | None = None) -> None:
        if seed is None:
            seed = (
                settings.seed
                if settings.seed is not None
                else random.SystemRandom().getrandbits(63)
            )
        self.seed = seed
        self.stamper = Stamper(settings.ts_format)
        self.format: Format | None = FORMATS[settings.format](seed) if settings.foreign else None
        names = fleet_names(settings)
        if self.format is not None and not getattr(self.format, "topics_name_site", False):
            _unique_across_sites(settings, names)
        self.devices = [
            Device(
                index,
                site,
                name,
                seed=seed,
                settings=settings,
                stamper=self.stamper,
                fmt=self.format,
            )
            for index, (site, name) in enumerate(names)
        ]

    def __len__(self) -> int:
        return len(self.devices)

"""The simulator's settings: the ``[simulate]`` table of a config file, and its flags.

``configs/simulate.toml`` shows every option with its default; command-line flags override it.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Literal

from pydantic import Field, field_validator, model_validator

from iotpipe.errors import ConfigError
from iotpipe.schema import NestedConfigError
from iotpipe.settings import Section
from iotpipe.signals import SENSORS, Profiles, SensorName
from iotpipe.wire import MAX_TAGS
from simulator.faults import Fault
from simulator.formats import ENVELOPE, format_faults, format_names

MAX_DEVICES = 10_000
MAX_READINGS = 1000  # per envelope (wire contract)
_TAG_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


_Rate = Field(0.0, ge=0, le=1)


def _refuse(field: str, value: object, allowed: str) -> NestedConfigError:
    """A conflict between settings, reported as ``simulate.<field>=<value>: <allowed>``."""
    return NestedConfigError(ConfigError(field, value, allowed))


class FaultSettings(Section):
    """Fault injection: each rate is the probability (0..1) that a message gets that fault.

    At most one fault hits a message, so the rates must sum to at most 1.
    """

    duplicate: float = _Rate
    reorder: float = _Rate
    reorder_window: int = Field(5, ge=1, le=1000, description="held back for 1..N later messages")
    malformed: float = _Rate
    schema_: float = Field(0.0, ge=0, le=1, alias="schema")
    oversize: float = _Rate
    mismatch: float = _Rate
    skew: float = _Rate
    skew_seconds: float = Field(300.0, gt=0, le=10 * 365 * 86_400, description="max clock error")
    offline: float = _Rate
    offline_messages: int = Field(10, ge=1, le=10_000, description="messages buffered offline")

    model_config = Section.model_config | {"populate_by_name": True}

    def rates(self) -> dict[Fault, float]:
        """The rate of every fault kind."""
        return {
            Fault.DUPLICATE: self.duplicate,
            Fault.REORDER: self.reorder,
            Fault.MALFORMED: self.malformed,
            Fault.SCHEMA: self.schema_,
            Fault.OVERSIZE: self.oversize,
            Fault.MISMATCH: self.mismatch,
            Fault.SKEW: self.skew,
            Fault.OFFLINE: self.offline,
        }

    @model_validator(mode="after")
    def _sum_at_most_one(self) -> FaultSettings:
        total = sum(self.rates().values())
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to {total:g}; at most 1 (one fault per message)")
        return self


class SimulateSettings(Section):
    """Everything ``iotpipe simulate`` does, apart from where the broker is (``[mqtt]``)."""

    sites: int = Field(1, ge=1, le=MAX_DEVICES, description="number of sites")
    devices: int = Field(10, ge=1, le=MAX_DEVICES, description="devices per site")
    site_pattern: str = Field("site-{n:02d}", description="site names; {n} counts from 1")
    device_pattern: str = Field(
        "dev-{n:04d}", description="device names; {n} counts across the fleet, {i} within the site"
    )
    sensors: list[SensorName] = Field(list(SENSORS), min_length=1, description="sensors per device")
    tags: dict[str, str] = Field({"source": "simulator"}, description="tags on every envelope")
    rate: float | Literal["max"] = Field(1.0, description="samples per second per device, or max")
    speed: float = Field(1.0, gt=0, le=1_000_000, description="simulated seconds per real second")
    start: datetime | None = Field(None, description="simulated start time (default: now)")
    count: int | None = Field(None, ge=1, description="stop after this many envelopes")
    duration: float | None = Field(None, gt=0, description="stop after this many simulated seconds")
    batch: int = Field(1, ge=1, le=MAX_READINGS, description="samples per sensor per envelope")
    format: str = Field(ENVELOPE, description="payload format: envelope or a foreign device's")
    qos: Literal[0, 1, 2] = Field(1, description="MQTT QoS of telemetry")
    ts_format: Literal["rfc3339", "epoch_ms"] = Field("rfc3339", description="how ts is written")
    connections: int | None = Field(None, ge=1, le=MAX_DEVICES, description="MQTT connections")
    max_inflight: int = Field(1000, ge=1, le=60_000, description="unacknowledged QoS>0 messages")
    status: bool = Field(True, description="publish retained birth/offline status messages")
    seed: int | None = Field(None, description="random seed: same seed, same ids and values")
    flush_timeout: float = Field(30.0, gt=0, description="seconds to wait for the last acks")
    reconnect_timeout: float = Field(60.0, gt=0, description="seconds to retry a lost connection")
    receipts: Literal["auto", "on", "off"] = Field(
        "auto",
        description="keep envelopes until a receipt covers them (auto: as the pipeline says)",
    )
    receipt_window: int = Field(
        256, ge=1, le=60_000, description="unconfirmed envelopes per device"
    )
    receipt_timeout_min: float = Field(5.0, gt=0, description="shortest resend timeout, seconds")
    receipt_timeout_max: float = Field(300.0, gt=0, description="longest resend timeout, seconds")
    capability_wait: float = Field(3.0, ge=0, description="seconds to wait for the capability")
    profiles: Profiles = Profiles()
    faults: FaultSettings = FaultSettings()

    @field_validator("rate")
    @classmethod
    def _rate_range(cls, rate: float | str) -> float | str:
        if rate != "max" and not (isinstance(rate, float | int) and 0.1 <= rate <= 100):
            raise ValueError("must be 0.1..100 (samples per second per device) or max")
        return rate

    @field_validator("format")
    @classmethod
    def _known_format(cls, name: str) -> str:
        if name not in format_names():
            raise ValueError(f"unknown format; one of {', '.join(format_names())}")
        return name

    @field_validator("start")
    @classmethod
    def _utc(cls, start: datetime | None) -> datetime | None:
        if start is not None and start.tzinfo is None:
            return start.replace(tzinfo=UTC)
        return start

    @field_validator("sensors")
    @classmethod
    def _unique(cls, sensors: list[SensorName]) -> list[SensorName]:
        if len(set(sensors)) != len(sensors):
            raise ValueError("each sensor may appear once")
        return sensors

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: dict[str, str]) -> dict[str, str]:
        if len(tags) > MAX_TAGS:
            raise ValueError(f"at most {MAX_TAGS} tags (wire contract)")
        for key, value in tags.items():
            if not _TAG_RE.fullmatch(key) or len(value) > 256:
                raise ValueError(f"tag {key!r}: keys are 1-64 of A-Z a-z 0-9 _ - ., values <= 256")
        return tags

    @model_validator(mode="after")
    def _limits(self) -> SimulateSettings:
        if self.receipt_timeout_min > self.receipt_timeout_max:
            raise ValueError("receipt_timeout_min must not exceed receipt_timeout_max")
        if self.sites * self.devices > MAX_DEVICES:
            raise ValueError(
                f"sites x devices = {self.sites * self.devices}; at most {MAX_DEVICES}"
            )
        if self.foreign:
            self._check_foreign()
        if self.batch * len(self.sensors) > MAX_READINGS:
            raise ValueError(
                f"batch x sensors = {self.batch * len(self.sensors)} readings per envelope; "
                f"the wire contract allows {MAX_READINGS}"
            )
        return self

    def _check_foreign(self) -> None:
        """What a foreign format cannot do: receipts, batches, faults that need an envelope.

        Raised as :class:`~iotpipe.schema.NestedConfigError` so the one-line error names the
        setting that conflicts with the format, not the whole table.
        """
        name = self.format
        if self.receipts == "on":
            raise _refuse(
                "receipts",
                "on",
                f"receipts are part of the iotpipe envelope contract; format {name} has none "
                "(use auto or off)",
            )
        if self.batch > 1:
            raise _refuse(
                "batch", self.batch, f"batches are for envelopes; format {name} sends one sample"
            )
        supported = format_faults(name)
        for kind, rate in self.faults.rates().items():
            if rate > 0 and kind not in supported:
                takes = ", ".join(k.value for k in Fault if k in supported)
                raise _refuse(
                    f"faults.{kind.value}",
                    rate,
                    f"does not apply to format {name} (it takes: {takes})",
                )

    @property
    def foreign(self) -> bool:
        """Whether devices publish a foreign format (not our envelope)."""
        return self.format != ENVELOPE

    @property
    def total_devices(self) -> int:
        """Devices in the whole fleet."""
        return self.sites * self.devices

    @property
    def unpaced(self) -> bool:
        """Whether to publish as fast as possible (``rate = "max"``)."""
        return self.rate == "max"

    @property
    def sample_rate(self) -> float:
        """Samples per second per device in simulated time (1 when unpaced)."""
        return 1.0 if self.rate == "max" else float(self.rate)

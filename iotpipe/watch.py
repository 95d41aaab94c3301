"""A live view of iotpipe traffic on an MQTT broker: devices, latest readings, rejections.

:class:`TrafficView` is pure bookkeeping (fed :class:`~iotpipe.mqtt.Message` values, rendered to
a rich table); :func:`watch` subscribes and refreshes it.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from iotpipe.envelope import Envelope, Rejection, Status, decode
from iotpipe.errors import ConnectError
from iotpipe.mqtt import Message, MqttClient
from iotpipe.settings import MqttSettings


@dataclass
class DeviceView:
    """What the view knows about one device."""

    site: str
    device: str
    messages: int = 0
    readings: int = 0
    last_seen: float = 0.0
    state: str = "-"
    latest: dict[str, str] = field(default_factory=dict)


class TrafficView:
    """Aggregates messages into per-device rows and counts rejections by reason."""

    def __init__(self, max_sensors_shown: int = 4) -> None:
        self.devices: dict[tuple[str, str], DeviceView] = {}
        self.rejected: Counter[str] = Counter()
        self.total = 0
        self.bytes = 0
        self.started = time.monotonic()
        self._max_sensors = max_sensors_shown

    def observe(self, message: Message, now: float | None = None) -> Envelope | Status | Rejection:
        """Account for one message; returns what the codec made of it."""
        now = time.monotonic() if now is None else now
        self.total += 1
        self.bytes += len(message.payload)
        decoded = decode(message.topic, message.payload)
        if isinstance(decoded, Rejection):
            self.rejected[decoded.reason.value] += 1
            return decoded
        key = (decoded.site, decoded.device)
        view = self.devices.get(key)
        if view is None:
            view = self.devices[key] = DeviceView(decoded.site, decoded.device)
        view.last_seen = now
        if isinstance(decoded, Status):
            view.state = decoded.state
            return decoded
        view.messages += 1
        view.readings += len(decoded.readings)
        for reading in decoded.readings:
            unit = f" {reading.unit}" if reading.unit else ""
            value = (
                f"{reading.value:.2f}" if isinstance(reading.value, float) else str(reading.value)
            )
            view.latest[reading.sensor] = f"{value}{unit}"
        return decoded

    def render(self, now: float | None = None) -> Group:
        """A table of devices and a line of totals, for a terminal."""
        now = time.monotonic() if now is None else now
        table = Table(expand=False, header_style="bold")
        for column in ("site", "device", "state", "msgs", "readings", "seen", "latest readings"):
            table.add_column(column, justify="right" if column in ("msgs", "readings") else "left")
        for view in sorted(self.devices.values(), key=lambda v: (v.site, v.device)):
            latest = ", ".join(
                f"{sensor}={value}"
                for sensor, value in list(view.latest.items())[: self._max_sensors]
            )
            state_style = {"online": "green", "offline": "red"}.get(view.state, "")
            table.add_row(
                view.site,
                view.device,
                Text(view.state, style=state_style),
                str(view.messages),
                str(view.readings),
                f"{now - view.last_seen:.0f}s ago",
                latest,
            )
        return Group(table, Text(self.summary(now)))

    def summary(self, now: float | None = None) -> str:
        """One line: totals, rate and rejections by reason."""
        now = time.monotonic() if now is None else now
        rate = self.total / max(now - self.started, 1e-9)
        rejected = ", ".join(f"{reason}={n}" for reason, n in sorted(self.rejected.items()))
        return (
            f"{self.total} messages ({rate:.1f}/s, {self.bytes / 1024:.1f} KiB) from "
            f"{len(self.devices)} devices; rejected: {rejected or 'none'}"
        )


def watch(
    settings: MqttSettings,
    topics: list[str],
    *,
    duration: float | None = None,
    console: Console | None = None,
    refresh: float = 0.5,
) -> TrafficView:
    """Subscribe to ``topics`` and show live traffic until ``duration`` s pass or Ctrl-C.

    Raises:
        ConnectError: the broker cannot be reached.
    """
    view = TrafficView()
    client = MqttClient(settings, on_message=view.observe)
    client.connect()
    client.subscribe([(topic, 1) for topic in topics])
    console = console or Console(stderr=False)
    deadline = None if duration is None else time.monotonic() + duration
    try:
        if console.is_terminal:
            with Live(view.render(), console=console, refresh_per_second=4) as live:
                while deadline is None or time.monotonic() < deadline:
                    _pump_for(client, refresh)
                    live.update(view.render())
        else:
            while deadline is None or time.monotonic() < deadline:
                remaining = 5.0 if deadline is None else deadline - time.monotonic()
                _pump_for(client, max(0.0, min(5.0, remaining)))
                console.print(view.summary())
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
    return view


def _pump_for(client: MqttClient, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            client.pump(timeout=0.05)
        except ConnectError:
            # A restarting broker is normal while watching: wait for it to come back.
            client.reconnect(deadline=time.monotonic() + 60)

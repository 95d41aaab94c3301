"""``iotpipe simulate``: publish a simulated sensor fleet to an MQTT broker."""

from __future__ import annotations

import json
import signal
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Annotated, Any

import typer

from iotpipe.errors import ConfigError, DeliveryError
from iotpipe.mqtt import MqttClient, Will
from iotpipe.options import ConfigOption, MqttUrlOption
from iotpipe.settings import MqttSettings, config_path, load
from simulator import progress
from simulator.link import Link
from simulator.run import Simulation, summary_lines
from simulator.settings import SimulateSettings

_FAULTS = "Fault injection"
_FLEET = "Fleet"
_TIMING = "Timing"


def _key_values(option: str, items: list[str] | None) -> dict[str, str] | None:
    if not items:
        return None
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(option, item, "expected KEY=VALUE")
        pairs[key.strip()] = value.strip()
    return pairs


def _sensors(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [name.strip() for name in value.split(",") if name.strip()]


@contextmanager
def _graceful_stop(sim: Simulation) -> Iterator[None]:
    """First SIGINT/SIGTERM: stop generating, drain, flush, summarise. Second SIGINT: abort."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(_signum: int, _frame: FrameType | None) -> None:
        sim.stop()
        # A second Ctrl-C interrupts at once (e.g. while waiting for acknowledgements).
        signal.signal(signal.SIGINT, signal.default_int_handler)

    installed = False
    try:
        for sig in previous:
            signal.signal(sig, handler)
        installed = True
    except ValueError:  # not the main thread (e.g. run from a test's worker thread)
        pass
    try:
        yield
    finally:
        if installed:
            for sig, old in previous.items():
                signal.signal(sig, old)


def simulate(  # noqa: PLR0917 - typer maps every parameter to an option
    config: ConfigOption = None,
    mqtt: MqttUrlOption = None,
    sites: Annotated[
        int | None,
        typer.Option(
            help="Number of sites. \\[default: 1]", show_default=False, rich_help_panel=_FLEET
        ),
    ] = None,
    devices: Annotated[
        int | None,
        typer.Option(
            help="Devices per site (the fleet is sites x devices, at most 10,000). \\[default: 10]",
            show_default=False,
            rich_help_panel=_FLEET,
        ),
    ] = None,
    site_pattern: Annotated[
        str | None,
        typer.Option(
            help="Site names; {n} counts from 1. \\[default: site-{n:02d}]",
            show_default=False,
            rich_help_panel=_FLEET,
        ),
    ] = None,
    device_pattern: Annotated[
        str | None,
        typer.Option(
            help="Device names; {n} counts across the fleet, {i} within the site, {site} is the "
            "site. \\[default: dev-{n:04d}]",
            show_default=False,
            rich_help_panel=_FLEET,
        ),
    ] = None,
    sensors: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated sensors per device. "
            "\\[default: temperature,humidity,pressure,power,battery,door,motion]",
            show_default=False,
            rich_help_panel=_FLEET,
        ),
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option(
            "--tag",
            help="KEY=VALUE tag on every envelope (repeatable; replaces the configured tags).",
            show_default=False,
            rich_help_panel=_FLEET,
        ),
    ] = None,
    connections: Annotated[
        int | None,
        typer.Option(
            help="MQTT connections to spread the devices over. A connection with one device "
            "carries that device's last will. \\[default: one per device up to 10 devices, else 1]",
            show_default=False,
            rich_help_panel=_FLEET,
        ),
    ] = None,
    status: Annotated[
        bool | None,
        typer.Option(
            "--status/--no-status",
            help="Publish retained online/offline status messages. \\[default: --status]",
            show_default=False,
            rich_help_panel=_FLEET,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Random seed: the same seed (and --start) gives the same ids and values. "
            "\\[default: random, printed in the summary]",
            show_default=False,
            rich_help_panel=_FLEET,
        ),
    ] = None,
    rate: Annotated[
        str | None,
        typer.Option(
            help="Samples per second per device (0.1-100), or 'max' to publish as fast as the "
            "broker acknowledges. \\[default: 1]",
            show_default=False,
            rich_help_panel=_TIMING,
        ),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option(
            "--count",
            "-n",
            help="Stop after N envelopes.",
            show_default=False,
            rich_help_panel=_TIMING,
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(
            help="Stop after S seconds of simulated time.",
            show_default=False,
            rich_help_panel=_TIMING,
        ),
    ] = None,
    batch: Annotated[
        int | None,
        typer.Option(
            help="Samples per sensor in one envelope, each with its own ts. \\[default: 1]",
            show_default=False,
            rich_help_panel=_TIMING,
        ),
    ] = None,
    speed: Annotated[
        float | None,
        typer.Option(
            help="Simulated seconds per real second (e.g. 60 to replay an hour in a minute). "
            "\\[default: 1]",
            show_default=False,
            rich_help_panel=_TIMING,
        ),
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(
            help="Simulated start time, RFC 3339 (e.g. 2026-11-01T00:00:00Z) for backfills. "
            "\\[default: now]",
            show_default=False,
            rich_help_panel=_TIMING,
        ),
    ] = None,
    qos: Annotated[
        int | None,
        typer.Option(help="MQTT QoS of telemetry (0, 1, 2). \\[default: 1]", show_default=False),
    ] = None,
    ts_format: Annotated[
        str | None,
        typer.Option(
            help="How ts is written: rfc3339 or epoch_ms. \\[default: rfc3339]", show_default=False
        ),
    ] = None,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            "--fault",
            help="KIND=RATE to inject a fault into that fraction of messages (repeatable): "
            "duplicate, reorder, malformed, schema, oversize, mismatch, skew, offline; also "
            "reorder_window=N, skew_seconds=S, offline_messages=N.",
            show_default=False,
            rich_help_panel=_FAULTS,
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the final summary as one JSON object on stdout."),
    ] = False,
    show_progress: Annotated[
        bool,
        typer.Option(
            "--progress/--no-progress",
            help="Show progress on stderr: a live view on a terminal, log lines otherwise.",
        ),
    ] = True,
) -> None:
    """Publish a simulated sensor fleet: realistic signals, faults on demand, every ack counted.

    Each device publishes WIRE 1.0 envelopes (temperature, humidity, pressure, power,
    battery, door, motion) on [bold]iotpipe/v1/{site}/{device}/telemetry[/bold], with a
    retained online/offline status. The command fails (exit 4) if any publish is not
    acknowledged, and prints one line if the broker cannot be reached (exit 3).

    [bold]Examples[/bold]

      iotpipe simulate --sites 3 --devices 10 --rate 2 --duration 60

      iotpipe simulate --rate max --count 100000 --connections 1 --json   [dim]# throughput[/dim]

      iotpipe simulate --fault duplicate=0.01 --fault malformed=0.005 --fault offline=0.001

      iotpipe simulate --start 2026-11-01T00:00:00Z --duration 86400 --rate 0.1 --speed 1000

      iotpipe simulate -c configs/simulate.toml --seed 42
    """
    path = config_path(config)
    faults_overrides = _key_values("--fault", fault)
    overrides: dict[str, Any] = {
        "sites": sites,
        "devices": devices,
        "site_pattern": site_pattern,
        "device_pattern": device_pattern,
        "sensors": _sensors(sensors),
        "tags": _key_values("--tag", tag),
        "connections": connections,
        "status": status,
        "seed": seed,
        "rate": rate,
        "count": count,
        "duration": duration,
        "batch": batch,
        "speed": speed,
        "start": start,
        "qos": qos,
        "ts_format": ts_format,
        "faults": faults_overrides,
    }
    settings = load(SimulateSettings, "simulate", config_file=path, overrides=overrides)
    mqtt_settings = load(MqttSettings, "mqtt", config_file=path, overrides={"url": mqtt})
    # MQTT 3.1.1 only promises client ids of up to 23 characters: "iotsim-1a2b3c-9999" fits.
    prefix = mqtt_settings.client_id or "iotsim"
    run_id = uuid.uuid4().hex[:6]

    def connect(index: int, will: Will | None) -> Link:
        return MqttClient(
            mqtt_settings,
            client_id=f"{prefix}-{run_id}-{index}",
            will=will,
            max_inflight=settings.max_inflight,
        )

    sim = Simulation(settings, connect)  # builds the fleet: may still raise ConfigError
    sim.progress = progress.choose(show_progress)
    with _graceful_stop(sim):
        summary = sim.run()
    if as_json:
        typer.echo(json.dumps(summary.to_dict()))
    else:
        for line in summary_lines(summary):
            typer.echo(line)
    if not summary.ok:
        total = summary.acknowledged + summary.unacknowledged
        raise DeliveryError(
            f"{summary.unacknowledged} of {total} publishes were not acknowledged by "
            f"{mqtt_settings.broker} within {settings.flush_timeout:g} s"
        )

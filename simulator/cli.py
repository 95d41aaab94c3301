"""``iotpipe simulate``: publish a simulated sensor fleet to an MQTT broker.

The command maps its flags onto :class:`~simulator.settings.SimulateSettings` and ``[mqtt]``,
then runs :func:`~simulator.run.simulate_fleet` and prints its summary.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from iotpipe.errors import ConfigError
from iotpipe.options import ConfigOption, MqttUrlOption
from iotpipe.settings import MqttSettings, config_path, load
from simulator import progress
from simulator.run import check_acknowledged, simulate_fleet, summary_lines
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


def _option(help_text: str, *names: str, panel: str | None = None) -> Any:
    """A flag left unset by default, so the settings (file, environment, model) decide.

    ``help_text`` states the default, which typer cannot show: the flag's own default is None.
    """
    return typer.Option(*names, help=help_text, show_default=False, rich_help_panel=panel)


def simulate(  # noqa: PLR0917 - typer maps every parameter to an option
    config: ConfigOption = None,
    mqtt: MqttUrlOption = None,
    sites: Annotated[int | None, _option("Number of sites. \\[default: 1]", panel=_FLEET)] = None,
    devices: Annotated[
        int | None,
        _option(
            "Devices per site (the fleet is sites x devices, at most 10,000). \\[default: 10]",
            panel=_FLEET,
        ),
    ] = None,
    site_pattern: Annotated[
        str | None,
        _option("Site names; {n} counts from 1. \\[default: site-{n:02d}]", panel=_FLEET),
    ] = None,
    device_pattern: Annotated[
        str | None,
        _option(
            "Device names; {n} counts across the fleet, {i} within the site, {site} is the "
            "site. \\[default: dev-{n:04d}]",
            panel=_FLEET,
        ),
    ] = None,
    sensors: Annotated[
        str | None,
        _option(
            "Comma-separated sensors per device. "
            "\\[default: temperature,humidity,pressure,power,battery,door,motion]",
            panel=_FLEET,
        ),
    ] = None,
    tag: Annotated[
        list[str] | None,
        _option(
            "KEY=VALUE tag on every envelope (repeatable; replaces the configured tags).",
            "--tag",
            panel=_FLEET,
        ),
    ] = None,
    connections: Annotated[
        int | None,
        _option(
            "MQTT connections to spread the devices over. A connection with one device "
            "carries that device's last will. \\[default: one per device up to 10 devices, else 1]",
            panel=_FLEET,
        ),
    ] = None,
    status: Annotated[
        bool | None,
        _option(
            "Publish retained online/offline status messages. \\[default: --status]",
            "--status/--no-status",
            panel=_FLEET,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        _option(
            "Random seed: the same seed (and --start) gives the same ids and values. "
            "\\[default: random, printed in the summary]",
            panel=_FLEET,
        ),
    ] = None,
    rate: Annotated[
        str | None,
        _option(
            "Samples per second per device (0.1-100), or 'max' to publish as fast as the "
            "broker acknowledges. \\[default: 1]",
            panel=_TIMING,
        ),
    ] = None,
    count: Annotated[
        int | None, _option("Stop after N envelopes.", "--count", "-n", panel=_TIMING)
    ] = None,
    duration: Annotated[
        float | None, _option("Stop after S seconds of simulated time.", panel=_TIMING)
    ] = None,
    batch: Annotated[
        int | None,
        _option(
            "Samples per sensor in one envelope, each with its own ts. \\[default: 1]",
            panel=_TIMING,
        ),
    ] = None,
    speed: Annotated[
        float | None,
        _option(
            "Simulated seconds per real second (e.g. 60 to replay an hour in a minute). "
            "\\[default: 1]",
            panel=_TIMING,
        ),
    ] = None,
    start: Annotated[
        str | None,
        _option(
            "Simulated start time, RFC 3339 (e.g. 2026-11-01T00:00:00Z) for backfills. "
            "\\[default: now]",
            panel=_TIMING,
        ),
    ] = None,
    payload_format: Annotated[
        str | None,
        _option(
            "What the devices publish: envelope (ours), or what a real device publishes: "
            "tasmota, esphome, zigbee2mqtt, shelly, line (Telegraf's InfluxDB line protocol), "
            "sparkplug (Sparkplug B edge nodes). Foreign formats have no receipts. "
            "\\[default: envelope]",
            "--format",
            panel=_FLEET,
        ),
    ] = None,
    qos: Annotated[int | None, _option("MQTT QoS of telemetry (0, 1, 2). \\[default: 1]")] = None,
    ts_format: Annotated[
        str | None, _option("How ts is written: rfc3339 or epoch_ms. \\[default: rfc3339]")
    ] = None,
    fault: Annotated[
        list[str] | None,
        _option(
            "KIND=RATE to inject a fault into that fraction of messages (repeatable): "
            "duplicate, reorder, malformed, schema, oversize, mismatch, skew, offline; also "
            "reorder_window=N, skew_seconds=S, offline_messages=N.",
            "--fault",
            panel=_FAULTS,
        ),
    ] = None,
    receipts: Annotated[
        str | None,
        _option(
            "auto|on|off: keep every envelope until a receipt from the store covers it, "
            "resending it when none comes (auto: if the pipeline announces receipts). "
            "\\[default: auto]",
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
    retained online/offline status. With receipts (default: when the pipeline announces them)
    each device keeps what it published until the store confirms it. The command fails (exit 4)
    if any publish is not acknowledged or any envelope not receipted, and prints one line if
    the broker cannot be reached (exit 3).

    [bold]Examples[/bold]

      iotpipe simulate --sites 3 --devices 10 --rate 2 --duration 60

      iotpipe simulate --rate max --count 100000 --connections 1 --json   [dim]# throughput[/dim]

      iotpipe simulate --fault duplicate=0.01 --fault malformed=0.005 --fault offline=0.001

      iotpipe simulate --start 2026-11-01T00:00:00Z --duration 86400 --rate 0.1 --speed 1000

      iotpipe simulate --format tasmota --devices 20   [dim]# what Tasmota plugs publish[/dim]

      iotpipe simulate -c configs/simulate.toml --seed 42
    """
    path = config_path(config)
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
        "format": payload_format,
        "qos": qos,
        "ts_format": ts_format,
        "faults": _key_values("--fault", fault),
        "receipts": receipts,
    }
    settings = load(SimulateSettings, "simulate", config_file=path, overrides=overrides)
    mqtt_settings = load(MqttSettings, "mqtt", config_file=path, overrides={"url": mqtt})
    summary = simulate_fleet(settings, mqtt_settings, progress=progress.choose(show_progress))
    if as_json:
        typer.echo(json.dumps(summary.to_dict()))
    else:
        for line in summary_lines(summary):
            typer.echo(line)
    check_acknowledged(summary, settings, mqtt_settings.broker)

"""``iotpipe ingest try``: apply the configured ingest rules to a sample, before deploying them.

A group of its own (``iotpipe ingest ...``) rather than ``iotpipe bridge try``: ``iotpipe
bridge`` is a single command whose options run the service, and turning it into a group would
change how every existing ``iotpipe bridge --config ...`` invocation parses.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path
from typing import Annotated

import typer

from iotpipe.options import ConfigOption
from iotpipe.settings import config_path, load

app = typer.Typer(
    name="ingest",
    help="Ingest rules: map foreign MQTT payloads (Tasmota, ESPHome, Zigbee2MQTT, Shelly, line "
    "protocol, Sparkplug B) to envelopes. See docs/ingest.md.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_TRY_EXAMPLES = """

[bold]Examples[/bold]

  [dim]# one Tasmota message against the rules of a config file[/dim]
  iotpipe ingest try --config configs/bridge.toml --topic tele/plug-1/SENSOR \\
      --payload '{"Time":"2024-01-01T12:00:00","ENERGY":{"Power":12}}'

  [dim]# a payload from a file[/dim]
  iotpipe ingest try -c bridge.toml --topic zigbee2mqtt/kitchen --payload-file z2m.json

  [dim]# every message of a recording (iotpipe record, docs/recording.md)[/dim]
  iotpipe ingest try -c bridge.toml --recording fleet.jsonl
"""


@app.command("try")
def try_rules(
    *,
    config: ConfigOption = None,
    topic: Annotated[
        str | None, typer.Option("--topic", "-t", help="MQTT topic of the sample.")
    ] = None,
    payload: Annotated[
        str | None, typer.Option("--payload", help="The sample payload, as text.")
    ] = None,
    payload_file: Annotated[
        Path | None,
        typer.Option(
            "--payload-file", help="The sample payload, read from a file (bytes).", dir_okay=False
        ),
    ] = None,
    recording: Annotated[
        Path | None,
        typer.Option(
            "--recording", "-r", help="Try every message of this recording instead.", dir_okay=False
        ),
    ] = None,
) -> None:
    """Apply the configured ingest rules to a sample and print the envelopes or the rejections.

    Prints one line per envelope (its JSON) or per rejected message
    (rejected bridge.<reason>: <why> (rule <name>)), then a summary line.
    Exit 0: every message mapped; 1: some were rejected; 2: usage or config error.
    Nothing is published: no broker is needed.
    """
    from bridge.settings import BridgeSettings

    samples = _samples(topic, payload, payload_file, recording)
    settings = load(BridgeSettings, "bridge", config_file=config_path(config))
    mapped, rejected = _try(settings, samples)
    typer.echo(
        f"{_count(len(samples), 'message')}: {_count(mapped, 'envelope')}, {rejected} rejected"
    )
    if rejected:
        raise typer.Exit(1)


try_rules.__doc__ = inspect.cleandoc(try_rules.__doc__ or "") + _TRY_EXAMPLES


def _usage(message: str) -> typer.Exit:
    typer.secho(f"iotpipe: error: {message}", err=True)
    return typer.Exit(2)


def _samples(
    topic: str | None, payload: str | None, payload_file: Path | None, recording: Path | None
) -> list[tuple[str, bytes]]:
    if recording is not None:
        if topic is not None or payload is not None or payload_file is not None:
            raise _usage("--recording replaces --topic/--payload/--payload-file")
        from iotpipe.recording import read_recording

        _, messages = read_recording(recording)
        return [(m.topic, m.payload) for m in messages]
    if topic is None:
        raise _usage("give --topic with --payload or --payload-file, or --recording")
    if (payload is None) == (payload_file is None):
        raise _usage("give exactly one of --payload and --payload-file")
    if payload_file is not None:
        try:
            return [(topic, payload_file.read_bytes())]
        except OSError as err:
            raise _usage(f"cannot read {payload_file}: {err.strerror}") from None
    assert payload is not None
    return [(topic, payload.encode())]


def _try(settings: object, samples: list[tuple[str, bytes]]) -> tuple[int, int]:
    """Map every sample as the bridge would; print each outcome; (envelopes, rejected)."""
    from bridge.ingest import Ingest
    from bridge.service import HEADER_RULE, mapping_dead_letter, route, routed_mapped
    from bridge.settings import BridgeSettings
    from iotpipe.amqp import HEADER_ERROR
    from iotpipe.mqtt import Message
    from iotpipe.wire import PREFIX

    assert isinstance(settings, BridgeSettings)
    ingest = Ingest(settings.ingest)
    envelopes = rejected = 0
    now = time.time()
    for topic, body in samples:
        message = Message(topic, body)
        result = (
            None if topic.startswith(f"{PREFIX}/") else ingest.map(topic, body, int(now * 1000))
        )
        if result is None:
            routes = [route(message, now)]
        elif result[1].error is not None:
            routes = [mapping_dead_letter(message, result[0], result[1].error, now)]
        else:
            routes = [routed_mapped(message, result[0], m, now) for m in result[1].mapped]
        for routed in routes:
            if routed.exchange == "iotpipe.dead":
                headers = routed.properties.headers or {}
                rule = headers.get(HEADER_RULE)
                why = headers.get(HEADER_ERROR, "")
                reason = routed.routing_key.removeprefix("bridge.")
                why = why.removeprefix(f"{reason}: ")
                if rule is not None:
                    why = why.removesuffix(f" (rule {rule})")
                    suffix = f" (rule {rule})"
                elif topic.startswith(f"{PREFIX}/"):
                    suffix = ""  # the contract's own topic: the native path rejected it
                else:
                    suffix = " (no rule matches)"
                typer.echo(f"rejected {routed.routing_key}: {why}{suffix}")
                rejected += 1
            else:
                typer.echo(routed.body.decode())
                envelopes += 1
    return envelopes, rejected


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

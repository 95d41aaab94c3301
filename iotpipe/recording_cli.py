"""``iotpipe record`` and ``iotpipe replay``: capture MQTT traffic to a file and play it back.

The commands are thin: :class:`~iotpipe.recording.Recorder` turns received messages into
recording lines, and :func:`~iotpipe.replay.replay_messages` publishes a recording with its
original pacing (scaled by a speed factor); the commands add settings, progress on stderr and
signal handling. Both run on the caller's thread and pump the MQTT client while they wait, so
one thread owns the connection. SIGINT and SIGTERM end a run cleanly (the recording is closed, a summary
printed); a second signal interrupts at once.

The file format lives in :mod:`iotpipe.recording`; ``docs/recording.md`` describes both.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Annotated, TextIO

import typer

from iotpipe.errors import ConfigError, ConnectError, RecordingError
from iotpipe.mqtt import Message, MqttClient
from iotpipe.options import ConfigOption, MqttUrlOption
from iotpipe.recording import Header, Recorder, RecordingReader, RecordingWriter
from iotpipe.replay import check_delivered, parse_speed, replay_messages
from iotpipe.settings import BrokerUrl, MqttSettings, RecordSettings, load

__all__ = ["record", "replay"]

_RECONNECT_WINDOW = 30.0  # seconds a recorder keeps trying to get a lost connection back


def _source(url: BrokerUrl) -> str:
    """The broker URL without credentials or path, for a recording header."""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}:{url.port}"


# -- progress and signals ---------------------------------------------------------------------


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


class _Progress:
    """A progress line on stderr: rewritten in place on a terminal, else one line per interval."""

    def __init__(self, verb: str, total: int | None = None, stream: TextIO | None = None) -> None:
        self.verb = verb
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.25 if self.tty else 10.0
        self.start = time.monotonic()
        self._last = self.start
        self._shown = False

    def update(self, messages: int, payload_bytes: int, extra: str = "") -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            return
        self._last = now
        rate = messages / max(now - self.start, 1e-9)
        done = f"{messages:,}/{self.total:,}" if self.total is not None else f"{messages:,}"
        line = f"{self.verb}: {done} messages, {_size(payload_bytes)}, {rate:,.0f} msg/s{extra}"
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
            self._shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


class _StopSignals:
    """Turns SIGINT and SIGTERM into a stop request; a second signal interrupts at once.

    Calling the instance tells whether a stop was requested. Handlers are only installed on the
    main thread (Python allows no other); elsewhere the instance simply never fires.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    def __call__(self) -> bool:
        return self.received is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)

    @contextmanager
    def installed(self) -> Iterator[_StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


# -- record -----------------------------------------------------------------------------------


def record(
    *,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Recording file to create.",
            metavar="FILE",
            dir_okay=False,
            show_default=False,
        ),
    ] = None,
    topic: Annotated[
        list[str] | None,
        typer.Option(
            "--topic",
            "-t",
            metavar="FILTER",
            help="MQTT topic filter to record; repeat for several. \\[default: iotpipe/#]",
            show_default=False,
        ),
    ] = None,
    qos: Annotated[
        int | None,
        typer.Option(
            "--qos", min=0, max=2, help="Subscription QoS. \\[default: 1]", show_default=False
        ),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option(
            "--count", "-n", min=1, help="Stop after this many messages.", show_default=False
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(
            "--duration", min=0.001, help="Stop after this many seconds.", show_default=False
        ),
    ] = None,
    force: Annotated[
        bool | None,
        typer.Option(
            "--force", "-f", help="Overwrite the output file if it exists.", show_default=False
        ),
    ] = None,
    mqtt: MqttUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Record MQTT traffic to a file (JSON Lines, see docs/recording.md).

    Subscribes to the topic filters and writes every message (topic, QoS, retain flag, exact payload
    bytes, time offset) until --count messages, --duration seconds, or Ctrl-C / SIGTERM; the file is
    always closed cleanly. Retained messages the broker sends at subscribe time are recorded with
    their retain flag. Progress goes to stderr, the summary to stdout.

    [bold]Examples[/bold]

      iotpipe record --mqtt mqtt://127.0.0.1:1883 --topic 'iotpipe/#' --out traffic.jsonl

      iotpipe record --topic 'iotpipe/v1/+/+/telemetry' --out ten.jsonl --count 10

      iotpipe record -c iotpipe.toml --duration 60 --out minute.jsonl --force

    Config file: section \\[record] (topics, qos, out, count, duration, overwrite) and \\[mqtt].
    """
    settings = load(
        RecordSettings,
        "record",
        config_file=config,
        overrides={
            "out": out,
            "topics": tuple(topic) if topic else None,
            "qos": qos,
            "count": count,
            "duration": duration,
            "overwrite": force,
        },
    )
    mqtt_settings = load(MqttSettings, "mqtt", config_file=config, overrides={"url": mqtt})
    if settings.out is None:
        raise ConfigError("record.out", None, "required: pass --out FILE (or set out in [record])")
    if settings.out.exists() and not settings.overwrite:
        raise RecordingError(str(settings.out), 0, "already exists (pass --force to overwrite it)")

    header = Header(
        created=datetime.now(UTC), source=_source(mqtt_settings.broker), filters=settings.topics
    )
    recorder: Recorder | None = None

    def on_message(message: Message) -> None:
        if recorder is not None:
            recorder.on_message(message)

    client = MqttClient(mqtt_settings, on_message=on_message)
    progress = _Progress("recording")
    stop = _StopSignals()
    with stop.installed():
        client.connect()  # before creating the file: an unreachable broker leaves nothing behind
        try:
            writer = RecordingWriter(settings.out, header, overwrite=settings.overwrite)
        except RecordingError:
            client.disconnect()
            raise
        recorder = Recorder(writer, count=settings.count)
        started = time.monotonic()
        try:
            client.subscribe([(f, settings.qos) for f in settings.topics])
            typer.echo(
                f"recording {', '.join(settings.topics)} from {header.source} to {settings.out} "
                "(Ctrl-C to stop)",
                err=True,
            )
            started = time.monotonic()
            deadline = started + settings.duration if settings.duration is not None else math.inf
            while not (stop() or recorder.full or time.monotonic() >= deadline):
                try:
                    client.pump(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
                except ConnectError as err:
                    typer.echo(f"iotpipe: warning: {err}; reconnecting", err=True)
                    client.reconnect(time.monotonic() + _RECONNECT_WINDOW)
                progress.update(writer.messages, writer.payload_bytes)
        finally:
            elapsed = time.monotonic() - started
            progress.finish()
            client.disconnect()
            writer.close()
    why = f", stopped by {stop.received.name}" if stop.received is not None else ""
    typer.echo(
        f"recorded {writer.messages:,} messages ({_size(writer.payload_bytes)}) "
        f"in {elapsed:.1f} s to {settings.out}{why}"
    )


# -- replay -----------------------------------------------------------------------------------


def replay(
    recording: Annotated[
        Path, typer.Argument(help="Recording file (from iotpipe record).", show_default=False)
    ],
    *,
    speed: Annotated[
        str,
        typer.Option(
            "--speed",
            "-s",
            help="Time scale: 1 = as recorded, 10 = ten times faster, max = no waiting.",
        ),
    ] = "1",
    topic_prefix: Annotated[
        str, typer.Option("--topic-prefix", help="Prepend this to every topic.", show_default=False)
    ] = "",
    ack_timeout: Annotated[
        float,
        typer.Option("--ack-timeout", min=0, help="Seconds to wait for the last acknowledgements."),
    ] = 30.0,
    mqtt: MqttUrlOption = None,
    config: ConfigOption = None,
) -> None:
    """Publish a recording to an MQTT broker, in order and with its original timing.

    Every message keeps its payload bytes, QoS and retain flag. --speed scales the time between
    messages (2 = twice as fast); --speed max publishes as fast as the broker acknowledges. The file
    is validated completely before anything is published. Exits with code 4 if the broker did not
    acknowledge every message.

    [bold]Examples[/bold]

      iotpipe replay traffic.jsonl --mqtt mqtt://127.0.0.1:1883

      iotpipe replay traffic.jsonl --speed 10

      iotpipe replay traffic.jsonl --speed max --topic-prefix replay/
    """
    try:
        factor = parse_speed(speed)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--speed") from None
    mqtt_settings = load(MqttSettings, "mqtt", config_file=config, overrides={"url": mqtt})
    # Validate the whole file first: a bad line must not leave a half-replayed broker.
    with RecordingReader(recording) as reader:
        total = sum(1 for _ in reader)
        truncated = reader.truncated_line
    if truncated is not None:
        typer.echo(
            f"iotpipe: warning: {recording}:{truncated}: incomplete last line ignored "
            "(the recorder was probably killed while writing it)",
            err=True,
        )
    target = mqtt_settings.broker.redacted()
    client = MqttClient(mqtt_settings)
    client.connect()
    progress = _Progress("replaying", total)
    stop = _StopSignals()
    try:
        with stop.installed(), RecordingReader(recording) as reader:
            stats = replay_messages(
                client,
                reader,
                speed=factor,
                topic_prefix=topic_prefix,
                ack_timeout=ack_timeout,
                should_stop=stop,
                on_progress=lambda s: progress.update(
                    s.published, s.payload_bytes, f", {s.acknowledged:,} acknowledged"
                ),
            )
    finally:
        progress.finish()
        client.disconnect()
    why = f", stopped by {stop.received.name}" if stop.received is not None else ""
    typer.echo(
        f"replayed {stats.published:,} of {total:,} messages ({_size(stats.payload_bytes)}) "
        f"in {stats.elapsed:.1f} s to {target}: {stats.acknowledged:,} acknowledged{why}"
    )
    check_delivered(stats, target)
    if stats.interrupted:
        raise typer.Exit(130)

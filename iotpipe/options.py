"""Command-line options shared by every ``iotpipe`` command, and logging set-up.

Components declare their typer options with these aliases so that ``--config`` and ``--mqtt``
mean the same thing everywhere.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="TOML config file (default: $IOTPIPE_CONFIG). Flags override it; "
        "IOTPIPE_<SECTION>__<FIELD> variables override the file.",
        show_default=False,
        dir_okay=False,
    ),
]

MqttUrlOption = Annotated[
    str | None,
    typer.Option(
        "--mqtt",
        help="MQTT broker URL: mqtt://\\[user:pass@]host\\[:port] or mqtts://... "
        "\\[default: mqtt://127.0.0.1:1883]",
        show_default=False,
    ),
]


class KeyValueFormatter(logging.Formatter):
    """One line per event: ``time level logger message`` (messages carry their own key=value)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S")


def setup_logging(level: str) -> None:
    """Send structured log lines to stderr at ``level`` (debug, info, warning, error)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party libraries are chatty at INFO; they only speak up for warnings.
    for noisy in ("amqtt", "transitions", "websockets"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # pika logs several ERROR lines per failed connection attempt; iotpipe.amqp logs one line
    # per event (lost, retrying, reconnected) instead.
    logging.getLogger("pika").setLevel(logging.CRITICAL)

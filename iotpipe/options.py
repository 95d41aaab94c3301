"""Command-line options shared by every ``iotpipe`` command, and logging set-up.

Components declare their typer options with these aliases so that ``--config`` and ``--mqtt``
mean the same thing everywhere. Logging set-up lives in :mod:`iotpipe.logs` (re-exported here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from iotpipe.logs import KeyValueFormatter, setup_logging

__all__ = ["ConfigOption", "KeyValueFormatter", "MqttUrlOption", "setup_logging"]

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

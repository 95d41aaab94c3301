"""Log lines on stderr: one line per event, ``time level logger message`` (key=value inside).

Kept apart from :mod:`iotpipe.options` (typer) so the edge agent sets up logging without typer.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LOG_LEVELS", "KeyValueFormatter", "setup_logging"]

#: The levels ``--log-level`` accepts.
LOG_LEVELS = ("debug", "info", "warning", "error")


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

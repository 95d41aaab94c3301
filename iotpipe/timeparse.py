"""Points in time as people type them: RFC 3339, epoch milliseconds, ``now`` or ``-7d``.

:func:`parse_time` turns such text into Unix epoch milliseconds; ``iotpipe export --since``,
``iotpipe stats`` and the dashboard's ``from``/``to`` parameters all read times through it.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

from iotpipe.errors import ConfigError

__all__ = ["TIME_FORMS", "parse_time"]

TIME_FORMS = "RFC 3339 (2026-11-26T08:00:00Z; no offset = UTC), epoch ms, or relative (-1h, -7d)"
"""The accepted forms, in one phrase for help texts and error messages."""

_RELATIVE_RE = re.compile(r"-(\d+)(ms|s|m|h|d|w)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time(text: str, *, field: str, now_ms: int | None = None) -> int:
    """Parse a point in time into Unix epoch milliseconds.

    Accepts RFC 3339 / ISO 8601 (a date, or a time without offset, is UTC), integer epoch
    milliseconds, ``now``, or a time relative to now: ``-<n><unit>`` with unit ``ms``, ``s``,
    ``m``, ``h``, ``d`` or ``w`` (``-90m``, ``-7d``).

    Args:
        text: what the user typed.
        field: the option or parameter it came from, named by the error.
        now_ms: "now" for relative times (default: the wall clock).

    Raises:
        ConfigError: none of these forms.
    """
    text = text.strip()
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    if text.isdigit():
        return int(text)
    if text == "now":
        return now
    relative = _RELATIVE_RE.fullmatch(text)
    if relative:
        return now - int(relative[1]) * _UNIT_MS[relative[2]]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(field, text, f"expected {TIME_FORMS}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(milliseconds=1)

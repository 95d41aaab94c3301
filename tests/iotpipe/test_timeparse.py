"""Times as users type them (RFC 3339, epoch ms, ``now``, ``-7d``) become epoch milliseconds."""

from __future__ import annotations

import pytest

from iotpipe.errors import ConfigError
from iotpipe.timeparse import parse_time

T0 = 1_764_144_000_000  # 2025-11-26T08:00:00Z


def test_parse_time_forms() -> None:
    """RFC 3339, dates, epoch ms and relative times all become epoch ms."""
    now = T0 + 10_000
    assert parse_time("2025-11-26T08:00:00.250Z", field="--since") == T0 + 250
    assert parse_time("2025-11-26T09:00:00+01:00", field="--since") == T0
    assert parse_time("2025-11-26T08:00", field="--since") == T0
    assert parse_time(str(T0), field="--since") == T0
    assert parse_time("-10s", field="--since", now_ms=now) == T0
    assert parse_time("-2h", field="--since", now_ms=now) == now - 7_200_000
    assert parse_time("-7d", field="--since", now_ms=now) == now - 7 * 86_400_000
    assert parse_time("now", field="--until", now_ms=now) == now


@pytest.mark.parametrize("text", ["yesterday", "-1y", "1.5", ""])
def test_parse_time_refuses_other_forms(text: str) -> None:
    """Anything else is a ConfigError naming the field and listing the accepted forms."""
    with pytest.raises(ConfigError, match=r"--since.*RFC 3339"):
        parse_time(text, field="--since")

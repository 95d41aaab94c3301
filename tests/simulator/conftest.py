"""Fixtures of the simulator's tests."""

from __future__ import annotations

import pytest

#: The ``agent`` of the status messages in the pinned digests and shipped recordings: the
#: simulator's version when they were made. Its bytes are pinned, not its version number.
PINNED_AGENT = "iotpipe-simulator/0.1.0"


@pytest.fixture
def pinned_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Status messages name the agent the pinned bytes were made with, whatever the version."""
    monkeypatch.setattr("simulator.fleet.AGENT", PINNED_AGENT)

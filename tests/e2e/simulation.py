"""``iotpipe simulate`` as a subprocess, and the ids it sent as a subscriber saw them.

The simulator reports counts, not ids, so a :class:`~iotpipe.testing.Capture` subscribes to the
telemetry topics before it starts (on a broker that is never restarted, with no queue limit) and
keeps every publish; its ids are what the store must hold, each exactly once.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iotpipe.envelope import Envelope, decode
from iotpipe.testing import Capture
from tests.e2e.conftest import IOTPIPE, _env


@dataclass
class Simulator:
    """One ``iotpipe simulate`` run; stdout (the JSON summary) and stderr go to files."""

    workdir: Path
    args: list[str]
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Simulator:
        with (
            (self.workdir / "simulate.out").open("wb") as out,
            (self.workdir / "simulate.err").open("wb") as err,
        ):
            self.proc = subprocess.Popen(
                [*IOTPIPE, "simulate", *self.args, "--json", "--no-progress"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=_env(),
                cwd=self.workdir,
            )
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for the exit; the JSON summary (fails with stderr unless it exited 0)."""
        assert self.proc is not None
        code = self.proc.wait(timeout=timeout)
        err = (self.workdir / "simulate.err").read_text(errors="replace")
        assert code == 0, f"iotpipe simulate exited {code}\n{err[-3000:]}"
        summary: dict[str, Any] = json.loads((self.workdir / "simulate.out").read_text())
        return summary

    def kill(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass(frozen=True)
class Sent:
    """What the devices published, as a subscriber received it.

    Attributes:
        publishes: telemetry publishes (retransmitted copies included).
        readings: readings per distinct id.
        rejected: publishes that are not valid envelopes.
    """

    publishes: int
    readings: dict[str, int]
    rejected: int

    @property
    def copies(self) -> int:
        """Publishes that repeated an id already sent."""
        return self.publishes - self.rejected - len(self.readings)


def sent(capture: Capture) -> Sent:
    """Decode every captured telemetry publish."""
    readings: dict[str, int] = {}
    rejected = 0
    for message in list(capture.messages):
        decoded = decode(message.topic, message.payload)
        if isinstance(decoded, Envelope):
            readings[decoded.id] = len(decoded.readings)
        else:
            rejected += 1
    return Sent(len(capture.messages), readings, rejected)

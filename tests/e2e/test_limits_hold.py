"""Per-device limits, policy hold, end to end: held receipts slow an agent down at the source.

Real processes: ``iotpipe edge run`` (3 simulated sensors at 10 Hz, one reading per envelope:
30 envelopes/s, receipts on, a receipt window of 10) -> a private Mosquitto -> ``iotpipe bridge``
limiting the device to 1.5 envelopes/s (20x less than it makes) -> the shared RabbitMQ (the
test's own queues) -> ``iotpipe consume`` -> SQLite, receipts flowing back.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MosquittoProcess, free_port
from tests.e2e.conftest import Services
from tests.e2e.test_receipts_faults import Deadline, check, rig
from tests.rabbitmq import blocking_channel

pytestmark = [pytest.mark.slow, pytest.mark.mqtt, pytest.mark.mosquitto, pytest.mark.rabbitmq]

RATE, BURST, WINDOW = 1.5, 3, 10
LIMITS = f"\n[bridge.limits]\nrate = {RATE}\nburst = {BURST}\n"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """A private Mosquitto without queue limits."""
    started = MosquittoProcess(tmp_path / "mosquitto", free_port(), "")
    started.start()
    yield started
    started.stop()


@pytest.fixture
def own_queues(rabbitmq_url: str, unique: str, services: Services) -> Iterator[str]:
    """The site's name; its store and receipts queues are deleted once the services died."""
    site = f"rf{unique}"
    yield site
    services.kill_all()
    with blocking_channel(rabbitmq_url) as channel:
        for queue in (f"{site}.store", f"{site}.receipts"):
            channel.queue_delete(queue)


def test_hold_slows_a_receipt_speaking_agent_to_its_rate_and_loses_nothing(
    broker: MosquittoProcess,
    rabbitmq_url: str,
    services: Services,
    own_queues: str,
    unique: str,
) -> None:
    """At 20x its rate the agent's backlog stays on the device: the store gets about the rate's
    worth; once the limit is lifted every envelope is stored exactly once."""
    deadline = Deadline(120)
    pipeline = rig(
        services,
        deadline,
        unique,
        f"mqtt://127.0.0.1:{broker.port}",
        rabbitmq_url,
        agents=1,
        edge={"receipt_window": WINDOW},
    )
    assert pipeline.site == own_queues
    unlimited = pipeline.bridge.config.read_text()
    pipeline.bridge.config.write_text(unlimited + LIMITS)
    pipeline.start()
    began = time.monotonic()
    (agent,) = pipeline.agents
    pipeline.wait(
        lambda: agent.metric("iotpipe_edge_outbox_envelopes") >= 300,
        60,
        "300 envelopes waiting on the agent",
    )
    stored, elapsed = pipeline.stored(), time.monotonic() - began
    parked = pipeline.bridge.metric("iotpipe_bridge_receipts_parked_total")
    limited = pipeline.bridge.metric("iotpipe_bridge_limited_total", reason="rate", policy="hold")
    # What the rate allows over the run, plus one receipt window: a count, with a 2x margin.
    allowed = BURST + RATE * elapsed + WINDOW
    print(f"\nlimited phase: {stored} stored in {elapsed:.1f} s (rate allows ~{allowed:.0f})")
    assert 0 < stored <= 2 * allowed
    assert parked > 0
    assert limited > 0

    # The limit lifted (and the agent's window widened, so it catches up): nothing was lost.
    assert pipeline.bridge.terminate() == 0
    pipeline.bridge.config.write_text(unlimited)
    pipeline.bridge.start().wait_ready()
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=deadline.left(40)) == 0, agent.tail()
    agent.config.write_text(
        agent.config.read_text().replace(f"receipt_window = {WINDOW}", "receipt_window = 256")
    )
    agent.start().wait_ready()
    result, resent = pipeline.finish()
    check("limits: hold at 20x the rate", pipeline, result, resent, limited_stored=stored)

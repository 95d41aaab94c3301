"""pytest fixtures for end-to-end tests driven by recordings (a plugin over ``iotpipe.testing``).

Loaded for the whole suite by ``pytest_plugins = ["tests.fixtures_replay"]`` in
``tests/conftest.py``. Typical use, with a downstream predicate::

    def test_store_gets_every_reading(mqtt_broker, replayer, shipped_recording, store):
        result = replayer(shipped_recording, mqtt_broker.url, seen=store.row_count, expected=412)
        assert result.seen == 412
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from iotpipe.recording import RecordedMessage
from iotpipe.settings import MqttSettings
from iotpipe.testing import Capture, ReplayResult, replay_and_wait

_CLI_FULL = "from iotpipe.cli import main; main()"
# While a component's cli module that iotpipe.cli mounts does not exist yet, run the real root
# with only record/replay mounted, so its error handling and exit codes are still what is tested.
_CLI_RECORDING_ONLY = (
    "import iotpipe.cli as cli\n"
    "from iotpipe.recording_cli import record, replay\n"
    "def mount():\n"
    "    cli.app.command('record')(record)\n"
    "    cli.app.command('replay')(replay)\n"
    "cli._mount = mount\n"
    "cli.main()\n"
)


def iotpipe_argv(*args: str) -> list[str]:
    """The argv that runs ``iotpipe ARGS`` in a subprocess with this interpreter."""
    mounted = ("bridge.cli", "simulator.cli")
    complete = all(importlib.util.find_spec(name) is not None for name in mounted)
    return [sys.executable, "-c", _CLI_FULL if complete else _CLI_RECORDING_ONLY, *args]


#: The recording shipped in tests/data (see tests/data/README.md for how it was made).
SHIPPED_RECORDING = Path(__file__).parent / "data" / "fleet-faults-seed7.jsonl"


class Replayer:
    """Replays recordings into brokers and waits for downstream; one per test.

    Calling it is :func:`iotpipe.testing.replay_and_wait` with the same arguments; every result
    is also kept in :attr:`results` for assertions after the fact.
    """

    def __init__(self) -> None:
        self.results: list[ReplayResult] = []

    def __call__(
        self,
        source: str | Path | Iterable[RecordedMessage],
        mqtt: str | MqttSettings,
        *,
        seen: Callable[[], int] | None = None,
        expected: int | None = None,
        timeout: float = 30.0,
        speed: float | None = None,
        topic_prefix: str = "",
    ) -> ReplayResult:
        result = replay_and_wait(
            source,
            mqtt,
            seen=seen,
            expected=expected,
            timeout=timeout,
            speed=speed,
            topic_prefix=topic_prefix,
        )
        self.results.append(result)
        return result


@pytest.fixture
def replayer() -> Replayer:
    """Replay a recording (file or messages) into a broker and wait until ``seen()`` catches up."""
    return Replayer()


CaptureFactory = Callable[..., Capture]


@pytest.fixture
def capture() -> Iterator[CaptureFactory]:
    """Start a subscriber: ``capture(url, "filter/#", qos=2)``; every one is stopped at teardown."""
    started: list[Capture] = []

    def start(mqtt: str | MqttSettings, filters: str | Iterable[str], *, qos: int = 2) -> Capture:
        subscriber = Capture(mqtt, filters, qos=qos)
        started.append(subscriber)
        return subscriber.start()

    yield start
    for subscriber in started:
        subscriber.stop()


@pytest.fixture
def shipped_recording() -> Path:
    """The simulator recording shipped in tests/data (fails with instructions if it is missing)."""
    if not SHIPPED_RECORDING.is_file():
        pytest.fail(
            f"{SHIPPED_RECORDING} is missing: regenerate it with tests/data/make_recording.py "
            "(see tests/data/README.md)"
        )
    return SHIPPED_RECORDING

"""Helpers for the edge agent's tests: a fake driver, settings, a subscriber that survives a
broker restart, and the agent running on a thread."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edge.agent import Agent
from edge.config import EdgeSettings
from edge.sensors.base import Sample, SensorError, Value
from iotpipe.errors import ConnectError
from iotpipe.mqtt import Message, MqttClient
from iotpipe.settings import MqttSettings
from iotpipe.systemd_notify import Notifier


class FakeDriver:
    """A driver whose reads count up; ``fail`` makes a read raise :class:`SensorError`."""

    def __init__(
        self,
        name: str = "fake",
        interval: float = 0.05,
        *,
        fail: Callable[[int], bool] = lambda n: False,
        value: Callable[[int], Value] = float,
    ) -> None:
        self._name = name
        self._interval = interval
        self._fail = fail
        self._value = value
        self.reads = 0
        self.closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def interval(self) -> float:
        return self._interval

    def read(self) -> list[Sample]:
        self.reads += 1
        if self._fail(self.reads):
            raise SensorError(f"read {self.reads} failed on purpose")
        return [Sample(self._name, self._value(self.reads), "1", time.time_ns() // 1_000_000)]

    def close(self) -> None:
        self.closed = True


def make_settings(state_dir: Path, site: str, **overrides: Any) -> EdgeSettings:
    """Edge settings for a test: fast batches, no HTTP, clock synced, state in ``state_dir``."""
    values: dict[str, Any] = {
        "site": site,
        "device": "pi1",
        "state_dir": state_dir,
        "batch_max_readings": 5,
        "batch_max_delay": 0.2,
        "commit_max_delay": 0.0,
        "http_port": 0,
        "clock_sync_files": [],
        "reconnect_min": 0.05,
        "reconnect_max": 0.5,
        "drain_rate": 500.0,
        "stats_interval": 1.0,
    }
    values.update(overrides)
    return EdgeSettings(**values)


class Subscriber:
    """A QoS 1 subscriber with a persistent session that reconnects after a broker restart."""

    def __init__(self, url: str, topic: str, client_id: str) -> None:
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._client = MqttClient(
            MqttSettings(url=url), client_id=client_id, clean_session=False, on_message=self._on
        )
        self._topic = topic
        self._thread = threading.Thread(target=self._run, name="test-subscriber", daemon=True)

    def _on(self, message: Message) -> None:
        with self._lock:
            self.messages.append(message)

    def start(self) -> Subscriber:
        self._client.connect()
        self._client.subscribe([(self._topic, 1)])
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._client.pump(timeout=0.05)
            except ConnectError:
                try:
                    self._client.reconnect(time.monotonic() + 60.0, max_delay=0.5)
                except ConnectError:
                    return

    def envelopes(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(m.payload) for m in self.messages]

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._client.disconnect()


class RunningAgent:
    """An :class:`Agent` whose ``run()`` is on a thread."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-agent", daemon=True)

    def _run(self) -> None:
        try:
            self.agent.run()
        except BaseException as err:
            self.error = err

    def start(self) -> RunningAgent:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.agent.stop()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive(), "agent did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def run_agent() -> Iterator[Callable[..., RunningAgent]]:
    """Start agents on threads; every one still running is stopped at teardown."""
    started: list[RunningAgent] = []

    def start(settings: EdgeSettings, url: str, drivers: list[Any], **kwargs: Any) -> RunningAgent:
        kwargs.setdefault("notifier", Notifier(environ={}))
        running = RunningAgent(Agent(settings, MqttSettings(url=url), drivers, **kwargs)).start()
        started.append(running)
        return running

    yield start
    for running in started:
        if running._thread.is_alive():
            running.stop()

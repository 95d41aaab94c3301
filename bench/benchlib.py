"""What the benchmarks share: a paho client, the fastest windowed QoS 1 publish loop, and
``py-spy record`` attached to a process for the length of a block.

The scripts in ``bench/`` run as ``python bench/bench_X.py``, so this module is importable as
``benchlib`` (the script's directory is first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

#: The publisher lets paho read (PUBACKs) every this many publishes.
PUMP_EVERY = 32


def paho_client(prefix: str, login: tuple[str, str] | None = None) -> paho.Client:
    """A paho MQTT 3.1.1 clean-session client with a unique id (``prefix-<hex>``)."""
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"{prefix}-{uuid.uuid4().hex[:10]}",
        protocol=paho.MQTTv311,
        clean_session=True,
    )
    if login is not None:
        client.username_pw_set(*login)
    return client


def publish_windowed(
    client: paho.Client, port: int, messages: list[tuple[str, bytes]], window: int
) -> tuple[float, float]:
    """Connect ``client`` and publish every message at QoS 1, at most ``window`` unacknowledged.

    Returns (first publish, last PUBACK) as ``time.monotonic()`` values; the client stays
    connected (the caller decides when to leave).
    """
    acked = 0
    connected = False

    def on_connect(*_args: object) -> None:
        nonlocal connected
        connected = True

    def on_publish(*_args: object) -> None:
        nonlocal acked
        acked += 1

    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    while not connected:
        client.loop(0.05)
    started = time.monotonic()
    for sent, (topic, payload) in enumerate(messages):
        while sent - acked >= window:
            client.loop(0.01)
        info = client.publish(topic, payload, qos=1)
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise RuntimeError(f"publish refused: {info.rc}")
        if sent % PUMP_EVERY == 0:
            client.loop(0)
    while acked < len(messages):
        client.loop(0.01)
    return started, time.monotonic()


@contextlib.contextmanager
def py_spy(pid: int, output: Path, *options: str, fmt: str = "speedscope") -> Iterator[None]:
    """``py-spy record`` of every thread of ``pid`` at 250 Hz into ``output`` while the block runs.

    ``options`` add to ``--threads`` (e.g. ``--gil``, ``--idle``); ``fmt`` is py-spy's
    ``--format``. py-spy writes its file when it gets SIGINT, at the end of the block.
    """
    spy = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--threads",
            *options,
            "--rate",
            "250",
            "--format",
            fmt,
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)

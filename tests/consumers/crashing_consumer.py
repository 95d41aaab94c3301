"""A consumer process that dies (``os._exit``) right after its Nth store commit, before the ack.

    python -m tests.consumers.crashing_consumer CONFIG N

The window between commit and acknowledgement is the one a SIGKILL from outside rarely hits;
this hits it every time. RabbitMQ then redelivers the committed batch, and the store's dedupe
must absorb it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from consumers.service import Consumer
from consumers.settings import ConsumeSettings, InfluxSettings
from consumers.store import DeviceStatus, Message, Store, WriteResult
from consumers.stores import open_store
from iotpipe.settings import AmqpSettings, load

EXIT_CODE = 99


class CrashAfterCommits:
    """Wraps a store; exits the process after the ``n``-th successful write."""

    def __init__(self, inner: Store, n: int) -> None:
        self.inner = inner
        self.left = n

    def write(self, messages: Sequence[Message], statuses: Sequence[DeviceStatus]) -> WriteResult:
        result = self.inner.write(messages, statuses)
        self.left -= 1
        if self.left <= 0:
            os._exit(EXIT_CODE)
        return result

    def prune(self, now_ms: int) -> int:
        return self.inner.prune(now_ms)

    def check(self) -> None:
        self.inner.check()

    def close(self) -> None:
        self.inner.close()


def main(argv: list[str]) -> None:
    config, n = Path(argv[0]), int(argv[1])
    amqp = load(AmqpSettings, "amqp", config_file=config, environ={})
    settings = load(ConsumeSettings, "consume", config_file=config, environ={})
    influx = load(InfluxSettings, "influxdb", config_file=config, environ={})
    store = CrashAfterCommits(open_store(settings, influx), n)
    Consumer.from_settings(amqp, settings, store).run()


if __name__ == "__main__":
    main(sys.argv[1:])

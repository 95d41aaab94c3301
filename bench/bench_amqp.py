"""ConfirmingPublisher throughput against a minimal raw pika confirm loop, into the same queue.

    .venv/bin/python bench/bench_amqp.py [--url amqp://guest:guest@127.0.0.1:5672/]
        [--messages 50000] [--rounds 3] [--window 1000]

Declares a unique durable topic exchange and a durable classic queue bound to it (both deleted at
the end), then alternates, ``--rounds`` times each:

(a) raw: a minimal pika ``SelectConnection`` loop on the main thread, confirm mode, at most
    ``--window`` unconfirmed, handling multiple acks, ``mandatory``, with one pre-built
    ``BasicProperties`` carrying the same wire-contract properties and headers: the fastest pika
    publishes these messages here;
(b) publisher: :class:`iotpipe.amqp.ConfirmingPublisher`, fed from the main thread with
    :func:`iotpipe.amqp.telemetry_properties` built per message (as the bridge will), ``mandatory``,
    one outcome callback per message.

Every message is a persistent 265-byte body. Each figure is messages / (first publish -> last
confirm); the queue is purged between rounds so every round starts empty. Also reported: this
process's CPU time per message (the publisher's figure includes building the properties of every
message; the raw loop reuses one object), which is what the publisher takes from the bridge's
budget: on a small machine the broker, not pika, sets the wall-clock rate. Prints one JSON object
with the medians and the ratio publisher / raw, and writes it to ``bench/results/amqp.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections import OrderedDict
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pika  # type: ignore[import-untyped]
from pika.adapters.select_connection import SelectConnection  # type: ignore[import-untyped]

from iotpipe.amqp import ConfirmingPublisher, MessageProperties, Outcome, telemetry_properties
from iotpipe.settings import AmqpSettings
from iotpipe.topics import Kind

RESULTS = Path(__file__).parent / "results" / "amqp.json"
BODY_BYTES = 265


def body_for(i: int) -> bytes:
    """A JSON-ish body of exactly BODY_BYTES bytes."""
    head = f'{{"v":"1.0","id":"bench-{i:08d}","site":"s","device":"d","seq":{i},"readings":['
    return (head + " " * (BODY_BYTES - len(head) - 2) + "]}").encode()


def wire_properties(i: int) -> MessageProperties:
    """The contract's properties for message ``i``, built per message as the bridge does."""
    return telemetry_properties(
        message_id=f"bench-{i:08d}",
        version="1.0",
        site="bench",
        device="d",
        topic="iotpipe/v1/bench/d/telemetry",
        kind=Kind.TELEMETRY,
        received_at=time.time(),
    )


def raw_pika(url: str, exchange: str, routing_key: str, bodies: list[bytes], window: int) -> float:
    """The minimal confirm loop; returns msg/s."""
    wire = wire_properties(0)
    props = pika.BasicProperties(
        content_type=wire.content_type,
        delivery_mode=wire.delivery_mode,
        message_id=wire.message_id,
        timestamp=wire.timestamp,
        type=wire.type,
        app_id=wire.app_id,
        headers=dict(wire.headers or {}),
    )
    unconfirmed: OrderedDict[int, int] = OrderedDict()
    sent = confirmed = tag = 0
    started = finished = 0.0
    channel: Any = None

    def fill() -> None:
        nonlocal sent, tag
        while len(unconfirmed) < window and sent < len(bodies):
            channel.basic_publish(exchange, routing_key, bodies[sent], props, True)
            tag += 1
            unconfirmed[tag] = sent
            sent += 1

    def on_confirm(frame: Any) -> None:
        nonlocal confirmed, finished
        acked = frame.method.delivery_tag
        if frame.method.multiple:
            while unconfirmed and next(iter(unconfirmed)) <= acked:
                unconfirmed.popitem(last=False)
                confirmed += 1
        elif unconfirmed.pop(acked, None) is not None:
            confirmed += 1
        if confirmed == len(bodies):
            finished = time.perf_counter()
            connection.close()
        else:
            fill()

    def on_channel(opened: Any) -> None:
        nonlocal channel
        channel = opened

        def go(_frame: object) -> None:
            nonlocal started
            started = time.perf_counter()
            fill()

        channel.confirm_delivery(on_confirm, callback=go)

    connection = SelectConnection(
        pika.URLParameters(url),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_close_callback=lambda c, _e: c.ioloop.stop(),
    )
    connection.ioloop.start()
    if confirmed != len(bodies):
        raise RuntimeError(f"raw: only {confirmed} of {len(bodies)} confirmed")
    return len(bodies) / (finished - started)


def publisher(url: str, exchange: str, routing_key: str, bodies: list[bytes], window: int) -> float:
    """ConfirmingPublisher fed from this thread; returns msg/s."""
    outcomes: dict[Outcome, int] = dict.fromkeys(Outcome, 0)
    last = [0.0]

    def on_result(_token: object, outcome: Outcome) -> None:
        outcomes[outcome] += 1
        last[0] = time.perf_counter()

    pub = ConfirmingPublisher(AmqpSettings(url=url), on_result, window=window)
    pub.start()
    t0 = time.perf_counter()
    for i, body in enumerate(bodies):
        pub.publish(exchange, routing_key, body, wire_properties(i), i)
    if not pub.flush(120):
        raise RuntimeError(f"publisher: {pub.pending} still pending after 120 s")
    pub.close()
    if outcomes[Outcome.CONFIRMED] != len(bodies):
        raise RuntimeError(f"publisher: outcomes {outcomes}")
    if pub.peak_unconfirmed > window:
        raise RuntimeError(f"publisher: window exceeded ({pub.peak_unconfirmed})")
    return len(bodies) / (last[0] - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=1000)
    args = parser.parse_args()

    tag = uuid.uuid4().hex[:10]
    exchange, queue, routing_key = f"iotpipe-bench.{tag}", f"iotpipe-bench.{tag}", "bench.x"
    admin = pika.BlockingConnection(pika.URLParameters(args.url))
    channel = admin.channel()
    channel.exchange_declare(exchange, "topic", durable=True)
    channel.queue_declare(queue, durable=True)
    channel.queue_bind(queue, exchange, "bench.#")
    bodies = [body_for(i) for i in range(args.messages)]
    samples: dict[str, list[float]] = {"raw": [], "publisher": []}
    cpu: dict[str, list[float]] = {"raw": [], "publisher": []}
    try:
        for _ in range(args.rounds):
            for name, run in (("raw", raw_pika), ("publisher", publisher)):
                channel.queue_purge(queue)
                began = time.process_time()
                samples[name].append(run(args.url, exchange, routing_key, bodies, args.window))
                cpu[name].append((time.process_time() - began) / len(bodies) * 1e6)
    finally:
        channel.queue_delete(queue)
        channel.exchange_delete(exchange)
        admin.close()

    medians = {name: round(statistics.median(values)) for name, values in samples.items()}
    result = {
        "benchmark": "amqp_publisher",
        "messages_per_round": args.messages,
        "rounds": args.rounds,
        "body_bytes": BODY_BYTES,
        "window": args.window,
        "persistent": True,
        "queue": "durable classic, no consumer",
        "raw_pika_msg_s": medians["raw"],
        "publisher_msg_s": medians["publisher"],
        "ratio": round(medians["publisher"] / medians["raw"], 3),
        "samples_msg_s": {name: [round(v) for v in values] for name, values in samples.items()},
        "python_cpu_us_per_msg": {
            name: round(statistics.median(values), 1) for name, values in cpu.items()
        },
        "python": platform.python_version(),
        "pika": version("pika"),
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cpus",
    }
    text = json.dumps(result, indent=2)
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

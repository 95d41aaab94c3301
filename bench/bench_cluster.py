"""Publish-confirm throughput into a quorum queue: one node against a 3-node cluster, same run.

    .venv/bin/python bench/bench_cluster.py [--messages 20000] [--rounds 2] [--window 1000]

Starts a private single node and a private 3-node cluster (``tests/rabbitmq.py``; every node with
one Erlang scheduler, ``+S 1:1``, so the single node gets what each cluster node gets), declares on
each a durable topic exchange and a quorum queue bound to it (group size 1 on the single node, 3
on the cluster: every message is written by a majority, two of three nodes, before its confirm),
then alternates, ``--rounds`` times each: :class:`iotpipe.amqp.ConfirmingPublisher` (the bridge's
publisher) sends ``--messages`` persistent 265-byte messages with the wire contract's properties,
at most ``--window`` unconfirmed. Each figure is messages / (first publish -> last confirm); the
queue is purged between rounds. Prints one JSON object with the medians and the ratio cluster /
single, and writes it to ``bench/results/cluster.json``.

All four Erlang VMs share this machine's cores, so the cluster's figure is what replication costs
when the replicas compete for the same CPU: a lower bound for nodes on machines of their own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from iotpipe.amqp import ConfirmingPublisher, Outcome, telemetry_properties  # noqa: E402
from iotpipe.settings import AmqpSettings  # noqa: E402
from iotpipe.topics import Kind  # noqa: E402
from tests.rabbitmq import PrivateCluster, PrivateRabbit, blocking_channel  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "cluster.json"
BODY_BYTES = 265


def body_for(i: int) -> bytes:
    """A JSON-ish body of exactly BODY_BYTES bytes."""
    head = f'{{"v":"1.0","id":"bench-{i:08d}","site":"s","device":"d","seq":{i},"readings":['
    return (head + " " * (BODY_BYTES - len(head) - 2) + "]}").encode()


def declare(url: str, exchange: str, queue: str, group_size: int) -> None:
    """The exchange and a quorum queue of ``group_size`` replicas bound to it with ``#``."""
    with blocking_channel(url) as channel:
        channel.exchange_declare(exchange, "topic", durable=True)
        channel.queue_declare(
            queue,
            durable=True,
            arguments={"x-queue-type": "quorum", "x-quorum-initial-group-size": group_size},
        )
        channel.queue_bind(queue, exchange, "#")


def purge(url: str, queue: str) -> None:
    with blocking_channel(url) as channel:
        channel.queue_purge(queue)


def publish_round(settings: AmqpSettings, exchange: str, messages: int, window: int) -> float:
    """Messages per second from the first publish to the last confirm (all must be confirmed)."""
    done = threading.Event()
    outcomes: dict[Outcome, int] = dict.fromkeys(Outcome, 0)

    def on_result(_token: object, outcome: Outcome) -> None:
        outcomes[outcome] += 1
        if sum(outcomes.values()) == messages:
            done.set()

    publisher = ConfirmingPublisher(settings, on_result, window=window)
    publisher.start()
    try:
        began = time.perf_counter()
        for i in range(messages):
            props = telemetry_properties(
                message_id=f"bench-{i:08d}",
                version="1.0",
                site="s",
                device="d",
                topic="iotpipe/v1/s/d/telemetry",
                kind=Kind.TELEMETRY,
                received_at=time.time(),
            )
            publisher.publish(exchange, "iotpipe.v1.s.d.telemetry", body_for(i), props, i)
        if not done.wait(300):
            raise RuntimeError(f"not all confirmed in 300 s: {outcomes}")
        elapsed = time.perf_counter() - began
    finally:
        publisher.close(timeout=10)
    if outcomes[Outcome.CONFIRMED] != messages:
        raise RuntimeError(f"not all confirmed: {outcomes}")
    return messages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="messages per round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per target")
    parser.add_argument("--window", type=int, default=1000, help="unconfirmed messages at most")
    parser.add_argument("--no-save", action="store_true", help=f"do not write {RESULTS}")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        workdir = Path(tmp)
        single = PrivateRabbit(workdir / "single", schedulers=1)
        cluster = PrivateCluster(workdir / "cluster")
        try:
            single.start()
            cluster.start()
            exchange, queue = f"bench.{uuid.uuid4().hex[:8]}", f"bench.{uuid.uuid4().hex[:8]}"
            declare(single.url, exchange, queue, 1)
            declare(cluster.urls[0], exchange, queue, 3)
            targets = {
                "single": (single.url, AmqpSettings(url=single.url)),
                "cluster": (
                    cluster.urls[0],
                    AmqpSettings(url=cluster.urls[0], urls=tuple(cluster.urls[1:])),
                ),
            }
            rates: dict[str, list[float]] = {name: [] for name in targets}
            for _ in range(args.rounds):
                for name, (url, settings) in targets.items():
                    rates[name].append(
                        publish_round(settings, exchange, args.messages, args.window)
                    )
                    purge(url, queue)
        finally:
            single.kill()
            cluster.kill()

    medians = {name: statistics.median(values) for name, values in rates.items()}
    summary = {
        "bench": "cluster",
        "what": "ConfirmingPublisher -> quorum queue, messages/s first publish -> last confirm",
        "messages": args.messages,
        "rounds": args.rounds,
        "window": args.window,
        "body_bytes": BODY_BYTES,
        "single_node_msg_s": round(medians["single"]),
        "cluster_3_nodes_msg_s": round(medians["cluster"]),
        "ratio_cluster_single": round(medians["cluster"] / medians["single"], 2),
        "rounds_msg_s": {name: [round(v) for v in values] for name, values in rates.items()},
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
    }
    print(json.dumps(summary, indent=2))
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

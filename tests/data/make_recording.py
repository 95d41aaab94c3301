"""Regenerate tests/data/fleet-faults-seed7.jsonl: a simulator run with every fault, recorded.

Run from the repository root with the project's interpreter::

    .venv/bin/python tests/data/make_recording.py

It starts a private Mosquitto on a free loopback port (unlimited queues, so nothing is dropped),
starts ``iotpipe record`` on ``iotpipe/#``, runs ``iotpipe simulate`` with a fixed seed, start
time and fault mix, waits until the recorder has every message the simulator reported
(telemetry publishes plus retained status messages), stops the recorder with SIGTERM and moves
the file into place. It then prints the properties the tests assert (see tests/data/README.md).

The content is determined by the seed and start time; the arrival order across the devices'
connections and the time offsets vary a little from run to run.
"""

from __future__ import annotations

import collections
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from iotpipe.envelope import Rejection, decode
from iotpipe.recording import read_recording

HERE = Path(__file__).resolve().parent
TARGET = HERE / "fleet-faults-seed7.jsonl"
IOTPIPE = [sys.executable, "-c", "from iotpipe.cli import main; main()"]

#: The exact simulator command line (after ``iotpipe simulate --mqtt URL``).
SIMULATE = [
    "--seed", "7",
    "--sites", "2",
    "--devices", "3",
    "--start", "2026-11-01T00:00:00Z",
    "--rate", "5",
    "--count", "200",
    "--fault", "duplicate=0.04",
    "--fault", "reorder=0.04",
    "--fault", "malformed=0.04",
    "--fault", "schema=0.04",
    "--fault", "oversize=0.01",
    "--fault", "mismatch=0.03",
    "--fault", "skew=0.03",
    "--fault", "offline=0.02",
    "--json",
    "--no-progress",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            sys.exit(f"make_recording: timed out waiting for {what}")
        time.sleep(0.05)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def describe(path: Path) -> dict[str, object]:
    """The properties of a recording that tests/iotpipe/test_recording_data.py asserts."""
    _header, messages = read_recording(path, allow_truncated=False)
    kinds: collections.Counter[str] = collections.Counter()
    rejected: collections.Counter[str] = collections.Counter()
    ids: collections.Counter[str] = collections.Counter()
    for message in messages:
        kinds[message.topic.rsplit("/", 1)[-1]] += 1
        result = decode(message.topic, message.payload)
        if isinstance(result, Rejection):
            rejected[result.reason.value] += 1
        elif hasattr(result, "id"):
            ids[result.id] += 1
    return {
        "messages": len(messages),
        "by_kind": dict(sorted(kinds.items())),
        "retained": sum(m.retain for m in messages),
        "rejected": dict(sorted(rejected.items())),
        "valid_telemetry": sum(ids.values()),
        "distinct_ids": len(ids),
        "base64_payloads": sum(1 for m in messages if not _is_utf8(m.payload)),
        "bytes": path.stat().st_size,
    }


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def main() -> None:
    if shutil.which("mosquitto") is None:
        sys.exit("make_recording: needs the mosquitto binary (apt-get install mosquitto)")
    with tempfile.TemporaryDirectory(prefix="iotpipe-rec-") as tmp:
        work = Path(tmp)
        port = free_port()
        url = f"mqtt://127.0.0.1:{port}"
        conf = work / "mosquitto.conf"
        conf.write_text(
            f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\n"
            "persistence false\n"
        )
        broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
        recorder: subprocess.Popen[str] | None = None
        try:
            wait_until(lambda: port_open(port), 10, "mosquitto")
            out = work / TARGET.name
            recorder = subprocess.Popen(
                [*IOTPIPE, "record", "--mqtt", url, "--topic", "iotpipe/#", "--out", str(out)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert recorder.stderr is not None
            ready = recorder.stderr.readline()
            if "Ctrl-C to stop" not in ready:
                sys.exit(f"make_recording: recorder did not start: {ready}{recorder.stderr.read()}")
            sim = subprocess.run(
                [*IOTPIPE, "simulate", "--mqtt", url, *SIMULATE],
                capture_output=True,
                text=True,
                check=False,
            )
            if sim.returncode != 0:
                sys.exit(f"make_recording: simulate failed ({sim.returncode}): {sim.stderr}")
            summary = json.loads(sim.stdout)
            expected = int(summary["published"]) + int(summary["status"])
            wait_until(
                lambda: len(read_recording(out)[1]) >= expected, 30, f"{expected} recorded messages"
            )
            recorder.send_signal(signal.SIGTERM)
            said, _ = recorder.communicate(timeout=30)
            print(said.strip(), file=sys.stderr)
            if recorder.returncode != 0:
                sys.exit(f"make_recording: recorder exited {recorder.returncode}")
            shutil.move(out, TARGET)
        finally:
            if recorder is not None and recorder.poll() is None:
                recorder.kill()
            broker.terminate()
            broker.wait(timeout=10)
    print(json.dumps({"simulate": summary, "recording": describe(TARGET)}, indent=2))


if __name__ == "__main__":
    main()

"""``iotpipe broker`` end to end: the real command line in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest

from bridge.broker import BrokerThread, PasswordFile
from iotpipe.mqtt import Message, pump_until
from tests.bridge.conftest import client
from tests.conftest import IOTPIPE, free_port, wait_for, wait_port


def _env() -> dict[str, str]:
    """The environment without IOTPIPE_* settings, so only the test's flags count."""
    return {key: value for key, value in os.environ.items() if not key.startswith("IOTPIPE_")}


def _run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IOTPIPE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        check=False,
    )


@pytest.mark.mqtt
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_broker_serves_until_a_signal_then_exits_0(
    tmp_path: Path, unique: str, stop_signal: signal.Signals
) -> None:
    """`iotpipe broker --port P` prints where it listens, relays messages, and exits 0 on SIGTERM/SIGINT."""
    port = free_port()
    proc = subprocess.Popen(
        [*IOTPIPE, "broker", "--port", str(port), "--http-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        wait_port(port, timeout=30)
        assert proc.stdout is not None
        startup = proc.stdout.readline()
        assert f"listening on mqtt://127.0.0.1:{port}" in startup

        got: list[Message] = []
        sub = client(port, client_id=f"sub-{unique}", on_message=got.append)
        sub.connect()
        sub.subscribe([(f"iotpipe/v1/{unique}/dev/telemetry", 1)])
        pub = client(port, client_id=f"pub-{unique}")
        pub.connect()
        pub.publish(f"iotpipe/v1/{unique}/dev/telemetry", b"hello", qos=1)
        assert pub.flush(timeout=10)
        assert pump_until(sub, lambda: len(got) >= 1, timeout=10)
        assert got[0].payload == b"hello"
        pub.disconnect()  # the subscriber stays connected: shutdown must cope with live clients

        proc.send_signal(stop_signal)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "iotpipe broker stopped" in out
    assert "Traceback" not in err


@pytest.mark.mqtt
def test_drops_show_on_metrics_and_in_the_stop_line(unique: str) -> None:
    """A persistent session's overflowing queue: drops by reason on GET /metrics and when it stops."""
    port, http_port = free_port(), free_port()
    env = _env() | {"IOTPIPE_BROKER__MAX_QUEUED_MESSAGES": "3"}
    proc = subprocess.Popen(
        [*IOTPIPE, "broker", "--port", str(port), "--http-port", str(http_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        wait_port(port, timeout=30)
        assert proc.stdout is not None
        startup = proc.stdout.readline()
        assert startup.rstrip().endswith(f"; http://127.0.0.1:{http_port}/metrics"), startup
        topic = f"t/{unique}"
        sub = client(port, client_id=f"away-{unique}", clean_session=False)
        sub.connect()
        sub.subscribe([(topic, 1)])
        sub.disconnect()
        pub = client(port, client_id=f"pub-{unique}")
        pub.connect()
        for i in range(5):
            pub.publish(topic, str(i).encode(), qos=1)
        assert pub.flush(timeout=10)
        pub.disconnect()
        dropped = 'iotpipe_broker_dropped_messages_total{reason="queue_full"} 2.0'

        def scraped() -> str | None:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics") as response:
                body: str = response.read().decode()
            return body if dropped in body else None

        body = wait_for(scraped, what="2 drops on /metrics")
        assert "iotpipe_broker_queued_messages 3.0" in body
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert (
        "iotpipe broker stopped (refused connections 0, denied publishes 0, "
        "dropped 2 (queue_full 2))"
    ) in out
    assert "broker messages dropped reason=queue_full" in err


@pytest.mark.mqtt
def test_busy_port_is_one_error_line_and_exit_2(embedded_broker: BrokerThread) -> None:
    """A port already in use ends with one `iotpipe: error:` line naming broker.port, exit code 2."""
    result = _run("broker", "--port", str(embedded_broker.settings.port), "--http-port", "0")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"iotpipe: error: invalid setting broker.port={embedded_broker.settings.port}"
    )
    assert "already in use" in lines[0]


def test_acl_without_password_file_is_one_error_line(tmp_path: Path) -> None:
    """--acl-file without --password-file is refused before anything starts, in one line."""
    acl = tmp_path / "acl.toml"
    acl.write_text("")
    result = _run("broker", "--acl-file", str(acl))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"iotpipe: error: invalid setting broker.acl_file={str(acl)!r}: "
        "needs password_file too: without authentication a username is a claim"
    ]


def test_add_user_reads_the_password_from_stdin(tmp_path: Path) -> None:
    """--add-user writes the user with the password piped on stdin, and a second call changes it."""
    passwords = tmp_path / "passwd"
    added = _run(
        "broker", "--add-user", "home/pi", "--password-file", str(passwords), stdin="s3cret\n"
    )
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == f"added user home/pi in {passwords}"
    assert PasswordFile(passwords).verify("home/pi", "s3cret")
    changed = _run(
        "broker", "--add-user", "home/pi", "--password-file", str(passwords), stdin="other\n"
    )
    assert changed.returncode == 0, changed.stderr
    assert changed.stdout.strip() == f"changed the password of home/pi in {passwords}"
    assert PasswordFile(passwords).verify("home/pi", "other")


def test_add_user_needs_a_password_file() -> None:
    """--add-user without a password file says which option is missing and exits 2."""
    result = _run("broker", "--add-user", "home/pi", stdin="pw\n")
    assert result.returncode == 2
    assert "--add-user needs --password-file" in result.stderr


def test_help_shows_examples() -> None:
    """`iotpipe broker --help` lists the options with their defaults and worked examples."""
    result = _run("broker", "--help")
    assert result.returncode == 0
    for text in (
        "Examples",
        "--add-user",
        "--password-file",
        "--acl-file",
        "[default: 127.0.0.1]",
        "[default: 1883]",
    ):
        assert text in result.stdout, text

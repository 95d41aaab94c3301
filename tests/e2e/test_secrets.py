"""Secrets stay secret: the real broker, bridge, consumer and simulator run with passwords of
their own, and no log line, HTTP body, ``iotpipe status`` output or command line shows one.

A private RabbitMQ (its own user and password; the shared one is never reconfigured) and an
``iotpipe broker`` with a password file. The passwords come from config files and environment
variables, as docs/guarantees.md recommends; a password given in a URL flag gets a warning.
"""

from __future__ import annotations

import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for, wait_port
from tests.e2e.conftest import IOTPIPE, Services, count_rows
from tests.rabbitmq import PrivateRabbit

pytestmark = [pytest.mark.rabbitmq, pytest.mark.mqtt, pytest.mark.slow]

ENVELOPES = 20


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real ``iotpipe`` command line, output captured."""
    return subprocess.run(
        [*IOTPIPE, *args], capture_output=True, text=True, timeout=60, check=False, env=env
    )


def _env(**settings: str) -> dict[str, str]:
    """This environment without IOTPIPE_* settings, plus ``settings``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IOTPIPE_")}
    return clean | settings


def _http(port: int, path: str) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as err:  # 503 still carries the JSON
        return str(err.read().decode())


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_no_password_shows_in_logs_http_status_or_command_lines(
    private_rabbit: PrivateRabbit, services: Services, tmp_path: Path, unique: str
) -> None:
    """Distinctive passwords for MQTT and AMQP: zero hits in every output of every component."""
    mqtt_pw, amqp_pw, wrong_pw = (f"{what}-S3cr3t-{unique}" for what in ("mq", "am", "wrong"))
    secrets = (mqtt_pw, amqp_pw, wrong_pw)
    private_rabbit.ctl("add_user", "iot", amqp_pw)
    private_rabbit.ctl("set_permissions", "-p", "/", "iot", ".*", ".*", ".*")
    amqp_url = f"amqp://iot:{amqp_pw}@127.0.0.1:{private_rabbit.port}/"

    passwd = tmp_path / "broker-passwd"
    for user in ("bridge", f"{unique}/sim-1"):
        added = subprocess.run(
            [*IOTPIPE, "broker", "--add-user", user, "--password-file", str(passwd)],
            input=f"{mqtt_pw}\n",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert added.returncode == 0, added.stderr
    mqtt_port, broker_http = free_port(), free_port()
    broker = services.spawn(
        "broker",
        [
            *IOTPIPE,
            "broker",
            "--port",
            str(mqtt_port),
            "--password-file",
            str(passwd),
            "--http-port",
            str(broker_http),
            "--state-file",
            str(tmp_path / "broker-state.db"),
        ],
    )
    wait_port(mqtt_port, timeout=30)

    bridge = services.bridge(
        "bridge",
        mqtt_url=f"mqtt://bridge:{mqtt_pw}@127.0.0.1:{mqtt_port}",
        amqp_url=amqp_url,
        client_id=f"bridge-{unique}",
    ).start()
    db = tmp_path / "telemetry.db"
    consumer = services.consumer(
        "consumer",
        amqp_url=amqp_url,
        store=f"sqlite:///{db}",
        queue="iotpipe.store",
        bindings=["iotpipe.v1.#"],
    ).start()
    bridge.wait_ready()
    consumer.wait_ready()

    simulated = subprocess.run(
        [*IOTPIPE, "simulate", "--sites", "1", "--devices", "1", "--site-pattern", unique,
         "--device-pattern", "sim-{n}", "--count", str(ENVELOPES), "--rate", "max",
         "--receipts", "off", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=_env(IOTPIPE_MQTT__URL=f"mqtt://{unique}%2Fsim-1:{mqtt_pw}@127.0.0.1:{mqtt_port}"),
    )  # fmt: skip
    assert simulated.returncode == 0, simulated.stderr
    wait_for(lambda: db.is_file() and count_rows(db, "readings") >= ENVELOPES, 60, "stored")

    # A wrong password: refused, and the refusal does not repeat it.
    refused = _run(
        "watch",
        "--duration",
        "1",
        env=_env(IOTPIPE_MQTT__URL=f"mqtt://bridge:{wrong_pw}@127.0.0.1:{mqtt_port}"),
    )
    assert refused.returncode != 0
    assert "not authorized" in refused.stderr or "refused" in refused.stderr, refused.stderr

    status = _run(
        "status",
        "--broker",
        f"http://127.0.0.1:{broker_http}",
        "--bridge",
        f"http://127.0.0.1:{bridge.http_port}",
        "--consumer",
        f"http://127.0.0.1:{consumer.http_port}",
    )
    status_json = _run("status", "--json", "--bridge", f"http://127.0.0.1:{bridge.http_port}")
    command_lines = [_cmdline(p.pid) for p in (broker,) if p.poll() is None]
    command_lines += [_cmdline(s.proc.pid) for s in (bridge, consumer) if s.proc is not None]
    outputs = {
        "status": status.stdout + status.stderr,
        "status --json": status_json.stdout + status_json.stderr,
        "simulate": simulated.stdout + simulated.stderr,
        "watch (wrong password)": refused.stdout + refused.stderr,
        "command lines": "\n".join(command_lines),
    }
    for name, port in (
        ("broker", broker_http),
        ("bridge", bridge.http_port),
        ("consumer", consumer.http_port),
    ):
        outputs[f"{name} /metrics"] = _http(port, "/metrics")
        outputs[f"{name} /healthz"] = _http(port, "/healthz")
    bridge.terminate()
    consumer.terminate()
    broker.terminate()
    broker.wait(timeout=30)
    for log in tmp_path.glob("*.log"):
        outputs[log.name] = log.read_text(errors="replace")
    assert "bridge" in outputs["status"]
    assert "iotpipe_bridge" in outputs["bridge /metrics"]
    assert "bridge" in outputs["command lines"]
    leaks = [
        (name, secret) for name, text in outputs.items() for secret in secrets if secret in text
    ]
    assert leaks == [], leaks


def test_a_password_in_a_url_flag_gets_one_warning_and_the_environment_none() -> None:
    """--mqtt with a password warns once (``ps`` shows it); the same URL in the environment does not."""
    url = "mqtt://u:flag-S3cr3t@127.0.0.1:1"
    flagged = _run("watch", "--mqtt", url, "--duration", "1", env=_env())
    warnings = [line for line in flagged.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, flagged.stderr
    assert "IOTPIPE_MQTT__URL" in warnings[0]
    assert "flag-S3cr3t" not in flagged.stderr
    quiet = _run("watch", "--duration", "1", env=_env(IOTPIPE_MQTT__URL=url))
    assert quiet.returncode == flagged.returncode != 0
    assert "warning:" not in quiet.stderr
    no_password = _run("watch", "--mqtt", "mqtt://u@127.0.0.1:1", "--duration", "1", env=_env())
    assert "warning:" not in no_password.stderr
    public = _run("watch", "--mqtt", "mqtt://guest:guest@127.0.0.1:1", "--duration", "1")
    assert "warning:" not in public.stderr  # RabbitMQ's default login is no secret

"""TLS on every link, with a CA made in the test (tests/tlsca.py) and private servers.

Links: device -> Mosquitto (mqtts, client certificates required) and -> the embedded broker
(mqtts listener); bridge and consumer -> RabbitMQ (amqps); consumer -> VictoriaMetrics (https).
Verification is on by default: a wrong CA, an expired certificate and one for another host
each stop ``iotpipe simulate`` / ``bridge`` / ``consume`` with one line naming the link, exit 2.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from bridge.broker import BrokerThread
from bridge.settings import BrokerSettings
from consumers.query import store_stats
from iotpipe.connection import MqttSettings, TlsSettings
from iotpipe.errors import CertificateError, ConnectError
from iotpipe.mqtt import MqttClient, pump_until
from tests.conftest import MosquittoProcess, free_port, wait_for
from tests.e2e.conftest import IOTPIPE, Services, _env, write_config
from tests.e2e.simulation import Simulator
from tests.rabbitmq import PrivateRabbit, rabbitmq_bin
from tests.tlsca import ServerTls, TestCa
from tests.victoria import Victoria

pytestmark = [pytest.mark.mqtt, pytest.mark.mosquitto, pytest.mark.rabbitmq, pytest.mark.tsdb]

#: The server certificates a failure test presents, and what the client's TLS library says.
PROBLEMS = {
    "wrong_ca": r"unable to get local issuer certificate|self.signed certificate in certificate chain",
    "expired": r"certificate has expired",
    "wrong_host": r"(Hostname|IP address) mismatch",
}


def mosquitto_tls_config(port: int, tls: ServerTls) -> str:
    """A second Mosquitto listener on ``port`` speaking TLS and requiring a client certificate."""
    return (
        f"listener {port} 127.0.0.1\n"
        f"cafile {tls.ca}\ncertfile {tls.cert}\nkeyfile {tls.key}\n"
        "require_certificate true\n"
    )


class TlsServers:
    """Private servers with a TLS listener, started on first use and stopped at the end.

    Each kind (``mosquitto``, ``rabbitmq``, ``victoria``) runs once per server certificate
    (``server``, ``expired``, ``wrong_host``); :meth:`url` gives the client's URL.
    """

    def __init__(self, ca: TestCa, workdir: Path) -> None:
        self.ca = ca
        self.workdir = workdir
        self._urls: dict[tuple[str, str], str] = {}
        self._stops: list[Callable[[], None]] = []

    def url(self, kind: str, cert: str = "server") -> str:
        """``mqtts://``, ``amqps://`` or ``influxdbs://`` of ``kind`` presenting ``cert``."""
        if (kind, cert) not in self._urls:
            start = getattr(self, f"_start_{kind}")
            self._urls[kind, cert] = start(self.ca.serving(cert), self.workdir / f"{kind}-{cert}")
        return self._urls[kind, cert]

    def _start_mosquitto(self, tls: ServerTls, workdir: Path) -> str:
        if shutil.which("mosquitto") is None:
            pytest.fail("mosquitto is not installed: run `make setup`", pytrace=False)
        tls_port = free_port()
        process = MosquittoProcess(workdir, free_port(), mosquitto_tls_config(tls_port, tls))
        process.start()
        self._stops.append(process.stop)
        return f"mqtts://127.0.0.1:{tls_port}"

    def _start_rabbitmq(self, tls: ServerTls, workdir: Path) -> str:
        if rabbitmq_bin() is None:
            pytest.fail("rabbitmq-server is not installed: run `make setup`", pytrace=False)
        node = PrivateRabbit(workdir, tls=tls)
        self._stops.append(node.kill)
        node.start()
        self.rabbit = node
        return node.tls_url

    def _start_victoria(self, tls: ServerTls, workdir: Path) -> str:
        workdir.mkdir(parents=True)
        server = Victoria(workdir, tls=tls)
        self._stops.append(server.stop)
        server.start()
        self.victoria = server
        return f"influxdbs://127.0.0.1:{server.port}"

    def stop(self) -> None:
        for stop in reversed(self._stops):
            stop()


@pytest.fixture(scope="module")
def servers(tls_ca: TestCa, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServers]:
    """The module's private TLS servers (see :class:`TlsServers`)."""
    started = TlsServers(tls_ca, tmp_path_factory.mktemp("tls-servers"))
    try:
        yield started
    finally:
        started.stop()


def client_tls(ca: TestCa, trust: Path | None = None) -> dict[str, str]:
    """A ``[*.tls]`` section trusting ``trust`` (default: the test CA), with the client pair."""
    return {
        "ca_file": str(trust or ca.ca),
        "cert_file": str(ca.client.cert),
        "key_file": str(ca.client.key),
    }


def client_settings(ca: TestCa, *, insecure: bool = False) -> TlsSettings:
    """:func:`client_tls` as settings: the test CA and the client pair."""
    return TlsSettings(
        ca_file=ca.ca, cert_file=ca.client.cert, key_file=ca.client.key, insecure=insecure
    )


def roundtrip(url: str, tls: TlsSettings, topic: str) -> bytes:
    """Subscribe to ``topic`` over ``url``, publish to it, and return what came back."""
    got: list[bytes] = []
    client = MqttClient(
        MqttSettings(url=url, tls=tls), on_message=lambda message: got.append(message.payload)
    )
    client.connect()
    try:
        client.subscribe([(topic, 1)])
        client.publish(topic, b"over tls", qos=1)
        assert pump_until(client, lambda: bool(got), 10), f"nothing came back over {url}"
    finally:
        client.disconnect()
    return got[0]


# -- the links, working --------------------------------------------------------------------------


def test_mosquitto_takes_mqtts_with_a_client_certificate_and_refuses_it_without(
    servers: TlsServers, tls_ca: TestCa, unique: str
) -> None:
    """Mutual TLS to Mosquitto (require_certificate): with the client pair a message goes round;
    without it the handshake is refused (a connect error, not a certificate one)."""
    url = servers.url("mosquitto")
    assert roundtrip(url, client_settings(tls_ca), f"tls/{unique}") == b"over tls"
    bare = MqttClient(MqttSettings(url=url, tls=TlsSettings(ca_file=tls_ca.ca)))
    with pytest.raises(ConnectError) as refused:
        bare.connect(timeout=5)
    assert not isinstance(refused.value, CertificateError), refused.value


def test_insecure_is_the_only_way_past_a_bad_certificate(
    servers: TlsServers, tls_ca: TestCa, unique: str
) -> None:
    """The expired server refuses a default client; with insecure = true a message goes round."""
    url = servers.url("mosquitto", "expired")
    verified = MqttClient(MqttSettings(url=url, tls=client_settings(tls_ca)))
    with pytest.raises(CertificateError, match="certificate has expired"):
        verified.connect(timeout=5)
    insecure = client_settings(tls_ca, insecure=True)
    assert roundtrip(url, insecure, f"tls/{unique}") == b"over tls"


def test_embedded_broker_serves_mqtts_next_to_mqtt(tls_ca: TestCa, unique: str) -> None:
    """``iotpipe broker`` with tls_port: a message goes round over mqtts://, verified by the CA."""
    settings = BrokerSettings(
        port=free_port(),
        tls_port=free_port(),
        tls_cert_file=tls_ca.server.cert,
        tls_key_file=tls_ca.server.key,
        http_port=0,
    )
    runner = BrokerThread(settings).start()
    try:
        url = f"mqtts://127.0.0.1:{settings.tls_port}"
        assert roundtrip(url, TlsSettings(ca_file=tls_ca.ca), f"tls/{unique}") == b"over tls"
        expired = MqttClient(MqttSettings(url=url, tls=TlsSettings(ca_file=tls_ca.wrong_ca)))
        with pytest.raises(CertificateError, match=r"^mqtt \(.*unable to get local issuer"):
            expired.connect(timeout=5)
    finally:
        runner.stop()


@pytest.mark.slow
def test_simulated_devices_publish_over_mqtts_to_an_iotpipe_broker_process(
    tls_ca: TestCa, services: Services, tmp_path: Path
) -> None:
    """``iotpipe broker --tls-port ... --tls-cert ... --tls-key ...`` says it listens on mqtts://,
    and ``iotpipe simulate`` over it gets every QoS 1 message acknowledged."""
    port, tls_port = free_port(), free_port()
    broker = services.spawn(
        "broker",
        [*IOTPIPE, "broker", "--port", str(port), "--http-port", "0", "--tls-port", str(tls_port),
         "--tls-cert", str(tls_ca.server.cert), "--tls-key", str(tls_ca.server.key)],
    )  # fmt: skip
    log = tmp_path / "broker.log"
    wait_for(lambda: "listening on" in log.read_text(), 30, "iotpipe broker to listen")
    assert f"mqtt://127.0.0.1:{port} and mqtts://127.0.0.1:{tls_port}" in log.read_text()
    url = f"mqtts://127.0.0.1:{tls_port}"
    config = write_config(
        tmp_path / "simulate.toml", {"mqtt": {"url": url}, "mqtt.tls": {"ca_file": str(tls_ca.ca)}}
    )
    summary = (
        Simulator(
            tmp_path,
            [
                "--config",
                str(config),
                "--devices",
                "2",
                "--count",
                "40",
                "--rate",
                "20",
                "--qos",
                "1",
            ],
        )
        .start()
        .finish(timeout=60)
    )
    assert summary["messages"] == 40, summary
    sent = summary["published"] + summary["status"]  # telemetry and the retained status messages
    assert (summary["acknowledged"], summary["unacknowledged"]) == (sent, 0), summary
    broker.terminate()
    assert broker.wait(timeout=30) == 0


@pytest.mark.slow
def test_telemetry_over_mqtts_amqps_and_https_is_stored_once_each(
    servers: TlsServers, tls_ca: TestCa, services: Services, tmp_path: Path, unique: str
) -> None:
    """simulate -> Mosquitto (mqtts, client certificates) -> bridge -> RabbitMQ (amqps, client
    certificates) -> consumer -> VictoriaMetrics (https): every envelope is stored, each reading
    once."""
    mqtt_url, amqp_url = servers.url("mosquitto"), servers.url("rabbitmq")
    store = servers.url("victoria")
    tls = client_tls(tls_ca)
    state = tmp_path / "state.db"
    consumer = services.consumer(
        "consumer",
        amqp_url=amqp_url,
        store=store,
        queue=f"tls.{unique}",
        bindings=["iotpipe.v1.#"],
        state_path=state,
        sections={
            "amqp.tls": tls,
            "influxdb.tls": {"ca_file": str(tls_ca.ca)},
        },
    ).start()
    consumer.wait_ready()
    bridge = services.bridge(
        "bridge",
        mqtt_url=mqtt_url,
        amqp_url=amqp_url,
        client_id=f"bridge-{unique}",
        sections={"mqtt.tls": tls, "amqp.tls": tls},
    ).start()
    bridge.wait_ready()
    wait_for(bridge.settled, 30, "the bridge to reach RabbitMQ over amqps")
    listed = servers.rabbit.ctl("list_connections", "ssl", "peer_cert_subject").stdout
    rows = listed.splitlines()[2:]  # after "Listing connections ..." and the column names
    # The bridge (publisher, receipt relay) and the consumer, each with the client certificate.
    assert len(rows) >= 2, listed
    assert set(rows) == {"true\tCN=iotpipe-client"}, listed
    config = write_config(tmp_path / "simulate.toml", {"mqtt": {"url": mqtt_url}, "mqtt.tls": tls})
    sites = f"tls{unique}-{{n}}"
    summary = Simulator(
        tmp_path,
        ["--config", str(config), "--sites", "2", "--devices", "3", "--site-pattern", sites,
         "--count", "300", "--rate", "50", "--speed", "100", "--qos", "1", "--no-status"],
    ).start().finish(timeout=120)  # fmt: skip
    assert summary["messages"] == 300, summary

    def stored() -> bool:
        return state.is_file() and store_stats(state).messages >= summary["messages"]

    wait_for(stored, 60, "every envelope to be stored over https")
    stats = store_stats(state)
    assert (stats.messages, stats.duplicates) == (300, 0)
    selector = f'{{__name__=~"telemetry_.*",site=~"tls{unique}-.*"}}'

    def samples() -> int:
        return sum(len(s.values) for s in servers.victoria.export(selector))

    # Written points become searchable a moment after the write was acknowledged.
    wait_for(lambda: samples() >= summary["readings"], 30, "every reading to be searchable")
    counts = servers.victoria.sample_counts(selector)
    assert (sum(counts.values()), max(counts.values())) == (summary["readings"], 1), summary
    assert bridge.terminate() == 0, services.logs()
    assert consumer.terminate() == 0, services.logs()


# -- the links, refusing a bad certificate ---------------------------------------------------------


def _failing_config(
    link: str, servers: TlsServers, ca: TestCa, cert: str, trust: Path, workdir: Path
) -> tuple[list[str], str]:
    """The command line of ``link``'s client against a server presenting ``cert``, and the URL."""
    tls = client_tls(ca, trust)
    if link == "mqtt simulate":
        url = servers.url("mosquitto", cert)
        config = write_config(workdir / "c.toml", {"mqtt": {"url": url}, "mqtt.tls": tls})
        return ["simulate", "--config", str(config), "--count", "1", "--no-progress"], url
    if link == "influxdb consume":
        influx = servers.url("victoria", cert)
        consume = {"store": influx, "http_port": 0, "state_path": str(workdir / "state.db")}
        sections: dict[str, Mapping[str, object]] = {
            "consume": consume,
            "influxdb.tls": {"ca_file": tls["ca_file"]},
        }
        config = write_config(workdir / "c.toml", sections)
        return ["consume", "--config", str(config)], influx.replace("influxdbs://", "https://")
    url = servers.url("rabbitmq", cert)
    shown = url.replace("guest:guest@", "guest@")  # the password never shows
    amqp: dict[str, Mapping[str, object]] = {
        "amqp": {"url": url},
        "amqp.tls": {"ca_file": tls["ca_file"]},
    }
    if link == "amqp bridge":
        bridge = {"spool_path": str(workdir / "spool.db"), "http_port": 0}
        config = write_config(workdir / "c.toml", amqp | {"bridge": bridge})
        return ["bridge", "--config", str(config)], shown
    store = {"store": str(workdir / "t.db"), "http_port": 0}
    config = write_config(workdir / "c.toml", amqp | {"consume": store})
    return ["consume", "--config", str(config)], shown


@pytest.mark.slow
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize(
    "link", ["mqtt simulate", "amqp bridge", "amqp consume", "influxdb consume"]
)
def test_a_bad_server_certificate_stops_the_command_with_one_line(
    link: str, problem: str, servers: TlsServers, tls_ca: TestCa, tmp_path: Path
) -> None:
    """Wrong CA, expired, wrong host: exit 2, one `iotpipe: error:` line naming the link and the
    URL with the TLS library's reason, no traceback, and no retrying."""
    cert = "server" if problem == "wrong_ca" else problem
    trust = tls_ca.wrong_ca if problem == "wrong_ca" else tls_ca.ca
    args, url = _failing_config(link, servers, tls_ca, cert, trust, tmp_path)
    done = subprocess.run(
        [*IOTPIPE, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=_env(),
        cwd=tmp_path,
    )
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert len(errors) == 1, done.stderr
    name = link.split(maxsplit=1)[0]
    pattern = rf"iotpipe: error: {name} \({re.escape(url)}\): TLS certificate verify failed: "
    assert re.fullmatch(pattern + rf".*({PROBLEMS[problem]}).*", errors[0]), errors[0]

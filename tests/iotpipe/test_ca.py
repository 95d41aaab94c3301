"""``iotpipe ca``: a local CA whose certificates openssl verifies and a private Mosquitto accepts,
a device's client certificate making its identity (CN) the user name the ACL sees."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509  # the test reads what iotpipe/ca.py wrote
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from iotpipe.ca import issue_client
from iotpipe.cli import app
from iotpipe.errors import ConfigError, ConnectError, IotpipeError
from iotpipe.mqtt import Message, MqttClient, pump_until
from iotpipe.settings import MqttSettings, TlsSettings
from tests.conftest import MosquittoProcess, free_port, wait_port

REPO = Path(__file__).resolve().parents[2]


def iotpipe(*args: str | Path) -> str:
    """Run ``iotpipe ARGS`` in-process; return its output (failing the test if it failed)."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def ca(tmp_path: Path) -> Path:
    """A fresh CA directory, made by ``iotpipe ca init``."""
    directory = tmp_path / "ca"
    output = iotpipe("ca", "init", directory)
    assert "ca.crt (public)" in output
    return directory


def test_issued_certificates_chain_to_the_ca(ca: Path) -> None:
    """Client and server certificates verify against ca.crt (openssl) with the right names and uses."""
    assert stat.S_IMODE(os.stat(ca / "ca.key").st_mode) == 0o600
    iotpipe("ca", "issue", ca, "--client", "home/pi-kitchen")
    iotpipe("ca", "issue", ca, "--server", "gateway.local", "--server", "127.0.0.1")
    client, server = ca / "issued" / "home.pi-kitchen.crt", ca / "issued" / "gateway.local.crt"
    for cert in (client, server):
        result = subprocess.run(
            ["openssl", "verify", "-CAfile", str(ca / "ca.crt"), str(cert)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        assert stat.S_IMODE(os.stat(cert.with_suffix(".key")).st_mode) == 0o600
    parsed = x509.load_pem_x509_certificate(client.read_bytes())
    cn = parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "home/pi-kitchen"
    eku = parsed.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    names = x509.load_pem_x509_certificate(server.read_bytes()).extensions
    san = names.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gateway.local"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]


def test_mistakes_are_config_errors(ca: Path, tmp_path: Path) -> None:
    """A second init, a directory without a CA, neither or both kinds: one ConfigError each."""
    before = (ca / "ca.key").read_bytes()
    runner = CliRunner()
    for args in (
        ["ca", "init", str(ca)],
        ["ca", "issue", str(ca)],
        ["ca", "issue", str(ca), "--client", "home/pi", "--server", "gw"],
    ):
        result = runner.invoke(app, args)
        assert isinstance(result.exception, ConfigError), result.output
    assert (ca / "ca.key").read_bytes() == before
    with pytest.raises(IotpipeError, match="iotpipe ca init"):
        issue_client(tmp_path / "nothing", "home/pi")


@pytest.mark.mqtt
@pytest.mark.mosquitto
def test_mosquitto_takes_the_device_identity_from_its_certificate(
    ca: Path, tmp_path: Path, unique: str
) -> None:
    """Over TLS with require_certificate and use_identity_as_username, a device's certificate logs
    it in as {site}/{device}, which the ACL lets publish under its own topics; no certificate, no
    connection."""
    iotpipe("ca", "issue", ca, "--server", "127.0.0.1")
    for name in (f"{unique}/pi-1", "bridge"):
        iotpipe("ca", "issue", ca, "--client", name)
    issued = ca / "issued"
    tls_port = free_port()
    mosquitto = MosquittoProcess(
        tmp_path / "mosquitto", free_port(),
        f"acl_file {REPO / 'configs' / 'mosquitto' / 'acl'}\n"
        f"listener {tls_port} 127.0.0.1\ncafile {ca / 'ca.crt'}\n"
        f"certfile {issued / '127.0.0.1.crt'}\nkeyfile {issued / '127.0.0.1.key'}\n"
        "require_certificate true\nuse_identity_as_username true\n",
    )  # fmt: skip
    mosquitto.start()
    wait_port(tls_port)

    def tls_client(stem: str | None, **kwargs: object) -> MqttClient:
        cert = {"cert_file": issued / f"{stem}.crt", "key_file": issued / f"{stem}.key"}
        tls = TlsSettings(ca_file=ca / "ca.crt", **(cert if stem else {}))
        url = f"mqtts://127.0.0.1:{tls_port}"
        return MqttClient(MqttSettings(url=url, tls=tls, client_id=f"{stem}-{unique}"), **kwargs)  # type: ignore[arg-type]

    try:
        got: list[Message] = []
        bridge = tls_client("bridge", on_message=got.append)
        bridge.connect()
        bridge.subscribe([(f"iotpipe/v1/{unique}/#", 1)])
        device = tls_client(f"{unique}.pi-1")
        device.connect()
        # Allowed only as user {unique}/pi-1 (ACL: pattern write iotpipe/v1/%u/#): the CN is it.
        device.publish(f"iotpipe/v1/{unique}/pi-1/telemetry", b"own")
        assert device.flush(timeout=10)
        assert pump_until(bridge, lambda: len(got) >= 1, timeout=10)
        assert [(m.topic, m.payload) for m in got] == [
            (f"iotpipe/v1/{unique}/pi-1/telemetry", b"own")
        ]
        with pytest.raises(ConnectError):
            tls_client(None).connect(timeout=5)
        device.disconnect()
        bridge.disconnect()
    finally:
        mosquitto.stop()

"""The client TLS context every link uses, and how a refused certificate is recognised in what
each client library raises (iotpipe.connection: tls_context, certificate_problem)."""

from __future__ import annotations

import ssl

import pytest

from iotpipe.connection import TlsSettings, certificate_problem, tls_context
from iotpipe.errors import ConfigError
from tests.tlsca import TestCa


def test_verification_is_on_unless_insecure_is_set(tls_ca: TestCa) -> None:
    """By default the server's certificate and host name are checked; insecure turns both off."""
    context = tls_context(TlsSettings(ca_file=tls_ca.ca), "mqtt.tls")
    assert (context.verify_mode, context.check_hostname) == (ssl.CERT_REQUIRED, True)
    default = tls_context(TlsSettings(), "amqp.tls")
    assert (default.verify_mode, default.check_hostname) == (ssl.CERT_REQUIRED, True)
    assert default.cert_store_stats()["x509_ca"] > 0, "the system's CAs when no ca_file is given"
    insecure = tls_context(TlsSettings(insecure=True), "amqp.tls")
    assert (insecure.verify_mode, insecure.check_hostname) == (ssl.CERT_NONE, False)


def test_a_key_of_another_certificate_is_one_config_error_naming_the_section(
    tls_ca: TestCa,
) -> None:
    """A client certificate with the wrong key is a ConfigError on <section>.cert_file."""
    tls = TlsSettings(cert_file=tls_ca.client.cert, key_file=tls_ca.server.key)
    with pytest.raises(ConfigError, match=r"^invalid setting influxdb\.tls\.cert_file=.*mismatch"):
        tls_context(tls, "influxdb.tls")


def test_a_ca_file_that_is_not_pem_is_one_config_error(tls_ca: TestCa) -> None:
    """A ca_file holding a private key instead of certificates names mqtt.tls.ca_file."""
    with pytest.raises(ConfigError, match=r"^invalid setting mqtt\.tls\.ca_file="):
        tls_context(TlsSettings(ca_file=tls_ca.client.key), "mqtt.tls")


def test_a_refused_certificate_is_found_inside_the_wrappers_of_each_client() -> None:
    """certificate_problem follows __cause__, urllib3's reason and pika's exception(s)."""
    refused = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED]")
    refused.verify_message = "certificate has expired"

    class WrapperError(Exception):
        def __init__(self, reason: object = None, exception: object = None) -> None:
            super().__init__("wrapped")
            self.reason = reason
            self.exception = exception
            self.exceptions = [exception] if exception else []

    caused = OSError("handshake")
    caused.__cause__ = refused
    for error in (
        refused,
        caused,
        WrapperError(reason=refused),
        WrapperError(exception=WrapperError(refused)),
    ):
        assert certificate_problem(error) == "certificate has expired", error
    assert certificate_problem(ConnectionRefusedError(111, "refused")) is None
    assert certificate_problem(ssl.SSLError(1, "wrong version number")) is None

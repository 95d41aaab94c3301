"""A small local certificate authority: device client certificates and broker server certificates.

``iotpipe ca init DIR`` makes ``DIR/ca.key`` (0600) and ``DIR/ca.crt``; ``iotpipe ca issue``
signs a **client** certificate whose common name is a device's identity ``{site}/{device}``
(Mosquitto's ``use_identity_as_username true`` makes it the user name its ACL sees) or a
**server** certificate for a broker host (subject alternative names: DNS names and IP
addresses). Keys are ECDSA P-256: small, fast on a Raspberry Pi, understood by every TLS
library MQTT brokers use. The only module that imports ``cryptography`` (ruff's banned-api).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from iotpipe.errors import ConfigError

__all__ = ["CA_CERT", "CA_KEY", "Issued", "init_ca", "issue_client", "issue_server"]

CA_KEY = "ca.key"
CA_CERT = "ca.crt"
#: Validity of a device or server certificate (825 days: what browsers and Apple accept as the
#: maximum, a common ceiling for TLS leaf certificates); the CA's own is ten years.
LEAF_DAYS = 825
CA_DAYS = 3650


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate, its private key and the CA certificate that signed it (PEM)."""

    cert_pem: bytes
    key_pem: bytes = field(repr=False)
    ca_pem: bytes

    def write(self, stem: Path) -> tuple[Path, Path]:
        """Write ``stem.crt`` and ``stem.key`` (0600); return their paths.

        Raises:
            ConfigError: they cannot be written.
        """
        cert, key = stem.with_name(stem.name + ".crt"), stem.with_name(stem.name + ".key")
        _write(cert, self.cert_pem, 0o644, "--out")
        _write(key, self.key_pem, 0o600, "--out")
        return cert, key


def _write(path: Path, data: bytes, mode: int, option: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
    except OSError as err:
        raise ConfigError(option, path, f"cannot write it ({err.strerror})") from None


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _builder(
    subject: str, issuer: x509.Name, public: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        # An hour of slack for a Pi whose clock is still a little behind at boot.
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def init_ca(directory: Path, name: str = "iotpipe CA", days: int = CA_DAYS) -> Path:
    """Create a CA (``ca.key`` 0600, ``ca.crt``) in ``directory``; return the certificate's path.

    Raises:
        ConfigError: a CA is already there (it is never overwritten), or it cannot be written.
    """
    key_path, cert_path = directory / CA_KEY, directory / CA_CERT
    if key_path.exists() or cert_path.exists():
        raise ConfigError("DIR", directory, "already holds a CA (ca.key/ca.crt); never replaced")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(name, subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600, "DIR")
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644, "DIR")
    return cert_path


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, bytes]:
    try:
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
        ca_pem = (directory / CA_CERT).read_bytes()
        cert = x509.load_pem_x509_certificate(ca_pem)
    except FileNotFoundError:
        raise ConfigError(
            "CA_DIR", directory, "no ca.key/ca.crt in it (create one: iotpipe ca init DIR)"
        ) from None
    except (OSError, ValueError) as err:
        raise ConfigError("CA_DIR", directory, f"cannot read its CA ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError("CA_DIR", directory, "ca.key is not an iotpipe (ECDSA) CA key")
    return key, cert, ca_pem


def _issue(
    directory: Path, subject: str, usage: x509.ObjectIdentifier, days: int,
    names: list[x509.GeneralName],
) -> Issued:  # fmt: skip
    ca_key, ca_cert, ca_pem = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Issued(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), ca_pem)


def issue_client(directory: Path, identity: str, days: int = LEAF_DAYS) -> Issued:
    """A client certificate with common name ``identity`` (a device's ``{site}/{device}``).

    Raises:
        ConfigError: no readable CA in ``directory``.
    """
    return _issue(directory, identity, ExtendedKeyUsageOID.CLIENT_AUTH, days, [])


def issue_server(directory: Path, hosts: list[str], days: int = LEAF_DAYS) -> Issued:
    """A server certificate for a broker reachable as ``hosts`` (DNS names or IP addresses).

    Raises:
        ConfigError: no host, or no readable CA in ``directory``.
    """
    if not hosts:
        raise ConfigError("--server", None, "name at least one host (DNS name or IP address)")
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return _issue(directory, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, days, names)

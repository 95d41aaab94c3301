"""A certificate authority made in the test, with the ``openssl`` command.

A pytest plugin (listed in ``tests/conftest.py``) with the session fixture ``tls_ca``, a
:class:`TestCa` whose files are PEM under one temporary directory:

- ``ca``: the CA certificate clients trust (``ca.pem``);
- ``server``: a server certificate and key for ``localhost`` and ``127.0.0.1`` (SAN);
- ``client``: a client certificate and key (extendedKeyUsage clientAuth) for mutual TLS;
- ``wrong_ca``: another CA, which signed none of them (a client trusting it refuses ``server``);
- ``expired``: a server certificate of the right CA for the right names, valid in 2020 only;
- ``wrong_host``: a server certificate of the right CA for ``elsewhere.example`` only.

Keys are P-256 (fast to make); the whole set takes well under a second.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

#: The minimal ``openssl ca`` config: the only command that takes explicit start and end dates
#: (``x509 -req`` has ``-days`` only), which an expired certificate needs.
_CA_CONFIG = """\
[ca]
default_ca = test
[test]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/issued
serial = $dir/serial
certificate = $dir/ca.pem
private_key = $dir/ca.key
default_md = sha256
policy = anything
unique_subject = no
copy_extensions = none
[anything]
commonName = supplied
"""


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerTls:
    """What a test server needs to listen with TLS: its pair and the CA of client certificates."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class TestCa:
    """The files of :func:`tls_ca` (see the module docstring)."""

    __test__ = False  # not a test class, whatever its name

    ca: Path
    server: KeyPair
    client: KeyPair
    wrong_ca: Path
    expired: KeyPair
    wrong_host: KeyPair

    def serving(self, name: str = "server") -> ServerTls:
        """A server's TLS files with the pair ``name`` (``server``, ``expired``, ``wrong_host``)."""
        pair: KeyPair = getattr(self, name)
        return ServerTls(self.ca, pair.cert, pair.key)


def _openssl(*args: str) -> None:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _self_signed(directory: Path, name: str, subject: str) -> KeyPair:
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    _openssl(
        "req", "-x509", *_KEY, "-days", "2", "-subj", f"/CN={subject}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(pair.key), "-out", str(pair.cert),
    )  # fmt: skip
    return pair


def _issue(
    directory: Path, name: str, *, cn: str, extensions: str, dates: tuple[str, str] | None = None
) -> KeyPair:
    """A certificate signed by ``directory``'s CA (``openssl ca``), valid now unless ``dates``."""
    pair = KeyPair(directory / f"{name}.pem", directory / f"{name}.key")
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    _openssl("req", "-new", *_KEY, "-subj", f"/CN={cn}", "-keyout", str(pair.key), "-out", str(csr))
    ext.write_text(f"[x]\nbasicConstraints = CA:FALSE\n{extensions}\n")
    when = ["-startdate", dates[0], "-enddate", dates[1]] if dates else ["-days", "2"]
    _openssl(
        "ca", "-batch", "-notext", "-config", str(directory / "ca.cnf"), "-extfile", str(ext),
        "-extensions", "x", *when, "-in", str(csr), "-out", str(pair.cert),
    )  # fmt: skip
    return pair


def make_ca(directory: Path) -> TestCa:
    """Make every file of :class:`TestCa` under ``directory``."""
    (directory / "issued").mkdir(parents=True)
    (directory / "index.txt").write_text("")
    (directory / "serial").write_text("1000\n")
    (directory / "ca.cnf").write_text(_CA_CONFIG.format(dir=directory))
    ca = _self_signed(directory, "ca", "iotpipe test CA")
    wrong_ca = _self_signed(directory, "wrong-ca", "iotpipe wrong CA")
    server_ext = "extendedKeyUsage = serverAuth\nsubjectAltName = "
    names = "DNS:localhost,IP:127.0.0.1"
    return TestCa(
        ca=ca.cert,
        server=_issue(directory, "server", cn="localhost", extensions=server_ext + names),
        client=_issue(
            directory, "client", cn="iotpipe-client", extensions="extendedKeyUsage = clientAuth"
        ),
        wrong_ca=wrong_ca.cert,
        expired=_issue(
            directory,
            "expired",
            cn="localhost",
            extensions=server_ext + names,
            dates=("20200101000000Z", "20200102000000Z"),
        ),
        wrong_host=_issue(
            directory,
            "wrong-host",
            cn="elsewhere.example",
            extensions=server_ext + "DNS:elsewhere.example",
        ),
    )


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCa:
    """A fresh test CA and its certificates for the session (see the module docstring)."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is missing: run `make setup`", pytrace=False)
    directory = tmp_path_factory.mktemp("tlsca")
    return make_ca(directory)

"""The offline install bundle: its pure parts, and a real build + offline install on this machine.

The slow tests download wheels from the package index for this machine's platform (CI reaches
it too), then install the bundle with ``install.sh`` into a temporary prefix with no network:
in a fresh network namespace when ``unshare -n`` works (as root), else with ``--no-index`` only.
The arm64 install is in ``test_bundle_arm64.py``.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import pytest

from edge.bundle import (
    EDGE_REQUIREMENTS,
    Bundle,
    build,
    expand_platforms,
    explain_pip_failure,
    pinned_requirements,
    verify_checksums,
    write_checksums,
    write_install_sh,
)
from iotpipe import __version__

THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
OTHER_PYTHON = "3.13" if THIS_PYTHON != "3.13" else "3.11"
# What the agent must not drag onto a Pi.
SERVER_ONLY = ("amqtt", "pika", "influxdb_client", "redis", "fastapi", "uvicorn", "pwdlib")


def this_platform() -> str:
    """The manylinux tag of this machine (``manylinux_2_36_x86_64``)."""
    libc, version = platform.libc_ver()
    if libc != "glibc":
        pytest.skip(f"needs a glibc Linux (this is {libc or sys.platform})")
    major, minor = version.split(".")[:2]
    return f"manylinux_{major}_{minor}_{platform.machine()}"


def no_network_prefix() -> list[str]:
    """``unshare -n`` when this user may make a network namespace, else nothing."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "-n", "true"], check=False).returncode == 0:
        return [unshare, "-n"]
    return []


def fake_bundle(path: Path, pythons: list[str]) -> Path:
    """A bundle with no wheels: enough for install.sh's checks that run before pip."""
    path.mkdir()
    write_install_sh(path / "install.sh", pythons)
    (path / "VERSION").write_text(f"{__version__}\n")
    (path / "requirements.txt").write_text("")
    write_checksums(path)
    return path


def run_install(
    bundle: Path, *args: str, env: dict[str, str] | None = None, as_user: bool = False
) -> str:
    """Run the bundle's install.sh with a scrubbed environment; return stdout + stderr.

    ``as_user``: when this test runs as root, run the script as ``nobody`` (setpriv).
    """
    user = (
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        if as_user and os.geteuid() == 0
        else []
    )
    done = subprocess.run(
        [*no_network_prefix(), *user, "sh", str(bundle / "install.sh"), *args],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )
    return f"rc={done.returncode}\n{done.stdout}{done.stderr}"


def test_expand_platforms_adds_older_glibc() -> None:
    """A manylinux_2_N tag brings every older glibc down to 2_17 and manylinux2014."""
    tags = expand_platforms(["manylinux_2_36_aarch64"])
    assert tags[0] == "manylinux_2_36_aarch64"
    assert "manylinux_2_17_aarch64" in tags
    assert "manylinux2014_aarch64" in tags
    assert "manylinux_2_16_aarch64" not in tags
    assert expand_platforms(["linux_armv7l"]) == ["linux_armv7l"]


def test_requirements_are_pinned_to_this_environment() -> None:
    """Every edge dependency installed here is pinned to its installed version."""
    pins = dict(pin.partition("==")[::2] for pin in pinned_requirements())
    assert set(pins) <= set(EDGE_REQUIREMENTS) | {f"smbus2{EDGE_REQUIREMENTS['smbus2']}"}
    assert pins["pydantic"] == version("pydantic")
    assert pins["paho-mqtt"] == version("paho-mqtt")


def test_checksums_catch_a_changed_file(tmp_path: Path) -> None:
    """SHA256SUMS names a file that changed after it was written."""
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "a.whl").write_bytes(b"wheel")
    (tmp_path / "VERSION").write_text("1\n")
    write_checksums(tmp_path)
    assert verify_checksums(tmp_path) == []
    (tmp_path / "wheels" / "a.whl").write_bytes(b"tampered")
    assert verify_checksums(tmp_path) == ["wheels/a.whl"]


def test_pip_failures_are_told_apart() -> None:
    """No network and a missing aarch64 wheel give different one-line errors."""
    offline = explain_pip_failure(
        "download",
        "WARNING: Retrying ... NewConnectionError('Failed to establish a new connection')\n"
        "ERROR: No matching distribution found for pydantic-core==2.50.5",
        1,
    )
    assert "cannot reach the package index" in str(offline)
    missing = explain_pip_failure(
        "download wheels for CPython 3.13",
        "ERROR: No matching distribution found for smbus3==0.1",
        1,
        ["manylinux_2_36_aarch64"],
    )
    assert "no wheel of smbus3==0.1 for manylinux_2_36_aarch64" in str(missing)
    assert missing.step == "download wheels for CPython 3.13"
    conflict = explain_pip_failure(
        "download",
        "Additionally, some packages in these conflicts have no matching distributions "
        "available for your environment:\n    pydantic-core\n\nTo fix this you could try to:\n",
        1,
        ["linux_armv6l"],
    )
    assert "no wheel of pydantic-core for linux_armv6l" in str(conflict)


def test_install_refuses_a_damaged_bundle(tmp_path: Path) -> None:
    """install.sh stops before touching anything when a file does not match SHA256SUMS."""
    bundle = fake_bundle(tmp_path / "b", [THIS_PYTHON])
    (bundle / "requirements.txt").write_text("evil\n")
    out = run_install(bundle, "--prefix", str(tmp_path / "p"), "--no-systemd")
    assert out.startswith("rc=1")
    assert "the bundle is damaged" in out
    assert not (tmp_path / "p").exists()


def test_install_refuses_a_python_without_wheels(tmp_path: Path) -> None:
    """install.sh names the interpreter's version and the bundle's when they do not match."""
    bundle = fake_bundle(tmp_path / "b", ["3.99"])
    out = run_install(
        bundle, "--prefix", str(tmp_path / "p"), "--no-systemd", "--python", sys.executable
    )
    assert out.startswith("rc=1")
    assert f"is CPython {THIS_PYTHON}; this bundle has wheels for CPython 3.99 only" in out


def test_install_as_a_user_needs_no_systemd(tmp_path: Path) -> None:
    """Without --no-systemd a non-root install says it needs root (as nobody when root)."""
    # pytest's tmp_path sits in a directory only its owner may enter: nobody needs its own.
    shared = Path(tempfile.mkdtemp(prefix="iotpipe-bundle-"))
    try:
        shared.chmod(0o777)
        bundle = fake_bundle(shared / "b", [THIS_PYTHON])
        out = run_install(bundle, "--prefix", str(shared / "p"), as_user=True)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert "installing the service needs root" in out


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """A bundle for this machine's platform, for this CPython and one other."""
    out = tmp_path_factory.mktemp("bundle") / "edge"
    return build(out, [THIS_PYTHON, OTHER_PYTHON], [this_platform()])


@pytest.mark.slow
def test_bundle_has_wheels_for_each_python(built: Bundle) -> None:
    """Each requested CPython gets the iotpipe wheel, its own pydantic-core, and no server deps."""
    for python in (THIS_PYTHON, OTHER_PYTHON):
        names = built.wheels[python]
        tag = "cp" + python.replace(".", "")
        assert any(name.startswith(f"iotpipe-{__version__}-") for name in names)
        assert any(name.startswith("pydantic_core-") and f"-{tag}-" in name for name in names)
        assert not [n for n in names if n.split("-")[0].lower() in SERVER_ONLY]
        for name in names:
            assert (built.path / "wheels" / name).is_file()
    assert (built.path / "VERSION").read_text() == f"{__version__}\n"


@pytest.mark.slow
def test_bundle_checksums_verify(built: Bundle) -> None:
    """SHA256SUMS covers every file and passes ``sha256sum -c``."""
    assert verify_checksums(built.path) == []
    listed = {
        line.split("  ", 1)[1] for line in (built.path / "SHA256SUMS").read_text().splitlines()
    }
    on_disk = {
        p.relative_to(built.path).as_posix() for p in built.path.rglob("*") if p.is_file()
    } - {"SHA256SUMS"}
    assert listed == on_disk
    subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=built.path, check=True)


@pytest.mark.slow
def test_install_offline_into_a_prefix(built: Bundle, tmp_path: Path) -> None:
    """install.sh installs offline into a prefix; the venv has only edge deps and iotpipe runs."""
    prefix, etc, boot = tmp_path / "opt", tmp_path / "etc", tmp_path / "boot"
    (boot / "iotpipe" / "secrets").mkdir(parents=True)
    (boot / "iotpipe" / "secrets" / "edge.toml").write_text("# provisioned\n")
    (boot / "iotpipe" / "secrets" / "mqtt-password").write_text("s3cret\n")
    out = run_install(
        built.path,
        "--no-systemd",
        "--python",
        shutil.which(f"python{THIS_PYTHON}") or sys.executable,
        env={
            "IOTPIPE_PREFIX": str(prefix),
            "IOTPIPE_ETC": str(etc),
            "IOTPIPE_BOOT": str(boot),
            # install.sh runs pip --isolated: neither of these may reach it.
            "PIP_INDEX_URL": "http://192.0.2.1/simple",
            "PIP_FIND_LINKS": "/nonexistent",
        },
    )
    assert out.startswith("rc=0"), out
    assert f"installed {__version__} in {prefix}" in out

    python = prefix / "venv" / "bin" / "python"
    shown = subprocess.run(
        [prefix / "venv" / "bin" / "iotpipe", "--version"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert shown.stdout.startswith(f"iotpipe {__version__}")
    for module in ("paho.mqtt.client", "pydantic", "prometheus_client", "smbus2", "edge.sensors"):
        subprocess.run([python, "-c", f"import {module}"], check=True)
    for module in SERVER_ONLY:
        lean = subprocess.run([python, "-c", f"import {module}"], check=False, capture_output=True)
        assert lean.returncode != 0, f"{module} should not be installed"

    assert (etc / "edge.toml").read_text() == "# provisioned\n"
    assert (etc / "credentials" / "mqtt-password").stat().st_mode & 0o077 == 0
    for name in ("mqtt-client.crt", "mqtt-client.key", "mqtt-ca.crt"):  # none given: empty
        assert (etc / "credentials" / name).read_bytes() == b""
        assert (etc / "credentials" / name).stat().st_mode & 0o077 == 0
    assert not (boot / "iotpipe" / "secrets" / "edge.toml").exists()

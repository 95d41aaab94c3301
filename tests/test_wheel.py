"""The wheel holds everything the package needs at run time, and works installed from it.

The editable install of the development venv reads files from the checkout, so a file missing
from the package data would pass every other test. Here the wheel is checked file by file (the
one CI built, ``IOTPIPE_WHEEL``, or one built now without dependencies), and, when
``IOTPIPE_CLI`` names the ``iotpipe`` of a clean venv the wheel was installed into (``.ci/run``),
the installed command is run: its version, the dashboard serving its page, the edge commands.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path

import pytest

from iotpipe import __version__
from tests.conftest import free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
STATIC = REPO / "consumers" / "dashboard" / "static"
PACKAGES = ("iotpipe", "bridge", "consumers", "edge", "simulator")
#: Files read at run time by path (not imported): each is named here so a failure says which.
RUNTIME_FILES = (
    "consumers/dashboard/static/index.html",
    "consumers/dashboard/static/login.html",
    "consumers/dashboard/static/app.css",
    "consumers/dashboard/static/vendor/uplot/uPlot.iife.min.js",
    "edge/install.sh",
    "edge/systemd/iotpipe-edge.service",
    *(f"{package}/py.typed" for package in PACKAGES),
)
INSTALLED = os.environ.get("IOTPIPE_CLI")
needs_installed = pytest.mark.skipif(
    not INSTALLED, reason="IOTPIPE_CLI is not set (.ci/run sets it to the wheel's clean venv)"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel of this version: CI's (``IOTPIPE_WHEEL``) or one built from this checkout."""
    given = os.environ.get("IOTPIPE_WHEEL")
    if given:
        path = Path(given)
    else:
        out = tmp_path_factory.mktemp("dist")
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
             "-w", str(out), str(REPO)],
            check=True,
            timeout=300,
        )  # fmt: skip
        (path,) = out.glob("iotpipe-*.whl")
    assert path.name == f"iotpipe-{__version__}-py3-none-any.whl"
    with zipfile.ZipFile(path) as archive:
        yield archive


def _tracked_package_files() -> list[str]:
    """Every file git tracks under the packages (the source of truth for what must ship)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: the list of package files is unknown")
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", *PACKAGES],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [name for name in listed if (REPO / name).is_file()]


def test_the_wheel_has_every_file_of_the_packages(wheel: zipfile.ZipFile) -> None:
    """Modules, dashboard page, scripts, units, configs and markers: all of them, nothing lost."""
    names = set(wheel.namelist())
    missing = [name for name in _tracked_package_files() if name not in names]
    assert missing == [], f"not in the wheel: {missing}"


@pytest.mark.parametrize("name", RUNTIME_FILES)
def test_the_wheel_has_the_files_read_at_run_time(wheel: zipfile.ZipFile, name: str) -> None:
    assert wheel.read(name) == (REPO / name).read_bytes()


def test_the_wheel_names_its_version_and_command(wheel: zipfile.ZipFile) -> None:
    info = f"iotpipe-{__version__}.dist-info"
    metadata = wheel.read(f"{info}/METADATA").decode()
    assert f"\nVersion: {__version__}\n" in metadata
    assert "iotpipe = iotpipe.__main__:main" in wheel.read(f"{info}/entry_points.txt").decode()
    # The dashboard's page refers only to files the wheel has.
    page = wheel.read("consumers/dashboard/static/index.html").decode()
    refs = re.findall(r'(?:src|href)="([a-z][^":]+)"', page)
    assert "js/app.js" in refs
    for ref in refs:
        assert f"consumers/dashboard/static/{ref}" in wheel.namelist(), ref


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    assert INSTALLED is not None
    return subprocess.run(
        [INSTALLED, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


@needs_installed
def test_installed_command_is_the_wheel_not_this_checkout() -> None:
    """The code the installed command runs lives in its venv, not in the source tree."""
    python = Path(INSTALLED or "").with_name("python")
    where = subprocess.run(
        [python, "-c", "import consumers.dashboard.app as m; print(m.STATIC_DIR)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
    ).stdout.strip()
    assert not Path(where).resolve().is_relative_to(REPO), where
    assert _run("--version").stdout.startswith(f"iotpipe {__version__} ")


@needs_installed
def test_installed_dashboard_serves_its_page_over_a_0_1_0_store(tmp_path: Path) -> None:
    """The page, every file it loads, and the API over a store written by 0.1.0."""
    store = Path(shutil.copy(REPO / "tests/data/v0.1.0/store.db", tmp_path / "store.db"))
    port = free_port()
    assert INSTALLED is not None
    proc = subprocess.Popen(
        [INSTALLED, "dashboard", "--store", str(store), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def get(path: str) -> bytes | None:
            try:
                with urllib.request.urlopen(base + path, timeout=5) as response:
                    body: bytes = response.read()
                    return body
            except OSError:
                return None

        page = wait_for(lambda: get("/"), 30, "the dashboard's page")
        assert page == (STATIC / "index.html").read_bytes()
        # Every file of the page (scripts load each other) comes from the installed package.
        for path in STATIC.rglob("*"):
            if path.is_file():
                name = path.relative_to(STATIC).as_posix()
                assert get(f"/{name}") == path.read_bytes(), name
        devices = get("/api/v1/devices")
        assert devices is not None
        assert b"dev-0001" in devices
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err


@needs_installed
def test_installed_commands_answer(tmp_path: Path) -> None:
    shown = _run("edge", "bundle", "--help")
    assert shown.returncode == 0, shown.stderr
    assert "Usage: iotpipe edge bundle" in shown.stdout
    # A bundle is built from a checkout (docs/edge-bundle.md); installed, it says so in one line.
    built = _run("edge", "bundle", "--out", str(tmp_path / "bundle"))
    assert built.returncode != 0
    assert built.stderr.strip().endswith("run from a checkout"), built.stderr
    assert "Traceback" not in built.stderr
    store = shutil.copy(REPO / "tests/data/v0.1.0/store.db", tmp_path / "store.db")
    stats = _run("stats", "--store", str(store))
    assert stats.returncode == 0, stats.stderr
    assert "readings 12 · messages 6 · seen ids 6" in stats.stdout

"""The bundle installs offline and the agent's drivers read sensors in a real arm64 Debian root.

An arm64 Debian root (mmdebstrap, python3 + python3-venv) runs under qemu-user through
binfmt_misc. The aarch64 bundle is copied in; ``install.sh --no-systemd`` runs in the chroot
inside a fresh network namespace (so "offline" is a fact, not a flag), then the installed agent
reads fixture sysfs trees (thermal zone, DS18B20) with aarch64 CPython and pydantic-core.

Opt-in: building the root takes ~3 minutes under emulation, so the test runs only with
``IOTPIPE_ARM64=1`` (``IOTPIPE_ARM64=bookworm,trixie`` for both Pi OS bases). The root tarball is
cached in ``$IOTPIPE_ARM64_CACHE`` (default ``~/.cache/iotpipe-edge``); a missing cache is built.
Needs root, qemu-user-static, mmdebstrap and a writable binfmt_misc (``apt-get install
qemu-user-static binfmt-support mmdebstrap``). By hand, with the transcript on stdout::

    .venv/bin/python tests/edge/test_bundle_arm64.py [bookworm|trixie]
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from edge.bundle import build

#: Debian suite -> the CPython it ships (Pi OS Bookworm / Trixie are built on these).
SUITES = {"bookworm": "3.11", "trixie": "3.13"}
BINFMT = Path("/proc/sys/fs/binfmt_misc")
MIRROR = "http://deb.debian.org/debian"

FIXTURE_CONFIG = """
[edge]
site = "home"
[[edge.sensors]]
type = "thermal"
root = "/tmp/fixtures/sys"
[[edge.sensors]]
type = "ds18b20"
root = "/tmp/fixtures/sys"
"""
VENV = "/opt/iotpipe-edge/venv/bin"
# `iotpipe edge sensors` through the root command once it is mounted there; until then the same
# command function in a bare Typer app (everything but the root's --log-level callback).
SENSORS = (
    f"if {VENV}/iotpipe edge sensors --help >/dev/null 2>&1; then "
    f"{VENV}/iotpipe edge sensors --config /tmp/fixtures/edge.toml; else "
    'echo "(iotpipe edge is not mounted yet: running edge.cli_sensors.sensors directly)"; '
    f'{VENV}/python -c "import typer; from edge.cli_sensors import sensors; app = typer.Typer(); '
    "app.command('sensors')(sensors); app.command('x')(lambda: None); app()\" "
    "sensors --config /tmp/fixtures/edge.toml; fi"
)
W1_SLAVE = "72 01 4b 46 7f ff 0e 10 57 : crc=57 YES\n72 01 4b 46 7f ff 0e 10 57 t=23125\n"


def why_not() -> str | None:
    """Why this machine cannot run an arm64 root, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (mmdebstrap, chroot, unshare)"
    for tool in ("mmdebstrap", "qemu-aarch64-static", "unshare", "chroot"):
        if not shutil.which(tool):
            return f"{tool} not found: apt-get install qemu-user-static binfmt-support mmdebstrap"
    if not (BINFMT / "status").exists():
        return f"binfmt_misc is not mounted at {BINFMT} (mount -t binfmt_misc binfmt_misc {BINFMT})"
    entry = BINFMT / "qemu-aarch64"
    if not entry.exists() or "enabled" not in entry.read_text():
        return "no enabled qemu-aarch64 binfmt entry: update-binfmts --enable qemu-aarch64"
    return None


def root_tarball(
    suite: str,
    cache: Path,
    say: Callable[[str], None],
    *,
    name: str = "arm64",
    variant: str = "minbase",
    packages: tuple[str, ...] = ("python3", "python3-venv"),
    options: tuple[str, ...] = (),
) -> Path:
    """The cached arm64 root of ``suite`` (``{name}-{suite}.tar``), built with mmdebstrap when
    missing; ``options``: more mmdebstrap options (hooks)."""
    tarball = cache / f"{name}-{suite}.tar"
    if tarball.exists():
        say(f"$ using cached {tarball}")
        return tarball
    cache.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial.tar")
    run(
        [
            "nice",
            "-n",
            "10",
            "mmdebstrap",
            "--arch=arm64",
            f"--variant={variant}",
            "--include=" + ",".join(packages),
            *options,
            suite,
            str(partial),
            MIRROR,
        ],
        say,
    )
    partial.rename(tarball)
    return tarball


def run(command: list[str], say: Callable[[str], None], *, echo: bool = True) -> str:
    """Run a command, echo it and its output through ``say``; fail on a non-zero exit."""
    if echo:
        say("$ " + " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    output = (done.stdout + done.stderr).rstrip()
    if output:
        say(output)
    if done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}: {' '.join(command)}")
    return str(done.stdout)


def install_interpreter(root: Path) -> None:
    """Put qemu where the kernel looks for it: binfmt entries without the F flag resolve the
    interpreter path inside the chroot."""
    lines = (BINFMT / "qemu-aarch64").read_text().splitlines()
    fields = dict(line.split(" ", 1) for line in lines if " " in line)
    if "F" in fields.get("flags:", ""):
        return
    interpreter = Path(fields["interpreter"])
    real = interpreter.resolve()
    for path in {interpreter, real}:
        (root / path.relative_to("/")).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(real, root / real.relative_to("/"))
    if interpreter != real:
        link = root / interpreter.relative_to("/")
        link.unlink(missing_ok=True)
        link.symlink_to(real)


def write_fixtures(root: Path) -> None:
    """A sysfs tree with one thermal zone (48.312 °C) and one DS18B20 (23.125 °C)."""
    sys_root = root / "tmp" / "fixtures" / "sys"
    zone = sys_root / "class" / "thermal" / "thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "temp").write_text("48312\n")
    (zone / "type").write_text("cpu-thermal\n")
    probe = sys_root / "bus" / "w1" / "devices" / "28-00000a1b2c3d"
    probe.mkdir(parents=True)
    (probe / "w1_slave").write_text(W1_SLAVE)
    (root / "tmp" / "fixtures" / "edge.toml").write_text(FIXTURE_CONFIG)


def in_chroot(root: Path, command: str, say: Callable[[str], None]) -> str:
    """Run a shell command in the arm64 root, in its own mount and (empty) network namespace."""
    say(f"[arm64 chroot, no network] $ {command}")
    (root / "tmp" / "step.sh").write_text(command + "\n")
    script = (
        f"mount -t proc proc {root}/proc && mount --rbind /dev {root}/dev && "
        f"exec chroot {root} /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "
        "HOME=/root /bin/sh /tmp/step.sh"
    )
    namespaces = ["unshare", "--net", "--mount", "--propagation=private"]
    return run([*namespaces, "sh", "-c", script], say, echo=False)


def prove(suite: str, work: Path, cache: Path, say: Callable[[str], None]) -> str:
    """Build the aarch64 bundle, install it offline in an arm64 ``suite`` root, read sensors."""
    python = SUITES[suite]
    started = time.monotonic()
    tarball = root_tarball(suite, cache, say)
    bundle = build(work / "bundle", [python], ["manylinux_2_36_aarch64"], progress=say)
    root = work / "root"
    root.mkdir()
    run(["tar", "-xf", str(tarball), "-C", str(root)], say)
    install_interpreter(root)
    shutil.copytree(bundle.path, root / "tmp" / "bundle")
    write_fixtures(root)

    in_chroot(root, "uname -m; python3 --version; cat /proc/net/dev", say)
    in_chroot(root, "sh /tmp/bundle/install.sh --no-systemd", say)
    version = in_chroot(root, f"{VENV}/iotpipe --version", say)
    in_chroot(root, f"{VENV}/python -m pip --isolated list --format=freeze", say)
    machine = in_chroot(root, f"uname -m; {VENV}/python -c 'import sys; print(sys.version)'", say)
    readings = in_chroot(root, SENSORS, say)
    say(f"done in {time.monotonic() - started:.0f} s")
    return version + machine + readings


def requested_suites() -> list[str]:
    """The suites ``IOTPIPE_ARM64`` asks for (``1`` = bookworm)."""
    value = os.environ.get("IOTPIPE_ARM64", "")
    if value in ("", "0"):
        return []
    return ["bookworm"] if value == "1" else [s for s in value.split(",") if s]


@pytest.mark.slow
@pytest.mark.parametrize("suite", sorted(SUITES))
def test_bundle_installs_offline_on_arm64(suite: str, tmp_path: Path) -> None:
    """On an arm64 Debian root, install.sh installs offline and the drivers read fixtures."""
    if suite not in requested_suites():
        pytest.skip(f"opt-in: IOTPIPE_ARM64={suite} (builds an arm64 root under qemu, minutes)")
    reason = why_not()
    if reason:
        pytest.fail(f"IOTPIPE_ARM64 is set but this machine cannot: {reason}")
    cache = Path(os.environ.get("IOTPIPE_ARM64_CACHE", Path.home() / ".cache" / "iotpipe-edge"))
    out = prove(suite, tmp_path, cache, say=lambda _line: None)
    assert "iotpipe " in out
    assert "aarch64" in out
    assert re.search(r"cpu\.temperature\s+48\.312\s+Cel", out)
    assert re.search(r"temperature\.28-00000a1b2c3d\s+23\.125\s+Cel", out)


if __name__ == "__main__":
    chosen = sys.argv[1] if len(sys.argv) > 1 else "bookworm"
    problem = why_not()
    if problem:
        sys.exit(f"cannot run an arm64 root here: {problem}")
    with tempfile.TemporaryDirectory(prefix="iotpipe-arm64-") as tmp:
        prove(chosen, Path(tmp), Path.home() / ".cache" / "iotpipe-edge", say=print)

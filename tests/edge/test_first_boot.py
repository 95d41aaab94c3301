"""The first boot of a flashed image, emulated: flash, boot under qemu-system-aarch64, publish.

A Raspberry Pi OS Trixie-shaped card is built once and cached: partition 1 FAT labelled
``bootfs`` (issue.txt "Raspberry Pi reference 2025-11-24", cmdline.txt, config.txt), partition 2
ext4 ``rootfs`` from an arm64 Debian trixie root (mmdebstrap: systemd, cloud-init, python3-venv,
openssh-server, linux-image-arm64), the FAT mounted at /boot/firmware and cloud-init's NoCloud
datasource reading its seed from the FAT by label, as on Pi OS. ``iotpipe edge flash`` then runs
on it as a user would run it (offline bundle, edge.toml, SSH key), and the card boots in
``qemu-system-aarch64 -M virt`` with the kernel and initrd of that root and the kernel command
line of the flashed cmdline.txt. The network is QEMU's user mode with ``restrict=on``: the guest
reaches only 10.0.2.100:1883, forwarded to a private Mosquitto on this machine (and the host
reaches the guest's SSH through one forwarded port).

Proven on first boot: cloud-init ran our user-data (hostname, the user, the SSH key: we log in
with it), firstboot.sh installed the bundle under /opt/iotpipe-edge, the secrets are root-only in
/etc/iotpipe and gone from the FAT (read back with mtools after power-off),
iotpipe-edge.service is active and its readings reach the broker; on a second boot the
first-boot steps do not run again and readings flow again.

Opt-in (it takes minutes under TCG): ``IOTPIPE_BOOT=trixie``. Needs what
``scripts/setup-arm64`` and ``scripts/setup-boot`` install. The card is cached in
``$IOTPIPE_ARM64_CACHE`` (default ``~/.cache/iotpipe-edge``). Artefacts (serial console log,
transcript with timings) stay in the test's tmp dir and are printed on failure. By hand::

    .venv/bin/python tests/edge/test_first_boot.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge.bundle import build
from edge.image import FatImage, read_partitions
from tests.conftest import MosquittoProcess, free_port, wait_for
from tests.edge.test_bundle_arm64 import root_tarball, run
from tests.edge.test_bundle_arm64 import why_not as why_not_arm64

Say = Callable[[str], None]

#: What the root needs to boot as Pi OS Trixie does, as far as flashing is concerned.
PACKAGES = (
    "systemd-sysv", "udev", "cloud-init", "python3", "python3-venv", "openssh-server",
    "linux-image-arm64", "initramfs-tools", "sudo", "iproute2", "netbase", "kmod",
)  # fmt: skip
SECTOR = 512
BOOT_START, BOOT_SECTORS = 8192, 524_288  # 256 MiB FAT, at 4 MiB (as Pi OS)
ROOT_START, ROOT_SECTORS = BOOT_START + BOOT_SECTORS, 5_242_880  # 2.5 GiB ext4
ISSUE = "Raspberry Pi reference 2025-11-24\nGenerated using pi-gen, trixie\n"
# Pi OS's cmdline.txt; the emulated "firmware" replaces console= and root= (see kernel_args).
CMDLINE = (
    "console=serial0,115200 console=tty1 root=PARTUUID=a1b2c3d4-02 rootfstype=ext4 "
    "fsck.repair=yes rootwait quiet cfg80211.ieee80211_regdom=GB\n"
)
CONFIG_TXT = "# Raspberry Pi OS config.txt\ndtparam=audio=on\ncamera_auto_detect=1\n[all]\n"
FSTAB = (
    "proc            /proc           proc    defaults          0       0\n"
    "LABEL=bootfs    /boot/firmware  vfat    defaults          0       2\n"
    "LABEL=rootfs    /               ext4    defaults,noatime  0       1\n"
)
# Pi OS Trixie's cloud-init looks for its NoCloud seed on the FAT partition labelled bootfs.
# Pi OS grows the root partition itself at first boot; this root has no resize2fs for cloud-init.
CLOUD_CFG = (
    "datasource_list: [NoCloud, None]\ndatasource:\n  NoCloud:\n    fs_label: bootfs\n"
    "resize_rootfs: false\n"
)
NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n"
BROKER_IP = "10.0.2.100"
EDGE_TOML = f"""[edge]
site = "home"
device = "pi-boot"

[[edge.sensors]]
type = "simulated"
interval = 2.0
sensors = ["temperature"]

[mqtt]
url = "mqtt://{BROKER_IP}:1883"
"""
VENV = "/opt/iotpipe-edge/venv"
#: Generous: TCG emulation of a whole Debian boot, cloud-init and a pip install on a busy host.
FIRST_BOOT_TIMEOUT = 1800.0
BOOT_TIMEOUT = 900.0


def why_not() -> str | None:
    """Why this machine cannot build and boot the card, or None when it can."""
    reason = why_not_arm64()
    if reason:
        return reason
    for tool in ("qemu-system-aarch64", "mkfs.ext4", "mkfs.vfat", "mcopy", "sfdisk", "socat"):
        if not shutil.which(tool):
            return f"{tool} not found: run scripts/setup-boot"
    return None


# -- the official-like card ----------------------------------------------------------------------


def customise_root(root: Path) -> None:
    """What Pi OS has and a Debian root lacks: fstab, the NoCloud seed on the FAT, a network."""
    (root / "etc" / "fstab").write_text(FSTAB)
    (root / "etc" / "hostname").write_text("raspberrypi\n")
    (root / "boot" / "firmware").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "cloud" / "cloud.cfg.d" / "99_raspberry-pi.cfg").write_text(CLOUD_CFG)
    (root / "etc" / "systemd" / "network" / "20-wired.network").write_text(NETWORK)
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "systemd-networkd.service").unlink(missing_ok=True)
    (wants / "systemd-networkd.service").symlink_to(
        "/usr/lib/systemd/system/systemd-networkd.service"
    )


def boot_fat(path: Path, work: Path, say: Say) -> None:
    """The FAT boot partition labelled ``bootfs`` with the files flash looks at."""
    for name, text in (("issue.txt", ISSUE), ("cmdline.txt", CMDLINE), ("config.txt", CONFIG_TXT)):
        (work / name).write_text(text)
    run(["mkfs.vfat", "-F", "32", "-n", "bootfs", "-C", str(path), str(BOOT_SECTORS // 2)], say)
    for name in ("issue.txt", "cmdline.txt", "config.txt"):
        run(["mcopy", "-i", str(path), str(work / name), f"::{name}"], say)


def official_card(suite: str, cache: Path, say: Say) -> Path:
    """The cached Pi OS-shaped card directory: ``card.img``, ``vmlinuz``, ``initrd.img``."""
    card = cache / f"boot-{suite}"
    if (card / "card.img").exists():
        say(f"$ using cached {card}")
        return card
    tarball = root_tarball(suite, cache, say, name="boot", variant="apt", packages=PACKAGES)
    partial = cache / f"boot-{suite}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    root = partial / "root"
    root.mkdir(parents=True)
    run(["tar", "--numeric-owner", "-xf", str(tarball), "-C", str(root)], say)
    customise_root(root)
    for pattern, name in (("vmlinuz-*", "vmlinuz"), ("initrd.img-*", "initrd.img")):
        (found,) = sorted((root / "boot").glob(pattern))
        shutil.copy2(found, partial / name)
    rootfs, fat = partial / "rootfs.ext4", partial / "bootfs.fat"
    run(
        ["mkfs.ext4", "-q", "-L", "rootfs", "-d", str(root), str(rootfs), f"{ROOT_SECTORS // 2}K"],
        say,
    )
    boot_fat(fat, partial, say)
    image = partial / "card.img"
    with image.open("wb") as out:
        out.truncate((ROOT_START + ROOT_SECTORS) * SECTOR)
    table = (
        "label: dos\nlabel-id: 0xa1b2c3d4\n"
        f"start={BOOT_START}, size={BOOT_SECTORS}, type=c\n"
        f"start={ROOT_START}, size={ROOT_SECTORS}, type=83\n"
    )
    say(f"$ sfdisk {image}")
    subprocess.run(["sfdisk", "-q", str(image)], input=table, text=True, check=True)
    for part, start in ((fat, BOOT_START), (rootfs, ROOT_START)):
        run(
            [
                "dd",
                f"if={part}",
                f"of={image}",
                f"seek={start}",
                "bs=512",
                "conv=notrunc,sparse",
                "status=none",
            ],
            say,
        )
    shutil.rmtree(root)
    rootfs.unlink()
    fat.unlink()
    partial.rename(card)
    return card


# -- flashing as a user does -------------------------------------------------------------------


def iotpipe(*args: str | Path, say: Say) -> str:
    """Run the ``iotpipe`` command of this environment."""
    return run([str(Path(sys.executable).parent / "iotpipe"), *map(str, args)], say)


def flash_card(card: Path, work: Path, say: Say) -> Path:
    """``iotpipe edge bundle`` + ``iotpipe edge flash`` (registering the device's fresh MQTT
    password in ``mosquitto.passwd``); returns the private SSH key."""
    bundle = build(work / "bundle", ["3.13"], ["manylinux_2_36_aarch64"], progress=say)
    (work / "edge.toml").write_text(EDGE_TOML)
    key = work / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@laptop", "-f", str(key)], say)
    iotpipe(
        "edge", "flash", "--image", card / "card.img", "--config", work / "edge.toml",
        "--ssh-key", f"{key}.pub", "--bundle", bundle.path, "--out", work / "card.img",
        "--mosquitto-password-file", work / "mosquitto.passwd", say=say,
    )  # fmt: skip
    return key


def kernel_args(image: Path) -> str:
    """The flashed cmdline.txt as the Pi's firmware passes it, on QEMU's virt machine."""
    fat = FatImage(image, read_partitions(image)[0])
    words = (fat.read("cmdline.txt") or b"").decode().split()
    kept = [w for w in words if not w.startswith(("console=", "root=")) and w != "quiet"]
    return " ".join(
        ["root=/dev/vda2", "console=ttyAMA0", *kept, "systemd.journald.forward_to_console=1"]
    )


# -- booting ------------------------------------------------------------------------------------


class Guest:
    """One boot of the card in qemu-system-aarch64, its serial console in a file."""

    def __init__(self, card: Path, image: Path, work: Path, broker_port: int, say: Say) -> None:
        self.console = work / "console.log"
        self.ssh_port = free_port()
        self.say = say
        forward = f"guestfwd=tcp:{BROKER_IP}:1883-cmd:socat - TCP:127.0.0.1:{broker_port}"
        self.command = [
            "nice", "-n", "10", "qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57",
            "-m", "1024", "-smp", "2", "-kernel", str(card / "vmlinuz"),
            "-initrd", str(card / "initrd.img"), "-append", kernel_args(image),
            "-drive", f"file={image},if=virtio,format=raw", "-display", "none",
            "-serial", f"file:{self.console}", "-monitor", "none",
            "-netdev", f"user,id=n,restrict=on,{forward},hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", # romfile=: no PXE option ROM (it would need ipxe-qemu; -kernel boots directly).
            "virtio-net-pci,netdev=n,romfile=",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        self.say("$ " + " ".join(self.command))
        self.started = time.monotonic()
        with (self.console.parent / "qemu.log").open("w") as errors:
            self.proc = subprocess.Popen(self.command, stdout=errors, stderr=subprocess.STDOUT)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def log(self) -> str:
        return self.console.read_text(errors="replace") if self.console.exists() else ""

    def running_and(self, marker: str) -> Callable[[], bool]:
        """A condition: ``marker`` is on the console (failing at once if QEMU exited)."""

        def seen() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                qemu = (self.console.parent / "qemu.log").read_text(errors="replace")
                pytest.fail(f"QEMU exited with {self.proc.returncode}: {qemu}")
            return marker in self.log()

        return seen

    def mark(self, what: str) -> None:
        self.say(f"[{self.elapsed():6.0f} s] {what}")

    def ssh(
        self, key: Path, command: str, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as ``pi`` over SSH (the key flash installed)."""
        done = subprocess.run(
            [
                "ssh",
                "-i",
                str(key),
                "-p",
                str(self.ssh_port),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "ConnectTimeout=20",
                "-o",
                "LogLevel=ERROR",
                "pi@127.0.0.1",
                command,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        if check:
            assert done.returncode == 0, f"ssh {command!r}: {done.returncode} {done.stderr}"
        return done

    def power_off(self, key: Path) -> None:
        """``sudo systemctl poweroff`` and wait for QEMU to exit (killed after 5 minutes)."""
        assert self.proc is not None
        self.ssh(key, "sudo systemctl poweroff", check=False)
        try:
            self.proc.wait(timeout=300)
        finally:
            self.stop()
        self.mark("powered off")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def booted(guest: Guest) -> Iterator[Guest]:
    """The guest running; killed if the block fails; its console kept."""
    guest.start()
    try:
        yield guest
    finally:
        guest.stop()


class Subscriber:
    """``mosquitto_sub -v -t #`` on the private broker, lines kept in a file."""

    def __init__(self, port: int, path: Path) -> None:
        self.path = path
        self.out = path.open("w")
        self.proc = subprocess.Popen(
            ["mosquitto_sub", "-p", str(port), "-h", "127.0.0.1", "-v", "-t", "#"],
            stdout=self.out, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def lines(self, topic: str = "/home/pi-boot/telemetry ") -> list[str]:
        return [
            line for line in self.path.read_text(errors="replace").splitlines() if topic in line
        ]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        self.out.close()


def read_root(image: Path, work: Path, paths: tuple[str, ...], say: Say) -> dict[str, str]:
    """Files of the card's ext4 root after power-off (dd the partition out, ``debugfs cat``)."""
    rootfs = work / "rootfs.ext4"
    run(
        [
            "dd", f"if={image}", f"of={rootfs}", f"skip={ROOT_START}", f"count={ROOT_SECTORS}",
            "bs=512", "conv=sparse", "status=none",
        ],
        say,
    )  # fmt: skip
    found = {path: run(["debugfs", "-R", f"cat {path}", str(rootfs)], say) for path in paths}
    rootfs.unlink()
    return found


# -- the proof ----------------------------------------------------------------------------------


def first_boot(guest: Guest, key: Path, readings: Subscriber) -> dict[str, str]:
    """Boot 1: wait for readings and SSH, look inside, power off; what was seen."""
    seen: dict[str, str] = {}
    with booted(guest):
        wait_for(guest.running_and("Linux version"), 120, "the kernel on the serial console")
        guest.mark("kernel started")
        wait_for(
            lambda: "Cloud-init" in guest.log() and "finished at" in guest.log(),
            FIRST_BOOT_TIMEOUT,
            "cloud-init final",
        )
        guest.mark("cloud-init finished")
        wait_for(
            lambda: len(readings.lines()) >= 3, FIRST_BOOT_TIMEOUT, "3 readings at the host broker"
        )
        guest.mark(f"{len(readings.lines())} readings at the host broker")
        wait_for(
            lambda: guest.ssh(key, "true", check=False).returncode == 0,
            600,
            "SSH login as pi with the key",
        )
        guest.mark("SSH login as pi with the flashed key")
        for name, command in (
            ("hostname", "hostname"),
            ("active", "sudo systemctl is-active iotpipe-edge.service"),
            ("unit", "sudo systemctl show -p Type -p WatchdogUSec -p NRestarts iotpipe-edge.service"),
            ("etc", "sudo stat -c '%a %U %n' /etc/iotpipe /etc/iotpipe/edge.toml /etc/iotpipe/credentials/mqtt-password"),
            ("version", f"{VENV}/bin/iotpipe --version"),
            ("firstboot", "sudo cat /var/log/iotpipe-firstboot.log"),
            ("cloud-init", "sudo cloud-init status --long; sudo tail -n 40 /var/log/cloud-init-output.log"),
            ("journal", "sudo journalctl -b -u iotpipe-edge.service --no-pager | tail -n 30"),
            ("boot-partition", "ls -la /boot/firmware/iotpipe | head -40"),
        ):  # fmt: skip
            seen[name] = guest.ssh(key, command, check=False).stdout
            guest.say(f"[guest] $ {command}\n{seen[name]}")
        guest.power_off(key)
    return seen


def second_boot(guest: Guest, key: Path, readings: Subscriber) -> dict[str, str]:
    """Boot 2: readings flow again, the first-boot steps do not run again."""
    before = len(readings.lines())
    with booted(guest):
        wait_for(
            lambda: len(readings.lines()) >= before + 3,
            BOOT_TIMEOUT,
            "readings after the second boot",
        )
        guest.mark("readings after the second boot")
        wait_for(
            lambda: guest.ssh(key, "true", check=False).returncode == 0,
            600,
            "SSH on the second boot",
        )
        seen = {"firstboot": guest.ssh(key, "sudo cat /var/log/iotpipe-firstboot.log").stdout}
        seen["active"] = guest.ssh(
            key, "sudo systemctl is-active iotpipe-edge.service", check=False
        ).stdout
        guest.power_off(key)
    return seen


@dataclass
class Seen:
    """What the two boots showed: guest command outputs, the FAT after boot 1, the readings."""

    first: dict[str, str]
    second: dict[str, str]
    boot_names: list[str]
    readings: list[str]
    root: dict[str, str]


def prove(suite: str, work: Path, cache: Path, say: Say) -> Seen:
    """Build (or reuse) the card, flash it, boot it twice; what was seen, for the asserts."""
    t0 = time.monotonic()
    card = official_card(suite, cache, say)
    say(f"card ready in {time.monotonic() - t0:.0f} s")
    key = flash_card(card, work, say)
    image = work / "card.img"
    say(f"flashed in {time.monotonic() - t0:.0f} s; kernel command line: {kernel_args(image)}")
    # The device logs in with the fresh password flash registered; the test's subscriber, anonymous.
    password_file = f"password_file {work / 'mosquitto.passwd'}\n"
    broker = MosquittoProcess(work / "mosquitto", free_port(), extra_config=password_file)
    broker.start()
    readings = Subscriber(broker.port, work / "readings.txt")
    try:
        first = first_boot(Guest(card, image, work / "boot1", broker.port, say), key, readings)
        fat = FatImage(image, read_partitions(image)[0])
        boot_names = fat.names()
        second = second_boot(Guest(card, image, work / "boot2", broker.port, say), key, readings)
    finally:
        readings.close()
        broker.stop()
    root = read_root(image, work, ("/home/pi/.ssh/authorized_keys",), say)
    say(f"done in {time.monotonic() - t0:.0f} s")
    return Seen(first, second, boot_names, readings.lines(), root)


def requested() -> list[str]:
    """The suites ``IOTPIPE_BOOT`` asks for."""
    return [s for s in os.environ.get("IOTPIPE_BOOT", "").split(",") if s and s != "0"]


@pytest.mark.slow
def test_flashed_card_boots_installs_and_publishes(tmp_path: Path) -> None:
    """Flash, boot under qemu-system-aarch64: cloud-init installs the agent, readings arrive."""
    if "trixie" not in requested():
        pytest.skip("opt-in: IOTPIPE_BOOT=trixie (builds and boots an arm64 card under qemu)")
    reason = why_not()
    if reason:
        pytest.fail(f"IOTPIPE_BOOT is set but this machine cannot: {reason}")
    for boot in ("boot1", "boot2"):
        (tmp_path / boot).mkdir()
    cache = Path(os.environ.get("IOTPIPE_ARM64_CACHE", Path.home() / ".cache" / "iotpipe-edge"))
    transcript = (tmp_path / "transcript.txt").open("a")

    def say(line: str) -> None:
        print(line)
        transcript.write(line + "\n")
        transcript.flush()

    seen = prove("trixie", tmp_path, cache, say)
    first, second = seen.first, seen.second
    assert first["hostname"].strip() == "pi-boot"  # cloud-init ran our user-data
    assert first["active"].strip() == "active"
    assert "status: done" in first["cloud-init"], first["cloud-init"]
    assert "Type=notify" in first["unit"]
    assert "WatchdogUSec=30s" in first["unit"]
    assert "NRestarts=0" in first["unit"]  # the sandbox let it run: no crash loop
    assert re.search(r"^700 root /etc/iotpipe$", first["etc"], re.M), first["etc"]
    assert re.search(r"^600 root /etc/iotpipe/edge.toml$", first["etc"], re.M), first["etc"]
    assert first["version"].startswith("iotpipe ")
    assert "exit status 0" in first["firstboot"], first["firstboot"]
    boot_names = seen.boot_names
    for secret in ("iotpipe/edge.toml", "iotpipe/mqtt-password", "iotpipe/mqtt-client.key"):
        assert secret not in boot_names
    assert "iotpipe/install.sh" in boot_names  # the bundle stays: only secrets are scrubbed
    assert second["firstboot"].count("iotpipe firstboot (") == 1, second["firstboot"]
    assert second["active"].strip() == "active"
    assert len(seen.readings) >= 6
    assert "me@laptop" in seen.root["/home/pi/.ssh/authorized_keys"]


if __name__ == "__main__":
    problem = why_not()
    if problem:
        sys.exit(f"cannot boot a card here: {problem}")
    with tempfile.TemporaryDirectory(prefix="iotpipe-boot-") as tmp:
        for boot in ("boot1", "boot2"):
            (Path(tmp) / boot).mkdir()
        print(prove("trixie", Path(tmp), Path.home() / ".cache" / "iotpipe-edge", say=print))

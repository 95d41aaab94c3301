"""The first boot of a flashed image, emulated: flash, boot under qemu-system-aarch64, publish.

Two Raspberry Pi OS-shaped cards are built once and cached, one for each way Pi OS provisions a
card (:data:`FLAVOURS`): partition 1 FAT labelled ``bootfs`` (issue.txt, cmdline.txt,
config.txt), partition 2 ext4 ``rootfs`` from an arm64 Debian root (mmdebstrap: systemd,
python3-venv, openssh-server, linux-image-arm64), the FAT mounted at /boot/firmware.

* ``trixie`` ("Raspberry Pi reference 2025-11-24"): a trixie root with cloud-init, its NoCloud
  datasource reading the seed from the FAT by label, as on Pi OS Trixie. Flash writes
  ``user-data``; cloud-init runs firstboot.sh.
* ``bookworm`` ("Raspberry Pi reference 2024-11-19"): a bookworm root without cloud-init and
  with Pi OS's ``010_pi-nopasswd`` sudoers file. Flash writes Raspberry Pi Imager's
  ``firstrun.sh`` and its ``systemd.run=`` hook in cmdline.txt; the first boot runs it and
  reboots.

``iotpipe edge flash`` runs on the card as a user would run it (offline bundle, edge.toml, SSH
key, the device's fresh MQTT password registered for Mosquitto), and the card boots in
``qemu-system-aarch64 -M virt`` with the kernel and initrd of its root and the kernel command
line read from the flashed cmdline.txt at every power-on, as the Pi's firmware does
(``-no-reboot``: a reboot ends QEMU, and the next start reads cmdline.txt again). The network is
QEMU's user mode with ``restrict=on``: the guest reaches only 10.0.2.100:1883, forwarded to a
private Mosquitto on this machine (and the host reaches the guest's SSH through one forwarded
port). Behind that broker the pipeline runs as in production: ``iotpipe bridge`` -> RabbitMQ ->
``iotpipe consume`` into SQLite, receipts flowing back to the device.

Proven, first boot: cloud-init (or firstrun.sh) ran our steps (hostname, the user, the SSH key:
we log in with it), firstboot.sh installed the bundle under /opt/iotpipe-edge, the secrets are
root-only in /etc/iotpipe and gone from the FAT (read back with mtools after power-off),
iotpipe-edge.service is active (notify, watchdog, no restart) and its readings are stored.
Second boot, with the broker down: the first-boot steps do not run again, the agent keeps its
readings in the outbox and none reaches the store; the broker comes back and they are
delivered. At the end every envelope the device committed (read from the outbox files of the
card after each power-off) is stored exactly once, or still held in the outbox.

Opt-in (it takes minutes under TCG): ``IOTPIPE_TEST_BOOT=trixie,bookworm``. Needs what
``scripts/setup-arm64`` and ``scripts/setup-boot`` install. The cards are cached in
``$IOTPIPE_ARM64_CACHE`` (default ``~/.cache/iotpipe-edge``). Artefacts (serial console logs,
QEMU's output, a transcript with timings) stay in the test's tmp dir; the transcript is printed
as it goes (``-s`` shows it live).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from edge.bundle import build
from edge.image import FatImage, read_partitions
from iotpipe.envelope import Envelope, decode_telemetry
from tests.conftest import IOTPIPE, MosquittoProcess, free_port, wait_for
from tests.e2e.conftest import Service, Services, print_row, readonly
from tests.edge.test_bundle_arm64 import root_tarball, run
from tests.edge.test_bundle_arm64 import why_not as why_not_arm64
from tests.rabbitmq import blocking_channel

Say = Callable[[str], None]

#: What every root needs to boot as Pi OS does, as far as flashing is concerned.
PACKAGES = (
    "systemd-sysv", "udev", "python3", "python3-venv", "openssh-server",
    "linux-image-arm64", "initramfs-tools", "sudo", "iproute2", "netbase", "kmod",
)  # fmt: skip


@dataclass(frozen=True)
class Flavour:
    """A Raspberry Pi OS release as far as flashing and the first boot are concerned.

    Attributes:
        suite: the Debian suite of the root (and the name of the cached card).
        issue: the FAT's issue.txt, which tells ``edge flash`` how the image provisions.
        python: the root's CPython (the bundle's wheels are for it).
        cloud_init: the root has cloud-init (else flash writes firstrun.sh).
    """

    suite: str
    issue: str
    python: str
    cloud_init: bool

    @property
    def packages(self) -> tuple[str, ...]:
        return (*PACKAGES, "cloud-init") if self.cloud_init else PACKAGES


FLAVOURS = {
    flavour.suite: flavour
    for flavour in (
        Flavour(
            "trixie",
            "Raspberry Pi reference 2025-11-24\nGenerated using pi-gen, trixie\n",
            "3.13",
            cloud_init=True,
        ),
        Flavour(
            "bookworm",
            "Raspberry Pi reference 2024-11-19\n"
            "Generated using pi-gen, https://github.com/RPi-Distro/pi-gen, stage2\n",
            "3.11",
            cloud_init=False,
        ),
    )
}
SECTOR = 512
BOOT_START, BOOT_SECTORS = 8192, 524_288  # 256 MiB FAT, at 4 MiB (as Pi OS)
ROOT_START, ROOT_SECTORS = BOOT_START + BOOT_SECTORS, 5_242_880  # 2.5 GiB ext4
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
# Pi OS Bookworm's first user may sudo without a password (the file ships in the image).
SUDOERS_PI = "pi ALL=(ALL) NOPASSWD: ALL\n"
NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n"
#: Everything else a cached card is made of.
CARD_RECIPE = (
    CMDLINE, CONFIG_TXT, FSTAB, CLOUD_CFG, SUDOERS_PI, NETWORK, BOOT_START, BOOT_SECTORS,
    ROOT_SECTORS,
)  # fmt: skip
BROKER_IP = "10.0.2.100"
DEVICE = "pi-boot"
VENV = "/opt/iotpipe-edge/venv"
#: The agent's /healthz (edge.toml leaves [edge] http_port at its default).
AGENT_HEALTH = "http://127.0.0.1:9183/healthz"
#: The agent's outbox (StateDirectory= of a DynamicUser= unit: /var/lib/iotpipe-edge links here).
OUTBOX = "/var/lib/private/iotpipe-edge/outbox.db"
#: Generous: TCG emulation of a whole Debian boot, cloud-init and a pip install on a busy host.
FIRST_BOOT_TIMEOUT = 1800.0
BOOT_TIMEOUT = 900.0
#: The clock of the second boot: a Pi has no RTC, and with no network nothing sets the clock
#: (systemd moves it forward to its own release date at least).
PAST = "2020-06-01T00:00:00"
#: Envelopes the agent must hold in its outbox while the broker is down (one every 2 s).
HELD_WHILE_DOWN = 8


#: QEMU's virt machine needs only these modules to mount its root. An initramfs of just them is
#: made in seconds under qemu-user; Debian's default (MODULES=most) takes minutes, twice per
#: build (the kernel's postinst, then initramfs-tools' trigger).
VIRT_INITRAMFS = """#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
manual_add_modules virtio_pci virtio_blk virtio_net ext4 crc32c_generic
"""
#: Before the packages are installed (mmdebstrap runs the hook with the root as $1).
MMDEBSTRAP_OPTIONS = (
    "--essential-hook="
    'mkdir -p "$1/etc/initramfs-tools/conf.d" "$1/etc/initramfs-tools/hooks"\n'
    'echo MODULES=list >"$1/etc/initramfs-tools/conf.d/iotpipe-virt.conf"\n'
    "cat >\"$1/etc/initramfs-tools/hooks/iotpipe-virt\" <<'EOF'\n"
    f"{VIRT_INITRAMFS}EOF\n"
    'chmod 0755 "$1/etc/initramfs-tools/hooks/iotpipe-virt"\n',
)


def edge_toml(site: str) -> str:
    return f"""[edge]
site = "{site}"
device = "{DEVICE}"

[[edge.sensors]]
type = "simulated"
interval = 2.0
sensors = ["temperature"]

[mqtt]
url = "mqtt://{BROKER_IP}:1883"
"""


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


def customise_root(root: Path, flavour: Flavour) -> None:
    """What Pi OS has and a Debian root lacks: fstab, a network, the first-boot mechanism's setup."""
    (root / "etc" / "fstab").write_text(FSTAB)
    (root / "etc" / "hostname").write_text("raspberrypi\n")
    (root / "boot" / "firmware").mkdir(parents=True, exist_ok=True)
    if flavour.cloud_init:
        (root / "etc" / "cloud" / "cloud.cfg.d" / "99_raspberry-pi.cfg").write_text(CLOUD_CFG)
    else:
        sudoers = root / "etc" / "sudoers.d" / "010_pi-nopasswd"
        sudoers.write_text(SUDOERS_PI)
        sudoers.chmod(0o440)
    (root / "etc" / "systemd" / "network" / "20-wired.network").write_text(NETWORK)
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "systemd-networkd.service").unlink(missing_ok=True)
    (wants / "systemd-networkd.service").symlink_to(
        "/usr/lib/systemd/system/systemd-networkd.service"
    )


def boot_fat(path: Path, work: Path, flavour: Flavour, say: Say) -> None:
    """The FAT boot partition labelled ``bootfs`` with the files flash looks at."""
    files = {"issue.txt": flavour.issue, "cmdline.txt": CMDLINE, "config.txt": CONFIG_TXT}
    for name, text in files.items():
        (work / name).write_text(text)
    run(["mkfs.vfat", "-F", "32", "-n", "bootfs", "-C", str(path), str(BOOT_SECTORS // 2)], say)
    for name in files:
        run(["mcopy", "-i", str(path), str(work / name), f"::{name}"], say)


def recipe(*parts: object) -> str:
    """A short digest of what a cached file is made from: a changed recipe builds a new one."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:8]


def official_card(flavour: Flavour, cache: Path, say: Say) -> Path:
    """The cached Pi OS-shaped card directory: ``card.img``, ``vmlinuz``, ``initrd.img``."""
    root_recipe = recipe(flavour.packages, MMDEBSTRAP_OPTIONS)
    card = cache / f"boot-{flavour.suite}-{recipe(root_recipe, flavour, CARD_RECIPE)}"
    if (card / "card.img").exists():
        say(f"$ using cached {card}")
        return card
    tarball = root_tarball(
        flavour.suite,
        cache,
        say,
        name=f"boot-{root_recipe}",
        variant="apt",
        packages=flavour.packages,
        options=MMDEBSTRAP_OPTIONS,
    )
    partial = card.with_name(card.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    root = partial / "root"
    root.mkdir(parents=True)
    run(["tar", "--numeric-owner", "-xf", str(tarball), "-C", str(root)], say)
    customise_root(root, flavour)
    for pattern, name in (("vmlinuz-*", "vmlinuz"), ("initrd.img-*", "initrd.img")):
        (found,) = sorted((root / "boot").glob(pattern))
        shutil.copy2(found, partial / name)
    rootfs, fat = partial / "rootfs.ext4", partial / "bootfs.fat"
    run(
        ["mkfs.ext4", "-q", "-L", "rootfs", "-d", str(root), str(rootfs), f"{ROOT_SECTORS // 2}K"],
        say,
    )
    boot_fat(fat, partial, flavour, say)
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
                "dd", f"if={part}", f"of={image}", f"seek={start}", "bs=512",
                "conv=notrunc,sparse", "status=none",
            ],
            say,
        )  # fmt: skip
    shutil.rmtree(root)
    rootfs.unlink()
    fat.unlink()
    partial.rename(card)
    return card


# -- flashing as a user does -------------------------------------------------------------------


def iotpipe(*args: str | Path, say: Say) -> str:
    """Run the ``iotpipe`` command as the other tests do (CI: the installed wheel's)."""
    return run([*IOTPIPE, *map(str, args)], say)


def flash_card(card: Path, flavour: Flavour, site: str, work: Path, say: Say) -> Path:
    """``iotpipe edge bundle`` + ``iotpipe edge flash`` (registering the device's fresh MQTT
    password in ``mosquitto.passwd``); returns the private SSH key."""
    bundle = build(work / "bundle", [flavour.python], ["manylinux_2_36_aarch64"], progress=say)
    (work / "edge.toml").write_text(edge_toml(site))
    key = work / "id_ed25519"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "me@laptop", "-f", str(key)], say)
    iotpipe(
        "edge", "flash", "--image", card / "card.img", "--config", work / "edge.toml",
        "--ssh-key", f"{key}.pub", "--bundle", bundle.path, "--out", work / "card.img",
        "--mosquitto-password-file", work / "mosquitto.passwd", say=say,
    )  # fmt: skip
    return key


def boot_files(image: Path) -> FatImage:
    """The card's FAT, read as the firmware (or a card reader) reads it."""
    return FatImage(image, read_partitions(image)[0])


def kernel_args(image: Path) -> str:
    """The flashed cmdline.txt as the Pi's firmware passes it, on QEMU's virt machine."""
    words = (boot_files(image).read("cmdline.txt") or b"").decode().split()
    kept = [w for w in words if not w.startswith(("console=", "root=")) and w != "quiet"]
    return " ".join(
        ["root=/dev/vda2", "console=ttyAMA0", *kept, "systemd.journald.forward_to_console=1"]
    )


# -- booting ------------------------------------------------------------------------------------


class Guest:
    """One power-on of the card in qemu-system-aarch64, its serial console in a file.

    ``-no-reboot``: a reboot ends QEMU as a power-off does; the next :class:`Guest` reads the
    (possibly changed) cmdline.txt again, as the Pi's firmware does at every start.
    """

    def __init__(
        self,
        card: Path,
        image: Path,
        work: Path,
        broker_port: int,
        say: Say,
        *,
        clock: str | None = None,
    ) -> None:
        """``clock``: the real-time clock's time at power-on (default: now), e.g. a Pi with no
        RTC and no network starting with a clock in the past."""
        work.mkdir(parents=True, exist_ok=True)
        self.console = work / "console.log"
        self.ssh_port = free_port()
        self.say = say
        self.kernel_args = kernel_args(image)
        forward = f"guestfwd=tcp:{BROKER_IP}:1883-cmd:socat - TCP:127.0.0.1:{broker_port}"
        self.command = [
            "nice", "-n", "10", "qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a57",
            "-m", "1024", "-smp", "2", "-no-reboot", "-kernel", str(card / "vmlinuz"),
            "-initrd", str(card / "initrd.img"), "-append", self.kernel_args,
            "-drive", f"file={image},if=virtio,format=raw", "-display", "none",
            "-serial", f"file:{self.console}", "-monitor", "none",
            "-netdev", f"user,id=n,restrict=on,{forward},hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device", # romfile=: no PXE option ROM (it would need ipxe-qemu; -kernel boots directly).
            "virtio-net-pci,netdev=n,romfile=",
        ]  # fmt: skip
        if clock is not None:
            self.command += ["-rtc", f"base={clock}"]
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

    def alive(self) -> bool:
        """True while QEMU runs; fails the test at once if it exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            qemu = (self.console.parent / "qemu.log").read_text(errors="replace")
            pytest.fail(f"QEMU exited with {self.proc.returncode}: {qemu}\n{self.log()[-3000:]}")
        return True

    def running_and(self, marker: str) -> Callable[[], bool]:
        """A condition: ``marker`` is on the console (failing at once if QEMU exited)."""

        def seen() -> bool:
            self.alive()
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
                "ssh", "-i", str(key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR", "pi@127.0.0.1", command,
            ],
            capture_output=True, text=True, check=False, timeout=300,
        )  # fmt: skip
        if check:
            assert done.returncode == 0, f"ssh {command!r}: {done.returncode} {done.stderr}"
        return done

    def wait_ssh(self, key: Path) -> None:
        def logged_in() -> bool:
            self.alive()
            return self.ssh(key, "true", check=False).returncode == 0

        wait_for(logged_in, 600, "SSH login as pi with the flashed key")
        self.mark("SSH login as pi with the flashed key")

    def backlog(self, key: Path) -> int:
        """Envelopes the running agent holds in its outbox, from its /healthz (-1 if unknown).

        (The outbox file itself is locked by its one owner, the agent.)"""
        query = (
            "import json, urllib.request, urllib.error\n"
            "try:\n"
            f"    body = urllib.request.urlopen('{AGENT_HEALTH}', timeout=10).read()\n"
            "except urllib.error.HTTPError as err:\n"
            "    body = err.read()\n"
            "print(json.loads(body)['backlog'])\n"
        )
        done = self.ssh(key, f"python3 -c {shlex.quote(query)}", check=False)
        held = done.stdout.strip()
        return int(held) if held.isdigit() else -1

    def wait_exit(self, timeout: float, what: str) -> None:
        """Wait for QEMU to end by itself (a power-off or a reboot)."""
        assert self.proc is not None
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}\n{self.log()[-3000:]}")
        self.mark(what)

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


def every(seconds: float, condition: Callable[[], object]) -> Callable[[], object]:
    """``condition`` evaluated at most once per ``seconds`` (SSH into an emulated guest is slow)."""
    last = [-seconds]

    def paced() -> object:
        now = time.monotonic()
        if now - last[0] < seconds:
            return False
        last[0] = now
        return condition()

    return paced


def read_root(image: Path, work: Path, paths: tuple[str, ...], say: Say) -> dict[str, bytes]:
    """Files of the card's ext4 root after power-off (dd the partition out, ``debugfs dump``);
    a missing file is left out."""
    rootfs = work / "rootfs.ext4"
    run(
        [
            "dd", f"if={image}", f"of={rootfs}", f"skip={ROOT_START * SECTOR}",
            f"count={ROOT_SECTORS * SECTOR}", "iflag=skip_bytes,count_bytes", "bs=4M",
            "conv=sparse", "status=none",
        ],
        say,
    )  # fmt: skip
    found = {}
    for n, path in enumerate(paths):
        out = work / f"dumped-{n}"
        out.unlink(missing_ok=True)
        subprocess.run(
            ["debugfs", "-R", f"dump {path} {out}", str(rootfs)], capture_output=True, check=False
        )
        if out.is_file() and out.stat().st_size:
            found[path] = out.read_bytes()
        out.unlink(missing_ok=True)
    rootfs.unlink()
    return found


# -- the pipeline behind the broker --------------------------------------------------------------


@dataclass
class Pipeline:
    """The private Mosquitto the guest reaches, the bridge, the consumer and its SQLite store."""

    site: str
    broker: MosquittoProcess
    services: Services
    bridge: Service
    consumer: Service
    db: Path

    def stored(self) -> int:
        """Envelopes of the device in the store."""
        if not self.db.exists():
            return 0
        with readonly(self.db) as conn:
            try:
                query = "SELECT count(*) FROM messages WHERE site = ? AND device = ?"
                return int(conn.execute(query, (self.site, DEVICE)).fetchone()[0])
            except sqlite3.OperationalError:  # no table before the first store
                return 0

    def copies(self) -> Counter[tuple[str, int]]:
        """How often each (boot, seq) of the device is in the store."""
        with readonly(self.db) as conn:
            rows = conn.execute(
                "SELECT boot, seq FROM messages WHERE site = ? AND device = ?", (self.site, DEVICE)
            )
            return Counter((str(boot), int(seq)) for boot, seq in rows)

    def readings(self, boot: str) -> list[tuple[int, str]]:
        """(time, tags) of the readings of one boot of the device in the store."""
        with readonly(self.db) as conn:
            rows = conn.execute(
                "SELECT r.ts_ms, coalesce(r.tags, '') FROM readings r JOIN messages m"
                " ON r.msg_id = m.id WHERE m.site = ? AND m.device = ? AND m.boot = ?",
                (self.site, DEVICE, boot),
            )
            return [(int(ts), str(tags)) for ts, tags in rows]

    def logs(self) -> str:
        log = self.broker.workdir / "mosquitto.log"
        tail = log.read_text(errors="replace").splitlines()[-15:] if log.is_file() else []
        return self.services.logs() + "\n--- mosquitto.log\n" + "\n".join(tail)


@contextmanager
def pipeline(work: Path, amqp_url: str, site: str) -> Iterator[Pipeline]:
    """Start the pipeline on ``site``'s own queues; everything is stopped and deleted after."""
    password_file = f"password_file {work / 'mosquitto.passwd'}\n"
    broker = MosquittoProcess(work / "mosquitto", free_port(), extra_config=password_file)
    services = Services(work)
    db = work / "telemetry.db"
    consumer = services.consumer(
        "consumer", amqp_url=amqp_url, store=f"sqlite:///{db}", queue=f"{site}.store",
        bindings=[f"iotpipe.v1.{site}.#"],
    )  # fmt: skip
    bridge = services.bridge(
        "bridge", mqtt_url=f"mqtt://127.0.0.1:{broker.port}", amqp_url=amqp_url,
        client_id=f"{site}-bridge", receipt_queue=f"{site}.receipts",
        receipt_binding=f"iotpipe.v1.{site}.*.receipt",
    )  # fmt: skip
    broker.start()
    try:
        consumer.start().wait_ready()
        bridge.start().wait_ready()
        yield Pipeline(site, broker, services, bridge, consumer, db)
    finally:
        services.kill_all()
        broker.stop()
        with blocking_channel(amqp_url) as channel:
            for queue in (f"{site}.store", f"{site}.receipts"):
                channel.queue_delete(queue)


# -- the proof ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxFile:
    """The device's outbox file as a power-off left it.

    Attributes:
        boot: the boot label of the last boot the agent ran in.
        next_seq: envelopes committed in that boot (seq 0 .. next_seq - 1).
        held: (boot, seq) of the envelopes still in it (not yet receipted).
    """

    boot: str
    next_seq: int
    held: frozenset[tuple[str, int]]


def read_outbox(image: Path, work: Path, say: Say) -> OutboxFile | None:
    """The card's outbox after power-off (None if the agent never ran)."""
    files = read_root(image, work, (OUTBOX, f"{OUTBOX}-wal"), say)
    if OUTBOX not in files:
        return None
    copy = work / "outbox.db"
    copy.write_bytes(files[OUTBOX])
    wal = Path(f"{copy}-wal")
    wal.unlink(missing_ok=True)
    if f"{OUTBOX}-wal" in files:
        wal.write_bytes(files[f"{OUTBOX}-wal"])
    with closing(sqlite3.connect(copy)) as conn:
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        envelopes = [
            decode_telemetry(bytes(p)) for (p,) in conn.execute("SELECT payload FROM outbox")
        ]
    held = frozenset((str(e.boot), e.seq) for e in envelopes if isinstance(e, Envelope))
    state = OutboxFile(meta["boot"], int(meta["next_seq"]), held)
    say(f"outbox after power-off: boot {state.boot}, next_seq {state.next_seq}, held {len(held)}")
    return state


INSPECT = (
    ("hostname", "hostname"),
    ("active", "sudo systemctl is-active iotpipe-edge.service"),
    ("unit", "sudo systemctl show -p Type -p WatchdogUSec -p NRestarts iotpipe-edge.service"),
    ("etc", "sudo stat -c '%a %U %n' /etc/iotpipe /etc/iotpipe/edge.toml /etc/iotpipe/credentials/mqtt-password"),
    ("version", f"{VENV}/bin/iotpipe --version"),
    ("firstboot", "sudo cat /var/log/iotpipe-firstboot.log"),
    ("cloud-init", "sudo cloud-init status --long; sudo tail -n 40 /var/log/cloud-init-output.log"),
    ("journal", "sudo journalctl -b -u iotpipe-edge.service --no-pager | tail -n 30"),
    ("boot-partition", "ls -la /boot/firmware /boot/firmware/iotpipe | head -60"),
)  # fmt: skip


PowerOn = Callable[[str, str | None], Guest]


def first_boot(
    power_on: PowerOn, flavour: Flavour, image: Path, key: Path, pipe: Pipeline
) -> dict[str, str]:
    """The first power-on (for firstrun.sh: its reboot, then the next power-on) until readings
    are stored; look inside, power off; what was seen."""
    seen: dict[str, str] = {}
    if not flavour.cloud_init:
        guest = power_on("boot1-firstrun", None)
        seen["firstrun-cmdline"] = guest.kernel_args
        with booted(guest):
            wait_for(guest.running_and("Linux version"), 120, "the kernel on the serial console")
            guest.mark("kernel started")
            # firstrun.sh runs in kernel-command-line.target, then systemd reboots: QEMU ends.
            guest.wait_exit(FIRST_BOOT_TIMEOUT, "firstrun.sh done, rebooted")
        fat = boot_files(image)
        seen["after-firstrun"] = "\n".join(fat.names())
        seen["cmdline-after-firstrun"] = (fat.read("cmdline.txt") or b"").decode()
    guest = power_on("boot1", None)
    with booted(guest):
        wait_for(guest.running_and("Linux version"), 120, "the kernel on the serial console")
        guest.mark("kernel started")
        if flavour.cloud_init:
            wait_for(
                lambda: "Cloud-init" in guest.log() and "finished at" in guest.log(),
                FIRST_BOOT_TIMEOUT,
                "cloud-init final",
            )
            guest.mark("cloud-init finished")
        wait_for(
            every(2, lambda: guest.alive() and pipe.stored() >= 3),
            FIRST_BOOT_TIMEOUT,
            "3 envelopes stored (device -> broker -> bridge -> RabbitMQ -> consumer)",
        )
        guest.mark(f"{pipe.stored()} envelopes stored")
        guest.wait_ssh(key)
        for name, command in INSPECT:
            seen[name] = guest.ssh(key, command, check=False).stdout
            guest.say(f"[guest] $ {command}\n{seen[name]}")
        guest.power_off(key)
    return seen


def reboot_broker_down(power_on: PowerOn, key: Path, pipe: Pipeline) -> dict[str, str]:
    """Boot 2 with the broker down: the first-boot steps do not run again, readings wait in the
    outbox, none is stored; the broker comes back and they are delivered."""
    pipe.broker.stop()
    before = pipe.stored()
    guest = power_on("boot2", PAST)
    seen: dict[str, str] = {}
    with booted(guest):
        guest.wait_ssh(key)
        wait_for(
            every(5, lambda: guest.backlog(key) >= HELD_WHILE_DOWN),
            BOOT_TIMEOUT,
            f"{HELD_WHILE_DOWN} envelopes held in the outbox",
        )
        count = guest.backlog(key)
        guest.mark(f"broker down: {count} envelopes held in the outbox")
        # The boots of what is stored by now (boot 1's last envelopes may still land).
        seen["boots-stored-while-down"] = " ".join(sorted({boot for boot, _ in pipe.copies()}))
        seen["clock"] = guest.ssh(key, "date -u +%Y-%m-%dT%H:%M:%SZ").stdout
        seen["firstboot"] = guest.ssh(key, "sudo cat /var/log/iotpipe-firstboot.log").stdout
        seen["active"] = guest.ssh(
            key, "sudo systemctl is-active iotpipe-edge.service", check=False
        ).stdout
        pipe.broker.start()
        guest.mark("broker back")
        wait_for(
            every(2, lambda: guest.alive() and pipe.stored() >= before + count),
            BOOT_TIMEOUT,
            f"the {count} held envelopes stored",
        )
        guest.mark(f"{pipe.stored() - before} envelopes stored since the broker came back")
        # Receipted: the outbox empties down to what is in flight.
        wait_for(every(5, lambda: 0 <= guest.backlog(key) <= 2), BOOT_TIMEOUT, "the outbox drained")
        guest.mark("outbox drained")
        seen["journal"] = guest.ssh(
            key, "sudo journalctl -b -u iotpipe-edge.service --no-pager | tail -n 20", check=False
        ).stdout
        guest.say(f"[guest] journal\n{seen['journal']}")
        guest.power_off(key)
    return seen


@dataclass
class Seen:
    """What the boots showed: guest command outputs, the FAT after boot 1, the reckoning."""

    first: dict[str, str]
    second: dict[str, str]
    boot_names: list[str]
    root: dict[str, bytes]
    outboxes: list[OutboxFile]
    copies: Counter[tuple[str, int]]
    readings: dict[str, list[tuple[int, str]]]


def committed(outboxes: list[OutboxFile]) -> set[tuple[str, int]]:
    """Every (boot, seq) the device committed, per the outbox file after each power-off."""
    return {(o.boot, seq) for o in outboxes for seq in range(o.next_seq)}


def prove(flavour: Flavour, card: Path, work: Path, amqp_url: str, site: str, say: Say) -> Seen:
    """Flash the card, boot it (twice, or three times for firstrun.sh); what was seen."""
    t0 = time.monotonic()
    key = flash_card(card, flavour, site, work, say)
    image = work / "card.img"
    say(f"flashed in {time.monotonic() - t0:.0f} s; kernel command line: {kernel_args(image)}")
    outboxes: list[OutboxFile] = []

    def after_power_off() -> None:
        state = read_outbox(image, work, say)
        if state is not None and state.boot not in {o.boot for o in outboxes}:
            outboxes.append(state)
        elif state is not None:
            outboxes[-1] = state

    with pipeline(work, amqp_url, site) as pipe:

        def power_on(name: str, clock: str | None) -> Guest:
            after_power_off()  # what the last power-on left in the outbox
            return Guest(card, image, work / name, pipe.broker.port, say, clock=clock)

        try:
            first = first_boot(power_on, flavour, image, key, pipe)
            boot_names = boot_files(image).names()
            second = reboot_broker_down(power_on, key, pipe)
            after_power_off()
            # Everything committed and not held in the outbox reaches the store.
            unheld = committed(outboxes) - outboxes[-1].held
            wait_for(
                every(1, lambda: unheld <= pipe.copies().keys()),
                120,
                "every committed envelope stored",
            )
        except BaseException:
            say(pipe.logs())
            raise
        copies = pipe.copies()
        readings = {o.boot: pipe.readings(o.boot) for o in outboxes}
    root = read_root(image, work, ("/home/pi/.ssh/authorized_keys",), say)
    say(f"done in {time.monotonic() - t0:.0f} s")
    return Seen(first, second, boot_names, root, outboxes, copies, readings)


#: Where the artefacts of the last run of each flavour are kept (build/ is not under git).
ARTEFACTS = Path(__file__).resolve().parents[2] / "build" / "first-boot"


def keep_artefacts(work: Path, to: Path) -> None:
    """Copy the run's logs (serial consoles, QEMU, bridge, consumer, Mosquitto, the transcript
    with timings) to ``to``, replacing an earlier run's."""
    shutil.rmtree(to, ignore_errors=True)
    for path in sorted(work.rglob("*")):
        relative = path.relative_to(work)
        if (
            path.is_file()
            and path.suffix in (".log", ".txt", ".toml")
            and relative.parts[0] != "bundle"
            and path.name != "edge.toml"
        ):
            target = to / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    print(f"artefacts: {to}")


def requested() -> list[str]:
    """The flavours ``IOTPIPE_TEST_BOOT`` asks for."""
    return [s for s in os.environ.get("IOTPIPE_TEST_BOOT", "").split(",") if s and s != "0"]


@pytest.fixture(scope="module")
def cards() -> dict[str, Path]:
    """The requested flavours' cards (none if this machine cannot build them). Missing ones are
    built side by side: a build is mostly one dpkg under qemu-user, one core each."""
    wanted = [FLAVOURS[suite] for suite in requested() if suite in FLAVOURS]
    if not wanted or why_not():
        return {}
    cache = Path(os.environ.get("IOTPIPE_ARM64_CACHE", Path.home() / ".cache" / "iotpipe-edge"))
    began = time.monotonic()

    def one(flavour: Flavour) -> Path:
        card = official_card(flavour, cache, lambda line: print(f"[{flavour.suite}] {line}"))
        print(f"[{flavour.suite}] card ready after {time.monotonic() - began:.0f} s")
        return card

    with ThreadPoolExecutor(len(wanted)) as pool:
        return dict(zip((f.suite for f in wanted), pool.map(one, wanted), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("suite", list(FLAVOURS))
def test_flashed_card_boots_installs_and_delivers(
    suite: str, cards: dict[str, Path], tmp_path: Path, rabbitmq_url: str, unique: str
) -> None:
    """Flash, boot under qemu-system-aarch64: the agent installs itself, readings are stored;
    a reboot with the broker down holds them until it is back."""
    if suite not in requested():
        pytest.skip(
            f"opt-in: IOTPIPE_TEST_BOOT={suite} (builds and boots an arm64 card under qemu)"
        )
    reason = why_not()
    if reason:
        pytest.fail(f"IOTPIPE_TEST_BOOT is set but this machine cannot: {reason}")
    flavour = FLAVOURS[suite]
    transcript = (tmp_path / "transcript.txt").open("a")

    def say(line: str) -> None:
        print(line)
        transcript.write(line + "\n")
        transcript.flush()

    began = time.monotonic()
    try:
        seen = prove(flavour, cards[suite], tmp_path, rabbitmq_url, f"boot{unique}", say)
    finally:
        keep_artefacts(tmp_path, ARTEFACTS / suite)
    first, second = seen.first, seen.second
    # The first-boot mechanism ran our steps once.
    if flavour.cloud_init:
        assert "status: done" in first["cloud-init"], first["cloud-init"]
    else:
        assert "systemd.run=/boot/firmware/firstrun.sh" in first["firstrun-cmdline"]
        assert "firstrun.sh" not in first["after-firstrun"].split()
        assert "systemd.run" not in first["cmdline-after-firstrun"], first["cmdline-after-firstrun"]
    assert first["hostname"].strip() == DEVICE
    assert "exit status 0" in first["firstboot"], first["firstboot"]
    assert first["version"].startswith("iotpipe ")
    # The agent runs as a notify unit under its watchdog, sandboxed, without a crash loop.
    assert first["active"].strip() == "active"
    assert "Type=notify" in first["unit"]
    assert "WatchdogUSec=30s" in first["unit"]
    assert "NRestarts=0" in first["unit"]
    # The secrets: root-only on the root file system, gone from the FAT; the bundle stays.
    assert re.search(r"^700 root /etc/iotpipe$", first["etc"], re.M), first["etc"]
    assert re.search(r"^600 root /etc/iotpipe/edge.toml$", first["etc"], re.M), first["etc"]
    for secret in ("iotpipe/edge.toml", "iotpipe/mqtt-password", "iotpipe/mqtt-client.key"):
        assert secret not in seen.boot_names
    assert "iotpipe/install.sh" in seen.boot_names
    assert b"me@laptop" in seen.root["/home/pi/.ssh/authorized_keys"]
    # Boot 2, the broker down: no second first boot; readings held, then delivered.
    assert second["firstboot"].count("iotpipe firstboot (") == 1, second["firstboot"]
    assert second["active"].strip() == "active"
    assert seen.outboxes[-1].boot not in second["boots-stored-while-down"].split()
    # Boot 2 started with its clock in the past: its readings are stored with the times it
    # had, earlier than boot 1's; every reading is tagged clock=unsynced (no NTP here).
    before, after = (seen.readings[o.boot] for o in seen.outboxes[-2:])
    assert before
    assert after
    assert max(ts for ts, _ in after) < min(ts for ts, _ in before)
    tags = [json.loads(tag or "{}") for boot in seen.readings.values() for _, tag in boot]
    assert all(tag == {"clock": "unsynced"} for tag in tags), tags
    # Every envelope the device committed is stored exactly once (or still held for the next
    # boot); nothing stored that it did not commit.
    sent = committed(seen.outboxes)
    held = seen.outboxes[-1].held
    lost = sent - held - seen.copies.keys()
    doubled = sum(n - 1 for n in seen.copies.values())
    strangers = seen.copies.keys() - sent
    print_row(
        f"first boot {suite}",
        boots=len(seen.outboxes),
        committed=len(sent),
        stored=len(seen.copies),
        held=len(held),
        lost=len(lost),
        doubled=doubled,
        strangers=len(strangers),
        time=f"{time.monotonic() - began:.0f}s",
    )
    assert len(seen.outboxes) >= 2
    assert len(sent) >= HELD_WHILE_DOWN + 3
    assert not lost, f"{len(lost)} committed envelopes never stored: {sorted(lost)[:10]}"
    assert doubled == 0
    assert not strangers, f"stored and never committed: {sorted(strangers)[:10]}"

"""Disk images: the MBR reader, copying/decompressing, mtools access, and style detection.

Images are synthetic but real: an MBR made by sfdisk, a FAT32 boot partition made by mkfs.fat
and filled with mtools, an ext4 root made by mkfs.ext4 -d. A missing tool fails the test with
the package to install (never a silent skip): ``make setup`` installs them.
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from edge.image import (
    BootDirectory,
    FatImage,
    ImageError,
    boot_partition,
    copy_image,
    read_partitions,
    sha256_range,
)
from edge.provision import (
    CMDLINE_HOOK,
    Style,
    add_firstrun_hook,
    detect_style,
    enable_interfaces,
)
from iotpipe import __version__

MIB = 1024 * 1024
#: The name of this version's wheel, as `iotpipe edge bundle` puts it in the bundle.
WHEEL = f"iotpipe-{__version__}-py3-none-any.whl"
BOOT_START = 8192  # sectors, as in Raspberry Pi OS images (4 MiB)
BOOT_SECTORS = 40 * MIB // 512  # FAT32 needs >= 65525 clusters: 40 MiB of 512-byte clusters
ROOT_START = BOOT_START + BOOT_SECTORS
IMAGE_SIZE = 80 * MIB
_TOOLS = {
    "sfdisk": "fdisk",
    "mkfs.fat": "dosfstools",
    "mkfs.ext4": "e2fsprogs",
    "mcopy": "mtools",
}

CMDLINE = (
    "console=serial0,115200 console=tty1 root=PARTUUID=1234abcd-02 rootfstype=ext4 "
    "fsck.repair=yes rootwait quiet splash plymouth.ignore-serial-consoles\n"
)
CONFIG_TXT = (
    "# For more options and information see\n"
    "# http://rptl.io/configtxt\n"
    "#dtparam=i2c_arm=on\n"
    "#dtparam=spi=on\n"
    "dtparam=audio=on\n"
    "camera_auto_detect=1\n"
    "auto_initramfs=1\n"
    "dtoverlay=vc4-kms-v3d\n"
    "[cm4]\n"
    "otg_mode=1\n"
    "[all]\n"
)
TRIXIE_FILES = {
    "cmdline.txt": CMDLINE,
    "config.txt": CONFIG_TXT,
    "issue.txt": "Raspberry Pi reference 2025-11-24\nGenerated using pi-gen, "
    "https://github.com/RPi-Distro/pi-gen, 0123abcd, stage2\n",
    "user-data": "#cloud-config\n# Default user-data: see the Raspberry Pi documentation.\n",
    "meta-data": "instance-id: rpi-image\n",
    "network-config": "network:\n  version: 2\n",
    "overlays/w1-gpio.dtbo": "dtbo",
    "kernel8.img": "kernel" * 100,
}
BOOKWORM_FILES = {
    "cmdline.txt": CMDLINE,
    "config.txt": CONFIG_TXT,
    "issue.txt": "Raspberry Pi reference 2024-11-19\nGenerated using pi-gen, "
    "https://github.com/RPi-Distro/pi-gen, 891df1e2, stage2\n",
    "overlays/w1-gpio.dtbo": "dtbo",
    "kernel8.img": "kernel" * 100,
}


def need_tools() -> None:
    """Fail (not skip) with the package to install when an image tool is missing."""
    missing = sorted({pkg for tool, pkg in _TOOLS.items() if shutil.which(tool) is None})
    if missing:
        pytest.fail(f"missing tools: apt-get install {' '.join(missing)} (make setup does it)")


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


def build_image(directory: Path, files: dict[str, str], *, name: str = "raspios.img") -> Path:
    """A small Raspberry Pi OS look-alike: MBR, FAT32 boot partition with ``files``, ext4 root."""
    need_tools()
    image = directory / name
    with image.open("wb") as fh:
        fh.truncate(IMAGE_SIZE)
    table = f"label: dos\nstart={BOOT_START}, size={BOOT_SECTORS}, type=c\nstart={ROOT_START}, type=83\n"
    subprocess.run(
        ["sfdisk", "--quiet", str(image)], input=table.encode(), check=True, capture_output=True
    )
    _run(
        "mkfs.fat",
        "-F",
        "32",
        "-s",
        "1",
        "-n",
        "BOOTFS",
        "--offset",
        str(BOOT_START),
        str(image),
        str(BOOT_SECTORS // 2),
    )
    staging = directory / f"{name}.boot"
    for path, text in files.items():
        (staging / path).parent.mkdir(parents=True, exist_ok=True)
        (staging / path).write_text(text)
    entries = [str(p) for p in staging.iterdir()]
    subprocess.run(
        ["mcopy", "-s", "-i", f"{image}@@{BOOT_START * 512}", *entries, "::/"],
        check=True,
        capture_output=True,
        env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
    )
    rootfs = directory / f"{name}.rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "os-release").write_text('PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\n')
    ext4 = directory / f"{name}.ext4"
    root_bytes = IMAGE_SIZE - ROOT_START * 512
    _run(
        "mkfs.ext4",
        "-q",
        "-F",
        "-d",
        str(rootfs),
        "-L",
        "rootfs",
        str(ext4),
        f"{root_bytes // 1024}k",
    )
    with image.open("r+b") as out:
        out.seek(ROOT_START * 512)
        out.write(ext4.read_bytes())
    return image


def digest(path: Path) -> str:
    """SHA-256 of a whole file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trixie_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One Trixie-like image per module (tests copy it before changing anything)."""
    return build_image(tmp_path_factory.mktemp("trixie"), TRIXIE_FILES)


# -- the partition table -----------------------------------------------------------------------


def test_partitions_are_read_from_the_mbr(trixie_template: Path) -> None:
    """The two partitions sfdisk wrote come back with types, byte offsets and sizes."""
    parts = read_partitions(trixie_template)
    assert [(p.number, p.type_id, p.start_sector) for p in parts] == [
        (1, 0x0C, BOOT_START),
        (2, 0x83, ROOT_START),
    ]
    assert parts[0].offset == BOOT_START * 512
    assert parts[0].size == 40 * MIB
    assert parts[0].type_name == "FAT32 (LBA)"
    assert parts[1].type_name == "Linux"
    assert parts[1].offset + parts[1].size == IMAGE_SIZE
    assert boot_partition(trixie_template, parts) == parts[0]


def test_a_file_without_mbr_is_refused(tmp_path: Path) -> None:
    """A file that is not a disk image gives one clear line."""
    junk = tmp_path / "photo.img"
    junk.write_bytes(b"\x89PNG" + bytes(600))
    with pytest.raises(ImageError, match="not a disk image"):
        read_partitions(junk)


def test_an_image_without_fat_partition_is_refused(tmp_path: Path) -> None:
    """Only a Linux partition: the error names what was found."""
    need_tools()
    image = tmp_path / "linux.img"
    image.write_bytes(b"")
    with image.open("wb") as fh:
        fh.truncate(8 * MIB)
    subprocess.run(
        ["sfdisk", "-q", str(image)], input=b"label: dos\nstart=2048, type=83\n", check=True
    )
    with pytest.raises(ImageError, match=r"no FAT boot partition \(partitions 1: Linux\)"):
        boot_partition(image, read_partitions(image))


def test_a_truncated_image_is_refused(trixie_template: Path, tmp_path: Path) -> None:
    """A partition running past the end of the file means a broken download."""
    short = tmp_path / "short.img"
    with trixie_template.open("rb") as src:
        short.write_bytes(src.read(10 * MIB))
    with pytest.raises(ImageError, match="truncated download"):
        read_partitions(short)


# -- copying -----------------------------------------------------------------------------------


def test_copy_decompresses_xz_and_keeps_the_input(trixie_template: Path, tmp_path: Path) -> None:
    """An .img.xz is decompressed byte-exactly; the compressed input is not touched."""
    packed = tmp_path / "raspios.img.xz"
    packed.write_bytes(lzma.compress(trixie_template.read_bytes(), preset=0))
    before = digest(packed)
    seen: list[tuple[int, int]] = []
    out = tmp_path / "out.img"
    copy_image(packed, out, lambda done, total: seen.append((done, total)))
    assert digest(out) == digest(trixie_template)
    assert digest(packed) == before
    assert seen
    assert seen[-1][0] == seen[-1][1] == packed.stat().st_size
    # Zero runs are holes: the copy takes less disk than its size.
    assert out.stat().st_blocks * 512 < out.stat().st_size
    assert not list(tmp_path.glob(".*.partial"))


def test_a_corrupt_xz_leaves_no_output(tmp_path: Path) -> None:
    """A damaged download fails in one line and leaves no half-written image."""
    packed = tmp_path / "bad.img.xz"
    packed.write_bytes(lzma.compress(bytes(MIB))[:40])
    with pytest.raises(ImageError, match="xz"):
        copy_image(packed, tmp_path / "out.img")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.img.xz"]


# -- files on the boot partition ---------------------------------------------------------------


def test_fat_image_reads_writes_and_removes(trixie_template: Path, tmp_path: Path) -> None:
    """mtools access: list, read, write into new directories, copy a tree, delete."""
    image = tmp_path / "work.img"
    shutil.copyfile(trixie_template, image)
    root_before = sha256_range(image, ROOT_START * 512, IMAGE_SIZE - ROOT_START * 512)
    fat = FatImage(image, read_partitions(image)[0])
    assert "cmdline.txt" in fat.names()
    assert "overlays/w1-gpio.dtbo" in fat.names()
    assert fat.read("cmdline.txt") == CMDLINE.encode()
    assert fat.read("missing.txt") is None
    fat.write("iotpipe/secrets/a-long-name.toml", b"x = 1\n")
    assert fat.read("iotpipe/secrets/a-long-name.toml") == b"x = 1\n"
    fat.write("iotpipe/secrets/a-long-name.toml", b"x = 2\n")
    assert fat.read("iotpipe/secrets/a-long-name.toml") == b"x = 2\n"
    tree = tmp_path / "tree"
    (tree / "wheels").mkdir(parents=True)
    (tree / "install.sh").write_text("#!/bin/sh\n")
    (tree / "wheels" / WHEEL).write_bytes(b"PK")
    assert fat.copy_tree(tree, "iotpipe") == [
        "iotpipe/install.sh",
        f"iotpipe/wheels/{WHEEL}",
    ]
    assert fat.read(f"iotpipe/wheels/{WHEEL}") == b"PK"
    fat.remove("iotpipe/secrets/a-long-name.toml")
    fat.remove("iotpipe/secrets/a-long-name.toml")
    assert "iotpipe/secrets/a-long-name.toml" not in fat.names()
    assert sha256_range(image, ROOT_START * 512, IMAGE_SIZE - ROOT_START * 512) == root_before


def test_missing_mtools_is_one_clear_line(
    trixie_template: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without mtools the error says how to install it."""
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    fat = FatImage(trixie_template, read_partitions(trixie_template)[0])
    with pytest.raises(ImageError, match=r"apt-get install mtools") as caught:
        fat.names()
    assert "\n" not in str(caught.value)


# -- detection and the pure edits ---------------------------------------------------------------


def _boot(tmp_path: Path, files: dict[str, str]) -> BootDirectory:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return BootDirectory(tmp_path)


@pytest.mark.parametrize(
    ("files", "style", "reason"),
    [
        ({"user-data": "", "meta-data": ""}, Style.CLOUD_INIT, "user-data, meta-data on the boot"),
        ({"network-config": ""}, Style.CLOUD_INIT, "network-config"),
        ({"cmdline.txt": "root=/dev/x ds=nocloud;s=/boot/"}, Style.CLOUD_INIT, "ds=nocloud"),
        ({"issue.txt": "Raspberry Pi reference 2025-11-24\n"}, Style.CLOUD_INIT, "2025-11-24"),
        ({"issue.txt": "Raspberry Pi reference 2026-02-03\n"}, Style.CLOUD_INIT, "2026-02-03"),
        ({"issue.txt": "Raspberry Pi reference 2025-10-01\n"}, Style.FIRSTRUN, "2025-10-01"),
        ({"issue.txt": "Raspberry Pi reference 2024-11-19\n"}, Style.FIRSTRUN, "2024-11-19"),
        ({"issue.txt": "custom bookworm build\n"}, Style.FIRSTRUN, "bookworm"),
        ({"issue.txt": "custom Trixie build\n"}, Style.CLOUD_INIT, "trixie"),
        (
            {"iotpipe/MANIFEST.json": '{"style": "firstrun"}', "issue.txt": "trixie"},
            Style.FIRSTRUN,
            "provisioned before",
        ),
        ({"config.txt": ""}, None, "no cloud-init files"),
    ],
)
def test_style_markers(
    tmp_path: Path, files: dict[str, str], style: Style | None, reason: str
) -> None:
    """Each documented marker decides the style, in order; none leaves it undecided."""
    found = detect_style(_boot(tmp_path, files))
    assert found.style == style
    assert reason in found.reason


def test_config_txt_gets_the_lines_once() -> None:
    """Commented-out defaults do not count; a second pass changes nothing."""
    once = enable_interfaces(CONFIG_TXT)
    assert once.startswith(CONFIG_TXT)
    assert once[len(CONFIG_TXT) :].splitlines()[-3:] == [
        "[all]",
        "dtparam=i2c_arm=on",
        "dtoverlay=w1-gpio",
    ]
    assert enable_interfaces(once) == once
    partly = enable_interfaces("dtparam=i2c_arm=on")
    assert partly.splitlines()[0] == "dtparam=i2c_arm=on"
    assert partly.count("i2c_arm") == 1
    assert partly.endswith("dtoverlay=w1-gpio\n")


def test_cmdline_stays_one_line_with_the_hook_once() -> None:
    """The hook is appended to the single line, once, however often it is applied."""
    once = add_firstrun_hook(CMDLINE)
    assert once == CMDLINE.rstrip("\n") + " " + CMDLINE_HOOK + "\n"
    assert add_firstrun_hook(once) == once
    assert add_firstrun_hook("a b\n\n") == f"a b {CMDLINE_HOOK}\n"

"""Disk images of Raspberry Pi OS: the MBR partition table, and the FAT boot partition via mtools.

Nothing here needs root or a mount: the partition table is read with :mod:`struct`, and files on
the FAT boot partition are read and written with mtools (``mcopy -i image@@offset``), which edits
the bytes of that partition only. Callers always work on a copy (:func:`copy_image`); the
official image they started from is never opened for writing.

:class:`FatImage` and :class:`BootDirectory` (an already-mounted boot partition) implement the
same small :class:`BootFiles` seam, so :mod:`edge.provision` writes both the same way.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from iotpipe.errors import IotpipeError

__all__ = [
    "BootDirectory",
    "BootFiles",
    "FatImage",
    "ImageError",
    "Partition",
    "boot_partition",
    "copy_image",
    "is_xz",
    "read_partitions",
]

SECTOR = 512
#: MBR partition types of a FAT boot partition: FAT32 LBA (Pi OS), FAT32 CHS, FAT16 (LBA).
FAT_TYPES = frozenset({0x0C, 0x0B, 0x0E, 0x06})
_TYPE_NAMES = {
    0x0C: "FAT32 (LBA)",
    0x0B: "FAT32",
    0x0E: "FAT16 (LBA)",
    0x06: "FAT16",
    0x83: "Linux",
    0x82: "Linux swap",
    0x05: "extended",
    0x0F: "extended (LBA)",
    0xEE: "GPT protective",
}
_XZ_MAGIC = b"\xfd7zXZ\x00"
_CHUNK = 4 * 1024 * 1024
_ZEROS = bytes(_CHUNK)

#: Reports progress of a long copy: (bytes done, bytes in total).
Progress = Callable[[int, int], None]


class ImageError(IotpipeError):
    """A disk image (or a tool to edit it) is not what flashing needs.

    Attributes:
        subject: the image, file or tool concerned.
        reason: what is wrong, and what to do about it.
    """

    exit_code = 2

    def __init__(self, subject: str | os.PathLike[str], reason: str) -> None:
        self.subject = str(subject)
        self.reason = reason
        super().__init__(f"{self.subject}: {reason}")


# -- the partition table -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Partition:
    """One primary MBR partition."""

    number: int
    type_id: int
    bootable: bool
    start_sector: int
    sectors: int

    @property
    def offset(self) -> int:
        """Byte offset of the partition in the image."""
        return self.start_sector * SECTOR

    @property
    def size(self) -> int:
        """Size in bytes."""
        return self.sectors * SECTOR

    @property
    def type_name(self) -> str:
        """A readable name of the partition type (``FAT32 (LBA)``, ``Linux``, ``0x42``)."""
        return _TYPE_NAMES.get(self.type_id, f"0x{self.type_id:02x}")

    @property
    def is_fat(self) -> bool:
        """Whether the type is one a Pi can boot from (FAT16/32)."""
        return self.type_id in FAT_TYPES

    def as_dict(self) -> dict[str, object]:
        """JSON-able form (``inspect --json``)."""
        return {
            "number": self.number,
            "type": f"0x{self.type_id:02x}",
            "type_name": self.type_name,
            "bootable": self.bootable,
            "start_sector": self.start_sector,
            "offset": self.offset,
            "size": self.size,
        }


def read_partitions(image: Path) -> list[Partition]:
    """Read the four primary entries of an image's MBR (empty slots are left out).

    Raises:
        ImageError: the file is unreadable, too short, or has no MBR signature (0x55AA).
    """
    try:
        with image.open("rb") as fh:
            mbr = fh.read(SECTOR)
            image_size = os.fstat(fh.fileno()).st_size
    except OSError as err:
        raise ImageError(image, f"cannot read it ({err.strerror})") from None
    if mbr.startswith(_XZ_MAGIC):
        raise ImageError(image, "xz-compressed: decompress it first (xz -dk), or flash it")
    if len(mbr) < SECTOR or mbr[510:512] != b"\x55\xaa":
        raise ImageError(image, "not a disk image (no MBR partition table)")
    partitions = []
    for index in range(4):
        entry = mbr[446 + 16 * index : 446 + 16 * (index + 1)]
        status, type_id = entry[0], entry[4]
        start, sectors = struct.unpack_from("<II", entry, 8)
        if type_id == 0 or sectors == 0:
            continue
        partitions.append(Partition(index + 1, type_id, status == 0x80, start, sectors))
        if (start + sectors) * SECTOR > image_size:
            raise ImageError(
                image,
                f"partition {index + 1} ends beyond the end of the file: truncated download?",
            )
    return partitions


def boot_partition(image: Path, partitions: list[Partition]) -> Partition:
    """The FAT boot partition (the first FAT16/FAT32 entry).

    Raises:
        ImageError: there is none (a GPT image, or not a Raspberry Pi OS image).
    """
    for partition in partitions:
        if partition.is_fat:
            return partition
    found = ", ".join(f"{p.number}: {p.type_name}" for p in partitions) or "none"
    if any(p.type_id == 0xEE for p in partitions):
        reason = f"a GPT disk (partitions {found}); Raspberry Pi OS images use an MBR"
    else:
        reason = f"no FAT boot partition (partitions {found})"
    raise ImageError(image, reason)


# -- copying -----------------------------------------------------------------------------------


def is_xz(path: Path) -> bool:
    """Whether the file is xz-compressed (by its magic bytes, whatever its name)."""
    try:
        with path.open("rb") as fh:
            return fh.read(len(_XZ_MAGIC)) == _XZ_MAGIC
    except OSError as err:
        raise ImageError(path, f"cannot read it ({err.strerror})") from None


def _chunks_plain(source: Path) -> Iterator[tuple[bytes, int]]:
    with source.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            yield chunk, fh.tell()


def _chunks_xz(source: Path) -> Iterator[tuple[bytes, int]]:
    """Decompressed chunks, with how far into the *compressed* file we are (for progress)."""
    with source.open("rb") as fh:
        decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        while not decompressor.eof:
            if decompressor.needs_input:
                data = fh.read(_CHUNK)
                if not data:
                    raise ImageError(source, "xz stream ends early: truncated download?")
            else:
                data = b""
            try:
                chunk = decompressor.decompress(data, max_length=_CHUNK)
            except lzma.LZMAError as err:
                raise ImageError(source, f"corrupt xz data ({err})") from None
            if chunk:
                yield chunk, fh.tell()


def copy_image(source: Path, target: Path, progress: Progress | None = None) -> None:
    """Copy ``source`` to ``target``, decompressing it if it is xz, leaving ``source`` untouched.

    Runs of zeros are skipped (the copy is a sparse file: an image's free space costs no disk).
    The copy is written beside ``target`` and renamed into place only when complete.

    Raises:
        ImageError: the source is unreadable or corrupt, or the target cannot be written.
    """
    chunks = _chunks_xz(source) if is_xz(source) else _chunks_plain(source)
    total = source.stat().st_size
    partial = target.with_name(f".{target.name}.partial")
    try:
        with partial.open("wb") as out:
            size = 0
            for chunk, done in chunks:
                if len(chunk) == _CHUNK and chunk == _ZEROS:
                    out.seek(len(chunk), os.SEEK_CUR)
                else:
                    out.write(chunk)
                size += len(chunk)
                if progress is not None:
                    progress(done, total)
            out.truncate(size)
        partial.replace(target)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise ImageError(target, f"cannot write it ({err.strerror})") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def sha256_range(image: Path, offset: int, length: int) -> str:
    """SHA-256 of ``length`` bytes at ``offset`` (to prove a partition was left alone)."""
    digest = hashlib.sha256()
    with image.open("rb") as fh:
        fh.seek(offset)
        left = length
        while left > 0:
            chunk = fh.read(min(_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


# -- files on a boot partition -----------------------------------------------------------------


class BootFiles(Protocol):
    """Files on a Raspberry Pi boot partition, by ``/``-separated path relative to its root."""

    def names(self) -> list[str]:
        """Every file (not directory), sorted."""
        ...

    def read(self, path: str) -> bytes | None:
        """A file's bytes, or None if it does not exist."""
        ...

    def write(self, path: str, data: bytes) -> None:
        """Create or replace a file (and its parent directories)."""
        ...

    def copy_tree(self, source: Path, path: str) -> list[str]:
        """Copy the contents of local directory ``source`` into ``path``; return the new paths."""
        ...

    def remove(self, path: str) -> None:
        """Delete a file if it exists."""
        ...


def _clean(path: str) -> str:
    parts = PurePosixPath(path.strip("/")).parts
    if not parts or any(part in ("..", ".") for part in parts):
        raise ValueError(f"not a relative file path: {path!r}")
    return "/".join(parts)


def _local_files(source: Path) -> list[str]:
    return sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())


class BootDirectory:
    """A boot partition mounted as a directory (``seed --boot /media/me/bootfs``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        """Every file below the root, sorted."""
        return _local_files(self.root)

    def read(self, path: str) -> bytes | None:
        """A file's bytes, or None."""
        try:
            return (self.root / _clean(path)).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, path: str, data: bytes) -> None:
        """Create or replace a file; written beside it first, so a full card leaves the old one."""
        target = self.root / _clean(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_bytes(data)
        partial.replace(target)

    def copy_tree(self, source: Path, path: str) -> list[str]:
        """Copy a local directory's contents below ``path``."""
        shutil.copytree(source, self.root / _clean(path), dirs_exist_ok=True)
        return [f"{_clean(path)}/{name}" for name in _local_files(source)]

    def remove(self, path: str) -> None:
        """Delete a file if it exists."""
        (self.root / _clean(path)).unlink(missing_ok=True)


class FatImage:
    """The FAT partition of a disk image, edited in place with mtools (no root, no mount)."""

    def __init__(self, image: Path, partition: Partition) -> None:
        self.image = image
        self.partition = partition
        self._target = f"{image}@@{partition.offset}"
        self._dirs: set[str] | None = None

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        executable = shutil.which(tool)
        if executable is None:
            raise ImageError(
                tool,
                "not found: editing the FAT boot partition needs mtools "
                "(apt-get install mtools; brew install mtools)",
            )
        # MTOOLS_SKIP_CHECK: images carry no disk geometry mtools would recognise.
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        result = subprocess.run(  # noqa: S603 - fixed tool, arguments are paths we built.
            [executable, "-i", self._target, *args],
            capture_output=True,
            env=env,
            check=False,
        )
        if check and result.returncode != 0:
            message = result.stderr.decode(errors="replace").strip().splitlines()
            raise ImageError(
                self.image,
                f"{tool} failed on the boot partition: {message[-1] if message else 'no output'}",
            )
        return result

    def _listing(self) -> tuple[list[str], set[str]]:
        result = self._run("mdir", "-/", "-b", "-a", "::", check=False)
        if result.returncode != 0:
            err = result.stderr.decode(errors="replace").strip()
            if "not found" in err:  # an empty file system lists nothing and fails
                return [], set()
            raise ImageError(
                self.image, f"partition {self.partition.number} is not a readable FAT file system"
            )
        files, dirs = [], set()
        for line in result.stdout.decode("utf-8", errors="replace").splitlines():
            if not line.startswith("::/"):
                continue
            name = line[3:]
            if name.endswith("/"):
                dirs.add(name.rstrip("/"))
            elif name:
                files.append(name)
        return sorted(files), dirs

    def names(self) -> list[str]:
        """Every file on the partition, sorted."""
        files, self._dirs = self._listing()
        return files

    def read(self, path: str) -> bytes | None:
        """A file's bytes (``mtype``), or None if it does not exist."""
        result = self._run("mtype", f"::/{_clean(path)}", check=False)
        if result.returncode != 0:
            if b"not found" in result.stderr:
                return None
            raise ImageError(self.image, f"mtype failed: {result.stderr.decode().strip()}")
        return result.stdout

    def _ensure_dir(self, path: str) -> None:
        if self._dirs is None:
            _, self._dirs = self._listing()
        parts = PurePosixPath(path).parts
        for depth in range(1, len(parts) + 1):
            directory = "/".join(parts[:depth])
            if directory not in self._dirs:
                self._run("mmd", f"::/{directory}")
                self._dirs.add(directory)

    def write(self, path: str, data: bytes) -> None:
        """Create or replace a file (``mcopy -D o``)."""
        clean = _clean(path)
        parent = str(PurePosixPath(clean).parent)
        if parent != ".":
            self._ensure_dir(parent)
        with tempfile.TemporaryDirectory(prefix="iotpipe-flash-") as tmp:
            local = Path(tmp) / "file"
            local.write_bytes(data)
            self._run("mcopy", "-D", "o", str(local), f"::/{clean}")

    def copy_tree(self, source: Path, path: str) -> list[str]:
        """Copy a local directory's contents below ``path`` (``mcopy -s``)."""
        clean = _clean(path)
        self._ensure_dir(clean)
        entries = sorted(str(p) for p in source.iterdir())
        if entries:
            self._run("mcopy", "-s", "-D", "o", *entries, f"::/{clean}/")
        self._dirs = None
        return [f"{clean}/{name}" for name in _local_files(source)]

    def remove(self, path: str) -> None:
        """Delete a file if it exists (``mdel``)."""
        result = self._run("mdel", f"::/{_clean(path)}", check=False)
        if result.returncode != 0 and b"not found" not in result.stderr:
            raise ImageError(self.image, f"mdel failed: {result.stderr.decode().strip()}")

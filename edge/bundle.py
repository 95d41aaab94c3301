"""The edge agent's offline install bundle: wheels, ``install.sh``, the systemd unit, checksums.

A bundle is a directory that a Raspberry Pi with no network can install the agent from::

    VERSION               the iotpipe version, one line
    install.sh            creates a venv under /opt/iotpipe-edge and installs from wheels/ offline
    requirements.txt      the edge dependencies, pinned (what install.sh installs besides iotpipe)
    iotpipe-edge.service  the systemd unit (when edge/systemd/iotpipe-edge.service exists)
    wheels/               the iotpipe wheel and every dependency's wheel, per CPython version
    SHA256SUMS            ``sha256sum -c`` format, over every other file

Why a separate dependency list: the ``iotpipe`` distribution declares the whole pipeline's
dependencies as required (amqtt, pika, influxdb-client, redis, fastapi, uvicorn...), and the agent
needs none of them. Rather than split the project's metadata, the bundle installs the iotpipe
wheel with ``--no-deps`` plus :data:`EDGE_REQUIREMENTS`, each pinned to the version in the
environment that builds the bundle (the one the tests ran against), and every transitive
dependency constrained the same way.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from iotpipe import __version__
from iotpipe.errors import IotpipeError

#: What the agent imports on the Pi, by distribution name. Versions come from the building
#: environment; a name missing there (smbus2 is only needed on the Pi) falls back to its range.
EDGE_REQUIREMENTS: dict[str, str] = {
    "paho-mqtt": "",
    "pydantic": "",
    "typer": "",
    "rich": "",
    "prometheus-client": "",
    # the BME280 driver's I2C access; pure Python.
    "smbus2": ">=0.4,<1",
}

#: 64-bit Raspberry Pi OS: Bookworm ships CPython 3.11 and glibc 2.36, Trixie 3.13 and 2.41.
DEFAULT_PYTHONS: tuple[str, ...] = ("3.11", "3.13")
#: The newest glibc every target has (Bookworm's); wheels for older manylinux tags are accepted.
DEFAULT_PLATFORMS: tuple[str, ...] = ("manylinux_2_36_aarch64",)

SERVICE_NAME = "iotpipe-edge.service"
_MANYLINUX = re.compile(r"manylinux_2_(\d+)_(\w+)")
# pip's messages when the index cannot be reached at all (as opposed to "no such wheel").
_OFFLINE = re.compile(
    r"NewConnectionError|Temporary failure in name resolution|Name or service not known"
    r"|Network is unreachable|Max retries exceeded|Could not fetch URL"
)
_NO_MATCH = re.compile(r"No matching distribution found for (\S+)")
# With constraints, pip reports a missing wheel as a conflict and lists the packages after this.
_NO_MATCH_CONFLICT = re.compile(
    r"no matching distributions available for your environment:\n((?:[ \t]+\S+\n?)+)"
)


class BundleError(IotpipeError):
    """The bundle cannot be built.

    Attributes:
        step: what was being done (``download wheels for CPython 3.13``).
        reason: why it failed, in one line.
    """

    exit_code = 1

    def __init__(self, step: str, reason: str) -> None:
        self.step = step
        self.reason = reason
        super().__init__(f"bundle: {step}: {reason}")


@dataclass(frozen=True, slots=True)
class Bundle:
    """What :func:`build` produced.

    Attributes:
        path: the bundle directory.
        version: the iotpipe version in it.
        requirements: the pinned edge requirements (``name==version``).
        wheels: wheel file names per CPython version (``"3.11"``), iotpipe's included.
    """

    path: Path
    version: str
    requirements: tuple[str, ...]
    wheels: dict[str, tuple[str, ...]]

    def size(self, python: str) -> int:
        """Bytes of the wheels one CPython version installs."""
        return sum((self.path / "wheels" / name).stat().st_size for name in self.wheels[python])


def expand_platforms(platforms: Iterable[str]) -> list[str]:
    """pip's ``--platform`` tags for the given ones plus every older glibc they run.

    pip matches ``--platform`` literally, so ``manylinux_2_36_aarch64`` alone would refuse a
    ``manylinux_2_17`` wheel that runs fine on glibc 2.36. This adds 2_17 .. 2_N and the legacy
    ``manylinux2014`` alias.
    """
    tags: list[str] = []
    for platform in platforms:
        tags.append(platform)
        match = _MANYLINUX.fullmatch(platform)
        if match:
            newest, arch = int(match[1]), match[2]
            tags += [f"manylinux_2_{minor}_{arch}" for minor in range(newest - 1, 16, -1)]
            tags.append(f"manylinux2014_{arch}")
    return list(dict.fromkeys(tags))


def pinned_requirements() -> list[str]:
    """:data:`EDGE_REQUIREMENTS` pinned to the versions installed here (else their ranges)."""
    pins = []
    for name, fallback in EDGE_REQUIREMENTS.items():
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(f"{name}{fallback}")
    return pins


def constraints() -> list[str]:
    """Every distribution installed here as ``name==version``, iotpipe itself excepted.

    Used as pip constraints so that transitive dependencies (pydantic-core, click, ...) are the
    versions the test suite ran against, not whatever is newest on the index today.
    """
    found = {
        _normalise(dist.metadata["Name"]): dist.version
        for dist in importlib.metadata.distributions()
        if dist.metadata["Name"]
    }
    found.pop("iotpipe", None)
    return [f"{name}=={version}" for name, version in sorted(found.items())]


def source_root() -> Path:
    """The checkout this module lives in (where ``pyproject.toml`` is)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file() and (parent / "edge").is_dir():
            return parent
    raise BundleError(
        "find the iotpipe source", "no pyproject.toml above edge/: run from a checkout"
    )


def build(
    out: Path,
    pythons: Sequence[str] = DEFAULT_PYTHONS,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    *,
    source: Path | None = None,
    progress: Callable[[str], None] = lambda _line: None,
) -> Bundle:
    """Build a bundle in ``out`` (created; must be empty or missing).

    Args:
        out: the bundle directory.
        pythons: CPython versions to fetch wheels for (``"3.11"``).
        platforms: pip platform tags of the target (older manylinux tags are added).
        source: the iotpipe checkout to build the wheel from; default: this one.
        progress: called with one line per step.

    Raises:
        BundleError: the index is unreachable, a dependency has no wheel for a target, or
            ``out`` is not empty.
    """
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"write {out}", "directory is not empty")
    for python in pythons:
        if not re.fullmatch(r"3\.\d+", python):
            raise BundleError("check --python", f"{python!r} is not a CPython version like 3.11")
    created = not out.exists()
    try:
        return _build(out, pythons, platforms, source or source_root(), progress)
    except BaseException:
        # A half-built bundle must not pass for one (nor block the next try as "not empty").
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        raise


def _build(
    out: Path,
    pythons: Sequence[str],
    platforms: Sequence[str],
    root: Path,
    progress: Callable[[str], None],
) -> Bundle:
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    tags = expand_platforms(platforms)
    requirements = pinned_requirements()

    progress(f"building the iotpipe {__version__} wheel")
    own = _build_wheel(root, wheels)

    per_python: dict[str, tuple[str, ...]] = {}
    with tempfile.TemporaryDirectory(prefix="iotpipe-bundle-") as tmp:
        constraint_file = Path(tmp) / "constraints.txt"
        constraint_file.write_text("\n".join(constraints()) + "\n")
        for python in pythons:
            progress(f"downloading wheels for CPython {python} ({', '.join(platforms)})")
            names = _download(python, tags, requirements, constraint_file, wheels)
            per_python[python] = (own, *sorted(names))
            size = sum((wheels / name).stat().st_size for name in per_python[python])
            progress(f"  {len(names)} dependency wheels, {size / 1e6:.1f} MB with iotpipe")

    pinned = _pin_from_wheels(requirements, wheels)
    (out / "requirements.txt").write_text(
        "# The edge agent's dependencies; install.sh installs these and iotpipe --no-deps.\n"
        f"# Built for CPython {', '.join(pythons)} on {', '.join(platforms)}.\n"
        + "".join(f"{line}\n" for line in pinned)
    )
    (out / "VERSION").write_text(f"{__version__}\n")
    write_install_sh(out / "install.sh", pythons)
    unit = root / "edge" / "systemd" / SERVICE_NAME
    if unit.is_file():
        shutil.copyfile(unit, out / SERVICE_NAME)
    else:
        progress(f"note: {unit} does not exist yet: the bundle has no systemd unit")
    write_checksums(out)
    progress(f"wrote {out}")
    return Bundle(out, __version__, tuple(pinned), per_python)


def write_checksums(out: Path) -> None:
    """Write ``SHA256SUMS`` over every file in ``out`` (``sha256sum -c`` reads it)."""
    lines = []
    for path in sorted(p for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {path.relative_to(out).as_posix()}\n")
    (out / "SHA256SUMS").write_text("".join(lines))


def verify_checksums(out: Path) -> list[str]:
    """The files in ``out`` whose SHA-256 does not match ``SHA256SUMS`` (empty: all good)."""
    bad = []
    for line in (out / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        path = out / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(name)
    return bad


def _build_wheel(source: Path, wheels: Path) -> str:
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds, and
    # others may be building in this one at the same time.
    with tempfile.TemporaryDirectory(prefix="iotpipe-wheel-") as tmp:
        copy = Path(tmp) / "src"
        copy.mkdir()
        for name in _project_files(source):
            if (source / name).is_dir():
                shutil.copytree(
                    source / name,
                    copy / name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
                )
            else:
                shutil.copy2(source / name, copy / name)
        out = Path(tmp) / "dist"
        _pip("build the iotpipe wheel", ["wheel", "--no-deps", "-w", str(out), str(copy)])
        (built,) = out.glob("iotpipe-*.whl")
        shutil.move(built, wheels / built.name)
        return built.name


def _project_files(source: Path) -> list[str]:
    """pyproject.toml, the readme and license, and the top-level packages it includes."""
    project = tomllib.loads((source / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    roots = sorted({pattern.split(".")[0].rstrip("*") for pattern in include})
    extra = [p.name for p in source.glob("LICENSE*")] + ["README.md"]
    return ["pyproject.toml", *extra, *roots]


def _download(
    python: str, tags: list[str], requirements: list[str], constraint_file: Path, wheels: Path
) -> list[str]:
    """Download the requirements' wheels for one CPython; return the file names it needs."""
    args = [
        "download",
        "--only-binary=:all:",
        *(f"--platform={tag}" for tag in tags),
        f"--python-version={python}",
        "--implementation=cp",
        f"--abi=cp{python.replace('.', '')}",
        "--progress-bar=off",
        "-c",
        str(constraint_file),
        "-d",
        str(wheels),
        *requirements,
    ]
    output = _pip(f"download wheels for CPython {python}", args, platforms=tags)
    # pip prints "Saved <path>" or "File was already downloaded <path>" once per wheel it chose.
    names = re.findall(r"(?:Saved|File was already downloaded) (\S+\.whl)", output)
    return sorted({Path(name).name for name in names})


def _pin_from_wheels(requirements: list[str], wheels: Path) -> list[str]:
    """The requirements with the version of the wheel downloaded for each (ranges resolved)."""
    versions = {}
    for wheel in wheels.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        versions[_normalise(name)] = version
    pinned = []
    for requirement in requirements:
        name = _normalise(re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0])
        pinned.append(f"{name}=={versions[name]}")
    return pinned


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pip(step: str, args: list[str], platforms: Sequence[str] = ()) -> str:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise explain_pip_failure(step, output, done.returncode, platforms)
    return output


def explain_pip_failure(
    step: str, output: str, returncode: int, platforms: Sequence[str] = ()
) -> BundleError:
    """The one-line error for a failed pip run, from pip's output.

    No network and "no wheel for this target" are told apart: they need different fixes.
    """
    if _OFFLINE.search(output):
        return BundleError(step, "cannot reach the package index (no network?)")
    missing = _NO_MATCH.search(output)
    conflict = _NO_MATCH_CONFLICT.search(output)
    if missing or conflict:
        names = missing[1] if missing else ", ".join(conflict[1].split()) if conflict else ""
        where = f" for {platforms[0]}" if platforms else ""
        return BundleError(
            step, f"no wheel of {names}{where} on the package index (only an sdist, or none)"
        )
    last = [line for line in output.splitlines() if line.strip()][-1:] or ["(no output)"]
    return BundleError(step, f"pip failed (exit {returncode}): {last[0]}")


def write_install_sh(path: Path, pythons: Sequence[str]) -> None:
    """Write the ``install.sh`` template with this version and these CPython versions."""
    template = resources.files("edge").joinpath("install.sh").read_text()
    text = template.replace("@VERSION@", __version__).replace("@PYTHONS@", " ".join(pythons))
    path.write_text(text)
    path.chmod(0o755)

"""First-boot provisioning of a Raspberry Pi OS boot partition for the edge agent.

Two styles, as the image expects (see :func:`detect_style`):

* ``cloud-init`` (Trixie images from 2025-11-24): ``user-data`` (hostname, user with SSH key, a
  ``runcmd`` running our first-boot script), ``meta-data`` (instance id, hostname) and, with
  Wi-Fi, ``network-config`` (netplan v2).
* ``firstrun`` (Bookworm): ``firstrun.sh`` in the style of Raspberry Pi Imager, started once by
  ``systemd.run=`` appended to the one line of ``cmdline.txt``; it removes itself and the hook.

Both styles also get ``dtparam=i2c_arm=on`` and ``dtoverlay=w1-gpio`` in ``config.txt`` (once),
and ``iotpipe/``: the bundle (with its ``install.sh``), ``edge.toml`` and ``mqtt-password`` (where
install.sh expects them), ``firstboot.sh`` (shared by both styles: runs install.sh, which moves
the secrets to root-only files in ``/etc/iotpipe`` and enables the unit, then deletes every
secret from the boot partition) and ``MANIFEST.json`` (what was added or changed, with SHA-256;
read by ``inspect``).

Rendering is pure (strings in, strings out); :func:`provision` writes through
:class:`~edge.image.BootFiles`, so a disk image and a mounted card are handled alike.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import tarfile
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

from edge.image import BootFiles, ImageError
from iotpipe import __version__
from iotpipe.errors import ConfigError
from iotpipe.settings import MqttSettings, load

__all__ = [
    "CMDLINE_HOOK",
    "CONFIG_TXT_LINES",
    "Detection",
    "Provisioning",
    "Style",
    "Wifi",
    "add_firstrun_hook",
    "detect_style",
    "enable_interfaces",
    "load_edge_config",
    "provision",
    "read_manifest",
]

#: Where Raspberry Pi OS (Bookworm and Trixie) mounts the boot partition.
BOOT_MOUNT = "/boot/firmware"
MANIFEST = "iotpipe/MANIFEST.json"
#: Files moved root-only to /etc/iotpipe/credentials/ at first boot (the unit's LoadCredential=).
CREDENTIAL_FILES = ("mqtt-password", "mqtt-client.crt", "mqtt-client.key", "mqtt-ca.crt")
#: Appended to config.txt (each line only if not already active): I2C bus 1 and 1-Wire on GPIO4.
CONFIG_TXT_LINES = ("dtparam=i2c_arm=on", "dtoverlay=w1-gpio")
_CONFIG_TXT_HEADER = "# iotpipe: I2C and 1-Wire for the edge agent's sensors"
#: Appended to cmdline.txt for the firstrun style (removed again by firstrun.sh).
CMDLINE_HOOK = (
    f"systemd.run={BOOT_MOUNT}/firstrun.sh systemd.run_success_action=reboot "
    "systemd.unit=kernel-command-line.target"
)
#: Raspberry Pi OS images dated from this day on provision with cloud-init (FACTS.md).
CLOUD_INIT_SINCE = date(2025, 11, 24)
_CLOUD_INIT_FILES = ("user-data", "meta-data", "network-config")
_ISSUE_RE = re.compile(r"Raspberry Pi reference (\d{4}-\d{2}-\d{2})")
_HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_USER_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")
_COUNTRY_RE = re.compile(r"[A-Z]{2}")
_KEY_PREFIXES = ("ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-")


class Style(StrEnum):
    """How an image runs its first-boot customisation."""

    CLOUD_INIT = "cloud-init"
    FIRSTRUN = "firstrun"


@dataclass(frozen=True, slots=True)
class Detection:
    """The style an image expects, and the marker that told (None: nothing did)."""

    style: Style | None
    reason: str


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wifi:
    """A Wi-Fi network; the passphrase is kept only as its WPA PSK (64 hex digits)."""

    ssid: str
    psk: str = field(repr=False)
    country: str

    @classmethod
    def from_passphrase(cls, ssid: str, passphrase: str, country: str) -> Wifi:
        """Validate and hash a passphrase (8-63 characters, or already a 64-hex-digit PSK).

        Raises:
            ConfigError: a bad SSID, passphrase or country (the passphrase is never shown).
        """
        if not 1 <= len(ssid.encode()) <= 32:
            raise ConfigError("--wifi-ssid", ssid, "1 to 32 bytes")
        country = country.upper()
        if not _COUNTRY_RE.fullmatch(country):
            raise ConfigError(
                "--wifi-country", country, "a two-letter ISO 3166 code (GB, DE, US...)"
            )
        if re.fullmatch(r"[0-9a-fA-F]{64}", passphrase):
            return cls(ssid, passphrase.lower(), country)
        if not 8 <= len(passphrase) <= 63 or not passphrase.isascii():
            raise ConfigError(
                "--wifi-password", "<hidden>", "8 to 63 ASCII characters (WPA2), or a 64-hex PSK"
            )
        psk = hashlib.pbkdf2_hmac("sha1", passphrase.encode(), ssid.encode(), 4096, 32)
        return cls(ssid, psk.hex(), country)


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """What flashing needs from an edge.toml: the device identity and the MQTT password."""

    raw: bytes = field(repr=False)
    site: str
    device: str | None  # None: the agent uses the host name
    mqtt: str  # the broker URL without its password
    mqtt_password: str | None = field(repr=False)
    mqtt_user: str | None = None  # the user name in the URL

    def identity(self, hostname: str) -> str:
        """The device's MQTT identity ``{site}/{device}`` (device: the host name if unset)."""
        return f"{self.site}/{self.device or hostname}"


def load_edge_config(path: Path) -> EdgeConfig:
    """Read and validate an edge agent config (``[edge]`` and ``[mqtt]``, as the agent will).

    Validating here means a typo fails now, not on the Pi after first boot.

    Raises:
        ConfigError: missing, not TOML, or a setting the agent would refuse.
    """
    from edge.config import EdgeSettings

    edge = load(EdgeSettings, "edge", config_file=path, environ={})
    mqtt = load(MqttSettings, "mqtt", config_file=path, environ={})
    broker = mqtt.broker
    return EdgeConfig(
        raw=path.read_bytes(),
        site=edge.site,
        device=edge.device or None,
        mqtt=broker.redacted(),
        mqtt_password=broker.password.get_secret_value() if broker.password else None,
        mqtt_user=broker.username,
    )


def hostname_for(device: str) -> str:
    """A valid hostname from a device name (``Pi_Kitchen`` -> ``pi-kitchen``)."""
    return re.sub(r"[^a-z0-9-]+", "-", device.lower()).strip("-")[:63].strip("-")


def read_ssh_keys(path: Path) -> tuple[str, ...]:
    """The public keys in an ``authorized_keys``-style file.

    Raises:
        ConfigError: unreadable, a private key, or no public key in it.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError("--ssh-key", path, f"cannot read it ({err})") from None
    if "PRIVATE KEY" in text:
        raise ConfigError("--ssh-key", path, "a private key: pass the public one (.pub)")
    keys = tuple(
        line.strip() for line in text.splitlines() if line.strip().startswith(_KEY_PREFIXES)
    )
    if not keys:
        raise ConfigError("--ssh-key", path, "no SSH public key (ssh-ed25519 AAAA...) in it")
    return keys


def bundle_dir(path: Path, scratch: Path) -> Path:
    """The bundle directory (``iotpipe edge bundle`` output), unpacking a tarball into ``scratch``.

    Raises:
        ConfigError: missing, unreadable, or without ``install.sh``.
    """
    if path.is_file():
        try:
            with tarfile.open(path) as tar:
                tar.extractall(scratch, filter="data")
        except (OSError, tarfile.TarError) as err:
            raise ConfigError("--bundle", path, f"not a readable tarball ({err})") from None
        entries = list(scratch.iterdir())
        path = entries[0] if len(entries) == 1 and entries[0].is_dir() else scratch
    elif not path.is_dir():
        raise ConfigError("--bundle", path, "no such directory or tarball")
    if not (path / "install.sh").is_file():
        raise ConfigError(
            "--bundle", path, "has no install.sh: pass what `iotpipe edge bundle` produced"
        )
    return path


@dataclass(frozen=True, slots=True)
class Provisioning:
    """Everything written to a boot partition. ``str()``/``repr`` never show secrets."""

    hostname: str
    user: str
    ssh_keys: tuple[str, ...]
    config: EdgeConfig
    bundle: Path
    wifi: Wifi | None = None
    mqtt_password: str | None = field(default=None, repr=False)
    #: The user name the agent logs in with (the URL's, else its identity {site}/{device}).
    mqtt_user: str | None = None
    #: A client certificate for the identity, its key and the CA's certificate (PEM; empty: none).
    client_cert: bytes = b""
    client_key: bytes = field(default=b"", repr=False)
    ca_cert: bytes = b""

    def __post_init__(self) -> None:
        if not _HOSTNAME_RE.fullmatch(self.hostname):
            raise ConfigError(
                "--hostname", self.hostname, "letters a-z, digits and '-', at most 63"
            )
        if not _USER_RE.fullmatch(self.user) or self.user == "root":
            raise ConfigError(
                "--user", self.user, "a lower-case login name (not root), at most 32 characters"
            )


# -- detection ---------------------------------------------------------------------------------


def read_manifest(boot: BootFiles) -> dict[str, Any] | None:
    """The manifest iotpipe left on a boot partition, or None."""
    raw = boot.read(MANIFEST)
    if raw is None:
        return None
    try:
        manifest = json.loads(raw)
    except ValueError:
        return None
    return manifest if isinstance(manifest, dict) else None


def detect_style(boot: BootFiles, names: list[str] | None = None) -> Detection:
    """Tell which first-boot mechanism an image expects, from its boot partition.

    Markers, first match wins: our own manifest (provisioned before); any of ``user-data``,
    ``meta-data``, ``network-config`` (cloud-init's NoCloud seed); ``ds=nocloud`` in cmdline.txt;
    the date in ``issue.txt`` ("Raspberry Pi reference 2025-11-24": from that day on,
    cloud-init; earlier, firstrun); ``trixie``/``bookworm`` named in ``issue.txt``.
    """
    files = set(names if names is not None else boot.names())
    manifest = read_manifest(boot) if MANIFEST in files else None
    if manifest and manifest.get("style") in {s.value for s in Style}:
        return Detection(Style(manifest["style"]), f"provisioned before by iotpipe ({MANIFEST})")
    present = [name for name in _CLOUD_INIT_FILES if name in files]
    if present:
        return Detection(Style.CLOUD_INIT, f"{', '.join(present)} on the boot partition")
    cmdline = (boot.read("cmdline.txt") or b"").decode(errors="replace")
    if "ds=nocloud" in cmdline:
        return Detection(Style.CLOUD_INIT, "ds=nocloud in cmdline.txt")
    issue = (boot.read("issue.txt") or b"").decode(errors="replace")
    stamp = _ISSUE_RE.search(issue)
    if stamp:
        built = date.fromisoformat(stamp[1])
        style = Style.CLOUD_INIT if built >= CLOUD_INIT_SINCE else Style.FIRSTRUN
        return Detection(style, f"issue.txt: Raspberry Pi reference {built.isoformat()}")
    for word, style in (("trixie", Style.CLOUD_INIT), ("bookworm", Style.FIRSTRUN)):
        if word in issue.lower():
            return Detection(style, f"issue.txt names {word}")
    return Detection(None, "no cloud-init files, no issue.txt date")


# -- rendering (pure) --------------------------------------------------------------------------


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


def enable_interfaces(config_txt: str) -> str:
    """``config.txt`` with I2C and 1-Wire enabled: missing lines appended under ``[all]``, once."""
    active = {line.strip() for line in config_txt.splitlines()}
    missing = [line for line in CONFIG_TXT_LINES if line not in active]
    if not missing:
        return config_txt
    text = config_txt if not config_txt or config_txt.endswith("\n") else config_txt + "\n"
    return text + "\n".join(["", _CONFIG_TXT_HEADER, "[all]", *missing]) + "\n"


def add_firstrun_hook(cmdline: str) -> str:
    """``cmdline.txt`` (one line) with the firstrun hook appended once."""
    line = " ".join(cmdline.split())
    if CMDLINE_HOOK in line:
        return line + "\n"
    return f"{line} {CMDLINE_HOOK}\n"


def render_user_data(p: Provisioning) -> str:
    """cloud-init ``user-data``: hostname, the user with SSH keys, and the first-boot command."""
    keys = "\n".join(f"      - {_q(key)}" for key in p.ssh_keys)
    return f"""#cloud-config
# Written by iotpipe edge flash (docs/edge-flash.md). No secrets here: edge.toml and the
# MQTT password wait in {BOOT_MOUNT}/iotpipe/ until install.sh moves them to /etc/iotpipe.
hostname: {_q(p.hostname)}
manage_etc_hosts: true
ssh_pwauth: false
users:
  - name: {_q(p.user)}
    groups: [adm, sudo, i2c, gpio, dialout, plugdev]
    shell: /bin/bash
    lock_passwd: true
    sudo: "ALL=(ALL) NOPASSWD:ALL"
    ssh_authorized_keys:
{keys}
runcmd:
  - [bash, {BOOT_MOUNT}/iotpipe/firstboot.sh, cloud-init]
"""


def render_meta_data(p: Provisioning, instance: str) -> str:
    """cloud-init ``meta-data``; a new instance id makes cloud-init run again after a re-flash."""
    return f"instance-id: iotpipe-{p.hostname}-{instance}\nlocal-hostname: {_q(p.hostname)}\n"


def render_network_config(wifi: Wifi) -> str:
    """cloud-init ``network-config``: netplan v2, the Wi-Fi network (PSK, not the passphrase)."""
    return f"""network:
  version: 2
  wifis:
    renderer: NetworkManager
    wlan0:
      dhcp4: true
      optional: true
      regulatory-domain: {_q(wifi.country)}
      access-points:
        {_q(wifi.ssid)}:
          password: {_q(wifi.psk)}
"""


def render_firstrun(p: Provisioning) -> str:
    """Bookworm's ``firstrun.sh`` (Raspberry Pi Imager's way, with its fallbacks)."""
    keys = shlex.quote("\n".join(p.ssh_keys))
    host, user = shlex.quote(p.hostname), shlex.quote(p.user)
    wifi = ""
    if p.wifi is not None:
        ssid, psk, country = (shlex.quote(v) for v in (p.wifi.ssid, p.wifi.psk, p.wifi.country))
        wifi = f"""
if [ -x "$IMAGER" ]; then
    "$IMAGER" set_wlan {ssid} {psk} {country}
else
    install -d -m 0700 /etc/NetworkManager/system-connections
    umask 077
    cat >/etc/NetworkManager/system-connections/iotpipe-wifi.nmconnection <<EOF
[connection]
id=iotpipe-wifi
type=wifi
[wifi]
mode=infrastructure
ssid=$(printf '%s' {ssid})
[wifi-security]
key-mgmt=wpa-psk
psk={p.wifi.psk}
[ipv4]
method=auto
[ipv6]
method=auto
EOF
    raspi-config nonint do_wifi_country {country} || true
    rfkill unblock wifi || true
fi
"""
    return f"""#!/bin/bash
# Written by iotpipe edge flash: runs once at first boot (systemd.run= in cmdline.txt), then
# removes itself and the hook. Holds the Wi-Fi PSK: deleted when done.
set +e
IMAGER=/usr/lib/raspberrypi-sys-mods/imager_custom
CURRENT_HOSTNAME=$(tr -d " \\t\\n\\r" </etc/hostname)
if [ -x "$IMAGER" ]; then
    "$IMAGER" set_hostname {host}
else
    echo {host} >/etc/hostname
    sed -i "s/127.0.1.1.*$CURRENT_HOSTNAME/127.0.1.1\\t{p.hostname}/g" /etc/hosts
fi
FIRSTUSER=$(getent passwd 1000 | cut -d: -f1)
if [ -x /usr/lib/userconf-pi/userconf ]; then
    /usr/lib/userconf-pi/userconf {user} '!'
elif [ -n "$FIRSTUSER" ] && [ "$FIRSTUSER" != {user} ]; then
    usermod -l {user} "$FIRSTUSER" && usermod -m -d /home/{p.user} {user}
    groupmod -n {user} "$FIRSTUSER"
elif [ -z "$FIRSTUSER" ]; then
    useradd -m -s /bin/bash -G sudo {user}
fi
usermod -aG i2c,gpio {user} || true
install -d -m 0700 -o {user} -g {user} /home/{p.user}/.ssh
printf '%s\\n' {keys} >/home/{p.user}/.ssh/authorized_keys
chown {user}:{user} /home/{p.user}/.ssh/authorized_keys
chmod 0600 /home/{p.user}/.ssh/authorized_keys
{wifi}
bash {BOOT_MOUNT}/iotpipe/firstboot.sh firstrun
rm -f {BOOT_MOUNT}/firstrun.sh
sed -i 's| {CMDLINE_HOOK}||g' {BOOT_MOUNT}/cmdline.txt
exit 0
"""


def render_firstboot(scrub_files: list[str]) -> str:
    """``iotpipe/firstboot.sh`` (both styles): run the bundle's install.sh, then clean up.

    The secrets (``iotpipe/edge.toml``, ``iotpipe/mqtt-password`` and the client certificate
    files) move to root-only files in /etc/iotpipe (loaded by the unit with ``LoadCredential=``)
    before install.sh runs, so that it finds the config and starts the unit at once. Whatever
    happens, the exit trap moves them again (if install.sh failed early) and scrubs the boot
    partition (FAT: readable by anyone holding the card).
    """
    scrub = "\n".join(f"    rm -f {BOOT_MOUNT}/{name}" for name in scrub_files)
    return f"""#!/bin/bash
# Written by iotpipe edge flash: installs the edge agent at first boot, as root.
set -eu
HERE={BOOT_MOUNT}/iotpipe
exec >>/var/log/iotpipe-firstboot.log 2>&1
echo "iotpipe firstboot ($1) $(date -Is)"
move_secrets() {{
    install -d -m 0700 -o root -g root /etc/iotpipe /etc/iotpipe/credentials
    if [ -f "$HERE/edge.toml" ]; then
        install -m 0600 -o root -g root "$HERE/edge.toml" /etc/iotpipe/edge.toml
    fi
    for name in {" ".join(CREDENTIAL_FILES)}; do
        if [ -f "$HERE/$name" ]; then
            install -m 0600 -o root -g root "$HERE/$name" "/etc/iotpipe/credentials/$name"
        fi
    done
}}
finish() {{
    status=$?
    move_secrets
{scrub}
    sync
    echo "iotpipe firstboot finished: exit status $status"
}}
trap finish EXIT
# /dev/i2c-* appear only with i2c-dev loaded (raspi-config does the same).
echo i2c-dev >/etc/modules-load.d/iotpipe-i2c.conf
modprobe i2c-dev || true
systemctl enable ssh || true
# Before install.sh: it starts the unit only when /etc/iotpipe/edge.toml is there.
move_secrets
sh "$HERE/install.sh"
"""


def unit_file() -> bytes:
    """The systemd unit shipped with this package (``edge/systemd/iotpipe-edge.service``)."""
    return (resources.files("edge") / "systemd" / "iotpipe-edge.service").read_bytes()


# -- writing -----------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _style_files(
    boot: BootFiles, p: Provisioning, style: Style, secret_files: list[str]
) -> dict[str, bytes]:
    """The files of one style (adding those holding secrets to ``secret_files``)."""
    writes: dict[str, bytes] = {}
    if style is Style.CLOUD_INIT:
        user_data = render_user_data(p)
        network = render_network_config(p.wifi) if p.wifi else None
        instance = _sha256((user_data + (network or "")).encode() + p.config.raw)[:12]
        writes["user-data"] = user_data.encode()
        writes["meta-data"] = render_meta_data(p, instance).encode()
        if network is not None:
            writes["network-config"] = network.encode()
            # NoCloud applies network config for a new instance only: safe to delete after.
            secret_files.append("network-config")
    else:
        writes["firstrun.sh"] = render_firstrun(p).encode()
        if p.wifi is not None:
            secret_files.append("firstrun.sh")
        cmdline = (boot.read("cmdline.txt") or b"").decode()
        if not cmdline.strip():
            raise ImageError("cmdline.txt", "missing or empty on the boot partition")
        writes["cmdline.txt"] = add_firstrun_hook(cmdline).encode()
    return writes


def provision(
    boot: BootFiles, p: Provisioning, style: Style, *, detection: str = "--style"
) -> dict[str, Any]:
    """Write everything for first boot to ``boot``; return the manifest (also written there).

    Files the image already had and we change (config.txt, cmdline.txt, user-data...) are
    recorded as ``changed`` with the SHA-256 before and after.
    """
    # Where the bundle's install.sh picks them up (and moves them to /etc/iotpipe, 0600).
    writes: dict[str, bytes] = {
        "iotpipe/edge.toml": p.config.raw,
        # The unit's LoadCredential= needs each file; empty means "no password", "no certificate".
        "iotpipe/mqtt-password": (p.mqtt_password or "").encode(),
        "iotpipe/mqtt-client.crt": p.client_cert,
        "iotpipe/mqtt-client.key": p.client_key,
        "iotpipe/mqtt-ca.crt": p.ca_cert,
    }
    secret_files = ["iotpipe/edge.toml", *(f"iotpipe/{name}" for name in CREDENTIAL_FILES)]
    writes.update(_style_files(boot, p, style, secret_files))
    config_txt = boot.read("config.txt")
    if config_txt is None:
        raise ImageError("config.txt", "missing on the boot partition: not a Raspberry Pi image?")
    writes["config.txt"] = enable_interfaces(config_txt.decode()).encode()
    writes["iotpipe/firstboot.sh"] = render_firstboot(
        [name for name in secret_files if name != "firstrun.sh"]  # it deletes itself
    ).encode()
    if not (p.bundle / "iotpipe-edge.service").is_file():
        # install.sh installs the unit it finds beside it; a bundle without one gets ours.
        writes["iotpipe/iotpipe-edge.service"] = unit_file()

    files: list[dict[str, Any]] = []
    for name in boot.copy_tree(p.bundle, "iotpipe"):
        local = p.bundle / name.removeprefix("iotpipe/")
        files.append({"path": name, "action": "added", "sha256": _sha256(local.read_bytes())})
    files = [f for f in files if f["path"] not in writes]
    for name, data in writes.items():
        before = boot.read(name)
        if before == data:
            action = "unchanged"
        else:
            boot.write(name, data)
            action = "added" if before is None else "changed"
        entry: dict[str, Any] = {"path": name, "action": action, "sha256": _sha256(data)}
        if before is not None and action == "changed":
            entry["sha256_before"] = _sha256(before)
        if name in secret_files:
            entry["secret"] = True
        files.append(entry)
    files.sort(key=lambda f: f["path"])

    manifest: dict[str, Any] = {
        "iotpipe": __version__,
        "style": style.value,
        "detected_by": detection,
        "written_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "hostname": p.hostname,
        "user": p.user,
        "site": p.config.site,
        "device": p.config.device,
        "mqtt": p.config.mqtt,
        "mqtt_user": p.mqtt_user,
        "wifi_ssid": p.wifi.ssid if p.wifi else None,
        "config_txt": list(CONFIG_TXT_LINES),
        "cmdline_txt": CMDLINE_HOOK if style is Style.FIRSTRUN else None,
        "secrets_removed_after_install": sorted(secret_files),
        "files": files,
    }
    boot.write(MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def iotpipe_lines(boot: BootFiles) -> dict[str, list[str]]:
    """The lines iotpipe adds, as found in config.txt and cmdline.txt (``inspect``)."""
    config_txt = (boot.read("config.txt") or b"").decode(errors="replace").splitlines()
    cmdline = (boot.read("cmdline.txt") or b"").decode(errors="replace")
    return {
        "config.txt": [line for line in config_txt if line.strip() in CONFIG_TXT_LINES],
        "cmdline.txt": [CMDLINE_HOOK] if CMDLINE_HOOK in cmdline else [],
    }

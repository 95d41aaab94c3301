"""``iotpipe edge flash|seed|inspect``: put the edge agent onto a Raspberry Pi OS image or card.

Mounted by the ``iotpipe edge`` group. ``flash`` copies (and decompresses) an official image to
``--out`` and provisions the copy's FAT boot partition with mtools: no root, no mount, the input
image is never written. ``seed`` does the same on a card's boot partition mounted as a
directory. ``inspect`` shows partitions, the provisioning style and what iotpipe added. User
mistakes raise :class:`~iotpipe.errors.ConfigError` (or :class:`~edge.image.ImageError`), which
the root command prints as one line (exit 2). See docs/edge-flash.md.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import os
import tempfile
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from edge.image import (
    BootDirectory,
    BootFiles,
    FatImage,
    ImageError,
    boot_partition,
    copy_image,
    read_partitions,
)
from edge.provision import (
    MANIFEST,
    EdgeConfig,
    Provisioning,
    Style,
    Wifi,
    bundle_dir,
    detect_style,
    hostname_for,
    iotpipe_lines,
    load_edge_config,
    provision,
    read_manifest,
    read_ssh_keys,
)
from iotpipe.credentials import PasswordFormat, new_password, set_password
from iotpipe.errors import ConfigError

__all__ = ["StyleChoice", "flash", "inspect", "seed"]

# Names of environment variables, not secrets.
WIFI_PASSWORD_ENV = "IOTPIPE_WIFI_PASSWORD"  # noqa: S105
MQTT_PASSWORD_ENV = "IOTPIPE_MQTT_PASSWORD"  # noqa: S105


class StyleChoice(StrEnum):
    """``--style``: detect it, or force one."""

    AUTO = "auto"
    CLOUD_INIT = "cloud-init"
    FIRSTRUN = "firstrun"


# -- shared options ----------------------------------------------------------------------------

ConfigFile = Annotated[
    Path,
    typer.Option(
        "--config",
        "-c",
        help="The edge agent's edge.toml (\\[edge] site/device, \\[mqtt] url); copied root-only "
        "to /etc/iotpipe/edge.toml.",
        show_default=False,
        dir_okay=False,
    ),
]
SshKey = Annotated[
    Path,
    typer.Option(
        "--ssh-key",
        help="Public key file(s) allowed to log in as --user (~/.ssh/id_ed25519.pub).",
        show_default=False,
        dir_okay=False,
    ),
]
Bundle = Annotated[
    Path,
    typer.Option(
        "--bundle",
        help="Output of `iotpipe edge bundle` (directory or tarball with install.sh); "
        "copied to the boot partition as iotpipe/.",
        show_default=False,
    ),
]
User = Annotated[str, typer.Option("--user", help="Login to create, SSH key only.")]
Hostname = Annotated[
    str | None,
    typer.Option(
        "--hostname",
        help="\\[default: \\[edge] device of --config, e.g. pi-kitchen]",
        show_default=False,
    ),
]
WifiSsid = Annotated[
    str | None, typer.Option("--wifi-ssid", help="Wi-Fi network to join.", show_default=False)
]
WifiPassword = Annotated[
    str | None,
    typer.Option(
        "--wifi-password",
        help=f"Its passphrase (visible in `ps`: prefer --wifi-password-file or ${WIFI_PASSWORD_ENV}).",
        show_default=False,
    ),
]
WifiPasswordFile = Annotated[
    Path | None,
    typer.Option(
        "--wifi-password-file",
        help="File holding the passphrase.",
        show_default=False,
        dir_okay=False,
    ),
]
WifiCountry = Annotated[
    str | None,
    typer.Option(
        "--wifi-country", help="Regulatory domain, ISO 3166 (GB, DE, US).", show_default=False
    ),
]
MqttPasswordFile = Annotated[
    Path | None,
    typer.Option(
        "--mqtt-password-file",
        help=f"MQTT password for the LoadCredential= file (or ${MQTT_PASSWORD_ENV}) "
        "\\[default: the password in \\[mqtt] url, else a fresh random one for this device]",
        show_default=False,
        dir_okay=False,
    ),
]
BrokerPasswordFile = Annotated[
    Path | None,
    typer.Option(
        "--broker-password-file",
        help="Register the device's login in this `iotpipe broker --password-file` (its line "
        "added or replaced; the running broker picks it up at the next login).",
        show_default=False,
        dir_okay=False,
    ),
]
MosquittoPasswordFile = Annotated[
    Path | None,
    typer.Option(
        "--mosquitto-password-file",
        help="Register the device's login in this Mosquitto password_file (mosquitto_passwd "
        "format; reload Mosquitto after: systemctl reload mosquitto).",
        show_default=False,
        dir_okay=False,
    ),
]
ClientCert = Annotated[
    Path | None,
    typer.Option(
        "--client-cert",
        metavar="CA_DIR",
        help="Also give the device a client certificate (CN = {site}/{device}) issued by this "
        "CA (`iotpipe ca init`), with the CA's certificate; used over mqtts://.",
        show_default=False,
        file_okay=False,
    ),
]
StyleOption = Annotated[
    StyleChoice,
    typer.Option(
        "--style",
        help="First-boot mechanism: auto-detect, cloud-init (Trixie), firstrun (Bookworm).",
    ),
]


def _secret_file(path: Path, field: str) -> str:
    try:
        return path.read_text(encoding="utf-8").strip("\r\n")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(field, path, f"cannot read it ({err})") from None


def _wifi(
    ssid: str | None, password: str | None, password_file: Path | None, country: str | None
) -> Wifi | None:
    if password_file is not None:
        password = _secret_file(password_file, "--wifi-password-file")
    elif password is None:
        password = os.environ.get(WIFI_PASSWORD_ENV)
    if ssid is None:
        if password is not None or country is not None:
            raise ConfigError("--wifi-ssid", None, "required with a Wi-Fi password or country")
        return None
    if password is None:
        raise ConfigError(
            "--wifi-password",
            None,
            f"required with --wifi-ssid (or --wifi-password-file, or ${WIFI_PASSWORD_ENV})",
        )
    if country is None:
        raise ConfigError(
            "--wifi-country", None, "required with --wifi-ssid (Wi-Fi stays off without it)"
        )
    return Wifi.from_passphrase(ssid, password, country)


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """The brokers' password files where a flashed device's login is registered."""

    amqtt: Path | None = None
    mosquitto: Path | None = None

    def register(self, username: str, password: str) -> list[str]:
        """Add or replace the login in each file; return what to tell the user (no secret)."""
        done: list[str] = []
        if self.amqtt is not None:
            set_password(
                self.amqtt, username, password, PasswordFormat.AMQTT, field="--broker-password-file"
            )
            done.append(f"{self.amqtt} (iotpipe broker: in force at the next login)")
        if self.mosquitto is not None:
            set_password(
                self.mosquitto,
                username,
                password,
                PasswordFormat.MOSQUITTO,
                field="--mosquitto-password-file",
            )
            done.append(f"{self.mosquitto} (Mosquitto: systemctl reload mosquitto, or kill -HUP)")
        return done


@dataclass(frozen=True, slots=True)
class MqttLogin:
    """The user name and password a device logs in with; ``fresh``: made for this device."""

    user: str
    password: str = field(repr=False)
    fresh: bool


def _mqtt_login(edge: EdgeConfig, hostname: str, password_file: Path | None) -> MqttLogin:
    """The user name and password the device logs in with.

    An explicit password (file, environment, URL) is used as given. Otherwise each device gets a
    fresh random one, for its identity {site}/{device}: one card's secret then opens no other
    device's topics, and revoking one device leaves the fleet alone.
    """
    identity = edge.identity(hostname)
    if password_file is not None:
        explicit: str | None = _secret_file(password_file, "--mqtt-password-file")
    else:
        explicit = os.environ.get(MQTT_PASSWORD_ENV) or edge.mqtt_password
    if explicit:
        return MqttLogin(edge.mqtt_user or identity, explicit, fresh=False)
    if edge.mqtt_user and edge.mqtt_user != identity:
        raise ConfigError(
            "mqtt.url",
            edge.mqtt,
            f"its user is not the device identity {identity!r} that a fresh per-device password "
            "is made for: leave the user out of the URL (the agent then logs in as "
            f"{identity}), or pass --mqtt-password-file",
        )
    return MqttLogin(identity, new_password(), fresh=True)


def _provisioning(
    scratch: Path,
    *,
    config: Path,
    ssh_key: Path,
    bundle: Path,
    user: str,
    hostname: str | None,
    wifi: Wifi | None,
    mqtt_password_file: Path | None,
    client_ca: Path | None = None,
) -> tuple[Provisioning, MqttLogin]:
    """What to write to the card, and the MQTT login on it."""
    edge = load_edge_config(config)
    if hostname is None:
        if not edge.device:
            raise ConfigError(
                "--hostname", None, f"required: {config} has no [edge] device to derive it from"
            )
        hostname = hostname_for(edge.device)
    login = _mqtt_login(edge, hostname, mqtt_password_file)
    tls: dict[str, bytes] = {}
    if client_ca is not None:
        from iotpipe.ca import issue_client

        issued = issue_client(client_ca, edge.identity(hostname))
        tls = {"client_cert": issued.cert_pem, "client_key": issued.key_pem}
        tls["ca_cert"] = issued.ca_pem
    settings = Provisioning(
        hostname=hostname,
        user=user,
        ssh_keys=read_ssh_keys(ssh_key),
        config=edge,
        bundle=bundle_dir(bundle, scratch),
        wifi=wifi,
        mqtt_password=login.password,
        mqtt_user=login.user,
        **tls,
    )
    return settings, login


def _register(settings: Provisioning, login: MqttLogin, brokers: BrokerFiles) -> None:
    """Write the device's login into the brokers' password files; say where (never the secret)."""
    made = "a fresh password" if login.fresh else "the given password"
    typer.echo(f"  mqtt login {login.user}: {made}, on the card as iotpipe/mqtt-password")
    if settings.client_cert:
        typer.echo(
            f"  client certificate CN={settings.config.identity(settings.hostname)}: on the card "
            "as iotpipe/mqtt-client.crt, .key and mqtt-ca.crt"
            + ("" if settings.config.mqtt.startswith("mqtts://") else " (used over mqtts:// only)")
        )
    written = brokers.register(login.user, login.password)
    for line in written:
        typer.echo(f"  registered in {line}")
    if not written and login.fresh:
        typer.echo(
            "  warning: registered with no broker (pass --broker-password-file or "
            "--mosquitto-password-file); the device can log in only to a broker without passwords"
        )


def _style(boot: BootFiles, choice: StyleChoice, where: str) -> tuple[Style, str]:
    names = boot.names()
    if "config.txt" not in names and "cmdline.txt" not in names:
        raise ImageError(where, "no config.txt or cmdline.txt: not a Raspberry Pi boot partition")
    if choice is not StyleChoice.AUTO:
        return Style(choice.value), "--style"
    found = detect_style(boot, names)
    if found.style is None:
        raise ConfigError(
            "--style",
            "auto",
            f"cannot tell from the boot partition ({found.reason}); "
            "pass --style cloud-init (Trixie) or --style firstrun (Bookworm)",
        )
    return found.style, found.reason


def _report(manifest: dict[str, Any], target: str) -> None:
    files = manifest["files"]
    changed = [f["path"] for f in files if f["action"] == "changed"]
    added = [f for f in files if f["action"] == "added"]
    typer.echo(f"{target}: provisioned for {manifest['style']} ({manifest['detected_by']})")
    typer.echo(
        f"  hostname {manifest['hostname']} · user {manifest['user']} · "
        f"wifi {manifest['wifi_ssid'] or '-'} · mqtt {manifest['mqtt'] or '-'}"
    )
    typer.echo(f"  added {len(added)} files, changed {', '.join(changed) or 'nothing'}")
    typer.echo(
        "  secrets on the boot partition until first boot: "
        + ", ".join(manifest["secrets_removed_after_install"])
    )


class _Bar:
    """A rich progress bar on stderr for the copy (silent when stderr is not a terminal)."""

    def __init__(self, label: str) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

        self._progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            DownloadColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self._task = self._progress.add_task(label, total=None)

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._progress.stop()

    def __call__(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)


# -- commands ----------------------------------------------------------------------------------


def flash(
    *,
    image: Annotated[
        Path,
        typer.Option(
            "--image",
            help="Official Raspberry Pi OS image (.img or .img.xz); never modified.",
            show_default=False,
            dir_okay=False,
        ),
    ],
    config: ConfigFile,
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="The provisioned image to write.",
            show_default=False,
            dir_okay=False,
        ),
    ],
    ssh_key: SshKey,
    bundle: Bundle,
    user: User = "pi",
    hostname: Hostname = None,
    wifi_ssid: WifiSsid = None,
    wifi_password: WifiPassword = None,
    wifi_password_file: WifiPasswordFile = None,
    wifi_country: WifiCountry = None,
    mqtt_password_file: MqttPasswordFile = None,
    broker_password_file: BrokerPasswordFile = None,
    mosquitto_password_file: MosquittoPasswordFile = None,
    client_cert: ClientCert = None,
    style: StyleOption = StyleChoice.AUTO,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")] = False,
) -> None:
    """Make a ready-to-boot edge image: an official Raspberry Pi OS image plus first-boot setup.

    Copies --image (decompressing .xz) to --out and adds to the copy's FAT boot partition, with
    mtools (no root, no mount): hostname, a user with your SSH key, Wi-Fi, I2C and 1-Wire in
    config.txt, and the agent bundle with a first-boot script that installs it and enables
    iotpipe-edge.service. Trixie images get cloud-init files, Bookworm images firstrun.sh.
    Secrets (edge.toml, MQTT password, Wi-Fi PSK) end up root-only in /etc/iotpipe and are
    deleted from the boot partition after install. Unless a password is given, the device gets
    a fresh random one of its own, for its identity {site}/{device}, registered in the broker's
    password file(s) named (the password is never printed). Write --out to a card with
    Raspberry Pi Imager ("Use custom", no OS customisation) or dd.
    """
    if not image.is_file():
        raise ConfigError("--image", image, "no such file")
    if out.exists() and (out.resolve() == image.resolve()):
        raise ConfigError("--out", out, "is --image: flash never modifies the input image")
    if out.exists() and not force:
        raise ConfigError("--out", out, "exists; pass --force to replace it")
    if not config.is_file():
        raise ConfigError("--config", config, "no such file")
    wifi = _wifi(wifi_ssid, wifi_password, wifi_password_file, wifi_country)
    with tempfile.TemporaryDirectory(prefix="iotpipe-flash-") as tmp:
        settings, login = _provisioning(
            Path(tmp),
            config=config,
            ssh_key=ssh_key,
            bundle=bundle,
            user=user,
            hostname=hostname,
            wifi=wifi,
            mqtt_password_file=mqtt_password_file,
            client_ca=client_cert,
        )
        # Check the input before spending minutes on a copy.
        if not image.name.endswith(".xz"):
            boot_partition(image, read_partitions(image))
        with _Bar(f"copying {image.name}") as bar:
            copy_image(image, out, bar)
        try:
            part = boot_partition(out, read_partitions(out))
            boot = FatImage(out, part)
            chosen, reason = _style(boot, style, str(out))
            manifest = provision(boot, settings, chosen, detection=reason)
        except BaseException:
            out.unlink(missing_ok=True)
            raise
    _report(manifest, str(out))
    _register(settings, login, BrokerFiles(broker_password_file, mosquitto_password_file))


def seed(
    *,
    boot: Annotated[
        Path,
        typer.Option(
            "--boot",
            help="A card's boot partition, mounted (e.g. /media/$USER/bootfs).",
            show_default=False,
            file_okay=False,
        ),
    ],
    config: ConfigFile,
    ssh_key: SshKey,
    bundle: Bundle,
    user: User = "pi",
    hostname: Hostname = None,
    wifi_ssid: WifiSsid = None,
    wifi_password: WifiPassword = None,
    wifi_password_file: WifiPasswordFile = None,
    wifi_country: WifiCountry = None,
    mqtt_password_file: MqttPasswordFile = None,
    broker_password_file: BrokerPasswordFile = None,
    mosquitto_password_file: MosquittoPasswordFile = None,
    client_cert: ClientCert = None,
    style: StyleOption = StyleChoice.AUTO,
) -> None:
    """Provision a freshly written card in place: the same files as flash, on its mounted boot partition.

    For when the card was written with Raspberry Pi Imager (without its OS customisation) or dd.
    Like flash, it gives the device a fresh MQTT password unless one is given.
    """
    if not boot.is_dir():
        raise ConfigError("--boot", boot, "no such directory (mount the card's boot partition)")
    if not config.is_file():
        raise ConfigError("--config", config, "no such file")
    wifi = _wifi(wifi_ssid, wifi_password, wifi_password_file, wifi_country)
    with tempfile.TemporaryDirectory(prefix="iotpipe-seed-") as tmp:
        settings, login = _provisioning(
            Path(tmp),
            config=config,
            ssh_key=ssh_key,
            bundle=bundle,
            user=user,
            hostname=hostname,
            wifi=wifi,
            mqtt_password_file=mqtt_password_file,
            client_ca=client_cert,
        )
        files = BootDirectory(boot)
        chosen, reason = _style(files, style, str(boot))
        manifest = provision(files, settings, chosen, detection=reason)
    _report(manifest, str(boot))
    _register(settings, login, BrokerFiles(broker_password_file, mosquitto_password_file))
    typer.echo("  unmount the card before removing it (sync)")


def inspect_image(image: Path) -> dict[str, Any]:
    """What ``inspect --json`` prints: partitions, the detected style, iotpipe's additions."""
    if not image.is_file():
        raise ConfigError("IMAGE", image, "no such file")
    partitions = read_partitions(image)
    part = boot_partition(image, partitions)
    boot = FatImage(image, part)
    names = boot.names()
    found = detect_style(boot, names)
    return {
        "image": str(image),
        "partitions": [p.as_dict() for p in partitions],
        "boot_partition": part.number,
        "style": found.style.value if found.style else None,
        "detected_by": found.reason,
        "manifest": read_manifest(boot) if MANIFEST in names else None,
        "lines": iotpipe_lines(boot),
    }


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def inspect(
    image: Annotated[
        Path,
        typer.Argument(
            help="A disk image (.img), flashed or official.", show_default=False, dir_okay=False
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Show an image's partitions, its first-boot style, and what iotpipe added to it."""
    report = inspect_image(image)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(str(image))
    typer.echo("partitions:")
    for p in report["partitions"]:
        boot = "  (boot)" if p["number"] == report["boot_partition"] else ""
        typer.echo(
            f"  {p['number']}  {p['type']} {p['type_name']:<12} start {p['start_sector']:>9}"
            f"  size {_size(p['size']):>10}{boot}"
        )
    typer.echo(f"style: {report['style'] or 'unknown'} ({report['detected_by']})")
    manifest = report["manifest"]
    if manifest is None:
        typer.echo("iotpipe: not provisioned")
        return
    typer.echo(
        f"iotpipe {manifest['iotpipe']} provisioned it at {manifest['written_at']}: hostname "
        f"{manifest['hostname']}, user {manifest['user']}, wifi {manifest['wifi_ssid'] or '-'}, "
        f"mqtt {manifest['mqtt'] or '-'}"
    )
    for entry in manifest["files"]:
        secret = "  secret, removed after install" if entry.get("secret") else ""
        typer.echo(f"  {entry['action']:<9} {entry['path']}{secret}")
    for name, lines in report["lines"].items():
        for line in lines:
            typer.echo(f"  {name}: {line}")


flash.__doc__ = (
    pyinspect.cleandoc(flash.__doc__ or "")
    + """

[bold]Examples[/bold]

  iotpipe edge flash --image 2025-11-24-raspios-trixie-arm64-lite.img.xz \\
      --config edge.toml --ssh-key ~/.ssh/id_ed25519.pub --bundle dist/edge-bundle \\
      --wifi-ssid Home --wifi-password-file wifi.txt --wifi-country GB --out pi-kitchen.img
  iotpipe edge inspect pi-kitchen.img

  [dim]# a fresh password for home/pi-kitchen, registered with the site's broker(s)[/dim]
  iotpipe edge flash --image raspios.img.xz --config edge.toml --ssh-key ~/.ssh/id_ed25519.pub \\
      --bundle dist/edge-bundle --out pi-kitchen.img \\
      --broker-password-file /etc/iotpipe/broker.passwd \\
      --mosquitto-password-file /etc/mosquitto/passwd
  sudo systemctl reload mosquitto

  [dim]# revoke it later: iotpipe device revoke home/pi-kitchen --mosquitto-password-file ...[/dim]
"""
)

seed.__doc__ = (
    pyinspect.cleandoc(seed.__doc__ or "")
    + """

[bold]Examples[/bold]

  iotpipe edge seed --boot /media/$USER/bootfs --config edge.toml \\
      --ssh-key ~/.ssh/id_ed25519.pub --bundle dist/edge-bundle \\
      --broker-password-file /etc/iotpipe/broker.passwd
"""
)

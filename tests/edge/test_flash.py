"""``iotpipe edge flash|seed|inspect`` on synthetic Raspberry Pi OS images (see test_image.py).

After a flash, the expected files and lines are on the boot partition (read back with mtools),
every other boot file, the partition table, the ext4 root and the input image are unchanged.
"""

from __future__ import annotations

import json
import lzma
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from bridge.broker import BrokerThread, PasswordFile
from bridge.settings import BrokerSettings
from edge.cli_flash import flash, inspect, seed
from edge.config import EdgeSettings, mqtt_settings
from edge.image import FatImage, read_partitions, sha256_range
from edge.provision import CMDLINE_HOOK, MANIFEST
from iotpipe.ca import init_ca, issue_client, issue_server
from iotpipe.credentials import list_users, set_password
from iotpipe.errors import ConnectError, IotpipeError
from iotpipe.mqtt import Message, MqttClient, pump_until
from iotpipe.settings import MqttSettings, TlsSettings
from tests.conftest import MosquittoProcess, free_port, wait_port
from tests.edge.test_image import (
    BOOKWORM_FILES,
    BOOT_START,
    CMDLINE,
    IMAGE_SIZE,
    ROOT_START,
    TRIXIE_FILES,
    WHEEL,
    build_image,
    digest,
)

REPO = Path(__file__).resolve().parents[2]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBm0aQ1vYgZbJ3GJ7oXq2M6Tt5ZrPj2kD9S8n1r7X0yT me@laptop"
PASSPHRASE = "correct horse battery"
MQTT_SECRET = "s3cr3t-mqtt"
EDGE_TOML = f"""[edge]
site = "home"
device = "Pi_Kitchen"

[mqtt]
url = "mqtt://pi-kitchen:{MQTT_SECRET}@gateway.local:1883"
"""

app = typer.Typer()
app.command("flash")(flash)
app.command("seed")(seed)
app.command("inspect")(inspect)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One Trixie-like and one Bookworm-like official image per module (never modified)."""
    directory = tmp_path_factory.mktemp("official")
    return {
        "trixie": build_image(directory, TRIXIE_FILES, name="trixie.img"),
        "bookworm": build_image(directory, BOOKWORM_FILES, name="bookworm.img"),
    }


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """edge.toml, a public key, and a bundle directory with install.sh and a wheel."""
    (tmp_path / "edge.toml").write_text(EDGE_TOML)
    (tmp_path / "id_ed25519.pub").write_text(KEY + "\n")
    bundle = tmp_path / "bundle"
    (bundle / "wheels").mkdir(parents=True)
    (bundle / "install.sh").write_text("#!/bin/sh\necho install\n")
    (bundle / "wheels" / WHEEL).write_bytes(b"PK\x03\x04wheel")
    (tmp_path / "wifi.txt").write_text(PASSPHRASE + "\n")
    return {
        "config": tmp_path / "edge.toml",
        "key": tmp_path / "id_ed25519.pub",
        "bundle": bundle,
        "wifi": tmp_path / "wifi.txt",
    }


def run(*args: str | Path) -> str:
    """Run a command; return its output (failing the test, with the output, if it failed)."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def fails(*args: str | Path) -> IotpipeError:
    """Run a command that must fail with one clear line (an IotpipeError); return the error."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert isinstance(result.exception, IotpipeError), result.output
    assert "\n" not in str(result.exception)
    return result.exception


def flash_args(image: Path, out: Path, inputs: dict[str, Path], *extra: str) -> list[str | Path]:
    """The flash command line with Wi-Fi."""
    return [
        "flash", "--image", image, "--config", inputs["config"], "--out", out,
        "--ssh-key", inputs["key"], "--bundle", inputs["bundle"],
        "--wifi-ssid", "Home Net", "--wifi-password-file", inputs["wifi"], "--wifi-country", "gb",
        *extra,
    ]  # fmt: skip


def boot_files(image: Path) -> dict[str, bytes]:
    """Every file on the image's boot partition, read back with mtools."""
    fat = FatImage(image, read_partitions(image)[0])
    return {name: fat.read(name) or b"" for name in fat.names()}


def untouched_ranges(image: Path) -> tuple[str, str]:
    """SHA-256 of the partition table sector(s) before the boot partition, and of the ext4 root."""
    return (
        sha256_range(image, 0, BOOT_START * 512),
        sha256_range(image, ROOT_START * 512, IMAGE_SIZE - ROOT_START * 512),
    )


def assert_only_iotpipe_changed(before: dict[str, bytes], after: dict[str, bytes]) -> None:
    """Every original file is byte-identical unless the manifest says iotpipe changed it."""
    manifest = json.loads(after[MANIFEST])
    touched = {f["path"] for f in manifest["files"] if f["action"] in {"changed", "added"}}
    for name, data in before.items():
        if name not in touched:
            assert after[name] == data, name
    assert set(after) - set(before) <= touched | {MANIFEST}
    for entry in manifest["files"]:
        assert entry["path"] in after


def test_flash_trixie_writes_cloud_init_and_nothing_else(
    images: dict[str, Path], inputs: dict[str, Path], tmp_path: Path
) -> None:
    """A Trixie image gets user-data, meta-data, network-config, config.txt lines and iotpipe/."""
    official = images["trixie"]
    official_digest, ranges = digest(official), untouched_ranges(official)
    out = tmp_path / "pi-kitchen.img"
    output = run(*flash_args(official, out, inputs))
    assert "cloud-init (user-data, meta-data, network-config on the boot partition)" in output
    assert PASSPHRASE not in output
    assert MQTT_SECRET not in output

    assert digest(official) == official_digest
    assert untouched_ranges(out) == ranges
    before, after = boot_files(official), boot_files(out)
    assert_only_iotpipe_changed(before, after)

    user_data = after["user-data"].decode()
    assert user_data.startswith("#cloud-config\n")
    assert 'hostname: "pi-kitchen"' in user_data
    assert f'      - "{KEY}"' in user_data
    assert "  - [bash, /boot/firmware/iotpipe/firstboot.sh, cloud-init]" in user_data
    assert MQTT_SECRET not in user_data
    assert PASSPHRASE not in user_data
    meta = after["meta-data"].decode()
    assert meta.startswith("instance-id: iotpipe-pi-kitchen-")
    assert 'local-hostname: "pi-kitchen"' in meta
    network = after["network-config"].decode()
    assert '"Home Net":' in network
    assert 'regulatory-domain: "GB"' in network
    assert PASSPHRASE not in network
    assert "hashlib" not in network
    assert len(network.split('password: "')[1].split('"')[0]) == 64

    config_txt = after["config.txt"].decode()
    assert config_txt.startswith(TRIXIE_FILES["config.txt"])
    assert config_txt.splitlines().count("dtparam=i2c_arm=on") == 1
    assert config_txt.splitlines().count("dtoverlay=w1-gpio") == 1
    assert after["cmdline.txt"] == CMDLINE.encode()
    assert "firstrun.sh" not in after

    assert after["iotpipe/install.sh"] == (inputs["bundle"] / "install.sh").read_bytes()
    assert after[f"iotpipe/wheels/{WHEEL}"] == b"PK\x03\x04wheel"
    assert after["iotpipe/edge.toml"] == EDGE_TOML.encode()
    assert after["iotpipe/mqtt-password"] == MQTT_SECRET.encode()
    assert b"Type=notify" in after["iotpipe/iotpipe-edge.service"]
    firstboot = after["iotpipe/firstboot.sh"].decode()
    assert "rm -f /boot/firmware/network-config" in firstboot
    assert 'sh "$HERE/install.sh"' in firstboot
    # The secrets are in /etc/iotpipe before install.sh runs: it starts the unit only then.
    assert firstboot.index("\nmove_secrets\n") < firstboot.index('sh "$HERE/install.sh"')
    assert "trap finish EXIT" in firstboot
    assert "rm -f /boot/firmware/iotpipe/edge.toml" in firstboot

    manifest = json.loads(after[MANIFEST])
    assert manifest["style"] == "cloud-init"
    assert manifest["hostname"] == "pi-kitchen"
    assert manifest["mqtt"] == "mqtt://pi-kitchen@gateway.local:1883"
    actions = {f["path"]: f["action"] for f in manifest["files"]}
    assert actions["user-data"] == actions["config.txt"] == "changed"
    assert actions["iotpipe/install.sh"] == "added"
    assert manifest["secrets_removed_after_install"] == [
        "iotpipe/edge.toml",
        "iotpipe/mqtt-ca.crt",
        "iotpipe/mqtt-client.crt",
        "iotpipe/mqtt-client.key",
        "iotpipe/mqtt-password",
        "network-config",
    ]
    assert after["iotpipe/mqtt-client.key"] == b""  # no --client-cert: empty, as the unit needs it


def test_flash_bookworm_writes_firstrun_and_the_hook(
    images: dict[str, Path], inputs: dict[str, Path], tmp_path: Path
) -> None:
    """A Bookworm image gets firstrun.sh and the systemd.run= hook on cmdline.txt's one line."""
    official = images["bookworm"]
    ranges = untouched_ranges(official)
    out = tmp_path / "pi.img"
    output = run(*flash_args(official, out, inputs, "--user", "ops"))
    assert "firstrun (issue.txt: Raspberry Pi reference 2024-11-19)" in output
    assert untouched_ranges(out) == ranges
    before, after = boot_files(official), boot_files(out)
    assert_only_iotpipe_changed(before, after)

    assert not {"user-data", "meta-data", "network-config"} & set(after)
    cmdline = after["cmdline.txt"].decode()
    assert cmdline == CMDLINE.rstrip("\n") + " " + CMDLINE_HOOK + "\n"
    assert cmdline.count("\n") == 1
    firstrun = after["firstrun.sh"].decode()
    assert firstrun.startswith("#!/bin/bash\n")
    assert "set_hostname pi-kitchen" in firstrun
    assert "userconf ops" in firstrun
    assert KEY in firstrun
    assert PASSPHRASE not in firstrun
    assert f"sed -i 's| {CMDLINE_HOOK}||g' /boot/firmware/cmdline.txt" in firstrun
    assert "bash /boot/firmware/iotpipe/firstboot.sh firstrun" in firstrun
    for script in ("firstrun.sh", "iotpipe/firstboot.sh"):
        subprocess.run(["bash", "-n"], input=after[script], check=True)
    manifest = json.loads(after[MANIFEST])
    assert manifest["style"] == "firstrun"
    assert manifest["cmdline_txt"] == CMDLINE_HOOK
    assert "firstrun.sh" in manifest["secrets_removed_after_install"]


@pytest.mark.parametrize("style", ["trixie", "bookworm"])
def test_flashing_twice_changes_nothing_more(
    images: dict[str, Path], inputs: dict[str, Path], tmp_path: Path, style: str
) -> None:
    """Flashing an already flashed image keeps config.txt's lines and cmdline's hook single."""
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    run(*flash_args(images[style], first, inputs))
    run(*flash_args(first, second, inputs))
    once, twice = boot_files(first), boot_files(second)
    assert twice["config.txt"] == once["config.txt"]
    assert twice["cmdline.txt"] == once["cmdline.txt"]
    assert twice["cmdline.txt"].count(b"systemd.run=") == (style == "bookworm")
    manifest = json.loads(twice[MANIFEST])
    assert {f["path"]: f["action"] for f in manifest["files"]}["config.txt"] == "unchanged"
    assert manifest["detected_by"] == "provisioned before by iotpipe (iotpipe/MANIFEST.json)"


def test_flash_takes_xz_input(
    images: dict[str, Path], inputs: dict[str, Path], tmp_path: Path
) -> None:
    """An official .img.xz is decompressed into --out and provisioned there."""
    packed = tmp_path / "trixie.img.xz"
    packed.write_bytes(lzma.compress(images["trixie"].read_bytes(), preset=0))
    packed_digest = digest(packed)
    out = tmp_path / "out.img"
    run(*flash_args(packed, out, inputs))
    assert digest(packed) == packed_digest
    assert untouched_ranges(out) == untouched_ranges(images["trixie"])
    assert b"pi-kitchen" in boot_files(out)["user-data"]


def test_inspect_reports_partitions_style_and_manifest(
    images: dict[str, Path], inputs: dict[str, Path], tmp_path: Path
) -> None:
    """inspect shows both partitions, the style and its marker, and what iotpipe added."""
    plain = run("inspect", images["trixie"])
    assert "1  0x0c FAT32 (LBA)" in plain
    assert "2  0x83 Linux" in plain
    assert "(boot)" in plain
    assert "style: cloud-init" in plain
    assert "iotpipe: not provisioned" in plain

    out = tmp_path / "pi.img"
    run(*flash_args(images["bookworm"], out, inputs))
    text = run("inspect", out)
    assert "style: firstrun (provisioned before by iotpipe" in text
    assert "  added     firstrun.sh  secret, removed after install" in text
    assert "  changed   cmdline.txt" in text
    assert "  config.txt: dtparam=i2c_arm=on" in text
    assert f"  cmdline.txt: {CMDLINE_HOOK}" in text
    report = json.loads(run("inspect", out, "--json"))
    assert [p["start_sector"] for p in report["partitions"]] == [BOOT_START, ROOT_START]
    assert report["style"] == "firstrun"
    assert report["boot_partition"] == 1
    assert report["manifest"]["hostname"] == "pi-kitchen"
    assert report["lines"]["config.txt"] == ["dtparam=i2c_arm=on", "dtoverlay=w1-gpio"]
    assert report["lines"]["cmdline.txt"] == [CMDLINE_HOOK]


def test_seed_writes_the_same_files_on_a_mounted_boot_partition(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    """seed --boot DIR provisions a directory as flash provisions an image."""
    boot = tmp_path / "bootfs"
    for name, text in TRIXIE_FILES.items():
        (boot / name).parent.mkdir(parents=True, exist_ok=True)
        (boot / name).write_text(text)
    output = run(
        "seed", "--boot", boot, "--config", inputs["config"], "--ssh-key", inputs["key"],
        "--bundle", inputs["bundle"], "--hostname", "pi-garage",
    )  # fmt: skip
    assert "cloud-init" in output
    assert 'hostname: "pi-garage"' in (boot / "user-data").read_text()
    assert (boot / "network-config").read_text() == TRIXIE_FILES["network-config"]
    assert (boot / "iotpipe" / "install.sh").is_file()
    assert (boot / "config.txt").read_text().count("dtoverlay=w1-gpio") == 1
    manifest = json.loads((boot / MANIFEST).read_text())
    assert manifest["wifi_ssid"] is None
    assert not list(boot.rglob(".*.partial"))


def test_bundle_tarball_is_unpacked(inputs: dict[str, Path], tmp_path: Path) -> None:
    """A bundle tarball with one top directory lands as iotpipe/ like a directory would."""
    tarball = shutil.make_archive(
        str(tmp_path / "bundle"), "gztar", inputs["bundle"].parent, "bundle"
    )
    boot = tmp_path / "bootfs"
    boot.mkdir()
    for name in ("config.txt", "cmdline.txt", "issue.txt"):
        (boot / name).write_text(BOOKWORM_FILES[name])
    run(
        "seed", "--boot", boot, "--config", inputs["config"], "--ssh-key", inputs["key"],
        "--bundle", tarball,
    )  # fmt: skip
    assert (boot / "iotpipe" / "wheels" / WHEEL).is_file()
    assert (boot / "firstrun.sh").is_file()


def test_user_mistakes_are_one_line(
    images: dict[str, Path], inputs: dict[str, Path], tmp_path: Path
) -> None:
    """Missing image, existing --out, bad Wi-Fi, private key, bundle without install.sh..."""
    out = tmp_path / "out.img"
    assert "no such file" in str(fails(*flash_args(tmp_path / "nope.img", out, inputs)))
    out.write_bytes(b"")
    assert "pass --force" in str(fails(*flash_args(images["trixie"], out, inputs)))
    assert "never modifies" in str(
        fails(*flash_args(images["trixie"], images["trixie"], inputs, "--force"))
    )
    out.unlink()

    short = tmp_path / "short.txt"
    short.write_text("short")
    args = flash_args(images["trixie"], out, inputs)
    args[args.index(inputs["wifi"])] = short
    error = fails(*args)
    assert "8 to 63" in str(error)
    assert "short" not in str(error)

    private = tmp_path / "id_ed25519"
    private.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    args = flash_args(images["trixie"], out, inputs)
    args[args.index(inputs["key"])] = private
    assert "pass the public one" in str(fails(*args))

    empty = tmp_path / "empty-bundle"
    empty.mkdir()
    args = flash_args(images["trixie"], out, inputs)
    args[args.index(inputs["bundle"])] = empty
    assert "has no install.sh" in str(fails(*args))

    no_fat = tmp_path / "linux.img"
    with no_fat.open("wb") as fh:
        fh.truncate(4 * 1024 * 1024)
    subprocess.run(
        ["sfdisk", "-q", str(no_fat)], input=b"label: dos\nstart=2048, type=83\n", check=True
    )
    assert "no FAT boot partition" in str(fails(*flash_args(no_fat, out, inputs)))

    bad_config = tmp_path / "bad.toml"
    bad_config.write_text('[edge]\ndevice = "pi"\n')
    args = flash_args(images["trixie"], out, inputs)
    args[args.index(inputs["config"])] = bad_config
    assert "edge.site" in str(fails(*args))

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.txt").write_text("")
    (unknown / "cmdline.txt").write_text("root=/dev/mmcblk0p2\n")
    seed_args: list[str | Path] = ["seed", "--boot", unknown, "--config", inputs["config"], "--ssh-key", inputs["key"], "--bundle", inputs["bundle"]]  # fmt: skip
    assert "pass --style cloud-init" in str(fails(*seed_args))
    run(*seed_args, "--style", "firstrun")
    assert CMDLINE_HOOK in (unknown / "cmdline.txt").read_text()
    assert not out.exists()


def test_a_bundle_with_its_own_unit_keeps_it(inputs: dict[str, Path], tmp_path: Path) -> None:
    """The bundle's unit is not replaced (its SHA256SUMS must still match); no password: a fresh one."""
    (inputs["bundle"] / "iotpipe-edge.service").write_text("[Service]\nExecStart=/bin/true\n")
    inputs["config"].write_text('[edge]\nsite = "home"\n\n[mqtt]\nurl = "mqtt://gw:1883"\n')
    boot = tmp_path / "bootfs"
    boot.mkdir()
    for name in ("config.txt", "cmdline.txt", "issue.txt"):
        (boot / name).write_text(BOOKWORM_FILES[name])
    output = run(
        "seed", "--boot", boot, "--config", inputs["config"], "--ssh-key", inputs["key"],
        "--bundle", inputs["bundle"], "--hostname", "pi-shed",
    )  # fmt: skip
    assert (boot / "iotpipe" / "iotpipe-edge.service").read_text().endswith("/bin/true\n")
    password = (boot / "iotpipe" / "mqtt-password").read_text()
    assert len(password) == 32
    assert password not in output
    assert "mqtt login home/pi-shed: a fresh password" in output
    assert "warning: registered with no broker" in output
    assert "set_hostname pi-shed" in (boot / "firstrun.sh").read_text()


# -- a login per device ------------------------------------------------------------------------

FLEET_TOML = """[edge]
site = "home"
device = "{device}"

[mqtt]
url = "mqtt://gateway.local:1883"
"""


def card_login(image_or_boot: Path, device: str, port: int) -> MqttClient:
    """A client logging in as the flashed device's agent would, to 127.0.0.1:port.

    The card's mqtt-password plays systemd's credential; the URL (no user) is the config's.
    """
    if image_or_boot.is_dir():
        password = (image_or_boot / "iotpipe" / "mqtt-password").read_bytes()
    else:
        password = boot_files(image_or_boot)["iotpipe/mqtt-password"]
    credentials = image_or_boot.parent / f"credentials-{device}"
    credentials.mkdir(exist_ok=True)
    (credentials / "mqtt-password").write_bytes(password)
    settings = mqtt_settings(
        MqttSettings(url=f"mqtt://127.0.0.1:{port}"),
        EdgeSettings(site="home", device=device),
        environ={"CREDENTIALS_DIRECTORY": str(credentials)},
    )
    return MqttClient(settings)


@pytest.mark.mqtt
@pytest.mark.mosquitto
def test_each_flashed_device_gets_its_own_login_kept_to_its_own_topics(
    images: dict[str, Path], inputs: dict[str, Path], tmp_path: Path
) -> None:
    """flash and seed give each device a fresh password, registered for {site}/{device} in both
    brokers' files; each logs in, publishes under its own topics only, never to another's."""
    amqtt_file, mosquitto_file = tmp_path / "broker.passwd", tmp_path / "mosquitto.passwd"
    brokers = ["--broker-password-file", amqtt_file, "--mosquitto-password-file", mosquitto_file]
    inputs["config"].write_text(FLEET_TOML.format(device="pi-kitchen"))
    image = tmp_path / "pi-kitchen.img"
    flashed = run(
        "flash", "--image", images["trixie"], "--config", inputs["config"], "--out", image,
        "--ssh-key", inputs["key"], "--bundle", inputs["bundle"], *brokers,
    )  # fmt: skip
    inputs["config"].write_text(FLEET_TOML.format(device="pi-shed"))
    boot = tmp_path / "bootfs"
    boot.mkdir()
    for name in ("config.txt", "cmdline.txt", "issue.txt"):
        (boot / name).write_text(BOOKWORM_FILES[name])
    seeded = run(
        "seed", "--boot", boot, "--config", inputs["config"], "--ssh-key", inputs["key"],
        "--bundle", inputs["bundle"], *brokers,
    )  # fmt: skip

    kitchen_pw = boot_files(image)["iotpipe/mqtt-password"].decode()
    shed_pw = (boot / "iotpipe" / "mqtt-password").read_text()
    assert len(kitchen_pw) == len(shed_pw) == 32
    assert kitchen_pw != shed_pw
    for output, secret in ((flashed, kitchen_pw), (seeded, shed_pw)):
        assert secret not in output
        assert f"registered in {amqtt_file} (iotpipe broker" in output
        assert f"registered in {mosquitto_file} (Mosquitto: systemctl reload mosquitto" in output
    assert "mqtt login home/pi-kitchen: a fresh password" in flashed
    assert (
        list_users(amqtt_file) == list_users(mosquitto_file) == ["home/pi-kitchen", "home/pi-shed"]
    )
    assert json.loads(boot_files(image)[MANIFEST])["mqtt_user"] == "home/pi-kitchen"

    set_password(amqtt_file, "bridge", "bridge-pw")
    broker = BrokerThread(
        BrokerSettings(
            port=free_port(), http_port=0, password_file=amqtt_file,
            acl_file=REPO / "configs" / "broker-acl.toml",
        )
    ).start()  # fmt: skip
    try:
        port = broker.settings.port
        got: list[Message] = []
        bridge = MqttClient(
            MqttSettings(url=f"mqtt://bridge:bridge-pw@127.0.0.1:{port}"), on_message=got.append
        )
        bridge.connect()
        bridge.subscribe([("iotpipe/#", 1)])
        kitchen = card_login(image, "pi-kitchen", port)
        kitchen.connect()
        kitchen.publish("iotpipe/v1/home/pi-shed/telemetry", b"forged")
        kitchen.publish("iotpipe/v1/home/pi-kitchen/telemetry", b"own")
        assert kitchen.flush(timeout=10)
        assert pump_until(bridge, lambda: len(got) >= 1, timeout=10)
        assert [(m.topic, m.payload) for m in got] == [
            ("iotpipe/v1/home/pi-kitchen/telemetry", b"own")
        ]
        assert broker.stats.denied_publishes == 1
        with pytest.raises(ConnectError, match="Not authorized"):  # one card's secret, another name
            MqttClient(
                MqttSettings(url=f"mqtt://home%2Fpi-shed:{kitchen_pw}@127.0.0.1:{port}")
            ).connect(timeout=5)
        shed = card_login(boot, "pi-shed", port)
        shed.connect()
        shed.disconnect()
        kitchen.disconnect()
        bridge.disconnect()
    finally:
        broker.stop()

    mosquitto = MosquittoProcess(
        tmp_path / "mosquitto", free_port(),
        f"allow_anonymous false\npassword_file {mosquitto_file}\n",
    )  # fmt: skip
    mosquitto.start()
    try:
        for where, device in ((image, "pi-kitchen"), (boot, "pi-shed")):
            client = card_login(where, device, mosquitto.port)
            client.connect(timeout=5)
            client.disconnect()
    finally:
        mosquitto.stop()


def test_a_fresh_password_needs_the_device_identity_as_user(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    """A URL user other than {site}/{device} is refused for a fresh password; an explicit
    --mqtt-password-file is still used as given and registered for the URL's user."""
    boot = tmp_path / "bootfs"
    boot.mkdir()
    for name in ("config.txt", "cmdline.txt", "issue.txt"):
        (boot / name).write_text(BOOKWORM_FILES[name])
    inputs["config"].write_text(
        '[edge]\nsite = "home"\ndevice = "pi-1"\n\n[mqtt]\nurl = "mqtt://shared@gw:1883"\n'
    )
    passwd = tmp_path / "broker.passwd"
    args: list[str | Path] = [
        "seed", "--boot", boot, "--config", inputs["config"], "--ssh-key", inputs["key"],
        "--bundle", inputs["bundle"], "--broker-password-file", passwd,
    ]  # fmt: skip
    error = fails(*args)
    assert "not the device identity 'home/pi-1'" in str(error)
    assert not passwd.exists()
    (tmp_path / "pw.txt").write_text("given-secret\n")
    output = run(*args, "--mqtt-password-file", tmp_path / "pw.txt")
    assert "mqtt login shared: the given password" in output
    assert (boot / "iotpipe" / "mqtt-password").read_text() == "given-secret"
    assert PasswordFile(passwd).verify("shared", "given-secret")


@pytest.mark.mqtt
@pytest.mark.mosquitto
def test_a_client_certificate_on_the_card_logs_the_device_in_by_its_identity(
    inputs: dict[str, Path], tmp_path: Path, unique: str
) -> None:
    """--client-cert puts a certificate for {site}/{device} on the card (key a secret); the agent
    takes it from its credentials, and Mosquitto (use_identity_as_username) lets it publish under
    its own topics over TLS."""
    ca = tmp_path / "ca"
    init_ca(ca)
    boot = tmp_path / "bootfs"
    boot.mkdir()
    for name in ("config.txt", "cmdline.txt", "issue.txt"):
        (boot / name).write_text(BOOKWORM_FILES[name])
    inputs["config"].write_text(
        f'[edge]\nsite = "{unique}"\ndevice = "pi-1"\n\n[mqtt]\nurl = "mqtts://gw.local:8883"\n'
    )
    output = run(
        "seed", "--boot", boot, "--config", inputs["config"], "--ssh-key", inputs["key"],
        "--bundle", inputs["bundle"], "--client-cert", ca,
    )  # fmt: skip
    assert f"client certificate CN={unique}/pi-1: on the card" in output
    card = boot / "iotpipe"
    assert "PRIVATE KEY" in (card / "mqtt-client.key").read_text()
    assert (card / "mqtt-client.key").read_text() not in output
    assert (card / "mqtt-ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()
    manifest = json.loads((card / "MANIFEST.json").read_text())
    secret = {f["path"] for f in manifest["files"] if f.get("secret")}
    assert {"iotpipe/mqtt-client.key", "iotpipe/mqtt-password"} <= secret
    assert "mqtt-client.key" in (card / "firstboot.sh").read_text()  # moved root-only

    server = issue_server(ca, ["127.0.0.1"])
    server_cert, server_key = server.write(tmp_path / "server")
    bridge_cert, bridge_key = issue_client(ca, "bridge").write(tmp_path / "bridge")
    tls_port = free_port()
    mosquitto = MosquittoProcess(
        tmp_path / "mosquitto", free_port(),
        f"acl_file {REPO / 'configs' / 'mosquitto' / 'acl'}\n"
        f"listener {tls_port} 127.0.0.1\ncafile {ca / 'ca.crt'}\n"
        f"certfile {server_cert}\nkeyfile {server_key}\n"
        "require_certificate true\nuse_identity_as_username true\n",
    )  # fmt: skip
    mosquitto.start()
    try:
        wait_port(tls_port)
        got: list[Message] = []
        bridge = MqttClient(
            MqttSettings(
                url=f"mqtts://127.0.0.1:{tls_port}",
                tls=TlsSettings(ca_file=ca / "ca.crt", cert_file=bridge_cert, key_file=bridge_key),
            ),
            on_message=got.append,
        )
        bridge.connect()
        bridge.subscribe([(f"iotpipe/v1/{unique}/#", 1)])
        agent = mqtt_settings(
            MqttSettings(url=f"mqtts://127.0.0.1:{tls_port}"),
            EdgeSettings(site=unique, device="pi-1"),
            environ={"CREDENTIALS_DIRECTORY": str(card)},
        )
        assert agent.tls.key_file == card / "mqtt-client.key"
        device = MqttClient(agent)
        device.connect()
        device.publish(f"iotpipe/v1/{unique}/pi-1/telemetry", b"own")  # needs user {unique}/pi-1
        assert device.flush(timeout=10)
        assert pump_until(bridge, lambda: len(got) >= 1, timeout=10)
        assert [m.topic for m in got] == [f"iotpipe/v1/{unique}/pi-1/telemetry"]
        device.disconnect()
        bridge.disconnect()
    finally:
        mosquitto.stop()

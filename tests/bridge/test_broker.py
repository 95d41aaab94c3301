"""The embedded broker: settings, ACL and password rules, and amqtt behaviour through real clients."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError

import bridge.broker
from bridge.broker import (
    Acl,
    BrokerThread,
    EmbeddedBroker,
    PasswordFile,
    add_user,
    filter_covers,
    load_acl,
)
from bridge.settings import BrokerSettings
from iotpipe.errors import ConfigError, ConnectError
from iotpipe.mqtt import Message, Will, pump_until
from iotpipe.settings import load
from tests.bridge.conftest import CONFIGS, Credentials, StartBroker, client, password_of
from tests.conftest import AmqttThread, amqtt_config, free_port, wait_for
from tests.tlsca import TestCa

# -- pure rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("allowed", "requested", "covered"),
    [
        ("iotpipe/#", "iotpipe/v1/home/pi/telemetry", True),
        ("iotpipe/#", "iotpipe/v1/+/+/telemetry", True),
        ("iotpipe/#", "iotpipe", True),
        ("iotpipe/#", "iotpipe/#", True),
        ("iotpipe/v1/home/pi/#", "iotpipe/v1/home/pi/status", True),
        ("iotpipe/v1/home/pi/#", "iotpipe/v1/home/pi2/status", False),
        ("iotpipe/v1/home/pi/#", "iotpipe/v1/home/+/status", False),
        ("iotpipe/v1/home/pi/#", "iotpipe/#", False),
        ("iotpipe/v1/+/+/telemetry", "iotpipe/v1/a/b/telemetry", True),
        ("iotpipe/v1/+/+/telemetry", "iotpipe/v1/+/b/telemetry", True),
        ("iotpipe/v1/+/+/telemetry", "iotpipe/v1/a/b/status", False),
        ("iotpipe/v1/+/+/telemetry", "iotpipe/v1/a/b/telemetry/x", False),
        ("iotpipe/v1/+/+/telemetry", "iotpipe/v1/a/#", False),
        ("a/b", "a", False),
        ("a", "a/b", False),
    ],
)
def test_filter_covers(allowed: str, requested: str, covered: bool) -> None:
    """A filter covers a request only if every topic the request can match is matched by it."""
    assert filter_covers(allowed, requested) is covered


def test_default_device_rule_allows_only_the_devices_own_prefix() -> None:
    """A {site}/{device} user may publish under its own prefix only and subscribe to nothing."""
    acl = Acl()
    assert acl.may_publish("home/pi", "iotpipe/v1/home/pi/telemetry")
    assert acl.may_publish("home/pi", "iotpipe/v1/home/pi/status")
    assert not acl.may_publish("home/pi", "iotpipe/v1/home/pi2/telemetry")
    assert not acl.may_publish("home/pi", "iotpipe/v1/office/pi/telemetry")
    assert not acl.may_subscribe("home/pi", "iotpipe/v1/home/pi/#")


@pytest.mark.parametrize("username", ["home", "home/pi/x", "home/p.i", "a/", "/b", "", None])
def test_usernames_that_are_not_site_slash_device_get_nothing(username: str | None) -> None:
    """Usernames outside the {site}/{device} form and not named in the ACL may do nothing."""
    acl = Acl()
    assert not acl.may_publish(username, "iotpipe/v1/home/pi/telemetry")
    assert not acl.may_publish(username, f"iotpipe/v1/{username}/telemetry")


def test_a_named_user_rule_replaces_the_device_rule() -> None:
    """A [users.NAME] entry wins over the [devices] rule, even for a {site}/{device} name."""
    acl = Acl.model_validate(
        {
            "users": {
                "home/gateway": {"publish": ["iotpipe/v1/home/#"]},
                "bridge": {"subscribe": ["iotpipe/#"]},
            }
        }
    )
    assert acl.may_publish("home/gateway", "iotpipe/v1/home/other/telemetry")
    assert acl.may_subscribe("bridge", "iotpipe/v1/+/+/telemetry")
    assert not acl.may_publish("bridge", "iotpipe/v1/home/pi/telemetry")


def test_shipped_acl_example_gives_services_their_rights(credentials: Credentials) -> None:
    """configs/broker-acl.toml: devices own prefix, bridge/recorder/watch read, simulator/replay write."""
    acl = load_acl(credentials.acl_file)
    assert acl.may_publish("home/dev1", "iotpipe/v1/home/dev1/telemetry")
    assert not acl.may_publish("home/dev1", "iotpipe/v1/home/dev2/telemetry")
    for reader in ("bridge", "recorder", "watch"):
        assert acl.may_subscribe(reader, "iotpipe/#")
        assert not acl.may_publish(reader, "iotpipe/v1/home/dev1/telemetry")
    for writer in ("simulator", "replay"):
        assert acl.may_publish(writer, "iotpipe/v1/any/device/telemetry")
        assert not acl.may_subscribe(writer, "iotpipe/#")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '[users.bridge]\nsubscribe = ["iotpipe/#/x"]\n',
            r"users\.bridge\.subscribe.*'#' must be the whole last level",
        ),
        (
            '[devices]\npublish = ["iotpipe/v1/{user}/#"]\n',
            r"devices.*unknown placeholder \{user\}",
        ),
        (
            '[users.bridge]\nsubscribe = ["iotpipe/{site}/#"]\n',
            r"placeholders are only for \[devices\]",
        ),
        ('[users.bridge]\nread = ["iotpipe/#"]\n', r"users\.bridge\.read: unknown key"),
        ("[devices\n", r"not valid TOML"),
    ],
)
def test_bad_acl_file_is_one_config_error_naming_the_rule(
    tmp_path: Path, content: str, message: str
) -> None:
    """An invalid ACL fails at start-up with a ConfigError that points at the offending rule."""
    path = tmp_path / "acl.toml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_acl(path)


def test_add_user_writes_an_amqtt_password_file(tmp_path: Path) -> None:
    """add_user creates a 0600 user:argon2 file, replaces a user's password, and keeps other lines."""
    path = tmp_path / "passwd"
    assert add_user(path, "home/pi", "one")
    path.write_text("# devices\n" + path.read_text())
    assert add_user(path, "bridge", "two")
    assert not add_user(path, "home/pi", "three")
    lines = path.read_text().splitlines()
    assert lines[0] == "# devices"
    assert [line.split(":", 1)[0] for line in lines[1:]] == ["home/pi", "bridge"]
    assert all(line.split(":", 1)[1].startswith("$argon2id$") for line in lines[1:])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    passwords = PasswordFile(path)
    assert passwords.verify("home/pi", "three")
    assert not passwords.verify("home/pi", "one")
    assert passwords.verify("bridge", "two")
    assert not passwords.verify("nobody", "two")


@pytest.mark.parametrize("username", ["", "a:b", "a b"])
def test_add_user_refuses_unusable_names(tmp_path: Path, username: str) -> None:
    """A username that cannot be written to the file (empty, ':' or spaces) is a ConfigError."""
    with pytest.raises(ConfigError, match="username"):
        add_user(tmp_path / "passwd", username, "pw")


def test_mosquitto_hashes_are_refused_with_a_hint(tmp_path: Path) -> None:
    """A mosquitto_passwd line ($7$ PBKDF2) is rejected at start-up, naming the line and the fix."""
    path = tmp_path / "passwd"
    path.write_text("bridge:$7$101$c2FsdA==$aGFzaA==\n")
    with pytest.raises(
        ConfigError, match=r"line 1 \(user 'bridge'\): not an argon2 hash.*--add-user"
    ):
        PasswordFile(path)


def test_missing_password_file_says_how_to_create_it(tmp_path: Path) -> None:
    """Starting with a password file that does not exist tells the user how to create one."""
    with pytest.raises(ConfigError, match=r"broker\.password_file.*iotpipe broker --add-user"):
        PasswordFile(tmp_path / "nope")


def test_settings_refuse_an_acl_without_passwords(tmp_path: Path) -> None:
    """An ACL without a password file is refused: unauthenticated usernames are only claims."""
    with pytest.raises(ConfigError, match=r"broker\.acl_file=.*needs password_file"):
        load(BrokerSettings, "broker", overrides={"acl_file": tmp_path / "acl.toml"})


def test_settings_refuse_ipv6_hosts() -> None:
    """An IPv6 listen address is refused up front (amqtt 0.12 cannot bind one)."""
    with pytest.raises(ConfigError, match=r"broker\.host='::1'.*IPv6"):
        load(BrokerSettings, "broker", overrides={"host": "::1"})


def test_sample_broker_config_loads_and_documents_the_defaults(tmp_path: Path) -> None:
    """configs/broker.toml loads as the defaults, and uncommenting every option changes none of them."""
    sample = CONFIGS / "broker.toml"
    assert load(BrokerSettings, "broker", config_file=sample, environ={}) == BrokerSettings()
    uncommented = tmp_path / "broker.toml"
    uncommented.write_text(
        "\n".join(
            line.removeprefix("# ") if line.startswith("# ") and " = " in line else line
            for line in sample.read_text().splitlines()
        )
    )
    data = tomllib.loads(uncommented.read_text())["broker"]
    assert set(data) == set(BrokerSettings.model_fields), "every option is in the sample"
    # The example TLS files need a TLS port (files without one are refused).
    tls_on = {"IOTPIPE_BROKER__TLS_PORT": "8883"}
    settings = load(BrokerSettings, "broker", config_file=uncommented, environ=tls_on)
    defaults = BrokerSettings()
    off_with_example = ("password_file", "acl_file", "state_file", "tls_port", "tls_cert_file")
    for name in BrokerSettings.model_fields:
        if name not in (*off_with_example, "tls_key_file"):
            assert getattr(settings, name) == getattr(defaults, name), name


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """IOTPIPE_BROKER__PORT overrides the file, and a --port flag overrides both."""
    config = tmp_path / "broker.toml"
    config.write_text("[broker]\nport = 1884\n")
    env = {"IOTPIPE_BROKER__PORT": "1885"}
    assert load(BrokerSettings, "broker", config_file=config, environ=env).port == 1885
    assert (
        load(
            BrokerSettings, "broker", config_file=config, environ=env, overrides={"port": 1886}
        ).port
        == 1886
    )


# -- through real clients ---------------------------------------------------------------------


def _queued(broker: BrokerThread, client_id: str) -> int:
    count: int = broker.call(lambda embedded: embedded.queued_messages(client_id))
    return count


@pytest.mark.mqtt
def test_persistent_session_queues_qos1_messages_while_disconnected(
    embedded_broker: BrokerThread, unique: str
) -> None:
    """A clean_session=False subscriber without credentials gets every QoS 1 message sent while it was away."""
    count = 50
    topic = f"iotpipe/v1/site-{unique}/dev/telemetry"
    sub_id = f"persistent-{unique}"
    sub = client(embedded_broker, client_id=sub_id, clean_session=False)
    sub.connect()
    sub.subscribe([(topic, 1)])
    sub.disconnect()

    pub = client(embedded_broker, client_id=f"pub-{unique}")
    pub.connect()
    for i in range(count):
        pub.publish(topic, str(i).encode(), qos=1)
    assert pub.flush(timeout=10)
    pub.disconnect()
    # Every message is in the session's queue before the subscriber returns: this is queueing,
    # not a live delivery racing the reconnect.
    wait_for(lambda: _queued(embedded_broker, sub_id) == count, what=f"{count} queued messages")

    got: list[Message] = []
    back = client(embedded_broker, client_id=sub_id, clean_session=False, on_message=got.append)
    back.connect()
    assert back.session_present
    assert pump_until(back, lambda: len(got) >= count, timeout=10)
    assert [int(m.payload) for m in got] == list(range(count))
    assert {m.qos for m in got} == {1}
    back.disconnect()


@pytest.mark.mqtt
def test_clean_session_gets_nothing_sent_while_away(
    embedded_broker: BrokerThread, unique: str
) -> None:
    """A clean-session subscriber that reconnects starts afresh: no session, nothing queued, nothing delivered."""
    topic = f"iotpipe/v1/site-{unique}/dev/telemetry"
    sub_id = f"clean-{unique}"
    sub = client(embedded_broker, client_id=sub_id, clean_session=True)
    sub.connect()
    sub.subscribe([(topic, 1)])
    sub.disconnect()

    pub = client(embedded_broker, client_id=f"pub-{unique}")
    pub.connect()
    for i in range(10):
        pub.publish(topic, str(i).encode(), qos=1)
    assert pub.flush(timeout=10)

    got: list[Message] = []
    back = client(embedded_broker, client_id=sub_id, clean_session=True, on_message=got.append)
    back.connect()
    assert not back.session_present
    back.subscribe([(topic, 1)])
    pub.publish(topic, b"after", qos=1)  # a sentinel: anything queued would have come before it
    assert pump_until(back, lambda: len(got) >= 1, timeout=10)
    assert [m.payload for m in got] == [b"after"]
    assert _queued(embedded_broker, sub_id) == 0
    back.disconnect()
    pub.disconnect()


@pytest.mark.mqtt
def test_stock_amqtt_anonymous_auth_drops_persistent_sessions(unique: str) -> None:
    """Plain amqtt with allow_anonymous loses a persistent subscriber's messages: why IotpipeAuthPlugin exists."""
    port = free_port()
    stock = AmqttThread(amqtt_config(port, allow_anonymous=True))
    stock.start()
    try:
        topic = f"t/{unique}"
        sub = client(port, client_id=f"persistent-{unique}", clean_session=False)
        sub.connect()
        sub.subscribe([(topic, 1)])
        sub.disconnect()
        pub = client(port, client_id=f"pub-{unique}")
        pub.connect()
        pub.publish(topic, b"lost", qos=1)
        assert pub.flush(timeout=10)
        # amqtt's session monitor drops disconnected anonymous sessions (within about a second).
        wait_for(
            lambda: f"persistent-{unique}" not in stock.broker.sessions, what="session dropped"
        )
        got: list[Message] = []
        back = client(
            port, client_id=f"persistent-{unique}", clean_session=False, on_message=got.append
        )
        back.connect()
        assert not back.session_present
        back.subscribe([(topic, 1)])
        pub.publish(topic, b"live", qos=1)  # a queued "lost" would arrive before this one
        assert pump_until(back, lambda: len(got) >= 1, timeout=10)
        assert [m.payload for m in got] == [b"live"], "amqtt now queues for anonymous sessions"
        back.disconnect()
        pub.disconnect()
    finally:
        stock.stop()


@pytest.mark.mqtt
def test_queue_of_a_disconnected_session_is_bounded(start_broker: StartBroker, unique: str) -> None:
    """Past max_queued_messages the oldest queued messages are dropped and counted; the newest arrive."""
    broker = start_broker(max_queued_messages=5)
    topic = f"t/{unique}"
    sub_id = f"persistent-{unique}"
    sub = client(broker, client_id=sub_id, clean_session=False)
    sub.connect()
    sub.subscribe([(topic, 1)])
    sub.disconnect()
    pub = client(broker, client_id=f"pub-{unique}")
    pub.connect()
    for i in range(12):
        pub.publish(topic, str(i).encode(), qos=1)
    assert pub.flush(timeout=10)
    wait_for(lambda: broker.stats.dropped["queue_full"] == 7, what="7 dropped messages")
    assert _queued(broker, sub_id) == 5
    got: list[Message] = []
    back = client(broker, client_id=sub_id, clean_session=False, on_message=got.append)
    back.connect()
    assert pump_until(back, lambda: len(got) >= 5, timeout=10)
    assert [int(m.payload) for m in got] == [7, 8, 9, 10, 11]
    back.disconnect()
    pub.disconnect()


@pytest.mark.mqtt
def test_session_expiry_forgets_a_disconnected_session(
    start_broker: StartBroker, unique: str
) -> None:
    """With session_expiry set, a persistent session gone longer than that is forgotten."""
    broker = start_broker(session_expiry=1)
    sub_id = f"persistent-{unique}"
    sub = client(broker, client_id=sub_id, clean_session=False)
    sub.connect()
    sub.subscribe([(f"t/{unique}", 1)])
    sub.disconnect()

    wait_for(lambda: broker.stats.sessions == 0, timeout=10, what="the session to expire")
    back = client(broker, client_id=sub_id, clean_session=False)
    back.connect()
    assert not back.session_present
    back.disconnect()


@pytest.mark.mqtt
def test_auth_refuses_anonymous_and_wrong_passwords(
    secured_broker: BrokerThread, unique: str
) -> None:
    """With a password file, clients without a username or with a wrong password are refused."""
    with pytest.raises(ConnectError, match="Not authorized"):
        client(secured_broker, client_id=f"anon-{unique}").connect(timeout=5)
    with pytest.raises(ConnectError, match="Not authorized"):
        client(secured_broker, "bridge", "wrong", client_id=f"bad-{unique}").connect(timeout=5)
    with pytest.raises(ConnectError, match="Not authorized"):
        client(secured_broker, "nobody", "pw-nobody", client_id=f"who-{unique}").connect(timeout=5)
    ok = client(secured_broker, "bridge", client_id=f"bridge-{unique}")
    ok.connect(timeout=5)
    ok.disconnect()
    assert secured_broker.stats.refused_connections == 3


@pytest.mark.mqtt
def test_device_publishes_only_under_its_own_prefix(
    secured_broker: BrokerThread, unique: str
) -> None:
    """A forged publish is acknowledged (no NACK in 3.1.1) but neither delivered nor retained, and counted."""
    got: list[Message] = []
    bridge = client(secured_broker, "bridge", client_id=f"bridge-{unique}", on_message=got.append)
    bridge.connect()
    bridge.subscribe([("iotpipe/#", 1)])
    device = client(secured_broker, "home/dev1", client_id=f"dev1-{unique}")
    device.connect()
    device.publish("iotpipe/v1/home/dev2/telemetry", b"forged", qos=1)
    device.publish("iotpipe/v1/home/dev2/status", b"forged", qos=1, retain=True)
    device.publish("iotpipe/v1/home/dev1/status", b"mine", qos=1, retain=True)
    device.publish("iotpipe/v1/home/dev1/telemetry", b"mine", qos=1)
    assert device.flush(timeout=10)
    assert device.acknowledged == 4, "denied QoS 1 publishes are still PUBACKed"
    # Messages from one client are handled in order, so once the last one arrived, the forged
    # ones have been decided.
    assert pump_until(bridge, lambda: len(got) >= 2, timeout=10)
    assert [(m.topic, m.payload) for m in got] == [
        ("iotpipe/v1/home/dev1/status", b"mine"),
        ("iotpipe/v1/home/dev1/telemetry", b"mine"),
    ]
    stats = secured_broker.stats
    assert stats.denied_publishes == 2
    assert stats.retained == 1, "the forged retained status was not stored"
    device.disconnect()
    bridge.disconnect()


@pytest.mark.mqtt
def test_acl_refuses_foreign_subscriptions_and_wills(
    secured_broker: BrokerThread, unique: str
) -> None:
    """Devices may not subscribe, nor set a last will on another device's topic; services get their rules."""
    device = client(secured_broker, "home/dev1", client_id=f"dev1-{unique}")
    device.connect()
    with pytest.raises(ConnectError, match="subscription refused"):
        device.subscribe([("iotpipe/#", 1)])
    device.disconnect()
    forged_will = Will("iotpipe/v1/home/dev2/status", b'{"state": "offline"}')
    with pytest.raises(ConnectError, match="Not authorized"):
        client(secured_broker, "home/dev1", client_id=f"will-{unique}", will=forged_will).connect(
            timeout=5
        )
    own_will = Will("iotpipe/v1/home/dev1/status", b'{"state": "offline"}')
    with_will = client(secured_broker, "home/dev1", client_id=f"own-will-{unique}", will=own_will)
    with_will.connect(timeout=5)
    with_will.disconnect()
    simulator = client(secured_broker, "simulator", client_id=f"sim-{unique}")
    simulator.connect()
    with pytest.raises(ConnectError, match="subscription refused"):
        simulator.subscribe([("iotpipe/#", 1)])
    simulator.disconnect()
    assert secured_broker.stats.denied_subscribes == 2


@pytest.mark.mqtt
def test_simulator_may_publish_for_any_device(secured_broker: BrokerThread, unique: str) -> None:
    """The simulator service user publishes for many devices at once and the bridge receives it all."""
    got: list[Message] = []
    bridge = client(secured_broker, "bridge", client_id=f"bridge-{unique}", on_message=got.append)
    bridge.connect()
    bridge.subscribe([("iotpipe/v1/+/+/telemetry", 1)])
    simulator = client(secured_broker, "simulator", client_id=f"sim-{unique}")
    simulator.connect()
    for device in ("a", "b", "c"):
        simulator.publish(f"iotpipe/v1/{unique}/{device}/telemetry", device.encode())
    assert simulator.flush(timeout=10)
    assert pump_until(bridge, lambda: len(got) >= 3, timeout=10)
    assert sorted(m.payload for m in got) == [b"a", b"b", b"c"]
    assert secured_broker.stats.denied_publishes == 0
    simulator.disconnect()
    bridge.disconnect()


@pytest.mark.mqtt
@pytest.mark.parametrize("attacker_clean_session", [True, False])
def test_failed_login_cannot_touch_anothers_session(
    secured_broker: BrokerThread, unique: str, attacker_clean_session: bool
) -> None:
    """A CONNECT with the bridge's client id but a wrong password neither wipes nor hijacks its session."""
    bridge_id = f"bridge-{unique}"
    topic = "iotpipe/v1/home/dev1/telemetry"
    bridge = client(secured_broker, "bridge", client_id=bridge_id, clean_session=False)
    bridge.connect()
    bridge.subscribe([(topic, 1)])
    bridge.disconnect()
    device = client(secured_broker, "home/dev1", client_id=f"dev1-{unique}")
    device.connect()
    device.publish(topic, b"0")
    assert device.flush(timeout=10)
    wait_for(lambda: _queued(secured_broker, bridge_id) == 1, what="1 queued message")

    intruder = client(
        secured_broker, "bridge", "wrong", client_id=bridge_id, clean_session=attacker_clean_session
    )
    with pytest.raises(ConnectError, match="Not authorized"):
        intruder.connect(timeout=5)
    device.publish(topic, b"1")
    assert device.flush(timeout=10)
    wait_for(lambda: _queued(secured_broker, bridge_id) == 2, what="2 queued messages")

    got: list[Message] = []
    back = client(
        secured_broker, "bridge", client_id=bridge_id, clean_session=False, on_message=got.append
    )
    back.connect()
    assert back.session_present
    assert pump_until(back, lambda: len(got) >= 2, timeout=10)
    assert [m.payload for m in got] == [b"0", b"1"]
    back.disconnect()
    device.disconnect()


@pytest.mark.mqtt
def test_password_file_changes_apply_without_restart(
    start_broker: StartBroker, tmp_path: Path, unique: str
) -> None:
    """A user added while the broker runs can log in at once."""
    passwords = tmp_path / "passwd"
    add_user(passwords, "bridge", password_of("bridge"))
    broker = start_broker(password_file=passwords)
    late = client(broker, "home/late", client_id=f"late-{unique}")
    with pytest.raises(ConnectError, match="Not authorized"):
        late.connect(timeout=5)
    add_user(passwords, "home/late", password_of("home/late"))
    late = client(broker, "home/late", client_id=f"late-{unique}")
    late.connect(timeout=5)
    late.disconnect()


@pytest.mark.mqtt
def test_amqtts_own_file_auth_plugin_reads_our_password_file(tmp_path: Path, unique: str) -> None:
    """Files written by add_user work with amqtt's stock FileAuthPlugin (the format is amqtt's)."""
    passwords = tmp_path / "passwd"
    add_user(passwords, "home/pi", "secret")
    port = free_port()
    config = amqtt_config(port)
    config["plugins"] = {
        "amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(passwords)}
    }
    stock = AmqttThread(config)
    stock.start()
    try:
        ok = client(port, "home/pi", "secret", client_id=f"ok-{unique}")
        ok.connect(timeout=5)
        ok.disconnect()
        with pytest.raises(ConnectError, match="Not authorized"):
            client(port, "home/pi", "wrong", client_id=f"bad-{unique}").connect(timeout=5)
    finally:
        stock.stop()


@pytest.mark.mqtt
def test_busy_port_is_one_clear_config_error(embedded_broker: BrokerThread) -> None:
    """Starting a second broker on a port in use raises a ConfigError naming the port, not a traceback."""
    with pytest.raises(ConfigError, match=r"broker\.port=\d+: 127\.0\.0\.1:\d+ is already in use"):
        BrokerThread(BrokerSettings(port=embedded_broker.settings.port)).start()


def test_embedded_broker_reports_zero_stats_when_stopped() -> None:
    """A broker that is not running reports zero counters and no queued messages."""
    broker = EmbeddedBroker(BrokerSettings())
    assert not broker.running
    assert broker.stats.denied_publishes == 0
    assert broker.queued_messages("anyone") == 0


@pytest.mark.mqtt
@pytest.mark.parametrize("attempt", range(5))
def test_stop_is_prompt_while_acknowledgements_are_in_flight(unique: str, attempt: int) -> None:
    """Stopping right after a delivery (its PUBACK still in flight) finishes; amqtt alone could hang."""
    broker = BrokerThread(BrokerSettings(port=free_port())).start()
    try:
        got: list[Message] = []
        sub = client(broker, client_id=f"sub-{unique}-{attempt}", on_message=got.append)
        sub.connect()
        sub.subscribe([(f"t/{unique}", 1)])
        pub = client(broker, client_id=f"pub-{unique}-{attempt}")
        pub.connect()
        pub.publish(f"t/{unique}", b"x", qos=1)
        assert pub.flush(timeout=10)
        assert pump_until(sub, lambda: len(got) >= 1, timeout=10)  # this pump sends the PUBACK
    finally:
        broker.stop(timeout=10)  # raises TimeoutError if the shutdown hangs


@pytest.mark.mqtt
def test_mqtt5_clients_are_refused(embedded_broker: BrokerThread, unique: str) -> None:
    """amqtt speaks MQTT 3.1.1 only: an MQTT 5 CONNECT gets "unacceptable protocol version"."""
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    results: list[str] = []
    v5 = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"v5-{unique}",
        protocol=paho.MQTTv5,
    )
    v5.on_connect = lambda _c, _u, _f, reason, _p: results.append(str(reason))
    v5.connect("127.0.0.1", embedded_broker.settings.port)

    def connack() -> list[str]:
        v5.loop(timeout=0.05)
        return results

    try:
        wait_for(connack, what="a CONNACK")
    finally:
        v5.disconnect()
    assert results == ["Unsupported protocol version"]


def test_a_tls_listener_needs_its_port_and_both_files(tls_ca: TestCa) -> None:
    """tls_port without a certificate and key, or the files without tls_port, are refused."""
    with pytest.raises(ValidationError, match="tls_port needs tls_cert_file and tls_key_file"):
        BrokerSettings(tls_port=8883, tls_cert_file=tls_ca.server.cert)
    with pytest.raises(ValidationError, match="TLS files without tls_port"):
        BrokerSettings(tls_cert_file=tls_ca.server.cert, tls_key_file=tls_ca.server.key)


def test_a_key_that_is_not_the_certificates_is_one_config_error(tls_ca: TestCa) -> None:
    """The TLS files are loaded before amqtt starts: a mismatched key names the setting."""
    settings = BrokerSettings(
        port=free_port(),
        tls_port=free_port(),
        tls_cert_file=tls_ca.server.cert,
        tls_key_file=tls_ca.client.key,
    )
    with pytest.raises(ConfigError, match=r"broker\.tls_cert_file=.*cannot load it with"):
        bridge.broker.amqtt_config(settings)

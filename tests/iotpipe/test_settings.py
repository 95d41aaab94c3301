"""Settings: defaults < TOML < IOTPIPE_* environment < flags, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotpipe.errors import ConfigError
from iotpipe.schema import layered, redact_url
from iotpipe.settings import AmqpSettings, MqttSettings, Secret, load, parse_url


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "iotpipe.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment() -> None:
    """With nothing configured, the MQTT URL is the local broker."""
    settings = load(MqttSettings, "mqtt", environ={})
    assert settings.url == "mqtt://127.0.0.1:1883"
    assert settings.broker.port == 1883


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    """The environment overrides the file and a flag overrides both."""
    path = write(
        tmp_path, '[mqtt]\nurl = "mqtt://file:1"\nkeepalive = 40\nclient_id = "from-file"\n'
    )
    env = {"IOTPIPE_MQTT__URL": "mqtt://env:2", "IOTPIPE_MQTT__KEEPALIVE": "50"}
    settings = load(
        MqttSettings, "mqtt", config_file=path, environ=env, overrides={"url": "mqtt://flag:3"}
    )
    assert settings.url == "mqtt://flag:3"
    assert settings.keepalive == 50
    assert settings.client_id == "from-file"


def test_layered_has_the_precedence_of_load(tmp_path: Path) -> None:
    """Raw values of a section without a model merge file, environment and flags as load does."""
    path = write(tmp_path, '[consume]\nstore = "file.db"\nqueue = "q-file"\nprefetch = 5\n')
    env = {"IOTPIPE_CONSUME__STORE": "env.db", "IOTPIPE_OTHER__STORE": "other.db"}
    data = layered("consume", config_file=path, environ=env, overrides={"prefetch": 7})
    assert data == {"store": "env.db", "queue": "q-file", "prefetch": 7}
    assert layered("consume", environ={}) == {}


def test_flag_left_unset_does_not_override(tmp_path: Path) -> None:
    """A flag whose value is None (not given) keeps the file's value."""
    path = write(tmp_path, '[mqtt]\nurl = "mqtt://file:1"\n')
    settings = load(MqttSettings, "mqtt", config_file=path, environ={}, overrides={"url": None})
    assert settings.url == "mqtt://file:1"


def test_nested_environment_variables_reach_nested_sections(tmp_path: Path) -> None:
    """IOTPIPE_MQTT__TLS__CA_FILE fills mqtt.tls.ca_file."""
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    settings = load(MqttSettings, "mqtt", environ={"IOTPIPE_MQTT__TLS__CA_FILE": str(ca)})
    assert settings.tls.ca_file == ca


def test_unknown_key_names_the_field(tmp_path: Path) -> None:
    """A misspelt key fails with the dotted field name, not silently."""
    path = write(tmp_path, '[mqtt]\nulr = "mqtt://x"\n')
    with pytest.raises(ConfigError, match=r"mqtt\.ulr.*unknown setting"):
        load(MqttSettings, "mqtt", config_file=path, environ={})


def test_bad_value_names_field_value_and_allowed() -> None:
    """An out-of-range value produces one line with the field, the value and the limit."""
    with pytest.raises(ConfigError) as info:
        load(MqttSettings, "mqtt", environ={"IOTPIPE_MQTT__KEEPALIVE": "1"})
    message = str(info.value)
    assert "mqtt.keepalive" in message
    assert "'1'" in message
    assert "greater than or equal to 5" in message
    assert "\n" not in message


def test_bad_url_scheme_says_what_is_allowed() -> None:
    """An http:// URL for MQTT is rejected with the allowed schemes."""
    with pytest.raises(ConfigError, match=r"mqtt\.url.*mqtt or mqtts"):
        load(MqttSettings, "mqtt", environ={}, overrides={"url": "http://host"})


def test_password_is_redacted_in_errors() -> None:
    """A bad URL with a password never shows the password in the error."""
    with pytest.raises(ConfigError) as info:
        load(AmqpSettings, "amqp", environ={}, overrides={"url": "http://u:s3cret@host"})
    assert "s3cret" not in str(info.value)


def test_missing_and_invalid_config_files(tmp_path: Path) -> None:
    """A missing file and a broken TOML file each give one clear line."""
    with pytest.raises(ConfigError, match="no such file"):
        load(MqttSettings, "mqtt", config_file=tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(MqttSettings, "mqtt", config_file=write(tmp_path, "[mqtt\n"), environ={})


def test_missing_tls_file_is_rejected(tmp_path: Path) -> None:
    """A TLS CA file that does not exist fails at start-up."""
    with pytest.raises(ConfigError, match=r"mqtt\.tls\.ca_file.*does not exist"):
        load(MqttSettings, "mqtt", environ={}, overrides={"tls": {"ca_file": str(tmp_path / "x")}})


@pytest.mark.parametrize(
    ("url", "host", "port", "user", "tls"),
    [
        ("mqtt://h", "h", 1883, None, False),
        ("mqtts://u:p@h", "h", 8883, "u", True),
        ("amqp://guest:guest@127.0.0.1:5673/vh", "127.0.0.1", 5673, "guest", False),
        ("amqps://h", "h", 5671, None, True),
    ],
)
def test_url_parsing(url: str, host: str, port: int, user: str | None, tls: bool) -> None:
    """Connection URLs give host, default port per scheme, user and TLS flag."""
    parsed = parse_url(url, ("mqtt", "mqtts", "amqp", "amqps"))
    assert (parsed.host, parsed.port, parsed.username, parsed.tls) == (host, port, user, tls)
    assert "p@" not in parsed.redacted()


def test_percent_encoded_credentials_are_decoded() -> None:
    """A password with reserved characters can be given percent-encoded."""
    parsed = parse_url("mqtt://dev%2F1:p%40ss@h:1", ("mqtt",))
    assert parsed.username == "dev/1"
    assert parsed.password is not None
    assert parsed.password.get_secret_value() == "p@ss"


def test_amqp_password_file_gives_the_password(tmp_path: Path) -> None:
    """[amqp] password_file supplies the URL user's password, read anew at each use."""
    secret = tmp_path / "bridge"
    secret.write_text("first\n")
    settings = load(
        AmqpSettings,
        "amqp",
        environ={
            "IOTPIPE_AMQP__URL": "amqp://bridge@127.0.0.1:5672/iotpipe",
            "IOTPIPE_AMQP__PASSWORD_FILE": str(secret),
        },
    )
    assert settings.broker.password == Secret("first")
    secret.write_text("second\n")
    assert settings.broker.password == Secret("second")
    assert "first" not in repr(settings.broker)


@pytest.mark.parametrize(
    ("url", "exists", "why"),
    [
        ("amqp://127.0.0.1:5672/", True, "needs a user"),
        ("amqp://bridge@127.0.0.1:5672/", False, "does not exist"),
    ],
)
def test_amqp_password_file_mistakes(tmp_path: Path, url: str, exists: bool, why: str) -> None:
    """A password file without a user in the URL, or a missing file, is a ConfigError."""
    secret = tmp_path / "pw"
    if exists:
        secret.write_text("x\n")
    environ = {"IOTPIPE_AMQP__URL": url, "IOTPIPE_AMQP__PASSWORD_FILE": str(secret)}
    with pytest.raises(ConfigError, match=why):
        load(AmqpSettings, "amqp", environ=environ)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("amqp://iot:pw@rabbit:5672/", "amqp://iot:***@rabbit:5672/"),
        ("mqtt://u:pa/ss@h:1", "mqtt://u:***@h:1"),  # urlsplit would call 'pa' the port
        ("mqtt://site/dev:pass@h", "mqtt://site/dev:***@h"),  # and 'dev:pass@h' the path
        ("amqp://u:p#w@h/", "amqp://u:***@h/"),
        ("mqtt://u:p@w@h:1", "mqtt://u:***@h:1"),
        ("mqtt://u@h:1", "mqtt://u@h:1"),
        ("mqtt://h:1", "mqtt://h:1"),
    ],
)
def test_redact_url_hides_any_password_however_it_is_written(url: str, shown: str) -> None:
    """Everything between the user name's colon and the last '@' is hidden."""
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("url", "secret"),
    [("mqtt://u:Se/cret1@h:1", "Se/cret1"), ("mqtt://site/dev:Secret2@h", "Secret2"),
     ("amqp://u:Se?cret3@h/", "Se?cret3")],
)  # fmt: skip
def test_an_unencoded_slash_in_a_password_is_refused_without_showing_it(
    url: str, secret: str
) -> None:
    """The URL would split at the '/': a one-line error naming the fix, and no password in it."""
    section = url.split(":", 1)[0]
    model = MqttSettings if section == "mqtt" else AmqpSettings
    with pytest.raises(ConfigError) as caught:
        load(model, section, overrides={"url": url}, environ={})
    message = str(caught.value)
    assert "%2F" in message
    assert secret not in message
    assert secret.split("/", maxsplit=1)[0].split("?", maxsplit=1)[0] not in message


def test_amqp_urls_list_the_other_nodes(tmp_path: Path) -> None:
    """[amqp] urls adds cluster nodes after url (a list, or one comma-separated variable)."""
    secret = tmp_path / "pw"
    secret.write_text("s3cret\n")
    settings = load(
        AmqpSettings,
        "amqp",
        environ={
            "IOTPIPE_AMQP__URL": "amqp://u@rabbit-1:5672/",
            "IOTPIPE_AMQP__URLS": "amqp://u@rabbit-2:5672/, amqp://u@rabbit-1:5672/",
            "IOTPIPE_AMQP__PASSWORD_FILE": str(secret),
        },
    )
    assert [url.host for url in settings.brokers] == ["rabbit-1", "rabbit-2"]  # no duplicate
    assert all(url.password == Secret("s3cret") for url in settings.brokers)
    assert settings.broker.host == "rabbit-1"
    assert AmqpSettings().brokers == (AmqpSettings().broker,)  # one node, as before


def test_amqp_urls_mistakes_name_the_field_and_hide_the_password() -> None:
    """A bad node URL in urls is a ConfigError naming amqp.urls, without its password."""
    with pytest.raises(ConfigError) as caught:
        load(AmqpSettings, "amqp", overrides={"urls": ["http://u:hunter2@host/"]}, environ={})
    assert caught.value.field.startswith("amqp.urls")
    assert "hunter2" not in str(caught.value)

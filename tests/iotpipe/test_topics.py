"""Topics and routing keys of wire contract 1.x: building, parsing, and the MQTT<->AMQP mapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from iotpipe.topics import (
    NAME_PATTERN,
    PREFIX,
    STATUS_FILTER,
    TELEMETRY_FILTER,
    Kind,
    Topic,
    is_valid_name,
    parse_routing_key,
    parse_topic,
    to_mqtt_topic,
    to_routing_key,
    topic,
)
from tests.strategies import names

BAD_NAMES = [
    "",
    "x" * 65,
    "a/b",
    "a.b",
    "a+b",
    "+",
    "#",
    "a b",
    "a\n",
    "\na",
    "caf\u00e9",
    "\u0661",  # an Arabic-Indic digit: a digit to Unicode, not to the contract
    "a\x00",
]


def test_constants_spell_the_contract() -> None:
    """The prefix, kinds and subscription filters are exactly the ones in WIRE.md."""
    assert PREFIX == "iotpipe/v1"
    assert [kind.value for kind in Kind] == ["telemetry", "status"]
    assert TELEMETRY_FILTER == "iotpipe/v1/+/+/telemetry"
    assert STATUS_FILTER == "iotpipe/v1/+/+/status"
    assert NAME_PATTERN == "^[A-Za-z0-9_-]{1,64}$"


@pytest.mark.parametrize("name", ["a", "Z", "0", "_", "-", "pi-kitchen_2", "x" * 64])
def test_valid_names_are_accepted(name: str) -> None:
    """Names of 1-64 characters from A-Z a-z 0-9 _ - are valid."""
    assert is_valid_name(name)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_names_are_refused(name: str) -> None:
    """Empty, too long, separator, wildcard, space, newline and non-ASCII names are invalid."""
    assert not is_valid_name(name)


def test_topic_builds_telemetry_by_default() -> None:
    """topic() builds iotpipe/v1/{site}/{device}/telemetry unless told otherwise."""
    assert topic("home", "pi-kitchen") == "iotpipe/v1/home/pi-kitchen/telemetry"
    assert topic("home", "pi-kitchen", Kind.STATUS) == "iotpipe/v1/home/pi-kitchen/status"


@pytest.mark.parametrize("name", BAD_NAMES)
def test_topic_refuses_invalid_names(name: str) -> None:
    """topic() raises ValueError naming the field when a site or device name is invalid."""
    with pytest.raises(ValueError, match="invalid site"):
        topic(name, "ok")
    with pytest.raises(ValueError, match="invalid device"):
        topic("ok", name)


def test_topic_refuses_unknown_kind() -> None:
    """topic() raises ValueError for a kind that is not telemetry or status."""
    with pytest.raises(ValueError, match="not a valid Kind"):
        topic("home", "pi", "events")  # type: ignore[arg-type]


def test_topic_dataclass_properties() -> None:
    """A Topic gives its MQTT topic and its routing key, and is immutable."""
    parsed = Topic("home", "pi-kitchen", Kind.STATUS)
    assert parsed.mqtt == "iotpipe/v1/home/pi-kitchen/status"
    assert str(parsed) == parsed.mqtt
    assert parsed.routing_key == "iotpipe.v1.home.pi-kitchen.status"
    with pytest.raises(AttributeError, match="immutable"):
        parsed.site = "other"  # type: ignore[misc]


def test_topic_dataclass_accepts_kind_as_plain_string() -> None:
    """Topic stores a plain "telemetry" string as the Kind member."""
    parsed = Topic("home", "pi", "telemetry")  # type: ignore[arg-type]
    assert parsed.kind is Kind.TELEMETRY


def test_topic_dataclass_validates_names() -> None:
    """Topic cannot be built with a name that would leave the contract's topic space."""
    with pytest.raises(ValueError, match="invalid device"):
        Topic("home", "a/b", Kind.TELEMETRY)


def test_parse_topic_of_valid_topics() -> None:
    """parse_topic splits a valid topic into site, device and kind."""
    assert parse_topic("iotpipe/v1/home/pi-kitchen/telemetry") == Topic(
        "home", "pi-kitchen", Kind.TELEMETRY
    )
    assert parse_topic("iotpipe/v1/S_1/d-2/status") == Topic("S_1", "d-2", Kind.STATUS)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "iotpipe/v1",
        "iotpipe/v1/home/pi",
        "iotpipe/v1/home/pi/telemetry/extra",
        "iotpipe/v2/home/pi/telemetry",
        "iotpipe/V1/home/pi/telemetry",
        "IOTPIPE/v1/home/pi/telemetry",
        "/iotpipe/v1/home/pi/telemetry",
        "iotpipe/v1/home/pi/telemetry/",
        "iotpipe/v1//pi/telemetry",
        "iotpipe/v1/home//telemetry",
        "iotpipe/v1/home/pi/events",
        "iotpipe/v1/home/pi/Telemetry",
        "iotpipe/v1/+/+/telemetry",
        "iotpipe/v1/home/#",
        "iotpipe/v1/ho me/pi/telemetry",
        "iotpipe/v1/home.x/pi/telemetry",
        f"iotpipe/v1/{'x' * 65}/pi/telemetry",
        "iotpipe.v1.home.pi.telemetry",
        "iotpipe/v1/home/pi/telemetry\n",
    ],
)
def test_parse_topic_refuses_everything_else(text: str) -> None:
    """parse_topic returns None for anything but an exact iotpipe v1 topic with valid names."""
    assert parse_topic(text) is None


def test_routing_key_mapping_matches_rabbitmq_mqtt_plugin() -> None:
    """Slashes become dots and + becomes *, in both directions, as RabbitMQ's plugin maps them."""
    assert to_routing_key("iotpipe/v1/home/pi/telemetry") == "iotpipe.v1.home.pi.telemetry"
    assert to_routing_key(TELEMETRY_FILTER) == "iotpipe.v1.*.*.telemetry"
    assert to_routing_key("iotpipe/v1/#") == "iotpipe.v1.#"
    assert to_mqtt_topic("iotpipe.v1.*.*.status") == STATUS_FILTER
    assert to_mqtt_topic("iotpipe.v1.#") == "iotpipe/v1/#"
    # The plugin keeps a dot of an MQTT topic as is, so such topics do not map back.
    assert to_routing_key("a.b/c") == "a.b.c"


def test_parse_routing_key() -> None:
    """parse_routing_key parses canonical routing keys and refuses anything else."""
    assert parse_routing_key("iotpipe.v1.home.pi.status") == Topic("home", "pi", Kind.STATUS)
    assert parse_routing_key("iotpipe.v1.home/pi.telemetry") is None
    assert parse_routing_key("iotpipe.v1.*.*.telemetry") is None
    assert parse_routing_key("iotpipe/v1/home/pi/telemetry") is None
    assert parse_routing_key("bridge.schema") is None


@settings(max_examples=200, deadline=None)
@given(site=names(), device=names(), kind=st.sampled_from(Kind))
def test_build_parse_round_trip(site: str, device: str, kind: Kind) -> None:
    """Any valid site/device/kind survives topic -> parse and routing key -> parse unchanged."""
    expected = Topic(site, device, kind)
    built = topic(site, device, kind)
    assert parse_topic(built) == expected
    assert parse_routing_key(expected.routing_key) == expected
    assert to_mqtt_topic(to_routing_key(built)) == built


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), st.text("iotpv1/.+#abc-_ \n", max_size=40)))
def test_parsing_arbitrary_text_never_raises(text: str) -> None:
    """parse_topic and parse_routing_key return None or a Topic that spells the input, never raise."""
    parsed = parse_topic(text)
    assert parsed is None or parsed.mqtt == text
    from_key = parse_routing_key(text)
    assert from_key is None or from_key.routing_key == text

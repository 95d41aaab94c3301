"""MQTT topics and AMQP routing keys of wire contract 1.x.

Devices publish on ``iotpipe/v1/{site}/{device}/{kind}``; the bridge republishes to RabbitMQ with
the same topic turned into a routing key (``/`` -> ``.``), exactly as RabbitMQ's own MQTT plugin
maps it, so a binding such as ``iotpipe.v1.#`` works whichever way the data came in.

``{site}`` and ``{device}`` are 1-64 characters of ``A-Z a-z 0-9 _ -``. They can contain neither
``/`` nor ``.`` nor a wildcard, so for iotpipe topics the topic <-> routing-key mapping is lossless.
"""

from __future__ import annotations

from functools import lru_cache

# The names, the prefix and the topic layout are the contract's: they live in iotpipe.wire and
# are re-exported here, where topics have always been imported from.
from iotpipe.wire import NAME_PATTERN, PREFIX, Kind, check_name, is_valid_name, topic

__all__ = [
    "NAME_PATTERN",
    "PREFIX",
    "STATUS_FILTER",
    "TELEMETRY_FILTER",
    "Kind",
    "Topic",
    "check_filter",
    "is_valid_name",
    "parse_routing_key",
    "parse_topic",
    "to_mqtt_topic",
    "to_routing_key",
    "topic",
]

TELEMETRY_FILTER = f"{PREFIX}/+/+/telemetry"
"""MQTT subscription filter matching every device's telemetry."""

STATUS_FILTER = f"{PREFIX}/+/+/status"
"""MQTT subscription filter matching every device's status messages."""

_PREFIX_LEVELS = PREFIX.split("/")
# Topics repeat per device, so memoising the parse removes it from the per-message cost; the
# bound keeps a flood of distinct (hostile) topics from growing memory.
_TOPIC_CACHE_SIZE = 4096
_KINDS = {kind.value: kind for kind in Kind}


class Topic:
    """A parsed iotpipe v1 topic.

    Attributes:
        site: the site name.
        device: the device name, unique within its site.
        kind: what the topic carries.

    Raises:
        ValueError: on construction, when ``site`` or ``device`` is not a valid name or ``kind``
            is not a ``Kind``.
    """

    # A frozen record by hand, not a dataclass: ``dataclasses`` imports ``inspect`` (~1 MB in
    # the edge agent, which parses topics).
    __slots__ = ("device", "kind", "site")

    site: str
    device: str
    kind: Kind

    def __init__(self, site: str, device: str, kind: Kind | str) -> None:
        """Reject names that would produce a topic outside the contract."""
        check_name("site", site)
        check_name("device", device)
        object.__setattr__(self, "site", site)
        object.__setattr__(self, "device", device)
        # Accept the plain string "telemetry" too, but store the enum member.
        object.__setattr__(self, "kind", Kind(kind))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} (a Topic is immutable)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} (a Topic is immutable)")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not Topic:
            return NotImplemented
        assert isinstance(other, Topic)
        return (self.site, self.device, self.kind) == (other.site, other.device, other.kind)

    def __hash__(self) -> int:
        return hash((self.site, self.device, self.kind))

    def __repr__(self) -> str:
        return f"Topic(site={self.site!r}, device={self.device!r}, kind={self.kind!r})"

    def __reduce__(self) -> tuple[type[Topic], tuple[str, str, Kind]]:
        return (Topic, (self.site, self.device, self.kind))

    @property
    def mqtt(self) -> str:
        """The MQTT topic, e.g. ``iotpipe/v1/home/pi-kitchen/telemetry``."""
        return topic(self.site, self.device, self.kind)

    @property
    def routing_key(self) -> str:
        """The AMQP routing key, e.g. ``iotpipe.v1.home.pi-kitchen.telemetry``."""
        return to_routing_key(self.mqtt)

    def __str__(self) -> str:
        """Return the MQTT topic."""
        return self.mqtt


def parse_topic(topic: str) -> Topic | None:
    """Parse an MQTT topic of contract 1.x.

    Args:
        topic: the topic a message arrived on.

    Returns:
        The parsed topic, or None when ``topic`` is not exactly
        ``iotpipe/v1/{site}/{device}/{telemetry|status}`` with valid names.
    """
    return _parse_topic(topic)


@lru_cache(maxsize=_TOPIC_CACHE_SIZE)
def _parse_topic(topic: str) -> Topic | None:
    levels = topic.split("/")
    if len(levels) != 5 or levels[:2] != _PREFIX_LEVELS:
        return None
    _, _, site, device, kind_name = levels
    kind = _KINDS.get(kind_name)
    if kind is None or not (is_valid_name(site) and is_valid_name(device)):
        return None
    return Topic(site, device, kind)


def parse_routing_key(routing_key: str) -> Topic | None:
    """Parse an AMQP routing key of contract 1.x.

    Args:
        routing_key: e.g. ``iotpipe.v1.home.pi-kitchen.telemetry``.

    Returns:
        The parsed topic, or None when ``routing_key`` is not the routing key of a valid
        iotpipe v1 topic.
    """
    parsed = parse_topic(to_mqtt_topic(routing_key))
    # "/" survives to_mqtt_topic, so "iotpipe.v1.a/b..." could otherwise sneak through.
    if parsed is None or parsed.routing_key != routing_key:
        return None
    return parsed


def to_routing_key(mqtt_topic: str) -> str:
    """Map an MQTT topic or filter to an AMQP routing key or binding pattern.

    Same mapping as RabbitMQ's MQTT plugin: ``/`` -> ``.`` and ``+`` -> ``*`` (``#`` is the same
    in both). Dots already in the topic are kept, so the mapping is only reversible for topics
    without dots, which includes every iotpipe topic.

    Args:
        mqtt_topic: e.g. ``iotpipe/v1/+/+/telemetry``.

    Returns:
        e.g. ``iotpipe.v1.*.*.telemetry``.
    """
    return mqtt_topic.replace("/", ".").replace("+", "*")


def to_mqtt_topic(routing_key: str) -> str:
    """Map an AMQP routing key or binding pattern to an MQTT topic or filter.

    The inverse of ``to_routing_key``, again as RabbitMQ's MQTT plugin does it:
    ``*`` -> ``+`` and ``.`` -> ``/``.

    Args:
        routing_key: e.g. ``iotpipe.v1.home.pi-kitchen.status``.

    Returns:
        e.g. ``iotpipe/v1/home/pi-kitchen/status``.
    """
    return routing_key.replace("*", "+").replace(".", "/")


def check_filter(value: str) -> str:
    """Validate an MQTT topic filter (MQTT 3.1.1 section 4.7) and return it.

    Raises:
        ValueError: empty, NUL, not Unicode, or a wildcard that is not a whole level
            (``#`` only as the whole last level).
    """
    if not value:
        raise ValueError("a topic filter cannot be empty")
    if "\x00" in value:
        raise ValueError("a topic filter cannot contain NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a topic filter must be valid Unicode") from None
    levels = value.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"{value!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"{value!r}: '+' must be a whole level")
    return value

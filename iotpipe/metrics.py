"""Counters and gauges in the Prometheus text format (0.0.4), without prometheus_client.

The edge agent reads its numbers at scrape time and renders them here: on a Pi every import
counts, and prometheus_client (with the HTTP and WSGI modules it loads) costs more resident
memory than the whole text format does in code. The output is byte for byte what
``prometheus_client.generate_latest`` writes for the same families (``tests/iotpipe/test_metrics.py``
checks), so a scraper cannot tell the two apart::

    families = [
        counter("iotpipe_edge_readings", "readings taken", 7),
        Family("iotpipe_edge_sensor_errors", "counter", "failed sensor reads", ("sensor",))
        .add(2, "sim0"),
    ]
    body = render(families)  # b"# HELP iotpipe_edge_readings_total readings taken\\n..."

As in prometheus_client, a counter is named without ``_total``; :func:`render` appends it. The
bridge and the consumer keep their prometheus_client registries; :mod:`iotpipe.health` serves
either kind of body.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

__all__ = ["CONTENT_TYPE", "Family", "counter", "format_value", "gauge", "render"]

#: The content type of :func:`render`'s output.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Kind = Literal["counter", "gauge"]


class Family:
    """One metric family: name, kind, help text, label names and its samples."""

    __slots__ = ("help", "kind", "labels", "name", "samples")

    def __init__(self, name: str, kind: Kind, help: str, labels: Sequence[str] = ()) -> None:
        self.name = name
        self.kind: Kind = kind
        self.help = help
        self.labels = tuple(labels)
        self.samples: list[tuple[tuple[str, ...], float]] = []

    def add(self, value: float, *label_values: str) -> Family:
        """Add one sample with a value for each label name; return the family (to chain).

        Raises:
            ValueError: the number of label values is not the number of label names.
        """
        if len(label_values) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.labels)} label values expected")
        self.samples.append((label_values, float(value)))
        return self


def counter(name: str, help: str, value: float) -> Family:
    """A counter without labels (``name`` without ``_total``)."""
    return Family(name, "counter", help).add(value)


def gauge(name: str, help: str, value: float) -> Family:
    """A gauge without labels."""
    return Family(name, "gauge", help).add(value)


def render(families: Iterable[Family]) -> bytes:
    """The families in the Prometheus text format 0.0.4, UTF-8 encoded."""
    lines: list[str] = []
    for family in families:
        name = family.name + "_total" if family.kind == "counter" else family.name
        lines.append(f"# HELP {name} {_escape_help(family.help)}\n")
        lines.append(f"# TYPE {name} {family.kind}\n")
        # prometheus_client writes labels sorted by name; so do we, to be indistinguishable.
        order = sorted(range(len(family.labels)), key=family.labels.__getitem__)
        for values, value in family.samples:
            pairs = ",".join(f'{family.labels[i]}="{_escape_label(values[i])}"' for i in order)
            labels = "{" + pairs + "}" if pairs else ""
            lines.append(f"{name}{labels} {format_value(value)}\n")
    return "".join(lines).encode()


def format_value(value: float) -> str:
    """A sample value as Go's Prometheus clients write it (``+Inf``, ``NaN``, ``1e+07``)."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    # Go switches to an exponent from 1e7 on; Python's repr only from 1e16.
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")

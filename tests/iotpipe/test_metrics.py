"""iotpipe.metrics: the Prometheus text format, byte for byte what prometheus_client writes."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from iotpipe.metrics import Family, counter, format_value, gauge, render

_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=0, max_value=2**62),
)
_texts = st.text(st.characters(codec="utf-8"), max_size=20)


class _Families:
    """A prometheus_client collector yielding prebuilt families."""

    def __init__(self, families: list[CounterMetricFamily | GaugeMetricFamily]) -> None:
        self.families = families

    def collect(self) -> list[CounterMetricFamily | GaugeMetricFamily]:
        return self.families


def _reference(families: list[Family]) -> bytes:
    """What prometheus_client's generate_latest writes for the same families."""
    built: list[CounterMetricFamily | GaugeMetricFamily] = []
    for family in families:
        kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
        built_family = kind(family.name, family.help, labels=list(family.labels))
        for values, value in family.samples:
            built_family.add_metric(list(values), value)
        built.append(built_family)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(built))  # type: ignore[arg-type]
    return generate_latest(registry)


@given(value=_values, help_text=_texts, label=_texts, other=_texts)
def test_render_matches_prometheus_client(
    value: float, help_text: str, label: str, other: str
) -> None:
    """Counters and gauges, labelled or not, render exactly as generate_latest renders them."""
    families = [
        counter("x_events", help_text, abs(value) if not math.isnan(value) else 0.0),
        gauge("x_level", help_text, value),
        Family("x_errors", "counter", help_text, ("zone", "sensor"))
        .add(3, label, other)
        .add(1, other, label),
    ]
    assert render(families) == _reference(families)


def test_the_parser_reads_back_names_types_help_and_labels() -> None:
    """prometheus_client's own parser reads back what was rendered, escapes included."""
    families = [
        counter("x_readings", 'taken\\ "all"\nof them', 7),
        Family("x_errors", "counter", "failed", ("sensor",)).add(2, 'a"b\\c\nd'),
        gauge("x_full_in_seconds", "until full", math.inf),
    ]
    parsed = list(text_string_to_metric_families(render(families).decode()))
    assert [(f.name, f.type, f.documentation) for f in parsed] == [
        ("x_readings", "counter", 'taken\\ "all"\nof them'),
        ("x_errors", "counter", "failed"),
        ("x_full_in_seconds", "gauge", "until full"),
    ]
    assert [(s.name, s.labels, s.value) for f in parsed for s in f.samples] == [
        ("x_readings_total", {}, 7.0),
        ("x_errors_total", {"sensor": 'a"b\\c\nd'}, 2.0),
        ("x_full_in_seconds", {}, math.inf),
    ]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0.0"),
        (1234, "1234.0"),
        (12345678, "1.2345678e+07"),
        (1e16, "1e+16"),
        (-12345678, "-12345678.0"),
        (0.25, "0.25"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_values_are_written_as_go_writes_them(value: float, text: str) -> None:
    """Large values switch to an exponent from 1e7 on; infinities and NaN have their Go names."""
    assert format_value(float(value)) == text


def test_a_sample_needs_one_value_per_label() -> None:
    """Adding a sample with the wrong number of label values is refused."""
    family = Family("x_errors", "counter", "failed", ("sensor",))
    with pytest.raises(ValueError, match="1 label values expected"):
        family.add(1)

"""configs/grafana: provisioning and dashboards whose queries ask only for what iotpipe writes.

The Flux queries are checked against the point schema the InfluxDB sink writes (derived from
:func:`consumers.influx_store.message_lines`, not restated here), the Prometheus queries against
the metrics the bridge and the consumer register, the VictoriaMetrics variant against the series
VictoriaMetrics makes of the same points, and run against a private VictoriaMetrics.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyYAML: installed with amqtt, a runtime dependency

from bridge.service import BridgeMetrics
from bridge.settings import BridgeSettings, BrokerSettings
from consumers.influx_store import RESERVED_TAGS, message_lines
from consumers.service import ConsumerMetrics
from consumers.settings import ConsumeSettings, InfluxSettings
from consumers.store import Message, Reading
from tests.victoria import Victoria

GRAFANA = Path(__file__).resolve().parents[2] / "configs" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
#: Where docs/grafana.md mounts configs/grafana inside the Grafana server.
MOUNT = "/etc/grafana/iotpipe"
INFLUX_UID = "iotpipe-influxdb"
PROMETHEUS_UID = "iotpipe-prometheus"
VICTORIA_UID = "iotpipe-victoriametrics"

#: Columns Flux gives every row, whatever was written.
FLUX_COLUMNS = frozenset({"_measurement", "_field", "_value", "_time", "_start", "_stop"})
#: PromQL words that are not metric names.
PROMQL_WORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "inf", "nan"}
)
#: Sample names a metric family of each type exposes (Prometheus text format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
}
LABEL_VALUES = re.compile(r"^label_values\((?P<expr>.*),\s*(?P<label>\w+)\)$")


@dataclass(frozen=True, slots=True)
class PointSchema:
    """What the InfluxDB sink writes: measurement, tag keys (without user tags), field keys."""

    measurement: str
    tags: frozenset[str]
    fields: frozenset[str]


def sink_schema() -> PointSchema:
    """Parse the lines the sink writes for a number with a unit, a boolean and a string."""
    readings = (
        Reading("temperature", 1_000, 21.5, "Cel"),
        Reading("door", 1_000, True),
        Reading("mode", 1_000, "auto"),
    )
    msg = Message(id="m1", site="s1", device="d1", seq=1, boot="b1", readings=readings)
    measurements, tags, fields = set(), set(), set()
    for line in message_lines(msg, InfluxSettings().measurement):
        head, field, _time = re.split(r"(?<!\\) ", line)
        measurement, *pairs = re.split(r"(?<!\\),", head)
        measurements.add(measurement)
        tags |= {pair.split("=", 1)[0] for pair in pairs}
        fields.add(field.split("=", 1)[0])
    assert len(measurements) == 1
    return PointSchema(measurements.pop(), frozenset(tags), frozenset(fields))


SCHEMA = sink_schema()


def registered_metrics() -> frozenset[str]:
    """Every sample name the bridge's and the consumer's registries can expose."""
    names: set[str] = set()
    for registry in (BridgeMetrics().registry, ConsumerMetrics().registry):
        for family in registry.collect():
            own = {family.name + suffix for suffix in SUFFIXES[family.type]}
            # Labelled families have no samples until used: the suffixes cover them.
            assert {s.name for s in family.samples} <= own, family.name
            names |= own
    return frozenset(names)


METRICS = registered_metrics()


def load(path: Path) -> dict[str, Any]:
    """A dashboard file as JSON."""
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(where, query text, datasource) of every panel target and template variable."""
    for panel in all_panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            source = target.get("datasource", panel.get("datasource"))
            text = target.get("query") or target.get("expr")
            yield f"panel {panel['title']!r} {target['refId']}", text, source
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            text = var["query"]
            yield (
                f"variable {var['name']}",
                text if isinstance(text, str) else text["query"],
                var["datasource"],
            )


def variable_names(dashboard: dict[str, Any]) -> set[str]:
    """Names of the dashboard's template variables."""
    return {var["name"] for var in dashboard["templating"]["list"]}


def flux_problems(query: str, variables: set[str]) -> list[str]:
    """What in a Flux query asks for a measurement, tag, field or variable that does not exist."""
    text = re.sub(r"//[^\n]*", "", query)
    text = re.sub(r'\br\["([^"]+)"\]', r"r.\1", text)
    columns = SCHEMA.tags | FLUX_COLUMNS
    problems = []
    measurements = re.findall(r'\br\._measurement\s*(?:==|!=)\s*"([^"]*)"', text)
    if not measurements:
        problems.append("no r._measurement filter")
    problems += [f"measurement {m!r}" for m in measurements if m != SCHEMA.measurement]
    fields = re.findall(r'\br\._field\s*(?:==|!=)\s*"([^"]*)"', text)
    problems += [f"field {f!r}" for f in fields if f not in SCHEMA.fields]
    problems += [f"column r.{c}" for c in re.findall(r"\br\.(\w+)", text) if c not in columns]
    named = re.findall(r'\b(?:tag|column):\s*"([^"]*)"', text)
    for listed in re.findall(r"\bcolumns:\s*\[([^\]]*)\]", text):
        named += re.findall(r'"([^"]*)"', listed)
    problems += [f"column {c!r}" for c in named if c not in columns]
    used = re.findall(r"\$\{?(\w+)", text)
    problems += [f"variable ${v}" for v in used if v not in variables and not v.startswith("__")]
    return problems


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL/MetricsQL expression refers to."""
    text = re.sub(r"\$\{?\w+(?::\w+)?\}?", "x", expr)
    labels: set[str] = set()
    names: set[str] = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        for label, value in re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', matchers):
            if label == "__name__":
                names |= set(value.split("|"))
            else:
                labels.add(label)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    for grouping in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", text):
        labels |= {label.strip() for label in grouping.split(",") if label.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    for word in re.findall(r"(?<![\w.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", text):
        if word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names, labels


def prometheus_problems(expr: str) -> list[str]:
    """Metric names in a pipeline-health query that the bridge and the consumer never expose."""
    names, _labels = promql_names(expr)
    if not names:
        return ["no metric"]
    return [f"metric {name!r}" for name in sorted(names - METRICS)]


def victoria_problems(expr: str) -> list[str]:
    """Series or labels in a VictoriaMetrics query that the sink's points never become."""
    series = {f"{SCHEMA.measurement}_{field}" for field in SCHEMA.fields}
    asked: set[str] = set()
    if match := LABEL_VALUES.match(expr):  # Grafana's variable query label_values(expr, label)
        expr = match["expr"]
        asked.add(match["label"])
    names, labels = promql_names(expr)
    problems = [f"series {n!r}" for n in sorted(names - series)]
    problems += [f"label {label!r}" for label in sorted((labels | asked) - SCHEMA.tags)]
    return problems + ([] if names else ["no series"])


def provisioned() -> dict[str, dict[str, Any]]:
    """The provisioned datasources by uid."""
    doc = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "iotpipe.yaml").read_text())
    return {source["uid"]: source for source in doc["datasources"]}


@pytest.fixture(params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each dashboard file, parsed."""
    return load(request.param)


def test_the_three_dashboards_and_the_victoria_variant_exist() -> None:
    """Fleet overview, device detail and pipeline health ship, with unique uids."""
    assert {p.name for p in DASHBOARDS} >= {
        "fleet-overview.json",
        "device-detail.json",
        "pipeline-health.json",
        "victoriametrics-telemetry.json",
    }
    uids = [load(p)["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids))


def test_dashboard_structure(dashboard: dict[str, Any]) -> None:
    """Panel ids are unique, panels are placed, repeats name a multi-value variable."""
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["id"] is None  # provisioned dashboards get their id from Grafana
    panels = list(all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    for panel in panels:
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys(), panel["title"]
        if "repeat" in panel:
            assert variables[panel["repeat"]]["multi"], panel["title"]
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


def test_datasources_are_the_provisioned_ones(dashboard: dict[str, Any]) -> None:
    """Every panel, target and variable uses a provisioned datasource uid of the right type."""
    sources = provisioned()
    used = [p["datasource"] for p in all_panels(dashboard["panels"]) if "datasource" in p]
    used += [where_source for _where, _text, where_source in queries(dashboard)]
    assert used
    for source in used:
        assert source["uid"] in sources, source
        assert source["type"] == sources[source["uid"]]["type"], source


def test_flux_queries_match_the_sink_schema(dashboard: dict[str, Any]) -> None:
    """Flux asks only for the sink's measurement, tags and fields, and defined variables."""
    variables = variable_names(dashboard)
    for where, text, source in queries(dashboard):
        if source["uid"] == INFLUX_UID:
            assert flux_problems(text, variables) == [], where


def test_prometheus_queries_use_registered_metrics(dashboard: dict[str, Any]) -> None:
    """Pipeline-health queries name only metrics the bridge and the consumer register."""
    for where, text, source in queries(dashboard):
        if source["uid"] == PROMETHEUS_UID:
            assert prometheus_problems(text) == [], where


def test_victoria_queries_use_the_series_the_sink_becomes(dashboard: dict[str, Any]) -> None:
    """The VictoriaMetrics variant asks for <measurement>_<field> series and the sink's tags."""
    for where, text, source in queries(dashboard):
        if source["uid"] == VICTORIA_UID:
            assert victoria_problems(text) == [], where


def test_each_query_language_is_used() -> None:
    """The checks above are not vacuous: each datasource has queries to check."""
    uids = [source["uid"] for p in DASHBOARDS for _w, _t, source in queries(load(p))]
    assert {INFLUX_UID, PROMETHEUS_UID, VICTORIA_UID} <= set(uids)
    assert len(METRICS) > 20
    assert SCHEMA.tags == RESERVED_TAGS  # no user tags in the sample: only the sink's own
    assert len(SCHEMA.fields) == 3  # one field per value type


FLUX_EXAMPLE = (
    "from(bucket: v.defaultBucket)\n"
    "  |> range(start: v.timeRangeStart, stop: v.timeRangeStop)\n"
    '  |> filter(fn: (r) => r._measurement == "telemetry" and r.site == "${site}"'
    ' and r._field == "value")\n'
    '  |> group(columns: ["sensor", "unit"])'
)


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ('== "telemetry"', '== "telemetri"', "measurement 'telemetri'"),
        ('r._measurement == "telemetry" and ', "", "no r._measurement filter"),
        ("r.site", "r.room", "column r.room"),
        ("r.site", 'r["location"]', "column r.location"),
        ('_field == "value"', '_field == "msg_id"', "field 'msg_id'"),
        ('"unit"]', '"units"]', "column 'units'"),
        ("${site}", "${plant}", "variable $plant"),
    ],
)
def test_a_broken_flux_query_is_caught(old: str, new: str, problem: str) -> None:
    """Each kind of mistake in a Flux query is reported."""
    assert flux_problems(FLUX_EXAMPLE, {"site"}) == []
    assert problem in flux_problems(FLUX_EXAMPLE.replace(old, new), {"site"})


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("sum(rate(iotpipe_bridge_received[5m]))", "metric 'iotpipe_bridge_received'"),
        (
            "histogram_quantile(0.9, sum by (le) (rate(iotpipe_bridge_confirm_latency_seconds[1m])))",
            "metric 'iotpipe_bridge_confirm_latency_seconds'",
        ),
        ('up{job="iotpipe-bridge"} == 0', "metric 'up'"),
    ],
)
def test_a_broken_prometheus_query_is_caught(expr: str, problem: str) -> None:
    """A counter without `_total`, a histogram without `_bucket`, a foreign metric are reported."""
    assert problem in prometheus_problems(expr)


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ('telemetry{site="$site"}', "series 'telemetry'"),
        ('telemetry_value{room="x"}', "label 'room'"),
        ("label_values(telemetry_value, location)", "label 'location'"),
    ],
)
def test_a_broken_victoria_query_is_caught(expr: str, problem: str) -> None:
    """A bare measurement, a foreign label or variable label is reported."""
    assert problem in victoria_problems(expr)


def test_datasource_provisioning() -> None:
    """InfluxDB uses Flux, the consumer's default org and bucket, and a token from the env."""
    sources = provisioned()
    assert set(sources) == {INFLUX_UID, PROMETHEUS_UID, VICTORIA_UID}
    influx = sources[INFLUX_UID]
    assert influx["type"] == "influxdb"
    assert influx["jsonData"]["version"] == "Flux"
    assert influx["jsonData"]["organization"] == InfluxSettings().org
    assert influx["jsonData"]["defaultBucket"] == InfluxSettings().bucket
    assert influx["secureJsonData"]["token"] == "$INFLUX_TOKEN"
    for uid in (PROMETHEUS_UID, VICTORIA_UID):
        assert sources[uid]["type"] == "prometheus"
        assert sources[uid]["url"].startswith("http")


def test_dashboard_provider_points_at_the_dashboards() -> None:
    """The file provider's path is configs/grafana/dashboards as mounted in Grafana."""
    doc = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "iotpipe.yaml").read_text())
    (provider,) = doc["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path.startswith(MOUNT + "/")
    local = GRAFANA / path.removeprefix(MOUNT + "/")
    assert sorted(local.glob("*.json")) == DASHBOARDS


def test_prometheus_scrapes_the_default_metrics_ports() -> None:
    """prometheus.yml scrapes the bridge's, the consumer's and the edge broker's default /metrics ports."""
    doc = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    jobs = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in doc["scrape_configs"]
    }
    bridge_port = BridgeSettings.model_fields["http_port"].default
    consumer_port = ConsumeSettings.model_fields["http_port"].default
    broker_port = BrokerSettings.model_fields["http_port"].default
    assert jobs == {
        "iotpipe-bridge": [f"127.0.0.1:{bridge_port}"],
        "iotpipe-consumer": [f"127.0.0.1:{consumer_port}"],
        "iotpipe-broker": [f"127.0.0.1:{broker_port}"],
    }


def _get(victoria: Victoria, path: str, **params: str) -> Any:
    url = f"{victoria.url}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.mark.tsdb
def test_victoria_dashboard_queries_return_the_sinks_points(
    victoria: Victoria, unique: str
) -> None:
    """Each query of the VictoriaMetrics variant finds points the sink wrote, in a real server."""
    site, device = f"s{unique}", "d1"
    now_ms = int(time.time()) * 1000
    readings = [
        Reading(sensor, now_ms - age * 1000, value, unit)
        for age in range(0, 300, 10)
        for sensor, value, unit in (("temperature", 21.5, "Cel"), ("door", True, None))
    ]
    msg = Message(id="m", site=site, device=device, seq=1, boot="b", readings=tuple(readings))
    request = urllib.request.Request(
        f"{victoria.url}/api/v2/write", data="\n".join(message_lines(msg)).encode()
    )
    with urllib.request.urlopen(request, timeout=10):
        pass
    victoria.flush()

    grafana_vars = {"site": site, "device": device, "__interval": "1m", "__range": "1h"}

    def expand(expr: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: grafana_vars[m[1]], expr)

    board = load(GRAFANA / "dashboards" / "victoriametrics-telemetry.json")
    checked = 0
    for where, text, source in queries(board):
        assert source["uid"] == VICTORIA_UID
        expr = expand(text)
        if match := LABEL_VALUES.match(expr):
            values = _get(
                victoria, f"/api/v1/label/{match['label']}/values", **{"match[]": match["expr"]}
            )
            assert {site, device} & set(values), where
        else:
            start, end = str(now_ms // 1000 - 600), str(now_ms // 1000 + 60)
            data = _get(
                victoria, "/api/v1/query_range", query=expr, start=start, end=end, step="60"
            )
            assert [s for s in data["result"] if s["metric"].get("site", site) == site], where
        checked += 1
    assert checked >= 5

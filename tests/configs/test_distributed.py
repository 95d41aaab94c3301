"""configs/distributed/: every setting in the multi-machine examples exists and is valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.settings import BridgeSettings
from consumers.settings import ConsumeSettings, InfluxSettings
from iotpipe.settings import AmqpSettings, MqttSettings, Section, load

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "distributed"

#: No IOTPIPE_* variables: only the file counts.
ENV: dict[str, str] = {}


@pytest.mark.parametrize(
    ("name", "sections"),
    [
        (
            "gateway-bridge.toml",
            {"mqtt": MqttSettings, "amqp": AmqpSettings, "bridge": BridgeSettings},
        ),
        (
            "consumer-influx.toml",
            {"amqp": AmqpSettings, "consume": ConsumeSettings, "influxdb": InfluxSettings},
        ),
    ],
)
def test_distributed_examples_load(name: str, sections: dict[str, type[Section]]) -> None:
    """Each section of the example loads through the same code as the commands use."""
    path = CONFIGS / name
    for section, model in sections.items():
        load(model, section, config_file=path, environ=ENV)

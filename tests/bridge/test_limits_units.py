"""Per-device limits without brokers: settings, the limiter on fake clocks, parked receipts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bridge.limits import MAX_HOLD, Limit, Limiter, LimitSettings, Refusal
from bridge.receipts import ParkedReceipts
from bridge.settings import BridgeSettings
from iotpipe.errors import ConfigError
from iotpipe.receipts import MAX_BOOTS, MAX_RANGES, BootReceipt, Receipt
from iotpipe.settings import load

HOUR = 3600.0
T0 = 1_795_651_200.0  # midnight UTC: the hour and day windows start here


class Clocks:
    """A monotonic and a wall clock that move together, by hand."""

    def __init__(self) -> None:
        self.mono = 100.0
        self.wall = T0

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds


def limiter(clocks: Clocks, **fields: Any) -> tuple[Limiter, CollectorRegistry]:
    registry = CollectorRegistry()
    made = Limiter(
        LimitSettings(**fields), registry, clock=lambda: clocks.mono, wall=lambda: clocks.wall
    )
    return made, registry


def limited(registry: CollectorRegistry, reason: str, policy: str) -> float:
    labels = {"reason": reason, "policy": policy}
    return registry.get_sample_value("iotpipe_bridge_limited_total", labels) or 0.0


# -- settings ----------------------------------------------------------------------------------


def test_no_limit_anywhere_is_disabled_and_any_limit_enables() -> None:
    """The defaults limit nothing (no limiter is built); one device's rate is enough to enable."""
    assert not BridgeSettings().limits.enabled
    assert not LimitSettings(policy="dead_letter", sites={"home": {"burst": 5}}).enabled
    assert LimitSettings(devices={"home/pi": {"rate": 1}}).enabled
    assert LimitSettings(quota_day=10).enabled


def test_device_overrides_site_overrides_defaults_field_by_field() -> None:
    """Each field comes from the device's table, else its site's, else the defaults."""
    settings = LimitSettings(
        rate=10,
        quota_hour=1000,
        sites={"home": {"policy": "dead_letter", "rate": 5, "burst": 20}},
        devices={"home/pi-1": {"rate": 2}, "lab/x": {"quota_day": 7}},
    )
    assert settings.resolve("home", "pi-1") == Limit("dead_letter", 2.0, 20.0, 1000, 0)
    assert settings.resolve("home", "pi-2") == Limit("dead_letter", 5.0, 20.0, 1000, 0)
    assert settings.resolve("lab", "x") == Limit("hold", 10.0, 10.0, 1000, 7)
    assert settings.resolve("lab", "y") == Limit("hold", 10.0, 10.0, 1000, 0)
    assert LimitSettings(rate=0.2).resolve("a", "b").burst == 1.0  # max(1, rate)


@pytest.mark.parametrize(
    ("table", "complaint"),
    [
        ('[bridge.limits.sites."bad site"]\nrate = 1', "is not a site name"),
        ('[bridge.limits.devices."pi-1"]\nrate = 1', "must be '<site>/<device>'"),
        ('[bridge.limits.devices."home/a/b"]\nrate = 1', "must be '<site>/<device>'"),
        ("[bridge.limits]\nrate = -1", "greater than or equal to 0"),
        ("[bridge.limits]\nburst = 0.5", "greater than or equal to 1"),
        ("[bridge.limits]\npolicy = 'drop'", "'hold' or 'dead_letter'"),
        ("[bridge.limits.sites.home]\nrat = 1", "unknown setting"),
    ],
)
def test_bad_limits_are_one_line_config_errors(tmp_path: Path, table: str, complaint: str) -> None:
    """A bad value or key in [bridge.limits] fails at start-up in one line naming it."""
    config = tmp_path / "bridge.toml"
    config.write_text(table + "\n")
    with pytest.raises(ConfigError) as caught:
        load(BridgeSettings, "bridge", config_file=config, environ={})
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("invalid setting bridge.limits.")
    assert complaint in message


# -- the rate ----------------------------------------------------------------------------------


def test_dead_letter_refuses_past_the_burst_and_the_excess_costs_nothing() -> None:
    """A full bucket admits ``burst`` at once; the excess is refused without spending tokens."""
    clocks = Clocks()
    limits, registry = limiter(clocks, policy="dead_letter", rate=2, burst=3)
    verdicts = [limits.admit("home", "pi-1", 1) for _ in range(5)]
    assert verdicts[:3] == [None, None, None]
    assert verdicts[3] == Refusal(
        "rate_limited", "device home/pi-1 over its rate limit 2/s (burst 3)"
    )
    assert limited(registry, "rate", "dead_letter") == 2
    clocks.advance(0.5)  # one token back; the two refusals took none
    assert limits.admit("home", "pi-1", 1) is None
    assert limits.admit("home", "pi-1", 1) is not None
    assert limits.admit("home", "pi-2", 1) is None  # another device has its own bucket
    assert limits.held_until("home", "pi-1") == 0.0  # dead_letter never holds


def test_hold_forwards_everything_and_holds_until_the_debt_is_repaid() -> None:
    """Under hold the bucket goes negative; the device is held for debt / rate seconds."""
    clocks = Clocks()
    limits, registry = limiter(clocks, rate=2, burst=2)
    assert all(limits.admit("home", "pi-1", 1) is None for _ in range(6))  # 2 within, 4 owed
    assert limited(registry, "rate", "hold") == 4
    assert limits.held_until("home", "pi-1") == pytest.approx(clocks.mono + 2.0)
    assert limits.held_count() == 1
    assert limits.held_until("home", "pi-2") == 0.0
    clocks.advance(1.99)
    assert limits.held_until("home", "pi-1") > 0
    clocks.advance(0.02)
    assert limits.held_until("home", "pi-1") == 0.0
    assert limits.held_count() == 0


def test_hold_does_not_charge_resends() -> None:
    """Under hold an envelope resent (seq not above its boot's highest) spends nothing."""
    clocks = Clocks()
    limits, registry = limiter(clocks, rate=1, burst=2, quota_hour=100)
    for seq in range(4):
        limits.admit("home", "pi-1", 10, "b1", seq)  # 2 owed
    until = limits.held_until("home", "pi-1")
    for seq in range(4):
        limits.admit("home", "pi-1", 10, "b1", seq)  # the held window, resent
    assert limits.held_until("home", "pi-1") == until
    assert limited(registry, "rate", "hold") == 2
    limits.admit("home", "pi-1", 10, "b2", 0)  # a new boot is new data
    assert limits.held_until("home", "pi-1") == pytest.approx(until + 1)
    for seq in range(5):  # 40 + 10 + 50: exactly the hour's 100, the resends not counted
        limits.admit("home", "pi-1", 10, "b1", 4 + seq)
    assert limited(registry, "quota", "hold") == 0
    limits.admit("home", "pi-1", 10, "b1", 9)
    assert limited(registry, "quota", "hold") == 1


def test_hold_debt_stops_at_the_longest_hold() -> None:
    """However far over, one device is held for at most MAX_HOLD seconds."""
    clocks = Clocks()
    limits, _ = limiter(clocks, rate=1, burst=1)
    for _ in range(int(MAX_HOLD) + 50):
        limits.admit("home", "pi-1", 1)
    assert limits.held_until("home", "pi-1") == pytest.approx(clocks.mono + MAX_HOLD)


# -- the quota -----------------------------------------------------------------------------------


def test_quota_counts_readings_per_utc_hour_and_refunds_the_rate() -> None:
    """dead_letter: readings past the hour's quota are refused until the next UTC hour."""
    clocks = Clocks()
    limits, registry = limiter(clocks, policy="dead_letter", rate=100, burst=3, quota_hour=12)
    assert limits.admit("home", "pi-1", 6) is None
    refusal = limits.admit("home", "pi-1", 7)  # 13 > 12
    assert refusal == Refusal(
        "quota_exceeded", "device home/pi-1 over its hourly quota 12 readings"
    )
    assert limits.admit("home", "pi-1", 4) is None
    assert limits.admit("home", "pi-1", 1) is None  # the third token: the refusal gave it back
    over_rate = limits.admit("home", "pi-1", 1)
    assert over_rate is not None
    assert over_rate.reason == "rate_limited"
    assert limited(registry, "quota", "dead_letter") == 1
    clocks.advance(HOUR)
    assert limits.admit("home", "pi-1", 12) is None


def test_daily_quota_under_hold_holds_until_the_utc_day_ends() -> None:
    """hold: over the day's quota, the device is held until midnight UTC."""
    clocks = Clocks()
    clocks.advance(20 * HOUR)
    limits, registry = limiter(clocks, quota_day=5)
    assert limits.admit("home", "pi-1", 5) is None
    assert limits.held_until("home", "pi-1") == 0.0
    assert limits.admit("home", "pi-1", 1) is None
    assert limits.held_until("home", "pi-1") == pytest.approx(clocks.mono + 4 * HOUR)
    assert limited(registry, "quota", "hold") == 1


# -- memory ----------------------------------------------------------------------------------------


def test_idle_devices_are_forgotten_and_busy_ones_kept() -> None:
    """A sweep forgets devices whose bucket is full again; held ones and quota windows stay."""
    clocks = Clocks()
    limits, _ = limiter(clocks, rate=1, burst=5, devices={"home/q": {"quota_hour": 100}})
    for n in range(1000):
        limits.admit("home", f"d{n}", 1)
    for _ in range(200):
        limits.admit("home", "noisy", 1)  # deep in debt: held for 195 s
    limits.admit("home", "q", 1)
    assert len(limits) == 1002
    clocks.advance(60)
    limits.admit("home", "new", 1)  # the sweep runs on the next envelope
    assert len(limits) == 3  # noisy (held), q (in its hour), new
    clocks.advance(HOUR)
    limits.admit("home", "new", 1)
    assert len(limits) == 1


# -- parked receipts -------------------------------------------------------------------------------


def receipt(*entries: BootReceipt, ts: int = 1) -> Receipt:
    return Receipt("home", "pi-1", ts, tuple(entries))


def test_parked_receipts_merge_into_one_per_device() -> None:
    """Parked receipts merge by set union per boot; through absorbs what it reaches."""
    parked = ParkedReceipts()
    assert parked.park("home", "pi-1", receipt(BootReceipt("b1", ((5, 9),)), ts=10)) is None
    assert parked.park("home", "pi-1", receipt(BootReceipt("b1", ((20, 20),), 3), ts=12)) is None
    assert parked.park("home", "pi-1", receipt(BootReceipt("b2", ((0, 1),)), ts=11)) is None
    assert parked.park("home", "pi-1", receipt(BootReceipt("b1", ((4, 4),)), ts=9)) is None
    merged = parked.release("home", "pi-1")
    assert merged == Receipt(
        "home",
        "pi-1",
        12,
        (BootReceipt("b2", ((0, 1),)), BootReceipt("b1", ((20, 20),), 9)),
    )
    assert parked.release("home", "pi-1") is None
    assert len(parked) == 0


def test_parking_past_the_contract_limits_hands_back_what_was_parked() -> None:
    """A merge past 16 boots or 256 ranges returns the parked receipt to publish now."""
    parked = ParkedReceipts()
    for n in range(MAX_BOOTS):
        assert parked.park("home", "pi-1", receipt(BootReceipt(f"b{n}", ((0, 0),)))) is None
    full = parked.park("home", "pi-1", receipt(BootReceipt("new", ((0, 0),))))
    assert full is not None
    assert [entry.boot for entry in full.stored] == [f"b{n}" for n in range(MAX_BOOTS)]
    assert parked.release("home", "pi-1") == receipt(BootReceipt("new", ((0, 0),)))

    ranges = tuple((2 * n, 2 * n) for n in range(MAX_RANGES))
    assert parked.park("home", "pi-1", receipt(BootReceipt("b", ranges))) is None
    full = parked.park("home", "pi-1", receipt(BootReceipt("b", ((10_000, 10_000),))))
    assert full is not None
    assert full.stored == (BootReceipt("b", ranges),)


def test_sample_limits_load_and_say_what_they_show(tmp_path: Path) -> None:
    """configs/bridge.toml's [bridge.limits] sample, uncommented, loads as its comments say."""
    sample = Path(__file__).resolve().parents[2] / "configs" / "bridge.toml"
    block = sample.read_text().split("\n# [bridge.limits]")[1].split("\n## Ingest rules")[0]
    lines = [line.removeprefix("# ") for line in block.splitlines() if line.startswith("# ")]
    config = tmp_path / "bridge.toml"
    config.write_text("[bridge.limits]\n" + "\n".join(lines) + "\n")
    limits = load(BridgeSettings, "bridge", config_file=config, environ={}).limits
    assert set(LimitSettings.model_fields) - {"sites", "devices", "burst"} <= {
        line.split(" = ")[0] for line in lines
    }
    assert limits.enabled
    assert limits.resolve("lab", "x") == Limit("dead_letter", 2.0, 10.0, 0, 0)
    assert limits.resolve("home", "pi-kitchen") == Limit("hold", 20.0, 20.0, 0, 2_000_000)
    assert limits.resolve("home", "other") == Limit("hold", 0.0, 1.0, 0, 0)


def test_one_warning_when_over_and_one_info_when_back(caplog: pytest.LogCaptureFixture) -> None:
    """Going over a limit logs one WARNING (not one per envelope); coming back, one INFO."""
    clocks = Clocks()
    limits, _ = limiter(clocks, policy="dead_letter", rate=1, burst=1)
    with caplog.at_level(logging.INFO, logger="bridge.limits"):
        for _ in range(10):
            limits.admit("home", "pi-1", 1)
        clocks.advance(1)
        limits.admit("home", "pi-1", 1)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            "device home/pi-1 over its rate limit 1/s (burst 1): dead-lettering the excess",
        ),
        ("INFO", "device home/pi-1 back within its limits"),
    ]

"""The stats report vLLM gets from the connector: counter deltas plus gauges, back to idle."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tests.support.planner_machine import SimRequest, tokens
from tests.unit.test_scheduler_side import Rig, park_prompt
from vllm_bidkv.connectors.stats import BidKVPromMetrics, BidKVStats, StatsReporter
from vllm_bidkv.counters import GAUGES, IDLE_ZERO_GAUGES

pytestmark = pytest.mark.sched


def test_reporter_sends_gauges_on_change_and_the_idle_values_last() -> None:
    rig = Rig(slots=16)
    reporter = StatsReporter(rig.side)
    first = reporter.take()
    assert first is not None and first.data["gauges"]["tier_capacity_bytes"] == 16 * 64
    assert reporter.take() is None  # nothing changed: no report
    park_prompt(rig, tokens(1, 16))
    request = SimRequest("a", tokens(1, 16) + tokens(2, 3))
    rig.admit(request)
    busy = reporter.take()
    assert busy is not None and busy.data["gauges"]["tier_pinned_entries"] == 4
    assert busy.data["blocks_stored"] == 4 and busy.data["types"]["tier_entries"] == "gauge"
    rig.step()
    rig.finish(request)
    idle = reporter.take()  # only gauges changed (and the load's counters): still a report
    assert idle is not None and not idle.is_empty()
    assert all(idle.data["gauges"][g] == 0 for g in IDLE_ZERO_GAUGES)
    assert reporter.take() is None


def test_aggregate_sums_counters_and_keeps_the_latest_gauges() -> None:
    a = BidKVStats(data={"blocks_stored": 2, "gauges": dict.fromkeys(GAUGES, 5)})
    b = BidKVStats(data={"blocks_stored": 3, "gauges": dict.fromkeys(GAUGES, 0)})
    a.aggregate(b)
    assert a.data["blocks_stored"] == 5 and a.data["gauges"] == dict.fromkeys(GAUGES, 0)
    assert a.reduce()["tier_entries"] == 0 and a.reduce()["blocks_stored"] == 5
    assert BidKVStats(data={}).is_empty() and BidKVStats(data={"blocks_stored": 0}).is_empty()
    assert not BidKVStats(data={"gauges": {"tier_entries": 0}}).is_empty()


class _Config:
    kv_transfer_config: Any = None


def test_prom_metrics_set_gauges_and_increment_counters() -> None:
    registry = CollectorRegistry()

    def make(cls: type) -> type:
        class Bound(cls):  # type: ignore[misc,valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, registry=registry, **kwargs)

        return Bound

    types = {Gauge: make(Gauge), Counter: make(Counter), Histogram: make(Histogram)}
    prom = BidKVPromMetrics(_Config(), types, ["engine"], {0: ["0"]})
    assert registry.get_sample_value("vllm:bidkv_tier_entries", {"engine": "0"}) == 0  # before any report
    prom.observe({"blocks_stored": 4, "gauges": {"tier_entries": 7}, "types": {"tier_entries": "gauge"}})
    prom.observe({"blocks_stored": 1, "gauges": {"tier_entries": 3}})
    assert registry.get_sample_value("vllm:bidkv_blocks_stored_total", {"engine": "0"}) == 5
    assert registry.get_sample_value("vllm:bidkv_tier_entries", {"engine": "0"}) == 3

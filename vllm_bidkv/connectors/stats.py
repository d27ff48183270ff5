"""BidKV counters and gauges through vLLM's KVConnectorStats: in vLLM's logs and at ``/metrics``.

Each stats object carries the scheduler side's counter *deltas* since its last
report (``vllm_bidkv.counters``; the workers report none) and, when any of them
changed, the scheduler side's current gauges under ``data["gauges"]``
(``BidKVSchedulerSide.gauges``; ``data["types"]`` marks them ``"gauge"`` for readers of
``reduce()``, which flattens them next to the counters). ``aggregate`` sums counters and
keeps the latest gauges. Prometheus exposes each counter as ``vllm:bidkv_<name>_total``
and each gauge as ``vllm:bidkv_<name>`` (per engine label).

A gauge change is a change: the report of the step that finishes the last job
(or removes the last request's record) carries the idle values, so ``/metrics``
returns to them once the engine is idle.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from vllm_bidkv.counters import COUNTERS, GAUGES
from vllm_bidkv.scheduler_side import BidKVSchedulerSide

GAUGES_KEY = "gauges"
TYPES_KEY = "types"  # {name: "gauge"}: tells a reader of ``reduce()`` which keys are levels, not sums
_LEVELS = (GAUGES_KEY, TYPES_KEY)


class BidKVStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def add(self, name: str, value: int) -> None:
        if value:
            self.data[name] = self.data.get(name, 0) + value

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            if name in _LEVELS or isinstance(value, dict):
                self.data[name] = dict(value)  # a level, not an amount: the latest wins
            else:
                self.add(name, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        flat: dict[str, int | float] = {
            k: v for k, v in self.data.items() if k not in _LEVELS and isinstance(v, int | float)
        }
        flat.update(self.data.get(GAUGES_KEY, {}))
        return flat

    def is_empty(self) -> bool:
        return not self.data.get(GAUGES_KEY) and not any(v for k, v in self.data.items() if k != GAUGES_KEY)


class StatsReporter:
    """What ``get_kv_connector_stats`` hands vLLM: counter deltas, plus the gauges when they changed."""

    def __init__(self, side: BidKVSchedulerSide) -> None:
        self._side = side
        self._last_gauges: dict[str, int] | None = None

    def take(self) -> BidKVStats | None:
        data: dict[str, Any] = dict(self._side.counters.take_deltas())
        gauges = self._side.gauges()
        if gauges != self._last_gauges:
            data[GAUGES_KEY] = gauges
            data[TYPES_KEY] = dict.fromkeys(gauges, "gauge")
            self._last_gauges = gauges
        return BidKVStats(data=data) if data else None


class BidKVPromMetrics(KVConnectorPromMetrics):
    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._labelvalues = per_engine_labelvalues  # the base class names it differently across releases
        self._counters = {
            name: self._counter_cls(name=f"vllm:bidkv_{name}", documentation=doc, labelnames=labelnames)
            for name, doc in COUNTERS.items()
        }
        self._gauges = {
            name: self._gauge_cls(
                name=f"vllm:bidkv_{name}",
                documentation=doc,
                multiprocess_mode="mostrecent",
                labelnames=labelnames,
            )
            for name, doc in GAUGES.items()
        }
        for labels in per_engine_labelvalues.values():  # present (0) before the first report
            for gauge in self._gauges.values():
                gauge.labels(*labels).set(0)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self._labelvalues[engine_idx]
        data = transfer_stats_data or {}
        for name, value in data.items():
            if name in self._counters and value:
                self._counters[name].labels(*labels).inc(value)
        for name, value in (data.get(GAUGES_KEY) or {}).items():
            if name in self._gauges:
                self._gauges[name].labels(*labels).set(value)

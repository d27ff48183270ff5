"""BidKV counters through vLLM's KVConnectorStats: in vLLM's logs and at ``/metrics``.

Each stats object carries the scheduler side's counter *deltas* since its last
report (``vllm_bidkv.counters``; the workers report none). Prometheus exposes
each counter as ``vllm:bidkv_<name>_total``.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

from vllm_bidkv.counters import COUNTERS


class BidKVStats(KVConnectorStats):
    def reset(self) -> None:
        self.data = {}

    def add(self, name: str, value: int) -> None:
        if value:
            self.data[name] = self.data.get(name, 0) + value

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, value in other.data.items():
            self.add(name, value)
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class BidKVPromMetrics(KVConnectorPromMetrics):
    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._counters = {
            name: self._counter_cls(name=f"vllm:bidkv_{name}", documentation=doc, labelnames=labelnames)
            for name, doc in COUNTERS.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues[engine_idx]
        for name, value in (transfer_stats_data or {}).items():
            if name in self._counters and value:
                self._counters[name].labels(*labels).inc(value)

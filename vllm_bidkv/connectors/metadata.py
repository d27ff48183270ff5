"""What the connector's two roles send each other through vLLM, once per step.

Scheduler to workers: ``BidKVConnectorMetadata``, the step's transfer plan (with the first
step, the scheduler's configuration too). Workers to scheduler: ``BidKVWorkerMetadata``, the
jobs each worker reported done or failed, which vLLM aggregates across the workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

from vllm_bidkv.offload import JobResults, StepPlan

try:  # 0.19+: worker -> scheduler metadata (store completions)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # pragma: no cover - offload is refused at start-up (offload_spec)
    KVConnectorWorkerMetadata = object  # type: ignore[misc,assignment]


@dataclass
class BidKVConnectorMetadata(KVConnectorMetadata):
    plan: StepPlan = field(default_factory=StepPlan)
    scheduler_config: dict[str, Any] | None = None
    """The scheduler's configuration, with its first step only: every worker checks its own
    (read from its own process's ``BIDKV_*`` environment) against it."""


@dataclass
class BidKVWorkerMetadata(KVConnectorWorkerMetadata):  # type: ignore[misc]
    results: JobResults = field(default_factory=JobResults)

    def aggregate(self, other: Any) -> BidKVWorkerMetadata:
        self.results.merge(other.results)
        return self

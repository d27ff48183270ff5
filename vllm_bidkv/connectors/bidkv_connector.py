"""BidKVConnector: the one ``KVConnectorBase_V1`` subclass of vllm-bidkv, a façade.

Every hook delegates to the object of its role, as vLLM's SimpleCPUOffloadConnector
does. Scheduler role: ``SchedulerRole`` (``connectors.scheduler_role``) speaks vLLM to
``BidKVSchedulerSide`` (``vllm_bidkv.scheduler_side``, pure), which owns the strategy,
the offload planner and one record per request; the patches' bind hook hands it a
SchedulerContext. Worker role: ``WorkerRole`` (``connectors.worker_role``) checks the
scheduler's configuration and drives ``CopyWorker`` (``connectors.worker``), which owns
the CPU tier's bytes and runs each step's plan. The roles exchange
``connectors.metadata``; counters come only from the scheduler side
(``vllm_bidkv.counters``). vLLM loads this class by this module's path: keep it here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.connectors.offload_setup import frees_running_blocks, offload_spec
from vllm_bidkv.connectors.scheduler_role import SchedulerRole
from vllm_bidkv.connectors.stats import BidKVPromMetrics, BidKVStats
from vllm_bidkv.connectors.worker_role import WorkerRole
from vllm_bidkv.context import SchedulerContext
from vllm_bidkv.patches.admission import refuse_unsupported_admission
from vllm_bidkv.patches.capabilities import require_supported

logger = logging.getLogger("vllm_bidkv")


class BidKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        caps = require_supported()
        if caps.connector_takes_kv_cache_config:
            super().__init__(vllm_config, role, kv_cache_config)
        else:
            super().__init__(vllm_config, role)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self.config = BidKVConfig.from_sources(extra)
        offload = offload_spec(vllm_config, kv_cache_config, caps, self.config)
        self.scheduler_role: SchedulerRole | None = None
        self.worker_role: WorkerRole | None = None
        if role == KVConnectorRole.SCHEDULER:
            if self.config.active:
                refuse_unsupported_admission(self.config.admission)  # at start, not at the first request
            self.scheduler_role = SchedulerRole(
                self.config, vllm_config, offload, frees_running_blocks=frees_running_blocks(kv_cache_config)
            )
        else:
            self.worker_role = WorkerRole(self.config, caps, vllm_config, kv_cache_config, offload)
        logger.info("vllm-bidkv: %s role, config %s", role.name, self.config)

    # ---------------------------------------------------------------- scheduler
    @property
    def _sched(self) -> SchedulerRole:
        assert self.scheduler_role is not None, "scheduler-role hook called on a worker connector"
        return self.scheduler_role

    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a dropped store is a future miss, so in-flight output of a
        preempted request is delivered as in stock vLLM, not dropped (0.28+)."""
        return False

    def bind_scheduler_context(self, ctx: SchedulerContext) -> None:
        self._sched.bind_scheduler_context(ctx)

    @property
    def scheduler_context(self) -> SchedulerContext | None:
        return self.scheduler_role.side.ctx if self.scheduler_role is not None else None

    def loads_ordered_on_compute_stream(self) -> bool:
        return self._sched.loads_ordered_on_compute_stream()

    def recomputes_failed_loads(self) -> bool:
        return self._sched.recomputes_failed_loads()

    def chooses_victims(self) -> bool:
        return self._sched.chooses_victims()

    def choose_victim(self, requests: list[Any], requester: Any = None) -> Any:
        return self._sched.choose_victim(requests, requester)

    def has_pending_block_frees(self) -> bool:
        return self._sched.has_pending_block_frees()

    def wait_for_frees(self, requests: list[Any], requester: Any) -> bool:
        return self._sched.wait_for_frees(requests, requester)

    def admission_key(self) -> Callable[[Any], Any] | None:
        return self._sched.admission_key()

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return self._sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self._sched.update_connector_output(connector_output)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self._sched.request_finished(request, block_ids)

    def has_pending_push_work(self) -> bool:
        return self.scheduler_role is not None and self.scheduler_role.has_pending_push_work()

    def reset_cache(self) -> bool | None:
        return self._sched.reset_cache()

    def give_up_copies(self) -> None:
        self._sched.give_up_copies()

    def take_events(self) -> list[Any]:
        return self.scheduler_role.take_events() if self.scheduler_role is not None else []

    # ------------------------------------------------------------------- worker
    def _bound_metadata(self) -> KVConnectorMetadata | None:
        return self._get_connector_metadata() if self.has_connector_metadata() else None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.worker_role is not None:
            self.worker_role.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if self.worker_role is not None:
            self.worker_role.bind_connector_metadata(connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self.worker_role is not None:
            self.worker_role.start_load_kv(self._bound_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # synchronous loads run on the compute stream before the forward; asynchronous
        # ones are for requests this forward does not run

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # stores run once per step, after the forward (wait_for_save)

    def wait_for_save(self) -> None:
        if self.worker_role is not None:
            self.worker_role.wait_for_save(self._bound_metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if self.worker_role is None:
            return None, None
        if self.worker_role.saves_in_get_finished():
            self.wait_for_save()  # the hook itself, as if vLLM had called it
        return self.worker_role.get_finished()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker_role.get_block_ids_with_load_errors() if self.worker_role is not None else set()

    def build_connector_worker_meta(self) -> Any:
        return self.worker_role.build_connector_worker_meta() if self.worker_role is not None else None

    def shutdown(self) -> None:
        if self.worker_role is not None:
            self.worker_role.shutdown()
        if self.scheduler_role is not None:
            self.scheduler_role.shutdown()
        super().shutdown()

    # -------------------------------------------------------------------- stats
    def get_kv_connector_stats(self) -> BidKVStats | None:
        # Workers count nothing: every counter is the scheduler side's.
        return self.scheduler_role.get_kv_connector_stats() if self.scheduler_role is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> BidKVStats:
        return BidKVStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> BidKVPromMetrics:
        return BidKVPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

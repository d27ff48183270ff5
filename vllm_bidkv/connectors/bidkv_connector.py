"""BidKVConnector: the one ``KVConnectorBase_V1`` subclass of vllm-bidkv, a façade.

Every hook is a short delegate. Scheduler role: ``BidKVSchedulerSide``
(``vllm_bidkv.scheduler_side``, pure) owns the strategy, the offload planner and
one record per request; the patches' bind hook hands it a SchedulerContext, and
``patches.scheduler_output`` reads each step's ``SchedulerOutput`` for it.
Worker role: ``CopyWorker`` (``connectors.worker``) owns the CPU tier's bytes and
runs each step's plan. Job results go back through ``build_connector_worker_meta``;
counters come only from the scheduler side (``vllm_bidkv.counters``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.connectors.stats import BidKVPromMetrics, BidKVStats, StatsReporter
from vllm_bidkv.connectors.worker import CopyWorker
from vllm_bidkv.context import SchedulerContext
from vllm_bidkv.offload import JobResults, StepPlan, num_slots_for
from vllm_bidkv.patches import hooks
from vllm_bidkv.patches.capabilities import Capabilities, require_supported
from vllm_bidkv.patches.scheduler_output import step_events, step_has_no_forward
from vllm_bidkv.scheduler_side import BidKVSchedulerSide

try:  # 0.19+: worker -> scheduler metadata (store completions)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # pragma: no cover - refused at start-up by _check_offload
    KVConnectorWorkerMetadata = object  # type: ignore[misc,assignment]

logger = logging.getLogger("vllm_bidkv")


@dataclass
class BidKVConnectorMetadata(KVConnectorMetadata):
    plan: StepPlan = field(default_factory=StepPlan)
    scheduler_config: dict[str, Any] | None = None
    """The scheduler's configuration, with its first step only: every worker checks its own
    (read from its own process's ``BIDKV_*`` environment) against it."""


# The keys a worker acts on (whether it copies, the tier's size, how it copies); the others
# (victim rule, admission, bid weights) are the scheduler's alone.
WORKER_KEYS = ("enabled", "kill_switch", "offload_mode", "cpu_bytes", "copy_backend")


def check_same_config(mine: BidKVConfig, scheduler: dict[str, Any]) -> None:
    """Refuse a worker whose configuration differs from the scheduler's where the worker acts
    on it: a Ray worker on another node reads its own environment, and with another
    ``cpu_bytes`` every copy would address slots the scheduler never planned."""
    differ = {key: getattr(mine, key) for key in WORKER_KEYS if scheduler.get(key) != getattr(mine, key)}
    if differ:
        pairs = ", ".join(
            f"{key}={value!r} here but {scheduler.get(key)!r} in the scheduler"
            for key, value in differ.items()
        )
        raise ValueError(
            f"vllm-bidkv: this worker's configuration differs from the scheduler's: {pairs}. "
            "Give every process of the engine the same BIDKV_* environment."
        )


@dataclass
class BidKVWorkerMetadata(KVConnectorWorkerMetadata):  # type: ignore[misc]
    results: JobResults = field(default_factory=JobResults)

    def aggregate(self, other: Any) -> BidKVWorkerMetadata:
        self.results.merge(other.results)
        return self


def _block_bytes(kv_cache_config: Any) -> int:
    """Bytes of one block across every layer of the (single) KV cache group, on one worker."""
    group = kv_cache_config.kv_cache_groups[0]
    return int(group.kv_cache_spec.page_size_bytes) * len(group.layer_names)


def _check_offload(
    vllm_config: Any, kv_cache_config: Any, caps: Capabilities, config: BidKVConfig
) -> tuple[int, int | None]:
    """Refuse configurations the CPU tier cannot serve; return the number of CPU slots and
    the sliding window of a sliding-window group (None: full attention, which a hybrid
    model's one group is)."""
    if not caps.connector_worker_meta:
        raise ValueError(
            f"vllm-bidkv: offload_mode={config.offload_mode!r} needs build_connector_worker_meta "
            f"(vLLM >= 0.19); vLLM {caps.vllm_version} lacks it. Use offload_mode='off'."
        )
    if not vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(
            "vllm-bidkv: the CPU tier is keyed by prefix-cache block hashes, but prefix caching is off. "
            "Enable it (drop --no-enable-prefix-caching) or set offload_mode='off'."
        )
    if kv_cache_config is None:
        raise ValueError("vllm-bidkv: offload needs the KV cache config (vLLM >= 0.13)")
    groups = kv_cache_config.kv_cache_groups
    kinds = [type(g.kv_cache_spec).__name__ for g in groups]
    if kinds not in (["FullAttentionSpec"], ["SlidingWindowSpec"]):
        # One group is what vLLM makes of any attention model while its hybrid allocator is
        # off, which it turns off for a connector without SupportsHMA (this one): sliding-window
        # layers mixed with full ones are allocated as full attention, every token kept.
        raise ValueError(
            f"vllm-bidkv: the CPU tier needs one attention KV cache group (full or sliding window); "
            f"this model has {len(groups)}: [{', '.join(kinds)}] (state-space / Mamba layers?). "
            "Set offload_mode='off'."
        )
    spec = groups[0].kv_cache_spec
    window = spec.sliding_window if kinds == ["SlidingWindowSpec"] else None
    return num_slots_for(config.cpu_bytes, _block_bytes(kv_cache_config)), window


class BidKVConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        caps = require_supported()
        if caps.connector_takes_kv_cache_config:
            super().__init__(vllm_config, role, kv_cache_config)
        else:
            super().__init__(vllm_config, role)
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        self.config = BidKVConfig.from_sources(extra)
        self._kv_cache_config = kv_cache_config
        num_slots = block_bytes = 0
        window: int | None = None
        if self.config.offload_enabled:
            num_slots, window = _check_offload(vllm_config, kv_cache_config, caps, self.config)
            # Every worker holds its share of each block (TP: its heads), so a block moved is
            # its bytes on one worker times the workers: the byte counters are engine-wide.
            block_bytes = _block_bytes(kv_cache_config) * vllm_config.parallel_config.world_size
            transfer = vllm_config.kv_transfer_config
            if getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
                # See recomputes_failed_loads; the Scheduler reads this after building us.
                logger.warning(
                    "vllm-bidkv: kv_load_failure_policy=%r -> 'recompute'", transfer.kv_load_failure_policy
                )
                transfer.kv_load_failure_policy = "recompute"
        self._num_slots = num_slots
        self.scheduler_side: BidKVSchedulerSide | None = None
        self._unbound_scheduler: Any = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler_side = BidKVSchedulerSide(
                self.config,
                num_slots=num_slots,
                block_bytes=block_bytes,
                world_size=vllm_config.parallel_config.world_size,
                sliding_window=window,
                async_scheduling=bool(getattr(vllm_config.scheduler_config, "async_scheduling", False)),
            )
            if not hooks.bind_hook_installed():
                # Loaded by module path without the plugin: bind on the first scheduler-side call.
                self._unbound_scheduler = hooks.find_scheduler_under_construction()
        self.worker: CopyWorker | None = None
        self._stats_reporter: StatsReporter | None = None
        self._saves_without_forward = caps.no_forward_step_saves
        self._config_sent = False  # scheduler role: the first step's metadata carries the config
        logger.info("vllm-bidkv: %s role, config %s", role.name, self.config)

    # ---------------------------------------------------------------- scheduler
    @property
    def _sched(self) -> BidKVSchedulerSide:
        assert self.scheduler_side is not None, "scheduler-role hook called on a worker connector"
        if self.scheduler_side.ctx is None and self._unbound_scheduler is not None:
            hooks.bind_late(self._unbound_scheduler)
        return self.scheduler_side

    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a dropped store is a future miss, so in-flight output of a
        preempted request is delivered as in stock vLLM, not dropped (0.28+)."""
        return False

    def bind_scheduler_context(self, ctx: SchedulerContext) -> None:
        self._unbound_scheduler = None
        self._sched.bind(ctx)

    @property
    def scheduler_context(self) -> SchedulerContext | None:
        return self.scheduler_side.ctx if self.scheduler_side is not None else None

    def loads_ordered_on_compute_stream(self) -> bool:
        """True while active: our loads cannot race an in-flight step, so frees need not wait."""
        return self.config.active

    def recomputes_failed_loads(self) -> bool:
        """A CPU tier is a cache: a block that fails to load is recomputed, never fatal."""
        return self.config.offload_enabled

    def chooses_victims(self) -> bool:
        return self.config.active

    def choose_victim(self, requests: list[Any], requester: Any = None) -> Any:
        """vLLM's next victim among ``requests`` (its own pick is the last); None keeps it."""
        return self._sched.choose_victim(requests, requester)

    def has_pending_block_frees(self) -> bool:
        return self._sched.has_pending_block_frees()

    def admission_key(self) -> Callable[[Any], Any] | None:
        return self._sched.admission_key()

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        hit = self._sched.match(request, num_computed_tokens)
        return hit, self._sched.load_is_async(request.request_id)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        block_ids = blocks.get_block_ids()[0] if num_external_tokens else []
        self._sched.after_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        meta = BidKVConnectorMetadata(self._sched.plan_step(step_events(scheduler_output)))
        if not self._config_sent:
            meta.scheduler_config, self._config_sent = asdict(self.config), True
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, BidKVWorkerMetadata):
            self._sched.complete(meta.results)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # True while its asynchronous load is in flight: vLLM frees the blocks when every
        # worker reported it (finished_recving), not under a copy still writing them.
        return self._sched.finished(request, list(block_ids)), None

    def has_pending_push_work(self) -> bool:
        """Copies in flight: vLLM keeps stepping until every worker reported them, so an idle
        engine holds no touched block, pin or slot (and reset_prefix_cache succeeds)."""
        return self.scheduler_side is not None and self.scheduler_side.has_jobs_in_flight()

    def reset_cache(self) -> bool | None:
        self._sched.reset()
        return True

    def give_up_copies(self) -> None:
        """Called by the reset hook before vLLM empties its caches and the tier."""
        self._sched.give_up_copies()

    def planner_stats(self) -> dict[str, int]:
        planner = self._sched.planner
        return planner.stats() if planner is not None else {}

    # ------------------------------------------------------------------- worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.config.offload_enabled:
            # Assumes one host per engine; a multi-node engine over-counts and refuses early.
            workers = self._vllm_config.parallel_config.world_size
            self.worker = CopyWorker(
                kv_caches, self._kv_cache_config.num_blocks, self._num_slots, self.config, workers
            )

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, BidKVConnectorMetadata) and connector_metadata.scheduler_config:
            check_same_config(self.config, connector_metadata.scheduler_config)
        # Every release binds before the forward, while start_load_kv may come after it (0.32+
        # when the step has no load): rescues run here, before a load or the forward
        # overwrites their blocks.
        if self.worker is not None and isinstance(connector_metadata, BidKVConnectorMetadata):
            self.worker.run_rescues(connector_metadata.plan)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self.worker is not None and self.has_connector_metadata():
            self.worker.run_loads(self._get_connector_metadata().plan)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # synchronous loads run on the compute stream before the forward; asynchronous
        # ones are for requests this forward does not run

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # stores run once per step, after the forward (wait_for_save)

    def wait_for_save(self) -> None:
        if self.worker is not None and self.has_connector_metadata():
            self.worker.run_stores(self._get_connector_metadata().plan)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if not self._saves_without_forward and step_has_no_forward():
            # Up to 0.30 a step that runs no forward skips wait_for_save: its stores would never
            # run and their blocks would stay pinned (the eager engine run hangs). Nothing to
            # wait for, so they run now.
            self.wait_for_save()
        if self.worker is None:
            return None, None
        return None, self.worker.take_finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors() if self.worker is not None else set()

    def build_connector_worker_meta(self) -> Any:
        if self.worker is None:
            return None
        results = self.worker.take_results()
        return BidKVWorkerMetadata(results) if results else None

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        super().shutdown()

    # -------------------------------------------------------------------- stats
    def get_kv_connector_stats(self) -> BidKVStats | None:
        if self.scheduler_side is None:
            return None  # workers count nothing: every counter is the scheduler side's
        if self._stats_reporter is None:
            self._stats_reporter = StatsReporter(self.scheduler_side)
        return self._stats_reporter.take()  # counter deltas, and the gauges when they changed

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

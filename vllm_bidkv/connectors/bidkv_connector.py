"""BidKVConnector: the one ``KVConnectorBase_V1`` subclass of vllm-bidkv.

Scheduler role: bound to a SchedulerContext by the patches' bind hook; picks
preemption victims with the configured strategy, orders admission, and drives
the OffloadPlanner (lazy/eager stores, loads of CPU-tier prefix hits).
Worker role: owns the CPU tier's bytes and runs the planner's jobs through
``vllm_bidkv.kernels.copy_blocks`` — loads before the step's forward (on the
compute stream), stores after it (on CUDA: a side stream that waits for an
event recorded after the forward, so a block is never read before the compute
that wrote it finished). Job completions go back to the scheduler through
``build_connector_worker_meta``; only then does the scheduler release its pins.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.connectors.stats import BidKVPromMetrics, BidKVStats
from vllm_bidkv.context import SchedulerContext
from vllm_bidkv.offload import CpuBlockTier, JobResults, OffloadPlanner, StepPlan, TransferJob, num_slots_for
from vllm_bidkv.patches import hooks
from vllm_bidkv.patches.capabilities import Capabilities, require_supported
from vllm_bidkv.policy import Candidate, VictimStats, admission_key, make_strategy

try:  # 0.19+: worker -> scheduler metadata (store completions)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
except ImportError:  # pragma: no cover - refused at start-up by _check_offload
    KVConnectorWorkerMetadata = object  # type: ignore[misc,assignment]

logger = logging.getLogger("vllm_bidkv")


@dataclass
class BidKVConnectorMetadata(KVConnectorMetadata):
    plan: StepPlan = field(default_factory=StepPlan)


@dataclass
class BidKVWorkerMetadata(KVConnectorWorkerMetadata):  # type: ignore[misc]
    results: JobResults = field(default_factory=JobResults)

    def aggregate(self, other: Any) -> BidKVWorkerMetadata:
        self.results.merge(other.results)
        return self


def _block_bytes(kv_cache_config: Any) -> int:
    """Bytes of one block across every layer of the (single) KV cache group."""
    group = kv_cache_config.kv_cache_groups[0]
    return int(group.kv_cache_spec.page_size_bytes) * len(group.layer_names)


def _check_offload(vllm_config: Any, kv_cache_config: Any, caps: Capabilities, config: BidKVConfig) -> int:
    """Refuse configurations the CPU tier cannot serve; return the number of CPU slots."""
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
    spec = groups[0].kv_cache_spec if groups else None
    if (
        len(groups) != 1
        or type(spec).__name__ != "FullAttentionSpec"
        or getattr(spec, "sliding_window", None)
    ):
        kinds = ", ".join(type(g.kv_cache_spec).__name__ for g in groups)
        raise ValueError(
            f"vllm-bidkv: the CPU tier supports one full-attention KV cache group; this model has [{kinds}] "
            "(hybrid / sliding-window models are not supported yet). Set offload_mode='off'."
        )
    return num_slots_for(config.cpu_bytes, _block_bytes(kv_cache_config))


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
        self._stats = BidKVStats()
        self._num_slots = 0
        if self.config.offload_enabled:
            self._num_slots = _check_offload(vllm_config, kv_cache_config, caps, self.config)
            transfer = vllm_config.kv_transfer_config
            if getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
                # A CPU tier is a cache: a block that fails to load is recomputed, never fatal.
                logger.warning(
                    "vllm-bidkv: kv_load_failure_policy=%r -> 'recompute'", transfer.kv_load_failure_policy
                )
                transfer.kv_load_failure_policy = "recompute"
        self._block_size = vllm_config.cache_config.block_size
        # scheduler role
        self._ctx: SchedulerContext | None = None
        self._planner: OffloadPlanner | None = None
        self._strategy = make_strategy(self.config.victim_policy, self.config)
        self.victim_stats = VictimStats()
        self._victim_computed: dict[str, int] = {}
        # Victims chosen in this schedule(): their blocks (id, hash) before vLLM frees them.
        self._victim_blocks: dict[str, list[tuple[int, Any]]] = {}
        self._local_hit: dict[str, int] = {}  # GPU prefix hit seen by the last match, per request
        self._unbound_scheduler: Any = None
        if role == KVConnectorRole.SCHEDULER and not hooks.bind_hook_installed():
            # Loaded by module path without the plugin: bind on the first scheduler-side call.
            self._unbound_scheduler = hooks.find_scheduler_under_construction()
        # worker role
        self._worker: _CopyWorker | None = None
        self._saves_without_forward = caps.no_forward_step_saves
        logger.info("vllm-bidkv: %s role, config %s", role.name, self.config)

    # ---------------------------------------------------------------- scheduler
    @property
    def requires_kv_delivery(self) -> bool:
        """A best-effort cache: a dropped store is a future miss, so in-flight output of a
        preempted request is delivered as in stock vLLM, not dropped (0.28+)."""
        return False

    def bind_scheduler_context(self, ctx: SchedulerContext) -> None:
        self._ctx = ctx
        self._unbound_scheduler = None
        if self.config.offload_enabled:
            tier = CpuBlockTier(self._num_slots, self.config.cpu_eviction)
            world_size = self._vllm_config.parallel_config.world_size
            self._planner = OffloadPlanner(
                ctx,
                tier,
                self.config.offload_mode,
                self.config.lazy_lookahead_steps,
                world_size,
                block_bytes=_block_bytes(self._kv_cache_config),
            )

    @property
    def scheduler_context(self) -> SchedulerContext | None:
        return self._ctx

    def _ensure_bound(self) -> None:
        if self._ctx is None and self._unbound_scheduler is not None:
            hooks.bind_late(self._unbound_scheduler)

    def loads_ordered_on_compute_stream(self) -> bool:
        """True while active: our loads cannot race an in-flight step, so frees need not wait."""
        return self.config.active

    def has_pending_block_frees(self) -> bool:
        """Stores in flight hold free blocks; vLLM (0.30+) waits for them instead of preempting."""
        return self._planner is not None and self._planner.held_store_blocks > 0

    def victim_chooser(self) -> Callable[[list[Any]], Any] | None:
        return self.choose_victim if self.config.active else None

    def admission_key(self) -> Callable[[Any], Any] | None:
        return admission_key(self.config.admission) if self.config.active else None

    def choose_victim(self, requests: list[Any]) -> Any:
        """Pick the victim among vLLM's preemptible running requests (last = vLLM's pick)."""
        if not self.config.active:  # a patched fork calls this directly: keep vLLM's choice
            return None
        start = time.perf_counter()
        candidates = [self._candidate(order, req) for order, req in enumerate(requests)]
        chosen = self._strategy.choose(candidates)
        self.victim_stats.record_choice(chosen, time.perf_counter() - start)
        self._stats.add("preemptions", 1)
        self._stats.add("preempted_blocks_freed", chosen.freeable_blocks)
        self._victim_computed[chosen.request_id] = chosen.computed_tokens
        victim = requests[chosen.order]
        if self._planner is not None and self._ctx is not None:
            groups = self._ctx.request_block_ids(victim.request_id)
            ids = groups[0] if groups else []
            self._victim_blocks[victim.request_id] = [(b, self._ctx.get_block(b).block_hash) for b in ids]
        return victim

    def _candidate(self, order: int, req: Any) -> Candidate:
        assert self._ctx is not None
        groups = self._ctx.request_block_ids(req.request_id)
        block_ids = groups[0] if groups else []
        refs = [self._ctx.get_block(i).ref_cnt for i in block_ids]
        computed = req.num_computed_tokens
        shared = min(computed, self._block_size * sum(1 for r in refs if r > 1))
        cpu_tokens, offloadable = (
            self._planner.restorable(block_ids, req.block_hashes) if self._planner else (0, 0)
        )
        return Candidate(
            request_id=req.request_id,
            order=order,
            num_blocks=len(block_ids),
            freeable_blocks=sum(1 for r in refs if r == 1),
            computed_tokens=computed,
            shared_tokens=shared,
            cpu_tokens=cpu_tokens,
            offloadable_tokens=offloadable,
            prompt_tokens=req.num_prompt_tokens,
            output_tokens=req.num_output_tokens,
            max_tokens=req.max_tokens,
            num_preemptions=req.num_preemptions,
            priority=req.priority,
            arrival_time=req.arrival_time,
        )

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        self._ensure_bound()
        hit = self._planner.match(request, num_computed_tokens) if self._planner else 0
        if hit:
            self._local_hit[request.request_id] = num_computed_tokens
        computed_before = self._victim_computed.pop(request.request_id, None)
        if computed_before is not None:
            recomputed = max(0, computed_before - num_computed_tokens - hit)
            self._stats.add("recomputed_tokens", recomputed)
            self.victim_stats.record_resume(recomputed)
        return hit, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if self._planner is None or num_external_tokens == 0:
            return
        gpu_block_ids = blocks.get_block_ids()[0]
        local_hit = self._local_hit.pop(request.request_id)
        self._planner.plan_load(
            request.request_id, request.block_hashes, gpu_block_ids, local_hit, num_external_tokens
        )
        self._stats.add("tokens_loaded", num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        self._ensure_bound()
        if self._planner is None:
            return BidKVConnectorMetadata()
        cached = scheduler_output.scheduled_cached_reqs
        allocated = sum(len(r.block_ids[0]) for r in scheduler_output.scheduled_new_reqs if r.block_ids)
        allocated += sum(len(ids[0]) for ids in cached.new_block_ids if ids)
        for req_id in _resumed_req_ids(cached):
            self._planner.on_request_resumed(req_id)
        # Blocks the worker zeroes before the forward (0.19+, some attention backends) are lost.
        zeroed = set(getattr(scheduler_output, "new_block_ids_to_zero", None) or ())
        for req_id in scheduler_output.preempted_req_ids or ():
            request = self._ctx.get_request(req_id) if self._ctx else None
            blocks = self._victim_blocks.get(req_id, [])
            if request is not None:
                self._planner.on_request_preempted(
                    request, [(b, None if b in zeroed else h) for b, h in blocks]
                )
        self._victim_blocks.clear()  # a rescue is valid only until this step's forward
        return BidKVConnectorMetadata(self._planner.plan_step(allocated))

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if self._planner is not None and isinstance(meta, BidKVWorkerMetadata):
            self._planner.complete(meta.results)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._victim_computed.pop(request.request_id, None)
        self._victim_blocks.pop(request.request_id, None)
        if self._planner is not None:
            self._planner.on_request_finished(request, list(block_ids))
        return False, None

    def reset_cache(self) -> bool | None:
        if self._planner is not None:
            self._planner.reset()
        return True

    def planner_stats(self) -> dict[str, int]:
        return self._planner.stats() if self._planner else {}

    # ------------------------------------------------------------------- worker
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if not self.config.offload_enabled:
            return
        self._worker = _CopyWorker(kv_caches, self._kv_cache_config.num_blocks, self._num_slots, self.config)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        # Every release binds before the forward, while start_load_kv may come after it (0.32+
        # when the step has no load): rescues run here, before a load or the forward
        # overwrites their blocks.
        if self._worker is not None and isinstance(connector_metadata, BidKVConnectorMetadata):
            self._worker.run_rescues(connector_metadata.plan, self._stats)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        if self._worker is not None and self.has_connector_metadata():
            self._worker.run_loads(self._get_connector_metadata().plan, self._stats)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete on the compute stream before the forward starts

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # stores run once per step, after the forward (wait_for_save)

    def wait_for_save(self) -> None:
        if self._worker is not None and self.has_connector_metadata():
            self._worker.run_stores(self._get_connector_metadata().plan, self._stats)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        if not self._saves_without_forward and _step_has_no_forward():
            # Up to 0.28 a step that runs no forward skips wait_for_save: its stores would never
            # run and their blocks would stay pinned (the eager engine run hangs). Nothing to
            # wait for, so they run now.
            self.wait_for_save()
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_load_errors() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> Any:
        if self._worker is None:
            return None
        results = self._worker.take_results()
        return BidKVWorkerMetadata(results) if results.done or results.failed else None

    # -------------------------------------------------------------------- stats
    def get_kv_connector_stats(self) -> BidKVStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, BidKVStats()
        return stats

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


def _step_has_no_forward() -> bool:
    """vLLM calls ``get_finished`` inside the step's forward context, which has no attention
    metadata when the step schedules no tokens (``kv_connector_no_forward``)."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return is_forward_context_available() and get_forward_context().attn_metadata is None


def _resumed_req_ids(cached: Any) -> Sequence[str]:
    resumed = getattr(cached, "resumed_req_ids", None)
    if resumed is not None:
        return list(resumed)
    flags = getattr(cached, "resumed_from_preemption", ())
    return [req_id for req_id, flag in zip(cached.req_ids, flags, strict=True) if flag]


class _CopyWorker:
    """The worker's CPU tier bytes and the copies of one step's jobs."""

    def __init__(
        self, kv_caches: dict[str, torch.Tensor], num_gpu_blocks: int, num_slots: int, config: BidKVConfig
    ):
        from vllm_bidkv.kernels import allocate_like, block_views

        seen: set[tuple[int, tuple[int, ...]]] = set()
        views: list[torch.Tensor] = []
        for name, tensor in kv_caches.items():
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if key in seen:  # layers sharing one cache tensor are copied once
                continue
            seen.add(key)
            try:
                views.extend(block_views(tensor, num_gpu_blocks))
            except ValueError as err:
                raise ValueError(f"vllm-bidkv: unsupported KV cache layout for layer {name}: {err}") from err
        self._gpu = views
        self._cuda = views[0].is_cuda
        self._cpu = allocate_like(views, num_slots, device="cpu", pin_memory=self._cuda)
        self._row_bytes = sum(v.shape[1] for v in views)
        self._backend = config.copy_backend
        self._results = JobResults()
        self._load_errors: set[int] = set()
        self._inflight: list[tuple[list[int], Any]] = []
        self._store_stream = torch.cuda.Stream() if self._cuda else None
        logger.info(
            "vllm-bidkv: CPU tier %d blocks x %d B = %.2f GiB",
            num_slots,
            self._row_bytes,
            num_slots * self._row_bytes / 2**30,
        )

    def _copy(
        self, src: list[torch.Tensor], dst: list[torch.Tensor], src_ids: list[int], dst_ids: list[int]
    ) -> None:
        from vllm_bidkv.kernels import copy_blocks

        copy_blocks(src, dst, src_ids, dst_ids, backend=self._backend)

    def run_loads(self, plan: StepPlan, stats: BidKVStats) -> None:
        for job in plan.pre_forward_loads:
            # Blocks the tier could no longer supply: vLLM must recompute them.
            self._load_errors.update(job.unavailable_gpu_block_ids)
            try:
                self._copy(self._cpu, self._gpu, job.cpu_slots, job.gpu_block_ids)
            except Exception:  # noqa: BLE001 - a failed load must turn into a recompute, not a crash
                logger.exception("vllm-bidkv: load job %d failed; vLLM will recompute", job.job_id)
                self._results.failed.add(job.job_id)
                self._load_errors.update(job.gpu_block_ids)
                stats.add("load_errors", len(job.gpu_block_ids))
                continue
            self._results.done[job.job_id] = self._results.done.get(job.job_id, 0) + 1
            stats.add("blocks_loaded", len(job.gpu_block_ids))
            stats.add("bytes_loaded", len(job.gpu_block_ids) * self._row_bytes)

    def run_rescues(self, plan: StepPlan, stats: BidKVStats) -> None:
        """Rescues copy on the compute stream: the forward that reuses their blocks waits for them."""
        if self._store(plan.pre_forward_stores, stats, after_forward=False):
            stats.add("blocks_rescued", sum(len(job.gpu_block_ids) for job in plan.pre_forward_stores))

    def run_stores(self, plan: StepPlan, stats: BidKVStats) -> None:
        """Stores copy on their own stream once the forward is done, overlapping the next steps."""
        self._store(plan.post_forward_stores, stats, after_forward=True)

    def _store(self, jobs: list[TransferJob], stats: BidKVStats, *, after_forward: bool) -> bool:
        """Copy the jobs' blocks into the tier; False if there were none or the copy failed."""
        if not jobs:
            return False
        gpu_ids = [i for job in jobs for i in job.gpu_block_ids]
        cpu_ids = [s for job in jobs for s in job.cpu_slots]
        job_ids = [job.job_id for job in jobs]
        try:
            if self._cuda:
                copied = torch.cuda.Event()
                if after_forward:
                    assert self._store_stream is not None
                    forward_done = torch.cuda.Event()
                    forward_done.record()
                    with torch.cuda.stream(self._store_stream):
                        self._store_stream.wait_event(forward_done)
                        self._copy(self._gpu, self._cpu, gpu_ids, cpu_ids)
                        copied.record()
                else:
                    self._copy(self._gpu, self._cpu, gpu_ids, cpu_ids)
                    copied.record()
                self._inflight.append((job_ids, copied))
            else:
                self._copy(self._gpu, self._cpu, gpu_ids, cpu_ids)
                self._finish(job_ids)
        except Exception:  # noqa: BLE001 - a failed store only loses a cache entry
            logger.exception("vllm-bidkv: store of %d blocks failed", len(gpu_ids))
            self._results.failed.update(job_ids)
            return False
        stats.add("blocks_stored", len(gpu_ids))
        stats.add("bytes_stored", len(gpu_ids) * self._row_bytes)
        return True

    def _finish(self, job_ids: list[int]) -> None:
        for job_id in job_ids:
            self._results.done[job_id] = self._results.done.get(job_id, 0) + 1

    def take_results(self) -> JobResults:
        still: list[tuple[list[int], Any]] = []
        for job_ids, event in self._inflight:
            if event.query():
                self._finish(job_ids)
            else:
                still.append((job_ids, event))
        self._inflight = still
        results, self._results = self._results, JobResults()
        return results

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

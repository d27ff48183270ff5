"""The scheduler simulator: vLLM's real Scheduler, a cost model in place of the GPU.

Each step follows the engine core's order (``EngineCore.step``): arrivals due by the
virtual clock are added, ``schedule()`` runs (real Scheduler, KVCacheManager, BlockPool
and — when configured — BidKVConnector's scheduler side with its patches), the step is
"executed" by the cost model, and ``update_from_output()`` gets one sampled token for
every request whose prefill completes. The step takes

    load time (the plan's pre-forward loads, on the critical path) + forward time

and the plan's stores go to a side stream that starts after the forward and overlaps
the following steps (a load that overlaps in-flight stores gets the duplex share of
the link). The simulator plays the worker: it reports each job back through
``KVConnectorOutput.kv_connector_worker_meta`` when its copy has finished on the
virtual clock — loads at the end of their step, stores when the side stream gets
there — exactly the path the real worker's completions take.

Also measured (wall clock of this process): the time of ``schedule()`` +
``update_from_output()`` and the time spent inside the connector's scheduler-side
methods and the victim hook, for the connector-cost target.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vllm_bidkv.bench.configs import RunConfig
from vllm_bidkv.bench.costmodel import CostModel
from vllm_bidkv.bench.metrics import RequestTiming, SchedulerProbe, StepCounters, plan_blocks
from vllm_bidkv.bench.presets import BenchPreset
from vllm_bidkv.bench.workloads import Workload
from vllm_bidkv.patches.standalone import build_scheduler, make_request, model_output

# Connector methods the Scheduler calls; timed when the connector defines them.
_CONNECTOR_CALLS = (
    "get_num_new_matched_tokens",
    "update_state_after_alloc",
    "build_connector_meta",
    "update_connector_output",
    "request_finished",
    "request_finished_all_groups",
    "update_state_after_free",
    "has_pending_block_frees",
    "on_new_request",
    "get_kv_connector_stats",
)


@dataclass
class SimResult:
    timings: list[RequestTiming]
    counters: StepCounters
    block_bytes: int
    virtual_s: float
    wall_s: float
    scheduler_s: float
    """Wall time inside schedule() + update_from_output()."""
    connector_s: float
    """Wall time inside connector methods and the victim hook (part of scheduler_s)."""
    load_s: float
    """Virtual time steps waited for loads (critical path)."""
    store_s: float
    """Virtual time the store stream was busy (overlapped)."""
    max_running: int
    mean_running: float
    """Running requests averaged over the time steps took (idle gaps excluded)."""
    busy_scheduler_s: float
    busy_connector_s: float
    """The two above restricted to steps with at least ``busy_threshold`` running requests."""
    free_blocks_at_end: int
    """Free GPU blocks after the run: all of them unless something still holds a block."""
    num_gpu_blocks: int


class _ConnectorTimer:
    """Wall time inside the connector's scheduler-side calls (outermost call only)."""

    def __init__(self, connector: Any) -> None:
        self.total = 0.0
        self._depth = 0
        for name in _CONNECTOR_CALLS:
            method = getattr(connector, name, None)
            if callable(method):
                setattr(connector, name, self.wrap(method))

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.total += time.perf_counter() - start

        return timed


def sim_model_dir(max_model_len: int) -> str:
    """The tiny model whose config the Scheduler loads; its position limit must cover max_model_len."""
    from vllm_bidkv.tiny_model import tiny_model_dir

    if max_model_len <= 4096:
        return str(tiny_model_dir())
    return str(tiny_model_dir(max_position_embeddings=16384))


def simulate(
    workload: Workload,
    config: RunConfig,
    preset: BenchPreset,
    cost: CostModel,
    *,
    admission: str = "fcfs",
    busy_threshold: int = 0,
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    kv_transfer = config.kv_transfer_config(admission, preset.cpu_bytes)
    if kv_transfer is not None:
        from vllm_bidkv import patches

        patches.apply()
    scheduler = build_scheduler(
        sim_model_dir(preset.max_model_len),
        num_gpu_blocks=preset.unbounded_blocks if config.unbounded else preset.num_gpu_blocks,
        block_size=preset.block_size,
        num_kv_heads=cost.num_kv_heads,
        head_size=cost.head_size,
        num_layers=cost.num_layers,
        max_num_seqs=preset.max_num_seqs,
        max_num_batched_tokens=preset.max_num_batched_tokens,
        max_model_len=preset.max_model_len,
        kv_transfer_config=kv_transfer,
        log_stats=True,
    )
    return _Simulator(scheduler, workload, cost, preset.block_size, busy_threshold, progress).run()


class _Simulator:
    def __init__(
        self,
        scheduler: Any,
        workload: Workload,
        cost: CostModel,
        block_size: int,
        busy_threshold: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.scheduler = scheduler
        self.workload = workload
        self.cost = cost
        self.block_size = block_size
        self.block_bytes = block_size * cost.kv_bytes_per_token
        self.busy_threshold = busy_threshold
        self.progress = progress
        self.probe = SchedulerProbe(scheduler)
        self.connector = scheduler.connector
        self.timer = _ConnectorTimer(self.connector) if self.connector is not None else None
        self.requests: dict[str, Any] = {}
        self.timings: dict[str, RequestTiming] = {}
        self.clock = 0.0
        self.store_free_at = 0.0  # when the store stream has drained
        self.inflight_stores: list[tuple[float, list[int]]] = []  # (finish time, job ids), FIFO
        self.load_s = self.store_s = 0.0
        self.load_errors: set[int] = set()  # GPU blocks of loads whose CPU data was gone

    def run(self) -> SimResult:
        from vllm_bidkv.patches import hooks

        restore_hook = None
        if self.timer is not None:
            restore_hook = hooks._reorder_for_victim
            hooks._reorder_for_victim = self.timer.wrap(restore_hook)
        try:
            return self._loop()
        finally:
            if restore_hook is not None:
                hooks._reorder_for_victim = restore_hook

    def _add_arrivals(self, upto: int) -> int:
        reqs = self.workload.requests
        vocab = self.scheduler.vllm_config.model_config.get_vocab_size()
        while upto < len(reqs) and reqs[upto].arrival_s <= self.clock:
            spec = reqs[upto]
            req_id = self.workload.request_id(upto)
            request = make_request(
                req_id,
                self.workload.prompt_token_ids(upto, vocab),
                spec.output_len,
                block_size=self.block_size,
                arrival_time=spec.arrival_s,
            )
            self.requests[req_id] = request
            self.timings[req_id] = RequestTiming(spec.arrival_s, expected_output_tokens=spec.output_len)
            self.scheduler.add_request(request)
            upto += 1
        return upto

    def _loop(self) -> SimResult:
        reqs = self.workload.requests
        next_arrival = 0
        finished = 0
        sched_s = busy_sched_s = busy_conn_s = 0.0
        max_running = 0
        running_s = busy_s = 0.0  # sum of running × step time, sum of step time
        wall_start = time.perf_counter()
        while finished < len(reqs):
            next_arrival = self._add_arrivals(next_arrival)
            if not self.scheduler.has_requests():
                if next_arrival == len(reqs):
                    raise RuntimeError(
                        f"simulator: {len(reqs) - finished} requests vanished without finishing"
                    )
                self.clock = max(self.clock, reqs[next_arrival].arrival_s)
                continue
            conn_before = self.timer.total if self.timer else 0.0
            t0 = time.perf_counter()
            out = self.scheduler.schedule()
            t_schedule = time.perf_counter() - t0
            running = len(self.scheduler.running)
            max_running = max(max_running, running)

            step_end, done = self._execute(out, next_arrival)
            if out.total_num_scheduled_tokens:
                running_s += running * (step_end - self.clock)
                busy_s += step_end - self.clock
            self.clock = step_end
            kwargs = {}
            if done or self.load_errors:
                kwargs["kv_connector_output"] = _worker_output(done, self.load_errors)
                self.load_errors = set()
            model_out = model_output(out, self.requests, **kwargs)
            t1 = time.perf_counter()
            result = self.scheduler.update_from_output(out, model_out)
            t_step = t_schedule + time.perf_counter() - t1
            sched_s += t_step
            if running >= self.busy_threshold:
                busy_sched_s += t_step
                busy_conn_s += (self.timer.total if self.timer else 0.0) - conn_before
            finished += self._record(result)
            if self.progress is not None:
                self.progress(finished)
        # Drain the store stream so every job is reported (the connector releases its pins).
        if self.inflight_stores:
            self.clock = max(self.clock, self.inflight_stores[-1][0])
            out = self.scheduler.schedule()
            stores = _worker_output(self._finished_stores(self.clock), set())
            self.scheduler.update_from_output(
                out, model_output(out, self.requests, kv_connector_output=stores)
            )
        pool = self.scheduler.kv_cache_manager.block_pool
        return SimResult(
            timings=[self.timings[self.workload.request_id(i)] for i in range(len(reqs))],
            counters=self.probe.counters,
            block_bytes=self.block_bytes,
            virtual_s=self.clock,
            wall_s=time.perf_counter() - wall_start,
            scheduler_s=sched_s,
            connector_s=self.timer.total if self.timer else 0.0,
            load_s=self.load_s,
            store_s=self.store_s,
            max_running=max_running,
            mean_running=running_s / busy_s if busy_s else 0.0,
            busy_scheduler_s=busy_sched_s,
            busy_connector_s=busy_conn_s,
            free_blocks_at_end=pool.get_num_free_blocks(),
            num_gpu_blocks=pool.num_gpu_blocks - 1,  # minus vLLM's null block
        )

    def _execute(self, out: Any, next_arrival: int) -> tuple[float, dict[int, int]]:
        """The step's end on the virtual clock and the jobs finished by then."""
        chunks = []
        for new in out.scheduled_new_reqs:
            chunks.append((new.num_computed_tokens, out.num_scheduled_tokens[new.req_id]))
        cached = out.scheduled_cached_reqs
        for req_id, start in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
            chunks.append((start, out.num_scheduled_tokens[req_id]))
        load_blocks, rescue_blocks, store_blocks = plan_blocks(out)
        plan = getattr(out.kv_connector_metadata, "plan", None)
        duplex = self.store_free_at > self.clock
        # Rescues and loads both finish before the forward starts: both are on its critical path.
        load = self.cost.copy_s(rescue_blocks * self.block_bytes, to_device=False, duplex=duplex)
        load += self.cost.copy_s(load_blocks * self.block_bytes, to_device=True, duplex=duplex)
        forward = self.cost.forward_s(chunks)
        self.load_s += load
        if load + forward == 0 and not out.preempted_req_ids:
            # Nothing ran and nothing changed (e.g. blocks pinned by in-flight stores): next event.
            # A step that only preempted takes no time: the engine goes straight to the next one.
            events = [t for t, _ in self.inflight_stores[:1]]
            if next_arrival < len(self.workload.requests):
                events.append(self.workload.requests[next_arrival].arrival_s)
            if not events:
                raise RuntimeError(
                    f"simulator stalled at t={self.clock:.3f}s: nothing schedulable, no arrival, "
                    f"no copy in flight ({len(self.scheduler.running)} running, "
                    f"{len(self.scheduler.waiting)} waiting)"
                )
            step_end = max(self.clock, min(events))
        else:
            step_end = self.clock + load + forward
        done: dict[int, int] = {}
        if plan is not None:
            for job in plan.pre_forward_stores:
                done[job.job_id] = 1
            for job in plan.pre_forward_loads:
                done[job.job_id] = 1
                self.load_errors.update(job.unavailable_gpu_block_ids)
            if plan.post_forward_stores:
                store = self.cost.copy_s(store_blocks * self.block_bytes, to_device=False, duplex=False)
                self.store_s += store
                self.store_free_at = max(self.store_free_at, step_end) + store
                self.inflight_stores.append(
                    (self.store_free_at, [job.job_id for job in plan.post_forward_stores])
                )
        done.update(self._finished_stores(step_end))
        return step_end, done

    def _finished_stores(self, now: float) -> dict[int, int]:
        done = {}
        while self.inflight_stores and self.inflight_stores[0][0] <= now:
            for job_id in self.inflight_stores.pop(0)[1]:
                done[job_id] = 1
        return done

    def _record(self, result: Any) -> int:
        finished = 0
        for outputs in (result or {}).values():
            for o in outputs.outputs:
                timing = self.timings[o.request_id]
                if o.new_token_ids:
                    if timing.first_token_s is None:
                        timing.first_token_s = self.clock
                    timing.num_output_tokens += len(o.new_token_ids)
                if o.finish_reason is not None:
                    timing.finish_s = self.clock
                    self.requests.pop(o.request_id, None)
                    finished += 1
        return finished


def _worker_output(done: dict[int, int], load_errors: set[int]) -> Any:
    """What BidKVConnector's worker side reports: finished jobs (one worker), blocks that failed to load."""
    from vllm.v1.outputs import KVConnectorOutput

    from vllm_bidkv.connectors.bidkv_connector import BidKVWorkerMetadata
    from vllm_bidkv.offload import JobResults

    return KVConnectorOutput(
        kv_connector_worker_meta=BidKVWorkerMetadata(JobResults(done=done)), invalid_block_ids=load_errors
    )

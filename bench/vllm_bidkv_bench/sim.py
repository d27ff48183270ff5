"""The scheduler simulator: vLLM's real Scheduler, a cost model in place of the GPU.

Each step follows the engine core's order (``EngineCore.step``): arrivals due by the
virtual clock are added, ``schedule()`` runs (real Scheduler, KVCacheManager, BlockPool
and — when configured — a KV connector's scheduler side: BidKVConnector with its
patches, or one of vLLM's own offloading connectors), the step is "executed" by the
cost model, and ``update_from_output()`` gets one sampled token for every request whose
prefill completes. The step takes

    pre-forward copy wait (on the critical path) + forward time

and the simulator plays the connector's **worker**: a worker model per connector
(``_BidKVWorker``, ``_OffloadingWorker``, ``_SimpleOffloadWorker``) reads the step's
connector metadata exactly as that connector's real worker does, runs its copies on a
load and a store stream at the cost model's host↔device rates (a copy that overlaps the
other direction gets the duplex share of the link), and reports each completion back
through ``KVConnectorOutput`` in the form that connector's scheduler side expects:

* BidKV (``connectors/worker.py``): jobs in ``kv_connector_worker_meta``
  (``BidKVWorkerMetadata``), reported in issue order; rescues and synchronous loads run
  before the forward (critical path), stores after it on the store stream. Asynchronous
  loads (a hit of ``async_load_min_tokens`` or more: the request waits in
  ``WAITING_FOR_REMOTE_KVS``) run on the load stream, from the end of the forward (vLLM
  calls ``start_load_kv`` after launching it when the step has no synchronous load) or,
  in a step with synchronous loads, from its start; they never delay it, and their
  requests are reported in ``finished_recving``.
* OffloadingConnector (``offloading/worker.py``): loads are asynchronous (the request
  waits in ``WAITING_FOR_REMOTE_KVS``) and reported as ``finished_recving`` plus
  ``OffloadingWorkerMetadata.completed_jobs``; a step's stores are deferred to the start of
  the next step (``prepare_store_kv``); ``jobs_to_flush`` (preempted requests' and
  reallocated blocks' stores) are submitted and waited for before the forward
  (``handle_preemptions``).
* SimpleCPUOffloadConnector (``simple_kv_offload/worker.py``): one load and one store event
  per step; loads start before the forward and are reported as ``finished_recving``;
  stores start after the forward and are reported as
  ``SimpleCPUOffloadWorkerMetadata.completed_store_events``; ``need_flush`` (a preemption)
  waits for every copy in flight before the forward.

Output tokens are deterministic per request (``sim_token``), so closed-loop workloads
(``chat``, ``agentic``) can feed a turn's actual output into the next turn's prompt.

Also measured (wall clock of this process): the time of ``schedule()`` +
``update_from_output()`` and the time spent inside the connector's scheduler-side
methods and the victim hook, for the connector-cost target.
"""

from __future__ import annotations

import heapq
import math
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from vllm_bidkv_bench.configs import RunConfig
from vllm_bidkv_bench.costmodel import CostModel
from vllm_bidkv_bench.metrics import ConnectorTimer, RequestTiming, SchedulerProbe, StepCounters
from vllm_bidkv_bench.presets import BenchPreset
from vllm_bidkv_bench.standalone import build_scheduler, make_request, model_output
from vllm_bidkv_bench.workloads import FIRST_TOKEN_ID, Workload


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
    """Virtual time steps waited for copies before their forward (critical path)."""
    store_s: float
    """Virtual time the store stream was busy (overlapped)."""
    async_load_s: float
    """Virtual time the load stream was busy (overlapped): asynchronous loads, which are
    every load of a peer and BidKV's loads of ``async_load_min_tokens`` or more."""
    max_running: int
    mean_running: float
    """Running requests averaged over the time steps took (idle gaps excluded)."""
    busy_scheduler_s: float
    busy_connector_s: float
    """The two above restricted to steps with at least ``busy_threshold`` running requests."""
    free_blocks_at_end: int
    """Free GPU blocks after the run: all of them unless something still holds a block."""
    num_gpu_blocks: int
    cpu_bytes: int = 0
    """The CPU tier the connector was given (0: none)."""
    played: Workload | None = None
    """The workload as played (closed loop: with every turn the run generated)."""
    peer_counters: dict[str, float] = field(default_factory=dict)
    """A peer connector's own counters (its stats, summed over the run) and its jobs as the
    worker model ran them: ``peer_store_jobs``, ``peer_stored_blocks``, ``peer_load_jobs``,
    ``peer_loaded_blocks``."""


def sim_model_dir(max_model_len: int) -> str:
    """The tiny model whose config the Scheduler loads; its position limit must cover max_model_len."""
    from vllm_bidkv_bench.tiny_model import tiny_model_dir

    if max_model_len <= 4096:
        return str(tiny_model_dir())
    return str(tiny_model_dir(max_position_embeddings=16384))


def sim_token(request_id: str, index: int, vocab_size: int) -> int:
    """The simulator's output token ``index`` of a request: deterministic, spread over the vocabulary."""
    x = (zlib.crc32(request_id.encode()) << 24) ^ index
    x = (x * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    return FIRST_TOKEN_ID + x % (vocab_size - FIRST_TOKEN_ID)


def ideal_cpu_bytes(workload: Workload, preset: BenchPreset, block_bytes: int) -> int:
    """A tier that holds every block any request of the run can produce: it never evicts."""
    blocks_per_request = -(-preset.max_model_len // preset.block_size)
    return (workload.total_requests * blocks_per_request + preset.num_gpu_blocks) * block_bytes


def free_copies(cost: CostModel) -> CostModel:
    """The same model with host↔device copies that take no time (``ideal-tier``)."""
    return replace(cost, h2d_bytes_per_s=math.inf, d2h_bytes_per_s=math.inf, duplex_bytes_per_s=math.inf)


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
    if config.env:
        raise ValueError(
            f"config {config.name!r} sets the engine's environment (a test hook): real engine only"
        )
    workload = workload.replay()  # closed-loop workloads grow while they run: start from turn 1
    block_bytes = preset.block_size * cost.kv_bytes_per_token
    cpu_bytes = preset.cpu_bytes
    if config.ideal:
        cpu_bytes = ideal_cpu_bytes(workload, preset, block_bytes)
        cost = free_copies(cost)
    kv_transfer = config.kv_transfer_config(admission, cpu_bytes)
    if kv_transfer is not None and not config.is_peer:
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
    worker: _Worker
    if config.connector == "offloading":
        worker = _OffloadingWorker(cost, block_bytes)
    elif config.connector == "simple-offload":
        worker = _SimpleOffloadWorker(cost, block_bytes)
    else:
        worker = _BidKVWorker(cost, block_bytes)
    sim = _Simulator(scheduler, workload, cost, worker, preset.block_size, busy_threshold, progress)
    result = sim.run()
    result.played = workload
    result.cpu_bytes = (
        cpu_bytes if kv_transfer is not None and (config.offload_mode != "off" or config.is_peer) else 0
    )
    if config.is_peer:
        result.peer_counters = {**sim.probe.connector_stats(type(scheduler.connector)), **worker.counters()}
    return result


# -- worker models ------------------------------------------------------------------
class _Streams:
    """A load (host→device) and a store (device→host) copy stream on one link."""

    def __init__(self, cost: CostModel, block_bytes: int) -> None:
        self.cost = cost
        self.block_bytes = block_bytes
        self.load_free_at = 0.0
        self.store_free_at = 0.0
        self.load_s = 0.0  # seconds each stream was busy
        self.store_s = 0.0

    def load(self, blocks: int, at: float) -> float:
        """Submit a load of ``blocks`` at ``at``; its finish time."""
        start = max(at, self.load_free_at)
        secs = self.cost.copy_s(blocks * self.block_bytes, to_device=True, duplex=self.store_free_at > start)
        self.load_s += secs
        self.load_free_at = start + secs
        return self.load_free_at

    def store(self, blocks: int, at: float) -> float:
        start = max(at, self.store_free_at)
        secs = self.cost.copy_s(blocks * self.block_bytes, to_device=False, duplex=self.load_free_at > start)
        self.store_s += secs
        self.store_free_at = start + secs
        return self.store_free_at


class _Worker:
    """What a connector's worker does with a step's metadata, on the virtual clock."""

    def __init__(self, cost: CostModel, block_bytes: int) -> None:
        self.streams = _Streams(cost, block_bytes)
        self.block_bytes = block_bytes
        self.load_s = 0.0  # critical-path wait before forwards

    @property
    def store_s(self) -> float:
        return self.streams.store_s

    @property
    def async_load_s(self) -> float:
        return self.streams.load_s

    def before_forward(self, out: Any, now: float) -> float:
        """Copies and waits before the forward; returns the seconds the forward waits."""
        raise NotImplementedError

    def after_forward(self, out: Any, step_end: float) -> None:
        raise NotImplementedError

    def report(self, now: float) -> Any:
        """The step's ``KVConnectorOutput`` (completions by ``now``), or None."""
        raise NotImplementedError

    def next_event(self) -> float | None:
        """When the next copy in flight finishes (None: nothing in flight)."""
        raise NotImplementedError

    def busy(self) -> bool:
        return self.next_event() is not None

    def counters(self) -> dict[str, float]:
        return {}


def _num_blocks(jobs: Any) -> int:
    return sum(len(job.gpu_block_ids) for job in jobs)


class _BidKVWorker(_Worker):
    """BidKVConnector's ``CopyWorker`` (``connectors/worker.py``) on the virtual clock."""

    def __init__(self, cost: CostModel, block_bytes: int) -> None:
        super().__init__(cost, block_bytes)
        # Copies issued and not reported: (finish, job ids, an asynchronous load's request).
        # In issue order, as CopyWorker.poll reports them: a copy done early waits for those
        # issued before it.
        self.issued: deque[tuple[float, list[int], str | None]] = deque()
        self.load_errors: set[int] = set()  # GPU blocks of loads whose CPU data was gone

    @staticmethod
    def _loads_after_forward(out: Any) -> bool:
        # vLLM 0.32+ calls start_load_kv after launching the forward when the step has no
        # synchronous load (earlier releases: always before it).
        return not getattr(out, "has_sync_kv_loads", True)

    def before_forward(self, out: Any, now: float) -> float:
        plan = out.kv_connector_metadata.plan
        cost, bb = self.streams.cost, self.block_bytes
        duplex = self.streams.store_free_at > now
        # Rescues and synchronous loads run on the compute stream before the forward: its
        # critical path.
        wait = cost.copy_s(_num_blocks(plan.rescues) * bb, to_device=False, duplex=duplex)
        sync_loads = [job for job in plan.loads if not job.asynchronous]
        wait += cost.copy_s(_num_blocks(sync_loads) * bb, to_device=True, duplex=duplex)
        self.load_s += wait
        if plan.rescues:
            self.issued.append((now + wait, [job.job_id for job in plan.rescues], None))
        if not self._loads_after_forward(out):
            self._start_loads(plan, now + wait)
        return wait

    def _start_loads(self, plan: Any, at: float) -> None:
        """``start_load_kv`` at ``at``: a synchronous load is done by then (``before_forward``
        waited for it); an asynchronous one starts on the load stream."""
        for job in plan.loads:
            self.load_errors.update(job.unavailable_gpu_block_ids)
            finish = self.streams.load(len(job.gpu_block_ids), at) if job.asynchronous else at
            self.issued.append((finish, [job.job_id], job.request_id if job.asynchronous else None))

    def after_forward(self, out: Any, step_end: float) -> None:
        plan = out.kv_connector_metadata.plan
        if self._loads_after_forward(out):
            # The load stream waits for the forward enqueued before it on the compute stream.
            self._start_loads(plan, step_end)
        if plan.stores:
            finish = self.streams.store(_num_blocks(plan.stores), step_end)
            self.issued.append((finish, [job.job_id for job in plan.stores], None))

    def report(self, now: float) -> Any:
        done: dict[int, int] = {}
        recving: set[str] = set()
        while self.issued and self.issued[0][0] <= now:
            _, job_ids, request_id = self.issued.popleft()
            done.update(dict.fromkeys(job_ids, 1))
            if request_id is not None:
                recving.add(request_id)
        if not done and not self.load_errors:
            return None
        from vllm.v1.outputs import KVConnectorOutput

        from vllm_bidkv.connectors.metadata import BidKVWorkerMetadata
        from vllm_bidkv.offload import JobResults

        output = KVConnectorOutput(
            finished_recving=recving or None,
            kv_connector_worker_meta=BidKVWorkerMetadata(JobResults(done=done)),
            invalid_block_ids=self.load_errors,
        )
        self.load_errors = set()
        return output

    def next_event(self) -> float | None:
        return self.issued[0][0] if self.issued else None


@dataclass
class _Copy:
    finish: float
    blocks: int
    secs: float
    is_load: bool
    req_ids: tuple[str, ...] = ()


class _PeerWorker(_Worker):
    """Shared by the two vLLM peers: copies in flight on two streams, counted per job."""

    def __init__(self, cost: CostModel, block_bytes: int) -> None:
        super().__init__(cost, block_bytes)
        self.inflight: dict[int, _Copy] = {}
        self.jobs = {
            "peer_store_jobs": 0,
            "peer_stored_blocks": 0,
            "peer_load_jobs": 0,
            "peer_loaded_blocks": 0,
        }

    def _submit(
        self, key: int, blocks: int, at: float, *, is_load: bool, req_ids: tuple[str, ...] = ()
    ) -> None:
        start = max(at, self.streams.load_free_at if is_load else self.streams.store_free_at)
        finish = self.streams.load(blocks, at) if is_load else self.streams.store(blocks, at)
        self.inflight[key] = _Copy(finish, blocks, finish - start, is_load, req_ids)
        kind = "load" if is_load else "store"
        self.jobs[f"peer_{kind}_jobs"] += 1
        self.jobs[f"peer_{'loaded' if is_load else 'stored'}_blocks"] += blocks

    def _wait(self, keys: Any, now: float) -> float:
        finish = max((self.inflight[k].finish for k in keys if k in self.inflight), default=now)
        wait = max(0.0, finish - now)
        self.load_s += wait
        return wait

    def _completed(self, now: float) -> list[tuple[int, _Copy]]:
        done = [(k, c) for k, c in self.inflight.items() if c.finish <= now]
        for k, _ in done:
            del self.inflight[k]
        return done

    def next_event(self) -> float | None:
        return min((c.finish for c in self.inflight.values()), default=None)

    def counters(self) -> dict[str, float]:
        return dict(self.jobs)


class _OffloadingWorker(_PeerWorker):
    """vLLM's OffloadingConnectorWorker (``offloading/worker.py``) on the virtual clock."""

    def __init__(self, cost: CostModel, block_bytes: int) -> None:
        super().__init__(cost, block_bytes)
        self.unsubmitted: list[tuple[int, int]] = []  # deferred stores: (job id, blocks)
        self._flushed: set[int] = set()

    def before_forward(self, out: Any, now: float) -> float:
        meta = out.kv_connector_metadata
        flush = set(meta.jobs_to_flush or ())
        # handle_preemptions: flushed stores of this step are submitted now, with the deferred ones.
        for job_id in sorted(flush & meta.store_jobs.keys()):
            self.unsubmitted.append((job_id, len(meta.store_jobs[job_id].src_spec.block_ids)))
        for job_id, blocks in self.unsubmitted:
            self._submit(job_id, blocks, now, is_load=False)
        self.unsubmitted = []
        wait = self._wait(flush, now) if flush else 0.0
        # start_kv_transfers: loads go to their stream; the request waits for finished_recving.
        for job_id, job in meta.load_jobs.items():
            self._submit(job_id, len(job.dst_spec.block_ids), now + wait, is_load=True, req_ids=(job.req_id,))
        self._flushed = flush
        return wait

    def after_forward(self, out: Any, step_end: float) -> None:
        # prepare_store_kv: deferred to the start of the next step.
        meta = out.kv_connector_metadata
        for job_id, job in meta.store_jobs.items():
            if job_id not in self._flushed:
                self.unsubmitted.append((job_id, len(job.src_spec.block_ids)))

    def report(self, now: float) -> Any:
        done = self._completed(now)
        if not done:
            return None
        from vllm.distributed.kv_transfer.kv_connector.v1.offloading.common import OffloadingWorkerMetadata
        from vllm.v1.outputs import KVConnectorOutput

        meta = OffloadingWorkerMetadata()
        recving: set[str] = set()
        for job_id, copy in done:
            meta.mark_completed(job_id)
            stats = meta.transfer_stats.load if copy.is_load else meta.transfer_stats.store
            stats.record(copy.blocks * self.block_bytes, copy.secs)
            recving.update(copy.req_ids)
        return KVConnectorOutput(finished_recving=recving or None, kv_connector_worker_meta=meta)

    def next_event(self) -> float | None:
        if self.unsubmitted:
            return -math.inf  # submitted at the next step's start, whenever that is
        return super().next_event()


class _SimpleOffloadWorker(_PeerWorker):
    """vLLM's SimpleCPUOffloadWorker (``simple_kv_offload/worker.py``) on the virtual clock."""

    _LOAD, _STORE = 1 << 40, 0  # key offsets: load and store events have separate counters

    def before_forward(self, out: Any, now: float) -> float:
        meta = out.kv_connector_metadata
        wait = self._wait(list(self.inflight), now) if meta.need_flush else 0.0
        if meta.load_event >= 0:
            reqs = tuple(meta.load_event_to_reqs.get(meta.load_event, ()))
            self._submit(
                self._LOAD + meta.load_event,
                len(meta.load_gpu_blocks),
                now + wait,
                is_load=True,
                req_ids=reqs,
            )
        return wait

    def after_forward(self, out: Any, step_end: float) -> None:
        meta = out.kv_connector_metadata
        if meta.store_event >= 0:  # wait_for_save: after the forward
            self._submit(self._STORE + meta.store_event, len(meta.store_gpu_blocks), step_end, is_load=False)

    def report(self, now: float) -> Any:
        done = self._completed(now)
        if not done:
            return None
        from vllm.v1.outputs import KVConnectorOutput
        from vllm.v1.simple_kv_offload.metadata import SimpleCPUOffloadWorkerMetadata

        recving = {r for _, c in done if c.is_load for r in c.req_ids}
        stores = {k - self._STORE: 1 for k, c in done if not c.is_load}
        return KVConnectorOutput(
            finished_recving=recving or None,
            kv_connector_worker_meta=SimpleCPUOffloadWorkerMetadata(completed_store_events=stores)
            if stores
            else None,
        )


# -- the loop ---------------------------------------------------------------------
class _Simulator:
    def __init__(
        self,
        scheduler: Any,
        workload: Workload,
        cost: CostModel,
        worker: _Worker,
        block_size: int,
        busy_threshold: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.scheduler = scheduler
        self.workload = workload
        self.cost = cost
        self.worker = worker
        self.block_size = block_size
        self.block_bytes = block_size * cost.kv_bytes_per_token
        self.busy_threshold = busy_threshold
        self.progress = progress
        self.probe = SchedulerProbe(scheduler)
        self.connector = scheduler.connector
        self.timer = ConnectorTimer(self.connector) if self.connector is not None else None
        self.vocab = scheduler.vllm_config.model_config.get_vocab_size()
        self.requests: dict[str, Any] = {}
        self.index_of: dict[str, int] = {}
        self.timings: dict[str, RequestTiming] = {}
        self.clock = 0.0
        self.draining = False
        self.pending: list[tuple[float, int]] = [(r.arrival_s, i) for i, r in enumerate(workload.requests)]
        heapq.heapify(self.pending)

    def run(self) -> SimResult:
        from vllm_bidkv.patches import hooks

        if self.timer is None:
            return self._loop()
        hooks.add_victim_choice_observer(self.timer)
        try:
            return self._loop()
        finally:
            hooks.remove_victim_choice_observer(self.timer)

    def _next_token(self, request: Any) -> int:
        return sim_token(request.request_id, request.num_output_tokens, self.vocab)

    def _add_arrivals(self) -> None:
        while self.pending and self.pending[0][0] <= self.clock:
            _, index = heapq.heappop(self.pending)
            spec = self.workload.requests[index]
            req_id = self.workload.request_id(index)
            request = make_request(
                req_id,
                self.workload.prompt_token_ids(index, self.vocab),
                spec.output_len,
                block_size=self.block_size,
                arrival_time=spec.arrival_s,
            )
            self.requests[req_id] = request
            self.index_of[req_id] = index
            self.timings[req_id] = RequestTiming(spec.arrival_s, expected_output_tokens=spec.output_len)
            self.scheduler.add_request(request)

    def _step(self) -> tuple[Any, Any, float, float, int]:
        """One engine step: (scheduler output, update result, wall s of the two calls, step end, running)."""
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        t_schedule = time.perf_counter() - t0
        running = len(self.scheduler.running)
        step_end = self._execute(out)
        kv_out = self.worker.report(step_end)
        kwargs = {"kv_connector_output": kv_out} if kv_out is not None else {}
        model_out = model_output(out, self.requests, next_token=self._next_token, **kwargs)
        t1 = time.perf_counter()
        result = self.scheduler.update_from_output(out, model_out)
        return out, result, t_schedule + time.perf_counter() - t1, step_end, running

    def _loop(self) -> SimResult:
        total = self.workload.total_requests
        finished = 0
        sched_s = busy_sched_s = busy_conn_s = 0.0
        max_running = 0
        running_s = busy_s = 0.0  # sum of running × step time, sum of step time
        wall_start = time.perf_counter()
        while finished < total:
            self._add_arrivals()
            if not self.scheduler.has_requests():
                if not self.pending:
                    raise RuntimeError(f"simulator: {total - finished} requests vanished without finishing")
                self.clock = max(self.clock, self.pending[0][0])
                continue
            conn_before = self.timer.total if self.timer else 0.0
            start = self.clock
            out, result, t_step, step_end, running = self._step()
            max_running = max(max_running, running)
            if out.total_num_scheduled_tokens:
                running_s += running * (step_end - start)
                busy_s += step_end - start
            self.clock = step_end
            sched_s += t_step
            if running >= self.busy_threshold:
                busy_sched_s += t_step
                busy_conn_s += (self.timer.total if self.timer else 0.0) - conn_before
            finished += self._record(result)
            if self.progress is not None:
                self.progress(finished)
        # Drain the copies in flight so every job is reported (connectors release their pins).
        # The engine keeps stepping while the connector has push work (has_requests() says so).
        self.draining = True
        for _ in range(10_000):
            if not self.worker.busy() and not self.scheduler.has_requests():
                break
            self.clock = self._step()[3]
        pool = self.scheduler.kv_cache_manager.block_pool
        reqs = self.workload.requests
        return SimResult(
            timings=[self.timings[self.workload.request_id(i)] for i in range(len(reqs))],
            counters=self.probe.counters,
            block_bytes=self.block_bytes,
            virtual_s=self.clock,
            wall_s=time.perf_counter() - wall_start,
            scheduler_s=sched_s,
            connector_s=self.timer.total if self.timer else 0.0,
            load_s=self.worker.load_s,
            store_s=self.worker.store_s,
            async_load_s=self.worker.async_load_s,
            max_running=max_running,
            mean_running=running_s / busy_s if busy_s else 0.0,
            busy_scheduler_s=busy_sched_s,
            busy_connector_s=busy_conn_s,
            free_blocks_at_end=pool.get_num_free_blocks(),
            num_gpu_blocks=pool.num_gpu_blocks - 1,  # minus vLLM's null block
        )

    def _execute(self, out: Any) -> float:
        """The step's end on the virtual clock."""
        chunks = []
        for new in out.scheduled_new_reqs:
            chunks.append((new.num_computed_tokens, out.num_scheduled_tokens[new.req_id]))
        cached = out.scheduled_cached_reqs
        for req_id, start in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
            chunks.append((start, out.num_scheduled_tokens[req_id]))
        has_meta = out.kv_connector_metadata is not None
        wait = self.worker.before_forward(out, self.clock) if has_meta else 0.0
        forward = self.cost.forward_s(chunks)
        step_end = self.clock + wait + forward
        if has_meta:  # before the jump below: copies issued after an empty forward start now
            self.worker.after_forward(out, step_end)
        if wait + forward == 0 and not out.preempted_req_ids:
            # Nothing ran and nothing changed (e.g. blocks pinned by copies in flight, a request
            # waiting for its load): next event. A step that only preempted takes no time.
            events = [t for t in (self.worker.next_event(),) if t is not None]
            if self.pending:
                events.append(self.pending[0][0])
            if not events and self.draining:
                events.append(self.clock)
            if not events:
                raise RuntimeError(
                    f"simulator stalled at t={self.clock:.3f}s: nothing schedulable, no arrival, "
                    f"no copy in flight ({len(self.scheduler.running)} running, "
                    f"{len(self.scheduler.waiting)} waiting)"
                )
            step_end = max(self.clock, min(events))
        return step_end

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
                    request = self.requests.pop(o.request_id, None)
                    finished += 1
                    if request is not None and self.workload.sessions is not None:
                        index = self.workload.on_finish(
                            self.index_of[o.request_id],
                            list(request.prompt_token_ids),
                            list(request.output_token_ids),
                            self.clock,
                        )
                        if index is not None:
                            heapq.heappush(self.pending, (self.workload.requests[index].arrival_s, index))
        return finished

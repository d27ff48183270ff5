"""The scheduler simulator: vLLM's real Scheduler, a cost model in place of the GPU.

The engine core's loop is played on a virtual clock: arrivals due are added, ``schedule()``
runs (real Scheduler, KVCacheManager, BlockPool and — when configured — a KV connector's
scheduler side: BidKVConnector with its patches, or one of vLLM's own offloading
connectors), the step is launched on a virtual GPU priced by the cost model, and
``update_from_output()`` gets one sampled token for every request whose prefill completes,
once the step's forward is done. Without async scheduling (``EngineCore.step``) the host
waits for each step's output before it schedules the next. With it (``async_scheduling``:
vLLM's ``AsyncScheduler`` and ``EngineCore.step_with_batch_queue``, 0.32's default on GPUs)
step N+1 is scheduled and launched before step N's output is processed, and the forwards
run back to back.

A step is timed as vLLM 0.32's model runner runs it (``gpu_model_runner.execute_model``,
``kv_connector_model_runner_mixin._get_kv_connector_output``):

1. ``handle_preemptions`` runs on the host before the forward; a wait there (a peer's
   flush) blocks the host, and so the forward's launch;
2. copies on the compute stream (BidKV's rescues and synchronous loads) run after the
   previous step's forward and before this one: its critical path;
3. the forward;
4. copies issued after the forward launch (``start_load_kv`` when the step has no
   synchronous load, ``wait_for_save``) that wait for the compute stream start when the
   forward ends;
5. ``get_finished`` runs right after the forward's *launch*, so a step reports only copies
   that completed before it was launched: a copy is seen at the earliest by the first step
   launched after it finished, and the scheduler hears of it with that step's output.

Every copy, of every connector, goes through one link (``_Streams``): a load (host→device)
and a store (device→host) direction, each serving its copies in order; a copy moves its bytes
at the duplex share of the link while the other direction moves bytes and at the one-way rate
otherwise; each copy operation (one submission) also pays the cost model's ``copy_overhead_s``.
The worker models (``_BidKVWorker``, ``_OffloadingWorker``, ``_SimpleOffloadWorker``) read
the step's connector metadata as that connector's real worker does, and report completions through
``KVConnectorOutput`` in the form its scheduler side expects:

* BidKV (``connectors/worker.py``): rescues (``bind_connector_metadata``) and synchronous
  loads (``start_load_kv``, before the forward in a step that has one) on the compute
  stream; asynchronous loads (a hit of ``async_load_min_tokens`` or more, every hit under
  async scheduling: the request waits in ``WAITING_FOR_REMOTE_KVS``) on the load stream,
  from the forward's end or, in a step with synchronous loads, from theirs; stores
  (``wait_for_save``) from the forward's end. One copy operation for the step's rescues,
  one per load job, one for the step's stores; reported in issue order as jobs in
  ``kv_connector_worker_meta`` (``BidKVWorkerMetadata``), asynchronous loads also in
  ``finished_recving``.
* OffloadingConnector (``offloading/worker.py``, ``kv_offload/cpu/gpu_worker.py``): every
  transfer's stream first waits for the compute stream. Loads are submitted in
  ``start_load_kv`` after the forward launch, so they start when it ends (the request waits
  in ``WAITING_FOR_REMOTE_KVS``); a step's stores are deferred to the next step's
  ``handle_preemptions`` (``prepare_store_kv``), which submits them with ``jobs_to_flush``
  (preempted requests' and reallocated blocks' stores) and waits for the latter. One copy
  operation per job; reported in order per direction as ``finished_recving`` plus
  ``OffloadingWorkerMetadata.completed_jobs``.
* SimpleCPUOffloadConnector (``simple_kv_offload/worker.py``, ``copy_backend.py``): one load
  and one store per step; ``need_flush`` (a preemption) waits on the host for every copy in
  flight (``handle_preemptions``); the load is launched after the forward launch on a stream
  that does not wait for the compute stream, the store after a compute-done event. Reported
  as ``finished_recving`` and ``SimpleCPUOffloadWorkerMetadata.completed_store_events``.

Output tokens are deterministic per request (``sim_token``), so closed-loop workloads
(``chat``, ``agentic``) can feed a turn's actual output into the next turn's prompt.

Also measured (wall clock of this process): the time of ``schedule()`` +
``update_from_output()`` and the time spent inside the connector's scheduler-side
methods and the victim hook, for the connector-cost target.
"""

from __future__ import annotations

import collections
import heapq
import math
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any

from vllm_bidkv_bench.configs import RunConfig
from vllm_bidkv_bench.costmodel import CostModel
from vllm_bidkv_bench.metrics import ConnectorTimer, RequestTiming, SchedulerProbe, StepCounters
from vllm_bidkv_bench.presets import BenchPreset
from vllm_bidkv_bench.standalone import build_scheduler, make_request, model_output, watch_prefix_cache
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
    connector_by_call: dict[str, float]
    """``connector_s`` per outermost call (``ConnectorTimer.by_call``)."""
    load_s: float
    """Virtual time forwards waited for copies (critical path): rescues and synchronous loads
    on the compute stream, a peer's flush on the host."""
    store_s: float
    """Virtual time the link spent on stores other than rescues (overlapped)."""
    async_load_s: float
    """Virtual time the link spent on asynchronous loads (overlapped), which are every load
    of a peer and BidKV's loads of ``async_load_min_tokens`` or more."""
    max_running: int
    mean_running: float
    """Running requests averaged over the time steps took (idle gaps excluded)."""
    busy_scheduler_s: float
    busy_connector_s: float
    """The two above restricted to steps with at least ``busy_threshold`` running requests."""
    free_blocks_at_end: int
    """Free GPU blocks after the run: all of them unless something still holds a block."""
    num_gpu_blocks: int
    prefill_tokens_computed: int
    """Prefill tokens the forwards computed: prompt tokens no cache supplied, and every token
    computed again (``counters.recomputed_prefill_tokens`` is that part)."""
    cpu_bytes: int = 0
    """The CPU tier the connector was given (0: none)."""
    gpu_drops_unstored: int | None = None
    """BidKVConnector with a tier: full blocks vLLM dropped from its prefix cache (to reuse the
    block) while the tier held no copy: work a later hit on them computes again. None: not ours."""
    played: Workload | None = None
    """The workload as played (closed loop: with every turn the run generated)."""
    peer_counters: dict[str, float] = field(default_factory=dict)
    """A peer connector's own counters (its stats, summed over the run) and its jobs as the
    worker model ran them: ``peer_store_jobs``, ``peer_stored_blocks``, ``peer_load_jobs``,
    ``peer_loaded_blocks``."""


def _count_unstored_drops(scheduler: Any, block_size: int) -> Callable[[], int]:
    """Count ``SimResult.gpu_drops_unstored`` (``standalone.watch_prefix_cache``)."""
    tier_of = scheduler.connector.scheduler_role.side.planner  # its tier may be replaced (oracle)
    count = 0

    def dropped(block_hash: bytes) -> None:
        nonlocal count
        count += not tier_of.tier.contains(block_hash)

    watch_prefix_cache(scheduler, block_size, dropped=dropped)
    return lambda: count


def sim_model_dir(max_model_len: int) -> str:
    """The tiny model whose config the Scheduler loads; its position limit must cover max_model_len."""
    from vllm_bidkv_bench.tiny_model import tiny_model_dir

    if max_model_len <= 4096:
        return str(tiny_model_dir())
    return str(tiny_model_dir(max_position_embeddings=max(16384, max_model_len)))


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
    return replace(
        cost,
        h2d_bytes_per_s=math.inf,
        d2h_bytes_per_s=math.inf,
        duplex_bytes_per_s=math.inf,
        copy_overhead_s=0.0,
    )


def simulate(
    workload: Workload,
    config: RunConfig,
    preset: BenchPreset,
    cost: CostModel,
    *,
    admission: str = "fcfs",
    async_scheduling: bool = False,
    busy_threshold: int = 0,
    progress: Callable[[int], None] | None = None,
) -> SimResult:
    """``async_scheduling``: vLLM's async scheduling (``AsyncScheduler``, step N+1 scheduled
    before step N's output is processed), for any config."""
    if config.env:
        raise ValueError(
            f"config {config.name!r} sets the engine's environment (a test hook): real engine only"
        )
    workload = workload.replay()  # closed-loop workloads grow while they run: start from turn 1
    block_bytes = preset.block_size * cost.kv_bytes_per_token
    cpu_bytes = preset.cpu_bytes
    if config.ideal:
        cpu_bytes = ideal_cpu_bytes(workload, preset, block_bytes)
    if config.ideal or config.oracle:
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
        async_scheduling=async_scheduling,
    )
    worker: _Worker
    if config.connector == "offloading":
        worker = _OffloadingWorker(cost, block_bytes)
    elif config.connector == "simple-offload":
        worker = _SimpleOffloadWorker(cost, block_bytes)
    else:
        worker = _BidKVWorker(cost, block_bytes)
    sim = _Simulator(
        scheduler, workload, cost, worker, preset.block_size, busy_threshold, progress, async_scheduling
    )
    ours = kv_transfer is not None and not config.is_peer and config.offload_mode != "off"
    drops = _count_unstored_drops(scheduler, preset.block_size) if ours else None
    if config.oracle:
        from vllm_bidkv_bench.oracle import install_oracle

        vocab = sim.vocab
        sim.oracle = install_oracle(
            scheduler, workload, vocab, preset.block_size, lambda rid, i: sim_token(rid, i, vocab)
        )
    result = sim.run()
    result.gpu_drops_unstored = drops() if drops is not None else None
    result.played = workload
    result.cpu_bytes = (
        cpu_bytes if kv_transfer is not None and (config.offload_mode != "off" or config.is_peer) else 0
    )
    if config.is_peer:
        result.peer_counters = {**sim.probe.connector_stats(type(scheduler.connector)), **worker.counters()}
    return result


# -- worker models ------------------------------------------------------------------
class _Streams:
    """The host↔device link every connector's copies share: a load (host→device) and a store
    (device→host) direction, each serving its copies in submission order. A copy moves at the
    one-way rate while the other direction is idle and at the duplex share while it is busy
    (copies already placed keep their times)."""

    def __init__(self, cost: CostModel, block_bytes: int) -> None:
        self.cost = cost
        self.block_bytes = block_bytes
        self.busy: dict[bool, collections.deque[tuple[float, float]]] = {
            True: collections.deque(),
            False: collections.deque(),
        }  # per direction (to_device), when its copies move bytes: (from, until), oldest first

    def copy(self, blocks: int, ready: float, *, to_device: bool) -> tuple[float, float]:
        """One copy operation of ``blocks``, runnable from ``ready``: its (start, finish)."""
        mine, other = self.busy[to_device], self.busy[not to_device]
        start = max(ready, mine[-1][1] if mine else 0.0)
        while other and other[0][1] <= start:
            other.popleft()  # this direction's copies start later still: never overlapped again
        other_free = other[-1][1] if other else 0.0
        while len(mine) > 1 and mine[0][1] <= other_free:
            mine.popleft()  # the other direction's next copy starts after it
        left = float(blocks * self.block_bytes)
        if left <= 0:
            mine.append((start, start))  # later copies of this direction still start after it
            return start, start
        alone = self.cost.link_rate(to_device=to_device, duplex=False)
        shared = self.cost.link_rate(to_device=to_device, duplex=True)
        t = moving = start + self.cost.copy_overhead_s
        for busy_from, busy_to in other:  # in order: the bytes moved alone, then beside that copy
            for until, rate in ((busy_from, alone), (busy_to, shared)):
                if until > t and left > 0:
                    moved = min(left, (until - t) * rate)
                    t, left = t + moved / rate, left - moved
        if left > 0:
            t += left / alone
        mine.append((moving, t))
        return start, t


class _Worker:
    """What a connector's worker does with a step's metadata, on the virtual clock. A step calls
    ``launch``, ``before_forward``, ``after_forward`` and ``report``, in that order."""

    def __init__(self, cost: CostModel, block_bytes: int) -> None:
        self.streams = _Streams(cost, block_bytes)
        self.block_bytes = block_bytes
        self.load_s = 0.0  # how long forwards waited for this worker (critical path)
        self.store_s = 0.0  # link time of stores (rescues are in load_s)
        self.async_load_s = 0.0  # link time of asynchronous loads

    def launch(self, out: Any, now: float, gpu_free: float) -> float:
        """The host launches the step at ``now``, the compute stream busy until ``gpu_free``:
        waits before the forward's launch (``handle_preemptions``) and copies that start with it
        without waiting for the compute stream. Returns when the forward is launched."""
        return now

    def before_forward(self, out: Any, now: float) -> float:
        """Copies on the compute stream from ``now``; returns the seconds the forward waits."""
        return 0.0

    def after_forward(self, out: Any, step_end: float) -> None:
        """Copies issued after the forward's launch that wait for it to end at ``step_end``."""

    def report(self, now: float) -> Any:
        """``get_finished`` at ``now``: the step's ``KVConnectorOutput`` (copies done by then), or None."""
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

    def before_forward(self, out: Any, now: float) -> float:
        plan = out.kv_connector_metadata.plan
        # Rescues (bind_connector_metadata) on the compute stream; the bind's event after them
        # is what asynchronous loads wait for, wherever start_load_kv runs (0.32+: after the
        # forward's launch when no load is synchronous). Synchronous loads run on the compute
        # stream too: the forward starts after them. In plan order, as CopyWorker issues them.
        ready = now
        if plan.rescues:
            _, ready = self.streams.copy(_num_blocks(plan.rescues), ready, to_device=False)
            self.issued.append((ready, [job.job_id for job in plan.rescues], None))
        bound = ready
        for job in plan.loads:
            self.load_errors.update(job.unavailable_gpu_block_ids)
            if job.asynchronous:
                start, finish = self.streams.copy(len(job.gpu_block_ids), bound, to_device=True)
                self.async_load_s += finish - start
            else:
                _, ready = self.streams.copy(len(job.gpu_block_ids), ready, to_device=True)
                finish = ready
            self.issued.append((finish, [job.job_id], job.request_id if job.asynchronous else None))
        self.load_s += ready - now
        return ready - now

    def after_forward(self, out: Any, step_end: float) -> None:
        plan = out.kv_connector_metadata.plan
        if plan.stores:  # wait_for_save: the store stream waits for the forward
            start, finish = self.streams.copy(_num_blocks(plan.stores), step_end, to_device=False)
            self.store_s += finish - start
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
    """Shared by the two vLLM peers: copies in flight, one copy operation each, counted per job."""

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
        self, key: int, blocks: int, ready: float, *, is_load: bool, req_ids: tuple[str, ...] = ()
    ) -> None:
        start, finish = self.streams.copy(blocks, ready, to_device=is_load)
        if is_load:
            self.async_load_s += finish - start
        else:
            self.store_s += finish - start
        self.inflight[key] = _Copy(finish, blocks, finish - start, is_load, req_ids)
        kind = "load" if is_load else "store"
        self.jobs[f"peer_{kind}_jobs"] += 1
        self.jobs[f"peer_{'loaded' if is_load else 'stored'}_blocks"] += blocks

    def _wait(self, keys: Any, now: float, gpu_free: float) -> float:
        """The host waits at ``now`` for the copies ``keys``; returns when it goes on."""
        host = max([now, *(self.inflight[k].finish for k in keys if k in self.inflight)])
        self.load_s += max(host, gpu_free) - max(now, gpu_free)  # what the forward waited
        return host

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

    def launch(self, out: Any, now: float, gpu_free: float) -> float:
        meta = out.kv_connector_metadata
        flush = set(meta.jobs_to_flush or ())
        # handle_preemptions: this step's flushed stores join the deferred ones; each transfer's
        # stream waits for the compute stream (the forwards that wrote the blocks), then the
        # host waits for the flushed jobs.
        for job_id in sorted(flush & meta.store_jobs.keys()):
            self.unsubmitted.append((job_id, len(meta.store_jobs[job_id].src_spec.block_ids)))
        for job_id, blocks in self.unsubmitted:
            self._submit(job_id, blocks, max(now, gpu_free), is_load=False)
        self.unsubmitted = []
        self._flushed = flush
        return self._wait(flush, now, gpu_free)

    def after_forward(self, out: Any, step_end: float) -> None:
        meta = out.kv_connector_metadata
        # start_load_kv after the forward's launch: each load's stream waits for the forward.
        for job_id, job in meta.load_jobs.items():
            self._submit(job_id, len(job.dst_spec.block_ids), step_end, is_load=True, req_ids=(job.req_id,))
        # wait_for_save (prepare_store_kv): deferred to the next step's handle_preemptions.
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
            return -math.inf  # submitted at the next step's launch, whenever that is
        return super().next_event()


class _SimpleOffloadWorker(_PeerWorker):
    """vLLM's SimpleCPUOffloadWorker (``simple_kv_offload/worker.py``) on the virtual clock."""

    _LOAD, _STORE = 1 << 40, 0  # key offsets: load and store events have separate counters

    def launch(self, out: Any, now: float, gpu_free: float) -> float:
        meta = out.kv_connector_metadata
        host = self._wait(list(self.inflight), now, gpu_free) if meta.need_flush else now
        if meta.load_event >= 0:
            # start_load_kv, just after the forward's launch; the load stream does not wait for
            # the compute stream.
            reqs = tuple(meta.load_event_to_reqs.get(meta.load_event, ()))
            self._submit(
                self._LOAD + meta.load_event, len(meta.load_gpu_blocks), host, is_load=True, req_ids=reqs
            )
        return host

    def after_forward(self, out: Any, step_end: float) -> None:
        meta = out.kv_connector_metadata
        if meta.store_event >= 0:  # wait_for_save: after a compute-done event
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
@dataclass
class _Launched:
    """A step launched and not processed yet."""

    out: Any
    scheduled: dict[str, Any]
    """Per scheduled request: its progress as this schedule() left it (model_output reads it;
    under async scheduling the next schedule() advances the request first)."""
    kv_out: Any
    """get_finished's report, taken at the forward's launch."""
    start: float
    """When the step could start: its launch, or the previous forward's end if later."""
    end: float
    """When its output is ready."""
    running: int
    wall_s: float
    connector_s: float
    """Wall time in schedule() and, of that, in the connector."""

    @property
    def idle(self) -> bool:
        """Nothing ran and nothing changed: no token, no preemption, no copy reported."""
        return (
            not self.out.total_num_scheduled_tokens and not self.out.preempted_req_ids and self.kv_out is None
        )


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
        async_scheduling: bool,
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
        self.oracle: Any = None  # the ``oracle`` config's tier: told of every arrival
        self.requests: dict[str, Any] = {}
        self.index_of: dict[str, int] = {}
        self.timings: dict[str, RequestTiming] = {}
        self.clock = 0.0  # the host's
        self.gpu_free = 0.0  # when the compute stream finishes what was launched
        # The engine core's batch queue: steps launched, not processed yet; async scheduling
        # keeps two (vLLM's max_concurrent_batches), else each step is processed at once.
        self.depth = 2 if async_scheduling else 1
        self.queue: deque[_Launched] = deque()
        self.draining = False
        self.pending: list[tuple[float, int]] = [(r.arrival_s, i) for i, r in enumerate(workload.requests)]
        heapq.heapify(self.pending)
        self.high_water: dict[str, int] = {}  # per request: the highest position computed, + 1
        self.prefill_tokens = 0
        self.finished = 0
        self.sched_s = self.busy_sched_s = self.busy_conn_s = 0.0
        self.max_running = 0
        self.running_s = self.busy_s = 0.0  # sum of running × step time, sum of step time

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

    def _connector_total(self) -> float:
        return self.timer.total if self.timer else 0.0

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
            if self.oracle is not None:
                self.oracle.arrived(req_id, request.block_hashes)
            self.timings[req_id] = RequestTiming(spec.arrival_s, expected_output_tokens=spec.output_len)
            self.scheduler.add_request(request)

    def _loop(self) -> SimResult:
        total = self.workload.total_requests
        wall_start = time.perf_counter()
        while self.finished < total:
            self._add_arrivals()
            if not self.scheduler.has_requests() and not self.queue:
                if not self.pending:
                    raise RuntimeError(
                        f"simulator: {total - self.finished} requests vanished without finishing"
                    )
                self.clock = max(self.clock, self.pending[0][0])
                continue
            self._iterate(launch=self.scheduler.has_requests())
        # Drain the copies in flight so every job is reported (connectors release their pins).
        # The engine keeps stepping while the connector has push work (has_requests() says so).
        self.draining = True
        for _ in range(10_000):
            work = self.worker.busy() or self.scheduler.has_requests()
            if not work and not self.queue:
                break
            self._iterate(launch=work)
        pool = self.scheduler.kv_cache_manager.block_pool
        reqs = self.workload.requests
        return SimResult(
            timings=[self.timings[self.workload.request_id(i)] for i in range(len(reqs))],
            counters=self.probe.counters,
            block_bytes=self.block_bytes,
            virtual_s=self.clock,
            wall_s=time.perf_counter() - wall_start,
            scheduler_s=self.sched_s,
            connector_s=self._connector_total(),
            connector_by_call=dict(self.timer.by_call) if self.timer else {},
            load_s=self.worker.load_s,
            store_s=self.worker.store_s,
            async_load_s=self.worker.async_load_s,
            max_running=self.max_running,
            mean_running=self.running_s / self.busy_s if self.busy_s else 0.0,
            busy_scheduler_s=self.busy_sched_s,
            busy_connector_s=self.busy_conn_s,
            free_blocks_at_end=pool.get_num_free_blocks(),
            num_gpu_blocks=pool.num_gpu_blocks - 1,  # minus vLLM's null block
            prefill_tokens_computed=self.prefill_tokens,
        )

    def _iterate(self, *, launch: bool) -> None:
        """One pass of the engine core's loop (``step_with_batch_queue``; one deep, ``step``):
        launch a step if ``launch``, then process the oldest unless the queue has room."""
        if launch:
            step = self._launch()
            self.queue.append(step)
            if len(self.queue) < self.depth and (
                step.out.total_num_scheduled_tokens or self.scheduler.has_requests()
            ):
                return
        done = self.queue.popleft()
        self._finish(done)
        if done.idle and all(step.idle for step in self.queue):
            self._skip_to_next_event()

    def _launch(self) -> _Launched:
        """schedule() and the step's launch, at the host's clock."""
        conn_before = self._connector_total()
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        wall = time.perf_counter() - t0
        if self.oracle is not None:
            for new in out.scheduled_new_reqs:
                self.oracle.admitted(new.req_id)
        scheduled = {
            req_id: SimpleNamespace(
                request=request,
                num_computed_tokens=request.num_computed_tokens,
                num_tokens=request.num_tokens,
            )
            for req_id in out.num_scheduled_tokens
            for request in (self.requests[req_id],)
        }
        launched = self.clock
        has_meta = out.kv_connector_metadata is not None
        host = self.worker.launch(out, launched, self.gpu_free) if has_meta else launched
        begin = max(host, self.gpu_free)
        wait = self.worker.before_forward(out, begin) if has_meta else 0.0
        end = begin + wait + self.cost.forward_s(self._chunks(out))
        if has_meta:
            self.worker.after_forward(out, end)
        kv_out = self.worker.report(host)  # get_finished, right after the forward's launch
        step = _Launched(
            out,
            scheduled,
            kv_out,
            start=max(launched, self.gpu_free),
            end=end,
            running=len(self.scheduler.running),
            wall_s=wall,
            connector_s=self._connector_total() - conn_before,
        )
        self.clock, self.gpu_free = host, end
        return step

    def _chunks(self, out: Any) -> list[tuple[int, int]]:
        """``(context start, tokens)`` per scheduled request; counts the prefill tokens among them."""
        spans = [(new.req_id, new.num_computed_tokens) for new in out.scheduled_new_reqs]
        cached = out.scheduled_cached_reqs
        spans += zip(cached.req_ids, cached.num_computed_tokens, strict=True)
        chunks = []
        for req_id, start in spans:
            n = out.num_scheduled_tokens[req_id]
            # Prefill: a position of the prompt, or one this request computed before (it was
            # preempted); above both, a decode.
            mark = self.high_water.get(req_id, 0)
            prefill_end = max(self.requests[req_id].num_prompt_tokens, mark)
            self.prefill_tokens += max(0, min(start + n, prefill_end) - start)
            self.high_water[req_id] = max(mark, start + n)
            chunks.append((start, n))
        return chunks

    def _finish(self, step: _Launched) -> None:
        """``update_from_output`` of a launched step, once its output is ready."""
        self.clock = max(self.clock, step.end)
        kwargs = {"kv_connector_output": step.kv_out} if step.kv_out is not None else {}
        model_out = model_output(
            step.out, step.scheduled, next_token=lambda s: self._next_token(s.request), **kwargs
        )
        conn_before = self._connector_total()
        t0 = time.perf_counter()
        result = self.scheduler.update_from_output(step.out, model_out)
        wall = step.wall_s + time.perf_counter() - t0
        self.sched_s += wall
        self.max_running = max(self.max_running, step.running)
        if step.out.total_num_scheduled_tokens:
            self.running_s += step.running * (step.end - step.start)
            self.busy_s += step.end - step.start
        if step.running >= self.busy_threshold:
            self.busy_sched_s += wall
            self.busy_conn_s += step.connector_s + self._connector_total() - conn_before
        self.finished += self._record(result)
        if self.progress is not None:
            self.progress(self.finished)

    def _skip_to_next_event(self) -> None:
        """Nothing ran and nothing changed (blocks pinned by copies in flight, a request waiting
        for its load): the engine spins until a copy finishes or a request arrives."""
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
        self.clock = max(self.clock, min(events))

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
                    if self.oracle is not None:
                        self.oracle.admitted(o.request_id)  # aborted or finished while waiting
                    request = self.requests.pop(o.request_id, None)
                    self.high_water.pop(o.request_id, None)
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

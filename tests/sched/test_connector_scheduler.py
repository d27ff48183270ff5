"""BidKVConnector's scheduler side on vLLM's real Scheduler, with a delayed copy backend.

No model runs here, so a stand-in worker plays the copy backend: it keeps every
job the connector plans "in flight" for ``delay`` steps before reporting it done
(or failed) through the real ``update_connector_output`` path. While a job is in
flight no block it reads or writes may be handed out by vLLM, and no load may read
a CPU slot whose store has not completed. Start-up refusals are tested here too.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

import pytest
import torch
from vllm_bidkv_bench.standalone import model_output

from tests.sched.conftest import add_requests
from tests.sched.test_victim import assert_drained, connector_config, record_choices
from vllm_bidkv.connectors.bidkv_connector import BidKVConnector
from vllm_bidkv.connectors.metadata import BidKVWorkerMetadata
from vllm_bidkv.offload import JobResults
from vllm_bidkv.offload.lookup import victim_candidate
from vllm_bidkv.patches.capabilities import probe

pytestmark = pytest.mark.sched
# Every test here but the next needs a CPU tier.
offload_only = pytest.mark.usefixtures("offload_supported")


def test_offload_needs_worker_meta(make_scheduler: Any) -> None:
    """Offload where vLLM reports copy completions; elsewhere a refusal naming what is missing."""
    config = connector_config(offload_mode="lazy", cpu_bytes=64 * 1024 * 1024)
    if probe().connector_worker_meta:
        assert make_scheduler(kv_transfer_config=config).connector.config.offload_mode == "lazy"
    else:
        with pytest.raises(ValueError, match="offload_mode='lazy' needs build_connector_worker_meta"):
            make_scheduler(kv_transfer_config=config)


class DelayedCopyWorker:
    """Stand-in for the worker's copy backend (a real one needs the model runner)."""

    def __init__(self, delay: int, fail_rate: float = 0.0, seed: int = 0) -> None:
        self.delay = delay
        self.fail_rate = fail_rate
        self.rng = random.Random(seed)
        self.in_flight: deque[tuple[int, Any]] = deque()  # (step due, job)
        self.step = 0
        self.ready_slots: set[int] = set()  # CPU slots whose data a completed store wrote
        self.rescues: set[int] = set()
        self.loads = 0

    def submit(self, meta: Any) -> None:
        for job in meta.plan.loads:
            assert set(job.cpu_slots) <= self.ready_slots, "load reads a slot no completed store wrote"
            self.loads += 1
        self.rescues.update(job.job_id for job in meta.plan.rescues)
        for job in meta.plan.jobs():
            assert 0 not in job.gpu_block_ids, f"{job.kind} job {job.job_id} copies the null block"
            self.in_flight.append((self.step + self.delay, job))

    def busy_gpu_blocks(self) -> dict[int, str]:
        """Blocks in-flight copies read or write; a rescue copied its blocks before the forward."""
        return {
            b: job.kind
            for _, job in self.in_flight
            if job.job_id not in self.rescues
            for b in job.gpu_block_ids
        }

    def finish_due(self) -> Any:
        self.step += 1
        results = JobResults()
        self.reported: list[Any] = []
        while self.in_flight and self.in_flight[0][0] <= self.step:
            _, job = self.in_flight.popleft()
            self.reported.append(job)
            if self.rng.random() < self.fail_rate:
                results.failed[job.job_id] = 1
                continue
            results.done[job.job_id] = 1
            if job.kind == "store":
                self.ready_slots.update(job.cpu_slots)
        return BidKVWorkerMetadata(results)

    def output(self) -> Any:
        """The step's ``KVConnectorOutput``: job results, and the requests whose asynchronous
        loads were reported (every load is asynchronous where vLLM schedules asynchronously,
        the default of releases built for GPUs)."""
        from vllm.v1.outputs import KVConnectorOutput

        meta = self.finish_due()
        recving = {job.request_id for job in self.reported if job.asynchronous}
        return KVConnectorOutput(kv_connector_worker_meta=meta, finished_recving=recving or None)


@offload_only
# window: every layer a 64-token sliding window (vLLM gives slid-out blocks the null block).
@pytest.mark.parametrize(
    ("mode", "delay", "fail_rate", "window"),
    [
        ("lazy", 3, 0.0, None),
        ("eager", 2, 0.0, None),
        ("lazy", 2, 0.2, None),
        ("lazy", 3, 0.0, 64),
        ("auto", 3, 0.1, None),
        ("auto", 2, 0.0, 64),
    ],
)
def test_no_block_reused_or_read_while_a_copy_is_in_flight(
    make_scheduler: Any, patched: None, mode: str, delay: int, fail_rate: float, window: int | None
) -> None:

    scheduler = make_scheduler(
        num_gpu_blocks=40 if window is None else 16,
        max_num_seqs=8,
        kv_transfer_config=connector_config(offload_mode=mode, cpu_bytes=64 * 1024 * 1024),
        sliding_window=window,
    )
    pool = scheduler.kv_cache_manager.block_pool
    worker = DelayedCopyWorker(delay, fail_rate)
    requests = add_requests(scheduler, 24, seed=7, prefix_len=48, lo=40, hi=160, max_out=120)
    steps = 0
    # As vLLM's engine loop: step while the scheduler has requests, which asks the connector
    # whether copies are in flight (has_pending_push_work).
    while scheduler.has_requests():
        # A block a store reads must keep its content (hash) and a load's destination its
        # owner until the copy completes: neither may be free, so vLLM cannot reuse it.
        busy = worker.busy_gpu_blocks()
        before = {b: pool.blocks[b].block_hash for b, kind in busy.items() if kind == "store"}
        out = scheduler.schedule()
        for block_id in busy:
            assert pool.blocks[block_id].ref_cnt > 0, f"in-flight block {block_id} is free"
        for block_id, block_hash in before.items():
            assert pool.blocks[block_id].block_hash == block_hash, f"block {block_id} reused mid-store"
        worker.submit(out.kv_connector_metadata)
        kwargs = {"kv_connector_output": worker.output()}
        scheduler.update_from_output(out, model_output(out, requests, **kwargs))
        steps += 1
        if steps == 40:  # resend 8 prompts: by now their prefixes live only in the CPU tier
            for req in list(requests.values())[:8]:
                clone = add_again(scheduler, req)
                requests[clone.request_id] = clone
        assert steps < 5000
    stats = scheduler.connector.scheduler_role.side.planner.stats()
    assert worker.loads > 0 and stats["blocks_loaded"] > 0
    assert stats["pending_jobs"] == 0 and stats["gpu_blocks_held"] == 0
    assert_drained(scheduler, requests)


def spy_on_waits(side: Any) -> tuple[list[bool], dict[str, list[float]]]:
    """Record each ``wait_for_frees`` answer and, when a store held a free block, the δ of the
    victim the bid would pick, by answer ("waited" / "preempted")."""
    waits: list[bool] = []
    deltas: dict[str, list[float]] = {"waited": [], "preempted": []}
    decide, pick = side.wait_for_frees, side._pick

    def spy(requests: list[Any], requester: Any) -> bool:
        held = side.planner.holds_free_blocks()
        wait = bool(decide(requests, requester))
        if held:
            deltas["waited" if wait else "preempted"].append(side._cost.delta(pick(requests, requester)))
        waits.append(wait)
        return wait

    side.wait_for_frees = spy
    return waits, deltas


@offload_only
def test_vllm_waits_for_a_stores_blocks_only_when_the_victim_costs_more_than_a_step(
    make_scheduler: Any, patched: None
) -> None:
    """``bid_step_cost``: an allocation that fails while a store holds free blocks waits a step
    only if the victim the bid would pick costs more than it (δ); else that victim is preempted.
    The real Scheduler asks ``has_pending_block_frees`` after the hook, so a wait must reach it;
    a source-patched one asks ``wait_for_frees`` itself (patches/), with no hook."""
    if not probe().connector_pending_block_frees:
        pytest.skip("this vLLM never asks has_pending_block_frees: it preempts as before")
    seen: dict[float, dict[str, Any]] = {}
    for step_cost in (0.0, 20.0, 1e12):
        scheduler = make_scheduler(
            num_gpu_blocks=40,
            max_num_seqs=8,
            kv_transfer_config=connector_config(
                offload_mode="lazy", cpu_bytes=64 * 1024 * 1024, bid_step_cost=step_cost
            ),
        )
        waits, deltas = spy_on_waits(scheduler.connector.scheduler_role.side)
        chosen = record_choices(scheduler.connector)
        preempted = 0
        worker = DelayedCopyWorker(delay=3)
        requests = add_requests(scheduler, 24, seed=3, prefix_len=32, lo=40, hi=160, max_out=120)
        while scheduler.has_requests():
            out = scheduler.schedule()
            preempted += len(out.preempted_req_ids)
            worker.submit(out.kv_connector_metadata)
            kwargs = {"kv_connector_output": worker.output()}
            scheduler.update_from_output(out, model_output(out, requests, **kwargs))
        assert_drained(scheduler, requests)
        # Every preemption went through our choice: none followed a wait vLLM did not see.
        assert preempted == len(chosen) and preempted > 0
        assert all(d > step_cost for d in deltas["waited"]) and all(
            d <= step_cost for d in deltas["preempted"]
        )
        seen[step_cost] = {"num_waits": sum(waits), "num_preempted": preempted, **deltas}
    assert seen[1e12]["num_waits"] == 0 and seen[1e12]["num_preempted"], "no victim costs more: never waits"
    assert seen[0.0]["num_waits"] > 0, "stores held free blocks when allocations failed: the test needs it"
    assert seen[20.0]["waited"] and seen[20.0]["preempted"], "a cost between the victims' δ splits them"


def run_step(scheduler: Any, worker: DelayedCopyWorker, requests: dict[str, Any]) -> None:
    """One engine step with the stand-in worker: schedule, copy, report, update."""
    out = scheduler.schedule()
    worker.submit(out.kv_connector_metadata)
    kwargs = {"kv_connector_output": worker.output()}
    scheduler.update_from_output(out, model_output(out, requests, **kwargs))


def add_again(scheduler: Any, request: Any) -> Any:
    from vllm_bidkv_bench.standalone import make_request

    clone = make_request(
        request.request_id + "-again",
        request.prompt_token_ids,
        request.max_tokens,
        block_size=scheduler.block_size,
    )
    scheduler.add_request(clone)
    return clone


@offload_only
def test_cpu_bytes_too_small_for_one_block(make_scheduler: Any) -> None:
    with pytest.raises(ValueError, match="cpu_bytes"):
        make_scheduler(kv_transfer_config=connector_config(cpu_bytes=1024))


@offload_only
def test_prefix_caching_off_is_refused(make_scheduler: Any) -> None:
    with pytest.raises(ValueError, match="prefix caching is off"):
        make_scheduler(enable_prefix_caching=False, kv_transfer_config=connector_config())
    # Victim selection alone does not need the hashes.
    scheduler = make_scheduler(
        enable_prefix_caching=False, kv_transfer_config=connector_config(offload_mode="off")
    )
    assert scheduler.connector.config.offload_mode == "off"


@offload_only
def test_several_kv_cache_groups_are_refused(make_scheduler: Any) -> None:
    """vLLM makes one group of any attention model for us (we are not SupportsHMA); more
    than one (a state-space model, say) cannot be served by one block-hash-keyed tier."""
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        SlidingWindowSpec,
    )

    scheduler = make_scheduler(kv_transfer_config=connector_config(offload_mode="off"))
    full = FullAttentionSpec(block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16)
    window = SlidingWindowSpec(
        block_size=16, num_kv_heads=8, head_size=128, dtype=torch.bfloat16, sliding_window=64
    )
    config = KVCacheConfig(
        num_blocks=64,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["a"], full), KVCacheGroupSpec(["b"], window)],
    )
    scheduler.vllm_config.kv_transfer_config.kv_connector_extra_config = {"offload_mode": "lazy"}
    with pytest.raises(
        ValueError, match=r"one attention KV cache group .*has 2: \[FullAttentionSpec, SlidingWindowSpec\]"
    ):
        BidKVConnector(scheduler.vllm_config, scheduler.connector._role, config)


@offload_only
def test_unsupported_kv_layout_is_refused_at_registration(make_scheduler: Any) -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    scheduler = make_scheduler(kv_transfer_config=connector_config(cpu_bytes=64 * 1024 * 1024))
    worker = BidKVConnector(scheduler.vllm_config, KVConnectorRole.WORKER, scheduler.kv_cache_config)
    with pytest.raises(ValueError, match="unsupported KV cache layout for layer layers.0.attn"):
        worker.register_kv_caches({"layers.0.attn": torch.zeros(3, 5)})  # no dim of size num_blocks (64)


@offload_only
def test_cpu_tier_larger_than_host_memory_is_refused_at_registration(make_scheduler: Any) -> None:
    """Pages are only taken as the tier fills: without a check at start-up, the kernel kills the
    engine hours later. Refused with the key and both numbers."""
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    from vllm_bidkv.connectors.worker import available_host_bytes

    available = available_host_bytes()
    assert available is not None, "Linux exposes MemAvailable"
    # Only the worker role takes the tier's memory; a scheduler role of this size would build
    # bookkeeping for billions of 2 KiB slots (a source-patched vLLM binds it at once).
    scheduler = make_scheduler()
    vllm_config = scheduler.vllm_config
    vllm_config.kv_transfer_config = KVTransferConfig(**connector_config(cpu_bytes=1000 * available))
    worker = BidKVConnector(vllm_config, KVConnectorRole.WORKER, scheduler.kv_cache_config)
    caches = {"layers.0.attn": torch.zeros(2, 64, 16, 2, 8)}  # [K/V, num_blocks=64, ...]
    with pytest.raises(ValueError, match=r"cpu_bytes=\d+ does not fit this host: 1 worker\(s\) x \d+ bytes"):
        worker.register_kv_caches(caches)
    assert worker.worker_role is not None and worker.worker_role.copies is None


@offload_only
def test_sliding_window_victims_free_no_null_block(make_scheduler: Any, patched: None) -> None:
    """r counts what a victim really returns: a slid-out block is the null block, never freed."""
    scheduler = make_scheduler(
        num_gpu_blocks=24,  # 16 blocks of 16 tokens: vLLM admits less and never preempts
        max_num_seqs=8,
        kv_transfer_config=connector_config(offload_mode="off"),
        sliding_window=64,
    )
    side = scheduler.connector.scheduler_role.side
    manager = scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    choose = side.choose_victim
    seen = {"decisions": 0, "null_blocks": 0}

    def checked(requests: list[Any], requester: Any = None) -> Any:
        for order, request in enumerate(requests):
            blocks = manager.req_to_blocks[request.request_id]
            real = [b for b in blocks if not b.is_null]
            seen["null_blocks"] += len(blocks) - len(real)
            candidate = victim_candidate(side.ctx, None, order, request)
            assert candidate.freeable_blocks == sum(1 for b in real if b.ref_cnt == 1)
        seen["decisions"] += 1
        return choose(requests, requester)

    side.choose_victim = checked  # type: ignore[method-assign]
    requests = add_requests(scheduler, 16, seed=3, lo=100, hi=200, max_out=80)
    from tests.sched.conftest import run_to_completion

    run_to_completion(scheduler, requests)
    assert seen["decisions"] > 0 and seen["null_blocks"] > 0, seen
    assert_drained(scheduler, requests)


def test_fault_plan_parses_ranks_and_delays_and_refuses_bad_values() -> None:
    from vllm_bidkv.connectors.faults import FaultPlan, active_faults, set_faults

    (plan,) = FaultPlan.from_json('{"load_every": 1, "rank": 1}')
    assert plan.rank == 1 and plan.load_every == 1 and plan.complete_after_steps == 0
    fails, slow = FaultPlan.from_json(
        '[{"store_every": 1, "rank": 1}, {"complete_after_steps": 3, "rank": 0}]'
    )
    assert (fails.rank, fails.store_every, slow.rank, slow.complete_after_steps) == (1, 1, 0, 3)
    for bad, key in (
        ('{"rank": -1}', "rank=-1"),
        ('{"rank": true}', "rank=True"),
        ('{"ranks": 1}', "'ranks'"),
        ('{"complete_after_steps": -2}', "complete_after_steps=-2"),
        ('[{"rank": 1}, {"rank": 1}]', "two plans for rank"),
        ("[3]", "a JSON object or a list of them"),
    ):
        with pytest.raises(ValueError, match=key):
            FaultPlan.from_json(bad)
    set_faults(plan)
    try:
        assert active_faults(1) is plan and active_faults(0) is None, "only rank 1 fails"
        set_faults([fails, slow])
        assert active_faults(1) is fails and active_faults(0) is slow and active_faults(2) is None
        set_faults(FaultPlan(load_every=1))
        assert active_faults(0) is not None and active_faults(3) is not None, "no rank: every worker"
    finally:
        set_faults(None)


def test_fault_hook_needs_the_test_hooks_opt_in() -> None:
    """VLLM_BIDKV_FAULTS left in a production environment would silently turn the cache into
    recompute: without VLLM_BIDKV_TEST_HOOKS=1 it is refused, naming the opt-in."""
    from vllm_bidkv.connectors.faults import read_faults_env

    assert read_faults_env({}) == []
    with pytest.raises(ValueError, match="VLLM_BIDKV_TEST_HOOKS=1"):
        read_faults_env({"VLLM_BIDKV_FAULTS": '{"load_every": 1}'})
    with pytest.raises(ValueError, match="VLLM_BIDKV_TEST_HOOKS=1"):
        read_faults_env({"VLLM_BIDKV_FAULTS": '{"load_every": 1}', "VLLM_BIDKV_TEST_HOOKS": "0"})
    (plan,) = read_faults_env({"VLLM_BIDKV_FAULTS": '{"load_every": 1}', "VLLM_BIDKV_TEST_HOOKS": "1"})
    assert plan.load_every == 1


class ContentTrackingWorker(DelayedCopyWorker):
    """The delayed stand-in, tracking whether each GPU block and CPU slot holds valid KV.

    A failed load leaves its blocks garbage (reported as load errors when issued, as the real
    worker does), and so is every block a forward computes for a request after a garbage
    block (attention reads it); a forward that recomputes a block from valid KV repairs it.
    Asynchronous loads are reported in ``finished_recving`` when their job is.
    """

    def __init__(self, scheduler: Any, requests: dict[str, Any], delay: int, load_fail_rate: float) -> None:
        super().__init__(delay)
        self.scheduler = scheduler
        self.requests = requests
        self.load_fail_rate = load_fail_rate
        self.garbage: set[int] = set()
        self.slot_valid: dict[int, bool] = {}
        self.failed_loads: set[int] = set()
        self.load_errors: set[int] = set()
        self.async_loads = 0

    def _blocks(self, request_id: str) -> list[int]:
        return list(self.scheduler.kv_cache_manager.get_block_ids(request_id)[0])

    def submit_step(self, out: Any, computed_before: dict[str, int]) -> None:
        plan = out.kv_connector_metadata.plan
        for job in plan.rescues:  # rescues: before the forward
            self._store(job)
        for job in plan.loads:
            for slot in job.cpu_slots:
                assert self.slot_valid.get(slot), (
                    f"load of slot {slot}: KV from a failed load reached the tier"
                )
            self.async_loads += job.asynchronous
            if self.rng.random() < self.load_fail_rate:
                self.failed_loads.add(job.job_id)
                self.garbage.update(job.gpu_block_ids)
                self.load_errors.update(job.gpu_block_ids)
            else:
                self.garbage.difference_update(job.gpu_block_ids)
        bs = self.scheduler.block_size
        for request_id, n in out.num_scheduled_tokens.items():
            blocks = self._blocks(request_id)
            start = computed_before[request_id]
            tainted = any(b in self.garbage for b in blocks[: start // bs])
            for block_id in blocks[start // bs : (start + n) // bs]:
                if tainted:
                    self.garbage.add(block_id)
                else:
                    self.garbage.discard(block_id)
        for job in plan.stores:
            self._store(job)
        self.submit(out.kv_connector_metadata)

    def _store(self, job: Any) -> None:
        for block_id, slot in zip(job.gpu_block_ids, job.cpu_slots, strict=True):
            self.slot_valid[slot] = block_id not in self.garbage

    def output(self) -> Any:
        from vllm.v1.outputs import KVConnectorOutput

        meta = self.finish_due()
        for job_id in list(meta.results.done):
            if job_id in self.failed_loads:
                del meta.results.done[job_id]
                meta.results.failed[job_id] = 1
        recving = {job.request_id for job in self.reported if job.asynchronous}
        errors, self.load_errors = self.load_errors, set()
        return KVConnectorOutput(
            kv_connector_worker_meta=meta, finished_recving=recving or None, invalid_block_ids=errors
        )


@offload_only
@pytest.mark.parametrize("delay", [1, 3])
def test_async_scheduling_with_failed_loads_keeps_the_tier_clean(
    make_scheduler: Any, patched: None, delay: int
) -> None:
    """vLLM's AsyncScheduler (step N+1 scheduled before step N's output), lazy offload,
    completions ``delay`` steps late and a third of the loads failing: every load is
    asynchronous (a failed one is cached by vLLM only up to its valid prefix), no block in
    flight is handed out, no garbage KV is ever stored into the tier or served from it, and
    the engine drains."""
    from types import SimpleNamespace

    from vllm.v1.request import RequestStatus

    scheduler = make_scheduler(
        num_gpu_blocks=40,
        max_num_seqs=8,
        kv_transfer_config=connector_config(offload_mode="lazy", cpu_bytes=64 * 1024 * 1024),
        async_scheduling=True,
    )
    requests = add_requests(scheduler, 24, seed=11, prefix_len=48, lo=40, hi=160, max_out=100)
    worker = ContentTrackingWorker(scheduler, requests, delay, load_fail_rate=0.34)
    waited_for_load = set()
    pending: list[tuple[Any, dict[str, Any]]] = []
    steps = 0
    while scheduler.has_requests() or pending:
        if scheduler.has_requests():
            # Immediate frees (our bind hook turns vLLM's deferred frees off) must still never
            # hand out a block an in-flight copy reads or writes.
            busy = worker.busy_gpu_blocks()
            out = scheduler.schedule()
            pool = scheduler.kv_cache_manager.block_pool
            for block_id in busy:
                assert pool.blocks[block_id].ref_cnt > 0, f"in-flight block {block_id} is free"
            snapshot = {
                rid: SimpleNamespace(
                    num_computed_tokens=requests[rid].num_computed_tokens,
                    num_tokens=requests[rid].num_tokens,
                )
                for rid in out.num_scheduled_tokens
            }
            before = {
                rid: requests[rid].num_computed_tokens - n for rid, n in out.num_scheduled_tokens.items()
            }
            worker.submit_step(out, before)
            waited_for_load |= {
                r.request_id for r in requests.values() if r.status == RequestStatus.WAITING_FOR_REMOTE_KVS
            }
            pending.append((out, snapshot))
        if len(pending) == 2 or (pending and not scheduler.has_requests()):
            done, snapshot = pending.pop(0)  # one step late, as the engine's batch queue
            kwargs = {"kv_connector_output": worker.output()}
            scheduler.update_from_output(done, model_output(done, snapshot, **kwargs))
        steps += 1
        if steps == 60:
            for req in list(requests.values())[:8]:
                clone = add_again(scheduler, req)
                requests[clone.request_id] = clone
        tier = scheduler.connector.scheduler_role.side.planner.tier
        for slot in range(tier.num_slots):
            block_hash = tier.hash_of(slot)
            if block_hash is not None and tier.lookup(block_hash) == slot:
                assert worker.slot_valid.get(slot), f"slot {slot} holds KV derived from a failed load"
        assert steps < 8000
    stats = scheduler.connector.scheduler_role.side.planner.stats()
    assert worker.failed_loads and worker.async_loads > 0 and waited_for_load
    assert stats["blocks_loaded"] > 0 and stats["load_errors"] > 0
    assert stats["pending_jobs"] == 0 and stats["gpu_blocks_held"] == 0
    assert_drained(scheduler, {k: v for k, v in requests.items()})


def needs_connector_reset() -> None:
    """``reset_prefix_cache(reset_connector=...)``: vLLM releases that have it."""
    import inspect

    from vllm.v1.core.sched.scheduler import Scheduler

    if "reset_connector" not in inspect.signature(Scheduler.reset_prefix_cache).parameters:
        pytest.skip("this vLLM's reset_prefix_cache has no reset_connector (no connector reset to test)")


@offload_only
def test_a_connector_reset_empties_the_tier(make_scheduler: Any, patched: None) -> None:
    """After a weight update the tier's KV is the old model's: vLLM's
    ``reset_prefix_cache(reset_connector=True)`` (``LLM.reset_prefix_cache(reset_connector=True)``)
    empties it; the default reset leaves it (the README says when to ask for which)."""

    needs_connector_reset()
    scheduler = make_scheduler(
        num_gpu_blocks=40,
        max_num_seqs=8,
        kv_transfer_config=connector_config(offload_mode="lazy", cpu_bytes=64 * 1024 * 1024),
    )
    worker = DelayedCopyWorker(0)
    requests = add_requests(scheduler, 12, seed=5, prefix_len=48, lo=40, hi=160, max_out=60)
    while scheduler.has_requests():
        run_step(scheduler, worker, requests)
    tier = scheduler.connector.scheduler_role.side.planner.tier
    assert tier.num_used > 0
    assert scheduler.reset_prefix_cache() and tier.num_used > 0, "a plain reset keeps the tier"
    assert scheduler.reset_prefix_cache(reset_connector=True) and tier.num_used == 0


@offload_only
def test_a_cache_reset_right_after_a_burst_gives_up_the_copies_in_flight(
    make_scheduler: Any, patched: None
) -> None:
    """``pause_generation(clear_cache=True)`` (a weight update) aborts every request and resets
    the GPU pool and the tier at once, with stores still in flight: they give their blocks
    back first, so the reset succeeds instead of raising; their late reports are ignored.
    A plain reset (the tier kept) still waits for them."""
    from vllm.v1.request import RequestStatus

    needs_connector_reset()  # a source-patched Scheduler calls give_up_copies itself (patches/)
    scheduler = make_scheduler(
        num_gpu_blocks=40,
        max_num_seqs=8,
        kv_transfer_config=connector_config(offload_mode="eager", cpu_bytes=64 * 1024 * 1024),
    )
    worker = DelayedCopyWorker(5)
    requests = add_requests(scheduler, 12, seed=9, prefix_len=48, lo=40, hi=160, max_out=30)
    side = scheduler.connector.scheduler_role.side
    for _ in range(60):
        run_step(scheduler, worker, requests)
        if any(job.kind == "store" and job.job_id not in worker.rescues for _, job in worker.in_flight):
            break
    assert side.planner.ledger.held_store_blocks > 0, "stores must be in flight for this test"
    scheduler.finish_requests(None, RequestStatus.FINISHED_ABORTED)  # as pause_generation's "abort"
    assert not scheduler.reset_prefix_cache(), "a plain reset waits for the stores"
    assert scheduler.reset_prefix_cache(reset_running_requests=True, reset_connector=True)
    # The GPU blocks are back; the slots late writes may still land in stay reserved.
    assert side.planner.ledger.held_gpu_blocks == 0 and side.planner.tier.num_used > 0
    late = worker.in_flight
    assert late, "the workers still report the given-up copies later"
    while worker.in_flight:  # their reports arrive and are ignored
        out = scheduler.schedule()
        kwargs = {"kv_connector_output": worker.output()}
        scheduler.update_from_output(out, model_output(out, requests, **kwargs))
    assert side.planner.tier.num_used == 0, "given-up stores are aborted, not committed"
    assert not scheduler.has_requests() and side.counters["load_errors"] == 0


def test_a_worker_with_another_configuration_is_refused(make_scheduler: Any, monkeypatch: Any) -> None:
    """Each process reads its own BIDKV_* environment (a Ray worker on another node may have
    another): the scheduler's first step carries its configuration, and a worker whose own
    differs refuses, naming the keys, instead of copying into slots nobody planned."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

    scheduler = make_scheduler(kv_transfer_config=connector_config(offload_mode="off"))
    out = scheduler.schedule()
    meta = out.kv_connector_metadata
    assert meta.scheduler_config is not None and meta.scheduler_config["offload_mode"] == "off"
    assert scheduler.schedule().kv_connector_metadata.scheduler_config is None, "the first step only"
    worker = BidKVConnector(scheduler.vllm_config, KVConnectorRole.WORKER, scheduler.kv_cache_config)
    worker.bind_connector_metadata(meta)  # the same configuration: accepted
    monkeypatch.setenv("BIDKV_SEED", "7")  # the scheduler's alone: no matter to a worker
    BidKVConnector(
        scheduler.vllm_config, KVConnectorRole.WORKER, scheduler.kv_cache_config
    ).bind_connector_metadata(meta)
    monkeypatch.setenv("BIDKV_CPU_BYTES", "1GiB")
    other = BidKVConnector(scheduler.vllm_config, KVConnectorRole.WORKER, scheduler.kv_cache_config)
    with pytest.raises(
        ValueError, match=r"differs from the scheduler's: cpu_bytes=1073741824 here but \d+ in"
    ):
        other.bind_connector_metadata(meta)

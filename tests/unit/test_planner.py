"""OffloadPlanner against the reference SchedulerContext: lazy walk, loads, eager stores,
completion, protection — and ``PlannerMachine`` (tests/support), the stateful property test
that ``tests/sched/test_planner_blockpool.py`` reruns over vLLM's real BlockPool."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from hypothesis import settings

from tests.support.planner_machine import BS, PlannerMachine, SimRequest, chain_hashes, tokens
from tests.unit.reference_context import ReferenceContext
from vllm_bidkv.context import BlockHash, SchedulerContext
from vllm_bidkv.counters import Counters
from vllm_bidkv.offload import CpuBlockTier, JobResults, OffloadPlanner, OffloadSpec, StepPlan
from vllm_bidkv.offload.lookup import restorable_tokens
from vllm_bidkv.offload.picks import AUTO_MIN_IDLE_POOLS

pytestmark = pytest.mark.unit


class Rig:
    """Reference context + tier + planner, and helpers that play vLLM."""

    def __init__(
        self, num_blocks: int = 16, slots: int = 8, mode: str = "lazy", eviction: str = "lru", **kw: object
    ) -> None:
        self.ctx = ReferenceContext(num_blocks, BS)
        self.counters = Counters()
        spec = OffloadSpec(mode=mode, num_slots=slots, eviction=eviction, lookahead_steps=2.0, **kw)  # type: ignore[arg-type]
        self.tier = CpuBlockTier(slots, eviction, self.counters)
        self.planner = OffloadPlanner(self.ctx, self.tier, spec, self.counters)

    def run(self, request: SimRequest) -> list[int]:
        """vLLM allocates and computes the whole request; its blocks (still held)."""
        ids = self.ctx.allocate(request.request_id, math.ceil(request.num_tokens / BS))
        assert ids is not None
        for block_id, block_hash in zip(ids, request.block_hashes, strict=False):
            self.ctx.cache(block_id, block_hash)
        request.num_computed_tokens = request.num_tokens
        return ids

    def park(self, request: SimRequest) -> list[int]:
        """Run the request and free it: its full blocks become free cached blocks."""
        ids = self.run(request)
        self.ctx.release(request.request_id)
        return ids

    def finish_all(self, plan: StepPlan, ok: bool = True) -> None:
        jobs = plan.jobs()
        if ok:
            self.planner.complete(JobResults(done={j.job_id: 1 for j in jobs}))
        else:
            self.planner.complete(JobResults(failed={j.job_id: 1 for j in jobs}))

    def blocks_of(self, ids: Sequence[int]) -> list[tuple[int, BlockHash | None]]:
        """What the victim hook records when vLLM preempts the holder of ``ids``."""
        return [(b, self.ctx.get_block(b).block_hash) for b in ids]

    def idle(self) -> None:
        assert all(b.ref_cnt == 0 for b in self.ctx.blocks)
        assert self.planner.ledger.jobs() == [] and self.tier.num_pins == 0
        self.tier.check()


# -- lazy walk -------------------------------------------------------------------
def test_lazy_walk_stores_hashed_blocks_once() -> None:
    rig = Rig()
    request = SimRequest("a", tokens(1, 10))  # 2 full blocks + a partial one
    ids = rig.park(request)
    plan = rig.planner.plan_step(0)
    (job,) = plan.stores
    assert job.kind == "store" and job.request_id is None and plan.loads == []
    assert sorted(job.gpu_block_ids) == sorted(ids[:2])  # the partial block has no hash
    assert [rig.tier.hash_of(s) for s in job.cpu_slots] == [
        rig.ctx.get_block(g).block_hash for g in job.gpu_block_ids
    ]
    assert all(rig.ctx.get_block(g).ref_cnt == 1 for g in job.gpu_block_ids)
    assert rig.planner.plan_step(0).stores == [], "pending stores are not planned twice"
    rig.finish_all(plan)
    assert all(rig.tier.lookup(x) is not None for x in request.block_hashes)
    assert rig.planner.plan_step(0).stores == [], "stored blocks are not stored again"
    rig.idle()


def test_lazy_touch_and_free_keep_the_free_order() -> None:
    rig = Rig()
    for i in range(3):
        rig.park(SimRequest(f"r{i}", tokens(i, 8)))
    before = rig.ctx.free_order()
    plan = rig.planner.plan_step(0)
    assert plan.stores
    assert [b for b in before if b not in plan.stores[0].gpu_block_ids] == rig.ctx.free_order()
    rig.finish_all(plan)
    assert rig.ctx.free_order() == before


def test_lazy_walk_skips_duplicate_hashes() -> None:
    rig = Rig()
    rig.park(SimRequest("a", tokens(1, 8)))
    rig.park(SimRequest("b", tokens(1, 8)))  # same content, other blocks
    (job,) = rig.planner.plan_step(0).stores
    assert len(job.gpu_block_ids) == 2
    assert len({rig.tier.hash_of(s) for s in job.cpu_slots}) == 2


def test_lazy_walk_stops_when_every_slot_is_pending() -> None:
    rig = Rig(slots=3)
    rig.park(SimRequest("a", tokens(1, 20)))  # 5 hashed blocks
    (job,) = rig.planner.plan_step(0).stores
    assert len(job.cpu_slots) == 3 and rig.tier.num_used == 3
    assert rig.planner.plan_step(0).stores == []
    rig.planner.complete(JobResults(done={job.job_id: 1}))
    (job2,) = rig.planner.plan_step(0).stores  # now evicts the oldest entries
    assert len(job2.cpu_slots) == 2 and rig.tier.counters["cpu_evictions"] == 2 and rig.tier.num_used == 3


def test_lazy_walk_resumes_after_the_cursor() -> None:
    rig = Rig(num_blocks=200, slots=200, min_clean_blocks=4)
    for i in range(20):
        rig.park(SimRequest(f"r{i}", tokens(i, 8)))  # 40 hashed blocks behind 159 unhashed ones
    walked = []
    for step in range(8):
        start = rig.ctx.nodes_walked
        rig.finish_all(rig.planner.plan_step(2 if step else 0))
        walked.append(rig.ctx.nodes_walked - start)
        assert rig.ctx.allocate(f"u{step}", 2) is not None
    # The first walk fills the clean window; then each step tops up what vLLM consumed.
    assert walked == [4] + [2] * 7


def test_lazy_walk_restarts_when_the_cursor_left_the_queue() -> None:
    rig = Rig(num_blocks=16, slots=16, min_clean_blocks=4)
    rig.park(SimRequest("a", tokens(1, 4 * 15)))  # every block hashed and free
    order = rig.ctx.free_order()
    (job,) = rig.planner.plan_step(0).stores
    assert job.gpu_block_ids == order[:4]
    rig.finish_all(StepPlan(stores=[job]))
    assert rig.planner.plan_step(0).stores == []  # revisits the 4 stored blocks
    assert rig.planner.walk._cursor is not None and rig.planner.walk._cursor[0] == order[3]
    rig.ctx.acquire("hit", [order[3]])  # a prefix hit takes the cursor out of the queue
    (job,) = rig.planner.plan_step(0).stores
    assert job.gpu_block_ids == [order[4]], "restarted at the LRU end, walked 3 clean blocks + 1 new"


def test_lazy_walk_restarts_when_the_cursor_was_reused() -> None:
    rig = Rig(num_blocks=16, slots=16, min_clean_blocks=4)
    rig.park(SimRequest("a", tokens(1, 4 * 15)))
    order = rig.ctx.free_order()
    rig.finish_all(rig.planner.plan_step(0))
    assert rig.planner.walk._resume_point() == order[3], "the last stored block is back in place"
    rig.ctx.take("x", [order[3]])  # reused and freed again within one step: free, but unhashed
    rig.ctx.release("x")
    assert rig.ctx.get_block(order[3]).ref_cnt == 0
    assert rig.planner.walk._resume_point() is None


def test_lazy_work_per_step_follows_consumption_not_pool_size() -> None:
    num_blocks = 100_000
    rig = Rig(num_blocks=num_blocks, slots=50_000, min_clean_blocks=8)
    ids = rig.ctx.allocate("warm", num_blocks - 1)
    assert ids is not None
    for i, block_id in enumerate(ids):
        rig.ctx.cache(block_id, i.to_bytes(8, "little"))
    rig.ctx.release("warm")  # 99,999 free cached blocks, none in the tier
    per_step = 10
    walked = []
    for step in range(60):
        start = rig.ctx.nodes_walked
        rig.finish_all(rig.planner.plan_step(per_step if step else 0))
        walked.append(rig.ctx.nodes_walked - start)
        assert rig.ctx.allocate(f"use{step}", per_step) is not None  # vLLM consumes from the LRU end
    assert max(walked) <= 2 * 2 * per_step, walked
    assert sum(walked[10:]) == 50 * per_step, "steady state: one walked block per consumed block"


def test_lazy_parks_every_block_before_vllm_reuses_it() -> None:
    rig = Rig(num_blocks=2000, slots=2000, min_clean_blocks=4)
    ids = rig.ctx.allocate("warm", 1999)
    assert ids is not None
    for i, block_id in enumerate(ids):
        rig.ctx.cache(block_id, i.to_bytes(8, "little"))
    rig.ctx.release("warm")
    allocated = 0
    for step in range(100):
        rig.finish_all(rig.planner.plan_step(allocated))
        allocated = 5 + step % 7  # consumption varies between steps
        nxt = rig.ctx.free_order()[:allocated]
        if step >= 3:  # after the EMA warmed up
            assert all(rig.tier.lookup(rig.ctx.get_block(b).block_hash or b"") is not None for b in nxt), step
        assert rig.ctx.allocate(f"u{step}", allocated) == nxt


# -- loads -------------------------------------------------------------------------
def stored_rig(prompt: list[int], **kw: object) -> tuple[Rig, list[BlockHash]]:
    """A rig whose CPU tier holds every full block of ``prompt`` (and the GPU none)."""
    rig = Rig(**kw)  # type: ignore[arg-type]
    rig.park(SimRequest("seed", prompt))
    rig.finish_all(rig.planner.plan_step(0))
    flushed = rig.ctx.allocate("flush", rig.ctx.num_free_blocks())  # evict every GPU copy
    assert flushed is not None
    rig.ctx.release("flush")
    rig.planner.plan_step(len(flushed))
    return rig, chain_hashes(prompt)


def test_match_counts_ready_blocks_after_the_gpu_hit() -> None:
    prompt = tokens(1, 16)
    rig, hashes = stored_rig(prompt)
    request = SimRequest("b", prompt + [7, 7])
    assert rig.planner.match(request, 0) == 16
    assert rig.planner.match(request, 4) == 12
    assert rig.planner.match(request, 3) == 0, "not block aligned"
    assert rig.planner.match(SimRequest("c", prompt), 0) == 15, "one token is left to compute"
    assert rig.planner.match(SimRequest("d", prompt[:9]), 0) == 8
    rig.tier.drop(hashes[1])
    assert rig.planner.match(request, 0) == 4, "the run stops at the first miss"


def test_load_pins_and_touches_until_complete() -> None:
    prompt = tokens(1, 16)
    rig, hashes = stored_rig(prompt)
    request = SimRequest("b", prompt + [7])
    ext = rig.planner.match(request, 0)
    ids = rig.run(request)
    assert rig.planner.plan_load("b", request.block_hashes, ids, 0, ext) == []
    assert rig.tier.num_pins == 4 and all(rig.ctx.get_block(g).ref_cnt == 2 for g in ids[:4])
    plan = rig.planner.plan_step(0)
    (job,) = plan.loads
    assert job.kind == "load" and job.request_id == "b" and job.gpu_block_ids == ids[:4]
    assert job.cpu_slots == [rig.tier.lookup(x) for x in hashes]
    rig.ctx.release("b")  # aborted mid-load: the blocks stay touched
    assert all(rig.ctx.get_block(g).ref_cnt == 1 for g in ids[:4])
    rig.finish_all(plan)
    assert rig.planner.stats()["tokens_loaded"] == 16 and rig.planner.stats()["blocks_loaded"] == 4
    rig.idle()


def test_load_of_a_partial_hit_copies_the_whole_last_block() -> None:
    prompt = tokens(1, 16)
    rig, _ = stored_rig(prompt)
    request = SimRequest("b", prompt)  # hit capped at 15 tokens
    ids = rig.run(request)
    rig.planner.plan_load("b", request.block_hashes, ids, 0, 15)
    (job,) = rig.planner.plan_step(0).loads
    assert len(job.gpu_block_ids) == 4


def test_load_shortfall_is_reported_as_unavailable_blocks() -> None:
    prompt = tokens(1, 16)
    rig, hashes = stored_rig(prompt)
    request = SimRequest("b", prompt + [7])
    ext = rig.planner.match(request, 0)
    rig.tier.drop(hashes[2])  # vanished between match and allocation
    ids = rig.run(request)
    unavailable = rig.planner.plan_load("b", request.block_hashes, ids, 0, ext)
    assert unavailable == ids[2:4]
    (job,) = rig.planner.plan_step(0).loads
    assert job.gpu_block_ids == ids[:2] and job.unavailable_gpu_block_ids == ids[2:4]
    assert rig.tier.num_pins == 2
    assert rig.planner.stats()["load_errors"] == 2


def test_failed_load_drops_its_entries_and_releases_everything() -> None:
    prompt = tokens(1, 8)
    rig, hashes = stored_rig(prompt)
    request = SimRequest("b", prompt + [7])
    ids = rig.run(request)
    rig.planner.plan_load("b", request.block_hashes, ids, 0, 8)
    rig.finish_all(rig.planner.plan_step(0), ok=False)
    assert not any(rig.tier.contains(x) for x in hashes)
    assert rig.planner.stats()["load_errors"] == 2
    rig.ctx.release("b")
    rig.idle()


def test_sliding_window_match_needs_only_the_window_before_the_hit_end() -> None:
    prompt = tokens(1, 24)  # 6 blocks of 4
    request = SimRequest("b", prompt + [7])
    full, hashes = stored_rig(prompt)
    swa, _ = stored_rig(prompt, sliding_window=6)
    for rig in (full, swa):
        for h in hashes[:3]:
            rig.tier.drop(h)
    assert full.planner.match(request, 0) == 0, "full attention needs every block from the GPU hit"
    # A hit ending at token 24 leaves positions 19..23 in the window: blocks 4 and 5.
    assert swa.planner.match(request, 0) == 24
    swa.tier.drop(hashes[4])
    # Ending at block 3 (token 16) needs blocks 2..3; block 2 is gone too: no hit at all.
    assert swa.planner.match(request, 0) == 0
    swa2, _ = stored_rig(prompt, sliding_window=6)
    swa2.tier.drop(hashes[4])
    assert swa2.planner.match(request, 0) == 16, "blocks 2..3 are there: the hit ends before the gap"
    assert swa2.planner.match(request, 20) == 4, "from the GPU hit at block 5: block 5 alone"


def test_sliding_window_load_skips_the_null_blocks_vllm_gave_skipped_positions() -> None:
    prompt = tokens(1, 24)
    rig, hashes = stored_rig(prompt, sliding_window=6)
    for h in hashes[:3]:
        rig.tier.drop(h)
    request = SimRequest("b", prompt + [7])
    ext = rig.planner.match(request, 0)
    real = rig.ctx.allocate("b", 3)  # vLLM: null for blocks 0..3 (outside the window), then real ones
    assert real is not None
    gpu_ids = [0] * 4 + real
    assert rig.planner.plan_load("b", request.block_hashes, gpu_ids, 0, ext) == []
    (job,) = rig.planner.plan_step(0).loads
    assert job.gpu_block_ids == real[:2] and job.cpu_slots == [rig.tier.lookup(h) for h in hashes[4:6]]
    assert job.unavailable_gpu_block_ids == [] and rig.tier.num_pins == 2
    rig.finish_all(StepPlan(loads=[job]))
    assert rig.planner.stats()["blocks_loaded"] == 2 and rig.planner.stats()["load_errors"] == 0
    rig.ctx.release("b")
    rig.idle()


def test_plan_load_rejects_inconsistent_arguments() -> None:
    rig, hashes = stored_rig(tokens(1, 8))
    with pytest.raises(ValueError, match="num_computed_tokens=3 is not a multiple"):
        rig.planner.plan_load("b", hashes, [1, 2], 3, 4)
    with pytest.raises(ValueError, match=r"blocks \[0, 3\)"):
        rig.planner.plan_load("b", hashes, [1, 2, 3], 0, 12)
    assert rig.tier.num_pins == 0


# -- eager stores -------------------------------------------------------------------
def test_eager_stores_a_finished_requests_computed_blocks() -> None:
    rig = Rig(mode="eager")
    request = SimRequest("a", tokens(1, 10))
    ids = rig.run(request)
    assert rig.planner.plan_step(0).stores == [], "eager mode does not walk"
    rig.planner.store_finished(request, ids)
    rig.ctx.release("a")
    (job,) = rig.planner.plan_step(0).stores
    assert job.gpu_block_ids == ids[:2] and job.request_id == "a"
    assert all(rig.ctx.get_block(g).ref_cnt == 1 for g in ids[:2]), "held by the store only"
    rig.finish_all(rig.planner.plan_step(0))
    rig.finish_all(StepPlan(stores=[job]))
    assert all(rig.tier.lookup(x) is not None for x in request.block_hashes)
    rig.idle()


def test_eager_skips_blocks_not_computed_yet() -> None:
    rig = Rig(mode="eager")
    request = SimRequest("a", tokens(1, 12))
    ids = rig.ctx.allocate("a", 3)
    assert ids is not None
    rig.ctx.cache(ids[0], request.block_hashes[0])  # only the first block computed (aborted mid-prefill)
    rig.planner.store_finished(request, ids)
    (job,) = rig.planner.plan_step(0).stores
    assert job.gpu_block_ids == ids[:1]


# -- auto: stores at compute time while the tier has room -----------------------------------
def fill_tier(rig: Rig, tag: int, blocks: int) -> list[BlockHash]:
    """Commit ``blocks`` entries of a request nobody runs any more (used at the tier's clock now)."""
    hashes = chain_hashes(tokens(tag, blocks * BS))
    for block_hash in hashes:
        slot = rig.tier.reserve(block_hash)
        assert slot is not None
        rig.tier.commit(slot)
    return hashes


def test_auto_stores_each_block_in_the_step_vllm_caches_it_while_the_tier_has_room() -> None:
    rig = Rig(mode="auto")
    request = SimRequest("a", tokens(1, 10))  # 2 full blocks + a partial one
    ids = rig.ctx.allocate("a", 3)
    assert ids is not None
    rig.ctx.cache(ids[0], request.block_hashes[0])  # the first chunk: vLLM cached block 0 only
    assert rig.planner.store_computed(request, 0) == 1, "block 1 is not cached yet: retried"
    (job,) = rig.planner.plan_step(3).stores
    assert job.gpu_block_ids == ids[:1] and job.request_id is None, "one job for the step's stores"
    assert rig.ctx.get_block(ids[0]).ref_cnt == 2, "touched: vLLM cannot reuse it under the copy"
    rig.ctx.cache(ids[1], request.block_hashes[1])
    assert rig.planner.store_computed(request, 1) == 2, "the partial block has no hash"
    assert rig.planner.store_computed(request, 2) == 2, "nothing new: O(1)"
    (second,) = rig.planner.plan_step(0).stores
    assert second.gpu_block_ids == ids[1:2]
    assert not rig.planner.holds_free_blocks(), "a running request's blocks: nothing for vLLM to wait for"
    rig.ctx.release("a")
    assert rig.planner.holds_free_blocks(), "now the stores hold blocks vLLM would have free"
    rig.finish_all(StepPlan(stores=[job, second]))
    assert all(rig.tier.lookup(h) is not None for h in request.block_hashes)
    assert rig.planner.plan_step(0).stores == [], "the walk finds them stored"
    rig.idle()


def test_auto_without_room_leaves_blocks_to_the_lazy_walk() -> None:
    """A full tier whose entries were used within ``AUTO_MIN_IDLE_POOLS`` turnovers of the GPU pool is not
    evicted at compute time: the block is parked by the walk when vLLM is about to reuse it."""
    rig = Rig(mode="auto", slots=2)
    old = fill_tier(rig, 9, 2)
    request = SimRequest("a", tokens(1, 4))
    ids = rig.run(request)
    assert rig.planner.store_computed(request, 0) == 1, "passed over, not retried"
    assert rig.planner.plan_step(0).stores == [] and rig.tier.contains(old[0])
    rig.ctx.release("a")
    (park,) = rig.planner.plan_step(1).stores  # the walk: the block is next to be reused
    assert park.gpu_block_ids == ids[:1] and park.request_id is None
    assert not rig.tier.contains(old[0]), "parking evicts in LRU order, as lazy does"
    rig.finish_all(StepPlan(stores=[park]))
    rig.idle()


def test_auto_evicts_an_entry_idle_for_auto_min_idle_pools_turnovers() -> None:
    rig = Rig(mode="auto", slots=2)  # the pool: 16 blocks
    old = fill_tier(rig, 9, 2)
    rig.planner.plan_step(AUTO_MIN_IDLE_POOLS * 16 - 1)
    rig.tier.mark_used(rig.tier.lookup(old[1]) or 0)  # a hit: used now
    request = SimRequest("a", tokens(1, 8))
    ids = rig.run(request)
    rig.planner.plan_step(1)  # old[0] idle for AUTO_MIN_IDLE_POOLS turnovers, old[1] for 1 block
    assert rig.planner.store_computed(request, 0) == 2
    (job,) = rig.planner.plan_step(0).stores
    assert job.gpu_block_ids == ids[:1], "one idle entry to evict: the second block waits for the walk"
    assert not rig.tier.contains(old[0]) and rig.tier.contains(old[1])
    rig.finish_all(StepPlan(stores=[job]))
    rig.ctx.release("a")
    rig.finish_all(rig.planner.plan_step(0))
    rig.idle()


def test_auto_never_evicts_a_protected_entry_to_store_one_evicted_before_it() -> None:
    rig = Rig(mode="auto", slots=2, eviction="bid")
    kept = fill_tier(rig, 9, 2)
    rig.tier.protect(kept)  # a preempted request's blocks, waiting for it to resume
    rig.planner.plan_step(10 * AUTO_MIN_IDLE_POOLS * 16)
    request = SimRequest("a", tokens(1, 4))
    rig.run(request)
    rig.planner.store_computed(request, 0)
    assert rig.planner.plan_step(0).stores == [] and all(rig.tier.contains(h) for h in kept)


def test_auto_stores_no_block_a_load_wrote_until_the_load_finished() -> None:
    prompt = tokens(1, 8)
    rig, _ = stored_rig(prompt, mode="auto")
    request = SimRequest("b", prompt + tokens(2, 8))
    ids = rig.run(request)
    rig.planner.plan_load("b", request.block_hashes, ids, 0, 8)
    (load,) = rig.planner.plan_step(0).loads
    assert rig.planner.store_computed(request, 0) == 0, "blocks 0-1 unverified, and 2-3 attend to them"
    assert rig.planner.plan_step(0).stores == []
    rig.finish_all(StepPlan(loads=[load]))
    assert rig.planner.store_computed(request, 0) == 4
    (job,) = rig.planner.plan_step(0).stores
    assert job.gpu_block_ids == ids[2:4]


@pytest.mark.parametrize("mode", ["lazy", "eager"])
def test_preemption_rescues_a_victims_blocks_reused_or_not(mode: str) -> None:
    rig = Rig(mode=mode, eviction="bid")
    request = SimRequest("a", tokens(1, 14))  # 3 full blocks + a partial one
    ids = rig.run(request)
    victim = rig.blocks_of(ids)
    rig.ctx.release("a")
    reused = rig.ctx.allocate("b", rig.ctx.num_free_blocks() - 2)  # vLLM reuses all but 2 free blocks
    assert reused is not None
    free_before = rig.ctx.free_order()
    rig.planner.rescue("a", victim)
    plan = rig.planner.plan_step(0)
    (rescue,) = plan.rescues
    assert plan.stores == [] and rescue.kind == "store" and rescue.request_id == "a"
    assert rescue.gpu_block_ids == ids[:3]
    assert any(g in reused for g in ids[:3]) and any(g not in reused for g in ids[:3])
    assert rig.ctx.free_order() == free_before and rig.planner.ledger.held_gpu_blocks == 0, (
        "rescues take no touch"
    )
    rig.finish_all(plan)
    assert all(rig.tier.lookup(x) is not None for x in request.block_hashes), "every full block parked"
    assert rig.ctx.free_order() == free_before, "finishing a rescue frees nothing"
    assert rig.planner.stats()["blocks_rescued"] == 3 == rig.planner.stats()["blocks_stored"]
    rig.ctx.release("b")
    rig.idle()


def test_preemption_skips_shared_uncomputed_and_stored_blocks() -> None:
    prompt = tokens(1, 8)
    rig, _ = stored_rig(prompt)  # the prompt's 2 blocks are in the tier already
    request = SimRequest("a", prompt + tokens(2, 12))
    ids = rig.ctx.allocate("a", 5)
    assert ids is not None
    for block_id, block_hash in zip(ids[:4], request.block_hashes, strict=False):
        rig.ctx.cache(block_id, block_hash)  # block 4 is not computed yet (mid-prefill)
    rig.ctx.acquire("c", ids[2:3])  # block 2 is shared with a running request
    victim = rig.blocks_of(ids)
    rig.ctx.release("a")
    rig.planner.rescue("a", victim)
    (rescue,) = rig.planner.plan_step(0).rescues
    assert rescue.gpu_block_ids == ids[3:4]


def test_lazy_mode_ignores_finish() -> None:
    rig = Rig(mode="lazy")
    request = SimRequest("a", tokens(1, 8))
    ids = rig.run(request)
    rig.planner.store_finished(request, ids)
    assert rig.planner.ledger.jobs() == []


def test_bid_eviction_keeps_a_preempted_requests_blocks() -> None:
    rig = Rig(mode="lazy", eviction="bid", slots=4)
    victim = SimRequest("v", tokens(1, 8))
    ids = rig.run(victim)
    held = rig.blocks_of(ids)
    rig.ctx.release("v")
    rig.tier.protect(victim.block_hashes)  # as the scheduler side does while the victim waits
    rig.planner.rescue("v", held)
    rig.finish_all(rig.planner.plan_step(0))  # parks the victim's 2 blocks
    for i in range(3):  # 6 more blocks through a 4-slot tier
        rig.park(SimRequest(f"o{i}", tokens(10 + i, 8)))
        rig.finish_all(rig.planner.plan_step(0))
    assert all(rig.tier.lookup(x) is not None for x in victim.block_hashes)


def test_an_lru_rescue_never_evicts_its_own_earlier_blocks() -> None:
    """A 4-slot LRU tier holds the victim's first 2 blocks (oldest) and 2 others. Rescuing its
    4 later blocks must not evict the first ones: a resume loads a prefix, so later blocks
    without them are worthless. The others go first, then the rescue stops."""
    prompt = tokens(1, 8)
    rig, prefix = stored_rig(prompt, slots=4)  # LRU: the victim's prefix, stored first
    rig.park(SimRequest("other", tokens(2, 8)))
    rig.finish_all(rig.planner.plan_step(0))  # 2 more entries, more recently used
    victim = SimRequest("v", prompt + tokens(3, 16))
    ids = rig.run(victim)
    held = rig.blocks_of(ids)
    rig.ctx.release("v")
    rig.planner.rescue("v", held)
    rig.finish_all(rig.planner.plan_step(0))
    assert all(rig.tier.lookup(h) is not None for h in prefix), "the rescue evicted its own prefix"
    assert rig.planner.match(victim, 0) >= 4 * BS, "a resume loads the prefix and the rescued blocks"


def test_a_sliding_window_victim_rescues_the_blocks_inside_its_window() -> None:
    """Past its window a victim's first blocks are the null block (no hash): the rescue skips
    them and parks the blocks the window still needs."""
    rig = Rig(sliding_window=8)
    victim = SimRequest("v", tokens(1, 16))
    ids = rig.run(victim)
    held = [(0, None), (0, None), *rig.blocks_of(ids[2:])]  # as vLLM holds it: 2 slid out
    rig.ctx.release("v")
    rig.planner.rescue("v", held)
    (rescue,) = rig.planner.plan_step(0).rescues
    assert rescue.gpu_block_ids == ids[2:4]


# -- completion -----------------------------------------------------------------------
def test_a_job_needs_every_worker() -> None:
    rig = Rig(world_size=2)
    rig.park(SimRequest("a", tokens(1, 8)))
    (job,) = rig.planner.plan_step(0).stores
    rig.planner.complete(JobResults(done={job.job_id: 1}))
    assert rig.planner.ledger.jobs() == [job]
    rig.planner.complete(JobResults(done={job.job_id: 1}))
    assert rig.planner.ledger.jobs() == []
    before = rig.planner.stats()
    rig.planner.complete(JobResults(done={job.job_id: 1}, failed={job.job_id: 1}))  # late duplicates
    assert rig.planner.stats() == before
    rig.idle()


def test_a_failed_store_aborts_its_slots() -> None:
    rig = Rig(world_size=2)
    rig.park(SimRequest("a", tokens(1, 8)))
    (job,) = rig.planner.plan_step(0).stores
    rig.planner.complete(JobResults(done={job.job_id: 1}))
    rig.planner.complete(JobResults(failed={job.job_id: 1}))
    assert rig.tier.num_used == 0 and rig.planner.stats()["aborted_store_blocks"] == 2
    rig.idle()


def test_unknown_or_unsent_job_ids_raise_before_any_change() -> None:
    rig = Rig(mode="eager")
    request = SimRequest("a", tokens(1, 8))
    rig.planner.store_finished(request, rig.run(request))
    (queued,) = rig.planner.ledger.jobs()
    with pytest.raises(ValueError, match=f"job {queued.job_id}, which was never sent"):
        rig.planner.complete(JobResults(done={queued.job_id: 1}))
    with pytest.raises(ValueError, match="job 99, which was never sent"):
        rig.planner.complete(JobResults(done={99: 1}))
    assert rig.planner.ledger.jobs() == [queued]


def test_reset_drops_entries_and_aborts_stores_in_flight() -> None:
    prompt = tokens(1, 8)
    rig, hashes = stored_rig(prompt)
    rig.park(SimRequest("other", tokens(2, 8)))
    plan = rig.planner.plan_step(2)
    assert plan.stores
    rig.planner.reset()
    assert not any(rig.tier.contains(x) for x in hashes)
    rig.finish_all(plan)
    assert rig.tier.num_used == 0, "a store planned before the reset is not committed"


def test_restorable_counts_a_prefix() -> None:
    prompt = tokens(1, 8)
    rig, _ = stored_rig(prompt)
    request = SimRequest("b", prompt + tokens(2, 9))  # 2 blocks in the tier, then 2 private, 1 partial
    rig.run(request)
    refs, hashes = rig.ctx.request_ref_counts("b"), request.block_hashes

    def restorable(
        refs: Sequence[int], hashes: Sequence[BlockHash], start: int, computed: int
    ) -> tuple[int, int]:
        return restorable_tokens(rig.tier, refs, hashes, start, computed, BS)

    assert restorable(refs, hashes, 0, 4) == (8, 8)
    assert restorable(refs, hashes, 1, 4) == (4, 8), "a shared first block stays on GPU"
    rig.tier.drop(hashes[1])
    assert restorable(refs, hashes, 0, 4) == (4, 12), "a dropped private block is parked again"
    assert restorable(refs, hashes, 0, 1) == (4, 0), "stops at the first uncomputed block"
    assert restorable([1, 1, 2, 1], hashes, 0, 4) == (4, 4), "stops at a shared block"


def test_stats_and_constructor_errors() -> None:
    rig = Rig(block_bytes=100)
    rig.park(SimRequest("a", tokens(1, 8)))
    plan = rig.planner.plan_step(0)
    assert rig.planner.stats()["pending_jobs"] == 1 and rig.planner.ledger.held_gpu_blocks == 2
    assert rig.planner.ledger.held_store_blocks == 2
    rig.finish_all(plan)
    stats = rig.planner.stats()
    assert stats["blocks_stored"] == 2 and stats["bytes_stored"] == 200 and stats["gpu_blocks_held"] == 0
    with pytest.raises(ValueError, match="offload_mode='swap' is invalid; expected auto, lazy or eager"):
        OffloadSpec(mode="swap", num_slots=1)
    with pytest.raises(ValueError, match="offload_mode='off'"):
        OffloadSpec(mode="off", num_slots=1)  # with offload off no planner is built
    with pytest.raises(ValueError, match="world_size=0"):
        OffloadSpec(mode="lazy", num_slots=1, world_size=0)
    with pytest.raises(ValueError, match="lazy_lookahead_steps=0"):
        OffloadSpec(mode="lazy", num_slots=1, lookahead_steps=0)


def test_reference_context_follows_the_protocol() -> None:
    ctx = ReferenceContext(6, BS)
    assert isinstance(ctx, SchedulerContext)
    assert ctx.free_order() == [1, 2, 3, 4, 5] and ctx.num_free_blocks() == 5
    ctx.touch([2, 3])
    assert [b.block_id for b in ctx.iter_free_blocks()] == [1, 4, 5] and ctx.num_free_blocks() == 3
    assert ctx.allocate("r", 2) == [1, 4]
    assert [b.block_id for b in ctx.iter_free_blocks(after_block=2)] == [5], "2 left the queue: restart"
    ctx.free_blocks([3, 2])
    assert ctx.free_order() == [2, 3, 5]
    assert [b.block_id for b in ctx.iter_free_blocks(after_block=2)] == [3, 5]
    with pytest.raises(ValueError, match="block 2 would drop"):
        ctx.free_blocks([2])
    with pytest.raises(ValueError, match="null block"):
        ctx.touch([0])
    with pytest.raises(IndexError, match="block id 9"):
        ctx.get_block(9)


PlannerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=80, deadline=None)
test_planner_machine = PlannerMachine.TestCase


# -- late and per-rank completions ----------------------------------------------------
def test_a_store_failed_on_one_rank_keeps_its_slot_until_every_rank_reported() -> None:
    """Rank 1 fails a store while rank 0 is still copying into the same slot: the slot stays
    PENDING (it cannot be handed to the next store) until rank 0 reports, then is aborted."""
    rig = Rig(world_size=2, slots=2)
    rig.park(SimRequest("a", tokens(1, 8)))
    (job,) = rig.planner.plan_step(0).stores
    rig.planner.complete(JobResults(failed={job.job_id: 1}))  # rank 1; rank 0 still writing
    assert rig.planner.ledger.jobs() == [job] and rig.tier.num_free == 0
    rig.park(SimRequest("b", tokens(2, 8)))
    assert rig.planner.plan_step(0).stores == [], "a slot rank 0 may write was reused"
    rig.planner.complete(JobResults(done={job.job_id: 1}))  # rank 0 done: the job failed
    assert rig.planner.ledger.jobs() == [] and rig.tier.num_used == 0
    assert rig.planner.stats()["aborted_store_blocks"] == 2 and rig.planner.stats()["blocks_stored"] == 0


def test_blocks_of_an_unfinished_or_failed_load_are_never_stored() -> None:
    """A load's destination blocks are unverified until every worker reported it; a failed
    one's blocks (and the request's later ones, computed from them) stay distrusted, and a
    store issued while the load was unverified is aborted when it fails."""
    prompt = tokens(1, 8)
    rig, hashes = stored_rig(prompt)
    request = SimRequest("b", prompt + tokens(2, 8))
    ids = rig.run(request)
    rig.planner.plan_load("b", request.block_hashes, ids, 0, 8)
    (load,) = rig.planner.plan_step(0).loads
    # Preempted while its load is in flight: vLLM frees its blocks; the rescue stops at the
    # unverified first block (the later ones attended to it).
    victim = rig.blocks_of(ids)
    rig.ctx.release("b")
    rig.planner.rescue("b", victim)
    plan = rig.planner.plan_step(0)
    assert plan.rescues == []
    # The lazy walk's store of the free later blocks, issued while the load is unverified,
    # is aborted when the load fails.
    (store,) = plan.stores
    assert set(store.gpu_block_ids) <= set(ids[2:]), "the walk skips the unverified blocks"
    rig.planner.complete(JobResults(failed={load.job_id: 1}))
    rig.planner.complete(JobResults(done={store.job_id: 1}))
    assert not any(rig.tier.contains(h) for h in request.block_hashes[2:]), "KV computed from a failed load"
    assert rig.planner.plan_step(0).stores == [], "distrusted blocks are not stored later"
    rig.idle()

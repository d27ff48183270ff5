"""OffloadPlanner against the reference SchedulerContext: lazy walk, loads, eager stores,
completion, protection — and ``PlannerMachine``, the stateful property test that
``tests/sched/test_planner_blockpool.py`` reruns over vLLM's real BlockPool."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import pytest
from hypothesis import settings, target
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.unit.reference_context import ReferenceContext
from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.context import BlockHash, RequestView, SchedulerContext
from vllm_bidkv.offload import CpuBlockTier, JobResults, OffloadPlanner, StepPlan, TransferJob
from vllm_bidkv.scheduler_side import BidKVSchedulerSide, StepEvents

pytestmark = pytest.mark.unit

BS = 4  # tokens per block in these tests


def chain_hashes(tokens: Sequence[int], block_size: int = BS) -> list[BlockHash]:
    """Prefix-chained hashes of the full blocks (like vLLM's block hashes)."""
    hashes: list[BlockHash] = []
    parent = b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        data = parent + b",".join(str(t).encode() for t in tokens[start : start + block_size])
        parent = hashlib.blake2b(data, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class SimRequest:
    """A ``RequestView`` whose block hashes follow its tokens."""

    def __init__(self, request_id: str, prompt: list[int], max_tokens: int = 8, arrival_time: float = 0.0):
        self.request_id = request_id
        self.tokens = list(prompt)
        self.num_prompt_tokens = len(prompt)
        self.num_computed_tokens = 0
        self.max_tokens: int | None = max_tokens
        self.num_preemptions = 0
        self.priority = 0
        self.arrival_time = arrival_time

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self.tokens) - self.num_prompt_tokens

    @property
    def block_hashes(self) -> list[BlockHash]:
        return chain_hashes(self.tokens)


def tokens(tag: int, n: int) -> list[int]:
    return [tag * 1000 + i for i in range(n)]


class Rig:
    """Reference context + tier + planner, and helpers that play vLLM."""

    def __init__(
        self, num_blocks: int = 16, slots: int = 8, mode: str = "lazy", eviction: str = "lru", **kw: object
    ) -> None:
        self.ctx = ReferenceContext(num_blocks, BS)
        self.tier = CpuBlockTier(slots, eviction)
        self.planner = OffloadPlanner(self.ctx, self.tier, mode, 2.0, **kw)  # type: ignore[arg-type]

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
        assert self.planner.pending_jobs() == [] and self.tier.num_pins == 0
        self.tier.check()


# -- lazy walk -------------------------------------------------------------------
def test_lazy_walk_stores_hashed_blocks_once() -> None:
    rig = Rig()
    request = SimRequest("a", tokens(1, 10))  # 2 full blocks + a partial one
    ids = rig.park(request)
    plan = rig.planner.plan_step(0)
    (job,) = plan.post_forward_stores
    assert job.kind == "store" and job.request_id is None and plan.pre_forward_loads == []
    assert sorted(job.gpu_block_ids) == sorted(ids[:2])  # the partial block has no hash
    assert [rig.tier.hash_of(s) for s in job.cpu_slots] == [
        rig.ctx.get_block(g).block_hash for g in job.gpu_block_ids
    ]
    assert all(rig.ctx.get_block(g).ref_cnt == 1 for g in job.gpu_block_ids)
    assert rig.planner.plan_step(0).post_forward_stores == [], "pending stores are not planned twice"
    rig.finish_all(plan)
    assert all(rig.tier.lookup(x) is not None for x in request.block_hashes)
    assert rig.planner.plan_step(0).post_forward_stores == [], "stored blocks are not stored again"
    rig.idle()


def test_lazy_touch_and_free_keep_the_free_order() -> None:
    rig = Rig()
    for i in range(3):
        rig.park(SimRequest(f"r{i}", tokens(i, 8)))
    before = rig.ctx.free_order()
    plan = rig.planner.plan_step(0)
    assert plan.post_forward_stores
    assert [b for b in before if b not in plan.post_forward_stores[0].gpu_block_ids] == rig.ctx.free_order()
    rig.finish_all(plan)
    assert rig.ctx.free_order() == before


def test_lazy_walk_skips_duplicate_hashes() -> None:
    rig = Rig()
    rig.park(SimRequest("a", tokens(1, 8)))
    rig.park(SimRequest("b", tokens(1, 8)))  # same content, other blocks
    (job,) = rig.planner.plan_step(0).post_forward_stores
    assert len(job.gpu_block_ids) == 2
    assert len({rig.tier.hash_of(s) for s in job.cpu_slots}) == 2


def test_lazy_walk_stops_when_every_slot_is_pending() -> None:
    rig = Rig(slots=3)
    rig.park(SimRequest("a", tokens(1, 20)))  # 5 hashed blocks
    (job,) = rig.planner.plan_step(0).post_forward_stores
    assert len(job.cpu_slots) == 3 and rig.tier.num_used == 3
    assert rig.planner.plan_step(0).post_forward_stores == []
    rig.planner.complete(JobResults(done={job.job_id: 1}))
    (job2,) = rig.planner.plan_step(0).post_forward_stores  # now evicts the oldest entries
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
    (job,) = rig.planner.plan_step(0).post_forward_stores
    assert job.gpu_block_ids == order[:4]
    rig.finish_all(StepPlan(post_forward_stores=[job]))
    assert rig.planner.plan_step(0).post_forward_stores == []  # revisits the 4 stored blocks
    assert rig.planner._cursor is not None and rig.planner._cursor[0] == order[3]
    rig.ctx.acquire("hit", [order[3]])  # a prefix hit takes the cursor out of the queue
    (job,) = rig.planner.plan_step(0).post_forward_stores
    assert job.gpu_block_ids == [order[4]], "restarted at the LRU end, walked 3 clean blocks + 1 new"


def test_lazy_walk_restarts_when_the_cursor_was_reused() -> None:
    rig = Rig(num_blocks=16, slots=16, min_clean_blocks=4)
    rig.park(SimRequest("a", tokens(1, 4 * 15)))
    order = rig.ctx.free_order()
    rig.finish_all(rig.planner.plan_step(0))
    assert rig.planner._resume_point() == order[3], "the last stored block is back in place"
    rig.ctx.take("x", [order[3]])  # reused and freed again within one step: free, but unhashed
    rig.ctx.release("x")
    assert rig.ctx.get_block(order[3]).ref_cnt == 0
    assert rig.planner._resume_point() is None


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
    (job,) = plan.pre_forward_loads
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
    (job,) = rig.planner.plan_step(0).pre_forward_loads
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
    (job,) = rig.planner.plan_step(0).pre_forward_loads
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
    (job,) = rig.planner.plan_step(0).pre_forward_loads
    assert job.gpu_block_ids == real[:2] and job.cpu_slots == [rig.tier.lookup(h) for h in hashes[4:6]]
    assert job.unavailable_gpu_block_ids == [] and rig.tier.num_pins == 2
    rig.finish_all(StepPlan(pre_forward_loads=[job]))
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
    assert rig.planner.plan_step(0).post_forward_stores == [], "eager mode does not walk"
    rig.planner.store_finished(request, ids)
    rig.ctx.release("a")
    (job,) = rig.planner.plan_step(0).post_forward_stores
    assert job.gpu_block_ids == ids[:2] and job.request_id == "a"
    assert all(rig.ctx.get_block(g).ref_cnt == 1 for g in ids[:2]), "held by the store only"
    rig.finish_all(rig.planner.plan_step(0))
    rig.finish_all(StepPlan(post_forward_stores=[job]))
    assert all(rig.tier.lookup(x) is not None for x in request.block_hashes)
    rig.idle()


def test_eager_skips_blocks_not_computed_yet() -> None:
    rig = Rig(mode="eager")
    request = SimRequest("a", tokens(1, 12))
    ids = rig.ctx.allocate("a", 3)
    assert ids is not None
    rig.ctx.cache(ids[0], request.block_hashes[0])  # only the first block computed (aborted mid-prefill)
    rig.planner.store_finished(request, ids)
    (job,) = rig.planner.plan_step(0).post_forward_stores
    assert job.gpu_block_ids == ids[:1]


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
    (rescue,) = plan.pre_forward_stores
    assert plan.post_forward_stores == [] and rescue.kind == "store" and rescue.request_id == "a"
    assert rescue.gpu_block_ids == ids[:3]
    assert any(g in reused for g in ids[:3]) and any(g not in reused for g in ids[:3])
    assert rig.ctx.free_order() == free_before and rig.planner.held_gpu_blocks == 0, "rescues take no touch"
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
    (rescue,) = rig.planner.plan_step(0).pre_forward_stores
    assert rescue.gpu_block_ids == ids[3:4]


def test_lazy_mode_ignores_finish_and_off_mode_parks_nothing() -> None:
    rig = Rig(mode="lazy")
    request = SimRequest("a", tokens(1, 8))
    ids = rig.run(request)
    rig.planner.store_finished(request, ids)
    assert rig.planner.pending_jobs() == []
    off = Rig(mode="off")
    off_ids = off.run(request)
    victim = off.blocks_of(off_ids)
    off.ctx.release("a")
    off.planner.rescue("a", victim)
    assert off.planner.pending_jobs() == [] and off.planner.plan_step(0).jobs() == []


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
    (rescue,) = rig.planner.plan_step(0).pre_forward_stores
    assert rescue.gpu_block_ids == ids[2:4]


# -- completion -----------------------------------------------------------------------
def test_a_job_needs_every_worker() -> None:
    rig = Rig(world_size=2)
    rig.park(SimRequest("a", tokens(1, 8)))
    (job,) = rig.planner.plan_step(0).post_forward_stores
    rig.planner.complete(JobResults(done={job.job_id: 1}))
    assert rig.planner.pending_jobs() == [job]
    rig.planner.complete(JobResults(done={job.job_id: 1}))
    assert rig.planner.pending_jobs() == []
    before = rig.planner.stats()
    rig.planner.complete(JobResults(done={job.job_id: 1}, failed={job.job_id: 1}))  # late duplicates
    assert rig.planner.stats() == before
    rig.idle()


def test_a_failed_store_aborts_its_slots() -> None:
    rig = Rig(world_size=2)
    rig.park(SimRequest("a", tokens(1, 8)))
    (job,) = rig.planner.plan_step(0).post_forward_stores
    rig.planner.complete(JobResults(done={job.job_id: 1}))
    rig.planner.complete(JobResults(failed={job.job_id: 1}))
    assert rig.tier.num_used == 0 and rig.planner.stats()["aborted_store_blocks"] == 2
    rig.idle()


def test_unknown_or_unsent_job_ids_raise_before_any_change() -> None:
    rig = Rig(mode="eager")
    request = SimRequest("a", tokens(1, 8))
    rig.planner.store_finished(request, rig.run(request))
    (queued,) = rig.planner.pending_jobs()
    with pytest.raises(ValueError, match=f"job {queued.job_id}, which was never sent"):
        rig.planner.complete(JobResults(done={queued.job_id: 1}))
    with pytest.raises(ValueError, match="job 99, which was never sent"):
        rig.planner.complete(JobResults(done={99: 1}))
    assert rig.planner.pending_jobs() == [queued]


def test_reset_drops_entries_and_aborts_stores_in_flight() -> None:
    prompt = tokens(1, 8)
    rig, hashes = stored_rig(prompt)
    rig.park(SimRequest("other", tokens(2, 8)))
    plan = rig.planner.plan_step(2)
    assert plan.post_forward_stores
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
    assert rig.planner.restorable(refs, hashes, 0, 4) == (8, 8)
    assert rig.planner.restorable(refs, hashes, 1, 4) == (4, 8), "a shared first block stays on GPU"
    rig.tier.drop(hashes[1])
    assert rig.planner.restorable(refs, hashes, 0, 4) == (4, 12), "a dropped private block is parked again"
    assert rig.planner.restorable(refs, hashes, 0, 1) == (4, 0), "stops at the first uncomputed block"
    assert rig.planner.restorable([1, 1, 2, 1], hashes, 0, 4) == (4, 4), "stops at a shared block"
    off = Rig(mode="off")
    off.run(SimRequest("d", prompt))
    assert off.planner.restorable(off.ctx.request_ref_counts("d"), chain_hashes(prompt), 0, 2) == (0, 0)


def test_stats_and_constructor_errors() -> None:
    rig = Rig(block_bytes=100)
    rig.park(SimRequest("a", tokens(1, 8)))
    plan = rig.planner.plan_step(0)
    assert rig.planner.stats()["pending_jobs"] == 1 and rig.planner.held_gpu_blocks == 2
    assert rig.planner.held_store_blocks == 2
    rig.finish_all(plan)
    stats = rig.planner.stats()
    assert stats["blocks_stored"] == 2 and stats["bytes_stored"] == 200 and stats["gpu_blocks_held"] == 0
    ctx, tier = ReferenceContext(4, BS), CpuBlockTier(1)
    with pytest.raises(ValueError, match="offload_mode='swap'"):
        OffloadPlanner(ctx, tier, "swap", 2.0)
    with pytest.raises(ValueError, match="world_size=0"):
        OffloadPlanner(ctx, tier, "lazy", 2.0, 0)


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


# -- the stateful property test ----------------------------------------------------------
class VllmSide(Protocol):
    """What ``PlannerMachine`` drives as vLLM (``ReferenceContext`` has it; sched: a BlockPool)."""

    def allocate(self, request_id: str, num_blocks: int) -> list[int] | None: ...
    def acquire(self, request_id: str, block_ids: Sequence[int]) -> None: ...
    def release(self, request_id: str) -> list[int]: ...
    def cache(self, block_id: int, block_hash: BlockHash) -> None: ...
    def lookup(self, block_hash: BlockHash) -> int | None: ...
    def free_order(self) -> list[int]: ...
    def num_free_blocks(self) -> int: ...


PoolFactory = Callable[[int, int], tuple[SchedulerContext, VllmSide]]


def reference_pool(num_blocks: int, block_size: int) -> tuple[SchedulerContext, VllmSide]:
    ctx = ReferenceContext(num_blocks, block_size)
    return ctx, ctx


FAMILIES = [tokens(900 + f, 4 * BS) for f in range(2)]  # shared prompt prefixes
NUM_BLOCKS = 14  # including the null block: small, so vLLM evicts and the CPU tier gets hits


class MachineContext:
    """The machine's pool context plus the request views vLLM's Scheduler would give."""

    def __init__(self, pool: SchedulerContext, machine: PlannerMachine) -> None:
        self._pool = pool
        self._machine = machine

    def __getattr__(self, name: str) -> object:
        return getattr(self._pool, name)

    def request_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        held = self._machine.blocks.get(request_id)
        return (list(held),) if held else ()

    def request_ref_counts(self, request_id: str) -> list[int]:
        return [self._pool.get_block(b).ref_cnt for b in self._machine.blocks.get(request_id, ())]

    def get_request(self, request_id: str) -> RequestView | None:
        return self._machine.requests.get(request_id)


class PlannerMachine(RuleBasedStateMachine):
    """A small vLLM around the planner: requests arrive, prefill (with GPU and CPU prefix
    hits), decode, finish, abort, get preempted and resume; workers complete or fail jobs
    late and in any order. Content is tracked per GPU block and CPU slot, so a copy from or
    into a block that was reused, or a load of a wrong slot, is caught. A shadow reference
    pool replays vLLM's operations without the planner: the free order must match it.
    """

    make_pool: PoolFactory = staticmethod(reference_pool)
    # The reference model keeps every block the planner holds at the place vLLM's LRU order
    # gives it; an adapter over real vLLM only promises that for blocks touched while free
    # and freed with nothing in between, and may compare the free set only.
    exact_free_order = True

    @initialize(
        mode=st.sampled_from(["lazy", "eager"]),
        eviction=st.sampled_from(["lru", "bid"]),
        world_size=st.sampled_from([1, 2]),
        slots=st.integers(2, 12),
    )
    def setup(self, mode: str, eviction: str, world_size: int, slots: int) -> None:
        self.ctx, self.vllm = self.make_pool(NUM_BLOCKS, BS)
        self.shadow = ReferenceContext(NUM_BLOCKS, BS)
        config = BidKVConfig(
            victim_policy="vllm-default", offload_mode=mode, cpu_eviction=eviction, lazy_lookahead_steps=2.0
        )
        self.side = BidKVSchedulerSide(config, num_slots=slots, world_size=world_size, min_clean_blocks=3)
        self.side.bind(MachineContext(self.ctx, self))
        assert self.side.planner is not None
        self.planner, self.tier = self.side.planner, self.side.planner.tier
        self.world_size = world_size
        self.waiting: list[SimRequest] = []
        self.running: list[SimRequest] = []
        self.blocks: dict[str, list[int]] = {}  # running request -> its blocks (machine's own record)
        self.gpu: dict[int, BlockHash | None] = {}  # block -> hash whose KV its bytes hold
        self.written: set[int] = set()  # blocks whose bytes are their current owner's KV
        self.requests: dict[str, SimRequest] = {}  # live (waiting or running) requests
        self.preempted_now: list[str] = []  # preempted in this step (vLLM's preempted_req_ids)
        self.resumed_now: list[str] = []
        self.rescues: set[int] = set()  # job ids of rescues (copied when emitted; no touch)
        self.cpu: dict[int, BlockHash | None] = {}  # slot -> hash whose KV it holds
        self.sent: dict[int, tuple[TransferJob, int]] = {}  # job -> acks reported so far
        self.finished_jobs: list[int] = []
        self.emitted: set[int] = set()
        self.preempted: set[str] = set()
        self.allocated = 0
        self.next_id = 0

    # -- vLLM --------------------------------------------------------------------------
    def _allocate(self, request_id: str, n: int) -> list[int] | None:
        ids = self.vllm.allocate(request_id, n)
        if ids is not None:
            self.shadow.take(request_id, ids)
            self.blocks[request_id].extend(ids)
            self.allocated += n
            # The bytes stay what they were (a rescue may still read them) until computed or loaded.
            self.written.difference_update(ids)
        return ids

    def _release(self, request: SimRequest) -> list[int]:
        held = self.blocks.pop(request.request_id)
        self.vllm.release(request.request_id)
        self.shadow.release(request.request_id)
        return held

    def _admit(self, request: SimRequest, lose_hit: bool) -> bool:
        hashes = request.block_hashes
        hits: list[int] = []
        for block_hash in hashes[: (request.num_tokens - 1) // BS]:
            block_id = self.vllm.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        computed = len(hits) * BS
        self.requests[request.request_id] = request
        external = self.side.match(request, computed)
        need = math.ceil(request.num_tokens / BS) - len(hits)
        free_hits = sum(1 for b in hits if self.ctx.get_block(b).ref_cnt == 0)
        if self.vllm.num_free_blocks() - free_hits < need:
            return False
        self.blocks[request.request_id] = []
        self.vllm.acquire(request.request_id, hits)
        self.shadow.acquire(request.request_id, hits)
        self.blocks[request.request_id].extend(hits)
        for i, block_id in enumerate(hits):
            assert self.gpu[block_id] == hashes[i], f"GPU prefix hit on block {block_id} with wrong KV"
        assert self._allocate(request.request_id, need) is not None
        if request.request_id in self.preempted:
            self.preempted.discard(request.request_id)
            self.resumed_now.append(request.request_id)
        if external:
            ids = self.blocks[request.request_id]
            last = (computed + external - 1) // BS
            if lose_hit:  # the last matched entry leaves the tier before the allocation
                self.tier.drop(hashes[last])
            unavailable = self.side.after_alloc(request, ids, external)
            assert unavailable == (ids[last : last + 1] if lose_hit else [])
        request.num_computed_tokens = computed + external
        return True

    def _forward(self, request: SimRequest) -> None:
        """Compute what is not computed yet; full blocks enter the prefix cache."""
        ids = self.blocks[request.request_id]
        for i, block_hash in enumerate(request.block_hashes):
            block_id = ids[i]
            if block_id not in self.written:
                self.gpu[block_id] = block_hash
                self.written.add(block_id)
            assert self.gpu[block_id] == block_hash, f"block {block_id} holds wrong KV"
            if self.ctx.get_block(block_id).block_hash is None:
                self.vllm.cache(block_id, block_hash)
                self.shadow.cache(block_id, block_hash)
        request.num_computed_tokens = request.num_tokens

    def _preempt(self, preemptible: list[SimRequest], requester: SimRequest | None) -> SimRequest:
        """The victim hook asks the scheduler side, then vLLM preempts its pick."""
        request = self.side.choose_victim(preemptible, requester)
        assert request is preemptible[-1], "vllm-default keeps vLLM's victim"
        assert isinstance(request, SimRequest)
        self.running.remove(request)
        self._release(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.insert(0, request)
        self.preempted.add(request.request_id)
        self.preempted_now.append(request.request_id)  # the connector hears of it at the step's plan
        return request

    def _finish(self, request: SimRequest) -> None:
        held = self.blocks.get(request.request_id, [])
        self.side.finished(request, list(held))
        if request in self.running:
            self.running.remove(request)
            self._release(request)
        else:
            self.waiting.remove(request)
        self.preempted.discard(request.request_id)
        self.requests.pop(request.request_id, None)
        self.preempted_now = [r for r in self.preempted_now if r != request.request_id]

    def _plan(self, allocated: int) -> StepPlan:
        events = StepEvents(allocated, list(self.resumed_now), list(self.preempted_now))
        self.preempted_now, self.resumed_now = [], []
        return self.side.plan_step(events)

    def _emit(self, plan: StepPlan) -> None:
        for job in plan.pre_forward_stores:  # rescues: the bytes must still be the victim's
            self.rescues.add(job.job_id)
            for block_id, slot in zip(job.gpu_block_ids, job.cpu_slots, strict=True):
                assert self.gpu[block_id] == self.tier.hash_of(slot), (
                    f"rescue of overwritten block {block_id}"
                )
                self.cpu[slot] = self.gpu[block_id]
        for job in plan.pre_forward_loads:
            ids = self.blocks[job.request_id or ""]
            request = next(r for r in self.running if r.request_id == job.request_id)
            for block_id, slot in zip(job.gpu_block_ids, job.cpu_slots, strict=True):
                expected = request.block_hashes[ids.index(block_id)]
                assert self.cpu.get(slot) == expected, f"load of slot {slot} into block {block_id}: wrong KV"
                self.gpu[block_id] = self.cpu[slot]
                self.written.add(block_id)
        for job in plan.post_forward_stores:
            for block_id, slot in zip(job.gpu_block_ids, job.cpu_slots, strict=True):
                assert self.ctx.get_block(block_id).block_hash == self.tier.hash_of(slot)
        for job in plan.jobs():
            self.sent[job.job_id] = (job, 0)
            self.emitted.add(job.job_id)

    # -- rules ---------------------------------------------------------------------------
    @precondition(lambda self: len(self.waiting) + len(self.running) < 6)
    @rule(
        family=st.integers(0, 1),
        prefix_blocks=st.integers(0, 4),
        suffix=st.integers(1, 6),
        out=st.integers(1, 8),
    )
    def arrive(self, family: int, prefix_blocks: int, suffix: int, out: int) -> None:
        self.next_id += 1
        prompt = FAMILIES[family][: prefix_blocks * BS] + tokens(self.next_id, suffix)
        self.waiting.append(SimRequest(f"r{self.next_id}", prompt, max_tokens=out))

    @rule(steps=st.integers(1, 4), dice=st.integers(0, 2))
    def step(self, steps: int, dice: int) -> None:
        for _ in range(steps):
            self._step(lose_hit=dice == 0)

    def _step(self, lose_hit: bool) -> None:
        """One scheduler step: decode the running, admit the waiting, plan, forward."""
        for request in list(self.running):
            if request not in self.running:
                continue  # preempted below for an earlier request
            request.tokens.append(hash((request.request_id, request.num_tokens)) % 997)
            while len(self.blocks[request.request_id]) * BS < request.num_tokens:
                if self._allocate(request.request_id, 1) is not None:
                    break
                victim = self._preempt(self.running[self.running.index(request) :], request)
                if victim is request:
                    break
        while self.waiting and self._admit(self.waiting[0], lose_hit):
            self.running.append(self.waiting.pop(0))
        plan = self._plan(self.allocated)
        self.allocated = 0
        self._emit(plan)
        for request in self.running:
            self._forward(request)
        for request in [r for r in self.running if r.num_output_tokens >= (r.max_tokens or 0)]:
            self._finish(request)

    @rule(blocks=st.integers(1, NUM_BLOCKS))
    def flood(self, blocks: int) -> None:
        """A burst of unhashed allocations (a long prefill) pushes cached blocks out of HBM."""
        self.next_id += 1
        request_id = f"flood{self.next_id}"
        self.blocks[request_id] = []
        self._allocate(request_id, min(blocks, self.vllm.num_free_blocks()))
        self._release(SimRequest(request_id, []))

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), jobs=st.integers(1, 4))
    def transfers_done(self, data: st.DataObject, jobs: int) -> None:
        for _ in range(jobs):
            if self.sent:
                self._transfer_done(data)

    def _transfer_done(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.sent)))
        job, acks = self.sent[job_id]
        count = data.draw(st.integers(1, self.world_size - acks))
        if acks + count == self.world_size:
            del self.sent[job_id]
            self.finished_jobs.append(job_id)
            if job.kind == "store" and job_id not in self.rescues:  # the copy lands now, as late as possible
                for block_id, slot in zip(job.gpu_block_ids, job.cpu_slots, strict=True):
                    assert self.gpu[block_id] == self.tier.hash_of(slot), (
                        f"store from reused block {block_id}"
                    )
                    self.cpu[slot] = self.gpu[block_id]
        else:
            self.sent[job_id] = (job, acks + count)
        self.side.complete(JobResults(done={job_id: count}))

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def transfer_failed(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.sent)))
        job, acks = self.sent.pop(job_id)
        self.finished_jobs.append(job_id)
        if job.kind == "store":
            for slot in job.cpu_slots:
                self.cpu[slot] = None  # a torn copy
        # One worker failed it; the others report it done, in any order: the job ends with the last.
        failed_first = data.draw(st.booleans())
        rest = JobResults(done={job_id: self.world_size - acks - 1}) if self.world_size - acks > 1 else None
        if rest is not None and not failed_first:
            self.side.complete(rest)
            assert job in self.planner.pending_jobs(), "finished before every worker reported"
        self.side.complete(JobResults(failed={job_id: 1}))
        if rest is not None and failed_first:
            assert job in self.planner.pending_jobs(), "a failure on one worker finished the job early"
            self.side.complete(rest)

    @precondition(lambda self: self.finished_jobs)
    @rule(data=st.data())
    def duplicate_report(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.finished_jobs))
        before = self.planner.stats()
        self.side.complete(JobResults(done={job_id: 1}, failed={job_id: 1}))
        assert self.planner.stats() == before

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        self._finish(data.draw(st.sampled_from(self.running)))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def abort_waiting(self, data: st.DataObject) -> None:
        self._finish(data.draw(st.sampled_from(self.waiting)))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        self._preempt([data.draw(st.sampled_from(self.running))], None)

    @rule(dice=st.integers(0, 9))
    def reset_cache(self, dice: int) -> None:
        if dice == 0:  # rare: it empties the CPU tier
            self.side.reset()

    # -- invariants ------------------------------------------------------------------------
    def _touched(self) -> Counter[int]:
        jobs = self.planner.pending_jobs()
        return Counter(b for job in jobs if job.job_id not in self.rescues for b in job.gpu_block_ids)

    @invariant()
    def references_balance(self) -> None:
        if not hasattr(self, "planner"):
            return
        holders = Counter(b for ids in self.blocks.values() for b in ids)
        touched = self._touched()
        for block_id in range(1, NUM_BLOCKS):
            ref_cnt = self.ctx.get_block(block_id).ref_cnt
            assert ref_cnt == holders[block_id] + touched[block_id], (
                f"block {block_id}: ref_cnt {ref_cnt}, held by requests {holders[block_id]}, "
                f"by jobs {touched[block_id]}"
            )

    @invariant()
    def tier_consistent(self) -> None:
        if not hasattr(self, "planner"):
            return
        self.tier.check()
        assert self.tier.num_used <= self.tier.num_slots
        pending = self.planner.pending_jobs()
        loads = [job for job in pending if job.kind == "load"]
        assert self.tier.num_pins == sum(len(job.cpu_slots) for job in loads)
        # Sent jobs stay pending until every worker reported them (or one failed them).
        assert {job.job_id for job in pending if job.job_id in self.emitted} == set(self.sent)

    @invariant()
    def free_order_unchanged(self) -> None:
        if not hasattr(self, "planner"):
            return
        touched = self._touched()
        expected = [b for b in self.shadow.free_order() if b not in touched]
        self._same_free_queue(self.vllm.free_order(), expected)

    def _same_free_queue(self, actual: list[int], expected: list[int]) -> None:
        if self.exact_free_order:
            assert actual == expected
        else:
            assert sorted(actual) == sorted(expected)

    def teardown(self) -> None:
        """Drain: finish every request and job; then nothing is held and the order is stock."""
        if not hasattr(self, "planner"):
            return
        # Steer generation towards runs where the CPU tier serves hits.
        target(float(self.side.counters["cpu_hit_blocks"]), label="cpu hit blocks")
        for request in [*self.running, *self.waiting]:
            self._finish(request)
        for _ in range(100):
            self._emit(self._plan(0))
            if not self.sent:
                break
            for job_id, (_job, acks) in list(self.sent.items()):
                self.side.complete(JobResults(done={job_id: self.world_size - acks}))
            self.sent.clear()
        assert self.planner.pending_jobs() == []
        assert self.side.requests == {}, "every request's record goes when it finishes"
        assert all(self.ctx.get_block(b).ref_cnt == 0 for b in range(1, NUM_BLOCKS))
        self._same_free_queue(self.vllm.free_order(), self.shadow.free_order())
        assert self.tier.num_pins == 0
        self.tier.check()


PlannerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=80, deadline=None)
test_planner_machine = PlannerMachine.TestCase


# -- late and per-rank completions ----------------------------------------------------
def test_a_store_failed_on_one_rank_keeps_its_slot_until_every_rank_reported() -> None:
    """Rank 1 fails a store while rank 0 is still copying into the same slot: the slot stays
    PENDING (it cannot be handed to the next store) until rank 0 reports, then is aborted."""
    rig = Rig(world_size=2, slots=2)
    rig.park(SimRequest("a", tokens(1, 8)))
    (job,) = rig.planner.plan_step(0).post_forward_stores
    rig.planner.complete(JobResults(failed={job.job_id: 1}))  # rank 1; rank 0 still writing
    assert rig.planner.pending_jobs() == [job] and rig.tier.num_free == 0
    rig.park(SimRequest("b", tokens(2, 8)))
    assert rig.planner.plan_step(0).post_forward_stores == [], "a slot rank 0 may write was reused"
    rig.planner.complete(JobResults(done={job.job_id: 1}))  # rank 0 done: the job failed
    assert rig.planner.pending_jobs() == [] and rig.tier.num_used == 0
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
    (load,) = rig.planner.plan_step(0).pre_forward_loads
    # Preempted while its load is in flight: vLLM frees its blocks; the rescue stops at the
    # unverified first block (the later ones attended to it).
    victim = rig.blocks_of(ids)
    rig.ctx.release("b")
    rig.planner.rescue("b", victim)
    plan = rig.planner.plan_step(0)
    assert plan.pre_forward_stores == []
    # The lazy walk's store of the free later blocks, issued while the load is unverified,
    # is aborted when the load fails.
    (store,) = plan.post_forward_stores
    assert set(store.gpu_block_ids) <= set(ids[2:]), "the walk skips the unverified blocks"
    rig.planner.complete(JobResults(failed={load.job_id: 1}))
    rig.planner.complete(JobResults(done={store.job_id: 1}))
    assert not any(rig.tier.contains(h) for h in request.block_hashes[2:]), "KV computed from a failed load"
    assert rig.planner.plan_step(0).post_forward_stores == [], "distrusted blocks are not stored later"
    rig.idle()

"""BidKVSchedulerSide driven as vLLM drives it: per-request records, pins, counters."""

from __future__ import annotations

import pytest

from tests.support.planner_machine import BS, SimRequest, tokens
from tests.unit.reference_context import ReferenceContext
from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.offload import JobResults, OffloadSpec, StepPlan, lookup
from vllm_bidkv.offload.lookup import held_candidate, victim_candidate
from vllm_bidkv.policy.strategies import Bid02Strategy
from vllm_bidkv.scheduler_side import BidKVSchedulerSide
from vllm_bidkv.step_events import StepEvents

pytestmark = pytest.mark.unit


class Rig:
    """A scheduler side on the reference context, and helpers that play vLLM's scheduler."""

    def __init__(self, world_size: int = 1, slots: int = 16, **config: object) -> None:
        settings: dict[str, object] = {"victim_policy": "bidkv", "offload_mode": "lazy", **config}
        self.ctx = ReferenceContext(24, BS)
        config = BidKVConfig(**settings)  # type: ignore[arg-type]
        # min_clean_blocks 32: the lazy walk covers the whole free queue each step.
        spec = OffloadSpec.from_config(
            config, num_slots=slots, block_bytes=64, world_size=world_size, min_clean_blocks=32
        )
        self.side = BidKVSchedulerSide(config, offload=spec)
        self.side.bind(self.ctx)
        self.world_size = world_size

    def admit(self, request: SimRequest, gpu_hit: int = 0) -> int:
        """vLLM's admission of a waiting request: match, allocate, tell the side, compute."""
        self.ctx.requests[request.request_id] = request
        external = self.side.match(request, gpu_hit)
        ids = self.ctx.allocate(request.request_id, -(-request.num_tokens // BS))
        assert ids is not None
        self.side.after_alloc(request, ids, external)
        for block_id, block_hash in zip(ids, request.block_hashes, strict=False):
            self.ctx.cache(block_id, block_hash)
        request.num_computed_tokens = request.num_tokens
        return external

    def step(self, events: StepEvents | None = None) -> StepPlan:
        """One step's plan, its jobs finished by every worker."""
        plan = self.side.plan_step(events or StepEvents())
        self.side.complete(JobResults(done={job.job_id: self.world_size for job in plan.jobs()}))
        return plan

    def finish(self, request: SimRequest) -> None:
        held = self.ctx.request_block_ids(request.request_id)
        self.side.finished(request, held[0] if held else [])
        if held:
            self.ctx.release(request.request_id)
        self.ctx.requests.pop(request.request_id)

    def idle(self) -> None:
        assert self.side.requests == {}, "no per-request record left"
        planner = self.side.planner
        assert planner is not None
        assert planner.ledger.jobs() == [] and planner.tier.num_pins == 0
        assert all(b.ref_cnt == 0 for b in self.ctx.blocks)
        planner.tier.check()


def park_prompt(rig: Rig, prompt: list[int]) -> None:
    """A request computes ``prompt`` and finishes; the lazy walk parks its blocks in the tier."""
    request = SimRequest("warm", prompt)
    rig.admit(request)
    rig.finish(request)
    rig.step()
    assert rig.side.planner is not None
    assert all(rig.side.planner.tier.lookup(h) is not None for h in request.block_hashes)


def test_cpu_hit_then_abort_before_allocation_leaves_nothing() -> None:
    rig = Rig()
    prompt = tokens(1, 16)
    park_prompt(rig, prompt)
    request = SimRequest("a", prompt + tokens(2, 3))
    rig.ctx.requests["a"] = request
    assert rig.side.match(request, 0) == 16, "the whole prompt prefix is in the CPU tier"
    assert "a" in rig.side.requests
    rig.finish(request)  # aborted while waiting: vLLM never allocated it
    rig.step()
    rig.idle()
    assert rig.side.counters["cpu_hit_blocks"] == 0, "nothing was loaded for it"


def test_preempted_resumed_finished_request_leaves_nothing_and_counts_once() -> None:
    rig = Rig(world_size=2, cpu_eviction="bid")
    victim = SimRequest("v", tokens(1, 14))  # 3 full blocks + a partial one
    other = SimRequest("o", tokens(2, 6))
    rig.admit(victim)
    rig.admit(other)
    chosen = rig.side.choose_victim([other, victim], requester=other)
    assert chosen is not None
    assert rig.side.counters["preemptions"] == 1
    name = chosen.request_id
    rig.ctx.release(name)  # vLLM preempts it
    chosen.num_computed_tokens = 0
    plan = rig.step(StepEvents(preempted=[name]))
    rescued = sum(len(j.gpu_block_ids) for j in plan.rescues)
    assert rescued == len(chosen.block_hashes), "every full block of the victim is rescued"
    planner = rig.side.planner
    assert planner is not None
    assert all(planner.tier.is_protected(h) for h in chosen.block_hashes), "protected while it waits"
    assert rig.side.counters["blocks_rescued"] == rescued == rig.side.counters["blocks_stored"], (
        "two workers acked each job; the block counts once"
    )
    assert rig.side.counters["bytes_stored"] == 64 * rescued
    loaded = rig.admit(chosen)  # resumes: the tier gives back all but the last token's block
    assert loaded == (len(chosen.block_hashes) * BS if chosen.num_tokens % BS else chosen.num_tokens - 1)
    rig.step(StepEvents(resumed=[name]))
    assert not any(planner.tier.is_protected(h) for h in chosen.block_hashes), "unprotected on resume"
    assert rig.side.counters["tokens_loaded"] == loaded
    assert rig.side.counters["blocks_loaded"] == len(chosen.block_hashes)
    assert rig.side.counters["recomputed_tokens"] == max(0, chosen.num_tokens - loaded)
    for request in (victim, other):
        rig.finish(request)
    rig.step()
    rig.idle()


def test_victim_finished_before_its_rescue_is_forgotten() -> None:
    rig = Rig()
    victim = SimRequest("v", tokens(1, 12))
    rig.admit(victim)
    assert rig.side.choose_victim([victim]) is victim
    rig.ctx.release("v")
    rig.finish(victim)  # aborted in the same step, before the connector's plan
    plan = rig.step(StepEvents(preempted=["v"]))
    assert plan.rescues == []
    rig.idle()


@pytest.mark.parametrize("victim_costs_more", [True, False])
def test_vllm_waits_for_held_blocks_only_when_the_victim_costs_more_than_a_step(
    victim_costs_more: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``wait_for_frees`` answers vLLM's next ``has_pending_block_frees`` once: wait only while a
    store holds a free block and the bid's victim costs more than ``bid_step_cost``; a failure
    the victim hook did not see falls back to "a store holds a free block"."""
    probe = Rig()
    victim, requester = SimRequest("v", tokens(1, 6)), SimRequest("r", tokens(2, 4))
    probe.admit(victim)
    delta = probe.side._cost.delta(victim_candidate(probe.ctx, probe.side.planner.tier, 0, victim))
    assert delta > 0
    rig = Rig(bid_step_cost=delta / 2 if victim_costs_more else delta * 2)
    old = SimRequest("old", tokens(3, 12))
    rig.admit(old)
    for request in (victim, requester):
        request.num_computed_tokens = 0
        rig.admit(request)
    assert not rig.side.wait_for_frees([victim], requester), "no store holds a block: preempt"
    rig.finish(old)  # its blocks go free; the lazy walk parks them while stores copy them
    plan = rig.side.plan_step(StepEvents())
    assert plan.stores and rig.side.planner.holds_free_blocks()
    assert rig.side.wait_for_frees([victim], requester) is victim_costs_more
    assert rig.side.has_pending_block_frees() is victim_costs_more, "vLLM hears the decision"
    assert rig.side.has_pending_block_frees(), "asked again without a decision: held blocks count"
    if not victim_costs_more:  # the victim it priced is the one preempted: one decision, not two
        built: list[str] = []
        chosen: list[int] = []

        def counted(ctx: object, order: int, request: SimRequest) -> object:
            built.append(request.request_id)
            return held_candidate(ctx, order, request)  # type: ignore[arg-type]

        best = rig.side._candidates.best
        monkeypatch.setattr(lookup, "held_candidate", counted)
        monkeypatch.setattr(rig.side._candidates, "best", lambda *a: chosen.append(1) or best(*a))
        preemptible = [victim]
        assert not rig.side.wait_for_frees(preemptible, requester)
        assert rig.side.choose_victim(preemptible, requester) is victim and chosen == [1]
        # Priced once in this schedule() (by the wait above): not again (StepCandidates).
        assert built == []
    rig.side.complete(JobResults(done={job.job_id: 1 for job in plan.jobs()}))
    assert not rig.side.wait_for_frees([victim], requester), "the stores finished: nothing to wait for"
    for request in (victim, requester):
        rig.finish(request)
    rig.idle()


def test_a_wait_is_no_preemption_to_a_strategy_that_remembers_them() -> None:
    """``bidkv-0.2`` counts preemptions towards its liveness guard: pricing a victim for a
    wait (vLLM then preempts nobody) must not count one, however often vLLM waits."""
    rig = Rig(victim_policy="bidkv-0.2", bid_step_cost=0)
    strategy = rig.side.strategy
    assert isinstance(strategy, Bid02Strategy)
    old, victim, requester = (
        SimRequest("old", tokens(3, 12)),
        SimRequest("v", tokens(1, 6)),
        SimRequest("r", tokens(2, 4)),
    )
    for request in (old, victim, requester):
        rig.admit(request)
    rig.finish(old)
    plan = rig.side.plan_step(StepEvents())
    assert plan.stores and rig.side.planner.holds_free_blocks()
    for _ in range(3):
        assert rig.side.wait_for_frees([victim], requester) and rig.side.has_pending_block_frees()
    assert strategy.preempted_this_epoch("v") == 0, "three waits counted as preemptions"
    assert rig.side.choose_victim([victim], requester) is victim
    assert strategy.preempted_this_epoch("v") == 1
    rig.side.complete(JobResults(done={job.job_id: 1 for job in plan.jobs()}))
    for request in (victim, requester):
        rig.finish(request)
    rig.idle()


def test_candidate_shared_tokens_are_the_leading_shared_prefix() -> None:
    """r and δ agree: shared_tokens counts only the leading run of shared blocks, as restorable does."""
    rig = Rig(offload_mode="off")
    a = SimRequest("a", tokens(1, 16))
    rig.admit(a)
    ids = rig.ctx.request_block_ids("a")[0]
    rig.ctx.acquire("b", [ids[2]])  # a block in the middle is shared, the prefix is not
    c = victim_candidate(rig.ctx, None, 0, a)
    assert c.shared_tokens == 0 and c.freeable_blocks == 3 and c.num_blocks == 4
    rig.ctx.acquire("b", [ids[0]])
    c = victim_candidate(rig.ctx, None, 0, a)
    assert c.shared_tokens == BS and c.freeable_blocks == 2


def test_inactive_side_keeps_vllms_choice_and_counts_nothing() -> None:
    rig = Rig(kill_switch=True, offload_mode="off")
    a = SimRequest("a", tokens(1, 8))
    rig.admit(a)
    assert rig.side.choose_victim([a]) is None
    assert rig.side.counters.totals() == dict.fromkeys(rig.side.counters.totals(), 0)

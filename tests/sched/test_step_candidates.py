"""Victim pricing reused within a ``schedule()`` (``StepCandidates``) on vLLM's real Scheduler.

At every failed allocation the connector prices each preemptible request; a later failure in
the same step reuses what it priced then. Here each pick's candidates are compared with a fresh
pricing of the same requests at that moment, on a workload where the reuse happens and where a
victim shares blocks with exactly one other request (their reference count drops from 2 to 1
when vLLM frees the victim, which changes that request's candidate within the step). Under a
sliding window another request's allocation does the same, so there nothing is kept.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from vllm_bidkv_bench.standalone import make_request, model_output

from tests.sched.conftest import BLOCK_SIZE
from tests.sched.test_connector_scheduler import DelayedCopyWorker
from tests.sched.test_victim import assert_drained, connector_config
from vllm_bidkv.offload.lookup import StepCandidates, victim_candidate
from vllm_bidkv.policy.ranking import best_by_key

pytestmark = pytest.mark.sched


def paired_requests(scheduler: Any, pairs: int, seed: int) -> dict[str, Any]:
    """Prompts of a long prefix every request shares, then one only two share (its blocks'
    reference count is 2), then a few tokens of their own: a victim frees few blocks, so with
    many decodes crossing a block boundary in one step several allocations fail in it."""
    rng = random.Random(seed)
    common = [rng.randrange(1, 500) for _ in range(10 * scheduler.block_size)]
    requests = {}
    for pair in range(pairs):
        prefix = common + [rng.randrange(1, 500) for _ in range(rng.randint(32, 64))]
        for i in range(2):
            prompt = prefix + [rng.randrange(1, 500) for _ in range(rng.randint(5, 30))]
            request = make_request(
                f"p{pair}-{i}", prompt, rng.randint(40, 120), block_size=scheduler.block_size
            )
            requests[request.request_id] = request
            scheduler.add_request(request)
    return requests


@pytest.mark.usefixtures("offload_supported")
def test_a_pick_reuses_only_the_pricings_that_still_hold(make_scheduler: Any, patched: None) -> None:
    scheduler = make_scheduler(
        num_gpu_blocks=120,
        max_num_seqs=64,
        kv_transfer_config=connector_config(offload_mode="auto", cpu_bytes=8 * 1024 * 1024),
    )
    side = scheduler.connector.scheduler_role.side
    ctx, tier = side.ctx, side.planner.tier
    picks = reused = stale = 0
    seen: dict[str, Any] = {}  # this step's earlier pricing of each request, order aside
    kept = side._candidates
    best, new_step = kept.best, kept.new_step

    def checked_best(ctx_: Any, tier_: Any, requests: list[Any], strategy: Any, decision: Any) -> Any:
        nonlocal picks, reused, stale
        picked = best(ctx_, tier_, requests, strategy, decision)
        fresh = [victim_candidate(ctx, tier, i, r) for i, r in enumerate(requests)]
        assert picked == best_by_key(fresh, decision, strategy.key), f"pick {picks}: not whole pricing's pick"
        # Every part kept for a later failure of this step is what a fresh pricing gives now.
        by_id = {c.request_id: c for c in fresh}
        held = {c.request_id: c for c, _ in kept._held.values()}
        for request_id, whole in kept._whole.items():
            assert whole._replace(order=0) == by_id[request_id]._replace(order=0), f"pick {picks}: stale"
        for request_id, candidate in held.items():
            assert candidate._replace(order=0) == by_id[request_id]._replace(
                order=0, cpu_tokens=0, offloadable_tokens=0
            ), f"pick {picks}: a reused pricing no longer holds"
        for candidate in fresh:
            earlier = seen.get(candidate.request_id)
            if earlier is not None:
                reused += 1
                stale += earlier != candidate._replace(order=earlier.order)
            seen[candidate.request_id] = candidate
        picks += 1
        return picked

    def checked_new_step() -> None:
        seen.clear()
        new_step()

    kept.best, kept.new_step = checked_best, checked_new_step  # type: ignore[method-assign]
    assert isinstance(side._candidates, StepCandidates)
    assert side._candidates._last_the_step, "full attention: pricings last the step"
    requests = paired_requests(scheduler, 40, seed=11)
    worker = DelayedCopyWorker(delay=1)
    steps = 0
    while scheduler.has_requests():
        out = scheduler.schedule()
        worker.submit(out.kv_connector_metadata)
        scheduler.update_from_output(out, model_output(out, requests, kv_connector_output=worker.output()))
        steps += 1
        assert steps < 5000
    # Later failures in a step met requests priced before, and some of those had changed (a
    # victim freed a block they shared at count 2): reuse and forgetting were both exercised.
    assert picks >= 5 and reused > 0 and stale > 0, (picks, reused, stale)
    assert_drained(scheduler, requests)


def test_with_a_sliding_window_another_allocation_changes_a_candidate(
    make_scheduler: Any, patched: None
) -> None:
    """Why pricings do not last the step under a sliding window: vLLM's allocation for one
    request frees the blocks its window left, and a block another request still holds drops
    from 2 references to 1 without any preemption, changing that request's candidate between
    two failures of one ``schedule()``. The connector is told so at construction."""
    scheduler = make_scheduler(
        num_gpu_blocks=64,
        max_num_seqs=4,
        kv_transfer_config=connector_config(offload_mode="off"),
        sliding_window=2 * BLOCK_SIZE,
    )
    side = scheduler.connector.scheduler_role.side
    assert not side._candidates._last_the_step
    bs = scheduler.block_size
    prompt = list(range(1, 4 * bs + 1))
    first = make_request("a", prompt, 40, block_size=bs)
    requests = {"a": first}
    scheduler.add_request(first)
    scheduler.update_from_output(out := scheduler.schedule(), model_output(out, requests))
    second = requests["b"] = make_request("b", prompt, 40, block_size=bs)  # shares a's blocks
    scheduler.add_request(second)
    manager = scheduler.kv_cache_manager
    allocate, priced, changed = manager.allocate_slots, {}, []

    def allocate_and_compare(request: Any, *args: Any, **kwargs: Any) -> Any:
        blocks = allocate(request, *args, **kwargs)
        if request is first and "b" in priced:  # b not scheduled yet this step: a candidate
            changed.append(victim_candidate(side.ctx, None, 0, second) != priced["b"])
        return blocks

    manager.allocate_slots = allocate_and_compare
    for _ in range(30):
        if "b" in scheduler.requests and second.num_computed_tokens:
            priced["b"] = victim_candidate(side.ctx, None, 0, second)
        out = scheduler.schedule()
        scheduler.update_from_output(out, model_output(out, requests))
    assert any(changed), "a's allocation never changed b's candidate within a step"

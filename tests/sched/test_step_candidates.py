"""Victim pricing reused within a ``schedule()`` (``StepCandidates``) on vLLM's real Scheduler.

At every failed allocation the connector prices each preemptible request; a later failure in
the same step reuses what it priced then. Here each pick's candidates are compared with a fresh
pricing of the same requests at that moment, on a workload where the reuse happens and where a
victim shares blocks with exactly one other request (their reference count drops from 2 to 1
when vLLM frees the victim, which changes that request's candidate within the step).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from vllm_bidkv_bench.standalone import make_request, model_output

from tests.sched.test_connector_scheduler import DelayedCopyWorker
from tests.sched.test_victim import assert_drained, connector_config
from vllm_bidkv.offload.lookup import StepCandidates, victim_candidate

pytestmark = [pytest.mark.sched, pytest.mark.usefixtures("offload_supported")]


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
    price, new_step = side._candidates.price, side._candidates.new_step

    def checked_price(ctx_: Any, tier_: Any, requests: list[Any]) -> list[Any]:
        nonlocal picks, reused, stale
        candidates = price(ctx_, tier_, requests)
        fresh = [victim_candidate(ctx, tier, i, r) for i, r in enumerate(requests)]
        assert candidates == fresh, f"pick {picks}: a reused pricing no longer holds"
        for candidate in fresh:
            earlier = seen.get(candidate.request_id)
            if earlier is not None:
                reused += 1
                stale += earlier != candidate._replace(order=earlier.order)
            seen[candidate.request_id] = candidate
        picks += 1
        return candidates

    def checked_new_step() -> None:
        seen.clear()
        new_step()

    side._candidates.price, side._candidates.new_step = checked_price, checked_new_step
    assert isinstance(side._candidates, StepCandidates)
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

"""The CPU tier announced through vLLM's KV events, on vLLM's real Scheduler.

With ``kv_events_config`` on, the Scheduler publishes its block pool's events and the
connector's ``take_events()`` after every step. The publisher here is vLLM's null one with
its ``publish`` recorded (the ZMQ path and a real subscriber: tests/engine/test_observability.py).
A stand-in worker reports the copies two steps late (no model runs at this tier).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.sched.conftest import add_requests
from tests.sched.test_connector_scheduler import DelayedCopyWorker, add_again, run_step
from tests.sched.test_victim import assert_drained, connector_config
from tests.support.kv_events import Announced
from vllm_bidkv.patches.capabilities import probe

pytestmark = [pytest.mark.sched, pytest.mark.usefixtures("offload_supported")]
EVENTS_ON = {"enable_kv_cache_events": True, "publisher": "null"}


def ready_hashes(tier: Any) -> set[Any]:
    """The tier's READY hashes as KV events name them (ints by default: VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES)."""
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    return {
        maybe_convert_block_hash(h)
        for s in range(tier.num_slots)
        if (h := tier.hash_of(s)) is not None and tier.lookup(h) == s
    }


def test_the_announced_set_is_the_tiers_contents_after_every_step(make_scheduler: Any, patched: None) -> None:
    if not probe().connector_kv_events:
        pytest.skip("this vLLM does not publish connector.take_events()")
    scheduler = make_scheduler(
        num_gpu_blocks=40,
        max_num_seqs=8,
        kv_transfer_config=connector_config(offload_mode="lazy", cpu_bytes=24 * 64 * 1024),  # 24 blocks
        kv_events_config=EVENTS_ON,
    )
    tier = scheduler.connector.scheduler_role.side.planner.tier
    assert tier.num_slots < 40, "the tier must be smaller than what the run stores: it evicts"
    announced = Announced()
    publish = scheduler.kv_event_publisher.publish

    def record(batch: Any) -> None:
        announced.take(batch.events)
        publish(batch)

    scheduler.kv_event_publisher.publish = record
    worker = DelayedCopyWorker(delay=2)
    requests = add_requests(scheduler, 24, seed=3, prefix_len=48, lo=40, hi=160, max_out=120)
    steps = 0
    while scheduler.has_requests():
        run_step(scheduler, worker, requests)
        steps += 1
        assert announced.cpu == ready_hashes(tier), f"step {steps}: announced != the tier's contents"
        if steps == 40:  # prompts again: their prefixes are CPU-tier hits by now
            for req in list(requests.values())[:8]:
                clone = add_again(scheduler, req)
                requests[clone.request_id] = clone
        assert steps < 5000
    assert_drained(scheduler, requests)
    stats = scheduler.connector.scheduler_role.side.planner.stats()
    assert announced.cpu_stored == stats["blocks_stored"] > tier.num_slots
    assert announced.cpu_removed == stats["cpu_evictions"] > 0
    # A reset of the connector's cache (vLLM's reset_prefix_cache(reset_connector=True) calls
    # it) drops every entry: the connector's next events remove them all.
    assert scheduler.connector.reset_cache()
    announced.take(scheduler.connector.take_events())
    assert announced.cpu == set() == ready_hashes(tier)


def test_nothing_is_kept_for_events_while_they_are_off(make_scheduler: Any, patched: None) -> None:
    scheduler = make_scheduler(
        num_gpu_blocks=40, max_num_seqs=8, kv_transfer_config=connector_config(offload_mode="lazy")
    )
    worker = DelayedCopyWorker(delay=1)
    requests = add_requests(scheduler, 12, seed=4, prefix_len=48)
    while scheduler.has_requests():
        run_step(scheduler, worker, requests)
    planner = scheduler.connector.scheduler_role.side.planner
    assert planner.stats()["blocks_stored"] > 0
    assert planner.tier.take_announcements() == [] and scheduler.connector.take_events() == []

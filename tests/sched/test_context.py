"""SchedulerContext on vLLM's real BlockPool / KVCacheManager / Scheduler."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vllm_bidkv_bench.standalone import model_output

from tests.sched.conftest import add_requests, run_to_completion
from vllm_bidkv.context import SchedulerContext
from vllm_bidkv.patches.adapter import BlockPoolContext

pytestmark = pytest.mark.sched


def free_queue_ids(pool: Any) -> list[int]:
    return [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]


def ref_counts(pool: Any) -> list[int]:
    return [b.ref_cnt for b in pool.blocks]


@pytest.fixture
def busy_scheduler(make_scheduler: Any) -> tuple[Any, dict[str, Any]]:
    """A scheduler mid-run: some requests finished (hashed free blocks), some running, some waiting."""
    scheduler = make_scheduler(num_gpu_blocks=48, max_num_seqs=4)
    requests = add_requests(scheduler, 10, seed=1, prefix_len=32)
    for _ in range(25):
        out = scheduler.schedule()
        scheduler.update_from_output(out, model_output(out, requests))
    assert scheduler.running and len(scheduler.waiting)
    return scheduler, requests


def test_adapter_satisfies_protocol(busy_scheduler: Any) -> None:
    ctx = BlockPoolContext.for_scheduler(busy_scheduler[0])
    assert isinstance(ctx, SchedulerContext)
    assert ctx.block_size == 16 and ctx.num_gpu_blocks == 48


def test_iter_free_blocks_is_the_free_queue_in_lru_order(busy_scheduler: Any) -> None:
    scheduler, _ = busy_scheduler
    pool = scheduler.kv_cache_manager.block_pool
    ctx = BlockPoolContext.for_scheduler(scheduler)
    expected = free_queue_ids(pool)
    assert len(expected) >= 4
    assert [b.block_id for b in ctx.iter_free_blocks()] == expected
    assert ctx.num_free_blocks() == len(expected)
    # Resume after a cursor: exactly the blocks after it.
    for cut in (0, len(expected) // 2, len(expected) - 1):
        assert [b.block_id for b in ctx.iter_free_blocks(after_block=expected[cut])] == expected[cut + 1 :]
    # A cursor that left the free queue restarts from the LRU end.
    gone = expected[1]
    ctx.touch([gone])
    assert [b.block_id for b in ctx.iter_free_blocks(after_block=gone)] == [i for i in expected if i != gone]
    ctx.free_blocks([gone])


def test_block_view_hash_matches_request_hashes(busy_scheduler: Any) -> None:
    scheduler, requests = busy_scheduler
    ctx = BlockPoolContext.for_scheduler(scheduler)
    request = scheduler.running[0]
    block_ids = ctx.request_block_ids(request.request_id)[0]
    full = request.num_computed_tokens // ctx.block_size
    hashes = [ctx.get_block(i).block_hash for i in block_ids[:full]]
    assert hashes == list(request.block_hashes[: len(hashes)]) and hashes


def test_touch_then_free_restores_ref_counts_and_queue_order(busy_scheduler: Any) -> None:
    scheduler, _ = busy_scheduler
    pool = scheduler.kv_cache_manager.block_pool
    ctx = BlockPoolContext.for_scheduler(scheduler)
    order, refs = free_queue_ids(pool), ref_counts(pool)
    held = ctx.request_block_ids(scheduler.running[0].request_id)[0]
    picks = [order[0], order[2], order[3], order[-1], held[0]]
    ctx.touch(picks)
    assert all(b.block_id not in picks for b in ctx.iter_free_blocks())
    assert ctx.num_free_blocks() == len(order) - 4
    assert ctx.get_block(held[0]).ref_cnt == refs[held[0]] + 1
    ctx.free_blocks(list(reversed(picks)))  # any release order restores the queue
    assert free_queue_ids(pool) == order
    assert ref_counts(pool) == refs
    assert pool.get_num_free_blocks() == len(order)


@settings(max_examples=40, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 47)), max_size=60), seed=st.integers(0, 3))
def test_random_touch_free_sequences_keep_pool_consistent(
    tiny_model: str, ops: list[tuple[bool, int]], seed: int
) -> None:
    """Property: any interleaving of touches and frees ends with stock ref counts and queue order."""
    from vllm_bidkv_bench.standalone import build_scheduler

    scheduler = build_scheduler(tiny_model, num_gpu_blocks=48, max_num_seqs=4, block_size=16)
    requests = add_requests(scheduler, 6, seed=seed, prefix_len=16)
    for _ in range(15):
        out = scheduler.schedule()
        scheduler.update_from_output(out, model_output(out, requests))
    pool = scheduler.kv_cache_manager.block_pool
    ctx = BlockPoolContext.for_scheduler(scheduler)
    order, refs = free_queue_ids(pool), ref_counts(pool)
    pins: list[int] = []
    for is_touch, block_id in ops:
        if block_id == 0:  # the null block is refused, tested elsewhere
            continue
        if is_touch:
            ctx.touch([block_id])
            pins.append(block_id)
        elif block_id in pins:
            pins.remove(block_id)
            ctx.free_blocks([block_id])
        free = free_queue_ids(pool)
        assert len(free) == pool.free_block_queue.num_free_blocks == ctx.num_free_blocks()
        assert all(pool.blocks[i].ref_cnt == 0 for i in free)
        assert [b.block_id for b in ctx.iter_free_blocks()] == free
    ctx.free_blocks(pins)
    assert ref_counts(pool) == refs
    assert free_queue_ids(pool) == order


def test_free_below_zero_and_bad_ids_raise_naming_the_block(busy_scheduler: Any) -> None:
    scheduler, _ = busy_scheduler
    ctx = BlockPoolContext.for_scheduler(scheduler)
    free_id = next(iter(ctx.iter_free_blocks())).block_id
    with pytest.raises(ValueError, match=f"block {free_id}"):
        ctx.free_blocks([free_id])
    with pytest.raises(IndexError, match="block id 999"):
        ctx.get_block(999)
    with pytest.raises(ValueError, match="null block"):
        ctx.touch([0])


def test_request_blocks_and_queue_views_match_scheduler(busy_scheduler: Any) -> None:
    scheduler, requests = busy_scheduler
    ctx = BlockPoolContext.for_scheduler(scheduler)
    manager = scheduler.kv_cache_manager
    for request in scheduler.running:
        ids = manager.get_block_ids(request.request_id)
        assert ctx.request_block_ids(request.request_id) == ids
        for start in (0, 1, len(ids[0]) - 1, len(ids[0]), len(ids[0]) + 3):
            assert ctx.request_block_ids_from(request.request_id, start) == ids[0][start:]
    assert [r.request_id for r in ctx.running()] == [r.request_id for r in scheduler.running]
    assert [r.request_id for r in ctx.waiting()] == [r.request_id for r in scheduler.waiting]
    waiting_id = next(iter(scheduler.waiting)).request_id
    assert ctx.request_block_ids(waiting_id) == ()
    assert ctx.request_block_ids_from(waiting_id, 0) == []
    assert ctx.get_request(waiting_id) is requests[waiting_id]
    # The running view follows the scheduler even when vLLM rebinds its list.
    view = ctx.running()
    run_to_completion(scheduler, requests)
    assert len(view) == 0 == len(scheduler.running)
    assert not hasattr(view, "append") and not hasattr(view, "__setitem__")

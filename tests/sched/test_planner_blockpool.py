"""The planner's stateful property test (``PlannerMachine``) over vLLM's real BlockPool.

Same machine as the unit tier; only the pool differs: vLLM's ``BlockPool`` driven
the way ``KVCacheManager`` drives it, seen by the planner through the
``BlockPoolContext`` adapter. Reference counts, the CPU tier, block contents and
the *set* of free blocks are checked exactly; the free *order* is not, because the
adapter keeps it exactly only for blocks touched while free and freed with nothing
in between (the protocol's promise). Where it cannot (a block vLLM still held when
it was touched — eager stores at finish, load destinations — goes to the MRU end
when our reference goes, not when vLLM's did; a pinned block whose queue
predecessor vLLM took by a prefix hit goes to the LRU end) the reference model
keeps the stock order, so the two differ.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import settings

from tests.support.planner_machine import BS, PlannerMachine, VllmSide
from vllm_bidkv.context import BlockHash, SchedulerContext
from vllm_bidkv.patches.adapter import BlockPoolContext
from vllm_bidkv.patches.capabilities import probe

pytestmark = pytest.mark.sched


class BlockPoolSide:
    """``VllmSide`` on a real ``BlockPool``: what vLLM's KVCacheManager does to it."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        from vllm.v1.core.block_pool import BlockPool

        self.pool: Any = BlockPool(num_gpu_blocks=num_blocks, enable_caching=True, hash_block_size=block_size)
        self.block_size = block_size
        self._held: dict[str, list[Any]] = {}

    def allocate(self, request_id: str, num_blocks: int) -> list[int] | None:
        if num_blocks > self.pool.get_num_free_blocks():
            return None
        blocks = self.pool.get_new_blocks(num_blocks)
        self._held.setdefault(request_id, []).extend(blocks)
        return [b.block_id for b in blocks]

    def acquire(self, request_id: str, block_ids: Sequence[int]) -> None:
        blocks = [self.pool.blocks[i] for i in block_ids]
        self.pool.touch((blocks,) if probe().touch_takes_group_tuple else blocks)
        self._held.setdefault(request_id, []).extend(blocks)

    def release(self, request_id: str) -> list[int]:
        blocks = self._held.pop(request_id, [])
        self.pool.free_blocks(reversed(blocks))  # as vLLM: the tail is evicted first
        return [b.block_id for b in blocks]

    def cache(self, block_id: int, block_hash: BlockHash) -> None:
        request = SimpleNamespace(request_id="cache", block_hashes=[block_hash])
        self.pool.cache_full_blocks(request, [self.pool.blocks[block_id]], 0, 1, self.block_size, 0)

    def lookup(self, block_hash: BlockHash) -> int | None:
        blocks = self.pool.get_cached_block(block_hash, [0])
        return None if blocks is None else int(blocks[0].block_id)

    def free_order(self) -> list[int]:
        return [b.block_id for b in self.pool.free_block_queue.get_all_free_blocks()]

    def num_free_blocks(self) -> int:
        return int(self.pool.get_num_free_blocks())


def blockpool_pool(num_blocks: int, block_size: int) -> tuple[SchedulerContext, VllmSide]:
    side = BlockPoolSide(num_blocks, block_size)
    return BlockPoolContext(side.pool, block_size), side


class BlockPoolPlannerMachine(PlannerMachine):
    make_pool = staticmethod(blockpool_pool)
    exact_free_order = False


BlockPoolPlannerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=80, deadline=None)
test_planner_machine_on_blockpool = BlockPoolPlannerMachine.TestCase


def test_the_harness_is_the_reference_model_on_vllm() -> None:
    """Without the planner, the harness and the reference model agree step by step.

    The model frees unhashed blocks to the LRU head, as vLLM does from 0.24; before, vLLM
    appends every freed block, so there the harness is checked against that order instead.
    """
    from tests.unit.reference_context import ReferenceContext

    prepends = probe().free_blocks_prepends_unhashed
    side, ref = BlockPoolSide(8, BS), ReferenceContext(8, BS)
    for pool in (side, ref) if prepends else (side,):
        assert pool.allocate("a", 3) == [1, 2, 3]
        pool.cache(1, b"h1")
        pool.cache(2, b"h2")
        pool.release("a")
        assert pool.lookup(b"h2") == 2
        # The unhashed block 3 was put first (0.24+) or after the free ones (before).
        assert pool.allocate("b", 2) == ([3, 4] if prepends else [4, 5])
        pool.acquire("b", [2])
        pool.release("b")
    assert side.free_order() == (ref.free_order() if prepends else [6, 7, 3, 1, 2, 5, 4])

"""LazyWalk: the lazy store's cursor over vLLM's free-block queue.

Each step it visits free GPU blocks in LRU order (next to be reused first) from where it
stopped, so that about ``lookahead_steps`` steps of block consumption (an EMA of blocks
allocated per step) are "clean" ahead of reuse: parked in the tier or needing no store.
Its work per step follows the consumption, not the pool size. What to do with a visited
block is the planner's (``visit``); the walk only keeps its place.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from vllm_bidkv.context import BlockHash, KVCacheBlockView, SchedulerContext

RATE_WEIGHT = 0.25  # EMA weight of the newest step's block consumption

_Mark = tuple[int, BlockHash | None]  # a visited block, with its hash then (to notice reuse)


class LazyWalk:
    """Where the walk stopped, how much is clean before that point, and the consumption EMA."""

    def __init__(self, ctx: SchedulerContext, lookahead_steps: float, min_clean_blocks: int) -> None:
        if lookahead_steps <= 0:
            raise ValueError(f"vllm-bidkv: lazy_lookahead_steps={lookahead_steps} must be > 0")
        self._ctx = ctx
        self._lookahead = lookahead_steps
        self._min_clean = min_clean_blocks
        self._cursor: _Mark | None = None  # the last visited block
        self._free_cursor: _Mark | None = None  # the last visited block left in the queue
        self.clean = 0  # estimate: visited free blocks before the cursor, not reused yet
        self.rate = 0.0  # EMA of blocks allocated per step
        self.walked_blocks = 0  # free blocks visited in all (a diagnostic)

    def step(self, blocks_allocated: int, visit: Callable[[KVCacheBlockView], bool | None]) -> None:
        """Advance over this step's share of free blocks.

        Args:
            blocks_allocated: GPU blocks vLLM allocated since the previous step.
            visit: called per free block in LRU order; True: the block was taken for a
                store (it leaves the queue and comes back before the cursor, clean);
                False: it stays (clean as it is); None: stop before it (the tier has
                no room now) and resume here next step.
        """
        self.rate += RATE_WEIGHT * (blocks_allocated - self.rate)
        # The EMA lags a burst; this step's consumption is the better guess for the next one then.
        demand = max(self.rate, blocks_allocated)
        target = max(self._min_clean, math.ceil(self._lookahead * demand))
        self.clean -= blocks_allocated  # vLLM reuses free blocks from the LRU end
        after = self._resume_point()
        if after is None:
            self._cursor, self._free_cursor, self.clean = None, None, 0
        budget = target - self.clean
        visited = 0
        # Marked once the walk stops: visits reserve tier slots, and no GPU block changes meanwhile.
        last: KVCacheBlockView | None = None
        last_left: KVCacheBlockView | None = None
        if budget > 0:
            for view in self._ctx.iter_free_blocks(after_block=after):
                taken = visit(view)
                if taken is None:
                    break
                if not taken:
                    last_left = view
                last = view
                visited += 1
                if visited >= budget:
                    break
        if last is not None:
            self._cursor = (last.block_id, last.block_hash)
        if last_left is not None:
            self._free_cursor = (last_left.block_id, last_left.block_hash)
        self.clean += visited
        self.walked_blocks += visited

    def _resume_point(self) -> int | None:
        """Where the walk may resume; None to restart from the LRU end.

        After the last visited block if it is free again (its store, if any, finished and
        put it back in place), else after the last visited block that stayed free (the
        blocks stored since are out of the queue, so the walk continues behind them).
        Restart when consumption may have reached that point (the estimate ran out), or it
        left the queue or was reused meanwhile (its hash changed: a block reused and freed
        again within one step is back at the MRU end, or the LRU end).
        """
        if self.clean <= 0:
            return None
        for mark in (self._cursor, self._free_cursor):
            if mark is not None:
                view = self._ctx.get_block(mark[0])
                if view.ref_cnt == 0 and view.block_hash == mark[1]:
                    return mark[0]
        return None

    def check(self) -> None:
        """Assert the invariants (tests)."""
        assert self.rate >= 0
        assert self.clean <= self.walked_blocks, "clean counts visited blocks only"
        assert self._free_cursor is None or self._cursor is not None, "a free cursor without a cursor"

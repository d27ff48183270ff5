"""Which GPU blocks a store takes: the lazy walk's free ones, and a request's computed ones
(``eager``'s at finish, ``auto``'s each step).

The walk's visitor takes each hashed free block the tier lacks (``park_visitor``). A
request's picks walk its blocks in order from a given index and stop at the first block a
store may not read yet: vLLM has not cached it (not computed by the end of this step's
forward, which runs before the store) or a load into it or an earlier block is unfinished
or failed (``LoadTrust``; later blocks attend to it). Blocks the tier holds or is storing
are passed over. O(blocks walked).

``auto``'s rule for room: a free slot, or an entry nobody used for ``AUTO_MIN_IDLE_POOLS``
turnovers of the GPU pool (by then HBM has dropped its copy, if it had one, and the entry
has outlived the reuse distance the GPU cache serves). Without room the block is left to
the lazy walk, so a tier about the pool's size keeps what HBM lost rather than a second
copy of what HBM holds, and a large one keeps every block, as the eager peers do, without
missing those vLLM reuses before the walk reaches them (DESIGN.md, "offload_mode auto").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vllm_bidkv.context import BlockHash, KVCacheBlockView, SchedulerContext
from vllm_bidkv.offload.cpu_tier import CpuBlockTier
from vllm_bidkv.offload.trust import LoadTrust

AUTO_MIN_IDLE_POOLS = 4
"""``auto``: a store at compute time evicts only an entry unused this many times ``num_gpu_blocks`` allocations."""


def pick_computed_blocks(
    ctx: SchedulerContext,
    tier: CpuBlockTier,
    trust: LoadTrust,
    block_ids: Sequence[int],
    block_hashes: Sequence[BlockHash],
    first: int = 0,
    min_idle: int | None = None,
) -> tuple[list[tuple[int, int]], int]:
    """Reserve a tier slot for each computed block from index ``first`` on the tier lacks.

    Args:
        block_ids: the request's group-0 GPU blocks from index ``first`` on;
            ``block_hashes``: all its full blocks' hashes.
        min_idle: ``CpuBlockTier.reserve``'s; once a reserve finds no room, the rest are
            passed over (the next one would meet the same entry at the head of the queue).

    Returns:
        (GPU block, slot) per reserved store, and the index of the first block a store may
        not read yet (the end of the full blocks if none).
    """
    picks: list[tuple[int, int]] = []
    room = True
    end = min(len(block_hashes), first + len(block_ids))
    for index in range(first, end):
        block_id, block_hash = block_ids[index - first], block_hashes[index]
        view = ctx.get_block(block_id)
        if view.is_null:
            continue  # slid out of a sliding window: nothing reads it
        if view.block_hash != block_hash or not trust.trusted(block_id, block_hash):
            return picks, index
        if room and not tier.contains(block_hash):
            slot = tier.reserve(block_hash, min_idle=min_idle)
            if slot is None:
                room = False
            else:
                picks.append((block_id, slot))
    return picks, max(first, end)


def park_visitor(
    tier: CpuBlockTier, trust: LoadTrust, picks: list[tuple[int, int]]
) -> Callable[[KVCacheBlockView], bool | None]:
    """The lazy walk's ``visit``: reserve a slot for a hashed free block the tier lacks and
    a store may read, appending (block, slot) to ``picks``; stop when no slot is left."""

    def visit(view: KVCacheBlockView) -> bool | None:
        block_hash = view.block_hash
        if block_hash is None or tier.contains(block_hash) or not trust.trusted(view.block_id, block_hash):
            return False
        slot = tier.reserve(block_hash)
        if slot is None:  # every slot pinned or pending
            return None
        picks.append((view.block_id, slot))  # touched by the caller: it leaves the queue
        return True

    return visit

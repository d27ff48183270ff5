"""SchedulerContext over vLLM's real BlockPool / KVCacheManager / Scheduler.

The only implementation of ``vllm_bidkv.context.SchedulerContext``. It works on a
bare ``BlockPool`` (tests, the planner's property tests) or on a whole Scheduler
(``for_scheduler``). Version differences come from the capability table.

Free-queue position of pinned blocks: vLLM's ``free_blocks`` appends a hashed
block to the MRU end, so a plain touch + free would make every offloaded block
look freshly used and change what vLLM evicts next. Instead a *free* block we
touch leaves a ghost at its place: ``_ghosts_after[P]`` lists, in queue order,
the pinned blocks that sat between the real free block P (None = the LRU head)
and the next real free block. When our last reference goes, the block is
re-linked right after P and the ghosts behind it move behind it. With nothing
in between, any touch/free interleaving restores the queue exactly. If vLLM
took the anchor P out of the queue meanwhile, the group falls back to the LRU
head (P was most likely popped from there); if vLLM itself referenced the
pinned block (a prefix hit), it was really used and vLLM's own free decides.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from vllm_bidkv.context import BlockHash
from vllm_bidkv.patches.capabilities import Capabilities, probe

_GROUP_ID_BYTES = 4  # BlockHashWithGroupId = BlockHash + 4-byte group id (all releases)


class BlockView:
    """``KVCacheBlockView`` of one vLLM ``KVCacheBlock``; the hash without its group id."""

    __slots__ = ("_block", "_block_size")

    def __init__(self, block: Any, block_size: int) -> None:
        self._block = block
        self._block_size = block_size

    @property
    def block_id(self) -> int:
        return int(self._block.block_id)

    @property
    def ref_cnt(self) -> int:
        return int(self._block.ref_cnt)

    @property
    def is_null(self) -> bool:
        return bool(self._block.is_null)

    @property
    def block_hash(self) -> BlockHash | None:
        key = self._block.block_hash
        if key is None:
            return None
        # 0.25+ also hashes partial blocks (tokens hashed so far not a multiple of the
        # block size); only full blocks are CPU-tier keys.
        num_tokens = getattr(self._block, "block_hash_num_tokens", None)
        if num_tokens is not None and num_tokens % self._block_size:
            return None
        return bytes(key[:-_GROUP_ID_BYTES])

    def __repr__(self) -> str:
        return f"BlockView(id={self.block_id}, ref_cnt={self.ref_cnt}, hashed={self.block_hash is not None})"


class _LiveListView(Sequence[Any]):
    """Read-only view of a list attribute that vLLM may rebind (``scheduler.running``)."""

    __slots__ = ("_owner", "_attr")

    def __init__(self, owner: Any, attr: str) -> None:
        self._owner = owner
        self._attr = attr

    def __getitem__(self, index: Any) -> Any:
        return getattr(self._owner, self._attr)[index]

    def __len__(self) -> int:
        return len(getattr(self._owner, self._attr))


class BlockPoolContext:
    """SchedulerContext over a real vLLM ``BlockPool`` (and optionally its Scheduler)."""

    def __init__(
        self,
        block_pool: Any,
        block_size: int,
        *,
        kv_cache_manager: Any = None,
        scheduler: Any = None,
        caps: Capabilities | None = None,
    ) -> None:
        self._pool = block_pool
        self._queue = block_pool.free_block_queue
        self._blocks: list[Any] = block_pool.blocks
        self._block_size = block_size
        self._manager = kv_cache_manager
        self._scheduler = scheduler
        self._caps = caps or probe()
        self._ghost_anchor: dict[int, int | None] = {}  # pinned-while-free block id -> anchor id
        self._ghosts_after: dict[int | None, list[Any]] = {}  # anchor id -> ghosts in queue order
        self._ghost_pins: dict[int, int] = {}  # our references on each ghost
        self._running = _LiveListView(scheduler, "running") if scheduler is not None else ()

    @classmethod
    def for_scheduler(cls, scheduler: Any) -> BlockPoolContext:
        manager = scheduler.kv_cache_manager
        return cls(
            manager.block_pool,
            scheduler.block_size if hasattr(scheduler, "block_size") else scheduler.cache_config.block_size,
            kv_cache_manager=manager,
            scheduler=scheduler,
        )

    # -- blocks -------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_gpu_blocks(self) -> int:
        return len(self._blocks)

    def _block(self, block_id: int) -> Any:
        if not 0 <= block_id < len(self._blocks):
            raise IndexError(f"block id {block_id} out of range [0, {len(self._blocks)})")
        block = self._blocks[block_id]
        if block.is_null:
            raise ValueError(f"block id {block_id} is vLLM's null block")
        return block

    def get_block(self, block_id: int) -> BlockView:
        if not 0 <= block_id < len(self._blocks):
            raise IndexError(f"block id {block_id} out of range [0, {len(self._blocks)})")
        return BlockView(self._blocks[block_id], self._block_size)

    def _is_free(self, block: Any) -> bool:
        return block.ref_cnt == 0 and block.prev_free_block is not None

    def touch(self, block_ids: Sequence[int]) -> None:
        for block in [self._block(i) for i in block_ids]:
            if self._is_free(block):
                prev = block.prev_free_block
                key = None if prev is self._queue.fake_free_list_head else prev.block_id
                moved = [block, *self._ghosts_after.pop(block.block_id, ())]
                self._ghosts_after.setdefault(key, []).extend(moved)
                for ghost in moved:
                    self._ghost_anchor[ghost.block_id] = key
                self._ghost_pins[block.block_id] = 0
            if block.block_id in self._ghost_pins:
                self._ghost_pins[block.block_id] += 1
            self._pool.touch(([block],) if self._caps.touch_takes_group_tuple else [block])

    def free_blocks(self, block_ids: Sequence[int]) -> None:
        blocks = [self._block(i) for i in block_ids]
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"free_blocks: block {block.block_id} has ref_cnt {block.ref_cnt}")
        to_vllm: list[Any] = []
        for block in blocks:
            if block.block_id not in self._ghost_pins:
                to_vllm.append(block)
                continue
            self._ghost_pins[block.block_id] -= 1
            if self._ghost_pins[block.block_id]:
                block.ref_cnt -= 1  # we still pin it
                continue
            del self._ghost_pins[block.block_id]
            key = self._ghost_anchor.pop(block.block_id)
            if key is not None and not self._is_free(self._blocks[key]):
                self._rehome_to_head(key)
                key = None
            group = self._ghosts_after[key]
            # Search from the end, and re-anchor only the ghosts behind it: a job frees its
            # blocks last first, and the walk's blocks sit in one group in queue order, so
            # the block is usually at the group's end (a search from the front, and
            # re-anchoring the ghosts before it, made a job's frees quadratic in its size).
            index = len(group) - 1
            while group[index] is not block:
                index -= 1
            if block.ref_cnt > 1:  # vLLM references it too: used, vLLM places it
                del group[index]
                to_vllm.append(block)
            else:
                block.ref_cnt = 0
                self._link_after(None if key is None else self._blocks[key], block)
                self._set_group(block.block_id, group[index + 1 :])
                del group[index:]  # left: the ghosts before it, still behind ``key``
            if not group:
                del self._ghosts_after[key]
        if to_vllm:
            self._pool.free_blocks(to_vllm)

    def _set_group(self, key: int | None, ghosts: list[Any]) -> None:
        if ghosts:
            self._ghosts_after[key] = ghosts
            for ghost in ghosts:
                self._ghost_anchor[ghost.block_id] = key

    def _rehome_to_head(self, key: int) -> None:
        """The anchor left the free queue: its ghosts go to the LRU head group."""
        self._set_group(None, self._ghosts_after.pop(key) + self._ghosts_after.pop(None, []))

    def _link_after(self, anchor: Any, block: Any) -> None:
        prev = self._queue.fake_free_list_head if anchor is None else anchor
        nxt = prev.next_free_block
        block.prev_free_block = prev
        block.next_free_block = nxt
        prev.next_free_block = block
        nxt.prev_free_block = block
        self._queue.num_free_blocks += 1

    def iter_free_blocks(self, after_block: int | None = None) -> Iterator[BlockView]:
        head, tail = self._queue.fake_free_list_head, self._queue.fake_free_list_tail
        start = head
        if after_block is not None:
            cursor = self._blocks[after_block]
            if self._is_free(cursor):
                start = cursor
        block = start.next_free_block
        while block is not None and block is not tail:
            nxt = block.next_free_block  # read first: the caller may touch the yielded block
            yield BlockView(block, self._block_size)
            block = nxt

    def num_free_blocks(self) -> int:
        return int(self._pool.get_num_free_blocks())

    # -- requests -----------------------------------------------------------
    def request_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        if self._manager is None:
            return ()
        groups = self._manager.coordinator.single_type_managers
        ids = tuple([b.block_id for b in m.req_to_blocks.get(request_id, ())] for m in groups)
        return ids if any(ids) else ()

    def request_block_ids_from(self, request_id: str, start: int) -> list[int]:
        if self._manager is None:
            return []
        blocks = self._manager.coordinator.single_type_managers[0].req_to_blocks.get(request_id, ())
        return [block.block_id for block in blocks[start:]]

    def request_ref_counts(self, request_id: str) -> list[int]:
        if self._manager is None:
            return []
        blocks = self._manager.coordinator.single_type_managers[0].req_to_blocks.get(request_id, ())
        # A sliding window's skipped blocks are the null block, whose ref_cnt vLLM does not keep.
        return [0 if block.is_null else block.ref_cnt for block in blocks]

    def get_request(self, request_id: str) -> Any:
        return None if self._scheduler is None else self._scheduler.requests.get(request_id)

    def waiting(self) -> Sequence[Any]:
        if self._scheduler is None:
            return ()
        holding = getattr(self._scheduler, "kv_holding_waiting", ())
        return (*holding, *self._scheduler.waiting)

    def running(self) -> Sequence[Any]:
        return self._running

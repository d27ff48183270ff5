"""ReferenceContext: a pure reference model of ``SchedulerContext`` and of vLLM's block pool.

Two sides, kept apart so a test can tell who holds what:

* the protocol (``touch`` / ``free_blocks`` / ``iter_free_blocks`` ...), used by
  the code under test (the connector's references);
* the slice of vLLM's ``BlockPool`` / ``KVCacheManager`` that tests drive as
  "vLLM": ``allocate`` (pop from the LRU end, evicting the cached hash),
  ``acquire`` (prefix hit), ``release`` (free a request's blocks, last block
  first; hashed blocks to the MRU end, unhashed ones to the LRU end, as vLLM
  0.25+ does), ``cache`` / ``lookup`` (the prefix cache).

One doubly linked list holds every block vLLM does not reference, in LRU order.
A block in the list is *free* when the connector holds no reference either, and a
*ghost* when it does: a ghost keeps its place but is skipped by ``allocate`` and
``iter_free_blocks``. That is exactly the protocol's rule — a free block touched
and then freed returns right after its nearest predecessor that is still free —
and it makes the connector's references invisible to vLLM's LRU order: at any
time the free order equals what a model driven by the same vLLM operations
without the connector would have, minus the blocks the connector holds.

Block 0 is the null block (as in vLLM): never in the list, never handed out.
``get_request`` / ``waiting()`` / ``running()`` find nothing: the model has no
scheduler queues.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence

from vllm_bidkv.context import BlockHash, RequestView


class RefBlock:
    """One block; also its own ``KVCacheBlockView``."""

    __slots__ = ("block_id", "vllm_refs", "our_refs", "block_hash", "prev", "next", "listed")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.vllm_refs = 0
        self.our_refs = 0  # references taken through the protocol's touch
        self.block_hash: BlockHash | None = None
        self.prev: RefBlock | None = None
        self.next: RefBlock | None = None
        self.listed = False  # in the LRU list (free or ghost)

    @property
    def ref_cnt(self) -> int:
        return self.vllm_refs + self.our_refs

    @property
    def is_null(self) -> bool:
        return self.block_id == 0

    @property
    def is_free(self) -> bool:
        return self.listed and self.our_refs == 0

    def __repr__(self) -> str:
        return f"RefBlock({self.block_id}, vllm={self.vllm_refs}, ours={self.our_refs}, listed={self.listed})"


class ReferenceContext:
    """Reference model of SchedulerContext over a model of vLLM's block pool (see module doc)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self._block_size = block_size
        self.blocks = [RefBlock(i) for i in range(num_blocks)]
        self._head = RefBlock(-1)  # sentinels: head.next is the LRU end
        self._tail = RefBlock(-2)
        self._head.next, self._tail.prev = self._tail, self._head
        self._num_free = 0
        for block in self.blocks[1:]:
            self._link_before(self._tail, block)
        self._cached: dict[BlockHash, dict[int, None]] = {}
        self._held: dict[str, list[int]] = {}  # request id -> blocks vLLM gave it, in order
        self.nodes_walked = 0  # list nodes iter_free_blocks stepped over (free or ghost)
        self.requests: dict[str, RequestView] = {}  # what get_request answers (tests fill it)

    # -- SchedulerContext ------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_gpu_blocks(self) -> int:
        return len(self.blocks)

    def get_block(self, block_id: int) -> RefBlock:
        if not 0 <= block_id < len(self.blocks):
            raise IndexError(f"block id {block_id} out of range [0, {len(self.blocks)})")
        return self.blocks[block_id]

    def _usable(self, block_ids: Sequence[int]) -> list[RefBlock]:
        blocks = [self.get_block(i) for i in block_ids]
        for block in blocks:
            if block.is_null:
                raise ValueError(f"block id {block.block_id} is the null block")
        return blocks

    def touch(self, block_ids: Sequence[int]) -> None:
        for block in self._usable(block_ids):
            if block.is_free:
                self._num_free -= 1  # becomes a ghost: keeps its place, not free
            block.our_refs += 1

    def free_blocks(self, block_ids: Sequence[int]) -> None:
        blocks = self._usable(block_ids)
        for block_id, count in Counter(block_ids).items():
            if self.blocks[block_id].our_refs < count:
                raise ValueError(f"free_blocks: block {block_id} would drop a reference nobody took")
        for block in blocks:
            block.our_refs -= 1
            if block.is_free:
                self._num_free += 1  # a ghost becomes free in place

    def iter_free_blocks(self, after_block: int | None = None) -> Iterator[RefBlock]:
        start = self._head
        if after_block is not None and self.get_block(after_block).is_free:
            start = self.blocks[after_block]
        node = start.next
        while node is not None and node is not self._tail:
            following = node.next  # read first: the caller may touch what we yield
            self.nodes_walked += 1
            if node.our_refs == 0:
                yield node
            node = following

    def num_free_blocks(self) -> int:
        return self._num_free

    def request_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        held = self._held.get(request_id)
        return (list(held),) if held else ()

    def request_block_ids_from(self, request_id: str, start: int) -> list[int]:
        return list(self._held.get(request_id, ()))[start:]

    def request_ref_counts(self, request_id: str) -> list[int]:
        return [self.blocks[i].ref_cnt for i in self._held.get(request_id, ())]

    def get_request(self, request_id: str) -> RequestView | None:
        return self.requests.get(request_id)

    def waiting(self) -> Sequence[RequestView]:
        return ()

    def running(self) -> Sequence[RequestView]:
        return ()

    # -- vLLM's side ---------------------------------------------------------------
    def allocate(self, request_id: str, num_blocks: int) -> list[int] | None:
        """vLLM's ``get_new_blocks``: the first free blocks from the LRU end; None if too few."""
        if num_blocks > self._num_free:
            return None
        taken: list[RefBlock] = []
        node = self._head.next
        while len(taken) < num_blocks:
            assert node is not None and node is not self._tail
            if node.our_refs == 0:
                taken.append(node)
            node = node.next
        ids = [block.block_id for block in taken]
        self.take(request_id, ids)
        return ids

    def take(self, request_id: str, block_ids: Sequence[int]) -> None:
        """Hand these free blocks to a request (``allocate`` with vLLM's choice replayed)."""
        for block in self._usable(block_ids):
            assert block.is_free, f"take of block {block.block_id}, which is not free"
            self._unlink(block)
            self._evict(block)
            block.vllm_refs = 1
            self._held.setdefault(request_id, []).append(block.block_id)

    def acquire(self, request_id: str, block_ids: Sequence[int]) -> None:
        """A prefix hit: the request references these cached blocks too."""
        for block in self._usable(block_ids):
            if block.listed:
                self._unlink(block)
            block.vllm_refs += 1
            self._held.setdefault(request_id, []).append(block.block_id)

    def release(self, request_id: str) -> list[int]:
        """vLLM frees the request's blocks (last first); returns the ids it held."""
        held = self._held.pop(request_id, [])
        first: list[RefBlock] = []  # unhashed: reused first (prepended)
        for block in self._usable(held[::-1]):
            block.vllm_refs -= 1
            assert block.vllm_refs >= 0
            if block.vllm_refs == 0:
                if block.block_hash is None:
                    first.append(block)
                else:
                    self._link_before(self._tail, block)
        anchor = self._head.next
        assert anchor is not None
        for block in first:
            self._link_before(anchor, block)
        return held

    def cache(self, block_id: int, block_hash: BlockHash) -> None:
        """The block is full and computed: it enters the prefix cache under this hash."""
        block = self._usable([block_id])[0]
        assert block.block_hash is None, f"block {block_id} is cached already"
        block.block_hash = block_hash
        self._cached.setdefault(block_hash, {})[block_id] = None

    def lookup(self, block_hash: BlockHash) -> int | None:
        """A cached block with this hash (any, as vLLM's ``get_one_block``), or None."""
        blocks = self._cached.get(block_hash)
        return next(iter(blocks)) if blocks else None

    def free_order(self) -> list[int]:
        """Free block ids from the LRU end (ghosts excluded)."""
        order = []
        node = self._head.next
        while node is not None and node is not self._tail:
            if node.our_refs == 0:
                order.append(node.block_id)
            node = node.next
        return order

    # -- list internals --------------------------------------------------------------
    def _link_before(self, anchor: RefBlock, block: RefBlock) -> None:
        prev = anchor.prev
        assert prev is not None and not block.listed
        block.prev, block.next = prev, anchor
        prev.next = anchor.prev = block
        block.listed = True
        if block.our_refs == 0:
            self._num_free += 1

    def _unlink(self, block: RefBlock) -> None:
        assert block.listed and block.prev is not None and block.next is not None
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        block.listed = False
        if block.our_refs == 0:
            self._num_free -= 1

    def _evict(self, block: RefBlock) -> None:
        if block.block_hash is not None:
            self._cached[block.block_hash].pop(block.block_id)
            if not self._cached[block.block_hash]:
                del self._cached[block.block_hash]
            block.block_hash = None

"""The order in which a tier evicts its evictable entries, with their idle time.

``EvictionOrder`` (``lru``, ``bid``) is LRU over two O(1) queues (``OrderedDict``, oldest first): with ``bid`` protected entries
sit in their own queue, evicted only once the other is empty. A slot enters its queue at
the MRU end when it becomes evictable (commit, last unpin, change of protection) and moves
there on a hit, so each of those counts as a use, stamped with ``clock`` (the planner
advances it by the GPU blocks vLLM allocates). Each queue is in stamp order, so the idle
time of the next victim is its head's: a store that must not evict anything used recently
(``CpuBlockTier.reserve``'s ``min_idle``) reads it in O(1).

``ArcOrder`` (``arc``) is ARC, the adaptive replacement cache of vLLM's own CPU offloading
(Megiddo & Modha): entries used once (T1) and reused (T2), ghosts of both's evictions,
and a target size of T1 that a store of a recently evicted hash moves toward the list it
was evicted from. A load or a hit is a reuse; protection is ignored, as ``lru`` does.
"""

from __future__ import annotations

from collections import OrderedDict

from vllm_bidkv.context import BlockHash


class EvictionOrder:
    """Evictable slots, oldest use first, unprotected before protected (see module doc)."""

    def __init__(self, bid: bool) -> None:
        self.bid = bid
        self.clock = 0
        self._lru: OrderedDict[int, int] = OrderedDict()  # evictable, unprotected: slot -> used at
        self._kept: OrderedDict[int, int] = OrderedDict()  # evictable, protected (bid only)

    def __contains__(self, slot: int) -> bool:
        return slot in self._lru or slot in self._kept

    def add(self, slot: int, block_hash: BlockHash, protected: bool) -> None:
        """``slot`` (holding ``block_hash``) became evictable: at the MRU end of the queue its
        protection selects."""
        queue = self._kept if self.bid and protected else self._lru
        queue[slot] = self.clock

    def remove(self, slot: int, evicted: BlockHash | None = None) -> None:
        """``slot`` is no longer evictable: pinned, dropped, or ``evicted`` (its hash); no-op
        if it was not evictable."""
        if self._lru.pop(slot, None) is None:
            self._kept.pop(slot, None)

    def touch(self, slot: int) -> None:
        """A hit on an evictable ``slot``: it is the most recently used of its queue now."""
        for queue in (self._lru, self._kept):
            if slot in queue:
                del queue[slot]
                queue[slot] = self.clock

    def victim(self, min_idle: int | None = None) -> int | None:
        """The slot to evict next, or None if there is none. With ``min_idle``: an unprotected
        one unused for at least that many ticks (a protected entry would outrank what a store
        brings, which would then be evicted next: not worth the copy)."""
        if min_idle is None:
            queue = self._lru or self._kept
            return next(iter(queue)) if queue else None
        if not self._lru:
            return None
        slot, used_at = next(iter(self._lru.items()))
        return slot if self.clock - used_at >= min_idle else None

    def slots(self) -> list[int]:
        """Every evictable slot, in eviction order (tests)."""
        return [*self._lru, *self._kept]

    def check(self, protected: set[int]) -> None:
        """Assert the queues' invariants; ``protected``: the evictable slots protection selects."""
        assert not self._kept.keys() & self._lru.keys(), "a slot in both queues"
        assert set(self._kept) == (protected if self.bid else set()), "protected slots in the wrong queue"
        self._check_use_order(self._lru, self._kept)

    def _check_use_order(self, *queues: OrderedDict[int, int]) -> None:
        # ``victim`` reads a queue's idle time at its head: each must be in stamp order.
        for queue in queues:
            stamps = list(queue.values())
            assert stamps == sorted(stamps) and (not stamps or stamps[-1] <= self.clock), "out of use order"


class ArcOrder(EvictionOrder):
    """ARC over the evictable slots (see module doc): ``_lru`` is T1, ``_t2`` T2. O(1) per call."""

    def __init__(self, capacity: int) -> None:
        super().__init__(bid=False)
        self._capacity = capacity
        self._t2: OrderedDict[int, int] = OrderedDict()
        self._ghosts: tuple[OrderedDict[BlockHash, None], ...] = (OrderedDict(), OrderedDict())  # B1, B2
        self.target_t1 = 0.0

    def __contains__(self, slot: int) -> bool:
        return slot in self._lru or slot in self._t2

    def add(self, slot: int, block_hash: BlockHash, protected: bool) -> None:
        b1, b2 = self._ghosts
        if block_hash in b1:  # evicted from T1 too early: give recency more room
            self.target_t1 = min(self.target_t1 + max(1.0, len(b2) / len(b1)), self._capacity)
        elif block_hash in b2:
            self.target_t1 = max(self.target_t1 - max(1.0, len(b1) / len(b2)), 0.0)
        b1.pop(block_hash, None)
        b2.pop(block_hash, None)
        self._lru[slot] = self.clock  # a load's last unpin is a reuse: the tier touches it next

    def remove(self, slot: int, evicted: BlockHash | None = None) -> None:
        in_t2 = self._t2.pop(slot, None) is not None
        if not in_t2:
            self._lru.pop(slot, None)
        if evicted is None:
            return
        ghosts = self._ghosts[in_t2]
        ghosts[evicted] = None
        while len(ghosts) > self._capacity:
            ghosts.popitem(last=False)

    def touch(self, slot: int) -> None:
        if self._lru.pop(slot, None) is not None or self._t2.pop(slot, None) is not None:
            self._t2[slot] = self.clock

    def victim(self, min_idle: int | None = None) -> int | None:
        t1_first = bool(self._lru) and (len(self._lru) > self.target_t1 or not self._t2)
        queue = self._lru if t1_first else self._t2
        if not queue:
            return None
        slot, used_at = next(iter(queue.items()))
        return slot if min_idle is None or self.clock - used_at >= min_idle else None

    def slots(self) -> list[int]:
        return [*self._lru, *self._t2]

    def check(self, protected: set[int]) -> None:
        assert not self._t2.keys() & self._lru.keys(), "a slot in both T1 and T2"
        assert all(len(g) <= self._capacity for g in self._ghosts) and 0 <= self.target_t1 <= self._capacity
        self._check_use_order(self._lru, self._t2)

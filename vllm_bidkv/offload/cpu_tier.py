"""CpuBlockTier: the scheduler's map of the CPU tier's slots, keyed by block hash.

The bytes live on the workers (one row per slot); this class only decides which
slot holds which block hash and which slot a store may overwrite. Every slot is
in exactly one state:

* FREE: in the free heap, no hash.
* PENDING: reserved for a store in flight; has a hash (``contains`` is true, so
  nobody plans a second store of it) but is not a hit and never evicted.
* READY: data valid, a hit (``lookup``). Evictable iff its pin count is 0.
* ORPHAN: a READY entry dropped (``drop``/``reset``) while loads still read it:
  no hash any more, becomes FREE when its last pin goes.

Invariants (``check`` asserts them): the hash index is a bijection onto the
PENDING and READY slots; the free heap holds exactly the FREE slots; pin counts
are >= 0 and non-zero only on READY and ORPHAN slots (an ORPHAN always has one);
the eviction order holds exactly the READY slots with no pin, each in the queue
its protection selects. Protection counts are kept per hash and may name hashes
the tier does not hold (yet): a preempted request's blocks are protected before
a lazy store parks them.

With ``announce``, each change of the READY set is kept in order (``take_announcements``).

Eviction order, LRU or ``bid``, and each entry's idle time are ``EvictionOrder``'s
(eviction.py). All but ``check`` and ``reset`` is O(1) per hash or slot; taking and
returning a free slot is O(log slots).

Free slots are handed out lowest first (a min-heap): the workers copy a job's blocks in
one pass when its slots are consecutive (``kernels.torch_copy``), two otherwise, and a
job's reserves come back to back, so a burst on an empty tier gets 0, 1, 2, ... and
elsewhere walks the free runs in order. First fit also packs used slots at the bottom:
holes left by drops refill first (a stack would hand them back scattered; best fit
needs the burst's length, which the planner lacks). A full tier evicts in LRU order,
in runs too (committed in slot order) broken where hits moved entries to the MRU end.

The disk tier's index (``offload.disk``) is one too, over the disk's slots.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterable, Sequence

from vllm_bidkv.config import CPU_EVICTIONS
from vllm_bidkv.context import BlockHash
from vllm_bidkv.counters import Counters
from vllm_bidkv.offload.eviction import ArcOrder, EvictionOrder

_FREE, _PENDING, _READY, _ORPHAN = range(4)
_STATE_NAMES = ("FREE", "PENDING", "READY", "ORPHAN")


class CpuBlockTier:
    """Slots of the CPU tier: states, hash index, pins, LRU/bid eviction (see module doc)."""

    def __init__(
        self,
        num_slots: int,
        eviction: str = "lru",
        counters: Counters | None = None,
        announce: bool = False,
        evictions_counter: str = "cpu_evictions",
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"vllm-bidkv: the CPU tier needs at least one slot, got num_slots={num_slots}")
        if eviction not in CPU_EVICTIONS:
            raise ValueError(
                f"vllm-bidkv: cpu_eviction={eviction!r} is invalid; expected one of {CPU_EVICTIONS}"
            )
        self.num_slots = num_slots
        self.eviction = eviction
        # Per-slot bookkeeping exists for the slots handed out so far (below ``_grown``; the
        # others are FREE): a huge or unlimited tier (the simulator's bound) costs nothing here.
        self._grown = 0
        self._state: list[int] = []
        self._hash: list[BlockHash | None] = []
        self._pins: list[int] = []
        self._slot_of: dict[BlockHash, int] = {}
        self._free: list[int] = []  # a min-heap of released slots, all below ``_grown``
        self.order = ArcOrder(num_slots) if eviction == "arc" else EvictionOrder(bid=eviction == "bid")
        self._protect: dict[BlockHash, int] = {}
        self.counters = counters if counters is not None else Counters()
        self._evictions_counter = evictions_counter  # the disk tier's index counts its own
        self.num_pins = 0  # sum of pin counts
        # (hash, stored) per change of the READY set since the last take; None: not kept.
        self._announcements: list[tuple[BlockHash, bool]] | None = [] if announce else None

    # -- queries -----------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free) + self.num_slots - self._grown

    @property
    def num_used(self) -> int:
        return self.num_slots - self.num_free

    def contains(self, block_hash: BlockHash) -> bool:
        """True if the hash is READY or a store of it is PENDING."""
        return block_hash in self._slot_of

    @property
    def held(self) -> Container[BlockHash]:
        """The hashes ``contains`` is true of, live: ``in`` without a method call, for loops
        over every block of many requests (``lookup.restorable_tokens``)."""
        return self._slot_of.keys()

    def lookup(self, block_hash: BlockHash) -> int | None:
        """The slot holding this hash's data, or None (absent or still PENDING)."""
        slot = self._slot_of.get(block_hash)
        return slot if slot is not None and self._state[slot] == _READY else None

    def ready_until(self, hashes: Sequence[BlockHash], start: int, stop: int) -> int:
        """The first index in ``[start, stop)`` whose hash is not READY; ``stop`` if all are.
        ``lookup`` in a loop, without a call per block: a prompt's match walks its whole hit."""
        slot_of, state = self._slot_of, self._state
        for i in range(start, stop):
            slot = slot_of.get(hashes[i])
            if slot is None or state[slot] != _READY:
                return i
        return stop

    def hash_of(self, slot: int) -> BlockHash | None:
        self._check_slot(slot)
        return self._hash[slot] if slot < self._grown else None

    # -- stores --------------------------------------------------------------
    def reserve(
        self, block_hash: BlockHash, keep: Container[BlockHash] = (), min_idle: int | None = None
    ) -> int | None:
        """A PENDING slot for a store of ``block_hash``.

        Takes the lowest free slot, else evicts the ``order``'s victim.

        Args:
            keep: hashes never evicted for this store (a rescue must not evict its own
                victim's earlier blocks: a resume loads a prefix, so later blocks without
                them are worthless).
            min_idle: evict only an entry idle this long (``EvictionOrder.victim``).

        Returns:
            The slot; None if every slot is pinned or pending, or the entry to evict is
            one of ``keep`` or breaks ``min_idle``.
        """
        if block_hash in self._slot_of:
            raise ValueError(f"vllm-bidkv: hash {block_hash.hex()[:16]} is already in the CPU tier")
        if self._free:  # every released slot is below every slot never handed out
            slot = heapq.heappop(self._free)
        elif self._grown < self.num_slots:
            slot = self._grown
            self._grown += 1
            self._state.append(_FREE)
            self._hash.append(None)
            self._pins.append(0)
        else:
            victim = self.order.victim(min_idle)
            if victim is None or self._hash[victim] in keep:
                return None
            slot = victim
            old = self._hash[slot]
            self.order.remove(slot, evicted=old)
            assert old is not None
            del self._slot_of[old]
            self.counters.add(self._evictions_counter)
            self._announce(old, stored=False)
        self._state[slot] = _PENDING
        self._hash[slot] = block_hash
        self._slot_of[block_hash] = slot
        return slot

    def commit(self, slot: int) -> None:
        """The store into ``slot`` finished: PENDING -> READY (most recently used)."""
        self._expect(slot, _PENDING, "commit")
        self._state[slot] = _READY
        self._enqueue(slot)
        self._announce(self._hash[slot], stored=True)

    def abort(self, slot: int) -> None:
        """The store into ``slot`` failed: the entry is dropped, the slot is free."""
        self._expect(slot, _PENDING, "abort")
        self._release(slot)

    # -- loads ---------------------------------------------------------------
    def pin(self, slot: int) -> None:
        """A load reads ``slot``: it cannot be evicted until the matching ``unpin``."""
        self._expect(slot, _READY, "pin")
        if self._pins[slot] == 0:
            self._dequeue(slot)
        self._pins[slot] += 1
        self.num_pins += 1

    def unpin(self, slot: int, *, drop: bool = False) -> None:
        """Release one pin; with ``drop`` the entry is removed too (the load from it failed).

        An unpinned READY entry becomes evictable at the MRU end (a load is a use).
        """
        self._check_slot(slot)
        if slot >= self._grown or self._pins[slot] == 0:
            raise ValueError(f"vllm-bidkv: unpin of CPU slot {slot}, which has no pin")
        if drop and self._state[slot] == _READY:
            self._orphan(slot)
        self._pins[slot] -= 1
        self.num_pins -= 1
        if self._pins[slot] == 0:
            if self._state[slot] == _ORPHAN:
                self._release(slot)
            else:
                self._enqueue(slot)
                self.order.touch(slot)  # a load read it: a reuse (ARC moves it to T2)

    def mark_used(self, slot: int) -> None:
        """A hit on ``slot``: move it to the MRU end (a pinned slot gets there on its last unpin)."""
        self._expect(slot, _READY, "mark_used")
        self.order.touch(slot)

    # -- removal ---------------------------------------------------------------
    def drop(self, block_hash: BlockHash) -> bool:
        """Forget a READY hash (a pinned slot is freed on its last unpin); False if not READY."""
        slot = self.lookup(block_hash)
        if slot is None:
            return False
        if self._pins[slot]:
            self._orphan(slot)
        else:
            self._announce(block_hash, stored=False)
            self._dequeue(slot)
            self._release(slot)
        return True

    def reset(self) -> int:
        """Drop every READY entry (vLLM's reset_prefix_cache); returns how many. O(entries)."""
        ready = [h for h, slot in self._slot_of.items() if self._state[slot] == _READY]
        for block_hash in ready:
            self.drop(block_hash)
        return len(ready)

    def take_announcements(self) -> list[tuple[BlockHash, bool]]:
        """The changes of the READY set since the last call, oldest first: (hash, stored)."""
        taken = self._announcements or []
        self._announcements = None if self._announcements is None else []
        return taken

    # -- protection (bid eviction) -------------------------------------------
    def protect(self, hashes: Iterable[BlockHash]) -> None:
        """Evict these hashes last (counted: protect twice, unprotect twice)."""
        for block_hash in hashes:
            count = self._protect.get(block_hash, 0)
            self._protect[block_hash] = count + 1
            if count == 0:
                self._requeue(block_hash)

    def unprotect(self, hashes: Iterable[BlockHash]) -> None:
        for block_hash in hashes:
            count = self._protect.get(block_hash, 0)
            if count == 0:
                raise ValueError(
                    f"vllm-bidkv: unprotect of hash {block_hash.hex()[:16]}, which is not protected"
                )
            if count == 1:
                del self._protect[block_hash]
                self._requeue(block_hash)
            else:
                self._protect[block_hash] = count - 1

    def is_protected(self, block_hash: BlockHash) -> bool:
        return block_hash in self._protect

    # -- consistency -----------------------------------------------------------
    def check(self) -> None:
        """Assert every invariant of the module doc (O(slots); for tests and debugging)."""
        assert len(set(self._free)) == len(self._free), "free heap has duplicates"
        assert all(self._free[(i - 1) // 2] <= self._free[i] for i in range(1, len(self._free))), "heap order"
        free = set(self._free)
        protected: set[int] = set()
        pins = 0
        assert len(self._state) == len(self._hash) == len(self._pins) == self._grown <= self.num_slots
        for slot in range(self._grown):
            state, block_hash, pin = self._state[slot], self._hash[slot], self._pins[slot]
            name = _STATE_NAMES[state]
            assert pin >= 0, f"slot {slot}: pin count {pin}"
            pins += pin
            assert (slot in free) == (state == _FREE), f"slot {slot} is {name} but free={slot in free}"
            if state in (_PENDING, _READY):
                assert block_hash is not None and self._slot_of.get(block_hash) == slot, (
                    f"slot {slot}: bad index"
                )
            else:
                assert block_hash is None, f"slot {slot} is {name} but has a hash"
            assert pin == 0 or state in (_READY, _ORPHAN), f"slot {slot} is {name} with {pin} pins"
            assert state != _ORPHAN or pin > 0, f"slot {slot} is ORPHAN without pins"
            evictable = state == _READY and pin == 0
            assert (slot in self.order) == evictable, f"slot {slot}: eviction order"
            if evictable and block_hash in self._protect:
                protected.add(slot)
        self.order.check(protected)
        assert len(self._slot_of) == sum(s in (_PENDING, _READY) for s in self._state), "index size"
        assert pins == self.num_pins, f"pin total {self.num_pins} != {pins}"
        assert all(count > 0 for count in self._protect.values()), "protection count <= 0"

    # -- internals -------------------------------------------------------------
    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"vllm-bidkv: CPU slot {slot} out of range [0, {self.num_slots})")

    def _expect(self, slot: int, state: int, action: str) -> None:
        self._check_slot(slot)
        actual = self._state[slot] if slot < self._grown else _FREE
        if actual != state:
            raise ValueError(
                f"vllm-bidkv: {action} of CPU slot {slot}, which is {_STATE_NAMES[actual]} "
                f"(expected {_STATE_NAMES[state]})"
            )

    def _enqueue(self, slot: int) -> None:
        block_hash = self._hash[slot]
        assert block_hash is not None
        self.order.add(slot, block_hash, protected=block_hash in self._protect)

    def _dequeue(self, slot: int) -> None:
        self.order.remove(slot)

    def _requeue(self, block_hash: BlockHash) -> None:
        slot = self._slot_of.get(block_hash)
        if self.order.bid and slot is not None and self._state[slot] == _READY and self._pins[slot] == 0:
            self._dequeue(slot)
            self._enqueue(slot)

    def _announce(self, block_hash: BlockHash | None, *, stored: bool) -> None:
        if self._announcements is not None:
            assert block_hash is not None
            self._announcements.append((block_hash, stored))

    def _orphan(self, slot: int) -> None:  # READY -> ORPHAN: no longer a hit
        block_hash = self._hash[slot]
        assert block_hash is not None
        self._announce(block_hash, stored=False)
        del self._slot_of[block_hash]
        self._hash[slot] = None
        self._state[slot] = _ORPHAN

    def _release(self, slot: int) -> None:
        block_hash = self._hash[slot]
        if block_hash is not None:
            del self._slot_of[block_hash]
        self._hash[slot] = None
        self._state[slot] = _FREE
        heapq.heappush(self._free, slot)

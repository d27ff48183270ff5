"""CpuBlockTier: states, pins, LRU / bid / ARC eviction, idle time, errors, slot runs; a stateful
test against a list model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vllm_bidkv.offload import CpuBlockTier, num_slots_for

pytestmark = pytest.mark.unit


def h(i: int) -> bytes:
    return i.to_bytes(8, "little")


def ready(tier: CpuBlockTier, *ids: int) -> list[int]:
    """Store and commit these hashes; their slots."""
    slots = []
    for i in ids:
        slot = tier.reserve(h(i))
        assert slot is not None
        tier.commit(slot)
        slots.append(slot)
    return slots


def test_pending_is_contained_but_not_a_hit() -> None:
    tier = CpuBlockTier(2)
    slot = tier.reserve(h(1))
    assert slot is not None
    assert tier.contains(h(1)) and tier.lookup(h(1)) is None
    tier.commit(slot)
    assert tier.lookup(h(1)) == slot and tier.hash_of(slot) == h(1)
    assert (tier.num_used, tier.num_free) == (1, 1)
    tier.check()


def test_abort_frees_the_slot() -> None:
    tier = CpuBlockTier(1)
    slot = tier.reserve(h(1))
    assert slot is not None
    tier.abort(slot)
    assert not tier.contains(h(1)) and tier.num_free == 1
    assert tier.reserve(h(2)) == slot
    tier.check()


def test_lru_eviction_order_and_mark_used() -> None:
    tier = CpuBlockTier(3)
    a, b, c = ready(tier, 1, 2, 3)
    tier.mark_used(a)  # order now b, c, a
    assert tier.reserve(h(4)) == b
    assert tier.counters["cpu_evictions"] == 1 and not tier.contains(h(2))
    tier.check()


def test_pending_and_pinned_are_never_evicted() -> None:
    tier = CpuBlockTier(2)
    (a,) = ready(tier, 1)
    pending = tier.reserve(h(2))
    tier.pin(a)
    assert tier.reserve(h(3)) is None
    tier.pin(a)
    tier.unpin(a)
    assert tier.reserve(h(3)) is None, "a pin count, not a flag"
    tier.unpin(a)
    assert tier.reserve(h(3)) == a
    assert pending is not None and tier.contains(h(2))
    tier.check()


def test_unpin_makes_the_entry_most_recently_used() -> None:
    tier = CpuBlockTier(2)
    a, b = ready(tier, 1, 2)
    tier.pin(a)
    tier.unpin(a)
    assert tier.reserve(h(3)) == b


def test_bid_eviction_keeps_protected_entries_longest() -> None:
    tier = CpuBlockTier(3, eviction="bid")
    a, b, c = ready(tier, 1, 2, 3)
    tier.protect([h(1), h(2)])
    assert tier.reserve(h(4)) == c  # the only unprotected entry
    tier.commit(c)
    assert tier.reserve(h(5)) == c  # h4 is unprotected, evicted before a and b
    tier.commit(c)
    tier.unprotect([h(1)])  # a rejoins the unprotected queue (as most recently used)
    assert tier.reserve(h(6)) == c
    tier.commit(c)
    assert tier.reserve(h(7)) == a
    tier.commit(a)
    tier.pin(a)
    tier.pin(c)
    assert tier.reserve(h(8)) == b  # protected, but the last evictable entry
    tier.check()


def test_lru_eviction_ignores_protection() -> None:
    tier = CpuBlockTier(2, eviction="lru")
    a, _ = ready(tier, 1, 2)
    tier.protect([h(1)])
    assert tier.reserve(h(3)) == a
    tier.check()


def test_protection_is_counted_and_may_precede_the_entry() -> None:
    tier = CpuBlockTier(2, eviction="bid")
    tier.protect([h(1)])
    tier.protect([h(1)])
    a, b = ready(tier, 1, 2)  # h1 stored after it was protected
    tier.unprotect([h(1)])
    assert tier.is_protected(h(1))
    assert tier.reserve(h(3)) == b
    tier.unprotect([h(1)])
    assert not tier.is_protected(h(1))
    with pytest.raises(ValueError, match="not protected"):
        tier.unprotect([h(1)])
    tier.check()


def test_drop_of_a_pinned_entry_frees_its_slot_on_the_last_unpin() -> None:
    tier = CpuBlockTier(2)
    (a,) = ready(tier, 1)
    tier.pin(a)
    tier.pin(a)
    assert tier.drop(h(1))
    assert not tier.contains(h(1)) and tier.lookup(h(1)) is None and tier.hash_of(a) is None
    other = tier.reserve(h(1))  # the hash may be stored again elsewhere meanwhile
    assert other is not None and other != a
    tier.unpin(a)
    assert tier.num_free == 0
    tier.unpin(a)
    assert tier.num_free == 1
    assert not tier.drop(h(99))
    tier.check()


def test_unpin_with_drop_removes_the_entry() -> None:
    tier = CpuBlockTier(2)
    (a,) = ready(tier, 1)
    tier.pin(a)
    tier.unpin(a, drop=True)
    assert not tier.contains(h(1)) and tier.num_free == 2
    tier.check()


def test_reset_drops_ready_entries_only() -> None:
    tier = CpuBlockTier(3)
    a, b = ready(tier, 1, 2)
    pending = tier.reserve(h(3))
    tier.pin(b)
    assert tier.reset() == 2
    assert not tier.contains(h(1)) and not tier.contains(h(2)) and tier.contains(h(3))
    assert tier.num_used == 2  # b still read by a load, h3 still being stored
    tier.unpin(b)
    assert pending is not None
    tier.commit(pending)
    assert tier.lookup(h(3)) == pending
    tier.check()


def test_errors_name_the_slot() -> None:
    tier = CpuBlockTier(2)
    slot = tier.reserve(h(1))
    assert slot is not None
    tier.commit(slot)
    with pytest.raises(ValueError, match=f"commit of CPU slot {slot}, which is READY"):
        tier.commit(slot)
    with pytest.raises(ValueError, match=f"unpin of CPU slot {slot}, which has no pin"):
        tier.unpin(slot)
    with pytest.raises(IndexError, match="CPU slot 7 out of range"):
        tier.pin(7)
    with pytest.raises(ValueError, match="pin of CPU slot 1, which is FREE"):
        tier.pin(1)
    with pytest.raises(ValueError, match="already in the CPU tier"):
        tier.reserve(h(1))
    with pytest.raises(ValueError, match="cpu_eviction='mru'"):
        CpuBlockTier(2, eviction="mru")
    with pytest.raises(ValueError, match="num_slots=0"):
        CpuBlockTier(0)


@given(num_slots=st.integers(1, 64), data=st.data())
def test_property_a_burst_on_a_fresh_tier_is_one_run(num_slots: int, data: st.DataObject) -> None:
    tier = CpuBlockTier(num_slots)
    burst = data.draw(st.integers(1, num_slots))
    assert [tier.reserve(h(i)) for i in range(burst)] == list(range(burst))


@given(
    num_slots=st.integers(1, 32),
    history=st.lists(st.tuples(st.sampled_from(["store", "drop", "abort", "use"]), st.integers(0, 40))),
    defragment=st.booleans(),
    data=st.data(),
)
def test_property_a_burst_takes_the_free_slots_in_order(
    num_slots: int, history: list[tuple[str, int]], defragment: bool, data: st.DataObject
) -> None:
    """After any history a burst of reserves walks the free slots lowest first, so it is
    consecutive wherever the free slots are; once the tier is emptied it is 0, 1, 2, ..."""
    tier = CpuBlockTier(num_slots)
    for action, i in history:
        if action in ("store", "abort") and not tier.contains(h(i)):
            slot = tier.reserve(h(i))
            if slot is not None:
                (tier.abort if action == "abort" else tier.commit)(slot)
        elif action == "drop":
            tier.drop(h(i))
        elif action == "use" and (slot := tier.lookup(h(i))) is not None:
            tier.mark_used(slot)
    if defragment:
        tier.reset()
    free = [slot for slot in range(num_slots) if tier.hash_of(slot) is None]
    burst = data.draw(st.integers(0, len(free)))
    assert [tier.reserve(h(100 + i)) for i in range(burst)] == free[:burst]
    if defragment:
        assert free == list(range(num_slots))
    tier.check()


def test_num_slots_for() -> None:
    assert num_slots_for(10 * 4096 + 5, 4096) == 10
    with pytest.raises(ValueError, match="cpu_bytes=100 holds no block of 4096 bytes"):
        num_slots_for(100, 4096)
    with pytest.raises(ValueError, match="block_bytes=0"):
        num_slots_for(100, 0)


class TierModel(RuleBasedStateMachine):
    """The tier against a list model: evictable entries in LRU order, protected ones last."""

    eviction = "bid"

    def __init__(self) -> None:
        super().__init__()
        self.tier = CpuBlockTier(4, eviction=self.eviction, announce=True)
        self.announced: set[bytes] = set()  # replayed from take_announcements (KV events)
        self.order: list[int] = []  # evictable slots, LRU first, across both queues' rules
        self.used_at: dict[int, int] = {}  # evictable slot -> the clock at its last use
        self.pending: set[int] = set()
        self.pins: dict[int, int] = {}
        self.protect: dict[bytes, int] = {}
        self.next_hash = 0

    def _protected(self, slot: int) -> bool:
        block_hash = self.tier.hash_of(slot)
        return block_hash is not None and self.protect.get(block_hash, 0) > 0

    def _expected_victim(self, min_idle: int | None) -> int | None:
        unprotected = [s for s in self.order if not self._protected(s)]
        if min_idle is not None:  # only an unprotected entry idle long enough
            first = unprotected[0] if unprotected else None
            return (
                first
                if first is not None and self.tier.order.clock - self.used_at[first] >= min_idle
                else None
            )
        candidates = unprotected or self.order
        return candidates[0] if candidates else None

    def _use(self, slot: int) -> None:
        if slot in self.order:
            self.order.remove(slot)
        self.order.append(slot)
        self.used_at[slot] = self.tier.order.clock

    @rule(ticks=st.integers(0, 5))
    def tick(self, ticks: int) -> None:
        self.tier.order.clock += ticks

    @rule(min_idle=st.none() | st.integers(0, 8))
    def reserve(self, min_idle: int | None) -> None:
        self.next_hash += 1
        free = [s for s in range(self.tier.num_slots) if self.tier.hash_of(s) is None and s not in self.pins]
        had_free = self.tier.num_free > 0
        expect = free[0] if had_free else self._expected_victim(min_idle)  # the lowest free slot first
        slot = self.tier.reserve(h(self.next_hash), min_idle=min_idle)
        if self.eviction == "arc":  # its own order: the invariants below still hold
            if slot is not None:
                self.pending.add(slot)
                if slot in self.order:
                    self.order.remove(slot)
            return
        if slot is None:
            assert not had_free and expect is None
            return
        assert slot == expect
        if not had_free:
            self.order.remove(slot)
        self.pending.add(slot)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), ok=st.booleans())
    def finish_store(self, data: st.DataObject, ok: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(self.pending)))
        self.pending.remove(slot)
        if ok:
            self.tier.commit(slot)
            self._use(slot)
        else:
            self.tier.abort(slot)

    def _ready(self) -> list[int]:
        """READY slots: evictable ones and pinned ones still holding their hash."""
        return sorted(set(self.order) | {s for s in self.pins if self.tier.hash_of(s) is not None})

    @precondition(lambda self: self._ready())
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self._ready()))
        self.tier.pin(slot)
        if slot in self.order:
            self.order.remove(slot)
        self.pins[slot] = self.pins.get(slot, 0) + 1

    @precondition(lambda self: self.pins)
    @rule(data=st.data(), drop=st.booleans())
    def unpin(self, data: st.DataObject, drop: bool) -> None:
        slot = data.draw(st.sampled_from(sorted(self.pins)))
        alive = self.tier.hash_of(slot) is not None
        self.tier.unpin(slot, drop=drop)
        self.pins[slot] -= 1
        if not self.pins[slot]:
            del self.pins[slot]
            if alive and not drop:
                self._use(slot)

    @precondition(lambda self: self._ready())
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self._ready()))
        block_hash = self.tier.hash_of(slot)
        assert block_hash is not None and self.tier.drop(block_hash)
        if slot in self.order:
            self.order.remove(slot)

    @precondition(lambda self: self.order)
    @rule(data=st.data())
    def mark_used(self, data: st.DataObject) -> None:
        slot = data.draw(st.sampled_from(self.order))
        self.tier.mark_used(slot)
        self._use(slot)

    @rule(i=st.integers(1, 12), on=st.booleans())
    def protect_hash(self, i: int, on: bool) -> None:
        block_hash = h(i)
        slot = self.tier.lookup(block_hash)
        if on:
            self.tier.protect([block_hash])
            self.protect[block_hash] = self.protect.get(block_hash, 0) + 1
        elif self.protect.get(block_hash):
            self.tier.unprotect([block_hash])
            self.protect[block_hash] -= 1
        else:
            return
        # A change of protection re-queues the entry as most recently used.
        count = self.protect.get(block_hash, 0)
        if slot is not None and slot in self.order and count == (1 if on else 0) and self.eviction == "bid":
            self._use(slot)

    @invariant()
    def consistent(self) -> None:
        self.tier.check()
        assert self.tier.num_used <= self.tier.num_slots
        assert self.tier.num_pins == sum(self.pins.values())

    @invariant()
    def announced_set_is_the_ready_set(self) -> None:
        for block_hash, stored in self.tier.take_announcements():
            if stored:
                assert block_hash not in self.announced, "stored twice without a removal"
                self.announced.add(block_hash)
            else:
                self.announced.remove(block_hash)
        slots = range(self.tier.num_slots)
        ready = {b for s in slots if (b := self.tier.hash_of(s)) is not None and self.tier.lookup(b) == s}
        assert self.announced == ready


TierModel.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_tier_model = TierModel.TestCase


class ArcTierModel(TierModel):
    """The same operations under ``arc``: states, pins, announcements and ARC's own invariants."""

    eviction = "arc"


ArcTierModel.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
test_arc_tier_model = ArcTierModel.TestCase


def test_arc_keeps_a_reused_entry_through_a_scan_that_lru_lets_evict_it() -> None:
    """One entry loaded again (T2), then a stream of blocks used once: LRU evicts the reused
    entry as the stream passes it; ARC evicts from the once-used ones."""
    kept = {}
    for eviction in ("lru", "arc"):
        tier = CpuBlockTier(4, eviction=eviction)
        (hot,) = ready(tier, 1)
        tier.pin(hot)
        tier.unpin(hot)  # a load read it: a reuse
        ready(tier, *range(2, 10))  # a scan of eight blocks used once
        kept[eviction] = tier.lookup(h(1)) is not None
        tier.check()
    assert kept == {"lru": False, "arc": True}


def test_arc_moves_its_target_toward_the_list_a_ghost_came_back_from() -> None:
    tier = CpuBlockTier(2, eviction="arc")
    ready(tier, 1, 2, 3)  # 1 evicted from T1: a ghost in B1
    assert tier.order.target_t1 == 0  # type: ignore[attr-defined]
    ready(tier, 1)  # stored again: recency deserved more room
    assert tier.order.target_t1 >= 1  # type: ignore[attr-defined]
    tier.check()


@pytest.mark.parametrize("eviction", ["lru", "bid", "arc"])
def test_min_idle_evicts_only_an_entry_idle_that_long(eviction: str) -> None:
    tier = CpuBlockTier(2, eviction=eviction)
    ready(tier, 1, 2)
    tier.order.clock += 5
    assert tier.reserve(h(3), min_idle=6) is None, "used 5 ticks ago: too recent"
    assert tier.contains(h(1)) and tier.contains(h(2))
    slot = tier.reserve(h(3), min_idle=5)
    assert slot is not None and not tier.contains(h(1)), "the oldest goes"
    tier.check()


def test_a_tier_larger_than_any_host_costs_only_what_it_holds() -> None:
    """The scheduler's bookkeeping grows with the slots handed out, not with ``cpu_bytes``: a
    tier of 10^15 slots (the worker refuses one the host cannot hold; the simulator's
    unlimited bound needs one) builds (sizing per-slot lists by it would exhaust memory),
    and still hands out the lowest free slot."""
    tier = CpuBlockTier(10**15)
    slots = [tier.reserve(bytes([i]) * 16) for i in range(3)]
    assert slots == [0, 1, 2] and tier.num_free == 10**15 - 3 and tier.num_used == 3
    tier.abort(1)
    assert tier.reserve(b"\x09" * 16) == 1, "a released slot before one never used"
    assert tier.hash_of(10**15 - 1) is None
    with pytest.raises(ValueError, match="which is FREE"):
        tier.commit(10**12)
    tier.check()

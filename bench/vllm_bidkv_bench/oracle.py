"""The ``oracle`` config's tier: Belady eviction over the trace's future (the simulator only).

``oracle`` is the bound for a policy with this memory: the preset's GPU blocks and CPU bytes,
copies that take no time, every computed block stored (``offload_mode`` auto with no idle
rule), and a tier that evicts the entry whose next use lies farthest ahead. It knows the
future from the workload itself: every request's prompt is known before the run (a
closed-loop turn is the previous turn's prompt, its output, which the simulator makes
deterministic with ``sim_token``, and the next message), so every block hash's uses are
listed in arrival order up front. A closed loop's arrival times depend on how fast the run
serves it; its turns are ordered by session start plus think times, the order a faster
engine would approach.

``BeladyOrder`` keeps each evictable slot's next use in a max-heap with lazy deletion;
every event that moves a block's next use refreshes its entry (``OracleTier``), so the
heap's top is exact whenever a store asks for a victim. The blocks of a request that waits
(arrived and not scheduled yet, or preempted: the scheduler side protects its blocks until
it resumes) are used "now": its admission will look them up. A running request's blocks are
on the GPU; their next use from the tier is the trace's next request holding them.
``OracleTier`` does not store a block whose next use is farther than the victim's (it would
be evicted before anything it displaces is used again): "every computed block" is offered,
and Belady with bypass decides.

The tier is one level of two: a block the GPU's prefix cache holds needs no tier copy while it
is there, so its next use from the tier is ``NEVER`` (the tier's first victim), and every block
vLLM evicts from the GPU is offered to the tier at that moment, copied for free, with its real
next use (``install_oracle`` watches the scheduler's prefix cache, ``standalone.watch_prefix_cache``). An inclusive tier of the GPU
pool's size would otherwise hold mostly what the GPU holds, and a policy that stores only what
the GPU drops (our lazy walk) would beat the bound with a tier of 1×.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Callable, Container, Iterable, Sequence
from typing import Any

from vllm_bidkv.context import BlockHash
from vllm_bidkv.counters import Counters
from vllm_bidkv.offload.cpu_tier import CpuBlockTier
from vllm_bidkv.offload.eviction import EvictionOrder
from vllm_bidkv_bench.workloads import Workload

NEVER = math.inf


class FutureUses:
    """Per block hash, the positions (in arrival order) of the requests whose prompts hold it."""

    def __init__(self, order: dict[str, int], uses: dict[BlockHash, list[int]]) -> None:
        self._order = order  # request id -> its position in arrival order
        self._uses = uses
        self.now = -1  # the position of the latest request that arrived

    @classmethod
    def of(
        cls,
        workload: Workload,
        vocab_size: int,
        hashes_of: Callable[[str, list[int]], Sequence[BlockHash]],
        token: Callable[[str, int], int],
    ) -> FutureUses:
        """Every request of ``workload`` (closed loop: every turn of every session, outputs by
        ``token(request_id, index)``), hashed by ``hashes_of(request_id, prompt)``."""
        planned: list[tuple[float, str, list[int]]] = []
        if workload.sessions is None:
            for index, spec in enumerate(workload.requests):
                planned.append(
                    (spec.arrival_s, workload.request_id(index), workload.prompt_token_ids(index, vocab_size))
                )
        else:
            for session, plan in enumerate(workload.sessions.plans):
                prompt, arrival = list(plan.first_prompt), plan.start_s
                for turn, output_len in enumerate(plan.output_lens):
                    request_id = f"{workload.name}-{session}.{turn}"
                    planned.append((arrival, request_id, prompt))
                    if turn + 1 < len(plan.output_lens):
                        output = [token(request_id, i) for i in range(output_len)]
                        prompt = [*prompt, *output, *plan.messages[turn]]
                        arrival += plan.think_s[turn]
        planned.sort(key=lambda p: p[0])
        order: dict[str, int] = {}
        uses: dict[BlockHash, list[int]] = {}
        for position, (_, request_id, prompt) in enumerate(planned):
            order[request_id] = position
            for block_hash in dict.fromkeys(hashes_of(request_id, prompt)):
                uses.setdefault(block_hash, []).append(position)
        return cls(order, uses)

    def next_use(self, block_hash: BlockHash) -> float:
        """The position of the next request after ``now`` that holds ``block_hash``; ``NEVER``."""
        positions = self.uses(block_hash)
        i = bisect.bisect_right(positions, self.now)
        return positions[i] if i < len(positions) else NEVER

    def uses(self, block_hash: BlockHash) -> Sequence[int]:
        """The positions of the requests whose prompts hold ``block_hash``, in order."""
        return self._uses.get(block_hash, ())

    def position(self, request_id: str) -> int | None:
        """The request's position in arrival order; None if the trace does not have it."""
        return self._order.get(request_id)

    def arrive(self, request_id: str) -> None:
        """A request arrived: time moves on to its position."""
        position = self.position(request_id)
        self.now = self.now if position is None else max(self.now, position)


class BeladyOrder(EvictionOrder):
    """Evicts the entry used farthest in the future (see module doc); ignores ``min_idle``
    and protection: the oracle stores every block and knows what each is worth."""

    def __init__(self, next_use: Callable[[BlockHash], float]) -> None:
        super().__init__(bid=False)
        self._next_use = next_use
        self._heap: list[tuple[float, int, int]] = []  # (-next use, seq, slot)
        self._live: dict[int, int] = {}  # evictable slot -> seq of its current heap entry
        self._seq = itertools.count()

    def __contains__(self, slot: int) -> bool:
        return slot in self._live

    def add(self, slot: int, block_hash: BlockHash, protected: bool) -> None:
        self.refresh(slot, block_hash)

    def refresh(self, slot: int, block_hash: BlockHash) -> None:
        seq = next(self._seq)
        self._live[slot] = seq
        heapq.heappush(self._heap, (-self._next_use(block_hash), seq, slot))

    def remove(self, slot: int, evicted: BlockHash | None = None) -> None:
        self._live.pop(slot, None)

    def touch(self, slot: int) -> None:
        """A hit's next use is the same request's: its arrival already moved it."""

    def victim(self, min_idle: int | None = None) -> int | None:
        while self._heap:
            _, seq, slot = self._heap[0]
            if self._live.get(slot) == seq:
                return slot
            heapq.heappop(self._heap)
        return None

    def slots(self) -> list[int]:
        return sorted(self._live)

    def check(self, protected: set[int]) -> None:
        live = {(seq, slot) for slot, seq in self._live.items()}
        assert live <= {(seq, slot) for _, seq, slot in self._heap}, (
            "an evictable slot without its heap entry"
        )


class OracleTier(CpuBlockTier):
    """A ``CpuBlockTier`` with Belady's order and bypass (see module doc)."""

    def __init__(
        self,
        num_slots: int,
        future: FutureUses,
        counters: Counters,
        on_gpu: Callable[[BlockHash], bool] = lambda block_hash: False,
    ) -> None:
        super().__init__(num_slots, counters=counters)
        self.future = future
        self._on_gpu = on_gpu  # the GPU's prefix cache holds this hash
        self.gpu_evictions_stored = 0  # blocks stored as vLLM dropped them (not by the planner)
        self.order = self._belady = BeladyOrder(self.next_use)
        self._waiting: dict[str, list[BlockHash]] = {}  # arrived, not scheduled yet: its prompt's hashes
        self._waiting_hashes: dict[BlockHash, int] = {}  # hash -> waiting requests holding it

    def next_use(self, block_hash: BlockHash) -> float:
        """``NEVER`` while the GPU holds it, ``now`` for a block a waiting request holds,
        else the trace's next use."""
        if self._on_gpu(block_hash):
            return NEVER
        if block_hash in self._waiting_hashes or self.is_protected(block_hash):
            return self.future.now
        return self.future.next_use(block_hash)

    def reserve(
        self, block_hash: BlockHash, keep: Container[BlockHash] = (), min_idle: int | None = None
    ) -> int | None:
        if not self.num_free:
            victim = self._belady.victim()
            victim_hash = self.hash_of(victim) if victim is not None else None
            if victim_hash is None or self.next_use(block_hash) > self.next_use(victim_hash):
                return None  # used after everything held: it would be evicted first (ties: store)
        return super().reserve(block_hash, keep)

    def arrived(self, request_id: str, block_hashes: Sequence[BlockHash]) -> None:
        """A request arrived: time moves on, and its blocks wait with it until it is scheduled."""
        self.future.arrive(request_id)
        hashes = self._waiting[request_id] = list(dict.fromkeys(block_hashes))
        for block_hash in hashes:
            self._waiting_hashes[block_hash] = self._waiting_hashes.get(block_hash, 0) + 1
        self._refresh(hashes)

    def admitted(self, request_id: str) -> None:
        """Scheduled for the first time (or finished before that): its blocks no longer wait."""
        hashes = self._waiting.pop(request_id, [])
        for block_hash in hashes:
            self._waiting_hashes[block_hash] -= 1
            if not self._waiting_hashes[block_hash]:
                del self._waiting_hashes[block_hash]
        self._refresh(hashes)

    def protect(self, hashes: Iterable[BlockHash]) -> None:
        hashes = list(hashes)
        super().protect(hashes)
        self._refresh(hashes)

    def unprotect(self, hashes: Iterable[BlockHash]) -> None:
        hashes = list(hashes)
        super().unprotect(hashes)
        self._refresh(hashes)

    def gpu_cached(self, block_hash: BlockHash) -> None:
        """The GPU's prefix cache took ``block_hash``: a tier copy is worth nothing while it is there."""
        self._refresh((block_hash,))

    def gpu_evicted(self, block_hash: BlockHash) -> None:
        """vLLM dropped ``block_hash`` from the GPU: stored now if Belady keeps it (a free copy)."""
        if self.contains(block_hash):
            self._refresh((block_hash,))
            return
        slot = self.reserve(block_hash)
        if slot is not None:
            self.commit(slot)
            self.gpu_evictions_stored += 1

    def _refresh(self, hashes: Sequence[BlockHash]) -> None:
        for block_hash in hashes:
            slot = self.lookup(block_hash)
            if slot is not None and slot in self._belady:
                self._belady.refresh(slot, block_hash)


def install_oracle(
    scheduler: Any, workload: Workload, vocab_size: int, block_size: int, token: Callable[[str, int], int]
) -> OracleTier:
    """Give the ``oracle`` config's planner (BidKVConnector, bound to ``scheduler``) an
    ``OracleTier`` of the same size, knowing ``workload``'s future, told of every block the GPU's
    prefix cache takes or drops; call before the first step."""
    from vllm_bidkv_bench.standalone import make_request, watch_prefix_cache

    planner = scheduler.connector.scheduler_role.side.planner
    assert planner is not None and planner.tier.num_used == 0, "the oracle config stores into an empty tier"

    def hashes_of(request_id: str, prompt: list[int]) -> Sequence[BlockHash]:
        return make_request(request_id, prompt, 1, block_size=block_size).block_hashes  # type: ignore[no-any-return]

    future = FutureUses.of(workload, vocab_size, hashes_of, token)
    pool = scheduler.kv_cache_manager.block_pool
    group_ids = list(range(len(scheduler.kv_cache_config.kv_cache_groups)))
    tier = OracleTier(
        planner.tier.num_slots,
        future,
        planner.tier.counters,
        on_gpu=lambda block_hash: pool.get_cached_block(block_hash, group_ids) is not None,
    )
    planner.tier = tier
    watch_prefix_cache(scheduler, block_size, cached=tier.gpu_cached, dropped=tier.gpu_evicted)
    return tier

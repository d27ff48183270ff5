"""Read-only questions to the tiers about one request: what a hit supplies after the
GPU prefix, and what a resume would get back if the request were preempted now (its
victim ``Candidate``, kept for the rest of the step by ``StepCandidates``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from vllm_bidkv.context import BlockHash, RequestView, SchedulerContext
from vllm_bidkv.offload.cpu_tier import CpuBlockTier
from vllm_bidkv.policy.candidate import Candidate, Decision
from vllm_bidkv.policy.ranking import best_by_bounded_key, best_by_key
from vllm_bidkv.policy.strategies import ScoredStrategy


def match_tokens(
    ready_until: Callable[[Sequence[BlockHash], int, int], int],
    request: RequestView,
    num_computed_tokens: int,
    block_size: int,
    window: int | None,
) -> int:
    """Tokens after the GPU prefix hit the tiers can supply (vLLM's external hit).

    The longest hit from block ``num_computed_tokens // block_size`` whose blocks are ready
    (READY in the CPU tier, or in the disk tier behind it), capped so one token is left to
    compute. ``ready_until(hashes, start, stop)``: the first index in ``[start, stop)`` whose
    block is not ready (``stop`` if all are). With a sliding ``window`` (tokens; None: full
    attention), only the blocks of the window before the hit's end are needed (vLLM gives the
    others the null block), so a hit may start past blocks the tiers lack. 0 if
    ``num_computed_tokens`` is not block aligned (copies are whole blocks). O(hit length), in
    runs of ready blocks (a prompt's whole prefix is one run in the common case); changes
    nothing.
    """
    bs = block_size
    room = request.num_tokens - 1 - num_computed_tokens
    if num_computed_tokens % bs or room <= 0:
        return 0
    hashes = request.block_hashes
    first = num_computed_tokens // bs
    last = min(len(hashes), first + math.ceil(room / bs))
    hit, start = 0, first
    while start < last:
        stop = ready_until(hashes, start, last)  # blocks [start, stop) are ready
        if stop > start:
            end = min(stop * bs - num_computed_tokens, room)  # tokens a hit to its end supplies
            # The first block vLLM will not null (see get_num_skipped_tokens): the run must
            # reach back to it. It only moves later as the hit grows, so if any block of the
            # run ends a valid hit, its last block does.
            needed_from = first
            if window is not None:
                needed_from = max(first, (num_computed_tokens + end - window + 1) // bs)
            if needed_from >= start:
                hit = end
        if window is None:
            break  # full attention: the hit is the first run
        start = stop + 1
    return hit


def restorable_tokens(
    tier: CpuBlockTier,
    ref_counts: Sequence[int],
    block_hashes: Sequence[BlockHash],
    start: int,
    computed_blocks: int,
    block_size: int,
) -> tuple[int, int]:
    """``(cpu_tokens, offloadable_tokens)`` of a running request, for the victim policy.

    ``ref_counts``: of the request's blocks in order; ``start``: how many leading blocks
    are shared (ref_cnt > 1: they stay on the GPU); ``computed_blocks``: full blocks whose
    KV is computed. From ``start`` on, each block counts as ``cpu`` if the tier holds (or
    is storing) its hash, else as ``offloadable`` if it is private and computed (a
    preemption rescues it); the first block that is neither ends the run (a resume
    restores a prefix only). Offloadable is capped by the tier size. O(blocks).
    """
    cpu = offloadable = 0
    held = tier.held  # ``in`` without a call per block: every preemptible request, each failure
    for i in range(start, min(len(ref_counts), len(block_hashes))):
        if block_hashes[i] in held:
            cpu += 1
        elif ref_counts[i] == 1 and i < computed_blocks:
            offloadable += 1
        else:
            break
    offloadable = min(offloadable, max(0, tier.num_slots - cpu))
    return cpu * block_size, offloadable * block_size


def shortfall_blocks(ctx: SchedulerContext, requester: RequestView) -> int:
    """Blocks ``requester`` lacks to hold all its tokens, beyond the free pool; at least 1 (its
    allocation failed). Exact for a decode step; a chunked prefill asks for less than the rest
    of its prompt, so this may overstate its need (U then caps less)."""
    groups = ctx.request_block_ids(requester.request_id)
    held = len(groups[0]) if groups else 0
    needed = -(-requester.num_tokens // ctx.block_size) - held
    return max(1, needed - ctx.num_free_blocks())


def victim_candidate(
    ctx: SchedulerContext, tier: CpuBlockTier | None, order: int, request: RequestView
) -> Candidate:
    """What preempting ``request`` frees and costs, from one batched context call. O(blocks).

    ``tier``: the CPU tier (None: offload off, nothing restorable); ``order``: the request's
    position in the list vLLM may preempt from.
    """
    held, refs = held_candidate(ctx, order, request)
    return with_restorable(tier, held, refs, request, ctx.block_size)


def held_candidate(ctx: SchedulerContext, order: int, request: RequestView) -> tuple[Candidate, list[int]]:
    """``victim_candidate`` without its restorable run (``cpu_tokens`` and ``offloadable_tokens``
    0), and the request's block reference counts that run is read from (``with_restorable``).
    What preempting it frees is known here; only what a resume gets back from the tier is not."""
    refs = ctx.request_ref_counts(request.request_id)
    bs = ctx.block_size
    computed = request.num_computed_tokens
    shared_blocks = _shared_blocks(refs)
    held = Candidate(
        request_id=request.request_id,
        order=order,
        num_blocks=len(refs),
        freeable_blocks=refs.count(1),
        computed_tokens=computed,
        shared_tokens=min(computed, shared_blocks * bs),
        cpu_tokens=0,
        offloadable_tokens=0,
        output_tokens=request.num_output_tokens,
        max_tokens=request.max_tokens,
        num_preemptions=request.num_preemptions,
    )
    return held, refs


def with_restorable(
    tier: CpuBlockTier | None, held: Candidate, refs: Sequence[int], request: RequestView, block_size: int
) -> Candidate:
    """``held`` (``held_candidate``'s, with its ``refs``) with the run a resume would get back
    from the tier. O(blocks)."""
    if tier is None:
        return held
    cpu, offloadable = restorable_tokens(
        tier, refs, request.block_hashes, _shared_blocks(refs), held.computed_tokens // block_size, block_size
    )
    return held._replace(cpu_tokens=cpu, offloadable_tokens=offloadable)


def _shared_blocks(refs: Sequence[int]) -> int:
    """Leading blocks other requests hold too (a resume finds them on the GPU)."""
    shared = 0
    while shared < len(refs) and refs[shared] > 1:
        shared += 1
    return shared


class StepCandidates:
    """The victim candidates priced in this ``schedule()``, kept for its later failed allocations.

    Within one ``schedule()`` a preemptible request (running, not scheduled yet this step)
    keeps its blocks, its computed and output tokens, and the tier its entries: copies are
    planned and reported outside ``schedule()``. What does change is the reference count of a
    block a victim shared, when vLLM frees the victim; and only a count going from 2 to 1
    changes a candidate (a shared block becomes private: freeable, and offloadable). So a
    victim holding such a block forgets every pricing, any other only its own, and a step
    forgets them all. At 256 running half the failed allocations follow another in the same
    step; each then prices only the candidates it has not seen. O(1) a candidate seen.

    A candidate is priced in two parts, each kept as long as the whole would be:
    ``held_candidate``, then ``with_restorable``. ``best`` prices the second only for the
    candidates the strategy's key bound does not rule out (at 256 running, 3% of them).

    ``last_the_step`` False: vLLM's allocation frees blocks of requests it did not preempt
    (a sliding window's that left it), so every failure prices every candidate afresh.
    """

    def __init__(self, last_the_step: bool = True) -> None:
        self._held: dict[str, tuple[Candidate, list[int]]] = {}
        self._whole: dict[str, Candidate] = {}
        self._last_the_step = last_the_step

    def price(
        self, ctx: SchedulerContext, tier: CpuBlockTier | None, requests: Sequence[RequestView]
    ) -> list[Candidate]:
        """``victim_candidate`` of each of ``requests`` in order, reusing this step's pricings."""
        bs = ctx.block_size
        return [
            self._whole_candidate(tier, held, refs, request, bs)
            for (held, refs), request in zip(self._held_candidates(ctx, requests), requests, strict=True)
        ]

    def best(
        self,
        ctx: SchedulerContext,
        tier: CpuBlockTier | None,
        requests: Sequence[RequestView],
        strategy: ScoredStrategy,
        decision: Decision,
    ) -> Candidate:
        """``strategy.choose`` of ``price``'s candidates, pricing the restorable run only of
        those ``strategy.key_bound`` does not rule out (``best_by_bounded_key``)."""
        entries = self._held_candidates(ctx, requests)
        held = [candidate for candidate, _ in entries]
        if tier is None:  # nothing restorable: the held candidates are whole
            return best_by_key(held, decision, strategy.key)
        bs = ctx.block_size

        def whole(candidate: Candidate) -> Candidate:
            return self._whole_candidate(
                tier, candidate, entries[candidate.order][1], requests[candidate.order], bs
            )

        return best_by_bounded_key(held, decision, strategy.key, strategy.key_bound, whole)

    def _held_candidates(
        self, ctx: SchedulerContext, requests: Sequence[RequestView]
    ) -> list[tuple[Candidate, list[int]]]:
        """``held_candidate`` of each of ``requests``, with ``order`` its index."""
        known, entries = self._held, []
        for order, request in enumerate(requests):
            entry = known.get(request.request_id)
            if entry is None:
                entry = held_candidate(ctx, order, request)
                if self._last_the_step:
                    known[request.request_id] = entry
            elif entry[0].order != order:
                entry = (entry[0]._replace(order=order), entry[1])
            entries.append(entry)
        return entries

    def _whole_candidate(
        self, tier: CpuBlockTier | None, held: Candidate, refs: list[int], request: RequestView, bs: int
    ) -> Candidate:
        whole = self._whole.get(held.request_id)
        if whole is None:
            whole = with_restorable(tier, held, refs, request, bs)
            if self._last_the_step:
                self._whole[held.request_id] = whole
        return whole if whole.order == held.order else whole._replace(order=held.order)

    def preempting(self, ctx: SchedulerContext, request_id: str) -> None:
        """vLLM frees ``request_id``'s blocks next (call before it does)."""
        if 2 in ctx.request_ref_counts(request_id):
            self._held.clear()
            self._whole.clear()
        else:
            self._held.pop(request_id, None)
            self._whole.pop(request_id, None)

    def new_step(self) -> None:
        self._held.clear()
        self._whole.clear()

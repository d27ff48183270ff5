"""Admission order: how the waiting queue is sorted before vLLM considers it.

The order applies to *every* waiting request, new and preempted alike: under ``sjf`` a
preempted request loses the head-of-queue place vLLM gives it and waits its turn by
prompt length (bidkv 0.1.0's headline win came mostly from this).

``cache-aware`` orders by the prefill work a request leaves to compute if admitted now: its
tokens (prompt, plus output for a preempted one) less its GPU prefix-cache hit and the CPU
tier's hit after it, smallest first, ties by arrival. That changes while a request waits
(GPU blocks are reused, the tier fills and evicts), so it is no key fixed at insertion:
``CacheAwareOrder`` looks the hits up again at each ``schedule()`` (``patches.admission``).
Aging bound ``max_bypass``: once that many later arrivals were admitted ahead of a waiting
request it is *due*, and due requests go first, in arrival order; so none is overtaken by
more than ``max_bypass`` later arrivals (0: FCFS by arrival). A request vLLM pops and puts
back in the same step (passed over: blocked, grammar not ready) admitted nobody: its pop
ages no one.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, NoReturn, TypeVar

from vllm_bidkv.config import ADMISSIONS
from vllm_bidkv.context import RequestView

AdmissionKey = Callable[[RequestView], tuple[int, float, str]]
TierHit = Callable[[RequestView, int], int]
"""Tokens after a block-aligned GPU hit that the CPU tier (or the disk behind it) would supply
now (``OffloadPlanner.match``): read-only, no LRU move, no counter."""

REFRESH_PER_STEP = 128
"""Most waiting requests ``CacheAwareOrder.refresh`` looks up per step: the never looked up
first, then the stalest. One look-up is O(blocks of its hit) hash probes, GPU and CPU."""

R = TypeVar("R", bound=RequestView)


def _shortest_prompt_first(request: RequestView) -> tuple[int, float, str]:
    # arrival then id: a total order, so the same queue always sorts the same way.
    return (request.num_prompt_tokens, request.arrival_time, request.request_id)


def admission_refusal(why: str) -> ValueError:
    """The one-line refusal of ``admission: cache-aware`` where it cannot run (``why``)."""
    others = ", ".join(name for name in ADMISSIONS if name != "cache-aware")
    return ValueError(
        f"vllm-bidkv config: admission='cache-aware' is invalid; expected one of {others} ({why})"
    )


class CacheAwareAdmission:
    """``cache-aware`` (module doc): not a sort key but the recipe of a ``CacheAwareOrder``.

    ``tier_hit``: the CPU tier's read-only match (None: no tier). Called as a key, i.e. by a
    queue that sorts once at insertion, it raises the refusal: that order would be stale.
    """

    def __init__(self, max_bypass: int = 0, tier_hit: TierHit | None = None) -> None:
        if isinstance(max_bypass, bool) or not isinstance(max_bypass, int) or max_bypass < 0:
            raise ValueError(
                f"vllm-bidkv config: admission_max_bypass={max_bypass!r} is invalid; expected an integer >= 0"
            )
        self.max_bypass = max_bypass
        self._tier_hit = tier_hit

    def remaining_work(self, request: RequestView, gpu_tokens: int, block_size: int) -> int:
        """Tokens ``request`` computes if admitted now, given its GPU prefix hit, as vLLM counts
        them: the tier's hit starts at the block-aligned GPU hit and counts where it is longer.
        A request whose KV is already there (an asynchronous load arrived) computes the rest."""
        if request.num_computed_tokens:
            return max(0, request.num_tokens - request.num_computed_tokens)
        aligned = gpu_tokens - gpu_tokens % block_size
        tier = self._tier_hit(request, aligned) if self._tier_hit is not None else 0
        return max(0, request.num_tokens - max(gpu_tokens, aligned + tier))

    def order(
        self, gpu_hit: Callable[[R], int], block_size: int, refresh_cap: int = REFRESH_PER_STEP
    ) -> CacheAwareOrder[R]:
        """An empty order whose work is ``remaining_work`` with ``gpu_hit(request)`` (tokens of
        vLLM's prefix cache it would reuse now; ``patches.admission`` reads it, read-only)."""

        def work(request: R) -> int:
            gpu = 0 if request.num_computed_tokens else gpu_hit(request)
            return self.remaining_work(request, gpu, block_size)

        return CacheAwareOrder(self.max_bypass, work, refresh_cap)

    def __call__(self, request: object) -> NoReturn:
        raise admission_refusal("this vLLM sorts its waiting queue once, by keys fixed at insertion")


def admission_key(
    name: str, max_bypass: int = 0, tier_hit: TierHit | None = None
) -> AdmissionKey | CacheAwareAdmission | None:
    """The waiting queue's order; None keeps vLLM's.

    ``fcfs``: None. ``sjf``: shortest prompt first, then earliest arrival, then id.
    ``cache-aware``: a ``CacheAwareAdmission`` (``max_bypass``, ``tier_hit``: see there).
    ``ValueError`` naming ``name`` and the known names if unknown.
    """
    if name == "fcfs":
        return None
    if name == "sjf":
        return _shortest_prompt_first
    if name == "cache-aware":
        return CacheAwareAdmission(max_bypass, tier_hit)
    raise ValueError(f"vllm-bidkv: unknown admission {name!r}; known: {', '.join(ADMISSIONS)}")


@dataclass(eq=False)  # identity: one per queued request
class _Waiting(Generic[R]):
    request: R
    arrival: tuple[float, int]  # (arrival_time, queue sequence): a total order
    work: int  # tokens left to compute, as of ``looked_up``
    looked_up: int = -1  # the refresh that computed ``work``; -1: none (no hit assumed)
    bypassed: int = 0  # later arrivals admitted ahead of it since it was queued
    due: bool = False  # bypassed >= max_bypass: it goes first, by arrival


def _by_arrival(entry: _Waiting[Any]) -> tuple[float, int]:
    return entry.arrival


def _by_work(entry: _Waiting[Any]) -> tuple[int, float, int]:
    return (entry.work, *entry.arrival)


class CacheAwareOrder(Generic[R]):
    """The waiting queue under ``cache-aware`` (module doc): due requests by arrival, then the
    rest by (work, arrival). ``patches.admission`` wraps one in a vLLM ``RequestQueue``.

    Cost, W waiting: ``refresh`` (once per step) O(min(W, refresh_cap) × hit blocks) look-ups
    plus a sort of W (about linear: the list is nearly sorted already); ``pop`` and ``add`` O(W)
    (aging, list insert); ``peek`` O(1). With ``max_bypass`` 0 every request is due: no look-up.
    """

    def __init__(
        self, max_bypass: int, work: Callable[[R], int], refresh_cap: int = REFRESH_PER_STEP
    ) -> None:
        self.max_bypass = max_bypass
        self._work = work
        self._cap = max(1, refresh_cap)
        self._due: list[_Waiting[R]] = []  # sorted by arrival
        self._rest: list[_Waiting[R]] = []  # sorted by (work, arrival)
        self._entries: dict[str, _Waiting[R]] = {}
        self._seq = itertools.count()
        self._refreshes = 0
        # Popped since the last refresh: its entry and those its pop aged. One put back before
        # the next refresh was passed over, not admitted: its aging is taken back.
        self._popped: dict[str, tuple[_Waiting[R], list[_Waiting[R]]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[R]:
        return iter([entry.request for entry in (*self._due, *self._rest)])

    def _link(self, entry: _Waiting[R]) -> None:
        if entry.due:
            bisect.insort(self._due, entry, key=_by_arrival)
        else:
            bisect.insort(self._rest, entry, key=_by_work)

    def add(self, request: R) -> None:
        """Queue ``request``: new, preempted (a new wait), or popped in this step and put back."""
        request_id = request.request_id
        if request_id in self._entries:
            self.remove((request,))
        back = self._popped.pop(request_id, None)
        if back is None:
            rest = max(0, request.num_tokens - request.num_computed_tokens)
            entry = _Waiting(request, (request.arrival_time, next(self._seq)), rest)
        else:
            entry, aged = back
            undue = []
            for other in aged:
                out = self._popped.get(other.request.request_id)
                if self._entries.get(other.request.request_id) is other:
                    other.bypassed -= 1
                    if other.due and other.bypassed < self.max_bypass:
                        undue.append(other)
                elif out is not None and out[0] is other:  # out as well: due is set on its return
                    other.bypassed -= 1
            if undue:
                self._due = [e for e in self._due if e not in undue]
                for other in undue:
                    other.due = False
                    self._link(other)
        entry.request = request
        entry.due = entry.bypassed >= self.max_bypass
        self._entries[request_id] = entry
        self._link(entry)

    def _head(self) -> _Waiting[R]:
        if not self._entries:
            raise IndexError("the waiting queue is empty")
        return self._due[0] if self._due else self._rest[0]

    def peek(self) -> R:
        return self._head().request

    def pop(self) -> R:
        """The head, taken out: each request not due that arrived before it ages by one."""
        entry = self._head()
        (self._due if entry.due else self._rest).pop(0)
        del self._entries[entry.request.request_id]
        aged = [other for other in self._rest if other.arrival < entry.arrival]
        for other in aged:
            other.bypassed += 1
        now_due = [other for other in aged if other.bypassed >= self.max_bypass]
        if now_due:
            self._rest = [other for other in self._rest if other.bypassed < self.max_bypass]
            for other in now_due:
                other.due = True
                bisect.insort(self._due, other, key=_by_arrival)
        self._popped[entry.request.request_id] = (entry, aged)
        return entry.request

    def remove(self, requests: Iterable[R]) -> None:
        """Drop these requests (finished, aborted) wherever they are; absent ones are ignored."""
        drop = {request.request_id for request in requests}
        for request_id in drop:
            self._popped.pop(request_id, None)
        gone = [self._entries.pop(rid) for rid in drop if rid in self._entries]
        if gone:
            self._due = [e for e in self._due if e.request.request_id not in drop]
            self._rest = [e for e in self._rest if e.request.request_id not in drop]

    def refresh(self) -> None:
        """A new step: the last step's pops are admissions now; the work of at most
        ``refresh_cap`` requests not due is looked up again (never looked up first, then the
        stalest); the order is sorted by it."""
        self._popped.clear()
        self._refreshes += 1
        stalest = heapq.nsmallest(self._cap, self._rest, key=lambda e: (e.looked_up, *e.arrival))
        for entry in stalest:
            entry.work = self._work(entry.request)
            entry.looked_up = self._refreshes
        self._rest.sort(key=_by_work)

"""Candidate and Decision: what the victim hook knows when an allocation failed.

The hook (``vllm_bidkv.scheduler_side``) builds one ``Candidate`` per request vLLM
could preempt at that point, and one ``Decision`` for the facts every candidate
shares (who asked, how much it lacks); strategies only read them. Invariants the
builder keeps (the strategies do not re-check them, they run inside vLLM's
scheduling loop):

* ``0 <= freeable_blocks <= num_blocks`` and every count is ``>= 0``.
* ``shared_tokens``, ``cpu_tokens`` and ``offloadable_tokens`` are disjoint and
  together describe one *prefix* of the context, in that order: the GPU-shared
  blocks first, then the blocks the CPU tier already holds, then the private blocks
  the offloader will park. A resume gets back a prefix and nothing after its first
  gap (vLLM's prefix-cache lookup stops at the first miss), so tokens behind a gap
  are not counted in any of the three.
* ``order`` and ``request_id`` are each unique among the candidates of one decision
  (the decision names its requester by id).
* ``Decision.shortfall_blocks``, when known, is ``>= 1`` (the allocation failed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple


class Candidate(NamedTuple):
    """A running request vLLM could preempt now, with what preempting it frees and costs.

    Only what some strategy reads: per-decision facts live on ``Decision``. A named tuple,
    immutable like a frozen dataclass and built three times faster: one is built per
    preemptible request at every failed allocation (hundreds at 256 running).
    """

    request_id: str
    """vLLM's request id."""

    order: int
    """Position in vLLM's running list; larger = scheduled later. vLLM's FCFS victim is the max."""

    num_blocks: int
    """GPU KV blocks the request holds (KV cache group 0)."""

    freeable_blocks: int
    """r: blocks with ref_cnt == 1, the ones really returned to the free pool by preempting it.
    Blocks shared with other requests through the prefix cache are not freed."""

    computed_tokens: int
    """Tokens whose KV is computed (vLLM's ``num_computed_tokens``)."""

    shared_tokens: int
    """Tokens in blocks other requests also hold: they stay on GPU, so a resume gets them
    back as a GPU prefix hit."""

    cpu_tokens: int
    """Tokens whose blocks the CPU tier already holds (loaded back on resume)."""

    offloadable_tokens: int
    """Tokens in private, full, hashed blocks the offloader will park in the CPU tier before
    vLLM reuses them (loaded back on resume); 0 when offload is off."""

    output_tokens: int
    """Tokens generated so far."""

    max_tokens: int | None
    """Output budget; None when unknown."""

    num_preemptions: int
    """How many times the request was preempted before."""


@dataclass(frozen=True, slots=True)
class Decision:
    """One victim decision: the facts every candidate of it shares.

    Kept apart from the candidates so a fact of the decision is stated once, not copied
    into each candidate where copies could disagree. vLLM may preempt several victims
    for one failed allocation; each is its own decision, with the shortfall left after
    the previous victims were freed.
    """

    requester_id: str | None = None
    """The request whose allocation failed; None when unknown. It may itself be among
    the candidates (vLLM may preempt it to make room for itself), or not."""

    shortfall_blocks: int | None = None
    """Blocks the requester still lacks beyond the free pool, ``>= 1``; None when unknown."""

    def __post_init__(self) -> None:
        # Once per decision, not per candidate: cheap enough to check inside vLLM's loop.
        if self.shortfall_blocks is not None and self.shortfall_blocks < 1:
            raise ValueError(f"shortfall_blocks must be >= 1 or None, got {self.shortfall_blocks}")

    def requester(self, candidates: Sequence[Candidate]) -> Candidate | None:
        """The requester's candidate, or None when it is unknown or not among ``candidates``.

        O(n): callers ask once per decision, never per candidate.
        """
        if self.requester_id is None:
            return None
        return next((c for c in candidates if c.request_id == self.requester_id), None)

"""Candidate: one preemptible request, as the victim hook sees it when allocation failed.

The hook (``vllm_bidkv.patches``) builds one per request vLLM could preempt at that
point, from the SchedulerContext; strategies only read them. Invariants the builder
keeps (the strategies do not re-check them, they run inside vLLM's scheduling loop):

* ``0 <= freeable_blocks <= num_blocks`` and every count is ``>= 0``.
* ``shared_tokens``, ``cpu_tokens`` and ``offloadable_tokens`` are disjoint and
  together describe one *prefix* of the context, in that order: the GPU-shared
  blocks first, then the blocks the CPU tier already holds, then the private blocks
  the offloader will park. A resume gets back a prefix and nothing after its first
  gap (vLLM's prefix-cache lookup stops at the first miss), so tokens behind a gap
  are not counted in any of the three.
* ``order`` is unique among the candidates of one decision.
* ``shortfall_blocks``, when known, is ``>= 1`` (the allocation failed) and equal in
  every candidate of one decision.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    """A running request vLLM could preempt now, with what preempting it frees and costs."""

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

    prompt_tokens: int
    """Prompt length."""

    output_tokens: int
    """Tokens generated so far."""

    max_tokens: int | None
    """Output budget; None when unknown."""

    num_preemptions: int
    """How many times the request was preempted before."""

    priority: int
    """vLLM priority (smaller = more important); carried for the hook and for logs."""

    arrival_time: float
    """vLLM arrival time in seconds; carried for the hook and for logs."""

    is_requester: bool = False
    """True for the request whose allocation failed (vLLM may preempt it to make room for itself)."""

    shortfall_blocks: int | None = None
    """Blocks the requester still lacks in this decision, the same for every candidate of
    one decision (vLLM preempts again until the allocation fits); None when unknown."""

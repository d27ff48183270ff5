"""Reads the version-dependent shapes of vLLM's scheduler output into ``StepEvents``.

The connector's scheduler side never looks at a ``SchedulerOutput``; this is the
one place that knows how each release spells what a step did.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vllm_bidkv.scheduler_side import StepEvents


def step_events(scheduler_output: Any) -> StepEvents:
    """Blocks allocated, requests resumed and preempted, blocks zeroed, in this step."""
    cached = scheduler_output.scheduled_cached_reqs
    allocated = sum(len(r.block_ids[0]) for r in scheduler_output.scheduled_new_reqs if r.block_ids)
    allocated += sum(len(ids[0]) for ids in cached.new_block_ids if ids)
    preempted = list(scheduler_output.preempted_req_ids or ())
    # 0.19+ (some attention backends): blocks the worker zeroes before the forward.
    zeroed = getattr(scheduler_output, "new_block_ids_to_zero", None) if preempted else None
    # Computed by the end of this step's forward: before it (what the output records, read
    # before vLLM advances the request) plus what it scheduled.
    scheduled = scheduler_output.num_scheduled_tokens
    computed = {
        r.req_id: r.num_computed_tokens + scheduled[r.req_id] for r in scheduler_output.scheduled_new_reqs
    }
    for req_id, before in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
        computed[req_id] = before + scheduled[req_id]
    return StepEvents(
        blocks_allocated=allocated,
        resumed=_resumed_req_ids(cached),
        preempted=preempted,
        zeroed_blocks=frozenset(zeroed or ()),
        computed_tokens=computed,
    )


def _resumed_req_ids(cached: Any) -> Sequence[str]:
    resumed = getattr(cached, "resumed_req_ids", None)  # 0.28+
    if resumed is not None:
        return list(resumed)
    flags = getattr(cached, "resumed_from_preemption", ())
    return [req_id for req_id, flag in zip(cached.req_ids, flags, strict=True) if flag]


def step_has_no_forward() -> bool:
    """True inside a worker step that runs no forward.

    vLLM calls ``get_finished`` inside the step's forward context, which has no
    attention metadata when the step schedules no tokens (``kv_connector_no_forward``).
    """
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return is_forward_context_available() and get_forward_context().attn_metadata is None

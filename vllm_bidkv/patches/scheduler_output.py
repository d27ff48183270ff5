"""Reads the version-dependent shapes of vLLM's scheduler output into ``StepEvents``.

The connector's scheduler side never looks at a ``SchedulerOutput``; this is the
one place that knows how each release spells what a step did.
"""

from __future__ import annotations

from collections.abc import Container, Sequence
from typing import Any

from vllm_bidkv.step_events import StepEvents


def step_events(scheduler_output: Any, block_size: int | None, watched: Container[str] = ()) -> StepEvents:
    """What this step did: requests resumed and preempted and, with a CPU tier (its
    ``block_size``; None: no tier), blocks allocated and zeroed and the requests that may have
    filled blocks.

    ``watched``: requests reported in ``StepEvents.filled`` whenever they are scheduled.
    """
    cached = scheduler_output.scheduled_cached_reqs
    resumed = _resumed_req_ids(cached)
    preempted = list(scheduler_output.preempted_req_ids or ())
    if block_size is None:  # no tier: only the victims' comings and goings matter
        return StepEvents(resumed=resumed, preempted=preempted)
    new = scheduler_output.scheduled_new_reqs
    allocated = sum(len(r.block_ids[0]) for r in new if r.block_ids)
    allocated += sum(len(ids[0]) for ids in cached.new_block_ids if ids)
    # 0.19+ (some attention backends): blocks the worker zeroes before the forward.
    zeroed = getattr(scheduler_output, "new_block_ids_to_zero", None) if preempted else None
    # Computed by the end of this step's forward: before it (what the output records, read
    # before vLLM advances the request) plus what it scheduled. In scheduling order, the
    # order the tier's slots go out in.
    scheduled = scheduler_output.num_scheduled_tokens
    filled = {r.req_id: r.num_computed_tokens + scheduled[r.req_id] for r in new}
    for req_id, before in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
        after = before + scheduled[req_id]
        if after // block_size > before // block_size or req_id in watched or req_id in resumed:
            filled[req_id] = after
    return StepEvents(
        blocks_allocated=allocated,
        resumed=resumed,
        preempted=preempted,
        zeroed_blocks=frozenset(zeroed or ()),
        filled=filled,
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

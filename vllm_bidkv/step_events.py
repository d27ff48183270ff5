"""StepEvents: what one ``schedule()`` did, as the connector's scheduler side needs it.

``patches.scheduler_output`` reads it out of each release's ``SchedulerOutput``; the
scheduler side (``scheduler_side``) and the planner's tests take it as it is. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepEvents:
    """What one ``schedule()`` did, as the connector needs it (read by ``patches``)."""

    blocks_allocated: int = 0
    """GPU blocks vLLM allocated to scheduled requests in this step (drives the lazy walk)."""
    resumed: Sequence[str] = ()
    """Preempted requests scheduled again in this step."""
    preempted: Sequence[str] = ()
    """Requests preempted in this step."""
    zeroed_blocks: frozenset[int] = frozenset()
    """Blocks the workers zero before this step's forward: their old bytes cannot be rescued."""
    filled: Mapping[str, int] = field(default_factory=dict)
    """Scheduled requests that may have blocks new to ``auto`` (new and resumed ones, those whose
    forward completes a block, and the watched), each with its tokens computed once this
    step's forward ran, in scheduling order. The others offered theirs when they filled them."""

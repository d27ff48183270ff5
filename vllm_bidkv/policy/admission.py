"""Admission order: how the waiting queue is sorted before vLLM considers it.

The key applies to *every* waiting request, new and preempted alike: under ``sjf`` a
preempted request loses the head-of-queue place vLLM gives it and waits its turn by
prompt length (bidkv 0.1.0's headline win came mostly from this).
"""

from __future__ import annotations

from collections.abc import Callable

from vllm_bidkv.config import ADMISSIONS
from vllm_bidkv.context import RequestView

AdmissionKey = Callable[[RequestView], tuple[int, float, str]]


def _shortest_prompt_first(request: RequestView) -> tuple[int, float, str]:
    # arrival then id: a total order, so the same queue always sorts the same way.
    return (request.num_prompt_tokens, request.arrival_time, request.request_id)


def admission_key(name: str) -> AdmissionKey | None:
    """Sort key for the waiting queue; None keeps vLLM's order.

    ``fcfs``: None. ``sjf``: shortest prompt first, then earliest arrival, then id.
    ``ValueError`` naming ``name`` and the known names if unknown.
    """
    if name == "fcfs":
        return None
    if name == "sjf":
        return _shortest_prompt_first
    raise ValueError(f"vllm-bidkv: unknown admission {name!r}; known: {', '.join(ADMISSIONS)}")

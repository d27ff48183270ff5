"""The CPU tier, scheduler side: slot bookkeeping, the offload planner, transfer jobs. No vLLM import."""

from vllm_bidkv.offload.cpu_tier import EVICTIONS, CpuBlockTier, num_slots_for
from vllm_bidkv.offload.jobs import JobKind, JobResults, StepPlan, TransferJob
from vllm_bidkv.offload.planner import MODES, OffloadPlanner

__all__ = [
    "EVICTIONS",
    "MODES",
    "CpuBlockTier",
    "JobKind",
    "JobResults",
    "OffloadPlanner",
    "StepPlan",
    "TransferJob",
    "num_slots_for",
]

"""The tiers, scheduler side: CPU and disk slot bookkeeping, the offload planner and its parts, transfer jobs. No vLLM import."""

from vllm_bidkv.offload.cpu_tier import CpuBlockTier
from vllm_bidkv.offload.jobs import JobKind, JobResults, StepPlan, TransferJob
from vllm_bidkv.offload.planner import OffloadPlanner
from vllm_bidkv.offload.spec import OffloadSpec, num_slots_for

__all__ = [
    "CpuBlockTier",
    "JobKind",
    "JobResults",
    "OffloadPlanner",
    "OffloadSpec",
    "StepPlan",
    "TransferJob",
    "num_slots_for",
]

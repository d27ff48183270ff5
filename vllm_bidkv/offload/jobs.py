"""Transfer plans: what the scheduler sends the workers each step, and what comes back.

Plain picklable data (they cross the EngineCore -> worker process boundary inside
vLLM's connector metadata). Scheduler -> workers: one ``StepPlan`` per step, whose
loads run before the step's forward and whose stores run after it (so a store
never reads a block before the compute that wrote it), except rescues: stores of
the blocks of a request preempted in this very step, which run before the loads
and the forward, the last moment their bytes are surely still the victim's (vLLM
may already have handed them to another request). Workers -> scheduler:
``JobResults``, merged over workers and steps; the planner treats a job as
finished once all ``world_size`` workers reported it done, or any reported it
failed. A worker reports a job failed only once its own copy for it has stopped:
the scheduler releases the job's blocks as soon as it sees the failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

JobKind = Literal["store", "load"]


@dataclass(frozen=True)
class TransferJob:
    """Copy ``gpu_block_ids[i]`` <-> ``cpu_slots[i]`` for every i (store: GPU -> CPU).

    ``unavailable_gpu_block_ids`` (loads only): GPU blocks vLLM counts as loaded
    whose data the CPU tier lost between the match and the allocation. The worker
    reports them as load errors (``get_block_ids_with_load_errors``) so vLLM
    recomputes them; nothing is copied into them.
    """

    job_id: int
    kind: JobKind
    gpu_block_ids: list[int]
    cpu_slots: list[int]
    request_id: str | None = None
    unavailable_gpu_block_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ("store", "load"):
            raise ValueError(f"vllm-bidkv: job {self.job_id}: kind {self.kind!r} is not 'store' or 'load'")
        if len(self.gpu_block_ids) != len(self.cpu_slots):
            raise ValueError(
                f"vllm-bidkv: job {self.job_id}: {len(self.gpu_block_ids)} GPU blocks "
                f"but {len(self.cpu_slots)} CPU slots"
            )
        if self.kind == "store" and self.unavailable_gpu_block_ids:
            raise ValueError(f"vllm-bidkv: job {self.job_id}: a store has no unavailable blocks")


@dataclass
class StepPlan:
    """One step's jobs, in the order a worker runs them: rescues, loads, forward, stores."""

    pre_forward_loads: list[TransferJob] = field(default_factory=list)
    post_forward_stores: list[TransferJob] = field(default_factory=list)
    pre_forward_stores: list[TransferJob] = field(default_factory=list)
    """Rescues (kind ``store``): a victim's blocks, free or already another request's."""

    def jobs(self) -> list[TransferJob]:
        return [*self.pre_forward_stores, *self.pre_forward_loads, *self.post_forward_stores]


@dataclass
class JobResults:
    """Worker -> scheduler: ``done`` job id -> workers that finished it; ``failed`` job ids."""

    done: dict[int, int] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)

    def merge(self, other: JobResults) -> JobResults:
        """Add ``other`` into this one (in place, like vLLM's ``aggregate``) and return self."""
        for job_id, count in other.done.items():
            self.done[job_id] = self.done.get(job_id, 0) + count
        self.failed |= other.failed
        return self

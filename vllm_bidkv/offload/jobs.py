"""Transfer plans: what the scheduler sends the workers each step, and what comes back.

Plain picklable data (they cross the EngineCore -> worker process boundary inside
vLLM's connector metadata). Scheduler -> workers: one ``StepPlan`` per step, whose
loads run before the step's forward and whose stores run after it (so a store
never reads a block before the compute that wrote it), except rescues: stores of
the blocks of a request preempted in this very step, which run before the loads
and the forward, the last moment their bytes are surely still the victim's (vLLM
may already have handed them to another request). Workers -> scheduler:
``JobResults``, merged over workers and steps; the planner treats a job as
finished once every one of the ``world_size`` workers reported it, done or
failed, and as failed if any worker failed it. A worker reports a job (either
way) only once its own copy for it can no longer read or write (on CUDA: its
event completed), so when the scheduler releases a job's GPU blocks and CPU
slots, no rank is still copying them, however late its report arrives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

JobKind = Literal["store", "load", "spill"]


@dataclass(frozen=True)
class TransferJob:
    """Copy ``gpu_block_ids[i]`` <-> ``cpu_slots[i]`` for every i (store: GPU -> CPU).

    ``unavailable_gpu_block_ids`` (loads only): GPU blocks vLLM counts as loaded
    whose data the CPU tier lost between the match and the allocation. The worker
    reports them as load errors (``get_block_ids_with_load_errors``) so vLLM
    recomputes them; nothing is copied into them.

    ``asynchronous`` (loads only): the request waits in vLLM's ``WAITING_FOR_REMOTE_KVS``
    while the batch runs on; the load starts with the step's other loads, may finish
    any number of steps later, and each worker reports the request in
    ``finished_recving`` once its copy is done (vLLM admits it when every worker did).
    A synchronous load is ordered before the step's forward, which reads it.

    ``disk_slots``: a spill (CPU tier -> disk tier, no GPU block) writes ``cpu_slots[i]``
    to ``disk_slots[i]``; a load whose hit the disk tier supplied first reads
    ``disk_slots[i]`` into ``cpu_slots[i]`` wherever it is >= 0 (a promotion).
    """

    job_id: int
    kind: JobKind
    gpu_block_ids: list[int]
    cpu_slots: list[int]
    request_id: str | None = None
    unavailable_gpu_block_ids: list[int] = field(default_factory=list)
    asynchronous: bool = False
    disk_slots: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in ("store", "load", "spill"):
            raise ValueError(f"vllm-bidkv: job {self.job_id}: kind {self.kind!r} is not store, load or spill")
        if self.kind == "spill" and (self.gpu_block_ids or len(self.disk_slots) != len(self.cpu_slots)):
            raise ValueError(
                f"vllm-bidkv: job {self.job_id}: a spill has one disk slot per CPU slot, no GPU block"
            )
        if self.kind != "spill" and self.disk_slots and len(self.disk_slots) != len(self.cpu_slots):
            raise ValueError(f"vllm-bidkv: job {self.job_id}: disk slots must match the CPU slots one to one")
        if self.kind == "store" and self.disk_slots:
            raise ValueError(f"vllm-bidkv: job {self.job_id}: a store reads no disk slot")
        if self.kind != "spill" and len(self.gpu_block_ids) != len(self.cpu_slots):
            raise ValueError(
                f"vllm-bidkv: job {self.job_id}: {len(self.gpu_block_ids)} GPU blocks "
                f"but {len(self.cpu_slots)} CPU slots"
            )
        if self.kind != "load" and (self.unavailable_gpu_block_ids or self.asynchronous):
            raise ValueError(
                f"vllm-bidkv: job {self.job_id}: only a load has unavailable blocks or is asynchronous"
            )
        if self.asynchronous and self.request_id is None:
            raise ValueError(f"vllm-bidkv: job {self.job_id}: an asynchronous load needs its request id")


@dataclass(kw_only=True)
class StepPlan:
    """One step's jobs, in the order a worker runs them."""

    rescues: list[TransferJob] = field(default_factory=list)
    """Stores of this step's victims' blocks, before the forward (free or already another request's)."""
    loads: list[TransferJob] = field(default_factory=list)
    """CPU-tier hits: synchronous ones before the forward, asynchronous ones on a load stream."""
    stores: list[TransferJob] = field(default_factory=list)
    """Lazy and eager stores, after the forward that computed their blocks."""
    spills: list[TransferJob] = field(default_factory=list)
    """Writes of committed CPU-tier entries to the disk tier, in the background."""

    def jobs(self) -> list[TransferJob]:
        return [*self.rescues, *self.loads, *self.stores, *self.spills]


@dataclass
class JobResults:
    """Worker -> scheduler: job id -> how many workers finished it (``done``) or failed it
    (``failed``). Counts, not sets: with TP every rank reports each job once."""

    done: dict[int, int] = field(default_factory=dict)
    failed: dict[int, int] = field(default_factory=dict)

    def merge(self, other: JobResults) -> JobResults:
        """Add ``other`` into this one (in place, like vLLM's ``aggregate``) and return self."""
        for mine, theirs in ((self.done, other.done), (self.failed, other.failed)):
            for job_id, count in theirs.items():
                mine[job_id] = mine.get(job_id, 0) + count
        return self

    def __bool__(self) -> bool:
        return bool(self.done or self.failed)

"""JobLedger: every copy job from the step that plans it until every worker reported it.

A job owns one ``touch`` per GPU block (a rescue owns none: see the planner) and one
tier hold per CPU slot (a PENDING reservation for a store, a pin for a load) from
``issue`` until the ledger finishes it; the planner releases each exactly once, when
``acknowledge`` hands the finished entry back, whether the copy succeeded or failed and
whatever happened to the request meanwhile (finished, aborted, preempted).

Completions arrive late (CUDA events, async scheduling, TP ranks finishing apart), so
nothing assumes a copy is done before every worker said so: a job is finished when all
``world_size`` workers reported it, done or failed, and failed if any failed it. Until
then its blocks stay touched and its slots held, so no rank's late copy meets a reused
block or slot.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from vllm_bidkv.offload.jobs import JobKind, JobResults, StepPlan, TransferJob


@dataclass
class LedgerEntry:
    """One job in the ledger, with what the workers said of it so far."""

    job: TransferJob
    sent: bool = False  # in a StepPlan already: only sent jobs can be reported on
    done: int = 0  # workers that reported the job done
    failed: int = 0  # workers that reported the job failed
    tokens: int = 0  # loads: tokens the job saves from recompute
    stale: bool = False  # planned before a reset (or given up): never committed
    touched: bool = True  # owns a touch per GPU block (not rescues, nor given-up copies)
    rescue: bool = False  # a victim's store, before the step's forward
    # Stores: the load-failure count when issued, if loads were unverified then; a failure
    # since means the source blocks may hold KV computed from a failed load (LoadTrust).
    load_failures_at_issue: int | None = None


class JobLedger:
    """Jobs planned and not finished; their queues until sent; the GPU blocks they hold.

    O(1) per job and per report: entries by job id (ids increase, so a dict keeps them
    oldest first), three queues emptied once per step.
    """

    def __init__(self, world_size: int) -> None:
        if world_size < 1:
            raise ValueError(f"vllm-bidkv: world_size={world_size} must be >= 1")
        self.world_size = world_size
        self._entries: dict[int, LedgerEntry] = {}
        self._next_job_id = 0
        # Not sent yet, by when a worker runs them: rescues and loads before the forward,
        # stores after it, spills in the background.
        self._rescues: list[TransferJob] = []
        self._loads: list[TransferJob] = []
        self._stores: list[TransferJob] = []
        self._spills: list[TransferJob] = []
        self._async_loads: dict[str, int] = {}  # request id -> its asynchronous load's job id
        self.held_gpu_blocks = 0  # GPU blocks touched by entries: vLLM gets them back at the end
        self.held_store_blocks = 0  # of which by stores
        self.in_flight: dict[JobKind, int] = {}  # entries by job kind (gauges each step: O(1))

    def issue(
        self,
        kind: JobKind,
        gpu_ids: list[int],
        slots: list[int],
        request_id: str | None,
        *,
        unavailable: list[int] | None = None,
        touched: bool = True,
        rescue: bool = False,
        asynchronous: bool = False,
        disk_slots: list[int] | None = None,
    ) -> LedgerEntry:
        """A new job, queued for the next ``take_step_plan``. The caller already holds what
        it owns (touched ``gpu_ids`` if ``touched``, reserved or pinned ``slots``)."""
        job = TransferJob(
            job_id=self._next_job_id,
            kind=kind,
            gpu_block_ids=gpu_ids,
            cpu_slots=slots,
            request_id=request_id,
            unavailable_gpu_block_ids=unavailable or [],
            asynchronous=asynchronous,
            disk_slots=disk_slots or [],
        )
        self._next_job_id += 1
        entry = LedgerEntry(job, touched=touched, rescue=rescue)
        self._entries[job.job_id] = entry
        self.in_flight[kind] = self.in_flight.get(kind, 0) + 1
        if touched:
            self.held_gpu_blocks += len(gpu_ids)
            if kind == "store":
                self.held_store_blocks += len(gpu_ids)
        if asynchronous:
            assert request_id is not None
            self._async_loads[request_id] = job.job_id
        queue = {"load": self._loads, "spill": self._spills}.get(
            kind, self._rescues if rescue else self._stores
        )
        queue.append(job)
        return entry

    def store_blocks(self) -> Iterator[int]:
        """The GPU blocks stores in flight touch (none when ``held_store_blocks`` is 0: O(1))."""
        if self.held_store_blocks:
            for entry in self._entries.values():
                if entry.touched and entry.job.kind == "store":
                    yield from entry.job.gpu_block_ids

    def take_step_plan(self) -> StepPlan:
        """Every job issued since the last call, now sent."""
        plan = StepPlan(rescues=self._rescues, loads=self._loads, stores=self._stores, spills=self._spills)
        self._rescues, self._loads, self._stores, self._spills = [], [], [], []
        for job in plan.jobs():
            self._entries[job.job_id].sent = True
        return plan

    def acknowledge(self, results: JobResults) -> list[tuple[LedgerEntry, bool]]:
        """Count worker reports; the entries they finished, each with whether it succeeded,
        in job order within failures then successes. Reports on finished jobs are ignored
        (late duplicates); a job never issued, or issued but not sent, raises ValueError
        before anything changes."""
        for job_id in (*results.failed, *results.done):
            entry = self._entries.get(job_id)
            if not 0 <= job_id < self._next_job_id or (entry is not None and not entry.sent):
                raise ValueError(f"vllm-bidkv: worker reported job {job_id}, which was never sent")
        finished = []
        for reports, failed in ((results.failed, True), (results.done, False)):
            for job_id in sorted(reports):
                entry = self._entries.get(job_id)
                if entry is None:
                    continue
                if failed:
                    entry.failed += reports[job_id]
                else:
                    entry.done += reports[job_id]
                if entry.done + entry.failed >= self.world_size:
                    self._remove(entry)
                    finished.append((entry, not entry.failed))
        return finished

    def _remove(self, entry: LedgerEntry) -> None:
        job = entry.job
        del self._entries[job.job_id]
        self.in_flight[job.kind] -= 1
        if job.request_id is not None and self._async_loads.get(job.request_id) == job.job_id:
            del self._async_loads[job.request_id]

    def async_load_in_flight(self, request_id: str) -> bool:
        """The request's asynchronous load is unfinished: vLLM must keep its blocks until the
        workers report it (``finished_recving``), even if the request is aborted meanwhile."""
        return request_id in self._async_loads

    def drop(self, entry: LedgerEntry) -> None:
        """Finish an entry no worker has (not sent): it leaves the ledger and its queue."""
        assert not entry.sent, "a sent job finishes only when every worker reported it"
        self._remove(entry)
        job_id = entry.job.job_id
        for queue in (self._rescues, self._loads, self._stores, self._spills):
            queue[:] = [job for job in queue if job.job_id != job_id]

    def untouch(self, entry: LedgerEntry) -> list[int]:
        """The entry gives up its touches: the GPU blocks to hand back to vLLM."""
        assert entry.touched, f"job {entry.job.job_id} holds no touches"
        entry.touched = False
        n = len(entry.job.gpu_block_ids)
        self.held_gpu_blocks -= n
        if entry.job.kind == "store":
            self.held_store_blocks -= n
        return entry.job.gpu_block_ids

    def entries(self) -> list[LedgerEntry]:
        """Entries not finished, oldest first."""
        return list(self._entries.values())

    def jobs(self) -> list[TransferJob]:
        """Jobs planned and not finished (queued or sent), oldest first."""
        return [entry.job for entry in self._entries.values()]

    def __len__(self) -> int:
        return len(self._entries)

    def check(self) -> None:
        """Assert the ledger's invariants (tests; O(jobs))."""
        touched = [e for e in self._entries.values() if e.touched]
        assert self.held_gpu_blocks == sum(len(e.job.gpu_block_ids) for e in touched)
        assert self.held_store_blocks == sum(
            len(e.job.gpu_block_ids) for e in touched if e.job.kind == "store"
        )
        kinds = [e.job.kind for e in self._entries.values()]
        assert all(kinds.count(kind) == n for kind, n in self.in_flight.items()), "in_flight miscounts"
        queues = (self._rescues, self._loads, self._stores, self._spills)
        queued = [job.job_id for queue in queues for job in queue]
        assert len(queued) == len(set(queued)), "a job queued twice"
        for job_id, entry in self._entries.items():
            assert entry.job.job_id == job_id < self._next_job_id
            assert (job_id in queued) == (not entry.sent), f"job {job_id}: queued exactly until sent"
            assert entry.done + entry.failed < self.world_size, f"job {job_id} finished but kept"
            assert not (entry.rescue and entry.touched), "a rescue owns no touches"
        assert set(queued) <= set(self._entries), "a queued job left the ledger"
        for request_id, job_id in self._async_loads.items():
            waited = self._entries.get(job_id)
            assert waited is not None and waited.job.asynchronous and waited.job.request_id == request_id

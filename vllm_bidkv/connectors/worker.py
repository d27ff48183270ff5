"""The connector's worker side: the CPU tier's bytes and the copies of each step's plan.

The life of a copy on one worker: *issued* (rescues in ``bind_connector_metadata``
before the forward; loads in ``start_load_kv``; stores in ``wait_for_save`` after
the forward), *in flight* until its copy can no longer read or write its blocks
(on CUDA: an event recorded after it completed; on the CPU at once), then
*reported* done or failed, in issue order, by ``poll`` (once per step, from
``get_finished``): job results for the scheduler side (``take_results``) and the
requests whose asynchronous loads finished (vLLM's ``finished_recving``).
Synchronous loads and rescues run on the compute stream, ordered before the
forward. Stores run on a store stream that waits for an event recorded on the
compute stream after the forward, so a store never reads a block before the
forward writes it. Asynchronous loads run on a load stream that waits for an event
recorded when the step's metadata is bound: after its rescues and every earlier
step's forward (the blocks' previous owners), not after this step's forward, which
never touches them (their request is not scheduled until the load is reported), so
a load runs beside the forward, as SimpleCPUOffload's does. A failed copy is reported only
once what it had enqueued is done (a torn copy may still be writing). A load's
blocks that cannot be trusted are reported as load errors at once, for vLLM to
recompute. The worker counts nothing; the scheduler side counts each job once
every worker reported it.

With a disk tier (``DiskFile``), spills (sent with the metadata) write committed CPU rows
to disk on a thread of their own and are reported once written, apart from the copies'
order; a load's promoted blocks are read from disk into their CPU rows before its copy.

Copies fail or complete late on purpose only under the test hook of
``connectors.faults`` (``active_faults``), which is off unless a test turns it on.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.connectors.disk_file import DiskFile
from vllm_bidkv.connectors.faults import FaultPlan, InjectedFault, active_faults
from vllm_bidkv.offload import JobResults, StepPlan, TransferJob
from vllm_bidkv.offload.disk import DiskSpec

logger = logging.getLogger("vllm_bidkv")


def available_host_bytes() -> int | None:
    """The kernel's estimate of memory available without swapping (MemAvailable); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_host_memory(cpu_bytes: int, tier_bytes: int, workers_on_host: int) -> None:
    """Refuse a tier the host cannot hold: its pages are only taken as it fills, so without
    this check an oversized ``cpu_bytes`` starts fine and the kernel kills the engine later."""
    available = available_host_bytes()
    if available is not None and tier_bytes * workers_on_host > available:
        raise ValueError(
            f"vllm-bidkv config: cpu_bytes={cpu_bytes} does not fit this host: {workers_on_host} "
            f"worker(s) x {tier_bytes} bytes of CPU tier = {tier_bytes * workers_on_host} bytes, but only "
            f"{available} bytes are available (MemAvailable). Lower cpu_bytes."
        )


def worker_rank() -> int:
    """This worker's global rank (tensor x pipeline parallel); 0 outside torch.distributed."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


@dataclass
class _Copy:
    """One issued copy on this worker, until ``poll`` reports it."""

    jobs: list[TransferJob]
    ok: bool
    done_event: Any  # CUDA: recorded after what the copy enqueued; None: done when issued
    due_poll: int  # the earliest poll that may report it (the test hook's delay)


class CopyWorker:
    """One worker's CPU tier (a row per slot) and the copies of the jobs it is sent."""

    def __init__(
        self,
        kv_caches: dict[str, torch.Tensor],
        num_gpu_blocks: int,
        num_slots: int,
        config: BidKVConfig,
        workers_on_host: int = 1,
        disk: DiskSpec | None = None,
    ):
        """``workers_on_host``: workers of this engine on this host, each allocating a tier;
        ``disk``: the disk tier behind it, whose file this worker opens (``DiskFile``)."""
        from vllm_bidkv.kernels import allocate_like, block_views

        seen: set[tuple[int, tuple[int, ...]]] = set()
        views: list[torch.Tensor] = []
        for name, tensor in kv_caches.items():
            key = (tensor.data_ptr(), tuple(tensor.shape))
            if key in seen:  # layers sharing one cache tensor are copied once
                continue
            seen.add(key)
            try:
                views.extend(block_views(tensor, num_gpu_blocks))
            except ValueError as err:
                raise ValueError(f"vllm-bidkv: unsupported KV cache layout for layer {name}: {err}") from err
        self._gpu = views
        self._cuda = views[0].is_cuda
        row_bytes = sum(v.shape[1] for v in views)
        check_host_memory(config.cpu_bytes, num_slots * row_bytes, workers_on_host)
        self._rank = worker_rank()
        active_faults(self._rank)  # a bad VLLM_BIDKV_FAULTS fails at start-up, not in the first copy
        self._cpu = allocate_like(views, num_slots, device="cpu", pin_memory=self._cuda)
        self._backend = config.copy_backend
        self._results = JobResults()
        self._finished_loads: set[str] = set()  # requests whose asynchronous loads were reported
        self._load_errors: set[int] = set()
        self._copies: deque[_Copy] = deque()  # issued, not reported yet; in issue order
        self._polls = 0
        self._polled = False  # poll() ran since the last take_results()
        self._load_stream = torch.cuda.Stream() if self._cuda else None
        # CUDA: recorded at bind on the compute stream; this step's asynchronous loads wait for it.
        self._bound_event: Any = None
        self._store_stream = torch.cuda.Stream() if self._cuda else None
        self._spills: deque[tuple[TransferJob, Future[None] | None]] = deque()  # in issue order
        self._disk_failed = False  # a disk failure was logged (the next ones are only counted)
        self._disk = self._open_disk(disk) if disk is not None else None
        logger.info(
            "vllm-bidkv: CPU tier %d blocks x %d B = %.2f GiB",
            num_slots,
            row_bytes,
            num_slots * row_bytes / 2**30,
        )

    def _open_disk(self, disk: DiskSpec) -> DiskFile | None:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        try:
            return DiskFile(disk.path, self._rank, world, self._cpu, disk.num_slots)
        except OSError as err:
            self._disk_failure("file", err)  # every spill and promotion on this rank fails
            return None

    def _disk_failure(self, what: str, err: BaseException) -> None:
        """Log this rank's first disk failure (the file, a write); the scheduler side counts all."""
        if not self._disk_failed:
            logger.warning(
                "vllm-bidkv: rank %d: disk tier %s failed (%s); later failures are only counted",
                self._rank,
                what,
                err,
            )
            self._disk_failed = True

    @property
    def in_flight(self) -> int:
        """Copies issued and not reported yet."""
        return len(self._copies)

    def _copy(
        self,
        src: list[torch.Tensor],
        dst: list[torch.Tensor],
        src_ids: list[int],
        dst_ids: list[int],
        fault: FaultPlan | None = None,
    ) -> None:
        from vllm_bidkv.kernels import copy_blocks

        if fault is not None:  # the test hook chose this copy to fail
            half = len(src_ids) // 2 if fault.mid_batch else 0
            if half:
                copy_blocks(src, dst, src_ids[:half], dst_ids[:half], backend=self._backend)
            raise InjectedFault(f"vllm-bidkv: injected copy failure after {half} of {len(src_ids)} blocks")
        copy_blocks(src, dst, src_ids, dst_ids, backend=self._backend)

    def _issue(
        self,
        jobs: list[TransferJob],
        to_gpu: bool,
        stream: Any,
        fault: FaultPlan | None,
        after: Any = None,
    ) -> bool:
        """Copy ``jobs`` (all loads or all stores) on ``stream`` (None: the current one, which
        the forward uses) and queue their report; returns whether the copy was issued.
        ``stream`` first waits for ``after``, an event of the compute stream (None: one
        recorded now, after everything enqueued on it so far)."""
        gpu_ids = [b for job in jobs for b in job.gpu_block_ids]
        cpu_ids = [s for job in jobs for s in job.cpu_slots]
        src, dst = (self._cpu, self._gpu) if to_gpu else (self._gpu, self._cpu)
        src_ids, dst_ids = (cpu_ids, gpu_ids) if to_gpu else (gpu_ids, cpu_ids)
        ok = True
        done_event = None
        if stream is not None:
            if after is None:
                after = torch.cuda.Event()
                after.record()
            stream.wait_event(after)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            try:
                if to_gpu:
                    self._promote(jobs)
                self._copy(src, dst, src_ids, dst_ids, fault)
            except Exception:  # noqa: BLE001 - a failed copy turns into a recompute or a miss
                logger.exception(
                    "vllm-bidkv: rank %d: %s of %d blocks (jobs %s) failed",
                    self._rank,
                    "load" if to_gpu else "store",
                    len(gpu_ids),
                    [job.job_id for job in jobs],
                )
                ok = False
            if self._cuda:
                # Reported only once this completes: a torn copy may still be writing.
                done_event = torch.cuda.Event()
                done_event.record()
        delay = self._delay()
        self._copies.append(_Copy(jobs, ok, done_event, self._polls + 1 + delay))
        return ok

    def _delay(self) -> int:
        faults = active_faults(self._rank)
        return faults.complete_after_steps if faults is not None else 0

    def run_loads(self, plan: StepPlan) -> None:
        """Every load of the step: synchronous ones on the compute stream (the forward reads
        them), asynchronous ones on the load stream (their requests wait for the report)."""
        faults = active_faults(self._rank)
        for job in plan.loads:
            # Blocks the tier could no longer supply: vLLM must recompute them.
            self._load_errors.update(job.unavailable_gpu_block_ids)
            fault = faults if faults is not None and faults.load_fails(job) else None
            if job.asynchronous:
                issued = self._issue([job], True, self._load_stream, fault, after=self._bound_event)
            else:
                issued = self._issue([job], True, None, fault)
            if not issued:
                self._load_errors.update(job.gpu_block_ids)
        self._bound_event = None

    def _promote(self, loads: list[TransferJob]) -> None:
        """Read the loads' promoted blocks from disk into their CPU rows, before the copy that
        reads those rows (host code: done before the copy is enqueued); OSError if it cannot."""
        promoted = [
            (d, s) for job in loads for d, s in zip(job.disk_slots, job.cpu_slots, strict=False) if d >= 0
        ]
        if not promoted:
            return
        if self._disk is None:
            raise OSError("this worker has no disk tier file")
        self._disk.read([d for d, _ in promoted], [s for _, s in promoted])

    def run_spills(self, plan: StepPlan) -> None:
        """Spills write committed CPU rows to disk on the disk thread (nothing waits for them)."""
        for job in plan.spills:
            self._spills.append(
                (job, self._disk.write(job.cpu_slots, job.disk_slots) if self._disk else None)
            )

    def run_rescues(self, plan: StepPlan) -> None:
        """At bind, before the forward. Rescues copy on the compute stream: the forward that
        reuses their blocks waits for them, and so do the step's asynchronous loads, which
        wait for nothing after them (a rescued block may be one a load writes)."""
        self._store(plan.rescues, stream=None)
        if self._cuda and any(job.asynchronous for job in plan.loads):
            self._bound_event = torch.cuda.Event()
            self._bound_event.record()

    def run_stores(self, plan: StepPlan) -> None:
        """Stores copy on their own stream once the forward is done, overlapping the next steps."""
        self._store(plan.stores, stream=self._store_stream)

    def _store(self, jobs: list[TransferJob], stream: Any) -> None:
        if not jobs:
            return
        faults = active_faults(self._rank)
        fault = faults if faults is not None and faults.store_fails(jobs) else None
        self._issue(jobs, False, stream, fault)

    def poll(self) -> None:
        """Once per step: report the copies that are done (and due), in issue order.

        Job results go to ``take_results``; the requests whose asynchronous loads finished
        to ``take_finished_loads`` (vLLM's ``finished_recving``: it admits them once every
        worker did).
        """
        self._polls += 1
        self._polled = True
        # In issue order: a store issued after a load is reported after it on this rank,
        # so the scheduler side always hears of a failed load before of a store that
        # could have read KV computed from it.
        while self._copies:
            copy = self._copies[0]
            if copy.due_poll > self._polls or (copy.done_event is not None and not copy.done_event.query()):
                break
            self._copies.popleft()
            counts = self._results.done if copy.ok else self._results.failed
            for job in copy.jobs:
                counts[job.job_id] = counts.get(job.job_id, 0) + 1
                if job.asynchronous:
                    self._finished_loads.add(job.request_id)  # type: ignore[arg-type]
        while self._spills and (self._spills[0][1] is None or self._spills[0][1].done()):
            job, future = self._spills.popleft()
            error = future.exception() if future is not None else OSError("no disk tier file")
            if error is not None:
                self._disk_failure("write", error)
            counts = self._results.failed if error is not None else self._results.done
            counts[job.job_id] = counts.get(job.job_id, 0) + 1

    def take_results(self) -> JobResults:
        """Jobs reported done or failed since the last call (polls first if this step did not)."""
        if not self._polled:
            self.poll()
        self._polled = False
        results, self._results = self._results, JobResults()
        return results

    def take_finished_loads(self) -> set[str]:
        """Requests whose asynchronous loads finished here (polls for this step)."""
        self.poll()
        finished, self._finished_loads = self._finished_loads, set()
        return finished

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def close(self) -> None:
        """At shutdown: wait for copies in flight, then give back the tier's page-locked memory."""
        from vllm_bidkv.kernels import release_pinned

        if self._cuda:
            torch.cuda.synchronize()
        self._copies.clear()
        if self._disk is not None:  # its writes read the tier's rows
            self._disk.close()
        self._spills.clear()
        release_pinned(self._cpu)

"""The connector's worker side: the CPU tier's bytes and the copies of each step's plan.

Rescues run before the forward (``bind_connector_metadata``), loads before the
forward (``start_load_kv``), both on the compute stream; stores after it
(``wait_for_save``; on CUDA a side stream that waits for an event recorded after
the forward, so a block is never read before the compute that wrote it). The
worker counts nothing: it reports which jobs finished or failed
(``take_results``) and the scheduler side counts each job once, however many
workers ran it.

Test hook (fault injection): ``FaultPlan``, selected by the environment variable
``VLLM_BIDKV_FAULTS`` (JSON, read when the first ``CopyWorker`` is built, in each
worker process) or in-process with ``set_faults``, makes the copy path fail on
purpose: load jobs that fail (every Nth, or those writing chosen GPU blocks), store
batches that fail, with ``mid_batch`` copies that raise after copying half of
their blocks, and with ``rank`` only in the worker of that rank (one TP rank failing
while the others succeed). A failure takes the same path as a real one (the job is reported
failed; a load's blocks are reported as load errors, and vLLM recomputes them).
Never set it in production.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.offload import JobResults, StepPlan, TransferJob

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


FAULTS_ENV = "VLLM_BIDKV_FAULTS"


class InjectedFault(RuntimeError):
    """The error a ``FaultPlan`` raises inside a copy."""


@dataclass
class FaultPlan:
    """Test hook: which copies fail on purpose (see the module doc). Not for production.

    ``load_every``: every Nth load job fails (1: all; 0: none). ``load_blocks``: a load
    job writing any of these GPU block ids fails. ``store_every``: every Nth store batch
    (one step's rescues, or one step's post-forward stores) fails. ``mid_batch``: a
    failing copy first copies the first half of its blocks, then raises.
    ``rank``: only the worker of this global rank fails (None: every worker).
    ``injected``: what was failed so far (jobs and blocks by kind), for tests.
    """

    load_every: int = 0
    load_blocks: frozenset[int] = frozenset()
    store_every: int = 0
    mid_batch: bool = False
    rank: int | None = None
    injected: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("load_jobs", "load_blocks", "store_jobs", "store_blocks"), 0)
    )
    _loads_seen: int = 0
    _stores_seen: int = 0

    KEYS = ("load_every", "load_blocks", "store_every", "mid_batch", "rank")

    @classmethod
    def from_json(cls, text: str) -> FaultPlan:
        """Parse ``VLLM_BIDKV_FAULTS``; an unknown key or a bad value raises ValueError naming it."""
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"vllm-bidkv: {FAULTS_ENV} is not JSON: {err}") from err
        if not isinstance(spec, dict):
            raise ValueError(f"vllm-bidkv: {FAULTS_ENV} must be a JSON object, got {text!r}")
        for key in spec:
            if key not in cls.KEYS:
                raise ValueError(
                    f"vllm-bidkv: {FAULTS_ENV}: unknown key {key!r}; known: {', '.join(cls.KEYS)}"
                )
        for key in ("load_every", "store_every"):
            value = spec.get(key, 0)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"vllm-bidkv: {FAULTS_ENV}: {key}={value!r} must be an integer >= 0")
        blocks = spec.get("load_blocks", [])
        if not isinstance(blocks, list) or not all(isinstance(b, int) and b >= 0 for b in blocks):
            raise ValueError(f"vllm-bidkv: {FAULTS_ENV}: load_blocks={blocks!r} must be a list of block ids")
        mid_batch = spec.get("mid_batch", False)
        if not isinstance(mid_batch, bool):
            raise ValueError(f"vllm-bidkv: {FAULTS_ENV}: mid_batch={mid_batch!r} must be true or false")
        rank = spec.get("rank")
        if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 0):
            raise ValueError(f"vllm-bidkv: {FAULTS_ENV}: rank={rank!r} must be a worker rank >= 0 or null")
        return cls(spec.get("load_every", 0), frozenset(blocks), spec.get("store_every", 0), mid_batch, rank)

    def load_fails(self, job: TransferJob) -> bool:
        self._loads_seen += 1
        fails = bool(
            self.load_every and self._loads_seen % self.load_every == 0
        ) or not self.load_blocks.isdisjoint(job.gpu_block_ids)
        if fails:
            self.injected["load_jobs"] += 1
            self.injected["load_blocks"] += len(job.gpu_block_ids)
        return fails

    def store_fails(self, jobs: list[TransferJob]) -> bool:
        self._stores_seen += 1
        fails = bool(self.store_every and self._stores_seen % self.store_every == 0)
        if fails:
            self.injected["store_jobs"] += len(jobs)
            self.injected["store_blocks"] += sum(len(job.gpu_block_ids) for job in jobs)
        return fails


_faults: FaultPlan | None = None
_faults_read = False


def set_faults(plan: FaultPlan | None) -> None:
    """Test hook: replace this process's fault plan (None: no faults)."""
    global _faults, _faults_read
    _faults, _faults_read = plan, True


def active_faults(rank: int = 0) -> FaultPlan | None:
    """The fault plan of the worker of global ``rank`` in this process: ``set_faults``'s, else
    ``VLLM_BIDKV_FAULTS``'s, else None; None too where the plan names another rank."""
    global _faults, _faults_read
    if not _faults_read:
        text = os.environ.get(FAULTS_ENV)
        _faults = FaultPlan.from_json(text) if text else None
        _faults_read = True
        if _faults is not None:
            logger.warning("vllm-bidkv: fault injection active (%s=%s): a test hook", FAULTS_ENV, text)
    return _faults if _faults is None or _faults.rank in (None, rank) else None


def worker_rank() -> int:
    """This worker's global rank (tensor x pipeline parallel); 0 outside torch.distributed."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


class CopyWorker:
    """One worker's CPU tier (a row per slot) and the copies of the jobs it is sent."""

    def __init__(
        self,
        kv_caches: dict[str, torch.Tensor],
        num_gpu_blocks: int,
        num_slots: int,
        config: BidKVConfig,
        workers_on_host: int = 1,
    ):
        """``workers_on_host``: workers of this engine on this host, each allocating a tier."""
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
        self._cpu = allocate_like(views, num_slots, device="cpu", pin_memory=self._cuda)
        self._backend = config.copy_backend
        self._rank = worker_rank()
        active_faults(self._rank)  # a bad VLLM_BIDKV_FAULTS fails at start-up, not in the first copy
        self._results = JobResults()
        self._load_errors: set[int] = set()
        self._inflight: list[tuple[list[int], Any]] = []
        self._store_stream = torch.cuda.Stream() if self._cuda else None
        logger.info(
            "vllm-bidkv: CPU tier %d blocks x %d B = %.2f GiB",
            num_slots,
            row_bytes,
            num_slots * row_bytes / 2**30,
        )

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

    def run_loads(self, plan: StepPlan) -> None:
        faults = active_faults(self._rank)
        for job in plan.pre_forward_loads:
            # Blocks the tier could no longer supply: vLLM must recompute them.
            self._load_errors.update(job.unavailable_gpu_block_ids)
            fault = faults if faults is not None and faults.load_fails(job) else None
            try:
                self._copy(self._cpu, self._gpu, job.cpu_slots, job.gpu_block_ids, fault)
            except Exception:  # noqa: BLE001 - a failed load must turn into a recompute, not a crash
                logger.exception(
                    "vllm-bidkv: rank %d: load job %d failed; vLLM will recompute", self._rank, job.job_id
                )
                self._results.failed.add(job.job_id)
                self._load_errors.update(job.gpu_block_ids)
                continue
            self._finish([job.job_id])

    def run_rescues(self, plan: StepPlan) -> None:
        """Rescues copy on the compute stream: the forward that reuses their blocks waits for them."""
        self._store(plan.pre_forward_stores, after_forward=False)

    def run_stores(self, plan: StepPlan) -> None:
        """Stores copy on their own stream once the forward is done, overlapping the next steps."""
        self._store(plan.post_forward_stores, after_forward=True)

    def _store(self, jobs: list[TransferJob], *, after_forward: bool) -> None:
        if not jobs:
            return
        gpu_ids = [i for job in jobs for i in job.gpu_block_ids]
        cpu_ids = [s for job in jobs for s in job.cpu_slots]
        job_ids = [job.job_id for job in jobs]
        faults = active_faults(self._rank)
        fault = faults if faults is not None and faults.store_fails(jobs) else None
        try:
            if self._cuda:
                copied = torch.cuda.Event()
                if after_forward:
                    assert self._store_stream is not None
                    forward_done = torch.cuda.Event()
                    forward_done.record()
                    with torch.cuda.stream(self._store_stream):
                        self._store_stream.wait_event(forward_done)
                        self._copy(self._gpu, self._cpu, gpu_ids, cpu_ids, fault)
                        copied.record()
                else:
                    self._copy(self._gpu, self._cpu, gpu_ids, cpu_ids, fault)
                    copied.record()
                self._inflight.append((job_ids, copied))
            else:
                self._copy(self._gpu, self._cpu, gpu_ids, cpu_ids, fault)
                self._finish(job_ids)
        except Exception:  # noqa: BLE001 - a failed store only loses a cache entry
            logger.exception("vllm-bidkv: rank %d: store of %d blocks failed", self._rank, len(gpu_ids))
            self._results.failed.update(job_ids)

    def _finish(self, job_ids: list[int]) -> None:
        for job_id in job_ids:
            self._results.done[job_id] = self._results.done.get(job_id, 0) + 1

    def take_results(self) -> JobResults:
        """Jobs finished or failed since the last call (CUDA copies once their event completed)."""
        still: list[tuple[list[int], Any]] = []
        for job_ids, event in self._inflight:
            if event.query():
                self._finish(job_ids)
            else:
                still.append((job_ids, event))
        self._inflight = still
        results, self._results = self._results, JobResults()
        return results

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

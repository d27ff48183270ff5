"""The connector's worker side: the CPU tier's bytes and the copies of each step's plan.

Rescues run before the forward (``bind_connector_metadata``), loads before the
forward (``start_load_kv``), both on the compute stream; stores after it
(``wait_for_save``; on CUDA a side stream that waits for an event recorded after
the forward, so a block is never read before the compute that wrote it). The
worker counts nothing: it reports which jobs finished or failed
(``take_results``) and the scheduler side counts each job once, however many
workers ran it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.offload import JobResults, StepPlan, TransferJob

logger = logging.getLogger("vllm_bidkv")


class CopyWorker:
    """One worker's CPU tier (a row per slot) and the copies of the jobs it is sent."""

    def __init__(
        self, kv_caches: dict[str, torch.Tensor], num_gpu_blocks: int, num_slots: int, config: BidKVConfig
    ):
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
        self._cpu = allocate_like(views, num_slots, device="cpu", pin_memory=self._cuda)
        self._backend = config.copy_backend
        self._results = JobResults()
        self._load_errors: set[int] = set()
        self._inflight: list[tuple[list[int], Any]] = []
        self._store_stream = torch.cuda.Stream() if self._cuda else None
        row_bytes = sum(v.shape[1] for v in views)
        logger.info(
            "vllm-bidkv: CPU tier %d blocks x %d B = %.2f GiB",
            num_slots,
            row_bytes,
            num_slots * row_bytes / 2**30,
        )

    def _copy(
        self, src: list[torch.Tensor], dst: list[torch.Tensor], src_ids: list[int], dst_ids: list[int]
    ) -> None:
        from vllm_bidkv.kernels import copy_blocks

        copy_blocks(src, dst, src_ids, dst_ids, backend=self._backend)

    def run_loads(self, plan: StepPlan) -> None:
        for job in plan.pre_forward_loads:
            # Blocks the tier could no longer supply: vLLM must recompute them.
            self._load_errors.update(job.unavailable_gpu_block_ids)
            try:
                self._copy(self._cpu, self._gpu, job.cpu_slots, job.gpu_block_ids)
            except Exception:  # noqa: BLE001 - a failed load must turn into a recompute, not a crash
                logger.exception("vllm-bidkv: load job %d failed; vLLM will recompute", job.job_id)
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
        try:
            if self._cuda:
                copied = torch.cuda.Event()
                if after_forward:
                    assert self._store_stream is not None
                    forward_done = torch.cuda.Event()
                    forward_done.record()
                    with torch.cuda.stream(self._store_stream):
                        self._store_stream.wait_event(forward_done)
                        self._copy(self._gpu, self._cpu, gpu_ids, cpu_ids)
                        copied.record()
                else:
                    self._copy(self._gpu, self._cpu, gpu_ids, cpu_ids)
                    copied.record()
                self._inflight.append((job_ids, copied))
            else:
                self._copy(self._gpu, self._cpu, gpu_ids, cpu_ids)
                self._finish(job_ids)
        except Exception:  # noqa: BLE001 - a failed store only loses a cache entry
            logger.exception("vllm-bidkv: store of %d blocks failed", len(gpu_ids))
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

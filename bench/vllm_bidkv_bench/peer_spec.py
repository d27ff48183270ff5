"""vLLM's ``OffloadingConnector`` on a CPU-only vLLM: vLLM's spec, with a CPU copy handler of ours.

A benchmark and test fixture (the runtime package never imports it). Reports call what it
runs "vLLM OffloadingConnector with a CPU copy handler of ours" (``DESCRIPTION``).

vLLM's ``OffloadingConnector`` (``--kv-offloading-backend native``) builds its scheduler side
and its worker from an ``OffloadingSpec`` named by ``kv_connector_extra_config``
(``spec_name``, ``spec_module_path``; ``vllm/v1/kv_offload/factory.py``). Its CPU spec,
``CPUOffloadingSpec``, refuses in ``get_worker`` any platform other than CUDA-alike and XPU,
and its copy path (``CPUOffloadingWorker`` -> ``SingleDirectionOffloadingHandler``,
``vllm/v1/kv_offload/cpu/gpu_worker.py``) asserts device tensors on CUDA/XPU and copies with
CUDA streams, events and ``swap_blocks_batch``. ``CPUCopyOffloadingSpec`` below changes
exactly that and nothing else:

What is vLLM's (unchanged, from the installed vLLM): the connector (``OffloadingConnector``),
its scheduler side (``OffloadingConnectorScheduler``: lookups, hit accounting, store and
load jobs, ``jobs_to_flush`` fences on preemption, stats), its worker side
(``OffloadingConnectorWorker``: ``register_kv_caches`` building ``CanonicalKVCaches``,
``handle_preemptions``, deferred stores, ``get_finished`` / ``completed_jobs``), the spec's
sizing (``CPUOffloadingSpec.__init__``: ``cpu_bytes_to_use``, ``blocks_per_chunk`` /
``block_size``, the chunk count), its manager (``CPUOffloadingSpec.get_manager`` ->
``CPUOffloadingManager`` with ``eviction_policy`` ``lru`` / ``arc`` or a
``cache_policy_module_path``, ``store_threshold``, ``max_tracker_size``) and its metric
definitions. Configure it with the same extra-config keys as vLLM's own spec.

What is ours: the ``OffloadingWorker`` that ``get_worker`` returns, ``CPUCopyOffloadingWorker``
(``submit_store`` / ``submit_load`` / ``get_finished`` / ``wait`` / ``shutdown``, the
interface of ``vllm/v1/kv_offload/base.py``). It keeps vLLM's host layout for the direct
(worker-private) layout: one host tensor per canonical KV tensor, ``num_chunks`` rows of
``page_size_bytes * blocks_per_chunk`` bytes, and copies the same bytes that
``SingleDirectionOffloadingHandler._fill_direct_ops`` enumerates (per KV group, per data
ref, the ref's un-padded page of each block, skipping ``block_indices % blocks_per_chunk``
sub-blocks of a group's first chunk) with ``vllm_bidkv.kernels.copy_blocks`` on block views.
On the CPU a copy is done when the call returns, so a job is reported (with its bytes and
seconds, for vLLM's ``kv_offload_*`` transfer stats) at the next ``get_finished``, and
``wait`` has nothing to wait for. Jobs run in submission order, as vLLM's handler orders
them. Not covered: the canonical host layout (``canonical_layout``), which vLLM 0.32.0's
``create_worker`` does not pass to its worker either, the shared mmap region (CUDA only
there too) and pinned memory (no device to DMA to).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from vllm.v1.kv_offload.base import (
    BlockIDsLoadStoreSpec,
    CanonicalKVCacheRef,
    CanonicalKVCaches,
    GPULoadStoreSpec,
    LoadStoreSpec,
    OffloadingWorker,
    TransferResult,
)
from vllm.v1.kv_offload.cpu.spec import CPUOffloadingSpec

from vllm_bidkv.kernels import copy_blocks

DESCRIPTION = "vLLM OffloadingConnector with a CPU copy handler of ours"
SPEC_NAME = "CPUCopyOffloadingSpec"
SPEC_MODULE_PATH = __name__


def extra_config_keys() -> dict[str, str]:
    """The ``kv_connector_extra_config`` keys that make ``OffloadingConnector`` use this spec."""
    return {"spec_name": SPEC_NAME, "spec_module_path": SPEC_MODULE_PATH}


class CPUCopyOffloadingSpec(CPUOffloadingSpec):
    """vLLM's ``CPUOffloadingSpec`` (sizing, manager, metrics) with a worker that copies on the CPU."""

    def create_worker(self, kv_caches: CanonicalKVCaches) -> CPUCopyOffloadingWorker:  # type: ignore[override]
        return CPUCopyOffloadingWorker(kv_caches, self.blocks_per_chunk, self.num_chunks)

    def get_worker(self, kv_caches: CanonicalKVCaches) -> OffloadingWorker:
        # vLLM's get_worker, less its platform refusal (the only thing it refuses).
        if self._worker is None:
            self._worker = self.create_worker(kv_caches)  # type: ignore[assignment]
        assert self._worker is not None
        return self._worker


class _Direction:
    """One direction's copies: (src views, dst views) per tensor, with rows = blocks.

    Device views are ``[num_blocks, page]`` (a block's page of one canonical tensor); host
    views are ``[num_chunks * blocks_per_chunk, page]``: a chunk's sub-blocks are consecutive
    rows, exactly vLLM's ``[num_chunks, page * blocks_per_chunk]`` host tensor.
    """

    def __init__(
        self,
        device: Sequence[torch.Tensor],
        host: Sequence[torch.Tensor],
        refs: list[list[CanonicalKVCacheRef]],
        blocks_per_chunk: int,
        to_host: bool,
    ) -> None:
        self.src, self.dst = (device, host) if to_host else (host, device)
        self.refs = refs
        self.blocks_per_chunk = blocks_per_chunk
        self.to_host = to_host

    def copy(self, src_spec: LoadStoreSpec, dst_spec: LoadStoreSpec) -> int:
        """Copy a job's blocks; the bytes copied. Mirrors ``transfer_async``'s walk over groups."""
        assert isinstance(src_spec, BlockIDsLoadStoreSpec) and isinstance(dst_spec, BlockIDsLoadStoreSpec)
        device_spec = src_spec if self.to_host else dst_spec
        assert isinstance(device_spec, GPULoadStoreSpec)
        src_ids, dst_ids = src_spec.block_ids, dst_spec.block_ids
        assert len(device_spec.group_sizes) == len(device_spec.block_indices) == len(self.refs)
        src_chunk = 1 if self.to_host else self.blocks_per_chunk
        dst_chunk = self.blocks_per_chunk if self.to_host else 1
        src_offset = dst_offset = num_bytes = 0
        for refs, group_size, block_index in zip(
            self.refs, device_spec.group_sizes, device_spec.block_indices, strict=True
        ):
            if group_size == 0:
                continue
            src_skip, dst_skip = block_index % src_chunk, block_index % dst_chunk
            src_count = -(-(group_size + src_skip) // src_chunk)
            dst_count = -(-(group_size + dst_skip) // dst_chunk)
            src_rows = _rows(src_ids[src_offset : src_offset + src_count], src_chunk, src_skip, group_size)
            dst_rows = _rows(dst_ids[dst_offset : dst_offset + dst_count], dst_chunk, dst_skip, group_size)
            src_offset += src_count
            dst_offset += dst_count
            # One region per distinct (tensor, un-padded page) of the group's layers: aliased
            # layers share their tensor's bytes, which vLLM copies once per ref (same bytes).
            regions = sorted({(ref.tensor_idx, ref.page_size_bytes) for ref in refs})
            copy_blocks(
                [self.src[t][:, :size] for t, size in regions],
                [self.dst[t][:, :size] for t, size in regions],
                torch.from_numpy(src_rows),  # (a tensor: validated without a per-id loop)
                torch.from_numpy(dst_rows),
                backend="torch",
            )
            num_bytes += group_size * sum(ref.page_size_bytes for ref in refs)
        assert src_offset == len(src_ids) and dst_offset == len(dst_ids)
        return num_bytes


def _rows(ids: np.ndarray, blocks_per_chunk: int, skip: int, count: int) -> np.ndarray:
    """Row ids of ``count`` blocks from ``ids`` (blocks or chunks), the first ``skip`` sub-blocks skipped."""
    ids = ids.astype(np.int64)
    if blocks_per_chunk == 1:
        return ids[:count]
    rows: np.ndarray = (ids[:, None] * blocks_per_chunk + np.arange(blocks_per_chunk)).ravel()
    return rows[skip : skip + count]


class CPUCopyOffloadingWorker(OffloadingWorker):
    """``OffloadingWorker`` whose copies are host-to-host ``copy_blocks`` calls (vLLM on CPU)."""

    def __init__(self, kv_caches: CanonicalKVCaches, blocks_per_chunk: int, num_cpu_chunks: int) -> None:
        device: list[torch.Tensor] = []
        host: list[torch.Tensor] = []
        for cache in kv_caches.tensors:
            tensor = cache.tensor
            if tensor.device.type != "cpu":
                raise ValueError(
                    f"{DESCRIPTION}: KV cache on {tensor.device}; this worker copies on the CPU "
                    "only (use vLLM's own CPUOffloadingSpec on a GPU)"
                )
            page = cache.page_size_bytes
            assert tensor.dim() == 2 and tensor.element_size() == 1 and tensor.stride(1) == 1
            assert tensor.shape[1] >= page
            device.append(tensor.view(torch.uint8)[:, :page])
            host.append(torch.zeros((num_cpu_chunks * blocks_per_chunk, page), dtype=torch.uint8))
        self.host = host
        refs = kv_caches.group_data_refs
        self._store = _Direction(device, host, refs, blocks_per_chunk, to_host=True)
        self._load = _Direction(device, host, refs, blocks_per_chunk, to_host=False)
        self._finished: list[TransferResult] = []

    def _run(self, direction: _Direction, job_id: int, src: LoadStoreSpec, dst: LoadStoreSpec) -> bool:
        start = time.perf_counter()
        num_bytes = direction.copy(src, dst)
        self._finished.append(TransferResult(job_id, True, num_bytes, time.perf_counter() - start))
        return True

    def submit_store(self, job_id: int, src_spec: GPULoadStoreSpec, dst_spec: LoadStoreSpec) -> bool:
        return self._run(self._store, job_id, src_spec, dst_spec)

    def submit_load(self, job_id: int, src_spec: LoadStoreSpec, dst_spec: GPULoadStoreSpec) -> bool:
        return self._run(self._load, job_id, src_spec, dst_spec)

    def get_finished(self) -> list[TransferResult]:
        finished, self._finished = self._finished, []
        return finished

    def wait(self, job_ids: set[int]) -> None:
        return  # every submitted copy is done when submit_* returns

    def shutdown(self) -> None:
        self._finished = []
        self.host.clear()

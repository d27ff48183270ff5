"""The CPU copy handler of ``vllm_bidkv_bench.peer_spec`` against vLLM's own byte enumeration.

vLLM's ``SingleDirectionOffloadingHandler`` (CUDA only) turns a job into byte pointers with
``compute_sub_block_ptrs`` and copies each ref's un-padded page; here that enumeration, applied
with ``memmove`` to CPU tensors, is the reference for ``CPUCopyOffloadingWorker``: chunks of
several blocks, a group's first chunk entered part-way (``block_indices``), two KV groups,
padded pages. Also: the engine runner's config keys name this spec.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.kernels

base = pytest.importorskip("vllm.v1.kv_offload.base")
gpu_worker = pytest.importorskip("vllm.v1.kv_offload.cpu.gpu_worker")
cpu_common = pytest.importorskip("vllm.v1.kv_offload.cpu.common")

# The spec needs vLLM's offloading worker interface (0.32's); older releases lack it.
peer_spec = pytest.importorskip(
    "vllm_bidkv_bench.peer_spec",
    reason="this vLLM has no OffloadingWorker interface (vLLM 0.32+)",
    exc_type=ImportError,
)
from vllm_bidkv_bench.configs import CONFIGS, CPU_COPY_PEERS  # noqa: E402

NUM_BLOCKS, NUM_CHUNKS, PER_CHUNK = 12, 6, 2
PAGE, PADDED = 96, 128  # bytes per block of one tensor; the tensor's row is padded


def _caches() -> tuple[list[torch.Tensor], base.CanonicalKVCaches]:
    """Two tensors (two layers) of padded pages; group 0 holds both layers, group 1 the second."""
    gen = torch.Generator().manual_seed(0)
    raw = [torch.randint(-128, 127, (NUM_BLOCKS, PADDED), dtype=torch.int8, generator=gen) for _ in range(2)]
    tensors = [base.CanonicalKVCacheTensor(t, PADDED) for t in raw]
    refs = [
        [base.CanonicalKVCacheRef(0, PAGE), base.CanonicalKVCacheRef(1, PAGE)],
        [base.CanonicalKVCacheRef(1, PAGE)],
    ]
    return raw, base.CanonicalKVCaches(tensors, refs)


def _reference(
    src: list[torch.Tensor],
    dst: list[torch.Tensor],
    refs: list[list[base.CanonicalKVCacheRef]],
    src_ids: np.ndarray,
    dst_ids: np.ndarray,
    device_spec: base.GPULoadStoreSpec,
    to_host: bool,
) -> None:
    """vLLM's ``transfer_async`` + ``_fill_direct_ops`` walk, pointers copied with memmove."""
    src_chunk, dst_chunk = (1, PER_CHUNK) if to_host else (PER_CHUNK, 1)
    src_off = dst_off = 0
    for group_refs, size, index in zip(refs, device_spec.group_sizes, device_spec.block_indices, strict=True):
        src_skip, dst_skip = index % src_chunk, index % dst_chunk
        src_n, dst_n = -(-(size + src_skip) // src_chunk), -(-(size + dst_skip) // dst_chunk)
        for ref in group_refs:
            src_ptrs, dst_ptrs = np.empty(size, np.uint64), np.empty(size, np.uint64)
            gpu_worker.compute_sub_block_ptrs(
                src_ids[src_off : src_off + src_n], src_chunk, src_ptrs, src[ref.tensor_idx], src_skip
            )
            gpu_worker.compute_sub_block_ptrs(
                dst_ids[dst_off : dst_off + dst_n], dst_chunk, dst_ptrs, dst[ref.tensor_idx], dst_skip
            )
            for s, d in zip(src_ptrs, dst_ptrs, strict=True):
                ctypes.memmove(int(d), int(s), ref.page_size_bytes)
        src_off, dst_off = src_off + src_n, dst_off + dst_n


def test_store_and_load_copy_the_bytes_vllm_would() -> None:
    raw, caches = _caches()
    worker = peer_spec.CPUCopyOffloadingWorker(caches, PER_CHUNK, NUM_CHUNKS)
    host = [torch.zeros(NUM_CHUNKS, PER_CHUNK * PADDED, dtype=torch.int8) for _ in range(2)]
    # Group 0: blocks 5, 3, 7 from the 2nd block of a chunk (block_indices 1: skip one sub-block)
    # into chunks 4 and 0; group 1: blocks 9, 2 from a chunk start into chunk 3.
    device = base.GPULoadStoreSpec([5, 3, 7, 9, 2], group_sizes=[3, 2], block_indices=[1, 4])
    chunks = cpu_common.CPULoadStoreSpec([4, 0, 3])
    assert worker.submit_store(7, device, chunks)
    _reference(raw, host, caches.group_data_refs, device.block_ids, chunks.block_ids, device, to_host=True)
    # vLLM's host layout too: [num_chunks, blocks_per_chunk * padded page] per tensor.
    for ours, theirs in zip(worker.host, host, strict=True):
        assert torch.equal(ours.view(torch.int8).view(NUM_CHUNKS, PER_CHUNK * PADDED), theirs)
    assert any(h.any() for h in host)
    assert worker.submit_store(8, device, chunks)

    # Done inside the call, reported once at the next poll, with vLLM's byte count: 3 blocks
    # x 2 layers + 2 blocks x 1 layer, un-padded pages.
    results = worker.get_finished()
    assert [(r.job_id, r.success, r.transfer_size) for r in results] == [
        (7, True, 8 * PAGE),
        (8, True, 8 * PAGE),
    ]
    assert all(r.transfer_time is not None and r.transfer_time >= 0 for r in results)
    assert worker.get_finished() == []
    worker.wait({7, 8})

    # Load back into other blocks: the same bytes as vLLM's load walk from the same host rows.
    target = base.GPULoadStoreSpec([0, 1, 4, 10, 11], group_sizes=[3, 2], block_indices=[1, 4])
    before = [t.clone() for t in raw]
    assert worker.submit_load(9, chunks, target)
    expected = [t.clone() for t in before]
    _reference(
        host, expected, caches.group_data_refs, chunks.block_ids, target.block_ids, target, to_host=False
    )
    for got, want in zip(raw, expected, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(raw[0][[0, 1, 4], :PAGE], before[0][[5, 3, 7], :PAGE])  # a round trip
    assert torch.equal(raw[0][:, PAGE:], before[0][:, PAGE:])  # padding is never written
    assert [r.job_id for r in worker.get_finished()] == [9]
    worker.shutdown()


def test_engine_config_names_this_spec() -> None:
    keys, description = CPU_COPY_PEERS["offloading"]
    assert keys == peer_spec.extra_config_keys() and description == peer_spec.DESCRIPTION
    assert issubclass(peer_spec.CPUCopyOffloadingSpec, peer_spec.CPUOffloadingSpec)
    for name in ("vllm-offloading", "vllm-offloading-arc"):
        config = CONFIGS[name]
        plain = config.kv_transfer_config("fcfs", 1 << 20)
        swapped = config.kv_transfer_config("fcfs", 1 << 20, cpu_copy_peer=True)
        assert plain is not None and swapped is not None
        assert swapped["kv_connector_extra_config"] == {**plain["kv_connector_extra_config"], **keys}
        assert "spec_name" not in plain["kv_connector_extra_config"]  # the simulator's config
        assert (
            config.engine_label(True).startswith(description) and config.engine_label(False) == config.label
        )
    simple = CONFIGS["vllm-simple-offload"]
    assert simple.kv_transfer_config("fcfs", 1, cpu_copy_peer=True) == simple.kv_transfer_config("fcfs", 1)

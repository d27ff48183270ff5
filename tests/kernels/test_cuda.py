"""The CUDA copy path on a real GPU (skipped without one; ``scripts/gpu_check.sh`` runs the tier
on a GPU box): the tier's registration and release, which backend ``auto`` picks, results, and
that no copy makes the host wait for the GPU.

The Triton kernel runs compiled here, whatever conftest's interpreter fixture did to the module:
the ``compiled`` fixture swaps in a compiled ``JITFunction`` of the same kernel.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from types import ModuleType

import pytest
import torch

from vllm_bidkv.kernels import allocate_like, block_copy, copy_blocks, layout, release_pinned

pytestmark = [
    pytest.mark.kernels,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BLOCKS, SLOTS, ROW = 64, 32, 4096


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    from vllm_bidkv.kernels import triton_copy

    if triton_copy.is_interpreted():
        monkeypatch.setattr(triton_copy, "copy_blocks_kernel", JITFunction(triton_copy.copy_blocks_kernel.fn))
    monkeypatch.setattr(block_copy, "_triton_failure", None)
    return triton_copy


def cuda_views(regions: int = 4, blocks: int = BLOCKS, row: int = ROW) -> list[torch.Tensor]:
    return [torch.randint(0, 256, (blocks, row), dtype=torch.uint8, device="cuda") for _ in range(regions)]


def store_and_load_ids() -> tuple[list[int], list[int], list[int]]:
    """Random even cache ids stored to random slots, loaded back into random odd cache ids."""
    slots = torch.randperm(SLOTS)[:16].tolist()
    stored = (2 * torch.randperm(BLOCKS // 2)[:16]).tolist()
    loaded = (2 * torch.randperm(BLOCKS // 2)[:16] + 1).tolist()
    return stored, slots, loaded


def sleep_cycles(seconds: float) -> int:
    """Cycles of ``torch.cuda._sleep`` that keep the current stream busy for about ``seconds``."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**7)
    end.record()
    end.synchronize()
    return int(10**7 * seconds * 1000 / start.elapsed_time(end))


def test_tier_is_mapped_at_its_host_address_and_released(
    compiled: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    views = cuda_views()
    tier = allocate_like(views, SLOTS, "cpu", pin_memory=True)
    assert tier[0].is_pinned()
    assert layout.unaddressable_reason(tier[0]) == ""
    assert compiled.unsupported_reason([*views, *tier]) == ""
    assert release_pinned(tier) == 1 and release_pinned(tier) == 0
    assert not tier[0].is_pinned(), "release_pinned unregistered the arena"
    assert "pageable" in compiled.unsupported_reason([*views, *tier])

    caplog.set_level(logging.WARNING, logger="vllm_bidkv")
    second = allocate_like(views, SLOTS, "cpu", pin_memory=True)
    base = second[0].data_ptr()
    assert second[0].is_pinned()
    del second
    gc.collect()
    assert base not in layout._registrations
    assert [r for r in caplog.records if r.name == "vllm_bidkv"] == [], "cudaHostUnregister succeeded"


def test_torch_pinned_memory_is_addressable(compiled: ModuleType) -> None:
    """Memory from torch's pinned allocator (cudaHostAlloc): the driver query path, and the
    module's own check (half its destinations are such memory)."""
    pinned = torch.empty(8, 64, dtype=torch.uint8, pin_memory=True)
    assert layout.unaddressable_reason(pinned) == ""
    compiled.check_against_torch("cuda")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_store_and_load_do_not_wait_for_the_gpu(backend: str, compiled: ModuleType) -> None:
    """With the stream busy for ~0.3 s, issuing a store and a load returns long before the GPU
    gets to them, and torch's sync debug mode sees no synchronizing call."""
    cache = cuda_views()
    original = [view.clone() for view in cache]
    tier = allocate_like(cache, SLOTS, "cpu", pin_memory=True)
    stored, slots, loaded = store_and_load_ids()

    def store_then_load() -> None:
        copy_blocks(cache, tier, stored, slots, backend)  # type: ignore[arg-type]
        copy_blocks(tier, cache, slots, loaded, backend)  # type: ignore[arg-type]

    store_then_load()  # compiles the kernel and warms the pinned staging cache
    torch.cuda.synchronize()
    cycles = sleep_cycles(0.3)
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.cuda._sleep(cycles)
        start = time.perf_counter()
        store_then_load()
        issued = time.perf_counter() - start
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    done = time.perf_counter() - start
    assert issued < done / 3, f"issuing took {issued:.3f} s of {done:.3f} s: the host waited for the GPU"
    for region, (view, before) in enumerate(zip(cache, original, strict=True)):
        assert torch.equal(tier[region][slots], before[stored].cpu()), f"store, region {region}"
        assert torch.equal(view[loaded], before[stored]), f"load, region {region}"
    release_pinned(tier)


def test_auto_picks_triton_for_a_pinned_tier_and_torch_for_pageable(
    compiled: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch_calls: list[int] = []
    torch_path = block_copy.copy_blocks_torch

    def spy(*args: object) -> None:
        torch_calls.append(1)
        torch_path(*args)

    monkeypatch.setattr(block_copy, "copy_blocks_torch", spy)
    cache = cuda_views()
    stored, slots, _ = store_and_load_ids()
    for pinned, torch_expected in ((True, 0), (False, 1)):
        tier = allocate_like(cache, SLOTS, "cpu", pin_memory=pinned)
        copy_blocks(cache, tier, stored, slots)
        torch.cuda.synchronize()
        assert len(torch_calls) == torch_expected, f"pinned={pinned}"
        for region, view in enumerate(cache):
            assert torch.equal(tier[region][slots], view[stored].cpu())
        if not pinned:
            with pytest.raises(ValueError, match="it is pageable host memory"):
                copy_blocks(cache, tier, stored, slots, "triton")
        release_pinned(tier)


@pytest.mark.parametrize("direction", ["store", "load", "d2d"])
def test_torch_backend_equals_indexing_with_padded_host_rows(direction: str) -> None:
    """Host rows with a stride longer than the row move a row per DMA; runs of slots one per run."""
    padded = torch.randint(0, 256, (SLOTS, ROW + 64), dtype=torch.uint8).pin_memory()[:, :ROW]
    cache = cuda_views(regions=1)[0]
    src, dst = {"store": (cache, padded), "load": (padded, cache), "d2d": (cache, cuda_views(regions=1)[0])}[
        direction
    ]
    src_ids, dst_ids = [3, 4, 5, 9, 1], [7, 8, 2, 30, 0]
    expected = dst.cpu().clone()
    expected[dst_ids] = src.cpu()[src_ids]
    copy_blocks([src], [dst], src_ids, dst_ids, "torch")
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), expected)


def test_no_copy_path_call_synchronizes(compiled: ModuleType) -> None:
    """Every route (triton, and torch's store, load and device-to-device) under torch's sync
    debug mode, which raises on any synchronizing torch call."""
    cache, other = cuda_views(), cuda_views()
    tier = allocate_like(cache, SLOTS, "cpu", pin_memory=True)
    stored, slots, loaded = store_and_load_ids()
    copies: list[Callable[[], None]] = [
        lambda: copy_blocks(cache, tier, stored, slots, "triton"),
        lambda: copy_blocks(tier, cache, slots, loaded, "triton"),
        lambda: copy_blocks(cache, tier, stored, slots, "torch"),
        lambda: copy_blocks(tier, cache, slots, loaded, "torch"),
        lambda: copy_blocks(cache, other, stored, loaded, "torch"),
    ]
    for copy in copies:
        copy()  # compile and warm up outside the debug mode
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for copy in copies:
            copy()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    release_pinned(tier)

"""
Block copy in Triton
====================

One launch copies every (source block, destination block) pair of every region (layer, K/V
half): ``dst[r][dst_ids[k]] = src[r][src_ids[k]]`` for all ``r`` and ``k``.

Regions live in separate allocations, so the kernel gets no tensors for them. Instead a small
int64 table holds, per region, the base address and row stride of both sides and the row
length; the kernel casts the addresses to pointers. Rows are moved as the widest integer
(8, 4, 2 or 1 bytes) that every base, stride and row length is a multiple of.

Host memory: on CUDA the kernel dereferences host pointers directly. That is valid for pinned
memory mapped into the device address space, which is what torch's pinned allocator
(``cudaHostAlloc``) gives under unified virtual addressing on 64-bit platforms: the host
pointer is the device pointer. Memory pinned with ``cudaHostRegister`` works the same way only
with ``cudaHostRegisterMapped`` on devices that can use host pointers for registered memory
(``allocate_like`` registers so). ``unsupported_reason`` checks it per host buffer (see
``layout.unaddressable_reason``) and refuses the rest. Copies over PCIe then run as the
kernel's loads and stores.

The launch never waits for the GPU: the argument table goes to the device through pinned
memory with an asynchronous copy on the current stream (``layout.stage_int64``).

Without a GPU the kernel runs on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before this module is imported): that is how it is tested.

Sections, top to bottom: the kernel, its Python wrapper, and a correctness check against torch
indexing (``python -m vllm_bidkv.kernels.triton_copy``). The benchmark lives with the others:
``vllm-bidkv bench copy --backends triton per_block torch`` (:mod:`vllm_bidkv_bench.copy`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from vllm_bidkv.kernels.layout import stage_int64, unaddressable_reason, widest_alignment

# %%
# The kernel
# ----------
# Program (pair, region, chunk) copies elements [chunk * BLOCK, (chunk + 1) * BLOCK) of one row.
# The region table is five int64 columns of length num_regions, back to back: source base
# address, destination base address, source row stride, destination row stride, row length
# (strides and lengths in UNIT elements). pair_ids holds the source ids, then the
# destination ids. Ids and strides are int64, so offsets past 2**31 elements do not wrap.
# ALIGN (bytes, >= UNIT's size) divides every row start and row length: pointers cast from
# integers carry no alignment, so it is declared with tl.multiple_of; with ALIGN = 16 the
# loads and stores become 16-byte vectors.


@triton.jit
def copy_blocks_kernel(
    region_table_ptr,
    pair_ids_ptr,
    num_regions,
    num_pairs,
    UNIT: tl.constexpr,
    ALIGN: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(0)
    region = tl.program_id(1)
    start = tl.program_id(2) * BLOCK
    units_per_align: tl.constexpr = ALIGN * 8 // UNIT.primitive_bitwidth
    row_length = tl.multiple_of(tl.load(region_table_ptr + 4 * num_regions + region), units_per_align)
    if start < row_length:  # regions with shorter rows leave their last chunks idle
        src_base = tl.load(region_table_ptr + region).to(tl.pointer_type(UNIT))
        dst_base = tl.load(region_table_ptr + num_regions + region).to(tl.pointer_type(UNIT))
        src_stride = tl.load(region_table_ptr + 2 * num_regions + region)
        dst_stride = tl.load(region_table_ptr + 3 * num_regions + region)
        src_row = tl.multiple_of(src_base + tl.load(pair_ids_ptr + pair) * src_stride, ALIGN)
        dst_row = tl.multiple_of(dst_base + tl.load(pair_ids_ptr + num_pairs + pair) * dst_stride, ALIGN)
        offsets = start + tl.arange(0, BLOCK)
        in_row = offsets < row_length
        tl.store(dst_row + offsets, tl.load(src_row + offsets, mask=in_row), mask=in_row)


# %%
# The wrapper
# -----------

_UNITS = {8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.uint8}
_MAX_ALIGN = 16  # the widest vector load/store of one thread
_BYTES_PER_PROGRAM = 16 << 10
_MAX_GRID_YZ = 65535


def is_interpreted() -> bool:
    """True when the kernel runs in the Triton interpreter (CPU tensors), false when compiled."""
    return isinstance(copy_blocks_kernel, InterpretedFunction)


def unsupported_reason(views: Sequence[torch.Tensor]) -> str:
    """Why the kernel cannot address all of ``views`` ("" when it can)."""
    if is_interpreted():
        on_gpu = [view for view in views if view.device.type != "cpu"]
        return f"the Triton interpreter needs CPU tensors, got {on_gpu[0].device}" if on_gpu else ""
    devices = {view.device for view in views if view.device.type != "cpu"}
    if not devices:
        return "no view is on CUDA (set TRITON_INTERPRET=1 before import to run on CPU tensors)"
    if len(devices) > 1 or next(iter(devices)).type != "cuda":
        return f"views must be on one CUDA device, got {sorted(map(str, devices))}"
    # One check per host allocation: the tier's views all share one arena.
    host_views = {view.untyped_storage().data_ptr(): view for view in views if view.device.type == "cpu"}
    for view in host_views.values():
        reason = unaddressable_reason(view)
        if reason:
            return (
                f"the kernel cannot dereference a host view: {reason} (it needs pinned memory mapped "
                "at its host address: allocate_like(pin_memory=True) or torch's pin_memory)"
            )
    return ""


def copy_blocks_triton(
    src: Sequence[torch.Tensor],
    dst: Sequence[torch.Tensor],
    src_ids: np.ndarray | torch.Tensor,
    dst_ids: np.ndarray | torch.Tensor,
) -> None:
    """Launch ``copy_blocks_kernel`` once for all regions and pairs, on the views' device's current
    stream, without waiting for it.

    Expects what ``copy_blocks`` validated: equal-length lists of 2-D uint8 views with equal row
    sizes per region, equally long integer ids (host arrays or CPU tensors) in range with no
    repeated destination, and ``unsupported_reason(src + dst) == ""``. Raises what Triton
    raises when the kernel fails to compile or launch.
    """
    views = [*src, *dst]
    align = widest_alignment(
        [view.data_ptr() for view in views]
        + [view.stride(0) for view in views]
        + [view.shape[1] for view in src],
        limit=_MAX_ALIGN,
    )
    width = min(align, 8)
    region_table = [
        *(view.data_ptr() for view in src),
        *(view.data_ptr() for view in dst),
        *(view.stride(0) // width for view in src),
        *(view.stride(0) // width for view in dst),
        *(view.shape[1] // width for view in src),
    ]
    num_regions, num_pairs = len(src), len(src_ids)
    longest_row = max(view.shape[1] for view in src) // width
    if longest_row == 0:
        return
    block = min(_BYTES_PER_PROGRAM // width, triton.next_power_of_2(longest_row))
    chunks = triton.cdiv(longest_row, block)
    if num_regions > _MAX_GRID_YZ or chunks > _MAX_GRID_YZ:
        raise ValueError(f"{num_regions} regions x {chunks} chunks per row exceed the launch grid")
    device = next((view.device for view in views if view.device.type == "cuda"), torch.device("cpu"))
    # Triton launches on the current device: make it the views' one.
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        # One host-to-device transfer for the table and the ids together.
        arguments = stage_int64([region_table, src_ids, dst_ids], device)
        copy_blocks_kernel[(num_pairs, num_regions, chunks)](
            arguments,
            arguments[len(region_table) :],
            num_regions,
            num_pairs,
            UNIT=_UNITS[width],
            ALIGN=align,
            BLOCK=block,
        )


# %%
# Correctness check
# -----------------
# Random bytes (NaN patterns included: bytes are bytes), several regions with different row
# strides, random non-contiguous ids, compared with torch indexing.


def check_against_torch(device: torch.device | str = "cpu", seed: int = 0) -> None:
    """Raise AssertionError unless the kernel matches ``dst[ids] = src[ids]``.

    Sources are on ``device``; on CUDA every other destination is pinned host memory.
    """
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    row_bytes, src_blocks, dst_blocks = 48, 11, 7
    src = [
        torch.randint(0, 256, (src_blocks, row_bytes + pad), dtype=torch.uint8, generator=generator)[
            :, :row_bytes
        ]
        for pad in (0, 8, 16)
    ]
    dst = [
        torch.randint(0, 256, (dst_blocks, row_bytes), dtype=torch.uint8, generator=generator) for _ in src
    ]
    src_ids = torch.randperm(src_blocks, generator=generator)[:5]
    dst_ids = torch.randperm(dst_blocks, generator=generator)[:5]
    expected = [view.clone() for view in dst]
    for src_view, expected_view in zip(src, expected, strict=True):
        expected_view[dst_ids] = src_view[src_ids]
    on_device_src = [view.to(device) for view in src]
    on_device_dst = [
        view.pin_memory() if device.type == "cuda" and index % 2 else view.to(device)
        for index, view in enumerate(dst)
    ]
    copy_blocks_triton(on_device_src, on_device_dst, src_ids, dst_ids)
    for region, (got, want) in enumerate(zip(on_device_dst, expected, strict=True)):
        assert torch.equal(got.cpu(), want), f"region {region} differs from torch indexing"


if __name__ == "__main__":
    if not torch.cuda.is_available() and not is_interpreted():
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 to check the kernel in Triton's interpreter")
    check_against_torch("cuda" if torch.cuda.is_available() else "cpu")
    print("triton block copy matches torch indexing")
    if torch.cuda.is_available():
        print("bandwidth: vllm-bidkv bench copy --backends triton per_block torch")

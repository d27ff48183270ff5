"""KV cache tensors as *block views*: 2-D uint8 tensors with one row of bytes per block.

Every copy in this package works on block views, so it never needs to know an attention
backend's layout. A block view ``v`` of a cache with ``num_blocks`` blocks has shape
``[num_blocks, row_bytes]``, ``v.stride(1) == 1`` (a row is contiguous bytes) and
``v.stride(0) >= row_bytes`` (rows of different blocks never overlap). One cache tensor gives
one view per *region*: the parts of a block that are not contiguous with each other, e.g. the
K half and the V half of ``[2, num_blocks, ...]``.

Host memory lives here too: the CPU tier's page-locked arena (``allocate_like``, undone by
``release_pinned``), whether a kernel can dereference a host view (``unaddressable_reason``),
and small argument tables staged for the device without blocking the host (``stage_int64``).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

logger = logging.getLogger("vllm_bidkv")

# cudaHostRegisterPortable | cudaHostRegisterMapped: page-locked for every context, and mapped
# into the device address space, so that kernels can dereference it.
_HOST_REGISTER_PORTABLE_MAPPED = 3
_CU_POINTER_ATTRIBUTE_DEVICE_POINTER = 3


def block_views(
    kv_cache: torch.Tensor, num_blocks: int, *, block_dim: int | None = None
) -> list[torch.Tensor]:
    """Turn one per-layer KV cache tensor into block views (see the module docstring).

    Handled layouts, read from the tensor's sizes and strides (so permuted stride orders work):

    * block dim first, ``[num_blocks, ...]`` (the CPU backend's
      ``[num_blocks, kv_heads, block_size, 2 * head_size]``, FlashInfer's ``[num_blocks, 2, ...]``,
      cross-layer ``[num_blocks, layers, ...]``): one view;
    * K/V split first, ``[2, num_blocks, ...]`` (FlashAttention): two views, K then V;
    * in general, any dims outside the block's contiguous bytes each split the block into
      regions, giving one view per index of those dims (in row-major order of the logical dims).

    The block dim is ``block_dim`` if given, else the dim of size ``num_blocks``; when several
    dims have that size the outermost in memory is taken (vLLM's block dim is outermost except
    for a leading K/V dim of size 2). With ``num_blocks <= 2`` that guess is unsafe, so several
    candidates raise unless ``block_dim`` is given.

    The views alias ``kv_cache``'s storage. Raises ValueError naming the shape when no dim has
    size ``num_blocks``, or when a block's bytes are not contiguous rows (the innermost dim is
    strided, or blocks overlap in memory).
    """
    shape, strides = tuple(kv_cache.shape), kv_cache.stride()
    described = f"KV cache of shape {shape} (strides {strides}, dtype {kv_cache.dtype})"
    block_dim = _find_block_dim(shape, strides, num_blocks, block_dim, described)
    element_bytes = kv_cache.element_size()
    block_stride = strides[block_dim] * element_bytes

    # Non-block dims from innermost to outermost in memory; the leading ones that tile
    # contiguously form a row, the rest are region dims.
    other_dims = sorted(
        (d for d in range(len(shape)) if d != block_dim and shape[d] > 1),
        key=lambda d: (strides[d], d),
    )
    row_bytes = element_bytes
    row_dims: set[int] = set()
    for d in other_dims:
        if strides[d] * element_bytes != row_bytes:
            break
        row_dims.add(d)
        row_bytes *= shape[d]
    region_dims = [d for d in range(len(shape)) if d not in row_dims and d != block_dim and shape[d] > 1]
    if other_dims and not row_dims:
        raise ValueError(
            f"{described}: the innermost non-block dim is not contiguous, so a block's bytes "
            "are single elements rather than rows"
        )
    _check_no_overlap(
        row_bytes,
        [(num_blocks, block_stride)] + [(shape[d], strides[d] * element_bytes) for d in region_dims],
        described,
    )

    storage_bytes = torch.empty(0, dtype=torch.uint8, device=kv_cache.device).set_(kv_cache.untyped_storage())
    base_offset = kv_cache.storage_offset() * element_bytes
    views = []
    for region_index in range(math.prod(shape[d] for d in region_dims)):
        offset = base_offset
        for d in reversed(region_dims):
            region_index, index_in_dim = divmod(region_index, shape[d])
            offset += index_in_dim * strides[d] * element_bytes
        views.append(storage_bytes.as_strided((num_blocks, row_bytes), (block_stride, 1), offset))
    return views


def allocate_like(
    views: Sequence[torch.Tensor], num_blocks: int, device: torch.device | str, pin_memory: bool
) -> list[torch.Tensor]:
    """CPU-tier buffers for ``views``: one dense ``[num_blocks, row_bytes]`` uint8 tensor per view.

    All of them are slices of ONE allocation of ``num_blocks × Σ row_bytes`` bytes, so the
    tier takes what it is sized to and no more. The contents are uninitialized (on the
    host the pages are taken as the tier fills). ``pin_memory`` page-locks that one host
    buffer with a single ``cudaHostRegister``, mapped into the device address space, so that
    CUDA copies (DMA, or the Triton kernel dereferencing its host addresses) can use it;
    torch's pinned allocator is not used because it rounds each allocation up to a power of
    two (up to 2× the bytes). It needs a CUDA build of torch. The registration is undone
    when the last tensor over the buffer is freed, or earlier by ``release_pinned``.
    """
    for index, view in enumerate(views):
        if view.dim() != 2 or view.dtype != torch.uint8:
            raise ValueError(
                f"views[{index}] has shape {tuple(view.shape)} and dtype {view.dtype}; "
                "expected a 2-D uint8 block view"
            )
    if num_blocks < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    device = torch.device(device)
    if pin_memory and device.type != "cpu":
        raise ValueError(f"pin_memory applies to host buffers, not device {device}")
    rows = [int(view.shape[1]) for view in views]
    size = num_blocks * sum(rows)
    if pin_memory and size:
        arena = _pinned_arena(size)
    else:
        arena = torch.empty(size, dtype=torch.uint8, device=device)
    out, offset = [], 0
    for row in rows:
        out.append(arena[offset : offset + num_blocks * row].view(num_blocks, row))
        offset += num_blocks * row
    return out


@dataclass(frozen=True)
class _Registration:
    """One arena page-locked by ``allocate_like``."""

    unregister: weakref.finalize  # runs once: at release_pinned, or when the arena is freed
    unaddressable: str  # why a kernel cannot dereference its host addresses ("" when it can)


# By base address. An entry leaves before its memory is freed, so a later arena at the same
# address is never mistaken for it.
_registrations: dict[int, _Registration] = {}


def _pinned_arena(size: int) -> torch.Tensor:
    """``size`` bytes of page-locked host memory, mapped into the device address space."""
    # numpy owns the memory so that its end is observable: the tensors over it keep the array
    # alive, and the array's finalizer runs before the memory is freed.
    owner = np.empty(size, dtype=np.uint8)
    base = owner.ctypes.data
    err = torch.cuda.cudart().cudaHostRegister(base, size, _HOST_REGISTER_PORTABLE_MAPPED)
    if int(err) != 0:  # cudaSuccess
        raise RuntimeError(f"cudaHostRegister of {size} bytes failed: error {int(err)}")
    unregister = weakref.finalize(owner, _unregister, base)
    # At exit the OS unlocks the pages anyway; unregistering a large tier would only delay exit.
    unregister.atexit = False
    _registrations[base] = _Registration(unregister, _mapping_reason(base))
    return torch.from_numpy(owner)


def _unregister(base: int) -> None:
    _registrations.pop(base, None)
    err = torch.cuda.cudart().cudaHostUnregister(base)
    if int(err) != 0:  # runs from the garbage collector too, where raising would only print
        logger.warning("vllm-bidkv: cudaHostUnregister of the CPU tier failed: error %d", int(err))


def release_pinned(buffers: torch.Tensor | Sequence[torch.Tensor]) -> int:
    """Undo the page-locking of the arenas under ``buffers`` (from ``allocate_like(pin_memory=True)``).

    Call it at shutdown, once the copies that use the buffers have completed (their stream was
    synchronized or their events queried done): otherwise the pages stay locked until the last
    tensor over them is freed. The buffers stay valid, as pageable memory, which copies then
    move synchronously and the Triton kernel refuses. Idempotent; tensors over other memory are
    ignored.

    Args:
        buffers: a tensor or tensors over the arenas, e.g. every tier buffer ``allocate_like``
            returned.

    Returns:
        How many arenas this call unregistered (0 when all were already released).
    """
    tensors = [buffers] if isinstance(buffers, torch.Tensor) else buffers
    released = 0
    for tensor in tensors:
        registration = _registrations.get(tensor.untyped_storage().data_ptr())
        if registration is not None and registration.unregister.alive:
            registration.unregister()
            released += 1
    return released


def unaddressable_reason(host_view: torch.Tensor) -> str:
    """Why a CUDA kernel cannot dereference ``host_view``'s host addresses ("" when it can).

    That takes page-locked memory mapped into the device address space at its host address:
    ``cudaHostAlloc`` memory (torch's ``pin_memory``) under unified addressing, or
    ``cudaHostRegister`` memory registered mapped on a device that can use host pointers for
    registered memory. ``is_pinned()`` alone does not tell. Arenas from ``allocate_like`` were
    checked when registered; other pinned memory is asked of the CUDA driver, in the current
    thread's context.
    """
    registration = _registrations.get(host_view.untyped_storage().data_ptr())
    if registration is not None:
        return registration.unaddressable
    if not host_view.is_pinned():
        return "it is pageable host memory"
    return _mapping_reason(host_view.data_ptr())


@functools.cache
def _cuda_driver() -> ctypes.CDLL:
    # The driver, not the runtime: its library name does not change with the CUDA version.
    driver = ctypes.CDLL("libcuda.so.1")
    driver.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    driver.cuPointerGetAttribute.restype = ctypes.c_int
    return driver


def _mapping_reason(host_pointer: int) -> str:
    """Why kernels in the current context cannot dereference ``host_pointer`` ("" when they can)."""
    try:
        driver = _cuda_driver()
    except OSError as error:
        return f"the CUDA driver library is not loadable ({error})"
    device_pointer = ctypes.c_uint64()
    status = driver.cuPointerGetAttribute(
        ctypes.byref(device_pointer), _CU_POINTER_ATTRIBUTE_DEVICE_POINTER, host_pointer
    )
    if status != 0:  # CUDA_SUCCESS
        return f"it is not mapped into the device address space (cuPointerGetAttribute error {status})"
    if device_pointer.value != host_pointer:
        return "the device maps it at another address (no host pointers for registered memory)"
    return ""


def stage_int64(parts: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """The int64 ``parts``, concatenated, as one tensor on ``device``, without blocking the host.

    For CUDA the values go through page-locked host memory with an asynchronous copy on the
    current stream: from pageable memory the copy would wait for the stream's earlier work. The
    staging buffer comes from torch's pinned caching allocator, which records the copy on it
    and reuses it only once the copy is done, so the host never waits for that either.

    Args:
        parts: 1-D integer arrays (or sequences).
        device: where the result lives; on the CPU the staging tensor itself is returned.

    Returns:
        A 1-D int64 tensor of ``sum(len(part))`` values.
    """
    host = torch.empty(sum(len(part) for part in parts), dtype=torch.int64, pin_memory=device.type == "cuda")
    np.concatenate([np.asarray(part, dtype=np.int64) for part in parts], out=host.numpy())
    return host.to(device, non_blocking=True)


def widest_alignment(values: Sequence[int], limit: int) -> int:
    """Largest power of two ``<= limit`` dividing every value: the widest element (in bytes) that
    rows with these base addresses, strides and lengths can be copied as."""
    width = limit
    for value in values:
        while value % width:
            width //= 2
    return width


def _find_block_dim(
    shape: tuple[int, ...], strides: tuple[int, ...], num_blocks: int, block_dim: int | None, described: str
) -> int:
    if block_dim is not None:
        if not -len(shape) <= block_dim < len(shape) or shape[block_dim] != num_blocks:
            raise ValueError(f"{described}: block_dim={block_dim} does not have size num_blocks={num_blocks}")
        return block_dim % len(shape)
    candidates = [d for d, size in enumerate(shape) if size == num_blocks]
    if not candidates:
        raise ValueError(f"{described}: no dim has size num_blocks={num_blocks}")
    if len(candidates) > 1 and num_blocks <= 2:
        raise ValueError(
            f"{described}: dims {candidates} all have size num_blocks={num_blocks}; pass block_dim to choose"
        )
    return max(candidates, key=lambda d: (strides[d], -d))


def _check_no_overlap(row_bytes: int, dims: list[tuple[int, int]], described: str) -> None:
    """Raise unless rows of ``row_bytes`` placed at every combination of (size, byte stride)
    ``dims`` are disjoint. Sufficient test: in stride order, each stride clears the extent
    spanned by the rows and the smaller-stride dims."""
    extent = row_bytes
    for size, stride in sorted((d for d in dims if d[0] > 1), key=lambda d: d[1]):
        if stride < extent:
            raise ValueError(
                f"{described}: blocks/regions overlap in memory "
                f"(stride {stride} bytes < extent {extent} bytes)"
            )
        extent += stride * (size - 1)

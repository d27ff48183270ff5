"""KV cache tensors as *block views*: 2-D uint8 tensors with one row of bytes per block.

Every copy in this package works on block views, so it never needs to know an attention
backend's layout. A block view ``v`` of a cache with ``num_blocks`` blocks has shape
``[num_blocks, row_bytes]``, ``v.stride(1) == 1`` (a row is contiguous bytes) and
``v.stride(0) >= row_bytes`` (rows of different blocks never overlap). One cache tensor gives
one view per *region*: the parts of a block that are not contiguous with each other, e.g. the
K half and the V half of ``[2, num_blocks, ...]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


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
    buffer with a single ``cudaHostRegister`` so that CUDA copies (DMA, or the Triton kernel
    reading it through unified addressing) can use it; torch's pinned allocator is not
    used because it rounds each allocation up to a power of two (up to 2× the bytes).
    It needs an accelerator build of torch.
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
    arena = torch.empty(num_blocks * sum(rows), dtype=torch.uint8, device=device)
    if pin_memory and arena.numel():
        _register_pinned(arena)
    out, offset = [], 0
    for row in rows:
        out.append(arena[offset : offset + num_blocks * row].view(num_blocks, row))
        offset += num_blocks * row
    return out


def _register_pinned(buffer: torch.Tensor) -> None:
    """Page-lock ``buffer`` in place, once (CUDA only; it stays registered for the process)."""
    err = torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)
    if int(err) != 0:  # cudaSuccess
        raise RuntimeError(f"cudaHostRegister of {buffer.numel()} bytes failed: error {int(err)}")


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

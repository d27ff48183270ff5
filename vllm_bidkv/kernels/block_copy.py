"""copy_blocks: the single entry point for every KV block copy (store, load, device to device).

Inputs are block views (see :mod:`vllm_bidkv.kernels.layout`). The copy is validated here, then
runs on one of two backends:

* ``"triton"`` (:mod:`vllm_bidkv.kernels.triton_copy`): one kernel launch for all regions and
  pairs; CUDA tensors, plus pinned host tensors, which the kernel reads and writes through
  unified addressing. Runs on CPU tensors only under ``TRITON_INTERPRET=1`` (tests).
* ``"torch"`` (:mod:`vllm_bidkv.kernels.torch_copy`): any device or device pair; host-to-host
  copies (a CPU-only vLLM) move rows through numpy views of the same memory, on the calling
  thread plus a small pool.

``"auto"`` picks triton when a view is on CUDA and the kernel can address every view, torch
otherwise. If triton fails to import, compile or launch, ``auto`` logs one warning and copies
with torch from then on, in this process; ``"triton"`` raises instead.
"""

from __future__ import annotations

import logging
import operator
import threading
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from vllm_bidkv.kernels.torch_copy import copy_blocks_torch

logger = logging.getLogger("vllm_bidkv")

Backend = Literal["auto", "triton", "torch"]
BACKENDS: tuple[Backend, ...] = ("auto", "triton", "torch")

# Why triton failed, once it has: "auto" then goes straight to torch. A compile failure is
# not transient, and retrying would cost a compile attempt and a traceback per copy.
_triton_failure: str | None = None
_triton_failure_lock = threading.Lock()


def copy_blocks(
    src: Sequence[torch.Tensor],
    dst: Sequence[torch.Tensor],
    src_block_ids: Sequence[int] | torch.Tensor,
    dst_block_ids: Sequence[int] | torch.Tensor,
    backend: Backend = "auto",
) -> None:
    """For every region r and pair k: ``dst[r][dst_block_ids[k]] = src[r][src_block_ids[k]]``.

    ``src``/``dst``: equal-length lists of block views (2-D uint8, contiguous rows), with equal
    row sizes per region; e.g. from ``block_views`` or ``allocate_like``. Ids are validated on
    the host (a CUDA id tensor costs a sync; pass lists or CPU tensors). Raises ValueError for:
    mismatched list lengths, row sizes or dtypes; id lists of different lengths; ids out of
    range (naming the id and the range); a destination id given twice; a view that is both
    read and written at the same block (the copy order would be undefined). Empty id lists are
    a no-op. Copies touching CUDA (the kernel, or torch's device ops and DMA, host memory
    included) are issued on the current stream without waiting for it, and are done when the
    stream gets there: the caller orders them against compute and waits (an event) before
    reading a host destination. They wait for nothing when host views are pinned. Host-to-host
    copies are done when this returns.

    ``backend="triton"`` raises ValueError when the kernel cannot address the views (or
    triton is missing) and RuntimeError when it fails to compile or launch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    src_ids, dst_ids = _validated_ids(src, dst, src_block_ids, dst_block_ids)
    if src_ids.size == 0:
        return
    use_triton = backend == "triton" or (
        backend == "auto" and _triton_failure is None and _has_cuda_view([*src, *dst])
    )
    if not (use_triton and _copied_by_triton(src, dst, src_ids, dst_ids, required=backend == "triton")):
        copy_blocks_torch(src, dst, src_ids, dst_ids)


def _has_cuda_view(views: Sequence[torch.Tensor]) -> bool:
    return any(view.is_cuda for view in views)


def _copied_by_triton(
    src: Sequence[torch.Tensor],
    dst: Sequence[torch.Tensor],
    src_ids: np.ndarray,
    dst_ids: np.ndarray,
    *,
    required: bool,
) -> bool:
    """Run the copy with the Triton kernel if it can be.

    Args:
        required: ``backend="triton"`` was asked for: raise rather than return False.

    Returns:
        True once the kernel is launched; False when the torch path must do the copy: the
        kernel cannot address the views, or triton failed to import, compile or launch (then
        remembered, with one warning, so that "auto" does not try triton again).

    Raises:
        ValueError: required, and the kernel cannot address the views or triton is missing.
        RuntimeError: required, and the kernel failed to compile or launch.
    """
    try:
        from vllm_bidkv.kernels import triton_copy
    except ImportError as error:
        if required:
            raise ValueError(
                f"backend='triton' cannot run this copy: triton is not importable ({error})"
            ) from error
        _give_up_on_triton(f"triton is not importable ({error})")
        return False
    reason = triton_copy.unsupported_reason([*src, *dst])
    if reason:
        if required:
            raise ValueError(f"backend='triton' cannot run this copy: {reason}")
        return False
    try:
        triton_copy.copy_blocks_triton(src, dst, src_ids, dst_ids)
    except Exception as error:  # whatever Triton raised, the torch path can still do the copy
        if required:
            raise RuntimeError(
                f"backend='triton': the kernel failed to compile or launch: {error}"
            ) from error
        _give_up_on_triton(f"the Triton kernel failed to compile or launch ({type(error).__name__}: {error})")
        return False
    return True


def _give_up_on_triton(reason: str) -> None:
    global _triton_failure
    with _triton_failure_lock:
        if _triton_failure is not None:
            return
        _triton_failure = reason
    logger.warning("vllm-bidkv: %s; block copies use the torch backend from now on", reason)


def _validated_ids(
    src: Sequence[torch.Tensor],
    dst: Sequence[torch.Tensor],
    src_block_ids: Sequence[int] | torch.Tensor,
    dst_block_ids: Sequence[int] | torch.Tensor,
) -> tuple[np.ndarray, np.ndarray]:
    """Check views and ids; return the ids as 1-D int64 numpy arrays.

    Id bookkeeping uses numpy: it never enters an OpenMP region, whose thread barriers cost
    milliseconds when other processes hold the cores.
    """
    if len(src) != len(dst):
        raise ValueError(f"src has {len(src)} block views but dst has {len(dst)}")
    for side, views in (("src", src), ("dst", dst)):
        for index, view in enumerate(views):
            _check_view(view, f"{side}[{index}]")
    for index, (src_view, dst_view) in enumerate(zip(src, dst, strict=True)):
        if src_view.shape[1] != dst_view.shape[1]:
            raise ValueError(
                f"region {index}: src rows are {src_view.shape[1]} bytes "
                f"but dst rows are {dst_view.shape[1]} bytes"
            )
    src_ids = _as_id_array(src_block_ids, "src_block_ids")
    dst_ids = _as_id_array(dst_block_ids, "dst_block_ids")
    if src_ids.size != dst_ids.size:
        raise ValueError(f"src_block_ids has {src_ids.size} ids but dst_block_ids has {dst_ids.size}")
    if src_ids.size == 0:
        return src_ids, dst_ids
    _check_range(src_ids, src, "src")
    _check_range(dst_ids, dst, "dst")
    sorted_dst = np.sort(dst_ids)
    repeated = sorted_dst[1:][sorted_dst[1:] == sorted_dst[:-1]]
    if repeated.size:
        raise ValueError(f"dst_block_ids repeats block {repeated[0]}; each destination block is written once")
    for index, (src_view, dst_view) in enumerate(zip(src, dst, strict=True)):
        if src_view.data_ptr() == dst_view.data_ptr() and src_view.stride(0) == dst_view.stride(0):
            both = np.intersect1d(sorted_dst, src_ids)
            if both.size:
                raise ValueError(
                    f"region {index}: src and dst are the same view and block {both[0]} is both "
                    "read and written; the copy order would be undefined"
                )
    return src_ids, dst_ids


def _check_view(view: torch.Tensor, name: str) -> None:
    if not isinstance(view, torch.Tensor):
        raise ValueError(f"{name} is a {type(view).__name__}, not a torch.Tensor block view")
    if view.dtype != torch.uint8:
        raise ValueError(
            f"{name} has dtype {view.dtype}; block views are uint8 (bytes are bytes): use block_views()"
        )
    if view.dim() != 2:
        raise ValueError(f"{name} has shape {tuple(view.shape)}; block views are 2-D [num_blocks, row_bytes]")
    if view.shape[1] > 1 and view.stride(1) != 1:
        raise ValueError(f"{name} has strides {view.stride()}; rows must be contiguous bytes")
    if view.shape[0] > 1 and view.stride(0) < view.shape[1]:
        raise ValueError(f"{name} has row stride {view.stride(0)} < row length {view.shape[1]}; rows overlap")


def _as_id_array(ids: Sequence[int] | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(
                f"{name} must be a 1-D integer tensor, got shape {tuple(ids.shape)} dtype {ids.dtype}"
            )
        return ids.to(device="cpu", dtype=torch.int64).numpy()
    try:
        return np.fromiter((operator.index(block_id) for block_id in ids), dtype=np.int64, count=len(ids))
    except TypeError as error:
        raise ValueError(f"{name} must hold integers: {error}") from None


def _check_range(ids: np.ndarray, views: Sequence[torch.Tensor], side: str) -> None:
    if not views:
        return
    limit_index = min(range(len(views)), key=lambda index: views[index].shape[0])
    limit = views[limit_index].shape[0]
    outside = np.flatnonzero((ids < 0) | (ids >= limit))
    if outside.size:
        position = outside[0]
        raise ValueError(
            f"{side}_block_ids[{position}] = {ids[position]} is out of range [0, {limit}) "
            f"({side}[{limit_index}] has {limit} blocks)"
        )

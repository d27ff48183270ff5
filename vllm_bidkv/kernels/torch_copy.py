"""The torch backend of ``copy_blocks``: no Triton, any device or device pair.

CUDA and cross-device copies (the Triton kernel's leftovers) never wait for the GPU: a store or
a load touches the host side only by asynchronous DMA, one per run of consecutive host rows
(the tier's slots are one run), and gathers or scatters on the device; CUDA-to-CUDA copies
are a torch gather and scatter. Ids reach the device through pinned memory. With a pageable
host side the DMA itself waits (CUDA stages pageable memory synchronously).

Host-to-host copies, i.e. every copy of a CPU-only vLLM, take the path below. Each
choice was measured with ``vllm_bidkv_bench.copy`` and scratch variants on a 2-core box
shared with other jobs, at 256 random blocks x 64 KiB x 8 regions:

* Rows move through numpy views of the same memory (``Tensor.numpy()``, zero-copy), 2-D
  uint8: numpy's fancy indexing copies each row with one memcpy-like loop and releases the GIL.
  A gather plus scatter ran 16-17 GB/s on one core, against 9-12 GB/s for torch's
  ``index_select`` + ``index_copy_`` (the latter moves one element, at most 16 bytes, per
  step). Rows as numpy ``void`` elements, or a structured dtype whose fields are the rows (a
  one-pass copy), hold the GIL and so use one core.
* No GIL-free op gathers and scatters in one pass, so random pairs are copied
  ``dst[dst_ids] = src[src_ids]`` in jobs of ``_JOB_BYTES``: the gathered temporary stays in
  cache for the scatter. A run of consecutive ids on either side is a slice, which needs one
  pass: a gather into it or a scatter from it (0.77-0.83 of memcpy where random ids got 0.63,
  same run). ``CpuBlockTier`` hands out slots in runs, so the tier side of a store or a load is
  one; ``vllm-bidkv bench copy`` measures both patterns (``--ids tier random``): medians of 11
  runs at load 3-8, tier 0.80 (store) and 0.91 (load) of memcpy, random 0.59 and 0.56.
* Jobs are run by ``torch.get_num_threads()`` threads (the caller plus a pool) taking the next
  job from a shared counter. Torch ops would instead parallelize each op with OpenMP, whose
  barrier waits for a descheduled thread when other processes hold the cores: under such load
  they reached 0.03-0.11 of memcpy where these jobs reached 0.45-0.64; with the cores to
  itself (SCHED_FIFO) torch measured 0.48-0.66 and these jobs 0.40-0.63, the memcpy reference
  itself varying from 23 to 47 GB/s.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import numpy as np
import torch

from vllm_bidkv.kernels.layout import stage_int64, widest_alignment

_UNITS = {16: torch.complex128, 8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}
# Bytes per host job: a core's L2, so the staged rows stay in cache between gather and scatter,
# while the fixed cost of a job (~10 us of Python) stays small. Measured with the cores to
# itself (memcpy 44 GB/s): 256 KiB 14.6, 512 KiB 18.4, 1 MiB 20.3, 2 MiB 21.2, 4 MiB 23.0 GB/s;
# larger jobs balance worse when a thread is descheduled.
_JOB_BYTES = 2 << 20
# A run of consecutive ids is copied as slices when it spans at least this many bytes per
# region (or holds every remaining pair); shorter runs are staged with the rest, so that runs
# do not multiply jobs. Chosen, not tuned: the benchmark's tier ids are one run, its random
# ids have none.
_MIN_RUN_BYTES = 1 << 20
# Bytes each extra thread must have to copy before it is woken: a handoff costs about as much
# as copying ~1 MiB, so small copies run on the caller alone.
_BYTES_PER_THREAD = 4 << 20
# Bound on the temporary of the gather/scatter on accelerators.
_DEVICE_STAGING_BYTES = 64 << 20

Job = Callable[[], None]


def copy_blocks_torch(
    src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor], src_ids: np.ndarray, dst_ids: np.ndarray
) -> None:
    """``dst[r][dst_ids[k]] = src[r][src_ids[k]]`` for all regions r and pairs k.

    Expects what ``copy_blocks`` validated: equal-length lists of 2-D uint8 views with contiguous
    rows and equal row sizes per region; non-empty int64 id arrays of equal length, in range,
    destinations distinct, and no block both read and written in one view.
    """
    row_bytes = max(1, max(view.shape[1] for view in src))
    plan = _RunPlan(src_ids, dst_ids, min_run=max(2, _MIN_RUN_BYTES // row_bytes))
    host_jobs: list[Job] = []
    host_bytes = 0
    for src_view, dst_view in zip(src, dst, strict=True):
        if src_view.shape[1] == 0:
            continue
        if src_view.device.type == "cpu" and dst_view.device.type == "cpu":
            host_jobs.extend(_host_jobs(_as_rows(src_view), _as_rows(dst_view), plan))
            host_bytes += src_view.shape[1] * src_ids.size
        else:
            _copy_on_devices(src_view, dst_view, src_ids, dst_ids)
    _run_jobs(host_jobs, threads=min(torch.get_num_threads(), 1 + host_bytes // _BYTES_PER_THREAD))


def _as_rows(view: torch.Tensor) -> np.ndarray:
    """The block view as a 2-D uint8 numpy array over the same memory."""
    return view.numpy()


class _RunPlan:
    """The pairs split into runs and the rest, once per call for all regions.

    ``runs``: (source ids, first source id, destination ids, first destination id) per run of
    pairs whose ids are consecutive on at least one side, in that side's order; a first id is
    None where that side's ids are not consecutive. ``staged``: (source ids, destination ids)
    of the pairs left. A run counts when it has at least ``min_run`` pairs or holds every pair
    not yet in a run (so a single pair is one slice copy).

    The side whose runs hold more pairs is split first, the other side only among the pairs
    left: a run on one side (a tier's slots) is one pass whatever the other side's ids, and a
    chance run among the other side's random ids cannot cut it into pieces under ``min_run``.
    """

    def __init__(self, src_ids: np.ndarray, dst_ids: np.ndarray, min_run: int) -> None:
        everything = np.arange(src_ids.size)
        (src_runs, src_rest), (dst_runs, dst_rest) = (
            _runs(ids, everything, min_run) for ids in (src_ids, dst_ids)
        )
        if src_rest.size < dst_rest.size:
            runs, rest = src_runs, src_rest
            other_ids = dst_ids
        else:  # on a tie, destinations first: then one gather per run, no scatter
            runs, rest = dst_runs, dst_rest
            other_ids = src_ids
        other_runs, rest = _runs(other_ids, rest, min_run)
        self.runs = [
            (src_ids[run], _run_start(src_ids[run]), dst_ids[run], _run_start(dst_ids[run]))
            for run in (*runs, *other_runs)
        ]
        self.staged = (src_ids[rest], dst_ids[rest])


def _runs(ids: np.ndarray, positions: np.ndarray, min_run: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Split ``positions`` (indices into ``ids``) into runs where ``ids`` are consecutive.

    Returns the positions, in id order, of each run of at least ``min_run`` pairs or of all of
    them, and the positions left over.
    """
    count = positions.size
    if count == 0:
        return [], positions
    sorted_positions = positions[np.argsort(ids[positions], kind="stable")]
    sorted_ids = ids[sorted_positions]
    starts_run = np.ones(count, dtype=bool)
    starts_run[1:] = sorted_ids[1:] != sorted_ids[:-1] + 1
    run_of = np.cumsum(starts_run) - 1
    run_lengths = np.bincount(run_of)
    long_enough = (run_lengths >= min_run) | (run_lengths == count)
    run_starts = np.flatnonzero(starts_run)
    runs = [
        sorted_positions[run_starts[run] : run_starts[run] + run_lengths[run]]
        for run in np.flatnonzero(long_enough)
    ]
    return runs, sorted_positions[~long_enough[run_of]]


def _run_start(ids: np.ndarray) -> int | None:
    """First id if ``ids`` is ``a, a+1, a+2, ...``, else None."""
    if ids.size > 1 and not bool((np.diff(ids) == 1).all()):
        return None
    return int(ids[0])


def _host_jobs(src_rows: np.ndarray, dst_rows: np.ndarray, plan: _RunPlan) -> Iterator[Job]:
    """Jobs of at most ``_JOB_BYTES`` for one region (numpy rows; overlapping memory within one
    storage is handled by numpy's own overlap checks). A run is one pass: a slice copy, a
    gather into a destination slice or a scatter from a source slice."""
    per_job = max(1, _JOB_BYTES // src_rows.shape[1])
    for src_ids, src_start, dst_ids, dst_start in plan.runs:
        for first in range(0, src_ids.size, per_job):
            last = min(first + per_job, src_ids.size)
            if dst_start is not None and src_start is not None:
                out, source = (
                    dst_rows[dst_start + first : dst_start + last],
                    src_rows[src_start + first : src_start + last],
                )
                yield functools.partial(np.copyto, out, source)
            elif dst_start is not None:
                out = dst_rows[dst_start + first : dst_start + last]
                yield functools.partial(_gather, src_rows, src_ids[first:last], out)
            else:
                assert src_start is not None  # a run is consecutive on at least one side
                source = src_rows[src_start + first : src_start + last]
                yield functools.partial(_scatter, dst_rows, dst_ids[first:last], source)
    staged_src, staged_dst = plan.staged
    for first in range(0, staged_src.size, per_job):
        yield functools.partial(
            _gather_scatter,
            src_rows,
            staged_src[first : first + per_job],
            dst_rows,
            staged_dst[first : first + per_job],
        )


def _gather(src_rows: np.ndarray, src_ids: np.ndarray, out: np.ndarray) -> None:
    if src_rows.flags.c_contiguous and out.flags.c_contiguous:
        # One pass. take would copy a non-contiguous source whole first; "clip" skips take's
        # buffering of out, and never clips since ids were range-checked.
        np.take(src_rows, src_ids, axis=0, out=out, mode="clip")
    else:
        out[:] = src_rows[src_ids]


def _scatter(dst_rows: np.ndarray, dst_ids: np.ndarray, rows: np.ndarray) -> None:
    dst_rows[dst_ids] = rows


def _gather_scatter(
    src_rows: np.ndarray, src_ids: np.ndarray, dst_rows: np.ndarray, dst_ids: np.ndarray
) -> None:
    dst_rows[dst_ids] = src_rows[src_ids]


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _worker_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(1, torch.get_num_threads() - 1), thread_name_prefix="bidkv-copy"
            )
        return _pool


def _forget_pool_after_fork() -> None:
    """A forked child has none of the parent's threads; it makes its own pool on first use."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _run_jobs(jobs: list[Job], threads: int) -> None:
    """Run ``jobs`` on the calling thread and ``threads - 1`` pool threads (at most one per job).

    Threads take the next job from a shared counter (``next`` on ``itertools.count`` is atomic
    under the GIL), so a thread slowed by another process simply takes fewer jobs.
    """
    helpers = min(threads, len(jobs)) - 1
    next_job = itertools.count()

    def work() -> None:
        for index in next_job:
            if index >= len(jobs):
                return
            jobs[index]()

    futures = [_worker_pool().submit(work) for _ in range(helpers)]
    try:
        work()
    finally:
        wait(futures)
    for future in futures:
        future.result()


def _copy_on_devices(
    src_view: torch.Tensor, dst_view: torch.Tensor, src_ids: np.ndarray, dst_ids: np.ndarray
) -> None:
    """One region's rows between devices or within one (CUDA, or CUDA and the host).

    Rows are moved as the widest element their alignment allows (index_copy_ moves one element
    per step), at most ``_DEVICE_STAGING_BYTES`` per device temporary."""
    views = (src_view, dst_view)
    # view(dtype) needs the storage offset aligned too, not just the address.
    addresses = [int(number) for view in views for number in (view.data_ptr(), view.storage_offset())]
    unit = _UNITS[
        widest_alignment([src_view.shape[1], *addresses, *(view.stride(0) for view in views)], limit=16)
    ]
    rows_per_chunk = max(1, _DEVICE_STAGING_BYTES // src_view.shape[1])
    if src_view.device.type == "cpu":
        move = _load_runs
    elif dst_view.device.type == "cpu":
        move = _store_runs
    else:
        move = _gather_move_scatter
    move(src_view.view(unit), dst_view.view(unit), src_ids, dst_ids, rows_per_chunk)


def _gather_move_scatter(
    src: torch.Tensor, dst: torch.Tensor, src_ids: np.ndarray, dst_ids: np.ndarray, rows_per_chunk: int
) -> None:
    """Device to device: gather on the source device, move, scatter on the destination device."""
    src_index = stage_int64([src_ids], src.device)
    dst_index = stage_int64([dst_ids], dst.device)
    for first in range(0, src_ids.size, rows_per_chunk):
        staged = torch.index_select(src, 0, src_index[first : first + rows_per_chunk])
        dst.index_copy_(
            0, dst_index[first : first + rows_per_chunk], staged.to(dst.device, non_blocking=True)
        )


def _store_runs(
    src: torch.Tensor, dst: torch.Tensor, src_ids: np.ndarray, dst_ids: np.ndarray, rows_per_chunk: int
) -> None:
    """Device to host: gather on the device in destination order, then one DMA per run of
    consecutive destination rows."""
    order = np.argsort(dst_ids, kind="stable")
    src_index = stage_int64([src_ids[order]], src.device)
    sorted_dst = dst_ids[order]
    for first in range(0, order.size, rows_per_chunk):
        staged = torch.index_select(src, 0, src_index[first : first + rows_per_chunk])
        for start, row, count in _consecutive_runs(sorted_dst[first : first + rows_per_chunk]):
            _copy_rows(dst[row : row + count], staged[start : start + count])


def _load_runs(
    src: torch.Tensor, dst: torch.Tensor, src_ids: np.ndarray, dst_ids: np.ndarray, rows_per_chunk: int
) -> None:
    """Host to device: one DMA per run of consecutive source rows into a device temporary in
    source order, then a scatter on the device."""
    order = np.argsort(src_ids, kind="stable")
    dst_index = stage_int64([dst_ids[order]], dst.device)
    sorted_src = src_ids[order]
    for first in range(0, order.size, rows_per_chunk):
        chunk = sorted_src[first : first + rows_per_chunk]
        staged = torch.empty((chunk.size, dst.shape[1]), dtype=dst.dtype, device=dst.device)
        for start, row, count in _consecutive_runs(chunk):
            _copy_rows(staged[start : start + count], src[row : row + count])
        dst.index_copy_(0, dst_index[first : first + chunk.size], staged)


def _consecutive_runs(sorted_ids: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(position, first id, length) of each run of consecutive ids in ascending ``sorted_ids``
    (a repeated id starts a new run)."""
    starts = np.flatnonzero(np.diff(sorted_ids, prepend=sorted_ids[0] - 2) != 1)
    ends = np.append(starts[1:], sorted_ids.size)
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        yield start, int(sorted_ids[start]), end - start


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` without waiting for the stream: a row at a time unless both sides are
    contiguous, since torch would stage strided host rows in pageable memory."""
    if dst.is_contiguous() and src.is_contiguous():
        dst.copy_(src, non_blocking=True)
        return
    for dst_row, src_row in zip(dst, src, strict=True):
        dst_row.copy_(src_row, non_blocking=True)

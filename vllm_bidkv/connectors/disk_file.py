"""One worker's share of the disk tier: a file of rows, one per disk slot, and its I/O.

Slot ``s`` holds this worker's bytes of one block (the same pieces as a CPU-tier row, in
the same order) at ``s`` x row bytes. Spills are written by one background thread (the
step never waits for a disk); promotions are read in the call that issues the load, just
before its copy to the GPU reads the row. The file is sparse: a disk with less room than
``disk_bytes`` fails the writes it cannot take (ENOSPC), which the scheduler side drops.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from vllm_bidkv.offload.disk import data_file

logger = logging.getLogger("vllm_bidkv")


class DiskFile:
    """Reads and writes between the CPU tier's rows and this worker's data file."""

    def __init__(
        self, path: str, rank: int, world_size: int, rows: list[torch.Tensor], num_slots: int
    ) -> None:
        """``rows``: the CPU tier's ``[slots, bytes]`` uint8 tensors (``CopyWorker``). Raises
        OSError if the file cannot be opened for writing."""
        self.path = data_file(path, rank, world_size)
        self._rows = [row.numpy() for row in rows]  # views: the I/O reads and writes the tier itself
        self.row_bytes = sum(int(r.shape[1]) for r in self._rows)
        os.makedirs(path, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        size, status = num_slots * self.row_bytes, os.fstat(self._fd)
        # Sized up front, sparse; never shrunk: a refused layout is overwritten slot by slot.
        if stat.S_ISREG(status.st_mode) and status.st_size < size:
            os.ftruncate(self._fd, size)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="vllm-bidkv-disk")

    def write(self, cpu_slots: list[int], disk_slots: list[int]) -> Future[None]:
        """Write CPU rows to disk slots in the background; the future raises OSError on failure.
        The rows must not change until it is done (the scheduler pins them)."""
        return self._writer.submit(self._write, list(cpu_slots), list(disk_slots))

    def _write(self, cpu_slots: list[int], disk_slots: list[int]) -> None:
        for offset, buffers, size in self._runs(cpu_slots, disk_slots):
            written = os.pwritev(self._fd, buffers, offset)
            if written != size:
                raise OSError(f"short write to {self.path}: {written} of {size} bytes")

    def read(self, disk_slots: list[int], cpu_slots: list[int]) -> None:
        """Read disk slots into CPU rows now; raises OSError on failure."""
        for offset, buffers, size in self._runs(cpu_slots, disk_slots):
            read = os.preadv(self._fd, buffers, offset)
            if read != size:
                raise OSError(f"short read from {self.path}: {read} of {size} bytes")

    def _runs(self, cpu_slots: list[int], disk_slots: list[int]) -> Iterator[tuple[int, list[Any], int]]:
        """(file offset, row buffers, bytes) per run of consecutive disk slots: one system call
        each. The disk index hands out slots lowest first, so a job's slots are mostly one run;
        fewer calls also means fewer waits for the GIL, which the engine's loop holds."""
        per_call = max(1, os.sysconf("SC_IOV_MAX") // len(self._rows))
        i = 0
        while i < len(disk_slots):
            j = i + 1
            while j < len(disk_slots) and j - i < per_call and disk_slots[j] == disk_slots[j - 1] + 1:
                j += 1
            buffers = [r[slot] for slot in cpu_slots[i:j] for r in self._rows]
            yield disk_slots[i] * self.row_bytes, buffers, (j - i) * self.row_bytes
            i = j

    def close(self) -> None:
        """Wait for the writes in flight, then close the file."""
        self._writer.shutdown(wait=True)
        os.close(self._fd)

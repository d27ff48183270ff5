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
from concurrent.futures import Future, ThreadPoolExecutor

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
        for slot, disk_slot in zip(cpu_slots, disk_slots, strict=True):
            written = os.pwritev(self._fd, [r[slot] for r in self._rows], disk_slot * self.row_bytes)
            if written != self.row_bytes:
                raise OSError(f"short write to {self.path}: {written} of {self.row_bytes} bytes")

    def read(self, disk_slots: list[int], cpu_slots: list[int]) -> None:
        """Read disk slots into CPU rows now; raises OSError on failure."""
        for disk_slot, slot in zip(disk_slots, cpu_slots, strict=True):
            read = os.preadv(self._fd, [r[slot] for r in self._rows], disk_slot * self.row_bytes)
            if read != self.row_bytes:
                raise OSError(f"short read from {self.path}: {read} of {self.row_bytes} bytes")

    def close(self) -> None:
        """Wait for the writes in flight, then close the file."""
        self._writer.shutdown(wait=True)
        os.close(self._fd)

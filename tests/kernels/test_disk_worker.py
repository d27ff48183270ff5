"""The worker's disk tier on real files: ``CopyWorker`` with a ``DiskFile`` (no vLLM).

A spill writes a committed CPU row to its disk slot on the disk thread and is reported once
written; a promotion reads the disk slot back into a CPU row before the load copies it to the
GPU, so the GPU gets the bytes stored long before. A disk with no room (``/dev/full``: ENOSPC)
or none at all (a read-only directory) fails spills and promoted loads, reported as failures
and load errors (vLLM recomputes), never raised.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
import torch

from tests.support.read_only import read_only_dir
from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.connectors.worker import CopyWorker
from vllm_bidkv.offload import StepPlan, TransferJob
from vllm_bidkv.offload.disk import DiskSpec, data_file

pytestmark = pytest.mark.kernels
NUM_BLOCKS, SLOTS, DISK_SLOTS = 8, 4, 6


def make_worker(path: Path) -> CopyWorker:
    # Two tensors (as K/V-split layouts give): a disk slot holds both pieces of a block.
    cache = torch.arange(2 * NUM_BLOCKS * 16, dtype=torch.float32).reshape(2, NUM_BLOCKS, 16)
    config = BidKVConfig(cpu_bytes="1MiB", disk_path=str(path))
    return CopyWorker(
        {"layers.0.attn": cache}, NUM_BLOCKS, SLOTS, config, disk=DiskSpec(str(path), DISK_SLOTS)
    )


def settle(worker: CopyWorker, plan: StepPlan) -> tuple[dict[int, int], dict[int, int]]:
    """Run a step's plan as the worker role does, then poll until its spills are reported."""
    worker.run_rescues(plan)
    worker.run_spills(plan)
    worker.run_loads(plan)
    worker.run_stores(plan)
    done: dict[int, int] = {}
    failed: dict[int, int] = {}
    for _ in range(200):
        worker.poll()
        results = worker.take_results()
        done.update(results.done)
        failed.update(results.failed)
        if not worker._spills:
            break
        time.sleep(0.01)
    return done, failed


def test_a_spilled_block_comes_back_through_a_promotion(tmp_path: Path) -> None:
    worker = make_worker(tmp_path)
    gpu = worker._gpu
    expected = [view[2].clone() for view in gpu]
    done, _ = settle(worker, StepPlan(stores=[TransferJob(0, "store", [2, 3], [0, 1])]))
    assert done == {0: 1}
    done, failed = settle(worker, StepPlan(spills=[TransferJob(1, "spill", [], [0, 1], disk_slots=[5, 0])]))
    assert done == {1: 1} and failed == {}
    assert os.path.getsize(data_file(str(tmp_path), 0, 1)) == DISK_SLOTS * worker._disk.row_bytes  # type: ignore[union-attr]
    for row in worker._cpu:
        row[0].zero_()  # the CPU tier evicted it and reused the slot
    promote = TransferJob(2, "load", [6], [3], disk_slots=[5])
    done, failed = settle(worker, StepPlan(loads=[promote]))
    assert done == {2: 1} and failed == {} and worker.take_load_errors() == set()
    assert all(torch.equal(view[6], want) for view, want in zip(gpu, expected, strict=True)), (
        "the GPU got the bytes stored before"
    )
    worker.close()


def test_a_full_disk_fails_spills_without_raising(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    worker = make_worker(tmp_path)
    worker.close()
    data = Path(data_file(str(tmp_path), 0, 1))
    data.unlink()
    data.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    worker = make_worker(tmp_path)
    assert worker._disk is not None, "the file opens; its writes fail"
    settle(worker, StepPlan(stores=[TransferJob(0, "store", [2], [0])]))
    with caplog.at_level(logging.WARNING, logger="vllm_bidkv"):
        done, failed = settle(worker, StepPlan(spills=[TransferJob(1, "spill", [], [0], disk_slots=[0])]))
    assert failed == {1: 1} and done == {}
    assert "disk tier write failed ([Errno 28] No space left on device)" in caplog.text
    worker.close()


def test_a_read_only_directory_fails_spills_and_promoted_loads(tmp_path: Path) -> None:
    with read_only_dir(tmp_path / "ro") as path:
        worker = make_worker(path)  # starts: the disk tier is off on this worker, with a warning
        assert worker._disk is None
        done, failed = settle(worker, StepPlan(spills=[TransferJob(0, "spill", [], [0], disk_slots=[0])]))
        assert failed == {0: 1} and done == {}
        plain = TransferJob(1, "load", [4], [1], disk_slots=[-1])
        promoted = TransferJob(2, "load", [5, 6], [2, 3], disk_slots=[-1, 1])
        done, failed = settle(worker, StepPlan(loads=[plain, promoted]))
        assert done == {1: 1} and failed == {2: 1}
        assert worker.take_load_errors() == {5, 6}, "a promotion that cannot read: vLLM recomputes the load"
        worker.close()

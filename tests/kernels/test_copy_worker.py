"""The worker's copy engine (``CopyWorker``) on CPU tensors: the life of a copy on one rank.

Real ``CopyWorker`` over a small CPU KV cache (no vLLM): copies are issued by the step's
hooks and reported by ``poll`` once a step, in issue order; the ``complete_after_steps``
test hook holds each report back as an unfinished CUDA event would, failures included;
asynchronous loads come back as finished requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.connectors.faults import FaultPlan, set_faults
from vllm_bidkv.connectors.worker import CopyWorker
from vllm_bidkv.offload import StepPlan, TransferJob

pytestmark = pytest.mark.kernels
NUM_BLOCKS, SLOTS = 8, 4


@pytest.fixture
def worker() -> Iterator[CopyWorker]:
    cache = torch.arange(2 * NUM_BLOCKS * 16, dtype=torch.float32).reshape(2, NUM_BLOCKS, 16)
    yield CopyWorker({"layers.0.attn": cache}, NUM_BLOCKS, SLOTS, BidKVConfig(cpu_bytes="1MiB"))
    set_faults(None)


def store(job_id: int, gpu: list[int], slots: list[int]) -> TransferJob:
    return TransferJob(job_id, "store", gpu, slots)


def load(job_id: int, gpu: list[int], slots: list[int], request: str | None = None) -> TransferJob:
    return TransferJob(job_id, "load", gpu, slots, request, asynchronous=request is not None)


def step(worker: CopyWorker, plan: StepPlan) -> tuple[dict[int, int], dict[int, int], set[str]]:
    """One worker step as vLLM runs it: bind (rescues), start_load_kv, forward, wait_for_save,
    get_finished (poll), build_connector_worker_meta (take_results)."""
    worker.run_rescues(plan)
    worker.run_loads(plan)
    worker.run_stores(plan)
    finished = worker.take_finished_loads()
    results = worker.take_results()
    return results.done, results.failed, finished


def test_without_delay_every_copy_is_reported_in_its_step(worker: CopyWorker) -> None:
    done, failed, finished = step(worker, StepPlan(stores=[store(0, [1, 2], [0, 1])]))
    assert done == {0: 1} and failed == {} and finished == set() and worker.in_flight == 0
    done, _, finished = step(worker, StepPlan(loads=[load(1, [5, 6], [0, 1], "r")]))
    assert done == {1: 1} and finished == {"r"}
    gpu = worker._gpu[0]
    assert torch.equal(gpu[5], gpu[1]) and torch.equal(gpu[6], gpu[2]), "the load returned the stored bytes"


@pytest.mark.parametrize("delay", [1, 3])
def test_complete_after_steps_holds_every_report_back_in_issue_order(worker: CopyWorker, delay: int) -> None:
    set_faults(FaultPlan(complete_after_steps=delay))
    reports: list[tuple[int, dict[int, int], dict[int, int], set[str]]] = []
    plans = [
        StepPlan(stores=[store(0, [1], [0])]),
        StepPlan(loads=[load(1, [4], [0], "r")], rescues=[store(2, [2], [1])]),
    ]
    for n in range(6):
        done, failed, finished = step(worker, plans[n] if n < len(plans) else StepPlan())
        if done or failed or finished:
            reports.append((n, done, failed, finished))
    # Issued in step 0 and step 1, each reported `delay` steps later; within a step, the
    # rescue (job 2) before the load (job 1), as issued.
    assert reports == [(delay, {0: 1}, {}, set()), (1 + delay, {2: 1, 1: 1}, {}, {"r"})]
    assert list(reports[1][1]) == [2, 1]
    assert worker.in_flight == 0


def test_failures_are_reported_late_too_and_loads_name_their_blocks_at_once(worker: CopyWorker) -> None:
    set_faults(FaultPlan(load_every=1, store_every=1, mid_batch=True, complete_after_steps=2))
    plan = StepPlan(loads=[load(0, [4, 5], [0, 1])], stores=[store(1, [1, 2], [2, 3])])
    step(worker, plan)
    # A synchronous load feeds this step's forward: its blocks are load errors now.
    assert worker.take_load_errors() == {4, 5}
    assert step(worker, StepPlan())[:2] == ({}, {}), "a torn copy is reported only when it is done"
    done, failed, _ = step(worker, StepPlan())
    assert done == {} and failed == {0: 1, 1: 1}


def test_a_plan_per_rank(worker: CopyWorker) -> None:
    """Rank 0 (this worker) gets the slow plan; rank 1's failures are not its own."""
    set_faults([FaultPlan(store_every=1, rank=1), FaultPlan(complete_after_steps=2, rank=0)])
    assert step(worker, StepPlan(stores=[store(0, [1], [0])]))[:2] == ({}, {})
    step(worker, StepPlan())
    assert step(worker, StepPlan())[:2] == ({0: 1}, {})


def test_close_reports_nothing_more_and_releases_the_tier(worker: CopyWorker) -> None:
    set_faults(FaultPlan(complete_after_steps=5))
    step(worker, StepPlan(stores=[store(0, [1], [0])]))
    worker.close()
    assert worker.in_flight == 0


class _FakeCuda:
    """A FAKE of how CUDA orders streams (no GPU here; ``test_cuda_*`` below runs the real
    ones on a GPU): the compute stream is a list of its work, an event recorded on it marks
    its length then, and each side stream keeps the marks it waited for."""

    def __init__(self) -> None:
        self.compute: list[str] = []
        self.waits: dict[str, list[int]] = {"load": [], "store": []}
        self.current = "compute"

    def event(self) -> Any:
        cuda = self

        class Event:
            def record(self) -> None:
                self.mark = len(cuda.compute)

            def query(self) -> bool:
                return True

        return Event()

    def stream_named(self, name: str) -> Any:
        return SimpleNamespace(name=name, wait_event=lambda event: self.waits[name].append(event.mark))

    @contextlib.contextmanager
    def stream(self, stream: Any) -> Iterator[None]:
        self.current = stream.name
        yield
        self.current = "compute"


def test_async_loads_wait_for_the_bind_and_stores_for_the_forward(
    worker: CopyWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order vLLM 0.32 runs a step in without a synchronous load: bind (rescues), the
    forward's launch, then start_load_kv and wait_for_save. The asynchronous load waits for
    the rescue that read its block and the forwards before, not for this step's forward (its
    request is not in it); the store waits for this step's forward, which writes its block."""
    cuda = _FakeCuda()
    copy = worker._copy

    def copy_on_a_stream(*args: Any) -> None:
        if cuda.current == "compute":
            cuda.compute.append("copy")
        copy(*args)

    monkeypatch.setattr(torch.cuda, "Event", cuda.event)
    monkeypatch.setattr(torch.cuda, "stream", cuda.stream)
    monkeypatch.setattr(worker, "_cuda", True)
    monkeypatch.setattr(worker, "_load_stream", cuda.stream_named("load"))
    monkeypatch.setattr(worker, "_store_stream", cuda.stream_named("store"))
    monkeypatch.setattr(worker, "_copy", copy_on_a_stream)
    gpu = worker._gpu[0]
    gpu[3].fill_(7.0)  # a victim's block: rescued, then written by the load
    plans = [
        StepPlan(stores=[store(0, [1], [0])]),
        StepPlan(rescues=[store(1, [3], [1])], loads=[load(2, [3], [0], "r")], stores=[store(3, [2], [2])]),
    ]
    for n, plan in enumerate(plans):
        worker.run_rescues(plan)
        cuda.compute.append(f"forward {n}")
        worker.run_loads(plan)
        worker.run_stores(plan)
    forward = cuda.compute.index("forward 1")
    assert cuda.compute[forward - 1] == "copy", "the rescue ran on the compute stream before the forward"
    assert cuda.waits["load"] == [forward], "the load must wait for the rescue and no more"
    assert cuda.waits["store"] == [1, forward + 1], "each store waits for its forward"
    assert worker.take_finished_loads() == {"r"}
    assert torch.equal(worker._cpu[0][1], torch.full_like(worker._cpu[0][1], 7.0)), "rescued first"
    assert torch.equal(gpu[3], gpu[1]), "then loaded what job 0 stored"


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (scripts/gpu_check.sh)"
)


@needs_cuda
def test_cuda_copies_wait_for_compute_and_report_only_when_done() -> None:
    """On a GPU: a store issued after the forward waits for it on the store stream, an
    asynchronous load for the compute enqueued before its step's bind (here, as an earlier
    step's forward: its blocks' previous owner), issuing either does not block the host,
    and neither is reported before its event completed."""
    import time

    cache = torch.zeros(2, NUM_BLOCKS, 64 * 1024, device="cuda")
    worker = CopyWorker({"layers.0.attn": cache}, NUM_BLOCKS, SLOTS, BidKVConfig(cpu_bytes="64MiB"))

    def issue_behind_a_busy_gpu(plan: StepPlan) -> tuple[dict[int, int], set[str]]:
        torch.cuda.synchronize()
        torch.cuda._sleep(1_000_000_000)  # the "forward": ~0.5 s of GPU time on the compute stream
        cache[:, 1].fill_(3.0)  # ... which writes block 1
        started = time.perf_counter()
        done, failed, finished = step(worker, plan)
        issued_s = time.perf_counter() - started
        assert issued_s < 0.1, f"issuing copies waited {issued_s:.3f} s for the GPU"
        assert (done, failed, finished) == ({}, {}, set()), "reported before the GPU got there"
        torch.cuda.synchronize()
        done, failed, finished = step(worker, StepPlan())
        assert failed == {}
        return done, finished

    try:
        assert issue_behind_a_busy_gpu(StepPlan(stores=[store(0, [1], [0])])) == ({0: 1}, set())
        loaded = issue_behind_a_busy_gpu(StepPlan(loads=[load(1, [6], [0], "r")]))
        assert loaded == ({1: 1}, {"r"})
        assert torch.equal(cache[:, 6], cache[:, 1]), "the store read block 1 after the forward wrote it"
    finally:
        worker.close()


@needs_cuda
def test_cuda_async_load_runs_beside_the_forward() -> None:
    """On a GPU: an asynchronous load issued after the forward's launch (0.32's start_load_kv)
    is reported while that forward still runs, after the rescue that read its block."""
    import time

    cache = torch.zeros(2, NUM_BLOCKS, 64 * 1024, device="cuda")
    worker = CopyWorker({"layers.0.attn": cache}, NUM_BLOCKS, SLOTS, BidKVConfig(cpu_bytes="64MiB"))
    try:
        cache[:, 1].fill_(5.0)
        step(worker, StepPlan(stores=[store(0, [1], [0])]))
        torch.cuda.synchronize()
        assert step(worker, StepPlan())[0] == {0: 1}
        cache[:, 3].fill_(7.0)  # a victim's block: rescued, then written by the load
        plan = StepPlan(rescues=[store(1, [3], [1])], loads=[load(2, [3], [0], "r")])
        worker.run_rescues(plan)
        torch.cuda._sleep(1_000_000_000)  # the forward: ~0.5 s on the compute stream
        worker.run_loads(plan)
        deadline, finished = time.perf_counter() + 0.3, set()
        while not finished and time.perf_counter() < deadline:
            finished = worker.take_finished_loads()
        assert finished == {"r"}, "the load waited for the forward"
        assert not torch.cuda.current_stream().query(), "the forward must still be running"
        torch.cuda.synchronize()
        assert bool((cache[:, 3] == 5.0).all()), "the load wrote the stored block"
        step(worker, StepPlan(loads=[load(3, [4], [1])]))  # read the rescue's slot back
        torch.cuda.synchronize()
        assert bool((cache[:, 4] == 7.0).all()), "the rescue read the block before the load wrote it"
    finally:
        worker.close()

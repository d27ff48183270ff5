"""The simulator times every connector's copies as vLLM 0.32 runs them, on one link.

vLLM's model runner calls ``get_finished`` right after it launches a step's forward, so a
copy is seen by the first step launched after the copy finished, never by the step that
scheduled a load (its copy starts after that step's forward at the earliest). Under async
scheduling step N+1 is launched before step N's output is processed. Every copy, ours or a
peer's, shares the link's two directions and pays the cost model's per-copy overhead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib.util import find_spec
from types import SimpleNamespace
from typing import Any

import pytest
from vllm_bidkv_bench.configs import CONFIGS
from vllm_bidkv_bench.costmodel import H100_LLAMA3_8B
from vllm_bidkv_bench.sim import (
    _BidKVWorker,
    _Launched,
    _OffloadingWorker,
    _SimpleOffloadWorker,
    _Simulator,
    _Streams,
    simulate,
)
from vllm_bidkv_bench.workloads import make_workload

from tests.sched.test_sim import SMALL
from vllm_bidkv.offload import StepPlan, TransferJob

pytestmark = pytest.mark.sched

COST = H100_LLAMA3_8B
BLOCK_BYTES = 16 * COST.kv_bytes_per_token

# Every CPU hit of ours asynchronous (one block or more), like the peers' loads.
BIDKV_ASYNC = replace(CONFIGS["bidkv+offload"], connector_options=(("async_load_min_tokens", 16),))
RUNS = {"bidkv+offload": BIDKV_ASYNC, "vllm-offloading": CONFIGS["vllm-offloading"]}
RUNS["vllm-simple-offload"] = CONFIGS["vllm-simple-offload"]
PEER_MODULES = {
    "vllm-offloading": "vllm.distributed.kv_transfer.kv_connector.v1.offloading.scheduler",
    "vllm-simple-offload": "vllm.v1.simple_kv_offload.manager",
}


# The model runner's order this file pins (when start_load_kv runs, whether a step has
# synchronous loads) is vLLM 0.32's; CI finds 0.29-0.33 keep it, 0.28 and older do not.
TIMED_RELEASES = ("0.29.0", "0.30.0", "0.31.0", "0.32.0", "0.33.0")


def _needs(config: str, request: pytest.FixtureRequest) -> None:
    """The peers' worker protocol is modelled on vLLM 0.32.0 (as in test_sim_peers.py); ours
    needs offload (vLLM 0.19+) and a runner that orders copies as 0.32's does."""
    from vllm_bidkv.patches.capabilities import probe

    if config not in PEER_MODULES:
        request.getfixturevalue("offload_supported")
        if probe().vllm_version not in TIMED_RELEASES:
            pytest.skip(
                f"copy timing modelled on vLLM {', '.join(TIMED_RELEASES)}, not {probe().vllm_version}"
            )
        return
    if probe().vllm_version != "0.32.0":
        pytest.skip(f"peer worker protocol modelled on vLLM 0.32.0, not {probe().vllm_version}")
    if find_spec(PEER_MODULES[config]) is None:
        pytest.skip(f"this vLLM release has no {PEER_MODULES[config]}")


def _scheduled_loads(out: Any) -> list[str]:
    """The requests whose loads a step's connector metadata schedules."""
    meta = out.kv_connector_metadata
    if hasattr(meta, "plan"):  # BidKV
        return [str(job.request_id) for job in meta.plan.loads if job.asynchronous]
    if hasattr(meta, "load_jobs"):  # OffloadingConnector
        return [job.req_id for job in meta.load_jobs.values()]
    return list(meta.load_event_to_reqs.get(meta.load_event, ())) if meta.load_event >= 0 else []


def _loads_in_flight(worker: Any) -> set[tuple[Any, str, float]]:
    """(copy, request, finish) of every load the worker model has in flight."""
    if isinstance(worker, _BidKVWorker):
        return {(None, req, finish) for finish, _, req in worker.issued if req is not None}
    return {(key, req, c.finish) for key, c in worker.inflight.items() if c.is_load for req in c.req_ids}


@dataclass
class _Trace:
    launches: list[tuple[float, _Launched]] = field(default_factory=list)
    """Each step: the host's time at its forward's launch (get_finished's), the step."""
    new_loads: list[set[tuple[Any, str, float]]] = field(default_factory=list)
    """Per step: the loads in flight after its launch that were not before."""
    launched_at_finish: list[int] = field(default_factory=list)
    """Per processed step (in order): how many steps were launched when it was processed."""


def _run(config: str, async_scheduling: bool) -> tuple[Any, _Trace]:
    trace = _Trace()
    launch, finish = _Simulator._launch, _Simulator._finish

    def spy_launch(self: _Simulator) -> _Launched:
        before = _loads_in_flight(self.worker)
        step = launch(self)
        trace.launches.append((self.clock, step))
        trace.new_loads.append(_loads_in_flight(self.worker) - before)
        return step

    def spy_finish(self: _Simulator, step: _Launched) -> None:
        trace.launched_at_finish.append(len(trace.launches))
        finish(self, step)

    workload = make_workload("bursty", 24, 40.0, 0, length_scale=0.8)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_Simulator, "_launch", spy_launch)
        patch.setattr(_Simulator, "_finish", spy_finish)
        result = simulate(workload, RUNS[config], SMALL, COST, async_scheduling=async_scheduling)
    assert all(t.num_output_tokens == t.expected_output_tokens for t in result.timings)
    assert result.free_blocks_at_end == result.num_gpu_blocks  # every copy was reported
    return result, trace


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async-scheduling"])
@pytest.mark.parametrize("config", list(RUNS))
def test_a_load_is_seen_by_the_first_step_launched_after_it_finished(
    config: str, async_scheduling: bool, request: pytest.FixtureRequest
) -> None:
    """A load scheduled in step N starts where vLLM's worker starts it: the OffloadingConnector's
    once N's forward ended, SimpleCPUOffload's at N's launch, ours once the compute stream
    reached N (every earlier forward and N's rescues done, N's forward not) — and, under
    async scheduling, not before the previous step's forward ended; it is still in flight
    after N's launch (so not in N's output); its request is reported by a step launched once
    the copy finished: for the peers (reported in completion order) the first such step; for
    ours at the earliest that one (CopyWorker reports in issue order)."""
    _needs(config, request)
    _, trace = _run(config, async_scheduling)
    loads = beside_forward = 0  # loads, and those done before their step's forward ended
    for n, (host, step) in enumerate(trace.launches):
        scheduled = _scheduled_loads(step.out)
        assert sorted(req for _, req, _ in trace.new_loads[n]) == sorted(scheduled)
        starts_at = {"vllm-simple-offload": host, "vllm-offloading": step.end}.get(config, step.start)
        for _, req, copy_done in trace.new_loads[n]:
            loads += 1
            assert copy_done > starts_at, "a load must not start before vLLM starts it"
            beside_forward += copy_done < step.end
            seen = next(
                m
                for m in range(n + 1, len(trace.launches))
                if req in (getattr(trace.launches[m][1].kv_out, "finished_recving", None) or ())
            )
            assert trace.launches[seen][0] >= copy_done, "reported before the copy finished"
            if config != "bidkv+offload":
                assert seen == n + 1 or trace.launches[seen - 1][0] < copy_done, "reported late"
    assert loads > 0, "the trace must load"
    if config != "vllm-offloading":  # the loads that do not wait for the forward ran beside it
        assert beside_forward > 0


@pytest.mark.parametrize("config", list(RUNS))
def test_async_scheduling_schedules_the_next_step_before_processing_this_one(
    config: str, request: pytest.FixtureRequest
) -> None:
    """vLLM's batch queue: one step deep without async scheduling, two with it, and then a
    step is launched while the one before it still runs on the GPU."""
    _needs(config, request)
    _, sync_trace = _run(config, False)
    assert all(launched == k + 1 for k, launched in enumerate(sync_trace.launched_at_finish))
    _, trace = _run(config, True)
    assert (
        sum(launched == k + 2 for k, launched in enumerate(trace.launched_at_finish))
        > len(trace.launches) / 2
    )
    # A step launched while the one before it runs on the GPU starts when that one ends.
    assert any(host < trace.launches[k][1].end for k, (host, _) in enumerate(trace.launches[1:]))


# -- one link, one price ---------------------------------------------------------------
def _job(job_id: int, kind: str, blocks: int, *, request_id: str | None = None) -> TransferJob:
    ids = list(range(job_id * 100, job_id * 100 + blocks))
    return TransferJob(job_id, kind, ids, ids, request_id, asynchronous=request_id is not None)


def _bidkv_step(
    *,
    loads: tuple[TransferJob, ...] = (),
    stores: tuple[TransferJob, ...] = (),
    rescues: tuple[TransferJob, ...] = (),
) -> Any:
    from vllm_bidkv.connectors.metadata import BidKVConnectorMetadata

    plan = StepPlan(loads=list(loads), stores=list(stores), rescues=list(rescues))
    return SimpleNamespace(kv_connector_metadata=BidKVConnectorMetadata(plan))


def _offloading_step(*, stores: tuple[int, ...] = ()) -> Any:
    """An OffloadingConnector step storing one job per entry of ``stores`` (its blocks)."""
    spec = SimpleNamespace(block_ids=[])
    jobs = {
        job_id: SimpleNamespace(src_spec=SimpleNamespace(block_ids=list(range(n))), dst_spec=spec)
        for job_id, n in enumerate(stores)
    }
    return SimpleNamespace(
        kv_connector_metadata=SimpleNamespace(load_jobs={}, store_jobs=jobs, jobs_to_flush=None)
    )


def _simple_step(*, store_blocks: int) -> Any:
    meta = SimpleNamespace(
        need_flush=False,
        load_event=-1,
        load_event_to_reqs={},
        load_gpu_blocks=[],
        store_event=0,
        store_gpu_blocks=list(range(store_blocks)),
    )
    return SimpleNamespace(kv_connector_metadata=meta)


def test_a_copy_pays_the_per_copy_cost_and_shares_the_link() -> None:
    one_way = COST.copy_s(8 * BLOCK_BYTES, to_device=True, duplex=False)
    assert one_way == pytest.approx(COST.copy_overhead_s + 8 * BLOCK_BYTES / COST.h2d_bytes_per_s)
    assert COST.copy_overhead_s > 0 and COST.copy_s(0, to_device=True, duplex=False) == 0
    link = _Streams(COST, BLOCK_BYTES)
    assert link.copy(8, 0.0, to_device=True) == (0.0, pytest.approx(one_way))
    # A second load waits for the direction; a store beside them gets the duplex share,
    # except between the loads (the second one's per-copy cost moves no bytes).
    assert link.copy(8, 0.0, to_device=True)[0] == pytest.approx(one_way)
    start, finish = link.copy(8, 0.0, to_device=False)
    gap = COST.copy_overhead_s * (
        1 - COST.link_rate(to_device=False, duplex=False) / COST.link_rate(to_device=False, duplex=True)
    )
    assert start == 0.0 and finish - start == pytest.approx(
        COST.copy_s(8 * BLOCK_BYTES, to_device=False, duplex=True) + gap
    )
    assert finish - start > COST.copy_s(8 * BLOCK_BYTES, to_device=False, duplex=False)


def test_the_same_bytes_cost_the_same_for_every_connector() -> None:
    """A store of 8 blocks in one copy operation takes as long in our worker as in either
    peer's; split in two operations it pays the per-copy cost once more."""
    alone = COST.copy_s(8 * BLOCK_BYTES, to_device=False, duplex=False)
    ours = _BidKVWorker(COST, BLOCK_BYTES)
    ours.after_forward(_bidkv_step(stores=(_job(0, "store", 8),)), 1.0)
    offloading = _OffloadingWorker(COST, BLOCK_BYTES)
    offloading.after_forward(_offloading_step(stores=(8,)), 1.0)
    offloading.launch(_offloading_step(), 1.0, 1.0)  # the deferred store goes out at the next launch
    simple = _SimpleOffloadWorker(COST, BLOCK_BYTES)
    simple.after_forward(_simple_step(store_blocks=8), 1.0)
    for worker in (ours, offloading, simple):
        assert worker.next_event() == pytest.approx(1.0 + alone)
        assert worker.store_s == pytest.approx(alone)
    split = _OffloadingWorker(COST, BLOCK_BYTES)
    split.after_forward(_offloading_step(stores=(4, 4)), 1.0)
    split.launch(_offloading_step(), 1.0, 1.0)
    assert split.store_s == pytest.approx(alone + COST.copy_overhead_s)
    ours_split = _BidKVWorker(COST, BLOCK_BYTES)
    ours_split.before_forward(
        _bidkv_step(loads=(_job(0, "load", 4, request_id="a"), _job(1, "load", 4, request_id="b"))), 1.0
    )
    load = COST.copy_s(8 * BLOCK_BYTES, to_device=True, duplex=False)
    assert ours_split.async_load_s == pytest.approx(load + COST.copy_overhead_s)


def test_our_copies_share_the_link_with_each_other() -> None:
    """A rescue before the forward queues behind our store still on the link, and a load
    overlapping a store takes longer than alone: one link for every copy."""
    rescue_alone = COST.copy_s(4 * BLOCK_BYTES, to_device=False, duplex=False)
    store = COST.copy_s(16 * BLOCK_BYTES, to_device=False, duplex=False)
    worker = _BidKVWorker(COST, BLOCK_BYTES)
    worker.after_forward(_bidkv_step(stores=(_job(0, "store", 16),)), 0.0)
    wait = worker.before_forward(_bidkv_step(rescues=(_job(1, "store", 4),)), 0.0)
    assert wait == pytest.approx(store + rescue_alone)
    assert worker.load_s == pytest.approx(wait)

    load_alone = COST.copy_s(16 * BLOCK_BYTES, to_device=True, duplex=False)
    overlapped = _BidKVWorker(COST, BLOCK_BYTES)
    overlapped.after_forward(_bidkv_step(stores=(_job(0, "store", 16),)), 0.0)
    overlapped.before_forward(_bidkv_step(loads=(_job(1, "load", 16, request_id="a"),)), 0.0)
    assert load_alone < overlapped.async_load_s < COST.copy_s(16 * BLOCK_BYTES, to_device=True, duplex=True)


def test_a_copy_pays_the_duplex_share_only_while_the_other_direction_moves_bytes() -> None:
    """A load beside a shorter store moves at the shared rate until the store ends and at the
    one-way rate after it; one that starts after the store ends pays nothing for it."""
    shared = COST.link_rate(to_device=True, duplex=True)
    alone = COST.link_rate(to_device=True, duplex=False)
    assert shared < alone
    link = _Streams(COST, BLOCK_BYTES)
    _, store_end = link.copy(4, 0.0, to_device=False)
    start, finish = link.copy(16, 0.0, to_device=True)
    moving = start + COST.copy_overhead_s
    beside = (store_end - moving) * shared  # bytes moved while the store still ran
    assert 0 < beside < 16 * BLOCK_BYTES
    assert finish == pytest.approx(store_end + (16 * BLOCK_BYTES - beside) / alone)
    # After both: a store finds the load direction busy for its first part only.
    _, later = link.copy(16, finish, to_device=False)
    assert later - finish == pytest.approx(COST.copy_s(16 * BLOCK_BYTES, to_device=False, duplex=False))
    # A store placed to start later leaves the load direction alone until then.
    gap = _Streams(COST, BLOCK_BYTES)
    store_start, _ = gap.copy(64, 1.0, to_device=False)
    _, load_end = gap.copy(16, 0.0, to_device=True)
    assert store_start == 1.0 and load_end == pytest.approx(
        COST.copy_s(16 * BLOCK_BYTES, to_device=True, duplex=False)
    )


def test_prefill_tokens_computed_count_every_token_but_first_decodes() -> None:
    """Every scheduled token is a prefill token (a prompt token no cache supplied, or one
    computed again) or the first computation of an output position: each output token but the
    last is fed back once."""
    workload = make_workload("bursty", 24, 40.0, 0, length_scale=0.8)
    result = simulate(workload, CONFIGS["stock"], SMALL, COST)
    decodes = sum(r.output_len - 1 for r in workload.requests)
    assert result.prefill_tokens_computed + decodes == result.counters.scheduled_tokens
    assert 0 < result.counters.recomputed_prefill_tokens < result.prefill_tokens_computed

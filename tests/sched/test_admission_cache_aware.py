"""``admission: cache-aware`` in vLLM's real Scheduler: the waiting queue by prefill work left
after the GPU prefix-cache and CPU-tier hits, looked up again each step, with its aging bound."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest
from vllm_bidkv_bench.standalone import make_request, model_output

from tests.sched.conftest import BLOCK_SIZE, run_to_completion
from tests.sched.test_connector_scheduler import DelayedCopyWorker, run_step
from tests.sched.test_victim import assert_drained, connector_config
from vllm_bidkv.patches import admission as patch_admission
from vllm_bidkv.patches.capabilities import probe

pytestmark = pytest.mark.sched

SHARED = 160  # tokens of the prefix a warm-up request leaves cached (10 blocks)


@pytest.fixture
def runtime_patched(patched: None) -> None:
    """cache-aware runs through the runtime patches; a source-patched vLLM refuses it (below)."""
    if probe().vllm_binds_context:
        pytest.skip("the source-patched Scheduler keys its queue once: cache-aware is refused there")


def prompts(seed: int = 1) -> tuple[list[int], list[int], list[int]]:
    """The warm-up's prompt; a short prompt sharing nothing; a longer one extending the warm-up's."""
    rng = random.Random(seed)
    shared = [rng.randrange(1, 500) for _ in range(SHARED)]
    short = [rng.randrange(500, 900) for _ in range(48)]
    return shared, short, shared + [rng.randrange(900, 999) for _ in range(16)]


def admitted_order(
    scheduler: Any, requests: dict[str, Any], worker: DelayedCopyWorker | None = None
) -> list[str]:
    """Run to completion (copies by ``worker``, if any); the requests in their first admission's order."""
    order: list[str] = []
    while scheduler.has_requests():
        out = scheduler.schedule()
        order.extend(new.req_id for new in out.scheduled_new_reqs)
        kwargs = {}
        if worker is not None:
            worker.submit(out.kv_connector_metadata)
            kwargs["kv_connector_output"] = worker.output()
        scheduler.update_from_output(out, model_output(out, requests, **kwargs))
        assert len(order) <= len(requests)
    return order


def warm_then_queue(scheduler: Any) -> dict[str, Any]:
    """A warm-up request runs to completion (its prompt stays in vLLM's prefix cache); then
    ``short`` (48 tokens, no hit) arrives, then ``long`` (176 tokens, the first 160 cached)."""
    shared, short, long = prompts()
    warm = make_request("warm", shared, 2, block_size=BLOCK_SIZE, arrival_time=0.0)
    scheduler.add_request(warm)
    run_to_completion(scheduler, {"warm": warm})
    queued = {
        "short": make_request("short", short, 2, block_size=BLOCK_SIZE, arrival_time=1.0),
        "long": make_request("long", long, 2, block_size=BLOCK_SIZE, arrival_time=2.0),
    }
    for request in queued.values():
        scheduler.add_request(request)
    return queued


def test_a_gpu_prefix_hit_is_admitted_before_a_shorter_prompt(
    make_scheduler: Any, runtime_patched: None
) -> None:
    """One request runs at a time, so every admission is a choice. ``long`` leaves 16 tokens to
    compute against ``short``'s 48: cache-aware admits it first; FCFS, SJF and cache-aware with
    bound 0 (FCFS by arrival) admit ``short`` first. The look-up changes no vLLM statistic."""
    first = {}
    for name, extra in {
        "fcfs": {"admission": "fcfs"},
        "sjf": {"admission": "sjf"},
        "cache-aware": {"admission": "cache-aware"},
        "cache-aware, bound 0": {"admission": "cache-aware", "admission_max_bypass": 0},
    }.items():
        scheduler = make_scheduler(
            num_gpu_blocks=64,
            max_num_seqs=1,
            log_stats=True,
            kv_transfer_config=connector_config(offload_mode="off", **extra),
        )
        requests = warm_then_queue(scheduler)
        if name == "cache-aware":
            manager = scheduler.kv_cache_manager
            assert patch_admission.gpu_prefix_hit(manager, requests["long"]) == SHARED
            assert patch_admission.gpu_prefix_hit(manager, requests["short"]) == 0
            stats = dataclasses.asdict(manager.prefix_cache_stats)
            scheduler.waiting.refresh_order()
            assert dataclasses.asdict(manager.prefix_cache_stats) == stats
            assert [r.request_id for r in scheduler.waiting] == ["long", "short"]
        first[name] = admitted_order(scheduler, requests)
        assert sorted(first[name]) == ["long", "short"]
        assert_drained(scheduler, requests)
    assert first == {
        "fcfs": ["short", "long"],
        "sjf": ["short", "long"],
        "cache-aware": ["long", "short"],
        "cache-aware, bound 0": ["short", "long"],
    }


def test_the_order_is_looked_up_again_each_step(make_scheduler: Any, runtime_patched: None) -> None:
    """``long`` led the queue while its prefix was cached; the cache is reset before the next
    step: the step looks its work up again and admits ``short`` first (no key fixed at insertion)."""
    scheduler = make_scheduler(
        num_gpu_blocks=64,
        max_num_seqs=1,
        kv_transfer_config=connector_config(offload_mode="off", admission="cache-aware"),
    )
    requests = warm_then_queue(scheduler)
    scheduler.waiting.refresh_order()  # as the last schedule() would
    assert scheduler.waiting.peek_request().request_id == "long"
    assert scheduler.reset_prefix_cache()
    assert admitted_order(scheduler, requests) == ["short", "long"]


def test_a_cpu_tier_hit_is_admitted_before_a_shorter_prompt(
    make_scheduler: Any, runtime_patched: None, offload_supported: None
) -> None:
    """The warm-up's blocks are stored in the CPU tier (eager) and vLLM's prefix cache is reset:
    ``long``'s 160 tokens come from the tier only. Cache-aware admits it first, FCFS does not;
    ordering moves no tier entry and counts nothing."""
    first = {}
    for admission in ("fcfs", "cache-aware"):
        scheduler = make_scheduler(
            num_gpu_blocks=64,
            max_num_seqs=1,
            kv_transfer_config=connector_config(
                offload_mode="eager", cpu_bytes=64 * 1024 * 1024, admission=admission
            ),
        )
        worker = DelayedCopyWorker(0)
        shared, short, long = prompts()
        warm = make_request("warm", shared, 2, block_size=BLOCK_SIZE, arrival_time=0.0)
        requests = {"warm": warm}
        scheduler.add_request(warm)
        while scheduler.has_requests():  # until the stores are reported too
            run_step(scheduler, worker, requests)
        side = scheduler.connector.scheduler_role.side
        assert side.planner.tier.num_used >= SHARED // BLOCK_SIZE
        assert scheduler.reset_prefix_cache(), "the plain reset keeps the tier"
        queued = {
            "short": make_request("short", short, 2, block_size=BLOCK_SIZE, arrival_time=1.0),
            "long": make_request("long", long, 2, block_size=BLOCK_SIZE, arrival_time=2.0),
        }
        for request in queued.values():
            scheduler.add_request(request)
        requests.update(queued)
        if admission == "cache-aware":
            assert patch_admission.gpu_prefix_hit(scheduler.kv_cache_manager, queued["long"]) == 0
            tier = side.planner.tier
            before = (tier.order.slots(), tier.num_pins, side.counters.totals(), dict(side.requests))
            scheduler.waiting.refresh_order()
            assert (tier.order.slots(), tier.num_pins, side.counters.totals(), dict(side.requests)) == before
        first[admission] = admitted_order(scheduler, requests, worker)
        assert side.counters["cpu_hit_blocks"] >= SHARED // BLOCK_SIZE  # long did load from the tier
        assert_drained(scheduler, requests)
    assert first == {"fcfs": ["short", "long"], "cache-aware": ["long", "short"]}


@pytest.mark.parametrize("bound", [0, 2, 5, 100])
def test_no_request_waits_behind_more_than_the_bound(
    make_scheduler: Any, runtime_patched: None, bound: int
) -> None:
    """A long prompt arrives first, then short ones, each admitted ahead of it while it is within
    its bound; once ``bound`` later arrivals were, it goes next whatever its size."""
    scheduler = make_scheduler(
        num_gpu_blocks=64,
        max_num_seqs=1,
        kv_transfer_config=connector_config(
            offload_mode="off", admission="cache-aware", admission_max_bypass=bound
        ),
    )
    rng = random.Random(bound)
    requests = {
        "long": make_request(
            "long", [rng.randrange(1, 500) for _ in range(200)], 2, block_size=BLOCK_SIZE, arrival_time=0.0
        )
    }
    for i in range(6):
        prompt = [rng.randrange(1, 500) for _ in range(20 + i)]
        requests[f"s{i}"] = make_request(f"s{i}", prompt, 2, block_size=BLOCK_SIZE, arrival_time=1.0 + i)
    for request in requests.values():
        scheduler.add_request(request)
    order = admitted_order(scheduler, requests)
    shorts = [f"s{i}" for i in range(6)]
    assert order == shorts[: min(bound, 6)] + ["long"] + shorts[min(bound, 6) :]
    arrival = {rid: r.arrival_time for rid, r in requests.items()}
    for position, rid in enumerate(order):  # the bound, for every request
        assert sum(arrival[ahead] > arrival[rid] for ahead in order[:position]) <= bound
    assert_drained(scheduler, requests)


def test_removal_gives_vllm_its_queue_back(make_scheduler: Any, runtime_patched: None) -> None:
    scheduler = make_scheduler(
        num_gpu_blocks=64,
        max_num_seqs=1,
        kv_transfer_config=connector_config(offload_mode="off", admission="cache-aware"),
    )
    requests = warm_then_queue(scheduler)
    assert "schedule" in vars(scheduler) and "_bidkv_fcfs_waiting" in vars(scheduler)
    assert not patch_admission.install_admission(scheduler, scheduler.connector.admission_key())  # once
    assert patch_admission.remove_admission(scheduler)
    assert "schedule" not in vars(scheduler) and "_bidkv_fcfs_waiting" not in vars(scheduler)
    assert sorted(r.request_id for r in scheduler.waiting) == ["long", "short"]
    assert admitted_order(scheduler, requests) == ["short", "long"]  # vLLM's FCFS again


def test_where_cache_aware_cannot_run_it_is_refused_in_one_line(
    make_scheduler: Any, patched: None, monkeypatch: Any
) -> None:
    """The source-patched Scheduler sorts its queue once per request (a key fixed at insertion):
    cache-aware is refused there with one line naming the key and what is allowed; so it is on a
    vLLM without the prefix-cache look-up it needs."""
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator

    if not probe().vllm_binds_context:  # play the source-patched build
        caps = dataclasses.replace(probe(), vllm_binds_context=True)
        monkeypatch.setattr(patch_admission, "probe", lambda: caps)
    expected = (
        "vllm-bidkv config: admission='cache-aware' is invalid; expected one of fcfs, sjf "
        "(the source-patched Scheduler sorts its waiting queue once, by keys fixed at insertion)"
    )
    with pytest.raises(ValueError) as err:
        patch_admission.refuse_unsupported_admission("cache-aware")
    assert str(err.value) == expected
    patch_admission.refuse_unsupported_admission("sjf")  # the others run everywhere
    with pytest.raises(ValueError, match="admission='cache-aware' is invalid; expected one of fcfs, sjf"):
        scheduler = make_scheduler(
            kv_transfer_config=connector_config(offload_mode="off", admission="cache-aware")
        )
        # The connector refuses it at its start; the first request would meet the refusal otherwise.
        scheduler.add_request(make_request("r", [1] * 20, 2, block_size=BLOCK_SIZE))
    monkeypatch.setattr(
        patch_admission, "probe", lambda: dataclasses.replace(probe(), vllm_binds_context=False)
    )
    monkeypatch.delattr(KVCacheCoordinator, "find_longest_cache_hit")
    with pytest.raises(ValueError) as err:
        patch_admission.refuse_unsupported_admission("cache-aware")
    assert str(err.value).endswith("has no KVCacheCoordinator.find_longest_cache_hit)")

"""Victim selection and admission in vLLM's real Scheduler under KV pressure."""

from __future__ import annotations

from typing import Any

import pytest

from tests.sched.conftest import add_requests, run_to_completion
from vllm_bidkv.config import VICTIM_POLICIES

pytestmark = pytest.mark.sched


def connector_config(**extra: Any) -> dict[str, Any]:
    return {
        "kv_connector": "BidKVConnector",
        "kv_connector_module_path": "vllm_bidkv",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }


def run_recording(scheduler: Any, requests: dict[str, Any]) -> list[tuple[list[str], set[str]]]:
    """Run to completion; per step: (scheduled request ids, preempted request ids)."""
    trace: list[tuple[list[str], set[str]]] = []
    run_to_completion(
        scheduler,
        requests,
        on_step=lambda out: trace.append((sorted(out.num_scheduled_tokens), set(out.preempted_req_ids))),
    )
    return trace


def record_choices(connector: Any) -> list[str]:
    """Spy on ``connector.choose_victim``: the ids of the victims it returns, in order. The victim
    hook looks the method up on the scheduler's connector at every call, so an instance
    attribute sees every choice."""
    chosen: list[str] = []
    choose = connector.choose_victim

    def recording_choose(requests: list[Any], requester: Any = None) -> Any:
        victim = choose(requests, requester)
        assert victim in requests
        chosen.append(victim.request_id)
        return victim

    connector.choose_victim = recording_choose
    return chosen


def assert_drained(scheduler: Any, requests: dict[str, Any]) -> None:
    pool = scheduler.kv_cache_manager.block_pool
    assert all(len(r.output_token_ids) == r.max_tokens for r in requests.values())
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1  # all but the null block
    assert all(b.ref_cnt == 0 for b in pool.blocks if not b.is_null)


@pytest.mark.parametrize("policy", VICTIM_POLICIES)
def test_strategy_chooses_every_victim_and_run_completes(
    make_scheduler: Any, patched: None, policy: str
) -> None:
    scheduler = make_scheduler(
        num_gpu_blocks=28,
        max_num_seqs=8,
        kv_transfer_config=connector_config(victim_policy=policy, offload_mode="off"),
    )
    connector = scheduler.connector
    assert connector.scheduler_context is not None
    chosen = record_choices(connector)

    requests = add_requests(scheduler, 24, seed=3, prefix_len=32, lo=40, hi=160, max_out=120)
    trace = run_recording(scheduler, requests)
    preempted = [rid for _, step in trace for rid in sorted(step)]
    assert len(preempted) >= 5, "the workload must create KV pressure"
    position = 0
    for _, step in trace:  # every preemption in a step is exactly the victims chosen in it
        assert set(chosen[position : position + len(step)]) == step
        position += len(step)
    assert position == len(chosen)
    assert_drained(scheduler, requests)


def test_vllm_default_schedules_exactly_like_stock(make_scheduler: Any, patched: None) -> None:
    stock = make_scheduler(num_gpu_blocks=28, max_num_seqs=8)
    stock_trace = run_recording(
        stock, add_requests(stock, 24, seed=5, prefix_len=32, lo=40, hi=160, max_out=120)
    )
    ours = make_scheduler(
        num_gpu_blocks=28,
        max_num_seqs=8,
        kv_transfer_config=connector_config(victim_policy="vllm-default", offload_mode="off"),
    )
    requests = add_requests(ours, 24, seed=5, prefix_len=32, lo=40, hi=160, max_out=120)
    assert run_recording(ours, requests) == stock_trace
    assert sum(len(p) for _, p in stock_trace) > 0
    assert_drained(ours, requests)


def test_kill_switch_and_disabled_leave_vllm_untouched(make_scheduler: Any, patched: None) -> None:
    for extra in ({"kill_switch": True}, {"enabled": False}):
        scheduler = make_scheduler(num_gpu_blocks=40, kv_transfer_config=connector_config(**extra))
        assert "allocate_slots" not in vars(scheduler.kv_cache_manager)
        assert "_bidkv_fcfs_waiting" not in vars(scheduler)


def test_largest_first_differs_from_lifo(make_scheduler: Any, patched: None) -> None:
    """A strategy that is not LIFO must change the preemption sequence (the hook is live)."""
    traces = {}
    for policy in ("vllm-default", "largest-first"):
        scheduler = make_scheduler(
            num_gpu_blocks=28,
            max_num_seqs=8,
            kv_transfer_config=connector_config(victim_policy=policy, offload_mode="off"),
        )
        traces[policy] = run_recording(
            scheduler, add_requests(scheduler, 24, seed=3, prefix_len=32, lo=40, hi=160, max_out=120)
        )
    assert traces["vllm-default"] != traces["largest-first"]


def admissions(scheduler: Any, requests: dict[str, Any]) -> list[tuple[list[str], set[str]]]:
    """Run to completion; per step: (requests admitted for the first time, requests still waiting)."""
    waiting = set(requests)
    steps: list[tuple[list[str], set[str]]] = []

    def on_step(out: Any) -> None:
        admitted = [new.req_id for new in out.scheduled_new_reqs]
        waiting.difference_update(admitted)
        steps.append((admitted, set(waiting)))

    run_to_completion(scheduler, requests, on_step=on_step)
    assert not waiting, "every request must be admitted"
    return steps


def shorter_request_left_waiting(steps: list[tuple[list[str], set[str]]], requests: dict[str, Any]) -> int:
    """Steps that admitted a request while a strictly shorter prompt stayed waiting (SJF: none)."""
    length = {rid: r.num_prompt_tokens for rid, r in requests.items()}
    return sum(
        1
        for admitted, waiting in steps
        if admitted and waiting and max(length[r] for r in admitted) > min(length[r] for r in waiting)
    )


def test_sjf_admission_admits_shortest_prompt_first(make_scheduler: Any, patched: None) -> None:
    """All requests wait from the start and two run at a time (blocks are plenty: no preemption),
    so every admission is a choice among the waiting. Under SJF no step admits a request while a
    shorter one waits; the same workload under FCFS does (the check can tell them apart)."""
    violations = {}
    for admission in ("fcfs", "sjf"):
        scheduler = make_scheduler(
            num_gpu_blocks=200,
            max_num_seqs=2,
            kv_transfer_config=connector_config(admission=admission, offload_mode="off"),
        )
        requests = add_requests(scheduler, 10, seed=9, lo=10, hi=200)
        context_waiting = scheduler.connector.scheduler_context.waiting()
        assert sorted(r.request_id for r in context_waiting) == sorted(requests)  # the context sees the queue
        steps = admissions(scheduler, requests)
        assert sum(len(admitted) for admitted, _ in steps) == len(requests)  # nobody admitted twice
        violations[admission] = shorter_request_left_waiting(steps, requests)
        if admission == "sjf":
            first_two = sorted(requests.values(), key=lambda r: r.num_prompt_tokens)[:2]
            assert sorted(steps[0][0]) == sorted(r.request_id for r in first_two)
        assert_drained(scheduler, requests)
    assert violations["sjf"] == 0
    assert violations["fcfs"] > 0, "the workload must make FCFS and SJF admit differently"

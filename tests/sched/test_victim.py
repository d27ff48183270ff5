"""Victim selection and admission in vLLM's real Scheduler under KV pressure."""

from __future__ import annotations

from typing import Any

import pytest

from tests.sched.conftest import add_requests, run_to_completion
from vllm_bidkv.config import VICTIM_POLICIES
from vllm_bidkv.patches import hooks
from vllm_bidkv.patches.standalone import model_output

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
    chosen: list[str] = []
    choose = connector.choose_victim

    def recording_choose(requests: list[Any]) -> Any:
        victim = choose(requests)
        assert victim in requests
        chosen.append(victim.request_id)
        return victim

    connector.choose_victim = recording_choose
    # The hook captured the bound method at bind time: rebind through the patches' API.
    hooks.remove_victim_hook(scheduler)
    hooks.install_victim_hook(scheduler, recording_choose)

    requests = add_requests(scheduler, 24, seed=3, prefix_len=32, lo=40, hi=160, max_out=120)
    trace = run_recording(scheduler, requests)
    preempted = [rid for _, step in trace for rid in sorted(step)]
    assert len(preempted) >= 5, "the workload must create KV pressure"
    position = 0
    for _, step in trace:  # every preemption in a step is exactly the victims chosen in it
        assert set(chosen[position : position + len(step)]) == step
        position += len(step)
    assert position == len(chosen)
    assert connector.victim_stats.preemptions == len(chosen)
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


def test_sjf_admission_orders_waiting_by_prompt_length(make_scheduler: Any, patched: None) -> None:
    scheduler = make_scheduler(
        num_gpu_blocks=200,
        max_num_seqs=2,
        kv_transfer_config=connector_config(admission="sjf", offload_mode="off"),
    )
    requests = add_requests(scheduler, 10, seed=9, lo=10, hi=200)
    waiting = list(scheduler.connector.scheduler_context.waiting())
    lengths = [r.num_prompt_tokens for r in waiting]
    assert lengths == sorted(lengths) and len(waiting) == 10
    first = scheduler.schedule()
    shortest = sorted(requests.values(), key=lambda r: r.num_prompt_tokens)[:2]
    assert sorted(r.request_id for r in shortest) == sorted(first.num_scheduled_tokens)
    scheduler.update_from_output(first, model_output(first, requests))
    run_to_completion(scheduler, requests)
    assert_drained(scheduler, requests)


def test_pending_block_frees_wait_instead_of_preempting(make_scheduler: Any, patched: None) -> None:
    """While the connector says blocks are coming back, vLLM (0.30+) waits and no victim is chosen."""
    from vllm_bidkv.patches.capabilities import probe

    if not probe().connector_pending_block_frees:
        pytest.skip("this vLLM never asks has_pending_block_frees: it preempts as before")
    preempted = {}
    for pending in (False, True):
        scheduler = make_scheduler(
            num_gpu_blocks=28, max_num_seqs=8, kv_transfer_config=connector_config(offload_mode="off")
        )
        scheduler.connector.has_pending_block_frees = lambda pending=pending: pending
        requests = add_requests(scheduler, 24, seed=3, prefix_len=32, lo=40, hi=160, max_out=120)
        preempted[pending] = 0
        for _ in range(60):
            out = scheduler.schedule()
            preempted[pending] += len(out.preempted_req_ids)
            scheduler.update_from_output(out, model_output(out, requests))
        assert scheduler.connector.victim_stats.preemptions == preempted[pending]
    assert preempted == {False: preempted[False], True: 0} and preempted[False] > 0

"""The source patch (patches/vllm-0.33.0-scheduler-context.patch) behaves as the runtime layer.

Runs on a vLLM carrying the patch (the matrix's "vllm 0.33.0 + source patch" entry);
there the rest of the sched tier runs too, with the runtime patches standing down.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from vllm_bidkv_bench.standalone import make_request, model_output

from tests.sched.conftest import BLOCK_SIZE
from vllm_bidkv import patches
from vllm_bidkv.patches.adapter import BlockPoolContext
from vllm_bidkv.patches.capabilities import probe

pytestmark = [
    pytest.mark.sched,
    pytest.mark.skipif(not probe().vllm_binds_context, reason="needs a vLLM built with the source patch"),
]


def test_runtime_patches_stand_down_and_vllm_binds_the_connector(make_scheduler: Any) -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.sched.scheduler_context import SchedulerContext

    init = Scheduler.__init__
    try:
        assert patches.apply() == [] and patches.applied() == [] and Scheduler.__init__ is init
        scheduler = make_scheduler(
            kv_transfer_config={
                "kv_connector": "BidKVConnector",
                "kv_connector_module_path": "vllm_bidkv",
                "kv_role": "kv_both",
                "kv_connector_extra_config": {"offload_mode": "off"},
            }
        )
    finally:
        patches.revert()
    assert isinstance(scheduler.connector.scheduler_context, SchedulerContext)
    assert "allocate_slots" not in vars(scheduler.kv_cache_manager)  # no runtime victim hook


def _state(scheduler: Any) -> tuple[list[int], list[int]]:
    pool = scheduler.kv_cache_manager.block_pool
    return [b.block_id for b in pool.free_block_queue.get_all_free_blocks()], [b.ref_cnt for b in pool.blocks]


@pytest.mark.parametrize("seed", range(3))
def test_context_keeps_the_same_queue_as_the_adapter(make_scheduler: Any, seed: int) -> None:
    """Random pins and unpins interleaved with real scheduling: vLLM's SchedulerContext
    and the runtime adapter leave two identical schedulers in identical states."""
    from vllm.v1.core.sched.scheduler_context import SchedulerContext

    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 500) for _ in range(rng.randint(20, 120))] for _ in range(16)]
    prompts = [prompts[0][:32] + p if i % 3 == 0 else p for i, p in enumerate(prompts)]  # some prefix hits
    runs = []
    for make_ctx in (SchedulerContext, BlockPoolContext.for_scheduler):
        scheduler = make_scheduler(num_gpu_blocks=48, max_num_seqs=6)
        requests = {}
        for i, prompt in enumerate(prompts):
            req = make_request(f"r{i}", prompt, 24, block_size=BLOCK_SIZE, arrival_time=float(i))
            requests[req.request_id] = req
            scheduler.add_request(req)
        runs.append((scheduler, requests, make_ctx(scheduler)))

    ops = random.Random(seed + 100)
    pinned: list[int] = []  # our references, one entry each
    pinned_while_free = 0
    while runs[0][0].has_requests():
        free_ids = [v.block_id for v in runs[0][2].iter_free_blocks()]
        held = [i for i, ref_cnt in enumerate(_state(runs[0][0])[1]) if ref_cnt > 0 and i != 0]
        touch = ops.sample(free_ids, min(len(free_ids), ops.randint(0, 3)))
        pinned_while_free += len(touch)
        touch += ops.sample(held, min(len(held), ops.randint(0, 1)))
        ops.shuffle(pinned)
        cut = ops.randint(0, len(pinned))
        release, pinned = pinned[:cut], pinned[cut:] + touch
        step = []
        for scheduler, requests, ctx in runs:
            ctx.touch(touch)
            ctx.free_blocks(release)
            out = scheduler.schedule()
            scheduler.update_from_output(out, model_output(out, requests))
            step.append((sorted(out.num_scheduled_tokens), _state(scheduler)))
        assert step[0] == step[1]
    for _, _, ctx in runs:
        ctx.free_blocks(pinned)
    assert _state(runs[0][0]) == _state(runs[1][0])
    assert pinned_while_free > 20


def test_a_multi_connector_hands_the_context_hooks_to_its_children(
    make_scheduler: Any, tmp_path: Any
) -> None:
    """Ours inside vLLM's MultiConnector, beside vLLM's ExampleConnector: the patched Scheduler
    binds our child, asks it for every victim and admits in its order. The MultiConnector
    forwards the SchedulerContext hooks (not per-request hooks, so nothing else would)."""
    from vllm.v1.core.sched.request_queue import KeyedRequestQueue
    from vllm.v1.core.sched.scheduler_context import SchedulerContext

    from tests.sched.conftest import add_requests
    from tests.sched.test_victim import assert_drained, connector_config, record_choices, run_recording

    multi = {
        "kv_connector": "MultiConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "connectors": [
                connector_config(victim_policy="lcf", admission="sjf", offload_mode="off"),
                {
                    "kv_connector": "ExampleConnector",
                    "kv_role": "kv_both",
                    "kv_connector_extra_config": {"shared_storage_path": str(tmp_path)},
                },
            ]
        },
    }
    scheduler = make_scheduler(num_gpu_blocks=28, max_num_seqs=8, kv_transfer_config=multi)
    ours = scheduler.connector._connectors[0]
    assert isinstance(ours.scheduler_role.side.ctx, SchedulerContext)
    assert isinstance(scheduler.waiting, KeyedRequestQueue)
    chosen = record_choices(ours)
    requests = add_requests(scheduler, 24, seed=3, prefix_len=32, lo=40, hi=160, max_out=120)
    preempted = [rid for _, step in run_recording(scheduler, requests) for rid in sorted(step)]
    assert len(preempted) >= 5, "the workload must create KV pressure"
    assert sorted(chosen) == sorted(preempted)
    assert_drained(scheduler, requests)

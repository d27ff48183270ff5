"""``offload_mode: auto`` on vLLM's real Scheduler: each computed block is offered to the tier
in the step both its KV and its hash exist, with and without async scheduling.

The connector reads only the requests that may have filled a block in a step
(``StepEvents.filled``): new and resumed ones, those whose forward completes a block, and
those whose last full block vLLM had not hashed yet. Under async scheduling a decode's
token, and so the hash of the block it completes, is known a step after the step that
computes it: the block must be offered then, not when the request fills its next block.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from vllm_bidkv_bench.standalone import model_output

from tests.sched.conftest import add_requests
from tests.sched.test_connector_scheduler import DelayedCopyWorker
from tests.sched.test_victim import assert_drained, connector_config

pytestmark = [pytest.mark.sched, pytest.mark.usefixtures("offload_supported")]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_auto_offers_each_block_in_the_step_its_kv_and_hash_exist(
    make_scheduler: Any, patched: None, async_scheduling: bool
) -> None:
    scheduler = make_scheduler(
        num_gpu_blocks=400,  # no pressure: every block is offered by auto, none by the walk
        max_num_seqs=8,
        kv_transfer_config=connector_config(offload_mode="auto", cpu_bytes=64 * 1024 * 1024),
        async_scheduling=async_scheduling,
    )
    requests = add_requests(scheduler, 12, seed=5, prefix_len=40, lo=20, hi=90, max_out=80)
    tier = scheduler.connector.scheduler_role.side.planner.tier
    worker = DelayedCopyWorker(delay=2)
    bs = scheduler.block_size
    pending: list[tuple[Any, dict[str, Any]]] = []
    offered = steps = 0
    while scheduler.has_requests() or pending:
        if scheduler.has_requests():
            out = scheduler.schedule()
            for request_id in out.num_scheduled_tokens:
                request = requests[request_id]
                # KV computed by this step's forward (vLLM advanced the request at schedule)
                # and hashed: the tier holds or is storing it once this step's plan is out.
                full = min(len(request.block_hashes), request.num_computed_tokens // bs)
                missing = [i for i in range(full) if not tier.contains(request.block_hashes[i])]
                assert not missing, f"step {steps}: {request_id}'s blocks {missing} not offered"
                offered += full
            worker.submit(out.kv_connector_metadata)
            snapshot = {
                rid: SimpleNamespace(
                    num_computed_tokens=requests[rid].num_computed_tokens, num_tokens=requests[rid].num_tokens
                )
                for rid in out.num_scheduled_tokens
            }
            pending.append((out, snapshot))
        # Async scheduling: the output of step N is processed after step N+1 was scheduled.
        if len(pending) == (2 if async_scheduling else 1) or (pending and not scheduler.has_requests()):
            done, snapshot = pending.pop(0)
            kwargs = {"kv_connector_output": worker.output()}
            scheduler.update_from_output(done, model_output(done, snapshot, **kwargs))
        steps += 1
        assert steps < 5000
    # Decodes filled blocks (not only prompts), and every store completed and was released.
    assert any(r.num_output_tokens > bs for r in requests.values()) and offered > 0
    stats = scheduler.connector.scheduler_role.side.planner.stats()
    assert stats["pending_jobs"] == 0 and stats["gpu_blocks_held"] == 0
    assert not scheduler.connector.scheduler_role.side.offers_behind
    assert_drained(scheduler, requests)

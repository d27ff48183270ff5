"""Injected copy failures on the real engine (the ``FaultPlan`` test hook of connectors/faults.py).

One engine with BidKVConnector (lazy offload, 64 MiB tier) under the pressure of
tests/engine/engine_run.py (36 blocks of 32 tokens) runs 16 of its prompts (96 output
tokens) in two phases; a stock engine runs the same prompts once. Preempted requests
are rescued into the tier and load their blocks back when they resume:

* A: every store batch fails, mid-batch (half its blocks copied, then an error): the
  tier must end without any entry, nothing pinned, every gauge at its idle value;
* B: every second load job fails, mid-batch: those blocks are recomputed, outputs stay
  identical to stock, ``load_errors`` counts exactly the injected blocks.

The engine core and its worker run in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
so the phase switch is ``set_faults`` and the scheduler side is inspected directly.
Usage of the runner: python -m tests.engine.test_faults stock|faults OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import pytest

pytestmark = pytest.mark.engine
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


NUM_PROMPTS, MAX_TOKENS = 16, 96


def _generate(llm: Any) -> list[list[int]]:
    from vllm import SamplingParams

    from tests.engine.engine_run import prompts

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [
        list(o.outputs[0].token_ids) for o in llm.generate(prompts()[:NUM_PROMPTS], params, use_tqdm=False)
    ]


def _phase(llm: Any, side: Any, plan: Any) -> dict[str, Any]:
    from vllm_bidkv.connectors.faults import set_faults

    before = side.counters.totals()
    aborted_before = side.planner.aborted_store_blocks
    from tests.engine.engine_run import drain

    set_faults(plan)
    outputs = _generate(llm)
    drain_steps = drain(llm)  # as vLLM's engine loop: while copies are in flight
    set_faults(None)
    side.planner.tier.check()
    after = side.counters.totals()
    return {
        "outputs": outputs,
        "counters": {k: after[k] - before[k] for k in after},
        "aborted_store_blocks": side.planner.aborted_store_blocks - aborted_before,
        "injected": dict(plan.injected),
        "gauges": side.gauges(),
        "drain_steps": drain_steps,
    }


def run(mode: str) -> dict[str, Any]:
    from vllm import LLM
    from vllm_bidkv_bench.tiny_model import tiny_model_dir

    from vllm_bidkv.connectors.faults import FaultPlan

    connector = {
        "kv_connector": "BidKVConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"cpu_bytes": "64MiB", "offload_mode": "lazy"},
    }
    llm = LLM(
        model=str(tiny_model_dir()),
        dtype="float32",
        block_size=32,
        num_gpu_blocks_override=36,
        max_num_seqs=16,
        max_model_len=1024,
        gpu_memory_utilization=0.3,
        enforce_eager=True,
        disable_log_stats=False,
        seed=0,
        kv_transfer_config=connector if mode == "faults" else None,
    )
    if mode == "stock":
        return {"outputs": _generate(llm)}
    side = llm.llm_engine.engine_core.engine_core.scheduler.connector.scheduler_role.side
    # Completions come 3 and 1 steps late, as unfinished CUDA events would.
    stores = _phase(llm, side, FaultPlan(store_every=1, mid_batch=True, complete_after_steps=3))
    assert llm.reset_prefix_cache(reset_connector=True)
    loads = _phase(llm, side, FaultPlan(load_every=2, mid_batch=True, complete_after_steps=1))
    return {"stores_fail": stores, "loads_fail": loads}


def _run(mode: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        proc = subprocess.run(
            [sys.executable, "-m", "tests.engine.test_faults", mode, out],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        with open(out) as f:
            result: dict[str, Any] = json.load(f)
    return result


@pytest.fixture(scope="module")
def faulty() -> dict[str, Any]:
    return _run("faults")


@pytest.fixture(scope="module")
def stock_outputs() -> list[list[int]]:
    outputs: list[list[int]] = _run("stock")["outputs"]
    assert len(outputs) == NUM_PROMPTS and all(len(o) == MAX_TOKENS for o in outputs)
    return outputs


def _assert_idle(gauges: dict[str, int]) -> None:
    from vllm_bidkv.counters import IDLE_ZERO_GAUGES

    busy = {name: gauges[name] for name in IDLE_ZERO_GAUGES if gauges[name]}
    assert not busy, f"gauges not at idle: {busy}"


def test_failed_stores_leave_no_entry_and_nothing_pinned(
    faulty: dict[str, Any], stock_outputs: list[list[int]]
) -> None:
    phase = faulty["stores_fail"]
    assert phase["injected"]["store_blocks"] > 0, "the plan must have failed some stores"
    assert phase["counters"]["preemptions"] > 0  # rescues were attempted (and failed)
    assert phase["counters"]["blocks_stored"] == 0
    assert phase["aborted_store_blocks"] == phase["injected"]["store_blocks"]
    assert phase["gauges"]["tier_entries"] == 0 and phase["gauges"]["tier_used_bytes"] == 0
    assert phase["counters"]["blocks_loaded"] == 0 and phase["counters"]["cpu_hit_blocks"] == 0
    _assert_idle(phase["gauges"])
    assert phase["drain_steps"] > 0, "completions came late: the engine drained them after the run"
    assert phase["outputs"] == stock_outputs


def test_failed_loads_are_recomputed_and_counted(
    faulty: dict[str, Any], stock_outputs: list[list[int]]
) -> None:
    phase = faulty["loads_fail"]
    injected = phase["injected"]
    assert injected["load_blocks"] > 0, "the plan must have failed some loads"
    assert phase["counters"]["load_errors"] == injected["load_blocks"]
    assert phase["counters"]["blocks_loaded"] > 0  # the loads that were not failed still served
    assert phase["counters"]["cpu_hit_blocks"] == phase["counters"]["blocks_loaded"] + injected["load_blocks"]
    _assert_idle(phase["gauges"])
    assert phase["drain_steps"] > 0
    assert phase["outputs"] == stock_outputs


if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    result = run(sys.argv[1])
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)

"""The real engine and the simulator on one trace: same scheduler, same preemptions.

Two engine starts (stock, bidkv+offload), each in its own process like every engine
run. All requests arrive at t=0, so wall-clock arrival timing cannot change what the
scheduler sees; the engine and the simulator then run the same Scheduler (and
connector) code on the same requests with the same block count. Stock must agree
exactly (the sampled tokens differ, real greedy vs a constant, but that only changes
output-block hashes no other request shares). With offload one thing legitimately
differs: when a store completes. The CPU worker copies synchronously and reports a
store in the step that issued it; the simulator's H100 side stream finishes it a step
or more later, so pinned blocks return to the free pool at different steps and an
allocation can fail in one run and not the other. Hence the tolerance, max(1, 10%).
"""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from vllm_bidkv_bench.configs import CONFIGS
from vllm_bidkv_bench.costmodel import H100_LLAMA3_8B
from vllm_bidkv_bench.engine import run_config
from vllm_bidkv_bench.metrics import StepCounters
from vllm_bidkv_bench.presets import get_preset
from vllm_bidkv_bench.sim import simulate
from vllm_bidkv_bench.workloads import TraceRequest, Workload

pytestmark = pytest.mark.engine

# 36 blocks of 32 tokens, 16 slots: preempts. Eager: compiling the model would take most of the test.
PRESET = replace(get_preset("cpu-tiny"), enforce_eager=True)


def burst_at_zero() -> Workload:
    rng = random.Random(0)
    requests = []
    for i in range(20):
        prefix = 96 + 32 * (i % 3)
        requests.append(
            TraceRequest(0.0, prefix + rng.randint(40, 160), rng.randint(60, 140), f"sys{i % 3}", prefix)
        )
    return Workload("burst", 0, requests)


@pytest.fixture(scope="module")
def stock_outputs() -> dict[str, list[int]]:
    return {}


@pytest.mark.parametrize("config", ["stock", "bidkv+offload"])
def test_sim_and_engine_agree(config: str, stock_outputs: dict[str, list[int]]) -> None:
    workload = burst_at_zero()
    engine = run_config(workload, CONFIGS[config], PRESET, admission="fcfs")
    sim = simulate(workload, CONFIGS[config], PRESET, H100_LLAMA3_8B)

    expected = [r.output_len for r in workload.requests]
    assert [t["num_output_tokens"] for t in engine["timings"]] == expected
    assert [t.num_output_tokens for t in sim.timings] == expected
    engine_preemptions = StepCounters(**engine["counters"]).preemptions
    print(f"{config}: engine {engine_preemptions} preemptions, sim {sim.counters.preemptions}")
    assert engine["metrics"]["vllm:num_preemptions"] == engine_preemptions  # probe == vLLM's own counter
    assert engine_preemptions > 0
    assert abs(engine_preemptions - sim.counters.preemptions) <= max(1, 0.1 * engine_preemptions)

    if config == "stock":
        stock_outputs.update(engine["outputs"])
    elif stock_outputs:  # greedy outputs with the connector equal stock's
        assert engine["outputs"] == stock_outputs

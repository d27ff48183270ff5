"""The real-engine runner: one ``vllm.LLM`` per config, each in a fresh process.

A fresh process per config keeps the plugin's patches and vLLM's global state from
leaking between configs; configs without the connector run with ``BIDKV_DISABLE=1``,
i.e. stock vLLM with nothing patched. The engine core runs in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so ``SchedulerProbe`` measures the real
Scheduler exactly as it measures the simulator's.

The model and engine knobs are the preset's (``bench engine --model --dtype --block-size
...`` override them): a model made here (``tiny_model.BUILTIN_MODELS``) or any path or name
vLLM loads, on whatever device vLLM runs on. Requests are added at their arrival times on
the wall clock and the engine is stepped (``LLMEngine.step``: schedule -> execute ->
update) in between; greedy sampling with ``ignore_eos`` so every request produces exactly
its ``output_len`` tokens. Closed-loop workloads (``chat``, ``agentic``) send each turn
when the previous answer is complete, with that answer's tokens in its prompt. The
workload's first requests are played 10× compressed as a warm-up in each process, then
the whole workload is played and measured (see ``_child``); engine counters are
differences over that pass. ``StepProfile`` times the
parts of each measured step.
Latencies come from vLLM's per-request ``RequestOutput.metrics`` (arrival, first-token
latency, first/last token timestamps); engine-wide counters from ``LLM.get_metrics()``.
A vLLM peer (``vllm-offloading*``) runs whole; where vLLM's own worker refuses the platform
(vLLM on CPU) its worker copies with ``vllm_bidkv_bench.peer_spec`` (``cpu_copy_peer``). Its
own counters are recorded as ``peer_counters``, and a peer that never stored or loaded in a
pass with preemptions fails the run (``peer_counters``).

The parent (``run_config``) pickles the workload, starts
``python -m vllm_bidkv_bench.engine JOB RESULT`` and reads the result back.
"""

from __future__ import annotations

import heapq
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vllm_bidkv_bench.configs import CONFIGS, RunConfig
from vllm_bidkv_bench.metrics import ConnectorTimer, RequestTiming, SchedulerProbe
from vllm_bidkv_bench.presets import BenchPreset
from vllm_bidkv_bench.workloads import Workload

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
        played, job, result = Path(tmp, "workload.pkl"), Path(tmp, "job.json"), Path(tmp, "result.json")
        # Pickled, not a JSONL trace: a closed-loop workload has no fixed trace (its sessions go along).
        played.write_bytes(pickle.dumps(workload))
        job.write_text(
            json.dumps(
                {
                    "workload": str(played),
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
        env.update(dict(config.env))
        proc = subprocess.run(
            [sys.executable, "-m", "vllm_bidkv_bench.engine", str(job), str(result)],
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
    with open(job["workload"], "rb") as f:
        workload: Workload = pickle.load(f)

    from vllm import LLM
    from vllm.config import KVTransferConfig

    from vllm_bidkv_bench.tiny_model import model_path

    cpu_copy_peer = peer_needs_cpu_copy()
    kv = config.kv_transfer_config(job["admission"], preset.cpu_bytes, cpu_copy_peer=cpu_copy_peer)
    started = time.perf_counter()
    llm = LLM(
        model=model_path(preset.model),
        block_size=preset.block_size,
        num_gpu_blocks_override=preset.unbounded_blocks if config.unbounded else preset.num_gpu_blocks,
        max_num_seqs=preset.max_num_seqs,
        max_num_batched_tokens=preset.max_num_batched_tokens,
        max_model_len=preset.max_model_len,
        gpu_memory_utilization=preset.gpu_memory_utilization,
        tensor_parallel_size=preset.tensor_parallel_size,
        enable_prefix_caching=True,
        disable_log_stats=False,
        seed=0,
        dtype=preset.dtype,
        enforce_eager=preset.enforce_eager,
        kv_transfer_config=KVTransferConfig(**kv) if kv else None,
    )
    start_s = time.perf_counter() - started
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    group = scheduler.kv_cache_config.kv_cache_groups[0]
    block_bytes = int(group.kv_cache_spec.page_size_bytes) * len(group.layer_names)

    # Warm-up: play the trace's first requests unmeasured. The first steps of a batch shape
    # pay for torch.compile on this backend, which would otherwise land on whichever config
    # meets the shape first. Arrivals and think times are compressed 10× (a calibrated
    # preset's pass is mostly waiting for them). Then every cache (GPU prefix cache and the
    # connector's CPU tier) is reset.
    _, _, _, warmup_s = _replay(engine, workload.head(WARMUP_REQUESTS), "warmup-", pace=WARMUP_PACE)
    if not llm.reset_prefix_cache(reset_connector=True):
        raise RuntimeError("engine: could not reset the prefix cache after the warm-up pass")
    before = _metrics(llm)
    host_hits_before = _host_hit_tokens(llm) if config.is_peer else 0.0
    profile = StepProfile(engine, scheduler, preset.max_num_seqs)  # inside the probe: times vLLM only
    probe = SchedulerProbe(scheduler)
    timings, outputs, prompts, run_s = _replay(engine, workload, "")
    after = _metrics(llm)
    result = {
        "timings": timings,
        "counters": asdict(probe.counters),
        "outputs": outputs,
        "metrics": {name: after[name] - before.get(name, 0) for name in after},
        "block_bytes": block_bytes,
        "profile": profile.summary(probe.counters.loaded_blocks * preset.block_size),
        "start_s": start_s,
        "warmup_s": warmup_s,
        "run_s": run_s,
        # The 1-minute load average at the end of the measured pass: a shared 2-core box
        # makes wall-clock latencies noisy, so every record says how busy it was.
        "load_avg": os.getloadavg()[0],
    }
    if workload.sessions is not None:  # closed loop: what each turn really sent
        result["prompts"] = prompts
    if config.is_peer:
        result["label"] = config.engine_label(cpu_copy_peer)
        host_hits = _host_hit_tokens(llm) - host_hits_before
        result["peer_counters"] = peer_counters(config, probe, scheduler, host_hits)
    Path(result_path).write_text(json.dumps(result))


class StepProfile:
    """Where the wall time of an engine step goes: ``time.perf_counter`` around vLLM's own calls.

    ``step_s``: ``LLMEngine.step`` as a whole; ``schedule_s`` / ``update_s``: the Scheduler's
    ``schedule`` / ``update_from_output``, whose connector part (its scheduler-side methods and
    the victim hook) is also ``connector_s``; ``executor_s`` = the rest: the forward, sampling,
    the connector's worker side and output processing. The worker side is timed apart
    (``load_s``, ``store_s``) where it runs in this process (one worker, no TP). Per step,
    (scheduled tokens, executor seconds) is fitted as ``fixed + per_token × tokens``: the
    per-token slope is what a recomputed token costs, the intercept what every step costs
    whatever it computes (vLLM's per-step Python included).
    """

    def __init__(self, engine: Any, scheduler: Any, full_batch: int) -> None:
        from vllm_bidkv.patches import hooks

        self.full_batch = full_batch
        self.schedule_s = self.update_s = self.step_s = self.load_s = self.store_s = 0.0
        self.full_batch_scheduler_s = self.full_batch_connector_s = 0.0
        self.points: list[tuple[int, float]] = []
        self.max_running = 0
        self._tokens = 0
        self._running = 0
        self._in_scheduler = 0.0
        self._connector_at_step = 0.0
        self.timer: ConnectorTimer | None = None
        if scheduler.connector is not None:
            self.timer = ConnectorTimer(scheduler.connector)
            hooks.add_victim_choice_observer(self.timer)  # for the child process's life
        schedule, update, step = scheduler.schedule, scheduler.update_from_output, engine.step

        def timed_schedule(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = schedule(*args, **kwargs)
            self.schedule_s += (dt := time.perf_counter() - t0)
            self._in_scheduler += dt
            self._tokens += out.total_num_scheduled_tokens
            self._running = len(scheduler.running)
            return out

        def timed_update(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            out = update(*args, **kwargs)
            self.update_s += (dt := time.perf_counter() - t0)
            self._in_scheduler += dt
            return out

        def timed_step() -> Any:
            self._tokens, self._in_scheduler = 0, 0.0
            connector_before = self.connector_s
            t0 = time.perf_counter()
            out = step()
            dt = time.perf_counter() - t0
            self.step_s += dt
            if self._tokens:
                self.points.append((self._tokens, dt - self._in_scheduler))
            self.max_running = max(self.max_running, self._running)
            if self._running >= self.full_batch:
                self.full_batch_scheduler_s += self._in_scheduler
                self.full_batch_connector_s += self.connector_s - connector_before
            return out

        scheduler.schedule, scheduler.update_from_output, engine.step = (
            timed_schedule,
            timed_update,
            timed_step,
        )
        self._time_worker()

    @property
    def connector_s(self) -> float:
        return self.timer.total if self.timer is not None else 0.0

    def _time_worker(self) -> None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

        if not has_kv_transfer_group():  # no connector, or workers in other processes
            return
        worker = get_kv_transfer_group()

        def timed(fn: Any, field: str) -> Any:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    setattr(self, field, getattr(self, field) + time.perf_counter() - t0)

            return wrapper

        worker.start_load_kv = timed(worker.start_load_kv, "load_s")
        # Rescues run at bind time (before the forward), stores after it: both are stores.
        worker.bind_connector_metadata = timed(worker.bind_connector_metadata, "store_s")
        worker.wait_for_save = timed(worker.wait_for_save, "store_s")

    def summary(self, loaded_tokens: int) -> dict[str, Any]:
        scheduler_s = self.schedule_s + self.update_s
        fixed_s, per_token_s = fit_line(self.points)
        return {
            "tool": "time.perf_counter around LLMEngine.step, Scheduler.schedule/update_from_output, "
            "the connector's scheduler-side methods and victim hook, its worker's load/store calls",
            "steps": len(self.points),
            "step_s": self.step_s,
            "schedule_s": self.schedule_s,
            "update_s": self.update_s,
            "connector_s": self.connector_s,
            "executor_s": self.step_s - scheduler_s,
            "load_s": self.load_s,
            "store_s": self.store_s,
            "connector_share": self.connector_s / scheduler_s if scheduler_s else 0.0,
            "connector_by_call": dict(self.timer.by_call) if self.timer is not None else {},
            "max_running": self.max_running,
            "full_batch": self.full_batch,
            "full_batch_connector_share": (
                self.full_batch_connector_s / self.full_batch_scheduler_s
                if self.full_batch_scheduler_s
                else None
            ),
            "fixed_step_ms": 1e3 * fixed_s,
            "per_token_ms": 1e3 * per_token_s,
            "loaded_tokens": loaded_tokens,
            "load_per_token_ms": 1e3 * self.load_s / loaded_tokens if loaded_tokens else None,
        }


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b·x``: (a, b); (mean y, 0) when every x is the same."""
    n = len(points)
    if n == 0:
        return 0.0, 0.0
    sx = sum(x for x, _ in points)
    sy = sum(y for _, y in points)
    sxx = sum(x * x for x, _ in points)
    sxy = sum(x * y for x, y in points)
    denom = n * sxx - sx * sx
    if denom == 0:
        return sy / n, 0.0
    b = (n * sxy - sx * sy) / denom
    return (sy - b * sx) / n, b


def _metrics(llm: Any) -> dict[str, float]:
    return {m.name: m.value for m in llm.get_metrics() if m.name in ENGINE_METRICS}


def _host_hit_tokens(llm: Any) -> float:
    """vLLM's ``prompt_tokens_cached_by_source{source="host"}``: prompt tokens of new requests
    that a connector attributed to its CPU tier (``get_external_cache_hit_sources``)."""
    return sum(
        float(m.value)
        for m in llm.get_metrics()
        if m.name == "vllm:prompt_tokens_cached_by_source" and m.labels.get("source") == "host"
    )


# Per peer, its own counters (``get_kv_connector_stats``, summed over the measured pass) that
# must move when it stores and when it loads: a peer that never did either under pressure
# (preemptions) did not run, and the run fails rather than report it as a result.
PEER_ACTIVITY = {
    "offloading": ("vllm:kv_offload_store_bytes", "vllm:kv_offload_load_bytes"),
    "simple-offload": ("vllm:simple_kv_offload_load_blocks_total",),
}


def peer_needs_cpu_copy() -> bool:
    """Whether vLLM's own offloading worker refuses this platform (``CPUOffloadingSpec.get_worker``
    builds one on CUDA-alike and XPU only), so a peer runs with our CPU copy handler."""
    from vllm.platforms import current_platform

    return not (current_platform.is_cuda_alike() or current_platform.is_xpu())


def peer_counters(
    config: RunConfig, probe: SchedulerProbe, scheduler: Any, host_hit_tokens: float
) -> dict[str, float]:
    """A peer's own counters over the measured pass, as the simulator records them: its stats
    (``get_kv_connector_stats`` through vLLM's scheduler stats, reduced and summed) and the
    tokens it said its CPU tier supplied (``host_hit_tokens``: vLLM's
    ``prompt_tokens_cached_by_source{source="host"}``, from the connector's
    ``get_external_cache_hit_sources``; new requests only). Raises when the peer did not store
    or load in a pass with preemptions."""
    counters = probe.connector_stats(type(scheduler.connector))
    counters["host_hit_tokens"] = host_hit_tokens
    check_peer_activity(config, counters, probe.counters.preemptions)
    return counters


def check_peer_activity(config: RunConfig, counters: dict[str, float], preemptions: int) -> None:
    """Raise when a peer's own activity counters (``PEER_ACTIVITY``) never moved in a pass
    with preemptions: its worker did not store or load, and its record would mean nothing."""
    idle = [name for name in PEER_ACTIVITY.get(config.connector, ()) if not counters.get(name)]
    if preemptions > 0 and idle:
        raise RuntimeError(
            f"config {config.name}: {preemptions} preemptions but the peer's own "
            f"counters never moved ({', '.join(idle)}): its worker did not store or load"
        )


WARMUP_REQUESTS, WARMUP_PACE = 8, 0.1


def _replay(
    engine: Any, workload: Workload, prefix: str, pace: float = 1.0
) -> tuple[list[dict[str, Any]], dict[str, list[int]], dict[str, list[int]], float]:
    """Add requests at their arrival times and step the engine until all finish.

    Closed loop (``chat``, ``agentic``, ``multi-round-qa``): a finished turn's next turn (its
    prompt + the output just received + a new message) joins the arrivals at finish + think
    time. ``pace`` multiplies arrival times and think times (the warm-up's compression).
    Returns per-request timings (in ``requests`` order), outputs and prompts by request id,
    and the pass's wall time."""
    from vllm import SamplingParams

    workload = workload.replay()  # closed loop: from the first turns, with fresh sessions
    vocab = engine.model_config.get_vocab_size()
    pending = [(r.arrival_s * pace, i) for i, r in enumerate(workload.requests)]
    heapq.heapify(pending)
    index: dict[str, int] = {}
    timings: dict[int, dict[str, Any]] = {}
    outputs: dict[str, list[int]] = {}
    prompts: dict[str, list[int]] = {}
    wall0, clock0 = time.time(), time.monotonic()
    while len(timings) < workload.total_requests:
        now = time.monotonic() - clock0
        while pending and pending[0][0] <= now:
            at, i = heapq.heappop(pending)
            req, rid = workload.requests[i], workload.request_id(i)
            params = SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
            prompts[rid] = workload.prompt_token_ids(i, vocab)
            index[prefix + rid] = i
            # vLLM measures latencies from arrival_time: the trace's, as a server would see it.
            arrival = wall0 + at
            engine.add_request(prefix + rid, {"prompt_token_ids": prompts[rid]}, params, arrival_time=arrival)
        if not engine.has_unfinished_requests():
            if not pending:
                raise RuntimeError(f"engine: {workload.name} stopped after {len(timings)} requests")
            time.sleep(max(0.0, pending[0][0] - (time.monotonic() - clock0)))
            continue
        for out in engine.step():
            if out.finished:
                i = index[out.request_id]
                rid = workload.request_id(i)
                outputs[rid] = list(out.outputs[0].token_ids)
                timings[i] = _timing(out, wall0, workload.requests[i])
                finished = time.monotonic() - clock0
                turn = workload.on_finish(i, prompts[rid], outputs[rid], finished)
                if turn is not None:  # at finish + think time × pace
                    heapq.heappush(
                        pending, (finished + (workload.requests[turn].arrival_s - finished) * pace, turn)
                    )
    return [timings[i] for i in range(len(workload.requests))], outputs, prompts, time.monotonic() - clock0


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

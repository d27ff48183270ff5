"""Measurements every runner takes the same way, and the per-run summary record.

``SchedulerProbe`` wraps one Scheduler's ``schedule`` and ``update_from_output`` on the
instance (read-only: it calls the originals and looks at what they return), so the
simulator and the real engine (in-process engine core) are measured by the same code,
from vLLM's own outputs — never from the connector's counters, so stock vLLM is measured
exactly like BidKV:

* preemptions: ``SchedulerOutput.preempted_req_ids``;
* recomputed prefill tokens: per request, the highest context position ever computed;
  a scheduled chunk ``[num_computed_tokens, +n)`` below that mark is work done again;
* loaded / stored blocks: the load and store jobs of the connector's metadata in the
  same ``SchedulerOutput`` (what the worker is told to copy);
* CPU-tier hit rate: vLLM's connector prefix-cache stats (``update_from_output``'s
  ``scheduler_stats``; tokens the connector supplied / tokens it was asked about, new and
  resumed requests together).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StepCounters:
    steps: int = 0
    scheduled_tokens: int = 0
    preemptions: int = 0
    recomputed_prefill_tokens: int = 0
    loaded_blocks: int = 0
    stored_blocks: int = 0
    connector_queries: int = 0
    connector_hits: int = 0


def plan_blocks(scheduler_output: Any) -> tuple[int, int, int]:
    """Blocks this step's plan loads and rescues (before the forward) and stores (after it).

    BidKV's plan, or the jobs of vLLM's own offloading connectors (OffloadingConnector's
    ``load_jobs`` / ``store_jobs``, SimpleCPUOffloadConnector's load / store block lists),
    counted as loads and stores (no rescues)."""
    meta = scheduler_output.kv_connector_metadata
    plan = getattr(meta, "plan", None)
    if plan is None:
        if hasattr(meta, "load_jobs") and hasattr(meta, "store_jobs"):  # OffloadingConnector
            loads = sum(len(job.dst_spec.block_ids) for job in meta.load_jobs.values())
            return loads, 0, sum(len(job.src_spec.block_ids) for job in meta.store_jobs.values())
        if hasattr(meta, "load_gpu_blocks") and hasattr(meta, "store_gpu_blocks"):  # SimpleCPUOffload
            return len(meta.load_gpu_blocks), 0, len(meta.store_gpu_blocks)
        return 0, 0, 0

    def blocks(jobs: Any) -> int:
        return sum(len(job.gpu_block_ids) for job in jobs)

    return blocks(plan.loads), blocks(plan.rescues), blocks(plan.stores)


# Connector methods the Scheduler calls; timed when the connector defines them.
CONNECTOR_CALLS = (
    "get_num_new_matched_tokens",
    "update_state_after_alloc",
    "build_connector_meta",
    "update_connector_output",
    "request_finished",
    "request_finished_all_groups",
    "update_state_after_free",
    "has_pending_block_frees",
    "has_pending_push_work",
    "on_new_request",
    "get_kv_connector_stats",
    # A source-patched vLLM asks the connector itself (no victim hook); with the hook they run
    # inside it and count as ``victim_hook``.
    "wait_for_frees",
    "choose_victim",
)


VICTIM_HOOK = "victim_hook"
"""``ConnectorTimer.by_call``'s name for the time the victim hook spends choosing."""


class ConnectorTimer:
    """Wall time inside the connector's scheduler-side calls (outermost call only), in all
    (``total``) and per outermost call (``by_call``; the victim hook as ``victim_hook``)."""

    def __init__(self, connector: Any) -> None:
        self.total = 0.0
        self.by_call: dict[str, float] = {}
        self._depth = 0
        self._start = 0.0
        self._outermost = VICTIM_HOOK
        for name in CONNECTOR_CALLS:
            method = getattr(connector, name, None)
            if callable(method):
                setattr(connector, name, self.wrap(name, method))

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.victim_choice_finished()

        return timed

    # The victim hook's observer interface (patches.hooks.add_victim_choice_observer): its
    # choice is the connector's time too; calls nested in it are counted once.
    def victim_choice_started(self) -> None:
        self._enter(VICTIM_HOOK)

    def _enter(self, name: str) -> None:
        self._depth += 1
        if self._depth == 1:
            self._outermost = name
            self._start = time.perf_counter()

    def victim_choice_finished(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            elapsed = time.perf_counter() - self._start
            self.total += elapsed
            self.by_call[self._outermost] = self.by_call.get(self._outermost, 0.0) + elapsed


class SchedulerProbe:
    def __init__(self, scheduler: Any) -> None:
        self.counters = StepCounters()
        self._high_water: dict[str, int] = {}
        self._stats_payloads: list[dict[str, Any]] = []
        schedule, update = scheduler.schedule, scheduler.update_from_output

        def probed_schedule(*args: Any, **kwargs: Any) -> Any:
            out = schedule(*args, **kwargs)
            self._on_schedule(out)
            return out

        def probed_update(scheduler_output: Any, model_output: Any) -> Any:
            result = update(scheduler_output, model_output)
            self._on_update(result)
            return result

        scheduler.schedule = probed_schedule
        scheduler.update_from_output = probed_update

    def _advance(self, req_id: str, start: int, n: int) -> None:
        mark = self._high_water.get(req_id, 0)
        self.counters.recomputed_prefill_tokens += max(0, min(start + n, mark) - start)
        self._high_water[req_id] = max(mark, start + n)

    def _on_schedule(self, out: Any) -> None:
        c = self.counters
        c.steps += 1
        c.scheduled_tokens += out.total_num_scheduled_tokens
        c.preemptions += len(out.preempted_req_ids or ())
        for new in out.scheduled_new_reqs:
            self._advance(new.req_id, new.num_computed_tokens, out.num_scheduled_tokens[new.req_id])
        cached = out.scheduled_cached_reqs
        for req_id, start in zip(cached.req_ids, cached.num_computed_tokens, strict=True):
            self._advance(req_id, start, out.num_scheduled_tokens[req_id])
        for req_id in out.finished_req_ids:
            self._high_water.pop(req_id, None)
        loads, rescues, stores = plan_blocks(out)
        c.loaded_blocks += loads
        c.stored_blocks += rescues + stores

    def _on_update(self, result: Any) -> None:
        for outputs in (result or {}).values():
            stats = getattr(getattr(outputs, "scheduler_stats", None), "connector_prefix_cache_stats", None)
            if stats is not None:
                self.counters.connector_queries += stats.queries + stats.preempted_queries
                self.counters.connector_hits += stats.hits + stats.preempted_hits
            payload = getattr(getattr(outputs, "scheduler_stats", None), "kv_connector_stats", None)
            if payload:
                self._stats_payloads.append(payload)

    def connector_stats(self, connector_cls: Any) -> dict[str, float]:
        """The connector's own stats (``get_kv_connector_stats``, as vLLM's logger gets them),
        reduced per step and summed over the run (gauges: their last value)."""
        out: dict[str, float] = {}
        build = getattr(connector_cls, "build_kv_connector_stats", None)
        if build is None:
            return out
        for payload in self._stats_payloads:
            stats = build(data=payload)
            if stats is None:
                continue
            gauges = [name for name, kind in payload.get("types", {}).items() if kind == "gauge"]
            for key, value in stats.reduce().items():
                if not isinstance(value, int | float):
                    continue
                gauge = any(key == name or key.startswith(name + ":") for name in gauges)
                out[key] = value if gauge else out.get(key, 0) + value
        return out


@dataclass
class RequestTiming:
    """One request's life on the runner's clock (seconds)."""

    arrival_s: float
    first_token_s: float | None = None
    finish_s: float | None = None
    num_output_tokens: int = 0
    expected_output_tokens: int = 0


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass
class RunSummary:
    """One record of the JSON report: one (config, rate, run)."""

    config: str
    rate: float | str
    run: int
    seed: int
    num_requests: int
    completed: int
    wrong_token_counts: int
    ttft_p50_ms: float
    ttft_p95_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    throughput_rps: float
    throughput_tok_s: float
    preemptions: int
    recomputed_prefill_tokens: int
    loaded_tokens: int
    stored_tokens: int
    cpu_hit_rate: float | None
    loaded_bytes: int
    stored_bytes: int
    bytes_moved: int
    steps: int
    makespan_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    def as_record(self) -> dict[str, Any]:
        record = {k: v for k, v in self.__dict__.items() if k != "extra"}
        record.update(self.extra)
        return record


def summarize(
    config: str,
    rate: float | str,
    run: int,
    seed: int,
    timings: list[RequestTiming],
    counters: StepCounters,
    *,
    block_size: int,
    block_bytes: int,
    extra: dict[str, Any] | None = None,
) -> RunSummary:
    done = [t for t in timings if t.finish_s is not None and t.first_token_s is not None]
    ttft = [1e3 * (t.first_token_s - t.arrival_s) for t in done]  # type: ignore[operator]
    tpot = [
        1e3 * (t.finish_s - t.first_token_s) / (t.num_output_tokens - 1)  # type: ignore[operator]
        for t in done
        if t.num_output_tokens > 1
    ]
    e2e = [1e3 * (t.finish_s - t.arrival_s) for t in done]  # type: ignore[operator]
    start = min((t.arrival_s for t in timings), default=0.0)
    end = max((t.finish_s for t in done), default=start)  # type: ignore[type-var]
    span = max(end - start, 1e-9)
    hit_rate = counters.connector_hits / counters.connector_queries if counters.connector_queries else None
    return RunSummary(
        config=config,
        rate=rate,
        run=run,
        seed=seed,
        num_requests=len(timings),
        completed=len(done),
        wrong_token_counts=sum(1 for t in timings if t.num_output_tokens != t.expected_output_tokens),
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p95_ms=percentile(ttft, 95),
        ttft_p99_ms=percentile(ttft, 99),
        tpot_p50_ms=percentile(tpot, 50),
        tpot_p99_ms=percentile(tpot, 99),
        e2e_p50_ms=percentile(e2e, 50),
        e2e_p99_ms=percentile(e2e, 99),
        throughput_rps=len(done) / span,
        throughput_tok_s=sum(t.num_output_tokens for t in done) / span,
        preemptions=counters.preemptions,
        recomputed_prefill_tokens=counters.recomputed_prefill_tokens,
        loaded_tokens=counters.loaded_blocks * block_size,
        stored_tokens=counters.stored_blocks * block_size,
        cpu_hit_rate=hit_rate,
        loaded_bytes=counters.loaded_blocks * block_bytes,
        stored_bytes=counters.stored_blocks * block_bytes,
        bytes_moved=(counters.loaded_blocks + counters.stored_blocks) * block_bytes,
        steps=counters.steps,
        makespan_s=span,
        extra=dict(extra or {}),
    )


def median_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric field over runs of one (config, rate)."""
    out = dict(records[0])
    for key, value in records[0].items():
        values = [
            r[key] for r in records if isinstance(r.get(key), int | float) and not isinstance(r[key], bool)
        ]
        if key in ("run", "seed") or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if len(values) == len(records):
            out[key] = statistics.median(values)
    out["runs"] = len(records)
    return out

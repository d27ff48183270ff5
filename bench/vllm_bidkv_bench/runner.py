"""The benchmark matrix: every (rate, run, config) through the simulator or the real engine.

In the simulator run ``r`` of a rate uses workload seed ``seed + r`` (it is deterministic,
so repeating one trace would repeat one number); on the real engine every run replays the
same workload (seed ``seed``), so the spread over runs is the box's noise and configs'
min–max ranges compare; with a trace file every run replays the file. Every config of one
(rate, run) sees the same requests. A config that fails is recorded with its error and the matrix goes on: a missing row says so, it is not
silently absent. After the matrix, every record gets its distance to ``unbounded`` of
the same (rate, run) (*more GPU memory*, not a bound) and, in the simulator, its
``distance_to_ideal``: the ratio of its p99 TTFT and of its throughput to ``ideal-tier``'s
at the same (rate, run) — same GPU blocks, an unlimited CPU tier, free copies (see
``configs``). ``ttft_p99`` > 1 and ``throughput`` < 1 are the distance left to the bound.
The simulator always runs ``ideal-tier``, like ``unbounded``; a real engine has no free
copies, so its records carry ``distance_to_ideal: null``. A matrix with ``loads`` first
measures stock's capacity (``measure_capacity``: the engine's on this machine, the
simulator's in virtual time) and runs at those fractions of it; every record then carries
its ``calibration`` and ``load``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vllm_bidkv_bench.configs import RunConfig
from vllm_bidkv_bench.metrics import RequestTiming, StepCounters, summarize
from vllm_bidkv_bench.presets import BenchPreset
from vllm_bidkv_bench.workloads import CLOSED_LOOP, Workload, load_jsonl, make_workload


@dataclass(frozen=True)
class Matrix:
    kind: str  # "sim" | "engine"
    preset: BenchPreset
    configs: list[RunConfig]
    rates: list[float]
    runs: int
    admission: str = "fcfs"
    seed: int = 0
    trace: str | None = None
    """A JSONL trace replacing the preset's workload; ``rate`` then names the trace."""
    servers: dict[str, str | None] | None = None
    """Engine only: drive OpenAI servers instead of in-process engines, config name -> URL
    (None: the runner starts that config's server)."""
    loads: tuple[float, ...] = ()
    """Run at these fractions of stock's capacity (``measure_capacity``), not ``rates``."""
    calibration: dict[str, Any] | None = None
    """``measure_capacity``'s result once measured: the rates and think scale every run uses."""
    async_scheduling: bool = False
    """Simulator only: vLLM's async scheduling (``simulate``'s), for every config."""

    def workloads(self) -> list[tuple[float | str, int, Workload]]:
        out: list[tuple[float | str, int, Workload]] = []
        if self.trace is not None:
            trace = load_jsonl(self.trace, seed=self.seed)
            return [(trace.name, run, trace) for run in range(self.runs)]
        p = self.preset
        rates, think_scale = self.rates, p.think_scale
        if self.calibration is not None:
            rates, think_scale = self.calibration["rates"], self.calibration["think_scale"]
        for rate in rates:
            for run in range(self.runs):
                out.append(
                    (
                        rate,
                        run,
                        make_workload(
                            p.workload,
                            p.num_requests,
                            rate,
                            self.seed + run if self.kind == "sim" else self.seed,
                            p.length_scale,
                            p.max_model_len,
                            think_scale,
                        ),
                    )
                )
        return out


def run_matrix(matrix: Matrix, *, progress: bool = True) -> list[dict[str, Any]]:
    from tqdm import tqdm

    if matrix.kind == "sim" and not any(c.ideal for c in matrix.configs):
        from vllm_bidkv_bench.configs import CONFIGS

        matrix = replace(matrix, configs=[*matrix.configs, CONFIGS["ideal-tier"]])
    if matrix.loads and matrix.trace is None and matrix.calibration is None:
        matrix = replace(matrix, calibration=measure_capacity(matrix))
    jobs = matrix.workloads()
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs) * len(matrix.configs), desc=f"bench {matrix.kind}", disable=not progress)
    reference = _reference(matrix.configs)
    for job, (rate, run, workload) in enumerate(jobs):
        # Engine wall times drift with whatever else runs: each (rate, run) starts with another
        # config, so no config always meets the same moment of the box.
        k = job % len(matrix.configs)
        outputs: dict[str, dict[str, list[int]]] = {}
        batch: dict[str, dict[str, Any]] = {}
        for config in matrix.configs[k:] + matrix.configs[:k]:
            bar.set_postfix_str(f"{config.name} @ {rate} run {run}")
            try:
                if matrix.kind == "sim":
                    record = _sim_record(matrix, workload, config, rate, run, progress)
                else:
                    record, outputs[config.name] = _engine_record(matrix, workload, config, rate, run)
            except Exception as err:  # noqa: BLE001 - recorded, shown in every report
                record = {
                    "config": config.name,
                    "rate": rate,
                    "run": run,
                    "seed": workload.seed,
                    "error": repr(err),
                }
            if matrix.calibration is not None:
                record["calibration"] = matrix.calibration
                record["load"] = matrix.calibration["loads"][matrix.calibration["rates"].index(rate)]
            records.append(record)
            batch[config.name] = record
            bar.update()
        if matrix.kind == "engine":
            expected = outputs.get(reference.name) if reference is not None else None
            for name, got in outputs.items():
                # None when the reference run failed: nothing to compare with.
                batch[name]["outputs_match"] = None if expected is None else got == expected
    bar.close()
    add_unbounded_distance(records)
    add_ideal_distance(records, matrix.kind)
    add_oracle_distance(records)
    order = {c.name: i for i, c in enumerate(matrix.configs)}
    return sorted(records, key=lambda r: (str(r["rate"]), r["run"], order[r["config"]]))


# The capacity probe: every request (closed loop: every session's first turn) arrives within
# a few milliseconds, and a session's next turn follows its answer at once.
PROBE_RATE, PROBE_THINK_SCALE = 10_000.0, 1e-6


def measure_capacity(matrix: Matrix) -> dict[str, Any]:
    """Stock vLLM's capacity on this machine for the matrix's workload, and the rates it implies.

    Capacity = the throughput (req/s) of stock serving the preset's own requests all at once,
    its queue never empty: what this box can serve of this workload. Each load then runs at
    ``load × capacity`` req/s and, closed loop, with think times × ``think_scale / capacity``,
    so the number of sessions live at once (rate × think time) does not depend on the box.
    Raises when stock cannot run (a calibrated preset without its capacity would be a guess).

    In the simulator (``kind`` "sim") the same probe runs on the simulator's ``stock``
    (workload seed ``seed``, the one run 0 uses; deterministic): capacity in req/s of virtual
    time, on the preset's shape and cost model. Think times keep the preset's
    ``think_scale``: the simulated GPU is the preset's own, and its think times are the
    workload's (a user's, a tool's) in seconds of that GPU's time, not a stand-in sized to a box."""
    from vllm_bidkv_bench.configs import CONFIGS

    p = matrix.preset
    if matrix.kind == "sim":
        return _sim_capacity(matrix)
    probe = _probe_workload(matrix)
    stock = CONFIGS["stock"]
    # --server: the user's stock server where one is given, else one started here.
    servers = None if matrix.servers is None else {"stock": matrix.servers.get("stock")}
    alone = Matrix("engine", p, [stock], [], 1, "fcfs", matrix.seed, servers=servers)
    record, _ = _engine_record(alone, probe, stock, "capacity", 0)
    return calibration(record["throughput_rps"], matrix.loads, p.think_scale, record["load_avg_1m"])


def _probe_workload(matrix: Matrix) -> Workload:
    """The preset's own requests, all arriving at once (closed loop: no think time)."""
    p = matrix.preset
    return make_workload(
        p.workload,
        p.num_requests,
        PROBE_RATE,
        matrix.seed,
        p.length_scale,
        p.max_model_len,
        PROBE_THINK_SCALE,
    )


def _sim_capacity(matrix: Matrix) -> dict[str, Any]:
    """``measure_capacity`` in the simulator: stock on the probe workload, virtual time; for a
    preset whose ``capacity_probe`` is "knee", the search that probe starts (``_sim_knee``)."""
    p = matrix.preset
    # Stock has no CPU tier: presets that differ only in its size share one measurement.
    key = (replace(p, name="", configs=(), cpu_bytes=0), matrix.seed, matrix.loads)
    if key not in _SIM_CAPACITIES:
        at_once = _stock_record(matrix, _probe_workload(matrix), "capacity")["throughput_rps"]
        if p.capacity_probe == "knee":
            capacity, probe, tried = _sim_knee(matrix, at_once)
            cal = calibration(capacity, matrix.loads, p.think_scale / capacity, None, seed=matrix.seed)
            cal.update(probe=probe, knee_probes=tried, at_once_rps=at_once)
        else:
            cal = calibration(at_once, matrix.loads, p.think_scale, None, seed=matrix.seed)
        _SIM_CAPACITIES[key] = cal
    return dict(_SIM_CAPACITIES[key])


_SIM_CAPACITIES: dict[tuple[Any, ...], dict[str, Any]] = {}


def _stock_record(matrix: Matrix, workload: Workload, rate: float | str) -> dict[str, Any]:
    """Stock in the simulator on ``workload``: vLLM's own order (FCFS), whatever admission the
    matrix compares."""
    from vllm_bidkv_bench.configs import CONFIGS

    stock = CONFIGS["stock"]
    alone = replace(matrix, configs=[stock], rates=[], runs=1, loads=(), calibration=None, admission="fcfs")
    return _sim_record(alone, workload, stock, rate, 0, False)


# The knee probe: stock is saturated at a rate where its TTFT p50 exceeds KNEE × its p50 at a
# light load (a quarter of the all-at-once throughput); the search stops within KNEE_PRECISION.
# Past KNEE_MAX_AT_ONCE × the all-at-once throughput, arrivals are all at once as far as the
# engine can tell: a closed loop whose users all fit in one batch never queues, and its
# capacity is that throughput.
KNEE, KNEE_PRECISION, KNEE_MAX_AT_ONCE = 4.0, 1.1, 8.0


def _sim_knee(matrix: Matrix, at_once_rps: float) -> tuple[float, str, list[list[float]]]:
    """Stock's saturation rate with the workload's own arrivals: the highest rate (within
    ``KNEE_PRECISION``) whose TTFT p50 stays under ``KNEE`` × the light load's.

    Where sessions hold more KV than HBM, every request at once makes stock thrash (chunked
    prefills of many long prompts preempt each other) and its throughput is far below what
    it serves when requests arrive as the workload sends them; past the knee its queue grows
    and a TTFT measures the length of the run. Closed loops keep as many sessions live at
    every rate probed, as the field's benchmarks keep a number of users: think times ×
    ``think_scale / rate``, and the runs after it × ``think_scale / capacity``. No knee up to
    ``KNEE_MAX_AT_ONCE`` × the all-at-once throughput: that throughput is the capacity.

    Returns:
        (capacity req/s, how it was measured, every (rate, TTFT p50 ms) tried)."""
    p = matrix.preset

    def p50(rate: float) -> float:
        workload = make_workload(
            p.workload,
            p.num_requests,
            rate,
            matrix.seed,
            p.length_scale,
            p.max_model_len,
            p.think_scale / rate,
        )
        value = float(_stock_record(matrix, workload, rate)["ttft_p50_ms"])
        tried.append([round(rate, 4), round(value, 1)])
        return value

    tried: list[list[float]] = []
    think = f" (think times × {p.think_scale:g} / rate)" if p.workload in CLOSED_LOOP else ""
    light = at_once_rps / 4
    limit = KNEE * p50(light)
    lo, hi = light, at_once_rps
    while p50(hi) <= limit:  # double until saturated
        lo, hi = hi, 2 * hi
        if hi > KNEE_MAX_AT_ONCE * at_once_rps:
            probe = (
                f"simulator's stock, every request at once: no knee up to {lo:.3g} req/s "
                f"({KNEE_MAX_AT_ONCE:g}× that throughput{think}; TTFT p50 ≤ {KNEE:g}× its p50 at "
                f"{light:.3g} req/s), workload seed {matrix.seed}; req/s of virtual time"
            )
            return at_once_rps, probe, tried
    while hi / lo > KNEE_PRECISION:  # then bisect, geometrically
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if p50(mid) <= limit else (lo, mid)
    probe = (
        f"simulator's stock with the workload's arrivals{think}: the highest rate whose "
        f"TTFT p50 ≤ {KNEE:g}× its p50 at {light:.3g} req/s (within {KNEE_PRECISION:g}×), workload "
        f"seed {matrix.seed}; req/s of virtual time"
    )
    return lo, probe, tried


def calibration(
    capacity_rps: float,
    loads: tuple[float, ...],
    think_scale: float,
    load_avg: float | None,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """The rates and think scale of ``loads`` at a measured capacity (``measure_capacity``).

    ``load_avg`` None: a simulator capacity (virtual time, workload seed ``seed``), whose think
    times keep ``think_scale`` as it is; else the engine's, think times × ``1 / capacity``."""
    if not capacity_rps > 0:
        raise RuntimeError(f"calibration: stock served nothing (capacity {capacity_rps} req/s)")
    at_once = "every request at once (closed loop: no think time)"
    if load_avg is None:
        probe = f"simulator's stock, {at_once}, workload seed {seed}; req/s of virtual time"
    else:
        probe = f"stock, {at_once}, load average {load_avg:.2f}"
    return {
        "capacity_rps": capacity_rps,
        "loads": list(loads),
        "rates": [round(load * capacity_rps, 3) for load in loads],
        "think_scale": think_scale if load_avg is None else think_scale / capacity_rps,
        "probe": probe,
        "kind": "sim" if load_avg is None else "engine",
    }


def _reference(configs: list[RunConfig]) -> RunConfig | None:
    """Stock (else unbounded, also stock vLLM): every other config's outputs must equal its.
    None: neither runs, so ``outputs_match`` is None (nothing to compare with)."""
    by_name = {c.name: c for c in configs}
    return by_name.get("stock", by_name.get("unbounded"))


def _sim_record(
    matrix: Matrix, workload: Workload, config: RunConfig, rate: float | str, run: int, progress: bool
) -> dict[str, Any]:
    from tqdm import tqdm

    from vllm_bidkv_bench.costmodel import PRESETS as COST_MODELS
    from vllm_bidkv_bench.sim import simulate

    cost = COST_MODELS[matrix.preset.cost_model]
    with tqdm(total=len(workload.requests), desc=config.name, leave=False, disable=not progress) as bar:
        result = simulate(
            workload,
            config,
            matrix.preset,
            cost,
            admission=matrix.admission,
            async_scheduling=matrix.async_scheduling,
            busy_threshold=matrix.preset.max_num_seqs,
            progress=lambda n: bar.update(n - bar.n),
        )
    extra = {
        "wall_s": result.wall_s,
        "virtual_s": result.virtual_s,
        "load_wait_s": result.load_s,
        "async_load_busy_s": result.async_load_s,
        "store_busy_s": result.store_s,
        "scheduler_s": result.scheduler_s,
        "connector_s": result.connector_s,
        "connector_share": result.connector_s / result.scheduler_s if result.scheduler_s else 0.0,
        "connector_by_call": result.connector_by_call,
        "max_running": result.max_running,
        "mean_running": result.mean_running,
        "full_batch_scheduler_s": result.busy_scheduler_s,
        "full_batch_connector_share": (
            result.busy_connector_s / result.busy_scheduler_s if result.busy_scheduler_s else None
        ),
        "cpu_bytes": result.cpu_bytes,
        "prefill_tokens_computed": result.prefill_tokens_computed,
        "gpu_drops_unstored": result.gpu_drops_unstored,
        "async_scheduling": matrix.async_scheduling,
        "gpu_blocks_held_at_end": result.num_gpu_blocks - result.free_blocks_at_end,
        "label": config.label,
    }
    if config.is_peer:
        # The peer's own counters (its stats) and its jobs as the worker model ran them.
        extra["peer_counters"] = result.peer_counters
    summary = summarize(
        config.name,
        rate,
        run,
        workload.seed,
        result.timings,
        result.counters,
        block_size=matrix.preset.block_size,
        block_bytes=result.block_bytes,
        extra=extra,
    )
    record = summary.as_record()
    record["ttft_ms"] = _ttfts(result.timings)
    return record


def _engine_record(
    matrix: Matrix, workload: Workload, config: RunConfig, rate: float | str, run: int
) -> tuple[dict[str, Any], dict[str, list[int]]]:
    if matrix.servers is not None:
        from vllm_bidkv_bench.remote import run_config_on_server

        url = matrix.servers[config.name]
        raw = run_config_on_server(workload, config, matrix.preset, admission=matrix.admission, url=url)
    else:
        from vllm_bidkv_bench.engine import run_config

        raw = run_config(workload, config, matrix.preset, admission=matrix.admission)
    timings = [RequestTiming(**t) for t in raw["timings"]]
    extra = {
        "engine_start_s": raw["start_s"],
        "engine_warmup_s": raw["warmup_s"],
        "engine_run_s": raw["run_s"],
        "load_avg_1m": raw["load_avg"],
        "model": matrix.preset.model,
    }
    if "server" in raw:
        extra["server"] = raw["server"]
    if "peer_counters" in raw:  # a vLLM peer: its own counters, and what ran (engine_label)
        extra["peer_counters"] = raw["peer_counters"]
        extra["label"] = raw["label"]
    if "profile" in raw:  # in-process engines: where each step's time went
        extra["profile"] = raw["profile"]
        extra["connector_share"] = raw["profile"]["connector_share"]
        extra["full_batch_connector_share"] = raw["profile"]["full_batch_connector_share"]
    extra.update({"metric_" + k.split(":", 1)[1]: v for k, v in raw["metrics"].items()})
    summary = summarize(
        config.name,
        rate,
        run,
        workload.seed,
        timings,
        StepCounters(**raw["counters"]),
        block_size=matrix.preset.block_size,
        block_bytes=raw["block_bytes"],
        extra=extra,
    )
    record = summary.as_record()
    record["ttft_ms"] = _ttfts(timings)
    return record, raw["outputs"]


def _ttfts(timings: list[RequestTiming]) -> list[float]:
    return [
        round(1e3 * (t.first_token_s - t.arrival_s), 2)  # type: ignore[operator]
        for t in timings
        if t.first_token_s is not None
    ]


def add_unbounded_distance(records: list[dict[str, Any]]) -> None:
    """``*_vs_unbounded`` = this config's value / unbounded's, same (rate, run)."""
    bound = {(r["rate"], r["run"]): r for r in records if r["config"] == "unbounded" and "error" not in r}
    for r in records:
        ref = bound.get((r["rate"], r["run"]))
        if ref is None or "error" in r:
            continue
        for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "e2e_p99_ms", "throughput_rps"):
            r[f"{key}_vs_unbounded"] = r[key] / ref[key] if ref[key] else None


def add_ideal_distance(records: list[dict[str, Any]], kind: str = "sim") -> None:
    """``distance_to_ideal`` = {ttft_p99, throughput}: this config's / ``ideal-tier``'s, same (rate, run).

    Also flat as ``ttft_p99_ms_vs_ideal`` and ``throughput_rps_vs_ideal`` (CSV, tables)."""
    _add_distance(records, "ideal-tier", "ideal", {"ttft_p99": "ttft_p99_ms", "throughput": "throughput_rps"})
    for r in records:
        if "error" not in r:
            r.setdefault("distance_to_ideal", None)


ORACLE_METRICS = {
    "ttft_p50": "ttft_p50_ms",
    "ttft_p99": "ttft_p99_ms",
    "throughput": "throughput_rps",
    "prefill_tokens": "prefill_tokens_computed",
}


def add_oracle_distance(records: list[dict[str, Any]]) -> None:
    """``distance_to_oracle``: per ``ORACLE_METRICS`` key, this config's value / ``oracle``'s, same
    (rate, run); absent without an ``oracle`` record. Flat as ``ttft_p99_ms_vs_oracle`` and
    ``throughput_rps_vs_oracle`` too (CSV, tables)."""
    _add_distance(records, "oracle", "oracle", ORACLE_METRICS)


def _add_distance(records: list[dict[str, Any]], bound: str, name: str, metrics: dict[str, str]) -> None:
    """``distance_to_<name>``: per ``metrics`` key, a record's field / config ``bound``'s, same
    (rate, run), on records that have that bound; flat as ``ttft_p99_ms_vs_<name>`` and
    ``throughput_rps_vs_<name>``."""
    refs = {(r["rate"], r["run"]): r for r in records if r["config"] == bound and "error" not in r}
    for r in records:
        ref = refs.get((r["rate"], r["run"]))
        if "error" in r or ref is None:
            continue
        distance = {key: r[field] / ref[field] if ref.get(field) else None for key, field in metrics.items()}
        r[f"distance_to_{name}"] = distance
        r[f"ttft_p99_ms_vs_{name}"], r[f"throughput_rps_vs_{name}"] = (
            distance["ttft_p99"],
            distance["throughput"],
        )

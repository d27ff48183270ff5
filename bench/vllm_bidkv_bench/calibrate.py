"""Fit the cost model's efficiency factors to bidkv's calibration of stock vLLM.

Target (COST_FACTS "bidkv's calibration of stock vLLM"; bidkv
``results/pilot_055/calibration_report.md``): preempt-evict, i.e. stock vLLM with FCFS,
on bidkv's testbed (600 blocks of 16, max_num_seqs 32), mixed workload — offered 2.0 /
3.8 / 5.7 req/s gave 2.064 / 3.318 / 3.810 req/s and p99 TTFT 356 / 450 / 440 ms; their
report calls 5.7 "fully saturated (offered 5.7 vs actual 3.8)": a capacity of ~3.8 req/s.

Method: a grid over one achieved-fraction-of-peak ``e`` (compute and memory alike, the
row cannot tell them apart). Each point runs the simulator's ``stock`` on the preset's
own workload (1000 mixed requests) at 5.7 req/s, seeds ``0..seeds-1``; the loss is
``log(median achieved req/s / 3.81)²`` — stock's capacity, so that the three rates mean
here what they meant on the testbed (light / starting to saturate / saturated). The
other numbers of the row are shown next to the fit, not fitted: their runs had 80
requests, whose "throughput" is bound by the arrival span and the drain of the last
requests rather than by step time (80 requests at 5.7 req/s give ~4.4 req/s here even
at e = 1, and their 2.064 at 2.0 offered exceeds the offered rate), and a p99 TTFT of
~440 ms at a rate past capacity is not what an open-loop Poisson client sees, so their
TTFT is measured some other way. Our mix is not their ShareGPT pool and their GPU is
not stated: the fit pins the order of magnitude of step time, not a particular GPU.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from vllm_bidkv_bench.configs import CONFIGS
from vllm_bidkv_bench.costmodel import CostModel
from vllm_bidkv_bench.metrics import summarize
from vllm_bidkv_bench.presets import BenchPreset
from vllm_bidkv_bench.workloads import make_workload

# (offered req/s, achieved req/s, p99 TTFT ms) of stock vLLM in bidkv's calibration.
TARGETS: tuple[tuple[float, float, float], ...] = (
    (2.0, 2.064, 356.0),
    (3.8, 3.318, 450.0),
    (5.7, 3.810, 440.0),
)
EFFICIENCIES = tuple(round(0.02 * i, 2) for i in range(10, 26))
FITTED_RATE, FITTED_THROUGHPUT = 5.7, 3.810


def evaluate(
    cost: CostModel,
    preset: BenchPreset,
    seeds: int = 3,
    targets: tuple[tuple[float, float, float], ...] = TARGETS,
) -> list[dict[str, Any]]:
    """Stock vLLM in the simulator at the calibration rates, next to bidkv's numbers."""
    from vllm_bidkv_bench.sim import simulate

    rows = []
    for rate, target_rps, target_p99 in targets:
        rps, p99 = [], []
        for seed in range(seeds):
            workload = make_workload(preset.workload, preset.num_requests, rate, seed, preset.length_scale)
            result = simulate(workload, CONFIGS["stock"], preset, cost)
            s = summarize(
                "stock",
                rate,
                0,
                seed,
                result.timings,
                result.counters,
                block_size=preset.block_size,
                block_bytes=0,
            )
            rps.append(s.throughput_rps)
            p99.append(s.ttft_p99_ms)
        rows.append(
            {
                "rate": rate,
                "throughput_rps": statistics.median(rps),
                "target_throughput_rps": target_rps,
                "ttft_p99_ms": statistics.median(p99),
                "target_ttft_p99_ms": target_p99,
            }
        )
    return rows


def loss(rows: list[dict[str, Any]]) -> float:
    (row,) = (r for r in rows if r["rate"] == FITTED_RATE)
    return math.log(row["throughput_rps"] / FITTED_THROUGHPUT) ** 2


def fit(cost: CostModel, preset: BenchPreset, seeds: int = 3, progress: bool = True) -> dict[str, Any]:
    from tqdm import tqdm

    grid = []
    for e in tqdm(EFFICIENCIES, desc="calibrate", disable=not progress):
        fitted = tuple(t for t in TARGETS if t[0] == FITTED_RATE)
        rows = evaluate(cost.with_efficiency(e), preset, seeds, fitted)
        grid.append({"efficiency": e, "loss": loss(rows), "rows": rows})
    best = min(grid, key=lambda g: g["loss"])
    return {"best": best, "grid": grid, "preset": preset.name, "seeds": seeds}

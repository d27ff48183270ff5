"""The bid_step_cost sweep behind docs/results/study-26/bid-step-cost-sweep.json (session 17).

Usage: BIDKV_BID_STEP_COST=<c> PYTHONPATH=.:bench python docs/results/study-26/step_cost_sweep.py
<tag> <configs> <seeds> <out.jsonl>

Runs each config on the seven 1x testbed presets at 0.8 and 0.95 of the knee (the rates of
docs/results/sim-<workload>-cpu1x.json), one JSON line per (workload, rate, seed, config).
"""

import json
import statistics
import sys

from vllm_bidkv_bench.configs import CONFIGS
from vllm_bidkv_bench.costmodel import PRESETS as COSTS
from vllm_bidkv_bench.presets import get_preset
from vllm_bidkv_bench.sim import simulate
from vllm_bidkv_bench.workloads import make_workload

RATES = {
    "chat": (1.572, 1.867),
    "mixed": (3.007, 3.571),
    "agentic": (0.745, 0.884),
    "rag": (1.043, 1.239),
    "multi-round-qa": (0.966, 1.147),
    "long-context": (0.421, 0.5),
    "long-doc-qa": (0.413, 0.491),
}


def quantile_ms(ttft: list[float], fraction: float) -> float:
    return 1000 * ttft[min(len(ttft) - 1, int(fraction * len(ttft)))]


def main() -> None:
    tag, configs, out = sys.argv[1], sys.argv[2].split(","), sys.argv[4]
    seeds = [int(s) for s in sys.argv[3].split(",")]
    with open(out, "a") as f:
        for workload, rates in RATES.items():
            preset = get_preset(f"h100-llama3-8b-{workload}-cpu1x")
            cost = COSTS[preset.cost_model]
            for rate in rates:
                for seed in seeds:
                    trace = make_workload(
                        preset.workload,
                        preset.num_requests,
                        rate,
                        seed,
                        preset.length_scale,
                        preset.max_model_len,
                        preset.think_scale,
                    )
                    for name in configs:
                        res = simulate(trace, CONFIGS[name], preset, cost)
                        ttft = sorted(
                            t.first_token_s - t.arrival_s for t in res.timings if t.first_token_s is not None
                        )
                        record = {
                            "tag": tag,
                            "workload": workload,
                            "rate": rate,
                            "seed": seed,
                            "config": name,
                            "p50": 1000 * statistics.median(ttft),
                            "p99": quantile_ms(ttft, 0.99),
                            "preempt": res.counters.preemptions,
                        }
                        f.write(json.dumps(record) + "\n")
                        f.flush()


if __name__ == "__main__":
    main()

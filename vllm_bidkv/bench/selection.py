"""Victim-selection cost per preemption, end to end, on vLLM's real Scheduler.

``vllm_bidkv.policy.bench`` times the decision alone; this times what the victim
hook really does when allocation fails: build a Candidate for every preemptible
running request from the SchedulerContext (block ref counts, CPU-tier lookups)
and ask the strategy. For n running requests (16 … 1024) it reports the median µs
per selection and per candidate, and whether the cost grows at most linearly
(per-candidate time at the largest n ≤ 2× that at n = 64).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Sequence
from typing import Any

from vllm_bidkv.config import VICTIM_POLICIES

SIZES = (16, 32, 64, 128, 256, 512, 1024)
PROMPT_TOKENS = 96
BLOCK_SIZE = 16


def _running_scheduler(n: int, policy: str) -> Any:
    from vllm_bidkv import patches
    from vllm_bidkv.patches.standalone import build_scheduler, make_request, model_output
    from vllm_bidkv.tiny_model import tiny_model_dir

    patches.apply()
    scheduler = build_scheduler(
        str(tiny_model_dir()),
        num_gpu_blocks=n * (PROMPT_TOKENS // BLOCK_SIZE + 2) + 1,
        block_size=BLOCK_SIZE,
        max_num_seqs=n,
        max_num_batched_tokens=n * PROMPT_TOKENS,
        kv_transfer_config={
            "kv_connector": "BidKVConnector",
            "kv_connector_module_path": "vllm_bidkv",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"victim_policy": policy, "cpu_bytes": "1GiB"},
        },
    )
    requests = {}
    for i in range(n):
        # Every fourth request shares its first half with its neighbour (shared blocks).
        prompt = [
            (i // 2 if i % 4 == 0 and t < PROMPT_TOKENS // 2 else i * 7919 + t) % 500 + 1
            for t in range(PROMPT_TOKENS)
        ]
        request = make_request(f"r{i}", prompt, 64, block_size=BLOCK_SIZE)
        requests[request.request_id] = request
        scheduler.add_request(request)
    out = scheduler.schedule()
    scheduler.update_from_output(out, model_output(out, requests))
    assert len(scheduler.running) == n, "every request must be running"
    return scheduler


def run_selection_bench(
    json_path: str | None = None,
    sizes: Sequence[int] = SIZES,
    repeats: int = 21,
    policies: Sequence[str] = VICTIM_POLICIES,
) -> dict[str, Any]:
    from vllm_bidkv import patches

    results = []
    try:
        for policy in policies:
            for n in sizes:
                scheduler = _running_scheduler(n, policy)
                running = list(scheduler.running)
                choose = scheduler.connector.choose_victim
                samples = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    choose(running)
                    samples.append(time.perf_counter() - start)
                median = statistics.median(samples)
                results.append(
                    {
                        "policy": policy,
                        "running": n,
                        "us_per_selection": median * 1e6,
                        "ns_per_candidate": median * 1e9 / n,
                    }
                )
    finally:
        patches.revert()
    verdicts = {}
    for policy in policies:
        per = {r["running"]: r["ns_per_candidate"] for r in results if r["policy"] == policy}
        ref = per.get(64, per[min(per)])
        verdicts[policy] = per[max(per)] <= 2 * ref
    report = {
        "results": results,
        "linear": verdicts,
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
        },
    }
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
    return report


def add_cli_args(parser: Any) -> None:
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="running-request counts")
    parser.add_argument("--repeats", type=int, default=21)


def main(args: Any) -> int:
    import logging
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.getLogger("vllm_bidkv").setLevel(logging.ERROR)
    sizes = [int(s) for s in args.sizes.split(",")]
    report = run_selection_bench(args.json, sizes, args.repeats)
    print(f"{'policy':>14} " + " ".join(f"{n:>9}" for n in sizes) + "   (µs per selection, end to end)")
    for policy in VICTIM_POLICIES:
        row = [r["us_per_selection"] for r in report["results"] if r["policy"] == policy]
        print(
            f"{policy:>14} " + " ".join(f"{v:>9.1f}" for v in row) + f"   linear={report['linear'][policy]}"
        )
    return 0 if all(report["linear"].values()) else 1

"""Victim-selection benchmarks: how the cost of one preemption's choice grows with n running.

Two measurements, one linearity verdict (:func:`grows_linearly`):

* ``vllm-bidkv bench select`` (:func:`run_selection_bench`): the decision alone. For each n, n
  random candidates are built once and every strategy's ``choose`` is timed (median µs per
  selection over ``repeats`` samples); ``per_candidate_ns`` divides by n. Pure: no vLLM.
* ``vllm-bidkv bench select-e2e`` (:func:`run_scheduler_selection_bench`): what the victim hook
  really does when allocation fails, on vLLM's real Scheduler: build a Candidate for every
  preemptible running request from the SchedulerContext (block ref counts, CPU-tier lookups)
  and ask the strategy.

A strategy is ``linear`` when its per-candidate time at the largest n is at most twice that at
the reference n (64 if measured, else the smallest), i.e. cost grows at most linearly in n.

    python -m vllm_bidkv_bench.selection --json select.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

from vllm_bidkv.config import VICTIM_POLICIES, BidKVConfig
from vllm_bidkv.policy.candidate import Candidate, Decision
from vllm_bidkv.policy.strategies import STRATEGIES, make_strategy
from vllm_bidkv_bench.args import positive_int, positive_int_list


def _reference_size(sizes: Sequence[int]) -> int:
    return 64 if 64 in sizes else min(sizes)


def grows_linearly(per_candidate: Mapping[int, float]) -> bool:
    """Per-candidate time at the largest n is at most twice that at the reference n."""
    return per_candidate[max(per_candidate)] <= 2 * per_candidate[_reference_size(list(per_candidate))]


# --- the decision alone ----------------------------------------------------------------------

DEFAULT_SIZES = (16, 32, 64, 128, 256, 512, 1024)
BLOCK_SIZE = 16
# Calls per timing sample ≈ this / n, so a sample is long against timer resolution at small n.
_CALLS_PER_SAMPLE = 4096


def random_candidates(n: int, rng: random.Random) -> list[Candidate]:
    """n plausible candidates: some on shared prefixes, some partly in the CPU tier."""
    out = []
    for order in range(n):
        prompt = rng.randrange(1, 4096)
        max_tokens = rng.choice((None, 256, 1024, 4096))
        output = rng.randrange(0, max_tokens or 2048)
        computed = prompt + output
        blocks = -(-computed // BLOCK_SIZE)
        shared_blocks = rng.randrange(0, blocks + 1) if rng.random() < 0.3 else 0
        cpu_blocks = rng.randrange(0, blocks - shared_blocks + 1) if rng.random() < 0.3 else 0
        out.append(
            Candidate(
                request_id=f"req-{order}",
                order=order,
                num_blocks=blocks,
                freeable_blocks=blocks - shared_blocks,
                computed_tokens=computed,
                shared_tokens=shared_blocks * BLOCK_SIZE,
                cpu_tokens=cpu_blocks * BLOCK_SIZE,
                offloadable_tokens=0,
                output_tokens=output,
                max_tokens=max_tokens,
                num_preemptions=rng.randrange(0, 3),
            )
        )
    return out


def run_selection_bench(
    json_path: str | None = None, sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 51, seed: int = 0
) -> dict[str, Any]:
    """Time every strategy at every size; write the result to ``json_path`` if given."""
    if not sizes or min(sizes) < 1 or repeats < 1:
        raise ValueError(f"bench select: need sizes >= 1 and repeats >= 1, got {sizes!r}, {repeats}")
    sizes = sorted(set(sizes))
    rng = random.Random(seed)
    candidate_sets = {n: random_candidates(n, rng) for n in sizes}  # every strategy sees the same sets
    decision = Decision()  # no requester: the cap and the cascade guard stay out of the timing
    config = BidKVConfig(seed=seed)
    strategies: dict[str, dict[str, Any]] = {}
    for name in STRATEGIES:
        strategy = make_strategy(name, config)
        median_us, per_candidate_ns = [], []
        for n, candidates in candidate_sets.items():
            calls = max(1, _CALLS_PER_SAMPLE // n)
            samples = []
            for _ in range(repeats):
                start = time.perf_counter_ns()
                for _ in range(calls):
                    strategy.choose(candidates, decision)
                samples.append((time.perf_counter_ns() - start) / calls)
            ns = statistics.median(samples)
            median_us.append(ns / 1e3)
            per_candidate_ns.append(ns / n)
        strategies[name] = {
            "n": list(sizes),
            "median_us": median_us,
            "per_candidate_ns": per_candidate_ns,
            "linear": grows_linearly(dict(zip(sizes, per_candidate_ns, strict=True))),
        }
    result = {
        "sizes": list(sizes),
        "repeats": repeats,
        "reference_size": _reference_size(sizes),
        "strategies": strategies,
        "linear": all(s["linear"] for s in strategies.values()),
    }
    if json_path is not None:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


# --- end to end, on vLLM's real Scheduler -----------------------------------------------------

PROMPT_TOKENS = 96


def _running_scheduler(n: int, policy: str) -> Any:
    from vllm_bidkv import patches
    from vllm_bidkv_bench.standalone import build_scheduler, make_request, model_output
    from vllm_bidkv_bench.tiny_model import tiny_model_dir

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


def run_scheduler_selection_bench(
    json_path: str | None = None,
    sizes: Sequence[int] = DEFAULT_SIZES,
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
    verdicts = {
        policy: grows_linearly(
            {r["running"]: r["ns_per_candidate"] for r in results if r["policy"] == policy}
        )
        for policy in policies
    }
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


# --- command line ---------------------------------------------------------------------------


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``vllm-bidkv bench select``."""
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.add_argument(
        "--sizes", type=positive_int, nargs="+", default=list(DEFAULT_SIZES), help="running-list sizes"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=51, help="timing samples per size (median taken)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random candidates")


def main(args: argparse.Namespace) -> int:
    result = run_selection_bench(args.json, args.sizes, args.repeats, args.seed)
    print(f"{'strategy':<14} {'n':>6} {'median µs':>10} {'ns/cand':>8}")
    for name, s in result["strategies"].items():
        for n, us, ns in zip(s["n"], s["median_us"], s["per_candidate_ns"], strict=True):
            print(f"{name:<14} {n:>6} {us:>10.2f} {ns:>8.1f}")
        print(f"{name:<14} linear: {s['linear']}")
    return 0


def add_scheduler_cli_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``vllm-bidkv bench select-e2e``."""
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument(
        "--sizes",
        type=positive_int_list,
        default=list(DEFAULT_SIZES),
        help="running-request counts, comma-separated",
    )
    parser.add_argument("--repeats", type=positive_int, default=21)


def main_scheduler(args: argparse.Namespace) -> int:
    import logging
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    logging.getLogger("vllm_bidkv").setLevel(logging.ERROR)
    report = run_scheduler_selection_bench(args.json, args.sizes, args.repeats)
    print(f"{'policy':>14} " + " ".join(f"{n:>9}" for n in args.sizes) + "   (µs per selection, end to end)")
    for policy in VICTIM_POLICIES:
        row = [r["us_per_selection"] for r in report["results"] if r["policy"] == policy]
        print(
            f"{policy:>14} " + " ".join(f"{v:>9.1f}" for v in row) + f"   linear={report['linear'][policy]}"
        )
    return 0 if all(report["linear"].values()) else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m vllm_bidkv_bench.selection", description=__doc__)
    add_cli_args(_parser)
    raise SystemExit(main(_parser.parse_args()))

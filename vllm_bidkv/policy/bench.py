"""Micro-benchmark of victim selection: how ``choose()`` scales with the running-list size.

For each n, n random candidates are built once and every strategy's ``choose`` is timed
(median µs per selection over ``repeats`` samples); ``per_candidate_ns`` divides by n.
A strategy is ``linear`` when its per-candidate time at the largest n is at most twice
that at the reference n (64 if benchmarked, else the smallest), i.e. cost grows at most
linearly in n.

This times the decision only. The real hook also builds the candidates from the
SchedulerContext (block ref counts, CPU-tier lookups); that is measured end to end
separately, in the scheduler benchmarks.

``vllm-bidkv bench select --json FILE`` or ``python -m vllm_bidkv.policy.bench``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.policy.candidate import Candidate
from vllm_bidkv.policy.strategies import STRATEGIES, make_strategy

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
                prompt_tokens=prompt,
                output_tokens=output,
                max_tokens=max_tokens,
                num_preemptions=rng.randrange(0, 3),
                priority=0,
                arrival_time=float(order),
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
    reference = 64 if 64 in sizes else sizes[0]
    rng = random.Random(seed)
    candidate_sets = {n: random_candidates(n, rng) for n in sizes}  # every strategy sees the same sets
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
                    strategy.choose(candidates)
                samples.append((time.perf_counter_ns() - start) / calls)
            ns = statistics.median(samples)
            median_us.append(ns / 1e3)
            per_candidate_ns.append(ns / n)
        at = dict(zip(sizes, per_candidate_ns, strict=True))
        strategies[name] = {
            "n": list(sizes),
            "median_us": median_us,
            "per_candidate_ns": per_candidate_ns,
            "linear": at[sizes[-1]] <= 2 * at[reference],
        }
    result = {
        "sizes": list(sizes),
        "repeats": repeats,
        "reference_size": reference,
        "strategies": strategies,
        "linear": all(s["linear"] for s in strategies.values()),
    }
    if json_path is not None:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), help="running-list sizes"
    )
    parser.add_argument("--repeats", type=int, default=51, help="timing samples per size (median taken)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random candidates")


def main(args: argparse.Namespace) -> int:
    result = run_selection_bench(args.json, args.sizes, args.repeats, args.seed)
    print(f"{'strategy':<14} {'n':>6} {'median µs':>10} {'ns/cand':>8}")
    for name, s in result["strategies"].items():
        for n, us, ns in zip(s["n"], s["median_us"], s["per_candidate_ns"], strict=True):
            print(f"{name:<14} {n:>6} {us:>10.2f} {ns:>8.1f}")
        print(f"{name:<14} linear: {s['linear']}")
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m vllm_bidkv.policy.bench", description=__doc__)
    add_cli_args(_parser)
    raise SystemExit(main(_parser.parse_args()))

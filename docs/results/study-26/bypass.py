"""The cache-aware bound sweep (admission_max_bypass 4, 8, 32; load 0.8, seeds 0-2) beside the study's peers.

Run from the repository root:
`python docs/results/study-26/bypass.py chat-cpu1x multi-round-qa-cpu1x agentic-cpu10x`
"""

import collections
import json
import statistics as st
import sys
from pathlib import Path

PEERS = ["vllm-offloading", "vllm-offloading-arc", "vllm-simple-offload", "vllm-simple-offload-lazy"]
DIR = Path("docs/results/study-26")


def load(path: Path) -> list[dict]:
    return [r for r in json.loads(path.read_text())["results"] if "error" not in r]


for p in sys.argv[1:]:
    sweep = DIR / f"h100-llama3-8b-{p}-bypass.json"
    if not sweep.exists():
        continue
    by: dict[str, dict[int, dict]] = collections.defaultdict(dict)
    for r in load(DIR / f"h100-llama3-8b-{p}.json") + load(sweep):
        by[r["config"]][r["run"]] = r

    def med(config: str, key: str, by: dict[str, dict[int, dict]] = by) -> float:
        return st.median(r[key] for r in by[config].values())

    peers = [c for c in PEERS if c in by]
    best50 = min(peers, key=lambda c: med(c, "ttft_p50_ms"))
    best99 = min(peers, key=lambda c: med(c, "ttft_p99_ms"))
    print(
        f"{p}: best peer p50 {best50} {med(best50, 'ttft_p50_ms'):.0f}, p99 {best99} {med(best99, 'ttft_p99_ms'):.0f}"
    )
    for c in ["bidkv+offload", *(c for c in by if c.startswith("ca-"))]:
        r50 = [by[best50][s]["ttft_p50_ms"] / by[c][s]["ttft_p50_ms"] for s in by[c] if s in by[best50]]
        r99 = [by[best99][s]["ttft_p99_ms"] / by[c][s]["ttft_p99_ms"] for s in by[c] if s in by[best99]]
        print(
            f"  {c}: p50 {med(c, 'ttft_p50_ms'):.0f} p99 {med(c, 'ttft_p99_ms'):.0f} | peer/ours "
            f"p50 {st.median(r50):.2f} ({min(r50):.2f}-{max(r50):.2f}) "
            f"p99 {st.median(r99):.2f} ({min(r99):.2f}-{max(r99):.2f}) tput {med(c, 'throughput_rps'):.3f}"
        )

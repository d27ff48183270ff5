"""The cache-aware bound sweep (admission_max_bypass 4, 8, 32; load 0.8, seeds 0-2) beside the study's peers.

Run from the repository root: `python docs/results/study-26/bypass.py chat-cpu1x multi-round-qa-cpu1x agentic-cpu10x`."""
import json, statistics as st, sys, collections
PEERS = ["vllm-offloading", "vllm-offloading-arc", "vllm-simple-offload", "vllm-simple-offload-lazy"]
for p in sys.argv[1:]:
    try:
        sw = [r for r in json.load(open(f"docs/results/study-26/h100-llama3-8b-{p}-bypass.json"))["results"] if "error" not in r]
    except FileNotFoundError:
        continue
    study = [r for r in json.load(open(f"docs/results/study-26/h100-llama3-8b-{p}.json"))["results"] if "error" not in r]
    by = collections.defaultdict(dict)
    for r in study + sw:
        by[r["config"]][r["run"]] = r
    peers = {c: by[c] for c in PEERS if c in by}
    med = lambda c, k: st.median(by[c][s][k] for s in by[c])
    best50 = min(peers, key=lambda c: med(c, "ttft_p50_ms")); best99 = min(peers, key=lambda c: med(c, "ttft_p99_ms"))
    print(f"{p}: best peer p50 {best50} {med(best50,'ttft_p50_ms'):.0f}, p99 {best99} {med(best99,'ttft_p99_ms'):.0f}")
    for c in ["bidkv+offload"] + [c for c in by if c.startswith("ca-")]:
        r50 = [by[best50][s]["ttft_p50_ms"] / by[c][s]["ttft_p50_ms"] for s in by[c] if s in by[best50]]
        r99 = [by[best99][s]["ttft_p99_ms"] / by[c][s]["ttft_p99_ms"] for s in by[c] if s in by[best99]]
        print(f"  {c}: p50 {med(c,'ttft_p50_ms'):.0f} p99 {med(c,'ttft_p99_ms'):.0f} | peer/ours p50 {st.median(r50):.2f} ({min(r50):.2f}-{max(r50):.2f}) p99 {st.median(r99):.2f} ({min(r99):.2f}-{max(r99):.2f}) tput {med(c,'throughput_rps'):.3f}")

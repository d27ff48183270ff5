"""The issue-26 study: per preset, every config's medians (min–max) over 3 seeds, and ratios paired per seed.

Run from the repository root: `python docs/results/study-26/summarize.py`. The JSONs are `bench sim --loads 0.8 --runs 3`
(see docs/results/notes.md, "offload_mode auto and the fair simulator").
"""

import collections
import json
import os
import statistics as st

PEERS = ["vllm-offloading", "vllm-offloading-arc", "vllm-simple-offload", "vllm-simple-offload-lazy"]


def load(path):
    if not os.path.exists(path):
        return []
    return [r for r in json.load(open(path))["results"] if "error" not in r]


def agg(recs, key):
    v = [r[key] for r in recs if r.get(key) is not None]
    return (st.median(v), min(v), max(v)) if v else None


def fmt(t, p=0):
    if t is None:
        return "–"
    m, lo, hi = t
    f = f"{{:,.{p}f}}"
    return f"{f.format(m)} ({f.format(lo)}–{f.format(hi)})"


def paired(by, a, b, key):
    """Per seed (run): b's key / a's key; median (min–max)."""
    ra = {r["run"]: r[key] for r in by.get(a, [])}
    rb = {r["run"]: r[key] for r in by.get(b, [])}
    v = [rb[k] / ra[k] for k in ra if k in rb and ra[k]]
    return (st.median(v), min(v), max(v)) if v else None


out = []
for w in ["agentic", "chat", "multi-round-qa"]:
    for t in ["10", "1"]:
        p = f"h100-llama3-8b-{w}-cpu{t}x"
        recs = load(f"docs/results/study-26/{p}.json")
        orc = load(f"docs/results/study-26/{p}-oracle.json")
        ca = load(f"docs/results/study-26/{p}-ca.json")
        if not recs:
            continue
        if orc:  # the oracle rerun after its fix replaces the first run's
            recs = [r for r in recs if r["config"] != "oracle"] + orc
        by = collections.defaultdict(list)
        for r in recs:
            by[r["config"]].append(r)
        for r in ca:
            if r["config"].startswith("bidkv"):
                by[r["config"] + " (cache-aware)"].append(r)
        rate = recs[0]["rate"]
        cal = recs[0].get("calibration") or {}
        out.append(
            f"\n#### `{w}`, CPU tier {t}× the pool — load 0.8 = {rate} req/s (stock capacity {cal.get('capacity_rps', 0):.3f} req/s)\n"
        )
        out.append("| config | TTFT p50 ms | TTFT p99 ms | req/s | loaded tok | prefill tok computed |")
        out.append("|---|---|---|---|---|---|")
        for c, rs in by.items():
            if c in ("unbounded",):
                continue
            out.append(
                f"| {c} | {fmt(agg(rs, 'ttft_p50_ms'))} | {fmt(agg(rs, 'ttft_p99_ms'))} | {fmt(agg(rs, 'throughput_rps'), 3)} | {fmt(agg(rs, 'loaded_tokens'))} | {fmt(agg(rs, 'prefill_tokens_computed'))} |"
            )
        ours = by.get("bidkv+offload")
        peers = {c: by[c] for c in PEERS if c in by}
        if ours and peers:
            best50 = min(peers, key=lambda c: agg(peers[c], "ttft_p50_ms")[0])
            best99 = min(peers, key=lambda c: agg(peers[c], "ttft_p99_ms")[0])
            r50 = agg(peers[best50], "ttft_p50_ms")[0] / agg(ours, "ttft_p50_ms")[0]
            r99 = agg(peers[best99], "ttft_p99_ms")[0] / agg(ours, "ttft_p99_ms")[0]
            p50 = paired(by, "bidkv+offload", best50, "ttft_p50_ms")
            p99 = paired(by, "bidkv+offload", best99, "ttft_p99_ms")
            lz = paired(by, "bidkv+offload", "bidkv+offload-lazy", "ttft_p50_ms")
            line = (
                f"\nPaired per seed (peer ÷ ours, median (min–max) of 3): TTFT p50 vs `{best50}` {p50[0]:.2f}× ({p50[1]:.2f}–{p50[2]:.2f}), "
                f"p99 vs `{best99}` {p99[0]:.2f}× ({p99[1]:.2f}–{p99[2]:.2f}); lazy ÷ auto TTFT p50 {lz[0]:.2f}× ({lz[1]:.2f}–{lz[2]:.2f})"
            )
            if "bidkv+offload (cache-aware)" in by:
                c = paired(by, "bidkv+offload (cache-aware)", best50, "ttft_p50_ms")
                c99 = paired(by, "bidkv+offload (cache-aware)", best99, "ttft_p99_ms")
                line += f"; cache-aware: p50 {c[0]:.2f}× ({c[1]:.2f}–{c[2]:.2f}) lower than `{best50}`, p99 {c99[0]:.2f}× ({c99[1]:.2f}–{c99[2]:.2f})"
            if "oracle" in by:
                o = paired(by, "oracle", "bidkv+offload", "ttft_p99_ms")
                line += f"; ours ÷ oracle TTFT p99 {o[0]:.2f}× ({o[1]:.2f}–{o[2]:.2f})"
            out.append(line + ".")
print("\n".join(out))

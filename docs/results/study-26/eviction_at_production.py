"""Our tier with ARC eviction (``bidkv+offload-arc``) at the production shape, beside the default
LRU (``bidkv+offload``) and vLLM's four peers (session 23).

Usage: PYTHONHASHSEED=0 PYTHONPATH=.:bench python docs/results/study-26/eviction_at_production.py
       <scratch dir> <processes>

Copies three production 10x sections (agentic, long-document QA and multi-round QA; chat is
left out: every config ties there) into the scratch directory, runs ``bidkv+offload-arc``
there at every recorded (rate, seed) (``rerun_configs.rerun``: docs/results stays as it is) and
writes ``eviction-at-production.json`` beside this script: per section and load, medians over
the seeds of TTFT p50 / p99, throughput and tokens loaded, and each config's ratio to LRU's.
"""

import json
import shutil
import statistics
import sys
from pathlib import Path

from rerun_configs import rerun

SECTIONS = [f"sim-prod-{w}-cpu10x" for w in ("agentic", "long-doc-qa", "multi-round-qa")]
CONFIGS = [
    "bidkv+offload",
    "bidkv+offload-arc",
    "vllm-offloading",
    "vllm-offloading-arc",
    "vllm-simple-offload",
    "vllm-simple-offload-lazy",
]
KEYS = ("ttft_p50_ms", "ttft_p99_ms", "throughput_rps", "loaded_tokens")


def summarize(scratch: Path) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    table: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for name in SECTIONS:
        records = json.loads((scratch / f"{name}.json").read_text())["results"]
        for load in sorted({r["load"] for r in records}):
            at = {c: [r for r in records if r["config"] == c and r["load"] == load] for c in CONFIGS}
            row = {c: {k: statistics.median(r[k] for r in rs) for k in KEYS} for c, rs in at.items()}
            lru = row["bidkv+offload"]
            for cells in row.values():
                cells.update({f"{k}_vs_lru": cells[k] / lru[k] for k in KEYS if lru[k]})
            table.setdefault(name, {})[str(load)] = row
    return table


if __name__ == "__main__":
    scratch, processes = Path(sys.argv[1]), int(sys.argv[2])
    results = Path(__file__).resolve().parent.parent
    scratch.mkdir(parents=True, exist_ok=True)
    for name in SECTIONS:
        path = scratch / f"{name}.json"
        done = path.exists() and any(
            r["config"] == CONFIGS[1] for r in json.loads(path.read_text())["results"]
        )
        if not done:  # a scratch directory from an earlier call keeps what it ran
            shutil.copy(results / f"{name}.json", path)
            rerun(scratch, processes, name, [CONFIGS[1]], "study: ARC tier eviction at production shape")
    out = Path(__file__).with_name("eviction-at-production.json")
    out.write_text(json.dumps(summarize(scratch), indent=1) + "\n")
    print(f"wrote {out}")

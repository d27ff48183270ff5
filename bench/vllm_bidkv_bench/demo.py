"""``vllm-bidkv demo``: stock vLLM, vLLM's own offloading and ours on the real engine, and who won.

Two calibrated presets (closed-loop chat and LMCache's multi-round QA on ``llama-6x768``),
each at 80% of stock's capacity measured first on this machine, every config with the same
CPU bytes; one run each by default (``--runs``). So that set-up plus demo fit in 10 minutes
on a 2-core box, it plays a third of the presets' requests (``DEMO_REQUESTS``) and its
engines run eager (vLLM's ``enforce_eager``: they start in seconds, without torch.compile);
docs/RESULTS.md runs the whole presets compiled. The closing table says, per workload, by how
much ``bidkv+offload`` beat or trailed each other config on TTFT p50 and throughput, and
whether that difference is outside the run-to-run spread of this demo's runs. One run has no
spread, and a p50 over a third of the requests moves far more than the full runs' do, so then
the table says so and puts beside it what the committed docs/RESULTS.md runs (3 interleaved,
whole presets) found for the same pair: a reference, not a verdict on this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from vllm_bidkv_bench.resultsdoc import TIE, ranges_apart, spread

DEMO_PRESETS = ("cpu-llama-chat", "cpu-llama-multi-round-qa")
OURS = "bidkv+offload"
DEMO_REQUESTS = 32
# The committed RESULTS.md data of each demo preset (3 interleaved runs on a quiet box).
COMMITTED = {
    "cpu-llama-chat": "docs/results/engine-llama-chat.json",
    "cpu-llama-multi-round-qa": "docs/results/engine-llama-multi-round-qa.json",
}


def main(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    from vllm_bidkv_bench.cli import write_outputs
    from vllm_bidkv_bench.configs import parse_configs
    from vllm_bidkv_bench.presets import get_preset
    from vllm_bidkv_bench.report import machine_meta
    from vllm_bidkv_bench.runner import Matrix, run_matrix

    started = time.monotonic()
    failed = False
    summaries = []
    for name in DEMO_PRESETS:
        preset = replace(get_preset(name), runs=args.runs, num_requests=DEMO_REQUESTS, enforce_eager=True)
        configs = parse_configs(list(preset.configs), with_unbounded=False)
        print(
            f"\nvllm-bidkv demo, {name}: workload {preset.workload} ({preset.num_requests} requests), "
            f"real vLLM engine on CPU, model {preset.model} (random weights, made here), "
            f"{preset.num_gpu_blocks} KV blocks of {preset.block_size} tokens, CPU tier "
            f"{preset.cpu_bytes / 2**20:g} MiB for every config; configs {', '.join(c.name for c in configs)}. "
            f"First stock's capacity on this machine, then load {', '.join(f'{x:g}' for x in preset.loads)} "
            f"of it; {args.runs} run(s) per config, one engine start each.",
            flush=True,
        )
        matrix = Matrix("engine", preset, configs, [], args.runs, loads=preset.loads)
        records = run_matrix(matrix, progress=not args.no_progress)
        args.json = str(Path(args.plot) / f"demo-{name}.json")
        meta = {**machine_meta(), "preset": asdict(preset), "admission": "fcfs", "seed": 0}
        print(write_outputs(records, args, meta, f"demo-{name}"))
        failed |= any("error" in r for r in records)
        summaries.append((name, records))
    print(f"\nWho won (took {(time.monotonic() - started) / 60:.1f} min):\n")
    print(winners(summaries, _committed))
    return 1 if failed else 0


def _committed(preset: str) -> list[dict[str, Any]] | None:
    path = Path(COMMITTED.get(preset, ""))
    if not path.is_file():
        return None
    return list(json.loads(path.read_text())["results"])


def winners(
    summaries: list[tuple[str, list[dict[str, Any]]]],
    committed: Any,
) -> str:
    """The closing table: ours against every other config, per preset.

    ``committed(preset)`` gives the committed runs of a preset (or None). A difference counts
    where the min–max ranges of the two configs over this demo's runs do not overlap, as in
    RESULTS.md; with one run there are no ranges, and the committed runs' own comparison is
    shown beside it instead."""
    lines = [
        "| workload | bidkv+offload vs | TTFT p50 (theirs / ours) | throughput (ours / theirs) | "
        "outside the run-to-run spread? |",
        "|---|---|---|---|---|",
    ]
    for preset, records in summaries:
        ok = [r for r in records if "error" not in r]
        runs = len({r["run"] for r in ok})
        reference = (committed(preset) or []) if runs < 2 else []
        for other in dict.fromkeys(r["config"] for r in ok if r["config"] != OURS):
            ttft = _ratio(ok, other, OURS, "ttft_p50_ms")
            tput = _ratio(ok, OURS, other, "throughput_rps")
            if ttft is None or tput is None:
                continue
            if runs >= 2:
                verdict = (
                    f"TTFT {_apart(ok, OURS, other, 'ttft_p50_ms')}, "
                    f"throughput {_apart(ok, OURS, other, 'throughput_rps')} (this demo's {runs} runs)"
                )
            else:
                verdict = "no spread: one run (`--runs 3` measures it)" + _reference(reference, other)
            lines.append(
                f"| {preset} | {other} | {_times(ttft, 'lower')} | {_times(tput, 'higher')} | {verdict} |"
            )
    return "\n".join(lines)


def _reference(records: list[dict[str, Any]], other: str) -> str:
    """What the committed runs found for ours against ``other`` ("" when they lack the pair)."""
    ttft = _ratio(records, other, OURS, "ttft_p50_ms")
    tput = _ratio(records, OURS, other, "throughput_rps")
    if ttft is None or tput is None:
        return ""
    n = statistics.median(r.get("completed", 0) for r in records)
    return (
        f"; RESULTS.md ({len({r['run'] for r in records})} runs of {n:.0f} requests): "
        f"TTFT {_times(ttft, 'lower')}, ranges apart: {_apart(records, OURS, other, 'ttft_p50_ms')}; "
        f"throughput {_times(tput, 'higher')}, ranges apart: "
        f"{_apart(records, OURS, other, 'throughput_rps')}"
    )


def _ratio(records: list[dict[str, Any]], num: str, den: str, key: str) -> float | None:
    a, b = spread(records, num, key), spread(records, den, key)
    if a is None or b is None or not b[0]:
        return None
    return a[0] / b[0]


def _times(ratio: float, better: str) -> str:
    if 1 / TIE <= ratio <= TIE:
        return f"{ratio:.2f}× (tie within 2%)"
    return f"{ratio:.2f}× {better} (ours won)" if ratio > 1 else f"{ratio:.2f}× (ours lost)"


def _apart(records: list[dict[str, Any]], a: str, b: str, key: str) -> str:
    x, y = spread(records, a, key), spread(records, b, key)
    if x is None or y is None:
        return "not measured"
    return "yes" if ranges_apart(x, y) else "no (ranges overlap)"

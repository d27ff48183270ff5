"""``vllm-bidkv bench restart``: the disk tier across an engine restart, and what it costs.

On the real engine through the OpenAI server (``llama-6x768`` by default), ``--runs`` times:

1. **Cold vs warm.** A server with a CPU tier and a disk tier on a fresh directory serves one
   request of a ``--prefix-tokens`` shared prompt (cold: nothing cached anywhere) and is
   stopped; a new server on the same directory serves the same prompt (warm: its prefix comes
   from disk). TTFT of each, on the client's clock, both the first request of their server.
   ``eager`` offload stores every finished request (``lazy`` keeps only what the GPU evicts,
   which a short run without pressure never does).
2. **Disk writes off the step's path.** The same batch of distinct prompts, nothing preempted,
   on ``bidkv+offload-eager`` with and without the disk tier (every stored block is written to
   disk in the background), in rotated order: output tokens per second of each.
3. **The disk's bandwidth** here: ``DiskFile`` (the worker's disk I/O) writing and reading
   blocks of the model's size, reads both from the page cache and after dropping the file's
   pages (``posix_fadvise``), as a restart of the host would find them.

A config that did not do its part (no block written to disk, a warm request that loaded
nothing) fails the run. Writes ``--json`` and ``--markdown`` (``docs/results/restart.*``;
``bench report`` appends the markdown to RESULTS.md); exit 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from vllm_bidkv_bench.args import positive_int
from vllm_bidkv_bench.report import machine_meta
from vllm_bidkv_bench.server import connector_config, openai_server, wait_idle
from vllm_bidkv_bench.soak import kv_block_bytes
from vllm_bidkv_bench.tiny_model import model_path

BLOCK_SIZE = 32
WARM_TARGET = 3.0  # cold TTFT / warm TTFT
NO_PRESSURE_TARGET = 0.97  # throughput with the disk tier / without


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-6x768", help="a built-in model name or a directory")
    parser.add_argument("--runs", type=positive_int, default=3)
    parser.add_argument("--prefix-tokens", type=positive_int, default=4000, help="the shared prompt (~4k)")
    parser.add_argument("--max-model-len", type=positive_int, default=4096, help="llama-6x768's positions")
    parser.add_argument("--requests", type=positive_int, default=24, help="the no-pressure batch")
    parser.add_argument("--prompt-tokens", type=positive_int, default=384, help="each prompt of the batch")
    parser.add_argument("--max-tokens", type=positive_int, default=48, help="output tokens per request")
    parser.add_argument("--bandwidth-mib", type=positive_int, default=512, help="data for the disk bandwidth")
    parser.add_argument("--dir", help="where the disk tiers go (default: a temporary directory)")
    parser.add_argument("--json", default="docs/results/restart.json", metavar="FILE")
    parser.add_argument("--markdown", default="docs/results/restart.md", metavar="FILE")
    parser.add_argument("--from-json", action="store_true", help="only re-render --markdown from --json")


def _server_options(args: argparse.Namespace, blocks: int) -> dict[str, Any]:
    return dict(
        gpu_blocks=blocks,
        block_size=BLOCK_SIZE,
        max_model_len=args.max_model_len,
        enforce_eager=True,
        # Block hashes must match across the restart on every release (sha256 from 0.29 on seeds
        # them the same anyway): what an operator of an older release sets.
        env={"PYTHONHASHSEED": "0", "VLLM_LOGGING_LEVEL": "WARNING"},
    )


def _kv(cpu_bytes: int, disk: Path | None) -> dict[str, Any]:
    extra: dict[str, Any] = {"offload_mode": "eager", "cpu_bytes": cpu_bytes}
    if disk is not None:
        extra |= {"disk_path": str(disk), "disk_bytes": 8 * 2**30}
    return connector_config(extra)


def _ttft(url: str, model: str, prompt: list[int]) -> float:
    """Seconds to the first streamed token of a greedy completion of ``prompt`` (token ids)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0.0, "stream": True}
    start = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:") and line != "data: [DONE]":
                return time.perf_counter() - start
    raise RuntimeError("the server streamed no token")


async def _batch(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> float:
    """Output tokens per second of ``prompts`` sent at once."""
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(prompt: list[int]) -> int:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
            body["ignore_eos"] = True
            response = await client.post(f"{url}/v1/completions", json=body)
            response.raise_for_status()
            return int(response.json()["usage"]["completion_tokens"])

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(p) for p in prompts))
        return sum(tokens) / (time.perf_counter() - start)


def _counter(metrics: dict[str, float], name: str) -> float:
    return metrics.get(f"vllm:bidkv_{name}_total", metrics.get(f"vllm:bidkv_{name}", 0.0))


def cold_and_warm(
    args: argparse.Namespace, model: str, root: Path, run: int, block_bytes: int
) -> dict[str, Any]:
    rng = random.Random(run)
    prompt, other = ([rng.randrange(10, 500) for _ in range(args.prefix_tokens + 8)] for _ in range(2))
    blocks = (len(prompt) + args.max_tokens) // BLOCK_SIZE + 32
    disk = root / f"restart-{run}"
    # A CPU tier of 4 such prompts: the warm-up's blocks stay pinned there while they are
    # written to disk, and the prompt's blocks must pass through it on their way from disk.
    kv = _kv(4 * blocks * block_bytes, disk)
    record: dict[str, Any] = {"run": run}
    for phase in ("cold", "warm"):
        with openai_server(model, kv, root / f"{phase}-{run}.log", **_server_options(args, blocks)) as server:
            # A first request of another prompt of the same length warms the server (the CPU
            # backend's kernels are built at their first use of a shape), so both times below
            # are the prefix's own: computed (cold) or loaded from disk (warm).
            _ttft(server.url, server.model, other if phase == "cold" else other[::-1])
            record[f"{phase}_ttft_s"] = _ttft(server.url, server.model, prompt)
            metrics = wait_idle(server.url)
        record[f"{phase}_disk_blocks_written"] = _counter(metrics, "disk_blocks_written")
        record[f"{phase}_tokens_loaded"] = _counter(metrics, "tokens_loaded")
        record[f"{phase}_disk_hit_blocks"] = _counter(metrics, "disk_hit_blocks")
    if not record["cold_disk_blocks_written"] or not record["warm_disk_hit_blocks"]:
        raise RuntimeError(f"run {run}: the disk tier did nothing (a benchmark bug): {record}")
    record["ratio"] = record["cold_ttft_s"] / record["warm_ttft_s"]
    return record


def no_pressure(
    args: argparse.Namespace, model: str, root: Path, run: int, block_bytes: int
) -> list[dict[str, Any]]:
    rng = random.Random(100 + run)
    warmup, prompts = (
        [[rng.randrange(10, 500) for _ in range(args.prompt_tokens)] for _ in range(args.requests)]
        for _ in range(2)
    )
    blocks = args.requests * ((args.prompt_tokens + args.max_tokens) // BLOCK_SIZE + 2)  # nothing preempted
    configs = ["bidkv+offload-eager", "bidkv+offload-eager+disk"]
    records = []
    for name in configs[run % 2 :] + configs[: run % 2]:  # rotated per run
        disk = root / f"batch-{run}" if name.endswith("+disk") else None
        kv = _kv(blocks * block_bytes, disk)
        with openai_server(model, kv, root / f"{name}-{run}.log", **_server_options(args, blocks)) as server:
            asyncio.run(_batch(server.url, server.model, warmup, args.max_tokens))  # kernels built, as above
            tok_s = asyncio.run(_batch(server.url, server.model, prompts, args.max_tokens))
            metrics = wait_idle(server.url)
        written = _counter(metrics, "disk_blocks_written")
        if disk is not None and not written:
            raise RuntimeError(f"run {run}: {name} wrote nothing to disk (a benchmark bug)")
        records.append({"run": run, "config": name, "tok_s": tok_s, "disk_blocks_written": written})
    return records


def bandwidth(root: Path, block_bytes: int, total_mib: int) -> dict[str, float]:
    """MiB/s of ``DiskFile`` writes and reads of ``block_bytes`` blocks (one worker's file)."""
    import torch

    from vllm_bidkv.connectors.disk_file import DiskFile

    slots = max(1, total_mib * 2**20 // block_bytes)
    rows = [torch.randint(0, 255, (slots, block_bytes), dtype=torch.uint8)]
    disk = DiskFile(str(root / "bandwidth"), 0, 1, rows, slots)
    ids = list(range(slots))
    mib = slots * block_bytes / 2**20
    start = time.perf_counter()
    disk.write(ids, ids).result()
    written = time.perf_counter() - start
    fd = os.open(disk.path, os.O_RDONLY)
    os.fsync(fd)
    synced = time.perf_counter() - start
    expected = rows[0].clone()
    start = time.perf_counter()
    disk.read(ids, ids)
    cached = time.perf_counter() - start
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # its clean pages leave the page cache
    start = time.perf_counter()
    disk.read(ids, ids)
    uncached = time.perf_counter() - start
    os.close(fd)
    disk.close()
    assert torch.equal(rows[0], expected), "the disk returned other bytes"
    return {
        "block_bytes": block_bytes,
        "mib": mib,
        "write_mib_s": mib / written,
        "write_fsync_mib_s": mib / synced,
        "read_cached_mib_s": mib / cached,
        "read_uncached_mib_s": mib / uncached,
    }


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def render(result: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    runs, batch, bw = result["cold_warm"], result["no_pressure"], result["bandwidth"]
    ratios = [r["ratio"] for r in runs]
    by = {
        c: [r["tok_s"] for r in batch if r["config"] == c]
        for c in ("bidkv+offload-eager", "bidkv+offload-eager+disk")
    }
    rel = [d / b for d, b in zip(by["bidkv+offload-eager+disk"], by["bidkv+offload-eager"], strict=True)]
    targets = {
        f"warm restart TTFT ≥ {WARM_TARGET:g}× lower than cold": min(ratios) >= WARM_TARGET,
        f"no-pressure throughput with the disk tier ≥ {NO_PRESSURE_TARGET:.0%} of without": statistics.median(
            rel
        )
        >= NO_PRESSURE_TARGET,
    }
    meta = result["meta"]
    lines = [
        "## The disk tier: a restart that starts warm",
        "",
        f"`vllm-bidkv bench restart` (`{meta['argv']}`), {meta['date']}, load average "
        f"{meta['load_avg']}; model `{result['model']}`, blocks of {BLOCK_SIZE} tokens "
        f"({bw['block_bytes'] / 2**10:.0f} KiB each), float32, `offload_mode: eager`, the OpenAI server. "
        "Peers: stock vLLM has no tier to keep (its TTFT after a restart is the cold one); vLLM's own "
        "offloading keeps its CPU tier in process memory, gone with the process. Bound: a prefill that "
        "costs nothing, which no tier reaches (the loaded KV still crosses the disk and the copy path).",
        "",
        f"**Cold vs warm** ({len(runs)} runs, median (min–max)): a {result['prefix_tokens']}-token "
        "prompt on a fresh server, then on a new server on the same `disk_path` (its data file still "
        "in the page cache: a restart of the engine, not of the host); each server first served one "
        "request of another prompt of that length, so that neither time includes building the CPU "
        "backend's kernels.",
        "",
        "| | TTFT s | tokens loaded | disk blocks read |",
        "|---|---|---|---|",
        f"| cold (the prompt in no tier) | {_spread([r['cold_ttft_s'] for r in runs], '{:.3f}')} | 0 | 0 |",
        f"| warm (restarted, same disk_path) | {_spread([r['warm_ttft_s'] for r in runs], '{:.3f}')} | "
        f"{_spread([r['warm_tokens_loaded'] for r in runs], '{:.0f}')} | "
        f"{_spread([r['warm_disk_hit_blocks'] for r in runs], '{:.0f}')} |",
        "",
        f"Cold / warm: {_spread(ratios)}×.",
        "",
        f"**No pressure** ({len(rel)} runs, rotated order, each after a warm-up batch): "
        f"{result['requests']} distinct prompts of "
        f"{result['prompt_tokens']} tokens sent at once, {result['max_tokens']} output tokens each, enough "
        "GPU blocks that nothing is preempted; every finished request is stored (eager) and, with the "
        f"disk tier, written to disk ({_spread([r['disk_blocks_written'] for r in batch if r['disk_blocks_written']], '{:.0f}')} "
        "blocks per run).",
        "",
        "| config | output tok/s |",
        "|---|---|",
        *(f"| `{c}` | {_spread(v, '{:.1f}')} |" for c, v in by.items()),
        "",
        f"With the disk tier / without, per run: {_spread(rel, '{:.3f}')}.",
        "",
        f"**The disk here** (`DiskFile`, {bw['mib']:.0f} MiB in blocks of {bw['block_bytes'] / 2**10:.0f} KiB, "
        "one worker's file): write "
        f"{bw['write_mib_s']:.0f} MiB/s (to the page cache), {bw['write_fsync_mib_s']:.0f} MiB/s including "
        f"fsync; read {bw['read_cached_mib_s']:.0f} MiB/s from the page cache, "
        f"{bw['read_uncached_mib_s']:.0f} MiB/s after its pages were dropped.",
        "",
        "| target | verdict |",
        "|---|---|",
        *(f"| {name} | {'met' if ok else 'MISSED'} |" for name, ok in targets.items()),
        "",
    ]
    return "\n".join(lines), targets


def main(args: argparse.Namespace) -> int:
    if args.from_json:
        result = json.loads(Path(args.json).read_text())
        text, targets = render(result)
        Path(args.markdown).write_text(text)
        print(text)
        return 0 if all(targets.values()) else 1
    if max(args.prefix_tokens + 8 + 4, args.prompt_tokens + args.max_tokens) > args.max_model_len:
        raise SystemExit("vllm-bidkv bench restart: a prompt and its output exceed --max-model-len")
    model = model_path(args.model)
    block_bytes = kv_block_bytes(model, BLOCK_SIZE)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        runs, batch = [], []
        for run in range(args.runs):
            runs.append(cold_and_warm(args, model, root, run, block_bytes))
            batch += no_pressure(args, model, root, run, block_bytes)
            print(f"[restart] run {run}: {runs[-1]} {batch[-2:]}", flush=True)
        bw = bandwidth(root, block_bytes, args.bandwidth_mib)
    meta = machine_meta() | {
        "argv": "vllm-bidkv bench restart "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in _flags(args)),
        "load_avg": " / ".join(f"{x:.1f}" for x in os.getloadavg()),
    }
    result = {
        "model": args.model,
        "prefix_tokens": args.prefix_tokens,
        "requests": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "cold_warm": runs,
        "no_pressure": batch,
        "bandwidth": bw,
        "meta": meta,
    }
    text, targets = render(result)
    result["targets"] = targets
    for path, content in ((args.json, json.dumps(result, indent=1) + "\n"), (args.markdown, text)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(content)
    print(text)
    return 0 if all(targets.values()) else 1


def _flags(args: argparse.Namespace) -> list[tuple[str, Any]]:
    keys = ("model", "runs", "prefix_tokens", "requests", "prompt_tokens", "max_tokens")
    return [(k, getattr(args, k)) for k in keys]

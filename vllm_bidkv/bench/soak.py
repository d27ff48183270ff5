"""``vllm-bidkv bench soak``: many requests through the OpenAI server, a share hung up by the client.

Starts ``python -m vllm.entrypoints.openai.api_server`` with BidKVConnector (lazy
offload) on the tiny model under KV pressure, sends ``--requests`` streaming
completions from an async client (httpx) with ``--concurrency`` in flight, of which
``--cancel-share`` are dropped by the client mid-stream, and samples the server's
resident memory (the process tree: API server + engine core, psutil) and the
``vllm:bidkv_*`` gauges over the run. Writes a JSON (``docs/results/soak.json``)
a plot (``docs/soak.png``) and the RESULTS.md section (``docs/results/soak.md``).

Targets (issue 12): >= 5,000 requests, 20% cancelled, 0 failed that were not
cancelled, RSS at the end within 5% of its value after the first 500 requests,
the tier's gauges at their idle values at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from vllm_bidkv.bench.server import connector_config, get, openai_server, wait_idle
from vllm_bidkv.counters import IDLE_ZERO_GAUGES
from vllm_bidkv.top import parse_metrics

RSS_BASELINE_AFTER = 500


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=5000, help="requests to send (default 5000)")
    parser.add_argument("--cancel-share", type=float, default=0.2, help="share dropped mid-stream (0.2)")
    parser.add_argument("--concurrency", type=int, default=24, help="requests in flight (default 24)")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (default 32)")
    parser.add_argument("--gpu-blocks", type=int, default=36, help="KV blocks of 32 tokens (36: pressure)")
    parser.add_argument("--cpu-bytes", default="64MiB", help="CPU tier size (default 64MiB)")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between samples (2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/soak.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/soak.png"))
    parser.add_argument("--server-log", type=Path, default=None, help="server output (default: a temp file)")


def _check(args: argparse.Namespace) -> None:
    if args.requests < 1:
        raise ValueError(f"vllm-bidkv bench soak: --requests {args.requests} must be >= 1")
    if not 0 <= args.cancel_share < 1:
        raise ValueError(f"vllm-bidkv bench soak: --cancel-share {args.cancel_share} must be in [0, 1)")
    if args.concurrency < 1:
        raise ValueError(f"vllm-bidkv bench soak: --concurrency {args.concurrency} must be >= 1")
    if args.max_tokens < 2:
        raise ValueError(f"vllm-bidkv bench soak: --max-tokens {args.max_tokens} must be >= 2")
    if args.sample_every <= 0:
        raise ValueError(f"vllm-bidkv bench soak: --sample-every {args.sample_every} must be > 0")


def _tree_rss(pid: int) -> int:
    import psutil  # type: ignore[import-untyped]

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def _prompts(seed: int, n: int) -> list[str]:
    from vllm_bidkv.tiny_model import synthetic_prompt

    rng = random.Random(seed)
    systems = [synthetic_prompt(rng, 60) for _ in range(4)]
    return [systems[i % 4] + " " + synthetic_prompt(rng, rng.randint(10, 80)) for i in range(n)]


async def _drive(url: str, model: str, args: argparse.Namespace, pid: int) -> dict[str, Any]:
    import httpx

    rng = random.Random(args.seed)
    prompts = _prompts(args.seed, 64)
    cancelled = set(rng.sample(range(args.requests), round(args.cancel_share * args.requests)))
    plan = [
        (
            prompts[rng.randrange(len(prompts))],
            rng.randint(1, args.max_tokens - 1) if i in cancelled else None,
        )
        for i in range(args.requests)
    ]
    counts = {"done": 0, "completed": 0, "cancelled": 0, "failed": 0, "cancel_finished_first": 0}
    errors: list[str] = []
    samples: list[dict[str, Any]] = []
    rss_after_baseline: list[int] = []
    started = time.monotonic()

    def sample() -> None:
        try:
            m = parse_metrics(get(f"{url}/metrics"))
        except (OSError, ValueError) as err:
            m = {"error": str(err)}  # type: ignore[dict-item]
        samples.append(
            {
                "t": round(time.monotonic() - started, 2),
                "done": counts["done"],
                "rss": _tree_rss(pid),
                "running": m.get("vllm:num_requests_running"),
                "waiting": m.get("vllm:num_requests_waiting"),
                "kv_usage": m.get("vllm:kv_cache_usage_perc"),
                **{
                    g: m.get(f"vllm:bidkv_{g}")
                    for g in ("tier_entries", "tier_used_bytes", *IDLE_ZERO_GAUGES)
                },
            }
        )

    async def one(client: httpx.AsyncClient, prompt: str, drop_after: int | None) -> None:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
        }
        chunks, finished = 0, False
        try:
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        finished = True
                        break
                    if line.startswith("data: "):
                        chunks += 1
                        if drop_after is not None and chunks >= drop_after:
                            break  # hang up mid-stream
        except Exception as err:  # noqa: BLE001 - a soak counts failures, it does not stop at one
            if drop_after is None:
                counts["failed"] += 1
                errors.append(repr(err)[:300])
        else:
            if drop_after is not None:
                counts["cancelled" if not finished else "cancel_finished_first"] += 1
            elif finished:
                counts["completed"] += 1
            else:
                counts["failed"] += 1
                errors.append(f"stream ended without [DONE] after {chunks} chunks")
        counts["done"] += 1
        if counts["done"] == min(RSS_BASELINE_AFTER, args.requests):
            rss_after_baseline.append(_tree_rss(pid))

    async def sampler(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=args.sample_every)

    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        queue: asyncio.Queue[tuple[str, int | None]] = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)

        async def worker() -> None:
            while not queue.empty():
                prompt, drop = queue.get_nowait()
                await one(client, prompt, drop)

        sampling = asyncio.create_task(sampler(stop))
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        stop.set()
        await sampling
    run_s = time.monotonic() - started
    return {
        "counts": counts,
        "errors": errors[:20],
        "samples": samples,
        "rss_after_500": rss_after_baseline,
        "run_s": run_s,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    done = [s["done"] for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(done, [s["rss"] / 2**20 for s in samples], label="server RSS (API + engine core)")
    if result["rss_after_500"]:
        ax1.axhline(result["rss_after_500"] / 2**20, ls="--", color="gray", label="after 500 requests")
    ax1.set_ylabel("MiB")
    ax1.legend(loc="lower right")
    ax1.set_title(
        f"soak: {result['requests']} requests, {result['counts']['cancelled']} cancelled, "
        f"{result['counts']['failed']} failed"
    )
    for name in (
        "tier_entries",
        "tier_pinned_entries",
        "stores_in_flight",
        "loads_in_flight",
        "tracked_requests",
    ):
        ax2.plot(done, [s.get(name) or 0 for s in samples], label=name)
    ax2.plot(done, [s.get("running") or 0 for s in samples], label="requests running", ls=":")
    ax2.set_xlabel("requests finished (completed or cancelled)")
    ax2.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """The "Soak" section of docs/RESULTS.md for one result (also written next to the JSON)."""
    c = result["counts"]
    mib = 2**20
    rss_500 = result["rss_after_500"]
    growth = result["rss_growth"]
    lines = [
        "## Soak: `vllm-bidkv bench soak`",
        "",
        f"`vllm-bidkv bench soak --requests {result['requests']} --cancel-share {result['cancel_share']}` "
        f"(OpenAI server, tiny model, float32, BidKVConnector lazy offload, {result['gpu_blocks']} GPU blocks "
        f"of 32 tokens, {result['cpu_bytes']} CPU tier; {result['concurrency']} streaming requests in flight, "
        f"{result['max_tokens']} output tokens; {result['run_s']:.0f} s). "
        "JSON: `docs/results/soak.json`; plot: `docs/soak.png`.",
        "",
        "| target | result | met |",
        "|---|---|---|",
        f"| >= 5,000 requests | {result['requests']} | {_yes(result['targets']['requests >= 5000'])} |",
        f"| 20% cancelled by the client | {c['cancelled']} hung up mid-stream "
        f"({100 * c['cancelled'] / result['requests']:.1f}%; {c['cancel_finished_first']} more finished "
        f"before their drop point) | {_yes(result['targets']['cancelled share >= 0.2'])} |",
        f"| 0 failed that were not cancelled | {c['failed']} failed, {c['completed']} completed "
        f"| {_yes(result['targets']['0 failed (not cancelled)'])} |",
        f"| RSS at end within 5% of after 500 requests | "
        f"{(rss_500 or 0) / mib:.0f} MiB -> {result['rss_end'] / mib:.0f} MiB "
        f"({'-' if growth is None else f'{100 * growth:+.1f}%'}) "
        f"| {_yes(result['targets']['RSS end within 5% of after 500'])} |",
        f"| gauges idle at end | {', '.join(f'{k}={v:.0f}' for k, v in result['gauges_end'].items() if v is not None)}; "
        f"kv_cache_usage_perc={result['kv_cache_usage_end']} | {_yes(result['targets']['gauges idle at end'])} |",
        "",
        f"At the end the tier held {result['tier_entries_end']:.0f} entries; the run had "
        f"{result['preemptions_end']:.0f} preemptions (vLLM's count). RSS is the server's process tree "
        "(API server + engine core).",
    ]
    return "\n".join(lines) + "\n"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def main(args: argparse.Namespace) -> int:
    _check(args)
    from vllm_bidkv.tiny_model import tiny_model_dir

    model = str(tiny_model_dir())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = args.server_log or Path(tempfile.mkdtemp(prefix="vllm-bidkv-soak-")) / "server.log"
    kv = connector_config({"cpu_bytes": args.cpu_bytes, "offload_mode": "lazy"})
    t0 = time.monotonic()
    with openai_server(model, kv, log, gpu_blocks=args.gpu_blocks) as server:
        start_s = time.monotonic() - t0
        drive = asyncio.run(_drive(server.url, model, args, server.proc.pid))
        final = wait_idle(server.url)
        rss_end = _tree_rss(server.proc.pid)
    counts = drive["counts"]
    rss_500 = drive["rss_after_500"][0] if drive["rss_after_500"] else None
    growth = (rss_end - rss_500) / rss_500 if rss_500 else None
    gauges_end = {g: final.get(f"vllm:bidkv_{g}") for g in IDLE_ZERO_GAUGES}
    idle = all(v == 0 for v in gauges_end.values()) and final.get("vllm:num_requests_running") == 0
    result: dict[str, Any] = {
        "requests": args.requests,
        "cancel_share": args.cancel_share,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "gpu_blocks": args.gpu_blocks,
        "cpu_bytes": args.cpu_bytes,
        "server_start_s": round(start_s, 1),
        "run_s": round(drive["run_s"], 1),
        "counts": counts,
        "errors": drive["errors"],
        "rss_after_500": rss_500,
        "rss_end": rss_end,
        "rss_growth": growth,
        "gauges_end": gauges_end,
        "tier_entries_end": final.get("vllm:bidkv_tier_entries"),
        "kv_cache_usage_end": final.get("vllm:kv_cache_usage_perc"),
        "counters_end": {
            k: v for k, v in final.items() if k.startswith("vllm:bidkv_") and k.endswith("_total")
        },
        "preemptions_end": final.get("vllm:num_preemptions_total"),
        "idle_at_end": idle,
        "targets": {
            "requests >= 5000": args.requests >= 5000,
            "cancelled share >= 0.2": counts["cancelled"] >= 0.2 * args.requests * 0.95,
            "0 failed (not cancelled)": counts["failed"] == 0,
            "RSS end within 5% of after 500": growth is not None and abs(growth) <= 0.05,
            "gauges idle at end": idle,
        },
        "samples": drive["samples"],
    }
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    args.out.with_suffix(".md").write_text(markdown(result))
    summary = {k: v for k, v in result.items() if k not in ("samples", "counters_end")}
    print(json.dumps(summary, indent=1))
    return 0 if all(result["targets"].values()) else 1

"""``vllm-bidkv bench soak``: many requests through the OpenAI server, beside a stock control.

One OpenAI server per config (``--configs``; ``stock`` is the control and required), all
started on the same engine settings and driven at once with the same plan: ``--requests``
streaming completions from an async client (httpx, ``--concurrency`` in flight per server),
``--cancel-share`` of them hung up by the client mid-stream, prompts drawn from a pool whose
distinct blocks are several times the CPU tier (so the tier evicts), and ``--resets`` prefix
cache resets during the run (``POST /reset_prefix_cache`` with the running requests and the
connector's tier, ``VLLM_SERVER_DEV_MODE=1``). The configs share the box on purpose: the soak
measures memory and bookkeeping, not speed, and one time window gives every config the same
conditions.

Each server's resident memory (its process tree: API server + engine core, psutil) is sampled
over the run and a least-squares line fitted against requests finished after the warm-up
share; its slope (bytes per request) is compared with stock's. At the end, with every server
idle, a fixed probe set is sent one at a time (greedy) and each config's outputs are compared
with stock's. Every request is accounted for: completed, cancelled (hung up mid-stream),
finished before its planned hang-up, failed while being cancelled, or failed.

Writes a JSON (``docs/results/soak.json``), a plot (``docs/soak.png``) and the RESULTS.md
section (``docs/results/soak.md``); exit 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_bidkv.counters import IDLE_ZERO_GAUGES
from vllm_bidkv.top import parse_metrics
from vllm_bidkv_bench.server import Server, connector_config, get, openai_server, wait_idle

BLOCK_SIZE = 32  # tokens per KV block: the server's --block-size here
# The fault variant's copy failures: every 5th load job and every 7th store batch fail, half
# copied first, and every copy is reported a step late (``VLLM_BIDKV_FAULTS``).
DEFAULT_FAULTS = '{"load_every": 5, "store_every": 7, "mid_batch": true, "complete_after_steps": 1}'
SLOPE_TARGET_BYTES = 1024  # per request, after warm-up (or no more than stock's)


@dataclass(frozen=True)
class SoakConfig:
    """One server of the soak: its connector (None: stock vLLM) and its extra environment."""

    name: str
    kv_transfer_config: dict[str, Any] | None
    env: dict[str, str] = field(default_factory=dict)


def soak_configs(cpu_bytes: str, faults: str) -> dict[str, SoakConfig]:
    """The configs ``--configs`` may name."""

    def bidkv(mode: str) -> dict[str, Any]:
        return connector_config({"cpu_bytes": cpu_bytes, "offload_mode": mode})

    return {
        c.name: c
        for c in (
            SoakConfig("stock", None, {"BIDKV_DISABLE": "1"}),
            SoakConfig("bidkv-lazy", bidkv("lazy")),
            SoakConfig("bidkv-eager", bidkv("eager")),
            SoakConfig(
                "bidkv-faults", bidkv("lazy"), {"VLLM_BIDKV_TEST_HOOKS": "1", "VLLM_BIDKV_FAULTS": faults}
            ),
        )
    }


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=10000, help="requests per config (10000)")
    parser.add_argument(
        "--configs",
        default="stock,bidkv-lazy,bidkv-eager,bidkv-faults",
        help="comma list of stock (the control, required), bidkv-lazy, bidkv-eager, bidkv-faults",
    )
    parser.add_argument("--cancel-share", type=float, default=0.2, help="share hung up mid-stream (0.2)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight per server (16)")
    parser.add_argument("--max-tokens", type=int, default=8, help="output tokens per request (8)")
    parser.add_argument("--gpu-blocks", type=int, default=36, help="KV blocks of 32 tokens (36: pressure)")
    parser.add_argument(
        "--cpu-bytes", default="4MiB", help="CPU tier size (4MiB: 64 blocks of the tiny model)"
    )
    parser.add_argument("--contexts", type=int, default=256, help="distinct prompts in the pool (256)")
    parser.add_argument("--resets", type=int, default=8, help="prefix-cache resets during the run (8)")
    parser.add_argument("--probes", type=int, default=16, help="prompts compared with stock at the end (16)")
    parser.add_argument("--warmup-share", type=float, default=0.2, help="requests before the slope fit (0.2)")
    parser.add_argument("--faults", default=DEFAULT_FAULTS, help="VLLM_BIDKV_FAULTS of bidkv-faults")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between samples (2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/results/soak.json"))
    parser.add_argument("--plot", type=Path, default=Path("docs/soak.png"))
    parser.add_argument("--log-dir", type=Path, default=None, help="server logs (default: a temp dir)")
    parser.add_argument(
        "--from-json", action="store_true", help="no run: write the plot and the section again from --out"
    )


def check_args(args: argparse.Namespace) -> list[SoakConfig]:
    """The configs to run; ValueError naming the flag for a bad value."""
    checks: list[tuple[str, bool, str]] = [
        ("--requests", args.requests >= 1, "must be >= 1"),
        ("--cancel-share", 0 <= args.cancel_share < 1, "must be in [0, 1)"),
        ("--concurrency", args.concurrency >= 1, "must be >= 1"),
        ("--max-tokens", args.max_tokens >= 2, "must be >= 2 (a hang-up needs a token before the last)"),
        ("--contexts", args.contexts >= 1, "must be >= 1"),
        ("--resets", args.resets >= 0, "must be >= 0"),
        ("--probes", args.probes >= 1, "must be >= 1"),
        ("--warmup-share", 0 <= args.warmup_share < 1, "must be in [0, 1)"),
        ("--sample-every", args.sample_every > 0, "must be > 0"),
    ]
    for flag, ok, allowed in checks:
        if not ok:
            value = getattr(args, flag[2:].replace("-", "_"))
            raise ValueError(f"vllm-bidkv bench soak: {flag} {value} {allowed}")
    known = soak_configs(args.cpu_bytes, args.faults)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or "stock" not in names or len(set(names)) != len(names):
        raise ValueError(
            f"vllm-bidkv bench soak: --configs {args.configs!r}: each name once, from {', '.join(known)}, "
            "stock (the control) included"
        )
    return [known[n] for n in names]


def tree_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and its children (API server + engine core)."""
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


def prompt_pool(seed: int, contexts: int) -> list[str]:
    """``contexts`` prompts: 8 shared system prompts, each prompt its own context after one."""
    from vllm_bidkv_bench.tiny_model import synthetic_prompt

    rng = random.Random(seed)
    systems = [synthetic_prompt(rng, 60) for _ in range(8)]
    return [systems[i % 8] + " " + synthetic_prompt(rng, rng.randint(40, 160)) for i in range(contexts)]


def kv_block_bytes(model_dir: str, block_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of one KV block of the model in ``model_dir``, from its ``config.json`` (float32 by
    default, as the soak's servers run): layers x (K, V) x KV heads x head size x tokens."""
    config = json.loads(Path(model_dir, "config.json").read_text())
    heads = config["num_attention_heads"]
    head_size = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return int(config["num_hidden_layers"] * 2 * kv_heads * head_size * dtype_bytes * block_size)


def working_set_blocks(model: str, prompts: list[str]) -> int:
    """Distinct full KV blocks of ``prompts`` (vLLM's prefix-cache unit) under the model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    blocks: set[tuple[int, ...]] = set()
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        # A block's identity is its tokens and everything before it, as vLLM's block hash.
        blocks.update(tuple(ids[:end]) for end in range(BLOCK_SIZE, len(ids) + 1, BLOCK_SIZE))
    return len(blocks)


def request_plan(args: argparse.Namespace, pool: list[str]) -> list[tuple[str, int | None]]:
    """(prompt, hang up after this many chunks or None) per request, the same for every config."""
    rng = random.Random(args.seed)
    cancelled = set(rng.sample(range(args.requests), round(args.cancel_share * args.requests)))
    return [
        (pool[rng.randrange(len(pool))], rng.randint(1, args.max_tokens - 1) if i in cancelled else None)
        for i in range(args.requests)
    ]


OUTCOMES = ("completed", "cancelled", "cancel_finished_first", "cancel_failed", "failed")


async def drive(
    server: Server, config: str, plan: list[tuple[str, int | None]], args: argparse.Namespace
) -> dict[str, Any]:
    """Send ``plan`` to ``server``; samples, outcomes and resets of one config."""
    import httpx

    counts = dict.fromkeys(OUTCOMES, 0)
    errors: list[str] = []
    samples: list[dict[str, Any]] = []
    resets = {"asked": 0, "succeeded": 0}
    reset_at = {round(k * len(plan) / (args.resets + 1)) for k in range(1, args.resets + 1)}
    started = time.monotonic()
    done = 0

    def sample() -> None:
        try:
            m = parse_metrics(get(f"{server.url}/metrics"))
        except (OSError, ValueError) as err:
            m = {"error": str(err)}  # type: ignore[dict-item]
        samples.append(
            {
                "t": round(time.monotonic() - started, 2),
                "done": done,
                "rss": tree_rss(server.proc.pid),
                "running": m.get("vllm:num_requests_running"),
                "evictions": m.get("vllm:bidkv_cpu_evictions_total"),
                **{g: m.get(f"vllm:bidkv_{g}") for g in ("tier_entries", *IDLE_ZERO_GAUGES)},
            }
        )

    async def reset(client: httpx.AsyncClient) -> None:
        # Preempts what runs and empties the connector's tier: what a weight update does.
        resets["asked"] += 1
        with contextlib.suppress(httpx.HTTPError):
            r = await client.post("/reset_prefix_cache?reset_running_requests=true&reset_external=true")
            resets["succeeded"] += bool(r.status_code == 200 and r.json().get("success"))

    async def one(client: httpx.AsyncClient, prompt: str, hang_up_after: int | None) -> None:
        nonlocal done
        body = {
            "model": server.model,
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
                        if hang_up_after is not None and chunks >= hang_up_after:
                            break
        except Exception as err:  # noqa: BLE001 - a soak counts failures, it does not stop at one
            counts["failed" if hang_up_after is None else "cancel_failed"] += 1
            errors.append(repr(err)[:300])
        else:
            if hang_up_after is not None:
                counts["cancel_finished_first" if finished else "cancelled"] += 1
            elif finished:
                counts["completed"] += 1
            else:
                counts["failed"] += 1
                errors.append(f"stream ended without [DONE] after {chunks} chunks")
        done += 1
        if done in reset_at:
            await reset(client)

    async def sampler(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(sample)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=args.sample_every)

    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=args.concurrency + 1, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
        queue = list(reversed(plan))

        async def worker() -> None:
            while queue:
                await one(client, *queue.pop())

        sampling = asyncio.create_task(sampler(stop))
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        stop.set()
        await sampling
    return {
        "config": config,
        "counts": counts,
        "errors": errors[:20],
        "resets": resets,
        "samples": samples,
        "run_s": round(time.monotonic() - started, 1),
    }


def probe(server: Server, prompts: list[str]) -> list[str]:
    """Greedy outputs of ``prompts``, one request at a time."""
    import httpx

    outputs = []
    with httpx.Client(base_url=server.url, timeout=600) as client:
        for prompt in prompts:
            body = {"model": server.model, "prompt": prompt, "max_tokens": 16, "temperature": 0.0}
            response = client.post("/v1/completions", json=body)
            response.raise_for_status()
            outputs.append(str(response.json()["choices"][0]["text"]))
    return outputs


def fit_line(samples: list[dict[str, Any]], after: float) -> tuple[float, float] | None:
    """Least-squares (slope, intercept) of RSS (bytes) against requests finished, over the
    samples past ``after``; None with fewer than 3 such samples."""
    points = [(s["done"], s["rss"]) for s in samples if s["done"] >= after and s["rss"]]
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def summarize(
    run: dict[str, Any], final: dict[str, float], rss_end: int, args: argparse.Namespace
) -> dict[str, Any]:
    """One config's record: its run, its end state and its slope."""
    warmup = args.warmup_share * args.requests
    after = [s for s in run["samples"] if s["done"] >= warmup and s["rss"]]
    gauges_end = {g: final.get(f"vllm:bidkv_{g}") for g in IDLE_ZERO_GAUGES}
    connector = any(k.startswith("vllm:bidkv_") for k in final)
    fit = fit_line(run["samples"], warmup)
    idle = final.get("vllm:num_requests_running") == 0 and (
        not connector or all(v == 0 for v in gauges_end.values())
    )
    return {
        **{k: v for k, v in run.items() if k != "samples"},
        "accounted": sum(run["counts"].values()),
        "rss_after_warmup": after[0]["rss"] if after else None,
        "rss_end": rss_end,
        "rss_slope_bytes_per_request": None if fit is None else fit[0],
        "rss_fit_intercept": None if fit is None else fit[1],
        # Copies in flight at some sample: the tier's bookkeeping was exercised, not only idle.
        "in_flight_max": {
            g: max((s.get(g) or 0 for s in run["samples"]), default=0)
            for g in ("stores_in_flight", "loads_in_flight", "tier_pinned_entries")
        }
        if connector
        else {},
        "gauges_end": gauges_end if connector else {},
        "idle_at_end": idle,
        "counters_end": {
            k: v for k, v in final.items() if k.startswith("vllm:bidkv_") and k.endswith("_total")
        },
        "preemptions_end": final.get("vllm:num_preemptions_total"),
        "samples": run["samples"],
    }


def targets(record: dict[str, Any], stock: dict[str, Any], args: argparse.Namespace) -> dict[str, bool]:
    """The issue's soak targets for one config (the control's own: requests, accounting, slope)."""
    c = record["counts"]
    slope, stock_slope = record["rss_slope_bytes_per_request"], stock["rss_slope_bytes_per_request"]
    met = {
        ">= 10,000 requests": args.requests >= 10000,
        ">= 20% cancelled by the client": c["cancelled"] + c["cancel_finished_first"] + c["cancel_failed"]
        >= 0.2 * args.requests * 0.995,
        "0 failed that were not cancelled": c["failed"] == 0,
        "every request accounted for": record["accounted"] == args.requests,
        "RSS slope <= 1 KB/request or <= stock's": slope is not None
        and (slope <= SLOPE_TARGET_BYTES or (stock_slope is not None and slope <= stock_slope)),
        "idle at the end": record["idle_at_end"],
    }
    if record["config"] != "stock":
        met["probe outputs equal stock's"] = record["probes_equal_stock"]
        met["tier evictions > 0"] = record["counters_end"].get("vllm:bidkv_cpu_evictions_total", 0) > 0
        met["working set >= 3x the tier"] = record["working_set_ratio"] >= 3
    return met


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    warmup = result["warmup_share"] * result["requests"]
    for record in result["configs"]:
        s = record["samples"]
        line = ax1.plot([x["done"] for x in s], [x["rss"] / 2**20 for x in s], label=record["config"])[0]
        slope, intercept = record["rss_slope_bytes_per_request"], record["rss_fit_intercept"]
        if slope is not None:
            xs = [warmup, result["requests"]]
            ax1.plot(
                xs,
                [(intercept + slope * x) / 2**20 for x in xs],
                ls="--",
                color=line.get_color(),
                label=f"{record['config']} fit: {slope:+.0f} B/request",
            )
        if record["config"] != "stock":
            ax2.plot(
                [x["done"] for x in s],
                [x.get("tier_entries") or 0 for x in s],
                label=f"{record['config']} tier entries",
            )
    ax1.axvline(warmup, color="gray", lw=0.8)
    ax1.set_ylabel("server RSS, MiB")
    ax1.legend(loc="lower right", fontsize=7)
    ax1.set_title(f"soak: {result['requests']} requests per config, {result['resets']} prefix-cache resets")
    ax2.set_xlabel("requests finished (any outcome)")
    ax2.set_ylabel("CPU-tier entries")
    ax2.legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    """The "Soak" section of docs/RESULTS.md (also written next to the JSON)."""
    mib = 2**20
    configs = result["configs"]
    head = "| | " + " | ".join(f"`{r['config']}`" for r in configs) + " |"
    rows = [head, "|---" * (len(configs) + 1) + "|"]

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> None:
        rows.append(f"| {label} | " + " | ".join(cell(r) for r in configs) + " |")

    for outcome in OUTCOMES:
        row(outcome.replace("_", " "), lambda r, o=outcome: str(r["counts"][o]))
    row("accounted for", lambda r: f"{r['accounted']} of {result['requests']}")
    row(
        "prefix-cache resets (succeeded/asked)",
        lambda r: f"{r['resets']['succeeded']}/{r['resets']['asked']}",
    )
    row(
        "RSS after warm-up -> end, MiB",
        lambda r: f"{(r['rss_after_warmup'] or 0) / mib:.0f} -> {r['rss_end'] / mib:.0f}",
    )
    row(
        "**RSS slope after warm-up, bytes/request**",
        lambda r: (
            "-"
            if r["rss_slope_bytes_per_request"] is None
            else f"**{r['rss_slope_bytes_per_request']:+.0f}**"
        ),
    )
    row(
        "RSS slope over the second half, bytes/request",
        lambda r: _signed(fit_line(r["samples"], result["requests"] / 2)),
    )
    row("preemptions (vLLM)", lambda r: f"{r['preemptions_end'] or 0:.0f}")

    def counter(name: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: (
            "-" if r["config"] == "stock" else f"{r['counters_end'].get(f'vllm:bidkv_{name}_total', 0):.0f}"
        )

    for name in ("blocks_stored", "cpu_evictions", "cpu_hit_blocks", "blocks_loaded", "load_errors"):
        row(f"{name.replace('_', ' ')}", counter(name))
    row(
        "probe outputs equal stock's",
        lambda r: "control" if r["config"] == "stock" else _yes(r["probes_equal_stock"]),
    )
    row(
        "most stores / loads / pins in flight at a sample",
        lambda r: " / ".join(f"{v:.0f}" for v in r["in_flight_max"].values()) if r["in_flight_max"] else "-",
    )
    row("idle at the end", lambda r: _yes(r["idle_at_end"]))
    row("run, s", lambda r: f"{r['run_s']:.0f}")
    rows.append("")
    rows.append("| target | " + " | ".join(f"`{r['config']}`" for r in configs) + " |")
    rows.append("|---" * (len(configs) + 1) + "|")
    names = list(dict.fromkeys(t for r in configs for t in r["targets"]))
    for name in names:
        rows.append(
            f"| {name} | "
            + " | ".join(_yes(r["targets"][name]) if name in r["targets"] else "-" for r in configs)
            + " |"
        )
    lines = [
        f"## Soak: {', '.join(r['config'] for r in configs)}",
        "",
        f"`vllm-bidkv bench soak --requests {result['requests']} --configs {','.join(r['config'] for r in configs)}`: "
        f"one OpenAI server per config on the same box at the same time (tiny model, float32, "
        f"{result['gpu_blocks']} GPU blocks of {BLOCK_SIZE} tokens, {result['cpu_bytes']} CPU tier), the same "
        f"{result['requests']} streaming requests each ({result['concurrency']} in flight, {result['max_tokens']} "
        f"output tokens, {100 * result['cancel_share']:.0f}% hung up by the client mid-stream), "
        f"{result['resets']} prefix-cache resets during the run (running requests preempted, the tier emptied). "
        f"Prompts from a pool of {result['contexts']} whose distinct blocks ({result['working_set_blocks']}) "
        f"are {result['working_set_ratio']:.1f}x the tier's {result['tier_blocks']}. RSS is each server's "
        f"process tree (API server + engine core), fitted by least squares against requests finished "
        f"after the first {100 * result['warmup_share']:.0f}% (the targets' slope; the slope over the second "
        "half is shown beside it). "
        + (
            f"`bidkv-faults`: `VLLM_BIDKV_FAULTS={result['faults']}`. "
            if any(r["config"] == "bidkv-faults" for r in configs)
            else ""
        )
        + f"Probes: {result['probes']} prompts sent one at a time at the end, greedy. "
        f"Load average at the end {result['loadavg_end']}; {result['wall_s']:.0f} s in all. "
        f"JSON: `{result['out']}`; plot: `{result['plot']}`.",
        "",
        *rows,
    ]
    return "\n".join(lines) + "\n"


def _yes(ok: bool) -> str:
    return "yes" if ok else "**no**"


def _signed(fit: tuple[float, float] | None) -> str:
    return "-" if fit is None else f"{fit[0]:+.0f}"


async def _drive_all(
    servers: dict[str, Server], plan: list[tuple[str, int | None]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    return list(await asyncio.gather(*(drive(server, name, plan, args) for name, server in servers.items())))


def main(args: argparse.Namespace) -> int:
    import os

    if args.from_json:
        return write_outputs(json.loads(args.out.read_text()), args)

    from vllm_bidkv_bench.args import byte_size
    from vllm_bidkv_bench.tiny_model import tiny_model_dir

    configs = check_args(args)
    t0 = time.monotonic()
    model = str(tiny_model_dir())
    pool = prompt_pool(args.seed, args.contexts)
    plan = request_plan(args, pool)
    probes = pool[: args.probes // 2] + prompt_pool(args.seed + 1, args.probes - args.probes // 2)
    blocks = working_set_blocks(model, pool)
    tier_blocks = byte_size(args.cpu_bytes) // kv_block_bytes(model, BLOCK_SIZE)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="vllm-bidkv-soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        servers = {
            c.name: stack.enter_context(
                openai_server(
                    model,
                    c.kv_transfer_config,
                    log_dir / f"{c.name}.log",
                    gpu_blocks=args.gpu_blocks,
                    env={"VLLM_SERVER_DEV_MODE": "1", **c.env},
                )
            )
            for c in configs
        }
        print(
            f"soak: {len(servers)} servers up after {time.monotonic() - t0:.0f} s; logs in {log_dir}",
            flush=True,
        )
        runs = asyncio.run(_drive_all(servers, plan, args))
        for run in runs:
            server = servers[run["config"]]
            final = wait_idle(server.url)
            record = summarize(run, final, tree_rss(server.proc.pid), args)
            record["probe_outputs"] = probe(server, probes)
            records.append(record)
    stock = next(r for r in records if r["config"] == "stock")
    for record in records:
        record["probes_equal_stock"] = record["probe_outputs"] == stock["probe_outputs"]
        record["working_set_ratio"] = blocks / max(tier_blocks, 1)
    for record in records:
        record["targets"] = targets(record, stock, args)
    result: dict[str, Any] = {
        "requests": args.requests,
        "cancel_share": args.cancel_share,
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "gpu_blocks": args.gpu_blocks,
        "cpu_bytes": args.cpu_bytes,
        "tier_blocks": tier_blocks,
        "contexts": args.contexts,
        "working_set_blocks": blocks,
        "working_set_ratio": blocks / max(tier_blocks, 1),
        "resets": args.resets,
        "probes": args.probes,
        "warmup_share": args.warmup_share,
        "faults": args.faults,
        "seed": args.seed,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.monotonic() - t0, 1),
        "configs": records,
    }
    args.out.write_text(json.dumps(result, indent=1))
    return write_outputs(result, args)


def write_outputs(result: dict[str, Any], args: argparse.Namespace) -> int:
    """The plot and the section of ``result``, a summary line per config; exit status 1 if a
    target was missed."""
    result.update(out=str(args.out), plot=str(args.plot))
    plot(result, args.plot)
    args.out.with_suffix(".md").write_text(markdown(result))
    records = result["configs"]
    for record in records:
        summary = {
            k: record[k] for k in ("config", "counts", "resets", "rss_slope_bytes_per_request", "targets")
        }
        print(json.dumps(summary))
    return 0 if all(all(r["targets"].values()) for r in records) else 1

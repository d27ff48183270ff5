"""``vllm-bidkv bench ...`` and ``vllm-bidkv demo`` argument wiring."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vllm_bidkv.config import ADMISSIONS
from vllm_bidkv_bench.args import byte_size, positive_float, positive_float_list, positive_int

DEFAULT_PRESET = {"sim": "h100-llama3-8b", "engine": "cpu-tiny"}


def _quiet() -> None:
    """vLLM and the connector log their config at every Scheduler build: hundreds per matrix."""
    import logging
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # engine child processes
    for name in ("vllm", "vllm_bidkv"):  # this process, where vLLM may already be imported
        logging.getLogger(name).setLevel(logging.ERROR)


# The commands that run the simulator, whose records must come out the same on every run.
SIMULATING = (["bench", "sim"], ["bench", "report"], ["bench", "calibrate"])


def pin_hash_seed(argv: list[str]) -> None:
    """Run a simulating command again with ``PYTHONHASHSEED=0`` when it has another seed.

    vLLM's OffloadingConnector keeps block hashes (bytes, whose hash Python salts per process)
    in sets and acts on them in set order, so its simulated runs moved with the salt (prefill
    tokens by a few in 10^5, TTFT p50 by up to 1%); one salt makes every config's records
    repeatable. Called only where the process is the command itself (not from a test)."""
    import os
    import sys

    if argv[:2] not in SIMULATING or os.environ.get("PYTHONHASHSEED") == "0":
        return
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, "PYTHONHASHSEED": "0"})


def add_commands(sub: Any) -> None:
    bench = sub.add_parser("bench", help="benchmarks that write JSON")
    kinds = bench.add_subparsers(dest="bench", required=True)

    from vllm_bidkv_bench import copy as copy_bench

    copy = kinds.add_parser("copy", help="block-copy bandwidth per backend vs one contiguous copy")
    copy_bench.add_cli_args(copy)
    copy.set_defaults(func=copy_bench.main)

    from vllm_bidkv_bench import selection

    select = kinds.add_parser("select", help="victim-selection cost per preemption vs running requests")
    selection.add_cli_args(select)
    select.set_defaults(func=selection.main)

    select_e2e = kinds.add_parser(
        "select-e2e",
        help="victim-selection cost per preemption on vLLM's real Scheduler (candidates included)",
    )
    selection.add_scheduler_cli_args(select_e2e)
    select_e2e.set_defaults(func=selection.main_scheduler)

    from vllm_bidkv_bench import soak

    soak_parser = kinds.add_parser("soak", help="OpenAI server + connector under N requests, some hung up")
    soak.add_cli_args(soak_parser)
    soak_parser.set_defaults(func=lambda args: _soak(soak_parser, args))

    from vllm_bidkv_bench import restart

    restart_parser = kinds.add_parser(
        "restart", help="the disk tier: TTFT after an engine restart, cold vs warm; its cost; disk bandwidth"
    )
    restart.add_cli_args(restart_parser)
    restart_parser.set_defaults(func=restart.main)

    for kind, text in (
        ("sim", "vLLM's real Scheduler + BidKVConnector, timed by an H100 cost model"),
        ("engine", "the real vLLM engine (any model vLLM loads), one process per config, or --server"),
    ):
        parser = kinds.add_parser(kind, help=text)
        _matrix_args(parser, kind)
        parser.set_defaults(func=_run_matrix, kind=kind)

    calibrate = kinds.add_parser(
        "calibrate", help="fit the cost model's efficiency to bidkv's stock calibration"
    )
    calibrate.add_argument("--preset", default="h100-llama3-8b")
    calibrate.add_argument("--seeds", type=positive_int, default=3, help="workload seeds per point (median)")
    calibrate.add_argument("--json", metavar="FILE")
    calibrate.set_defaults(func=_calibrate)

    trace = kinds.add_parser("trace", help="write a generated workload as a JSONL trace")
    trace.add_argument("workload", help="mixed, multi-turn, long-context or bursty")
    trace.add_argument("--rate", type=positive_float, required=True, help="requests per second")
    trace.add_argument("--num-requests", type=positive_int, required=True)
    trace.add_argument("--seed", type=int, default=0)
    trace.add_argument("--length-scale", type=positive_float, default=1.0)
    trace.add_argument("--out", required=True, metavar="FILE")
    trace.set_defaults(func=_trace)

    report = kinds.add_parser("report", help="run every benchmark and write docs/RESULTS.md")
    report.add_argument("--out", default="docs", help="docs directory (RESULTS.md, PNGs, results/)")
    report.add_argument("--from-json", action="store_true", help="re-render from existing results/*.json")
    report.add_argument("--only", metavar="NAMES", help="rerun only these sections (comma-separated)")
    report.add_argument("--no-progress", action="store_true")
    report.set_defaults(func=_report)

    demo = sub.add_parser(
        "demo",
        help="stock vLLM, vLLM's own offloading and BidKV on the real engine: chat and multi-round QA",
    )
    demo.add_argument("--runs", type=positive_int, default=1, help="runs per config (3: its own spread)")
    demo.add_argument("--plot", default="vllm-bidkv-demo", metavar="DIR", help="where plots and JSON go")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=_demo)


def _matrix_args(parser: argparse.ArgumentParser, kind: str) -> None:
    parser.add_argument("--preset", help=f"benchmark preset (default {DEFAULT_PRESET[kind]})")
    parser.add_argument("--workload", metavar="FILE|NAME", help="a JSONL trace, or a generator name")
    parser.add_argument("--configs", help="comma-separated configs (unbounded is always added)")
    parser.add_argument("--rates", type=positive_float_list, help="comma-separated request rates (req/s)")
    parser.add_argument("--runs", type=positive_int, help="runs per (config, rate); medians are reported")
    parser.add_argument("--num-requests", type=positive_int)
    parser.add_argument(
        "--admission",
        choices=ADMISSIONS,
        default="fcfs",
        help="the same for every config (vLLM's peers run fcfs only; cache-aware ages by the connector's default admission_max_bypass)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="workload seed (sim: run r uses seed + r; engine: every run)"
    )
    parser.add_argument("--json", metavar="FILE", help='write {"results": [...]}')
    parser.add_argument("--csv", metavar="FILE")
    parser.add_argument("--markdown", metavar="FILE", help="write the table of medians")
    parser.add_argument("--plot", metavar="DIR", help="write TTFT CDF and p99-TTFT/throughput-vs-rate PNGs")
    parser.add_argument("--no-progress", action="store_true")
    if kind == "engine":
        _engine_args(parser)
    else:
        _sim_args(parser)


# The deployment's shape, for both runners: flag -> BenchPreset field, with vLLM's own flag names.
SHAPE_FLAGS = {
    "block_size": "block_size",
    "max_num_seqs": "max_num_seqs",
    "num_gpu_blocks_override": "num_gpu_blocks",
    "max_model_len": "max_model_len",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "cpu_bytes": "cpu_bytes",
}
# bench engine's flags beside the shape; bench sim's.
ENGINE_FLAGS = {
    **SHAPE_FLAGS,
    "model": "model",
    "dtype": "dtype",
    "gpu_memory_utilization": "gpu_memory_utilization",
    "tensor_parallel_size": "tensor_parallel_size",
    "enforce_eager": "enforce_eager",
}
SIM_FLAGS = {**SHAPE_FLAGS, "cost_model": "cost_model"}


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _shape_args(group: Any) -> None:
    group.add_argument("--block-size", type=_positive_int, help="tokens per KV block")
    group.add_argument("--max-num-seqs", type=_positive_int)
    group.add_argument(
        "--num-gpu-blocks-override", type=_positive_int, help="GPU KV blocks (small: preemption)"
    )
    group.add_argument("--max-model-len", type=_positive_int)
    group.add_argument("--max-num-batched-tokens", type=_positive_int)
    group.add_argument(
        "--cpu-bytes",
        type=byte_size,
        help="CPU tier size per worker (offload configs): bytes, or 512MiB, 1TiB",
    )


def _sim_args(parser: argparse.ArgumentParser) -> None:
    from vllm_bidkv_bench.costmodel import PRESETS as COST_MODELS

    group = parser.add_argument_group("the simulated deployment (default: the preset's)")
    _shape_args(group)
    group.add_argument("--cost-model", choices=sorted(COST_MODELS), help="what times each step")
    group.add_argument(
        "--async-scheduling",
        action="store_true",
        help="vLLM's async scheduling: step N+1 is scheduled before step N's output is processed",
    )
    group.add_argument(
        "--loads",
        type=positive_float_list,
        help="comma-separated fractions of the simulator's stock capacity (req/s of virtual time), "
        "measured first (default: the preset's, for calibrated presets); --rates sets absolute req/s",
    )


def _engine_args(parser: argparse.ArgumentParser) -> None:
    from vllm_bidkv_bench.tiny_model import BUILTIN_MODELS

    group = parser.add_argument_group("engine (default: the preset's)")
    group.add_argument(
        "--model",
        help=f"a model directory or a name vLLM loads, or one made here: {', '.join(BUILTIN_MODELS)}",
    )
    group.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"))
    _shape_args(group)
    group.add_argument("--gpu-memory-utilization", type=_fraction)
    group.add_argument("--tensor-parallel-size", type=_positive_int)
    group.add_argument(
        "--enforce-eager",
        action="store_true",
        default=None,
        help="no torch.compile (vLLM's flag): each engine starts in seconds instead of ~40 s on CPU",
    )
    group.add_argument(
        "--loads",
        type=positive_float_list,
        help="comma-separated fractions of stock's capacity on this machine, measured first "
        "(default: the preset's, for calibrated presets); --rates instead sets absolute req/s",
    )
    group.add_argument(
        "--server",
        metavar="URL,...|auto",
        help="drive running OpenAI servers (vllm serve), one URL per --configs entry in that order, "
        "with vLLM's benchmark client; 'auto': start one per config with the engine flags",
    )


def matrix_from_args(args: argparse.Namespace) -> Any:
    from dataclasses import replace

    from vllm_bidkv_bench.configs import parse_configs
    from vllm_bidkv_bench.presets import get_preset
    from vllm_bidkv_bench.runner import Matrix
    from vllm_bidkv_bench.workloads import WORKLOADS

    preset = get_preset(args.preset or DEFAULT_PRESET[args.kind])
    trace = None
    if args.workload in WORKLOADS:
        preset = replace(preset, workload=args.workload)
    elif args.workload is not None:
        if not Path(args.workload).is_file():
            raise SystemExit(
                f"--workload {args.workload!r}: no such file and not one of {', '.join(WORKLOADS)}"
            )
        trace = args.workload
    if args.num_requests is not None:
        preset = replace(preset, num_requests=args.num_requests)
    flags = ENGINE_FLAGS if args.kind == "engine" else SIM_FLAGS
    overrides = {
        field: getattr(args, flag) for flag, field in flags.items() if getattr(args, flag, None) is not None
    }
    preset = replace(preset, **overrides)
    rates = args.rates or list(preset.rates)
    # Calibrated: --loads, else the preset's loads unless --rates sets absolute ones.
    loads = tuple(getattr(args, "loads", None) or (() if args.rates else preset.loads))
    if trace is not None:
        if getattr(args, "loads", None):
            raise SystemExit("--loads: a trace file has its own arrival times; leave --loads out")
        loads = ()
    if not rates and not loads and trace is None:
        raise SystemExit(
            f"--rates: preset {preset.name} has neither rates nor loads; give --rates or --loads"
        )
    configs = parse_configs(args.configs or list(preset.configs), with_unbounded=preset.with_unbounded)
    servers = None
    if getattr(args, "server", None):
        servers = _servers(args.server, configs)
        configs = [c for c in configs if c.name in servers]
    return Matrix(
        kind=args.kind,
        preset=preset,
        configs=configs,
        rates=rates,
        runs=preset.runs if args.runs is None else args.runs,
        admission=args.admission,
        seed=args.seed,
        trace=trace,
        servers=servers,
        loads=loads,
        async_scheduling=getattr(args, "async_scheduling", False),
    )


def _servers(value: str, configs: list[Any]) -> dict[str, str | None]:
    """``--server``: config name -> URL (None: the runner starts it). With URLs, ``unbounded`` is
    dropped (it needs a server with more GPU blocks: start one and list it)."""
    if value == "auto":
        return {c.name: None for c in configs}
    urls = [u.strip() for u in value.split(",")]
    named = [c for c in configs if c.name != "unbounded"]
    if len(urls) == len(named) + 1:  # the user listed unbounded's server too
        named = configs
    if len(urls) != len(named) or not all(u.startswith(("http://", "https://")) for u in urls):
        raise SystemExit(
            f"--server: give 'auto' or one http(s) URL per config ({', '.join(c.name for c in named)}); "
            f"got {value!r}"
        )
    return {c.name: url for c, url in zip(named, urls, strict=True)}


def write_outputs(
    records: list[dict[str, Any]], args: argparse.Namespace, meta: dict[str, Any], prefix: str
) -> str:
    from vllm_bidkv_bench import report

    table = report.markdown_table(records)
    if args.json:
        report.write_json(records, args.json, meta)
    if getattr(args, "csv", None):
        report.write_csv(records, args.csv)
    if getattr(args, "markdown", None):
        Path(args.markdown).write_text(table + "\n")
    if args.plot:
        for path in report.plot(records, args.plot, prefix):
            print(f"wrote {path}")
    return table


def _run_matrix(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from vllm_bidkv_bench.report import machine_meta
    from vllm_bidkv_bench.runner import run_matrix

    _quiet()
    matrix = matrix_from_args(args)
    records = run_matrix(matrix, progress=not args.no_progress)
    meta = {
        **machine_meta(),
        "preset": asdict(matrix.preset),
        "admission": matrix.admission,
        "seed": matrix.seed,
    }
    meta["trace"] = matrix.trace
    print(write_outputs(records, args, meta, f"{args.kind}-{matrix.preset.name}"))
    return 1 if any("error" in r for r in records) else 0


# bench soak flags that soak.main does not check: a bad value otherwise reaches the server,
# which fails only after starting vLLM.
SOAK_FLAG_TYPES: dict[str, Callable[[str], Any]] = {"gpu_blocks": positive_int, "cpu_bytes": byte_size}


def _soak(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from vllm_bidkv_bench import soak

    for dest, check in SOAK_FLAG_TYPES.items():
        try:
            check(str(getattr(args, dest)))
        except argparse.ArgumentTypeError as err:
            parser.error(f"argument --{dest.replace('_', '-')}: {err}")
    return soak.main(args)


def _calibrate(args: argparse.Namespace) -> int:
    import json

    from vllm_bidkv_bench.calibrate import FITTED_RATE, FITTED_THROUGHPUT, fit
    from vllm_bidkv_bench.costmodel import PRESETS as COST_MODELS
    from vllm_bidkv_bench.presets import get_preset

    _quiet()
    preset = get_preset(args.preset)
    result = fit(COST_MODELS[preset.cost_model], preset, seeds=args.seeds)
    print(
        f"{'efficiency':>10} {'loss':>8}  req/s and p99 TTFT ms at {FITTED_RATE} req/s "
        f"(target {FITTED_THROUGHPUT} req/s)"
    )
    for g in result["grid"]:
        cells = "  ".join(f"{r['throughput_rps']:.2f} {r['ttft_p99_ms']:.0f}" for r in g["rows"])
        print(f"{g['efficiency']:>10.2f} {g['loss']:>8.4f}  {cells}")
    print(f"best efficiency: {result['best']['efficiency']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _trace(args: argparse.Namespace) -> int:
    from vllm_bidkv_bench.workloads import make_workload, write_jsonl

    workload = make_workload(args.workload, args.num_requests, args.rate, args.seed, args.length_scale)
    write_jsonl(workload, args.out)
    print(f"wrote {len(workload.requests)} requests to {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from vllm_bidkv_bench.resultsdoc import SECTIONS, build_results

    _quiet()
    rerun = (
        set() if args.from_json else set(args.only.split(",")) if args.only else {s.name for s in SECTIONS}
    )
    path = build_results(Path(args.out), rerun=rerun, progress=not args.no_progress)
    print(f"wrote {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from vllm_bidkv_bench.demo import main

    _quiet()
    return main(args)

"""The ``vllm-bidkv`` command: doctor, top, demo, bench, config."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any


def doctor_report() -> dict[str, Any]:
    """What this vLLM supports, which patches are applied, and a verdict."""
    import os

    from vllm_bidkv.config import BidKVConfig

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep --json stdout clean
    report: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        config = BidKVConfig.from_sources()
        report["config"] = {"enabled": config.enabled, "kill_switch": config.kill_switch}
    except ValueError as err:
        report["config_error"] = str(err)
        config = None
    try:
        import vllm  # noqa: F401
    except ImportError as err:
        report.update(
            vllm_version=None,
            capabilities={},
            patches=[],
            supported=False,
            verdict=f"vLLM not importable: {err}",
        )
        return report
    from vllm_bidkv import patches

    caps = patches.probe()
    if config is not None and config.enabled and caps.supported:
        patches.apply(config)
    report.update(
        vllm_version=caps.vllm_version,
        vllm_platform=_vllm_platform(),
        capabilities=caps.as_dict(),
        patches=patches.applied(),
        supported=caps.supported,
        tested=caps.tested,
        ci=caps.ci if caps.supported else {"status": "unsupported", "missing": caps.missing()},
        missing=caps.missing(),
        verdict=caps.verdict(),
    )
    return report


def _vllm_platform() -> str:
    try:
        from vllm.platforms import current_platform

        return str(current_platform.device_type or "unspecified")
    except Exception as err:  # noqa: BLE001 - doctor reports, never crashes
        return f"unknown ({err})"


def _doctor(args: argparse.Namespace) -> int:
    report = doctor_report()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(f"vLLM {report.get('vllm_version')} on {report.get('vllm_platform', '?')}: {report['verdict']}")
        for name, value in report.get("capabilities", {}).items():
            print(f"  {name:34s} {value}")
        print(f"  patches applied: {', '.join(report['patches']) or 'none'}")
        if "config_error" in report:
            print(f"  config: {report['config_error']}")
    return 0 if report["supported"] and "config_error" not in report else 1


def _config(args: argparse.Namespace) -> int:
    from vllm_bidkv.config import BidKVConfig, markdown_table

    if args.markdown:
        print(markdown_table())
    else:
        print(json.dumps(BidKVConfig.from_sources().__dict__, indent=2))
    return 0


def _top(args: argparse.Namespace) -> int:
    from vllm_bidkv.top import run_top

    return run_top(args.url, once=args.once, interval=args.interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vllm-bidkv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    doctor = sub.add_parser("doctor", help="what this vLLM supports and which patches are applied")
    doctor.add_argument("--json", action="store_true")
    doctor.set_defaults(func=_doctor)

    config = sub.add_parser("config", help="the effective config, or the README's config table")
    config.add_argument("--markdown", action="store_true")
    config.set_defaults(func=_config)

    top = sub.add_parser("top", help="live view of vLLM servers' /metrics: CPU tier, hits, transfers")
    top.add_argument("--url", action="append", required=True, help="http://HOST:PORT (repeat for more)")
    top.add_argument("--once", action="store_true", help="print one plain-text table and exit")
    top.add_argument("--interval", type=float, default=2.0, help="seconds between samples (default 2)")
    top.set_defaults(func=_top)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("bench", "demo"):  # heavy imports only when asked for
        from vllm_bidkv.bench import cli as bench_cli

        bench_cli.add_commands(sub)
    else:
        sub.add_parser("bench", help="benchmarks that write JSON (copy, select, sim, engine)")
        sub.add_parser("demo", help="stock vLLM vs BidKV on the real engine: table and plots")

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:
        # Bad input (a config value, a bench option, a workload file) raises ValueError with a
        # message naming it; say that, not a traceback. Exit 2, like argparse's usage errors.
        message = str(err)
        if not message.startswith("vllm-bidkv"):
            message = f"vllm-bidkv {args.command}: error: {message}"
        print(message, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``vllm-bidkv`` command: doctor, top, demo, bench, config."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from collections.abc import Mapping
from typing import Any, NoReturn

# Shown apart from the capability rows: how the probe read vLLM, not what vLLM offers.
_PROBE_NOTES = ("from_compiled_code", "unknown")


def ignored_env(environ: Mapping[str, str]) -> list[str]:
    """The ``BIDKV_*`` variables the config ignores: names it does not know (the config only
    warns about them, since the bidkv package on PyPI uses the same prefix)."""
    from vllm_bidkv.config import BidKVConfig

    keys = {field.name for field in dataclasses.fields(BidKVConfig)}
    return sorted(
        name
        for name in environ
        if name.startswith("BIDKV_") and name != "BIDKV_DISABLE" and name[len("BIDKV_") :].lower() not in keys
    )


def fault_hook_state(environ: Mapping[str, str]) -> str:
    """The fault-injection test hook: "off", "ON (<plans>)", or "refused: <why>" (the connector's
    workers refuse to start then)."""
    if not any(name.startswith("VLLM_BIDKV_") for name in environ):
        # Both of the hook's variables carry this prefix: without one, skip importing the
        # connector package (torch and vLLM: seconds).
        return "off"
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep JSON on stdout clean
    try:
        from vllm_bidkv.connectors.faults import FAULTS_ENV, TEST_HOOKS_ENV, read_faults_env
    except ImportError as err:
        return f"unknown: the connector does not import ({err})"
    if not environ.get(FAULTS_ENV):
        return "off"
    if environ.get(TEST_HOOKS_ENV) != "1":
        return f"refused: {FAULTS_ENV} is set without the opt-in {TEST_HOOKS_ENV}=1"
    try:
        read_faults_env(environ)
    except ValueError as err:
        return f"refused: {err}"
    return f"ON ({FAULTS_ENV}={environ[FAULTS_ENV]})"


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line (argparse prints the whole usage first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def doctor_report() -> dict[str, Any]:
    """What this vLLM supports, which patches are applied, and a verdict."""
    from vllm_bidkv.config import BidKVConfig

    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # keep --json stdout clean
    report: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "ignored_env": ignored_env(os.environ),
        "fault_hook": fault_hook_state(os.environ),
    }
    try:
        config = BidKVConfig.from_sources()
        report["config"] = {"enabled": config.enabled, "kill_switch": config.kill_switch}
    except ValueError as err:
        report["config_error"] = str(err)
        config = None
    try:
        import vllm
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

    try:
        caps = patches.probe()
    except Exception as err:  # noqa: BLE001 - doctor reports, never crashes
        report.update(
            vllm_version=getattr(vllm, "__version__", None),
            capabilities={},
            patches=[],
            supported=False,
            verdict=f"unsupported: probing vLLM failed: {type(err).__name__}: {err}",
        )
        return report
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
        capabilities = report.get("capabilities", {})
        for name, value in capabilities.items():
            if name not in _PROBE_NOTES:
                print(f"  {name:34s} {'unknown' if name in capabilities['unknown'] else value}")
        if capabilities.get("from_compiled_code"):
            print(
                "  vLLM's source is not installed; read from its compiled code instead: "
                + ", ".join(capabilities["from_compiled_code"])
            )
        if capabilities.get("unknown"):
            print(f"  could not probe (taken as absent): {', '.join(capabilities['unknown'])}")
        print(f"  patches applied: {', '.join(report['patches']) or 'none'}")
        print(f"  ignored BIDKV_* variables (unknown names): {', '.join(report['ignored_env']) or 'none'}")
        print(f"  fault-injection test hook: {report['fault_hook']}")
        if "config_error" in report:
            print(f"  config: {report['config_error']}")
    healthy = "config_error" not in report and not report["fault_hook"].startswith("refused")
    return 0 if report["supported"] and healthy else 1


def _config(args: argparse.Namespace) -> int:
    from vllm_bidkv.config import BidKVConfig, markdown_table

    if args.markdown:
        print(markdown_table())
        return 0
    print(json.dumps(BidKVConfig.from_sources().__dict__, indent=2))
    # Beside the config, on stderr: stdout stays the config's JSON.
    ignored = ignored_env(os.environ)
    if ignored:
        print(f"ignored BIDKV_* variables (unknown names): {', '.join(ignored)}", file=sys.stderr)
    hook = fault_hook_state(os.environ)
    print(f"fault-injection test hook: {hook}", file=sys.stderr)
    return 1 if hook.startswith("refused") else 0


def _top(args: argparse.Namespace) -> int:
    from vllm_bidkv.top import run_top

    return run_top(args.url, once=args.once, interval=args.interval)


# The benchmarks are a distribution of their own (bench/), which a serving host does not need.
BENCH_MISSING = (
    "vllm-bidkv {command}: the benchmarks are not installed; pip install 'vllm-bidkv[bench]' "
    "(in a checkout: pip install -e ./bench)"
)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="vllm-bidkv", description=__doc__)
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

    command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("bench", "demo"):  # heavy imports only when asked for
        try:
            from vllm_bidkv_bench import cli as bench_cli
        except ModuleNotFoundError as err:
            if err.name != "vllm_bidkv_bench":
                raise
            print(BENCH_MISSING.format(command=argv[0]), file=sys.stderr)
            return 2
        if command_line:
            bench_cli.pin_hash_seed(argv)
        bench_cli.add_commands(sub)
    else:
        sub.add_parser("bench", help="benchmarks that write JSON (copy, select, sim, engine)")
        sub.add_parser("demo", help="stock vLLM, vLLM's own offloading and BidKV on the real engine: who won")

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130  # Ctrl-C: the shell's status for SIGINT, without a traceback
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

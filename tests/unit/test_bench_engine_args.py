"""``bench engine`` arguments, configs and the step-cost fit: the parts that need no engine."""

from __future__ import annotations

import argparse
import http.server
import threading
from pathlib import Path

import pytest
from vllm_bidkv_bench.cli import _matrix_args, _servers, matrix_from_args, pin_hash_seed
from vllm_bidkv_bench.configs import CONFIGS, parse_configs
from vllm_bidkv_bench.demo import winners
from vllm_bidkv_bench.engine import fit_line
from vllm_bidkv_bench.runner import calibration
from vllm_bidkv_bench.workloads import make_workload

pytestmark = pytest.mark.unit


def parse(*argv: str, kind: str = "engine") -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _matrix_args(parser, kind)
    args = parser.parse_args(argv)
    args.kind = kind
    return args


def test_engine_flags_override_the_preset() -> None:
    args = parse(
        "--preset", "cpu-tiny", "--model", "/models/mine", "--dtype", "bfloat16", "--block-size", "16",
        "--max-num-seqs", "4", "--num-gpu-blocks-override", "99", "--max-model-len", "512",
        "--gpu-memory-utilization", "0.5", "--tensor-parallel-size", "2", "--configs", "stock,bidkv+offload",
    )  # fmt: skip
    matrix = matrix_from_args(args)
    p = matrix.preset
    assert (p.model, p.dtype, p.block_size, p.max_num_seqs) == ("/models/mine", "bfloat16", 16, 4)
    assert (p.num_gpu_blocks, p.max_model_len, p.gpu_memory_utilization, p.tensor_parallel_size) == (
        99,
        512,
        0.5,
        2,
    )
    assert [c.name for c in matrix.configs] == ["stock", "bidkv+offload", "unbounded"]
    assert matrix.servers is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--block-size", "0"), "--block-size: must be an integer >= 1, got '0'"),
        (("--max-num-seqs", "x"), "--max-num-seqs: must be an integer >= 1, got 'x'"),
        (("--gpu-memory-utilization", "1.5"), "--gpu-memory-utilization: must be a number in (0, 1]"),
        (("--dtype", "fp8"), "--dtype: invalid choice: 'fp8'"),
    ],
)
def test_bad_engine_flags_name_the_flag(
    argv: tuple[str, ...], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)
    assert message in capsys.readouterr().err


def test_server_urls_pair_with_configs_in_order() -> None:
    configs = parse_configs("stock,bidkv+offload")
    assert _servers("http://a:1,http://b:2", configs) == {
        "stock": "http://a:1",
        "bidkv+offload": "http://b:2",
    }
    with_unbounded = _servers("http://a:1,http://b:2,http://c:3", configs)
    assert with_unbounded["unbounded"] == "http://c:3"
    assert _servers("auto", configs) == {"stock": None, "bidkv+offload": None, "unbounded": None}
    for bad in ("http://a:1", "a:1,b:2"):
        with pytest.raises(SystemExit, match="one http\\(s\\) URL per config \\(stock, bidkv\\+offload\\)"):
            _servers(bad, configs)
    matrix = matrix_from_args(parse("--configs", "stock,bidkv+offload", "--server", "http://a:1,http://b:2"))
    assert [c.name for c in matrix.configs] == ["stock", "bidkv+offload"]


def test_kill_switch_config_loads_the_connector_inert() -> None:
    extra = CONFIGS["kill-switch"].connector_extra("fcfs", 2**20)
    assert extra == {
        "victim_policy": "vllm-default",
        "offload_mode": "off",
        "admission": "fcfs",
        "kill_switch": True,
    }
    assert CONFIGS["stock"].connector_extra("fcfs", 2**20) is None
    assert [c.name for c in parse_configs("stock,kill-switch", with_unbounded=False)] == [
        "stock",
        "kill-switch",
    ]


def test_fit_line_recovers_fixed_and_per_token_cost() -> None:
    a, b = fit_line([(tokens, 0.003 + 0.0002 * tokens) for tokens in (1, 16, 200, 512, 2048)])
    assert a == pytest.approx(0.003) and b == pytest.approx(0.0002)
    assert fit_line([]) == (0.0, 0.0)
    assert fit_line([(8, 1.0), (8, 3.0)]) == (2.0, 0.0)  # one x: no slope to fit


def test_think_scale_shortens_think_times_only() -> None:
    base = make_workload("chat", 40, 4.0, 0, 0.3, 900)
    fast = make_workload("chat", 40, 4.0, 0, 0.3, 900, think_scale=0.1)
    assert [p.think_s for p in fast.sessions.plans] == [  # type: ignore[union-attr]
        tuple(t * 0.1 for t in p.think_s)
        for p in base.sessions.plans  # type: ignore[union-attr]
    ]
    assert [p.first_prompt for p in fast.sessions.plans] == [p.first_prompt for p in base.sessions.plans]  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="think_scale > 0"):
        make_workload("chat", 40, 4.0, 0, think_scale=0)


def test_closed_loop_request_ids_name_session_and_turn() -> None:
    workload = make_workload("chat", 12, 4.0, 0, 0.3, 900).replay()
    first = workload.request_id(0)
    assert first.startswith("chat-") and first.endswith(".0")
    session = workload.turns[0][0]
    index = workload.on_finish(0, [5, 6], [7], 1.0)
    assert index is not None and workload.request_id(index) == f"chat-{session}.1"


# Stands in for vLLM's OpenAI server under `python -m vllm.entrypoints.openai.api_server`: binds
# --host/--port as vLLM does (SO_REUSEADDR; a port another process listens on fails with
# EADDRINUSE) and answers every GET with its pid.
FAKE_API_SERVER = """
import argparse, http.server, os
parser = argparse.ArgumentParser()
parser.add_argument("--host")
parser.add_argument("--port", type=int)
args, _ = parser.parse_known_args()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = str(os.getpid()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


http.server.HTTPServer((args.host, args.port), Handler).serve_forever()
"""


def test_openai_server_survives_losing_its_port_to_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """free_port's port is free only when asked: here another process (a server answering
    /health like vLLM) takes it first. The launcher must not take that server for its own,
    and must start its server on a fresh port."""
    from vllm_bidkv_bench import server as launcher

    fake = tmp_path / "fake" / "vllm" / "entrypoints" / "openai"
    fake.mkdir(parents=True)
    for package in (fake, fake.parent, fake.parent.parent):
        (package / "__init__.py").write_text("")
    (fake / "api_server.py").write_text(FAKE_API_SERVER)

    class Thief(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"thief")

        def log_message(self, *args: object) -> None:
            pass

    thief = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Thief)
    threading.Thread(target=thief.serve_forever, daemon=True).start()
    taken = thief.server_address[1]
    ports = iter([taken])
    real_free_port = launcher.free_port
    monkeypatch.setattr(launcher, "free_port", lambda: next(ports, None) or real_free_port())
    try:
        with launcher.openai_server(
            "m", None, tmp_path / "server.log", start_timeout_s=60, env={"PYTHONPATH": str(tmp_path / "fake")}
        ) as running:
            assert running.port != taken
            assert launcher.get(f"{running.url}/health") == str(running.proc.pid)
        assert running.proc.poll() is not None  # stopped on leaving
    finally:
        thief.shutdown()
        thief.server_close()


def test_sim_takes_the_shape_flags_and_the_cost_model(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(
        "--num-gpu-blocks-override", "28000", "--block-size", "16", "--max-num-seqs", "256",
        "--max-num-batched-tokens", "8192", "--max-model-len", "131072", "--cpu-bytes", "1TiB",
        "--cost-model", "h100-llama3-8b", kind="sim",
    )  # fmt: skip
    p = matrix_from_args(args).preset
    assert (p.num_gpu_blocks, p.block_size, p.max_num_seqs, p.max_num_batched_tokens) == (
        28000,
        16,
        256,
        8192,
    )
    assert (p.max_model_len, p.cpu_bytes, p.cost_model) == (131072, 2**40, "h100-llama3-8b")
    with pytest.raises(SystemExit):
        parse("--cost-model", "a100-mistral", kind="sim")
    assert "--cost-model: invalid choice: 'a100-mistral'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--model", "/models/mine", kind="sim")  # the engine's own flags are not the simulator's


def test_calibrated_presets_take_loads_and_rates_turn_calibration_off() -> None:
    """A calibrated preset runs at fractions of stock's capacity; --rates sets absolute req/s instead."""
    matrix = matrix_from_args(parse("--preset", "cpu-llama-chat"))
    assert matrix.loads == (0.8,) and matrix.rates == []
    assert matrix_from_args(parse("--preset", "cpu-llama-chat", "--loads", "0.5,0.95")).loads == (0.5, 0.95)
    absolute = matrix_from_args(parse("--preset", "cpu-llama-chat", "--rates", "3"))
    assert absolute.loads == () and absolute.rates == [3.0]
    assert matrix_from_args(parse("--preset", "cpu-llama-bursty")).loads == ()  # a burst: not calibrated


def test_bench_sim_takes_loads_and_rates_turn_calibration_off(tmp_path: Path) -> None:
    """The simulator calibrates like the engine: the preset's loads or --loads; --rates is absolute."""
    tournament = ("--preset", "h100-llama3-8b-chat-cpu1x")
    assert matrix_from_args(parse(*tournament, kind="sim")).loads == (0.5, 0.8, 0.95)
    matrix = matrix_from_args(parse("--preset", "h100-llama3-8b", "--loads", "0.5,0.9", kind="sim"))
    assert matrix.loads == (0.5, 0.9)
    absolute = matrix_from_args(parse(*tournament, "--rates", "3", kind="sim"))
    assert absolute.loads == () and absolute.rates == [3.0]
    assert matrix_from_args(parse("--preset", "h100-llama3-8b", kind="sim")).loads == ()  # bidkv's rates
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 0, "prompt_len": 8, "output_len": 4}\n')
    with pytest.raises(SystemExit, match="--loads: a trace file has its own arrival times"):
        matrix_from_args(parse("--workload", str(trace), "--loads", "0.5", kind="sim"))
    assert matrix_from_args(parse(*tournament, "--workload", str(trace), kind="sim")).loads == ()


def test_calibration_scales_rates_and_think_times_by_the_capacity() -> None:
    """Twice the capacity: twice the rate, half the think time, so as many sessions are live."""
    slow, fast = calibration(2.0, (0.5, 0.8), 0.5, 1.0), calibration(4.0, (0.5, 0.8), 0.5, 1.0)
    assert slow["rates"] == [1.0, 1.6] and fast["rates"] == [2.0, 3.2]
    assert slow["think_scale"] == 2 * fast["think_scale"] == 0.25
    live = [c["rates"][1] * c["think_scale"] for c in (slow, fast)]
    assert live[0] == pytest.approx(live[1])
    with pytest.raises(RuntimeError, match="stock served nothing"):
        calibration(0.0, (0.8,), 0.5, 1.0)


def test_demo_says_who_won_and_whether_it_is_outside_the_spread() -> None:
    def rec(config: str, run: int, ttft: float, tput: float) -> dict[str, object]:
        return {
            "config": config,
            "run": run,
            "rate": 1.0,
            "ttft_p50_ms": ttft,
            "throughput_rps": tput,
            "completed": 96,
        }

    one_run = [
        rec("stock", 0, 3000, 2.0),
        rec("vllm-offloading", 0, 1500, 2.4),
        rec("bidkv+offload", 0, 1000, 2.5),
    ]
    committed = [rec("stock", r, 3000 + r, 2.0) for r in range(3)]
    committed += [rec("vllm-offloading", r, 1400 + 100 * r, 2.4 + 0.1 * r) for r in range(3)]
    committed += [rec("bidkv+offload", r, 1000 + 450 * r, 2.45) for r in range(3)]
    # One run has no spread: the table says so, and beside it what the committed runs found for
    # the same pair, never a verdict on this run from other runs' ranges.
    table = winners([("cpu-llama-chat", one_run)], lambda preset: committed)
    stock, peer = (line for line in table.splitlines() if line.startswith("| cpu-llama-chat"))
    assert "| stock | 3.00× lower (ours won) | 1.25× higher (ours won) | no spread: one run" in stock
    assert "RESULTS.md (3 runs of 96 requests): TTFT 2.07× lower (ours won), ranges apart: yes" in stock
    # Committed: ours 1000-1900 against the peer's 1400-1600, medians 1450 and 1500.
    assert "| 1.50× lower (ours won) | 1.04× higher (ours won) | no spread: one run" in peer
    assert "TTFT 1.03× lower (ours won), ranges apart: no (ranges overlap)" in peer
    alone = winners([("cpu-llama-chat", one_run)], lambda preset: None)
    assert "no spread: one run (`--runs 3` measures it) |" in alone
    # Three runs of its own: the verdict is on the demo's ranges, the committed runs unread.
    three = [
        dict(
            r,
            run=k,
            ttft_p50_ms=r["ttft_p50_ms"] * (1 + 0.01 * k),
            throughput_rps=r["throughput_rps"] * (1 - 0.05 * k),
        )
        for r in one_run
        for k in range(3)
    ]
    table = winners([("cpu-llama-chat", three)], lambda preset: committed)
    assert "TTFT yes, throughput no (ranges overlap) (this demo's 3 runs)" in table
    assert "RESULTS.md" not in table


def test_simulating_commands_run_again_under_one_hash_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's OffloadingConnector acts on sets of block hashes in set order: a simulating command
    started with another (or a random) seed runs itself again with PYTHONHASHSEED=0, the same
    command line. os.execve is replaced (a stand-in: the real one would replace pytest)."""
    import os
    import sys

    execs: list[tuple[str, list[str], dict[str, str]]] = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: execs.append((path, args, env)))
    monkeypatch.setattr(
        sys, "orig_argv", [sys.executable, "/venv/bin/vllm-bidkv", "bench", "sim", "--runs", "3"]
    )
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    pin_hash_seed(["bench", "sim", "--runs", "3"])
    assert execs == [
        (
            sys.executable,
            [sys.executable, "/venv/bin/vllm-bidkv", "bench", "sim", "--runs", "3"],
            {**os.environ, "PYTHONHASHSEED": "0"},
        )
    ]
    monkeypatch.setenv("PYTHONHASHSEED", "7")
    pin_hash_seed(["bench", "report"])
    assert len(execs) == 2 and execs[1][2]["PYTHONHASHSEED"] == "0"
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    pin_hash_seed(["bench", "sim"])
    monkeypatch.delenv("PYTHONHASHSEED")
    for other in (["bench", "engine"], ["demo"], ["bench", "copy"]):
        pin_hash_seed(other)
    assert len(execs) == 2, "already pinned, or a command that does not simulate: runs as it is"

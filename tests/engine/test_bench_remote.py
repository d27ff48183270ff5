"""``bench engine --server``: a running OpenAI server driven by vLLM's own benchmark client.

One server (tiny model, bidkv+offload, the ``cpu-tiny`` engine knobs: 36 blocks of 32
tokens, so a burst of 12 requests preempts) is started as a user would start it, and
``run_config_on_server`` drives it by URL: a static burst (every request gets exactly its
output length; preemptions, CPU-tier loads; outputs equal to those of vLLM's own
OffloadingConnector on a server the runner starts — greedy float32 outputs are the same
under every config) and a closed-loop chat of
two sessions (each turn's prompt is the previous prompt + the answer the server gave).
"""

from __future__ import annotations

import http.server
import json
import random
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace

import pytest
from vllm_bidkv_bench.configs import CONFIGS
from vllm_bidkv_bench.metrics import StepCounters
from vllm_bidkv_bench.presets import get_preset
from vllm_bidkv_bench.remote import _reset_cache, _token_ids, run_config_on_server, server_options
from vllm_bidkv_bench.server import openai_server
from vllm_bidkv_bench.workloads import ChatSessions, SessionPlan, TraceRequest, Workload

pytestmark = pytest.mark.engine

PRESET = replace(get_preset("cpu-tiny"), num_requests=12, enforce_eager=True)
CONFIG = CONFIGS["bidkv+offload"]


def burst() -> Workload:
    rng = random.Random(1)
    requests = []
    for i in range(12):
        prefix = 64 + 32 * (i % 2)
        prompt = rng.randint(100, 250)
        requests.append(TraceRequest(0.0, prompt, rng.randint(40, 80), f"sys{i % 2}", prefix))
    return Workload("burst", 0, requests)


def chat() -> Workload:
    rng = random.Random(2)

    def ids(n: int) -> tuple[int, ...]:
        return tuple(rng.randrange(3, 512) for _ in range(n))

    plans = [SessionPlan(0.05 * s, ids(80), (ids(24), ids(16)), (24, 20, 16), (0.05, 0.05)) for s in range(2)]
    return Workload("chat", 0, [], sessions=ChatSessions(plans)).replay()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("remote") / "server.log"
    # The user's server: the config's kv-transfer-config and the preset's knobs, in dev mode.
    with openai_server(log=log, **server_options(PRESET, CONFIG, "fcfs")) as running:
        yield running.url


def test_token_ids_from_a_stream() -> None:
    chunks = [{"choices": [{"text": "a", "token_ids": [5, 6]}]}, {"choices": [{"token_ids": [7]}]}]
    stream = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + 'data: {"usage": {}}\n\ndata: [DONE]\n\n'
    assert _token_ids(stream.encode()) == [5, 6, 7]


def test_reset_without_dev_mode_is_reported_not_fatal() -> None:
    """A user's server without ``VLLM_SERVER_DEV_MODE`` has no ``/reset_prefix_cache``: False."""

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.send_error(404)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        assert _reset_cache(f"http://127.0.0.1:{httpd.server_port}", timeout=5) is False
    finally:
        httpd.shutdown()


def test_static_burst_against_server(server: str) -> None:
    workload = burst()
    started = time.monotonic()
    remote = run_config_on_server(workload, CONFIG, PRESET, admission="fcfs", url=server)
    print(f"server: warm-up {remote['warmup_s']:.1f} s, run {remote['run_s']:.1f} s, "
          f"{time.monotonic() - started:.1f} s in all; counters {remote['counters']}")  # fmt: skip
    assert remote["server"] == server and remote["cache_reset"] is True
    expected = [r.output_len for r in workload.requests]
    assert [t["num_output_tokens"] for t in remote["timings"]] == expected
    assert [t["expected_output_tokens"] for t in remote["timings"]] == expected
    for t in remote["timings"]:
        assert 0 <= t["arrival_s"] <= t["first_token_s"] <= t["finish_s"]
    outputs = remote["outputs"]
    assert sorted(outputs) == sorted(workload.request_id(i) for i in range(len(expected)))
    assert all(isinstance(tok, int) for ids in outputs.values() for tok in ids)

    counters = StepCounters(**remote["counters"])
    assert counters.preemptions > 0 and counters.loaded_blocks > 0 and counters.stored_blocks > 0
    assert remote["metrics"]["vllm:num_preemptions"] == counters.preemptions
    assert remote["block_bytes"] > 0

    # vLLM's own OffloadingConnector on a server the runner starts (--server auto), its worker
    # copying with our CPU copy handler on this platform: its /metrics counters say it stored
    # and loaded, and its outputs are ours (greedy float32 outputs equal stock's under every config).
    started = time.monotonic()
    peer = run_config_on_server(workload, CONFIGS["vllm-offloading"], PRESET, admission="fcfs", url=None)
    print(f"vllm-offloading server: {time.monotonic() - started:.1f} s; {peer['peer_counters']}")
    assert "CPU copy handler of ours" in peer["label"] and peer["counters"]["preemptions"] > 0
    own = peer["peer_counters"]
    assert own["vllm:kv_offload_store_bytes"] > 0 and own["vllm:kv_offload_load_bytes"] > 0
    assert peer["outputs"] == outputs


def test_server_of_another_config_is_refused(server: str) -> None:
    one = Workload("one", 0, [TraceRequest(0.0, 40, 4)])
    with pytest.raises(RuntimeError, match="runs stock vLLM, but the server runs BidKVConnector"):
        run_config_on_server(one, CONFIGS["stock"], PRESET, admission="fcfs", url=server + "/")


def completion(url: str, model: str, prompt: list[int], max_tokens: int) -> list[int]:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return list(json.loads(response.read())["choices"][0]["token_ids"])


def test_closed_loop_chat_against_server(server: str) -> None:
    workload = chat()
    remote = run_config_on_server(workload, CONFIG, PRESET, admission="fcfs", url=server)
    plans = workload.sessions.plans  # type: ignore[union-attr]
    ids = [f"chat-{s}.{k}" for s in range(len(plans)) for k in range(3)]
    assert (
        sorted(remote["outputs"]) == sorted(remote["prompts"]) == sorted(remote["request_ids"]) == sorted(ids)
    )
    timings = dict(zip(remote["request_ids"], remote["timings"], strict=True))
    for s, plan in enumerate(plans):
        prompt = list(plan.first_prompt)
        for k in range(3):
            rid = f"chat-{s}.{k}"
            output = remote["outputs"][rid]
            assert remote["prompts"][rid] == prompt  # turn k+1 = turn k's prompt + its answer + a message
            assert len(output) == timings[rid]["num_output_tokens"] == plan.output_lens[k]
            if k < 2:
                prompt = [*prompt, *output, *plan.messages[k]]
                # Sent once the answer was in, after the think time.
                assert timings[f"chat-{s}.{k + 1}"]["arrival_s"] >= timings[rid]["finish_s"] + 0.04
        # The server answered that last prompt: a plain greedy completion of it gives the same.
        assert completion(server, remote["model"], prompt, plan.output_lens[2]) == output

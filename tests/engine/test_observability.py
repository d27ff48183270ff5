"""The tier's gauges, clients that hang up, ``vllm-bidkv top`` and the tier's KV events: one
OpenAI server for all.

The server runs the tiny model (float32) with BidKVConnector (lazy offload, a 4 MiB tier of
64 blocks, less than the run stores) under KV pressure (36 blocks of 32 tokens, 16
sequences), with vLLM's KV events published over ZMQ on loopback. Three waves of streaming
requests, most dropped by the client mid-stream while requests are preempted, rescued,
stored, evicted and loaded; afterwards the server must be idle in every respect (vLLM's KV
usage and running requests, every ``vllm:bidkv_*`` gauge, no per-request record left),
deterministic prompts must return the completions they returned before the waves, and a
subscriber that saw every event batch must know exactly what the CPU tier holds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from vllm_bidkv_bench.server import connector_config, free_port, get, openai_server, wait_idle

from tests.support.kv_events import Announced
from vllm_bidkv.counters import GAUGES, IDLE_ZERO_GAUGES
from vllm_bidkv.top import parse_metrics

pytestmark = pytest.mark.engine
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WAVES, PER_WAVE, DROPPED_PER_WAVE, WAVE_TOKENS = 3, 16, 12, 96


class EventSubscriber:
    """A router's view: vLLM's KV event batches on a ZMQ SUB socket (pyzmq, msgspec), read in a
    thread; ``seqs`` numbers every batch the publisher sent. It binds the loopback endpoint
    before the server starts (vLLM's publisher connects to an endpoint without a wildcard),
    so no batch goes out before it listens."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.seqs: list[int] = []
        self.batches: list[Any] = []
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.bind(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        import msgspec
        from vllm.distributed.kv_events import KVEventBatch

        decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        while not self._stop.is_set():
            if self._socket.poll(100):
                _topic, seq, payload = self._socket.recv_multipart()
                self.seqs.append(int.from_bytes(seq, "big"))
                self.batches.append(decoder.decode(payload))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


@pytest.fixture(scope="module")
def server(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    log = tmp_path_factory.mktemp("observability") / "server.log"
    # Every copy reported one step late (the test hook), as CUDA events would be: the server's
    # engine loop keeps stepping while they are in flight, so the idle gauges still reach 0.
    delayed = {"VLLM_BIDKV_FAULTS": json.dumps({"complete_after_steps": 1}), "VLLM_BIDKV_TEST_HOOKS": "1"}
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": endpoint}
    subscriber = EventSubscriber(endpoint)
    try:
        with openai_server(
            tiny_model,
            connector_config({"cpu_bytes": "4MiB", "offload_mode": "lazy"}),
            log,
            kv_events_config=events,
            env=delayed,
        ) as running:
            time.sleep(1.0)  # the publisher's connection and our subscription, before any request
            yield {"url": running.url, "model": tiny_model, "log": log, "events": subscriber}
    finally:
        subscriber.close()


def metrics(url: str) -> dict[str, float]:
    return parse_metrics(get(f"{url}/metrics"))


def check_prompts() -> list[str]:
    from tests.engine.engine_run import prompts

    return prompts(seed=7)[:6]


async def complete_all(url: str, model: str, texts: list[str], max_tokens: int = 48) -> list[str]:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def one(prompt: str) -> str:
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            return str(response.json()["choices"][0]["text"])

        return list(await asyncio.gather(*(one(p) for p in texts)))


async def stream(
    client: httpx.AsyncClient, model: str, prompt: str, drop_after: int | None
) -> tuple[bool, int]:
    """Stream one completion; hang up after ``drop_after`` chunks (None: read it all).

    Returns (finished normally, chunks read)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": WAVE_TOKENS,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
    }
    chunks = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return True, chunks
            chunks += 1
            if drop_after is not None and chunks >= drop_after:
                return False, chunks  # leaving the block closes the connection: vLLM aborts it
    return False, chunks


async def waves(url: str, model: str) -> list[tuple[bool, int, bool]]:
    from tests.engine.engine_run import prompts

    rng = random.Random(0)
    texts = prompts(seed=3)
    results: list[tuple[bool, int, bool]] = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        for wave in range(WAVES):
            drops: list[int | None] = [rng.randint(1, 24) for _ in range(DROPPED_PER_WAVE)]
            drops += [None] * (PER_WAVE - DROPPED_PER_WAVE)
            rng.shuffle(drops)
            batch = [texts[(wave * PER_WAVE + i) % len(texts)] for i in range(PER_WAVE)]
            out = await asyncio.gather(
                *(stream(client, model, p, d) for p, d in zip(batch, drops, strict=True))
            )
            results += [(done, chunks, d is None) for (done, chunks), d in zip(out, drops, strict=True)]
    return results


@pytest.fixture(scope="module")
def after_waves(server: dict[str, Any]) -> dict[str, Any]:
    url, model = server["url"], server["model"]
    before = asyncio.run(complete_all(url, model, check_prompts()))
    idle_before = wait_idle(url)
    results = asyncio.run(waves(url, model))
    idle = wait_idle(url)
    after = asyncio.run(complete_all(url, model, check_prompts()))
    return {
        "before": before,
        "after": after,
        "results": results,
        "idle_before": idle_before,
        "idle": idle,
        "final": wait_idle(url),
    }


def test_dropped_streams_leave_the_server_idle_and_outputs_unchanged(after_waves: dict[str, Any]) -> None:
    results, idle_before, idle = after_waves["results"], after_waves["idle_before"], after_waves["idle"]
    kept = [r for r in results if r[2]]
    assert all(done for done, _, _ in kept), kept
    # Most requests were dropped mid-stream (one whose drop point came after its last chunk
    # finished instead: vLLM may merge tokens into one chunk for a slow reader).
    dropped = sum(1 for done, _, full in results if not full and not done)
    assert dropped > len(results) // 2, results

    # The waves ran under preemption with lazy offload and really hung up on running requests.
    waves_did = {
        n: idle.get(f"vllm:{n}", 0) - idle_before.get(f"vllm:{n}", 0)
        for n in ("num_preemptions_total", "bidkv_preemptions_total", "bidkv_blocks_stored_total")
    }
    assert all(v > 0 for v in waves_did.values()), waves_did
    assert idle.get("vllm:request_success_total", 0) - idle_before.get(
        "vllm:request_success_total", 0
    ) >= len(kept)

    assert idle["vllm:kv_cache_usage_perc"] == 0
    assert idle["vllm:num_requests_running"] == 0 and idle["vllm:num_requests_waiting"] == 0
    assert idle["vllm:bidkv_tracked_requests"] == 0, "per-request records left behind"
    assert idle["vllm:bidkv_tier_pinned_entries"] == 0
    assert {g: idle[f"vllm:bidkv_{g}"] for g in IDLE_ZERO_GAUGES} == dict.fromkeys(IDLE_ZERO_GAUGES, 0.0)

    assert after_waves["after"] == after_waves["before"], "deterministic prompts changed after the waves"


def test_every_gauge_is_exported_and_consistent_at_idle(after_waves: dict[str, Any]) -> None:
    final = after_waves["final"]
    for name in GAUGES:
        assert f"vllm:bidkv_{name}" in final, f"vllm:bidkv_{name} missing from /metrics"
    capacity, used, entries = (
        final["vllm:bidkv_tier_capacity_bytes"],
        final["vllm:bidkv_tier_used_bytes"],
        final["vllm:bidkv_tier_entries"],
    )
    assert capacity == 4 * 2**20 and 0 < used <= capacity  # 64 blocks of 64 KiB
    assert entries > 0 and used % entries == 0 and capacity % (used // entries) == 0
    assert {g: final[f"vllm:bidkv_{g}"] for g in IDLE_ZERO_GAUGES} == dict.fromkeys(IDLE_ZERO_GAUGES, 0.0)


def test_top_once_prints_the_tier_and_counters(server: dict[str, Any], after_waves: dict[str, Any]) -> None:
    final = after_waves["final"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vllm_bidkv.cli",
            "top",
            "--once",
            "--interval",
            "0.2",
            "--url",
            server["url"],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in proc.stdout.splitlines()
        if line.startswith("|") and line.count("|") == 3
    }
    assert rows["tier entries"] == f"{final['vllm:bidkv_tier_entries']:.0f}"
    assert rows["tier used"].endswith("%)") and "MiB" in rows["tier used"]
    assert rows["pinned entries"] == "0" and rows["tracked requests"] == "0"
    loaded, recomputed = rows["tokens loaded / recomputed"].split(" / ")
    assert int(loaded) == final["vllm:bidkv_tokens_loaded_total"] > 0
    assert int(recomputed) == final["vllm:bidkv_recomputed_tokens_total"]
    vllm_preempt, policy_preempt = rows["preemptions (vLLM / policy)"].split(" / ")
    assert int(vllm_preempt) == final["vllm:num_preemptions_total"] > 0
    assert int(policy_preempt) == final["vllm:bidkv_preemptions_total"]


def test_a_subscriber_knows_what_the_cpu_tier_holds(
    server: dict[str, Any], after_waves: dict[str, Any]
) -> None:
    """vLLM's KV events over ZMQ: every block the tier stored is announced with medium CPU
    under a hash vLLM's GPU events announced for that block, every eviction removes one, and
    at idle the announced set is the tier's contents (its size: the tier_entries gauge)."""
    final, subscriber = after_waves["final"], server["events"]
    time.sleep(1.0)  # the last step's batch leaves the publisher's thread
    assert subscriber.seqs == list(range(len(subscriber.seqs))) != [], "a batch was missed"
    announced = Announced()
    for batch in subscriber.batches:
        announced.take(batch.events)
    assert announced.cpu_stored == final["vllm:bidkv_blocks_stored_total"] > 64
    assert announced.cpu_removed == final["vllm:bidkv_cpu_evictions_total"] > 0
    assert (
        len(announced.cpu) == final["vllm:bidkv_tier_entries"] == announced.cpu_stored - announced.cpu_removed
    )

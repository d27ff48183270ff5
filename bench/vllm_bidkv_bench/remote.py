"""``bench engine --server``: one config on a running ``vllm serve``, driven by vLLM's own client.

``run_config_on_server`` returns what ``engine.run_config`` returns, so the runner and
the reports treat both modes alike. With ``url`` the user runs the server (one per
config, started with that config's ``--kv-transfer-config``); without it one is started
here for the config with the preset's engine knobs (``server.openai_server``), stock
configs under ``BIDKV_DISABLE=1`` like the in-process runner's.

Requests go through vLLM's benchmark request function
(``vllm.benchmarks.lib.endpoint_request_func.async_request_openai_completions``, the one
``vllm bench serve`` uses) over aiohttp, each at its trace arrival time: prompt as token
ids, greedy, ``ignore_eos``, ``max_tokens`` = the request's output length. That function
keeps only the text; the outputs check and the closed-loop workloads need the generated
token ids, so the request asks for ``return_token_ids`` and the session handed to vLLM's
function copies the streamed bytes (``_TeeSession``) for ``_token_ids`` to read back. The
timings stay vLLM's own (``start_time``, ``ttft``, ``latency``), on the client's clock
from the pass's start. Closed-loop workloads (``chat``, ``agentic``) send a session's next
turn (``Workload.on_finish``) once its answer is in, with that answer's token ids in its
prompt. Prompt ids are drawn below the model's vocabulary as ``engine._replay`` draws them:
``config.json``'s ``vocab_size`` where the served model's ``root`` is a directory here,
else 512 (the tiny model's; valid ids in any real vocabulary), so both modes send the
same prompts to the same model.

Two passes, as in the in-process runner: a warm-up pass of the workload's first requests
(``engine.WARMUP_REQUESTS``, at their own pace), then ``POST
/reset_prefix_cache?reset_external=true`` (vLLM's dev endpoint, only with
``VLLM_SERVER_DEV_MODE=1``; ``reset_external`` also resets the connector's CPU tier), then
the measured pass. A server started here gets dev mode and must reset; a user's server
without the endpoint, or one whose reset keeps failing, is measured with what it cached
and the result says ``cache_reset: false``.

Counters are differences of the server's ``/metrics`` over the measured pass (read once
the server is idle, so stores in flight have landed):

* ``preemptions``: ``vllm:num_preemptions_total`` (every config);
* ``loaded_blocks`` / ``stored_blocks`` / ``recomputed_prefill_tokens``: BidKVConnector's
  ``vllm:bidkv_blocks_loaded_total`` / ``_blocks_stored_total`` (rescues included, as the
  probe counts them) / ``_recomputed_tokens_total`` (tokens a resumed victim computed
  again). Committed copies, where the in-process probe counts planned ones: equal unless
  a copy fails. Stock vLLM and the peer connectors export none of these (vLLM's
  ``vllm:prompt_tokens_by_source`` counts a request's first prefill only, never a resumed
  one; the peers export bytes, not blocks): 0 there;
* ``steps``, ``scheduled_tokens``: not in ``/metrics``: 0;
* ``connector_queries`` / ``connector_hits``: 0. vLLM's
  ``vllm:external_prefix_cache_*`` count new requests only where the probe also counts
  resumed ones, so the CPU-tier hit rate would mean something else; the record's
  ``metric_external_prefix_cache_*`` carry vLLM's own numbers.

``metrics`` has ``engine.ENGINE_METRICS`` (each ``<name>_total`` at ``/metrics``) as
differences; ``block_bytes`` is the connector's bytes per stored block (0 without it);
``start_s`` is 0 for a user's server. Beside ``run_config``'s keys: ``server``, ``model``,
``vocab_size``, ``cache_reset``, ``request_ids`` (of ``timings``, in order) and, closed
loop, ``prompts`` (as ``run_config``). A user's server whose ``/metrics`` shows BidKVConnector
where the config has none, or the reverse, is refused (``RuntimeError``): one server per config.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vllm_bidkv_bench.configs import RunConfig
from vllm_bidkv_bench.engine import (
    ENGINE_METRICS,
    PEER_ACTIVITY,
    WARMUP_REQUESTS,
    check_peer_activity,
    peer_needs_cpu_copy,
)
from vllm_bidkv_bench.metrics import RequestTiming, StepCounters
from vllm_bidkv_bench.presets import BenchPreset
from vllm_bidkv_bench.server import get, openai_server, wait_idle
from vllm_bidkv_bench.workloads import DEFAULT_VOCAB, Workload

# StepCounters field <- BidKVConnector counter at /metrics.
CONNECTOR_COUNTERS = {
    "loaded_blocks": "vllm:bidkv_blocks_loaded_total",
    "stored_blocks": "vllm:bidkv_blocks_stored_total",
    "recomputed_prefill_tokens": "vllm:bidkv_recomputed_tokens_total",
}
RESET_TIMEOUT_S = 60.0


def server_options(preset: BenchPreset, config: RunConfig, admission: str) -> dict[str, Any]:
    """``openai_server`` arguments (beside the log) for one config under a preset's engine knobs.

    The same knobs ``engine._child`` gives ``vllm.LLM`` (no ``--enforce-eager`` there
    either), and the dev mode that ``/reset_prefix_cache`` needs."""
    from vllm_bidkv_bench.tiny_model import model_path

    kv = config.kv_transfer_config(
        admission, preset.cpu_bytes, cpu_copy_peer=config.is_peer and peer_needs_cpu_copy()
    )
    env = {"VLLM_SERVER_DEV_MODE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if kv is None:
        env["BIDKV_DISABLE"] = "1"
    return {
        "model": model_path(preset.model),
        "kv_transfer_config": kv,
        "gpu_blocks": preset.unbounded_blocks if config.unbounded else preset.num_gpu_blocks,
        "dtype": preset.dtype,
        "block_size": preset.block_size,
        "max_num_seqs": preset.max_num_seqs,
        "max_model_len": preset.max_model_len,
        "max_num_batched_tokens": preset.max_num_batched_tokens,
        "gpu_memory_utilization": preset.gpu_memory_utilization,
        "tensor_parallel_size": preset.tensor_parallel_size,
        "enforce_eager": preset.enforce_eager,
        "env": env,
    }


def run_config_on_server(
    workload: Workload,
    config: RunConfig,
    preset: BenchPreset,
    *,
    admission: str,
    url: str | None,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """Run one config against a vLLM OpenAI server (``url``, or one started here); ``run_config``'s dict."""
    deadline = time.monotonic() + timeout_s
    started = time.perf_counter()
    own = url is None
    with _server(preset, config, admission, url, timeout_s) as base:
        start_s = time.perf_counter() - started if own else 0.0
        return _drive(workload, config, admission, base, own=own, start_s=start_s, deadline=deadline)


def _server(
    preset: BenchPreset, config: RunConfig, admission: str, url: str | None, timeout_s: float
) -> AbstractContextManager[str]:
    """The user's server as is, or one started here for the config (stopped on the way out)."""
    if url is None:
        return _started(preset, config, admission, timeout_s)
    return nullcontext(url.rstrip("/").removesuffix("/v1"))


@contextmanager
def _started(preset: BenchPreset, config: RunConfig, admission: str, timeout_s: float) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="vllm-bidkv-server-") as tmp:
        log = Path(tmp, "server.log")
        options = server_options(preset, config, admission)
        with openai_server(log=log, start_timeout_s=timeout_s, **options) as server:
            try:
                yield server.url
            except Exception as err:
                # The log goes with the temporary directory: its tail goes with the error.
                err.add_note(f"server log ({config.name}), last lines:\n{log.read_text()[-3000:]}")
                raise


def _drive(
    workload: Workload,
    config: RunConfig,
    admission: str,
    url: str,
    *,
    own: bool,
    start_s: float,
    deadline: float,
) -> dict[str, Any]:
    model, root = _served_model(url)
    vocab = _vocab_size(root)

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"bench engine --server {url}: ran past its timeout")
        return left

    _, _, _, warmup_s = _run_pass(workload.head(WARMUP_REQUESTS), url, model, vocab, "warmup-", remaining())
    _check_connector(url, config, admission, wait_idle(url, timeout=min(120.0, remaining())))
    cache_reset = _reset_cache(url, timeout=min(RESET_TIMEOUT_S, remaining()))
    if own and not cache_reset:
        raise RuntimeError(f"{url}: could not reset the prefix cache after the warm-up pass")
    before = wait_idle(url, timeout=min(120.0, remaining()))
    timings, outputs, prompts, run_s = _run_pass(workload, url, model, vocab, "", remaining())
    after = wait_idle(url, timeout=min(120.0, remaining()))
    result = {
        "timings": timings,
        "counters": asdict(_counters(before, after)),
        "outputs": outputs,
        # The request of each timing (closed loop: turns are appended in the order answers came).
        "request_ids": list(prompts),
        "metrics": {
            name: after[f"{name}_total"] - before.get(f"{name}_total", 0.0)
            for name in ENGINE_METRICS
            if f"{name}_total" in after
        },
        "block_bytes": _block_bytes(after),
        "start_s": start_s,
        "warmup_s": warmup_s,
        "run_s": run_s,
        "load_avg": os.getloadavg()[0],
        "server": url,
        "model": model,
        "vocab_size": vocab,
        "cache_reset": cache_reset,
    }
    if workload.sessions is not None:  # closed loop: what each turn really sent (as engine.py)
        result["prompts"] = prompts
    if config.is_peer:  # its own counters at /metrics, checked as the in-process runner checks them
        # A server started here runs on this machine's platform: the in-process runner's test.
        result["label"] = config.engine_label(own and peer_needs_cpu_copy())
        result["peer_counters"] = _peer_counters(config, before, after, result["counters"]["preemptions"])
    return result


def _peer_counters(
    config: RunConfig, before: Mapping[str, float], after: Mapping[str, float], preemptions: int
) -> dict[str, float]:
    """A peer's counters over the measured pass from ``/metrics`` (``<name>_total``), under the
    names the in-process runner records; raises as it does when the peer never stored or loaded."""
    # The exposition sums label sets away, and by_source{source="host"} is one of its labels:
    # the connector's hits (the peer's only tier is the host) are its external hits instead.
    names = (*PEER_ACTIVITY.get(config.connector, ()), "vllm:external_prefix_cache_hits")
    counters = {n: after.get(f"{n}_total", 0.0) - before.get(f"{n}_total", 0.0) for n in names}
    counters["host_hit_tokens"] = counters.pop("vllm:external_prefix_cache_hits")
    check_peer_activity(config, counters, preemptions)
    return counters


def _check_connector(url: str, config: RunConfig, admission: str, metrics: Mapping[str, float]) -> None:
    """A server given for a config must run it: BidKVConnector's series at ``/metrics`` iff it should.

    Checked after the warm-up pass (the series appear with the first stats). The peers'
    connectors are not told apart; the victim strategy, tier size... cannot be seen from here."""
    kv = config.kv_transfer_config(admission, 1)
    if kv is not None and config.is_peer:
        return
    wants = kv is not None
    has = any(name.startswith("vllm:bidkv_") for name in metrics)
    if wants != has:
        raise RuntimeError(
            f"{url}: config {config.name!r} "
            + (
                "runs BidKVConnector, but the server exports no vllm:bidkv_* metric"
                if wants
                else "runs stock vLLM, but the server runs BidKVConnector (vllm:bidkv_* metrics)"
            )
            + "; start one server per config with that config's --kv-transfer-config"
        )


def _served_model(url: str) -> tuple[str, str | None]:
    """The first model the server serves: its id and its ``root`` (the path it was loaded from)."""
    try:
        cards = json.loads(get(f"{url}/v1/models"))["data"]
    except (OSError, ValueError, KeyError) as err:
        raise RuntimeError(f"{url}/v1/models: not a vLLM OpenAI server? ({err})") from err
    if not cards:
        raise RuntimeError(f"{url}/v1/models: the server lists no model")
    return str(cards[0]["id"]), cards[0].get("root")


def _vocab_size(root: str | None) -> int:
    """The model's vocabulary, as ``engine._replay`` takes it, so both modes send the same prompts.

    The OpenAI API does not say; a model directory on this machine does (``config.json``).
    Otherwise 512: the tiny tokenizer's, and ids below it are valid in any real vocabulary."""
    if root:
        config = Path(root, "config.json")
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            return DEFAULT_VOCAB
        vocab = data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
        if isinstance(vocab, int) and vocab > 0:
            return vocab
    return DEFAULT_VOCAB


def _reset_cache(url: str, timeout: float) -> bool:
    """Empty the GPU prefix cache and the connector's tier; False where the server cannot.

    The reset fails (``success: false``) while blocks are held, e.g. by stores in flight: retried."""
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(f"{url}/reset_prefix_cache?reset_external=true", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as err:
            if err.code in (404, 405):  # no dev mode: the endpoint does not exist
                return False
            raise
        try:
            success = bool(json.loads(body).get("success", True))
        except ValueError:
            success = True  # an older server answers 200 without a body
        if success:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)


def _counters(before: Mapping[str, float], after: Mapping[str, float]) -> StepCounters:
    def delta(name: str) -> int:
        return round(after.get(name, 0.0) - before.get(name, 0.0))

    counters = StepCounters(preemptions=delta("vllm:num_preemptions_total"))
    for field_name, metric in CONNECTOR_COUNTERS.items():
        setattr(counters, field_name, delta(metric))
    return counters


def _block_bytes(m: Mapping[str, float]) -> int:
    """Bytes per KV block (all layers, all workers), from the connector's own counters; 0 without it."""
    for size, count in (
        ("vllm:bidkv_bytes_stored_total", "vllm:bidkv_blocks_stored_total"),
        ("vllm:bidkv_bytes_loaded_total", "vllm:bidkv_blocks_loaded_total"),
        ("vllm:bidkv_tier_used_bytes", "vllm:bidkv_tier_entries"),
    ):
        if m.get(count, 0) > 0:
            return round(m.get(size, 0.0) / m[count])
    return 0


# -- the client ------------------------------------------------------------------


class _TeeSession:
    """An ``aiohttp.ClientSession`` for vLLM's request function that keeps the streamed bytes.

    ``async_request_openai_completions`` parses the stream but keeps only text and counts;
    the bytes it read are kept per request (by ``x-request-id``) for ``_token_ids``."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.streams: dict[str, bytearray] = {}

    def post(self, *, url: str, json: Any, headers: dict[str, str]) -> Any:
        sink = self.streams.setdefault(headers["x-request-id"], bytearray())
        return _TeePost(self._session.post(url=url, json=json, headers=headers), sink)


class _TeePost:
    def __init__(self, context: Any, sink: bytearray) -> None:
        self._context, self._sink = context, sink

    async def __aenter__(self) -> Any:
        return _TeeResponse(await self._context.__aenter__(), self._sink)

    async def __aexit__(self, *exc: Any) -> Any:
        return await self._context.__aexit__(*exc)


class _TeeResponse:
    def __init__(self, response: Any, sink: bytearray) -> None:
        self._response, self.content = response, _TeeContent(response.content, sink)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._response, name)


class _TeeContent:
    def __init__(self, content: Any, sink: bytearray) -> None:
        self._content, self._sink = content, sink

    async def iter_any(self) -> Any:
        async for chunk in self._content.iter_any():
            self._sink.extend(chunk)
            yield chunk


def _token_ids(stream: bytes | bytearray) -> list[int]:
    """The generated token ids of one streamed completion (``return_token_ids``: per chunk)."""
    from vllm.benchmarks.lib.endpoint_request_func import StreamedResponseHandler

    handler = StreamedResponseHandler()  # type: ignore[no-untyped-call]
    messages = handler.add_chunk(bytes(stream))
    if handler.buffer.strip():
        messages.append(handler.buffer.strip())
    ids: list[int] = []
    for message in messages:
        data = message.removeprefix("data: ").strip()
        if message.startswith(":") or data == "[DONE]" or not data:
            continue
        for choice in json.loads(data).get("choices") or ():
            ids.extend(choice.get("token_ids") or ())
    return ids


def _run_pass(
    workload: Workload, url: str, model: str, vocab: int, prefix: str, timeout: float
) -> tuple[list[dict[str, Any]], dict[str, list[int]], dict[str, list[int]], float]:
    return asyncio.run(_pass(workload.replay(), url, model, vocab, prefix, timeout))


async def _pass(
    workload: Workload, url: str, model: str, vocab: int, prefix: str, timeout: float
) -> tuple[list[dict[str, Any]], dict[str, list[int]], dict[str, list[int]], float]:
    """Send each request at its arrival (closed loop: a session's next turn once its answer is in).

    Timings in ``requests`` order; outputs and prompts by request id, prompts in that order too."""
    import aiohttp
    from vllm.benchmarks.lib.endpoint_request_func import (
        ASYNC_REQUEST_FUNCS,
        RequestFuncInput,
    )

    request_func = ASYNC_REQUEST_FUNCS["vllm"]  # async_request_openai_completions, as `vllm bench serve`
    timings: dict[int, dict[str, Any]] = {}
    outputs: dict[str, list[int]] = {}
    sent: dict[int, list[int]] = {}
    errors: list[str] = []
    tasks: set[asyncio.Task[None]] = set()
    clock0 = time.perf_counter()

    async def send(session: _TeeSession, i: int) -> None:
        spec = workload.requests[i]
        await asyncio.sleep(max(0.0, clock0 + spec.arrival_s - time.perf_counter()))
        prompt = sent[i] = workload.prompt_token_ids(i, vocab)
        request_id = prefix + workload.request_id(i)
        out = await request_func(
            RequestFuncInput(
                prompt=prompt,
                api_url=f"{url}/v1/completions",
                prompt_len=len(prompt),
                output_len=spec.output_len,
                model=model,
                ignore_eos=True,
                request_id=request_id,
                extra_body={"temperature": 0.0, "return_token_ids": True},
            ),
            session,  # type: ignore[arg-type]
        )
        if not out.success:
            errors.append(f"{request_id}: {out.error.strip()[-2000:] or 'failed'}")
            return
        ids = _token_ids(session.streams.pop(request_id, bytearray()))
        arrival = out.start_time - clock0
        finish = arrival + out.latency
        timings[i] = asdict(
            RequestTiming(
                arrival_s=arrival,
                first_token_s=arrival + out.ttft,
                finish_s=finish,
                num_output_tokens=len(ids),
                expected_output_tokens=spec.output_len,
            )
        )
        outputs[workload.request_id(i)] = ids
        following = workload.on_finish(i, prompt, ids, finish)
        if following is not None:
            spawn(session, following)

    def spawn(session: _TeeSession, i: int) -> None:
        task = asyncio.get_running_loop().create_task(send(session, i))
        tasks.add(task)

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), trust_env=True
    ) as raw:
        session = _TeeSession(raw)
        for i in range(len(workload.requests)):
            spawn(session, i)
        try:
            async with asyncio.timeout(timeout):
                while pending := {t for t in tasks if not t.done()}:
                    await asyncio.wait(pending)
        except TimeoutError:
            raise TimeoutError(
                f"{url}: {len(timings)} of {workload.total_requests} requests done in {timeout:.0f} s"
            ) from None
        finally:
            for task in tasks:
                task.cancel()
        for task in tasks:
            if not task.cancelled() and (err := task.exception()) is not None:
                raise err
    run_s = time.perf_counter() - clock0
    if errors:
        raise RuntimeError(f"{url}: {len(errors)} requests failed; first: {errors[0]}")
    order = range(len(workload.requests))
    prompts = {workload.request_id(i): sent[i] for i in order}
    return [timings[i] for i in order], outputs, prompts, run_s

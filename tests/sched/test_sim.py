"""The simulator on small traces, the cost model, and workload / JSONL trace handling."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from vllm_bidkv_bench.configs import CONFIGS, parse_configs
from vllm_bidkv_bench.costmodel import H100_LLAMA3_8B
from vllm_bidkv_bench.metrics import summarize
from vllm_bidkv_bench.presets import get_preset
from vllm_bidkv_bench.sim import _BidKVWorker, simulate
from vllm_bidkv_bench.workloads import (
    CLOSED_LOOP,
    WORKLOADS,
    TraceRequest,
    Workload,
    load_jsonl,
    make_workload,
    write_jsonl,
)

from vllm_bidkv.connectors.metadata import BidKVConnectorMetadata
from vllm_bidkv.offload import StepPlan, TransferJob

pytestmark = pytest.mark.sched

# Small enough to run in a second, tight enough to preempt: 48 blocks of 16 for 8 slots.
SMALL = replace(
    get_preset("h100-llama3-8b"), num_gpu_blocks=48, max_num_seqs=8, max_model_len=2048, cpu_bytes=2**30
)


def small_trace(n: int = 24, seed: int = 0) -> Workload:
    return make_workload("bursty", n, 40.0, seed, length_scale=0.8)


@pytest.mark.parametrize("config", ["stock", "unbounded", "bidkv", "bidkv-0.1", "offload", "bidkv+offload"])
def test_every_request_finishes_with_its_token_count(config: str, request: pytest.FixtureRequest) -> None:
    if "offload" in config:
        request.getfixturevalue("offload_supported")
    workload = small_trace()
    result = simulate(workload, CONFIGS[config], SMALL, H100_LLAMA3_8B)
    assert [t.num_output_tokens for t in result.timings] == [r.output_len for r in workload.requests]
    for timing in result.timings:
        assert timing.arrival_s <= timing.first_token_s <= timing.finish_s  # type: ignore[operator]
    # Every block is back in the free pool: every load and store job was reported done.
    assert result.free_blocks_at_end == result.num_gpu_blocks
    s = summarize(
        config, 0, 0, 0, result.timings, result.counters, block_size=16, block_bytes=result.block_bytes
    )
    assert s.completed == len(workload.requests) and s.wrong_token_counts == 0
    if config == "unbounded":
        assert s.preemptions == 0 and s.recomputed_prefill_tokens == 0
    if config == "stock":  # the trace really exercises preemption
        assert s.preemptions > 0 and s.recomputed_prefill_tokens > 0
    if "offload" not in config:
        assert s.loaded_tokens == 0 and s.stored_tokens == 0
    # The connector's time, split by the outermost call it was spent in, adds up to its total.
    assert sum(result.connector_by_call.values()) == pytest.approx(result.connector_s)
    if config in ("bidkv", "bidkv+offload"):  # it chose the victims and planned every step
        # Through the victim hook, or asked by a source-patched vLLM itself.
        assert "build_connector_meta" in result.connector_by_call
        assert result.connector_by_call.keys() & {"victim_hook", "choose_victim"}


@pytest.mark.usefixtures("offload_supported")
def test_offload_loads_instead_of_recomputing() -> None:
    workload = small_trace()
    runs = {c: simulate(workload, CONFIGS[c], SMALL, H100_LLAMA3_8B) for c in ("stock", "offload")}
    stock, offload = (runs[c].counters for c in ("stock", "offload"))
    assert offload.loaded_blocks > 0 and offload.stored_blocks > 0
    assert offload.recomputed_prefill_tokens < stock.recomputed_prefill_tokens
    assert runs["offload"].load_s > 0 and runs["offload"].store_s > 0


@pytest.mark.usefixtures("offload_supported")
def test_blocks_dropped_unstored_are_what_the_tier_lacked_when_vllm_reused_them() -> None:
    """``gpu_drops_unstored``: a tier of the pool's size misses some blocks vLLM drops; one
    that holds the whole trace misses none; stock has no tier to count."""
    shape = replace(get_preset("h100-llama3-8b"), num_gpu_blocks=160, max_num_seqs=8, max_model_len=8192)
    trace = make_workload("chat", 60, 4.0, 0, length_scale=0.3)
    drops = {
        tier: simulate(
            trace, CONFIGS["bidkv+offload"], replace(shape, cpu_bytes=tier * 16 * 128 * 1024), H100_LLAMA3_8B
        )
        for tier in (160, 1600)
    }
    assert drops[160].gpu_drops_unstored and drops[1600].gpu_drops_unstored == 0
    assert drops[1600].prefill_tokens_computed < drops[160].prefill_tokens_computed
    assert simulate(trace, CONFIGS["stock"], shape, H100_LLAMA3_8B).gpu_drops_unstored is None


def _plan_step(*jobs: TransferJob) -> SimpleNamespace:
    """A scheduler output with only what ``_BidKVWorker`` reads: the plan (where
    ``start_load_kv`` runs no longer moves our loads: they wait for the bind)."""
    return SimpleNamespace(kv_connector_metadata=BidKVConnectorMetadata(StepPlan(loads=list(jobs))))


def _load(job_id: int, blocks: int, request_id: str, *, asynchronous: bool) -> TransferJob:
    ids = list(range(job_id * 100, job_id * 100 + blocks))
    return TransferJob(job_id, "load", ids, ids, request_id, asynchronous=asynchronous)


@pytest.mark.usefixtures("offload_supported")  # BidKV worker metadata: vLLM 0.19+
def test_bidkv_worker_async_loads_overlap_the_forward() -> None:
    cost = H100_LLAMA3_8B
    block_bytes = 16 * cost.kv_bytes_per_token
    worker = _BidKVWorker(cost, block_bytes)
    copy = cost.copy_s(4 * block_bytes, to_device=True, duplex=False)

    # Only an asynchronous load (start_load_kv after the forward's launch): nothing waits
    # before the forward, and the load starts with it, not when it ends.
    step = _plan_step(_load(0, 4, "a", asynchronous=True))
    assert worker.before_forward(step, 0.0) == 0.0
    assert worker.report(0.0) is None and worker.busy()
    worker.after_forward(step, 1.0)
    finish = worker.next_event()
    assert finish is not None and finish == pytest.approx(copy)
    out = worker.report(finish)
    assert out.finished_recving == {"a"} and out.kv_connector_worker_meta.results.done == {0: 1}
    assert not worker.busy()

    # With a synchronous load: it delays the forward; the asynchronous one starts with the
    # forward, does not delay it, and is reported at the first step end after it is done.
    step = _plan_step(_load(1, 4, "b", asynchronous=False), _load(2, 4, "c", asynchronous=True))
    assert worker.before_forward(step, 2.0) == pytest.approx(copy)
    worker.after_forward(step, 2.0 + copy + copy / 2)
    out = worker.report(2.0 + copy + copy / 2)
    assert out.finished_recving is None and out.kv_connector_worker_meta.results.done == {1: 1}
    finish = worker.next_event()
    assert finish is not None and finish == pytest.approx(2.0 + 2 * copy)
    out = worker.report(finish)
    assert out.finished_recving == {"c"} and out.kv_connector_worker_meta.results.done == {2: 1}
    assert worker.load_s == pytest.approx(copy) and worker.async_load_s == pytest.approx(2 * copy)


# A closed loop whose turns reload their history from the CPU tier, some of it 256+ tokens.
CHAT = replace(SMALL, num_gpu_blocks=64, max_model_len=1024)
ASYNC_FROM = 256  # tokens: below the default, so that this short run has asynchronous loads


@pytest.mark.usefixtures("offload_supported")
@pytest.mark.parametrize("config", ["bidkv+offload", "bidkv+offload-sync"])
def test_bidkv_loads_async_and_sync_finish(config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asynchronous loads are reported (job and ``finished_recving``), so their requests leave
    ``WAITING_FOR_REMOTE_KVS`` and the run ends; with the threshold out of reach every load
    is synchronous."""
    loads: list[TransferJob] = []
    recving: list[str] = []
    before_forward, report = _BidKVWorker.before_forward, _BidKVWorker.report

    def spy_start(self: _BidKVWorker, out: Any, now: float) -> float:
        loads.extend(out.kv_connector_metadata.plan.loads)
        return before_forward(self, out, now)

    def spy_report(self: _BidKVWorker, now: float) -> Any:
        out = report(self, now)
        if out is not None:
            recving.extend(out.finished_recving or ())
        return out

    monkeypatch.setattr(_BidKVWorker, "before_forward", spy_start)
    monkeypatch.setattr(_BidKVWorker, "report", spy_report)
    workload = make_workload("chat", 30, 4.0, 0, length_scale=0.3, max_context=900)
    run = CONFIGS[config]
    if config == "bidkv+offload":
        run = replace(run, connector_options=(("async_load_min_tokens", ASYNC_FROM),))
    result = simulate(workload, run, CHAT, H100_LLAMA3_8B)
    assert all(t.finish_s is not None for t in result.timings)
    assert all(t.num_output_tokens == t.expected_output_tokens for t in result.timings)
    assert result.free_blocks_at_end == result.num_gpu_blocks  # every job reported
    assert result.counters.loaded_blocks > 0 and result.load_s > 0
    async_loads = [job for job in loads if job.asynchronous]
    if config == "bidkv+offload":
        hits = [len(job.gpu_block_ids) + len(job.unavailable_gpu_block_ids) for job in async_loads]
        assert hits and min(hits) * CHAT.block_size >= ASYNC_FROM
        assert sorted(recving) == sorted(str(job.request_id) for job in async_loads)
        assert result.async_load_s > 0
    else:
        assert not async_loads and not recving and result.async_load_s == 0


def test_sim_is_deterministic() -> None:
    a = simulate(small_trace(), CONFIGS["stock"], SMALL, H100_LLAMA3_8B)
    b = simulate(small_trace(), CONFIGS["stock"], SMALL, H100_LLAMA3_8B)
    assert a.timings == b.timings and a.counters == b.counters


def test_cost_model_shape() -> None:
    cost = H100_LLAMA3_8B
    assert cost.kv_bytes_per_token == 128 * 1024  # COST_FACTS: 128 KiB per token
    decode_1, decode_32 = cost.forward_s([(1000, 1)]), cost.forward_s([(1000, 1)] * 32)
    assert decode_32 < 3 * decode_1  # memory bound: weights are read once per step
    short, long = cost.forward_s([(0, 2048)]), cost.forward_s([(6144, 2048)])
    assert long > short  # attention's length term
    # Restoring 1000 tokens from host memory is ~an order of magnitude cheaper than recomputing them.
    load = cost.copy_s(1000 * cost.kv_bytes_per_token, to_device=True, duplex=False)
    assert 5 * load < cost.forward_s([(0, 1000)])


# -- workloads -----------------------------------------------------------------------
@pytest.mark.parametrize("name", [w for w in WORKLOADS if w not in CLOSED_LOOP])
def test_workloads_are_seeded_and_share_prefixes(name: str) -> None:
    a, b = make_workload(name, 60, 3.0, 7), make_workload(name, 60, 3.0, 7)
    assert a.requests == b.requests and len(a.requests) == 60
    assert [a.prompt_token_ids(i, 512) for i in range(60)] == [b.prompt_token_ids(i, 512) for i in range(60)]
    assert make_workload(name, 60, 3.0, 8).requests != a.requests
    arrivals = [r.arrival_s for r in a.requests]
    assert arrivals == sorted(arrivals)
    for i, req in enumerate(a.requests):
        ids = a.prompt_token_ids(i, 512)
        assert len(ids) == req.prompt_len
        for j, other in enumerate(a.requests[:i]):
            if req.prefix_group is not None and other.prefix_group == req.prefix_group:
                common = min(req.prefix_len, other.prefix_len)
                assert ids[:common] == a.prompt_token_ids(j, 512)[:common]


@pytest.mark.parametrize("name", CLOSED_LOOP)
def test_closed_loop_workloads_are_seeded_and_bounded(name: str) -> None:
    a, b = (
        make_workload(name, 60, 3.0, 7, max_context=4096),
        make_workload(name, 60, 3.0, 7, max_context=4096),
    )
    assert a.requests == b.requests and a.total_requests == 60
    assert make_workload(name, 60, 3.0, 8).requests != a.requests
    # First turns only until a runner plays it; every planned turn fits max_context.
    assert a.sessions is not None and len(a.requests) == len(a.sessions.plans) < 60
    for plan in a.sessions.plans:
        length = len(plan.first_prompt)
        for k, out in enumerate(plan.output_lens):
            length += (plan.output_lens[k - 1] + len(plan.messages[k - 1])) if k else 0
            assert length + out <= 4096
    with pytest.raises(ValueError, match="closed-loop"):
        write_jsonl(a, "/nonexistent.jsonl")


def test_head_is_the_first_requests_with_the_same_prompts() -> None:
    """The engine runner's warm-up: the workload's first requests (first sessions), same token ids."""
    static = make_workload("rag", 40, 3.0, 0)
    head = static.head(8)
    assert head.requests == static.requests[:8]
    assert [head.prompt_token_ids(i, 512) for i in range(8)] == [
        static.prompt_token_ids(i, 512) for i in range(8)
    ]
    chat = make_workload("chat", 60, 3.0, 0)
    first = chat.head(10)
    assert chat.sessions is not None and first.sessions is not None
    plans = first.sessions.plans
    assert plans == chat.sessions.plans[: len(plans)] and first.total_requests >= 10
    assert first.total_requests - len(plans[-1].output_lens) < 10  # no session more than needed


def test_long_doc_qa_interleaves_documents() -> None:
    """vLLM's long-document QA order: every round asks each of the 8 documents once."""
    workload = make_workload("long-doc-qa", 40, 3.0, 0)
    docs = [r.prefix_group for r in workload.requests]
    rounds = [docs[i : i + 8] for i in range(0, 40, 8)]
    assert all(sorted(r) == sorted(f"doc{d}" for d in range(8)) for r in rounds)
    assert rounds[0] != rounds[1]  # shuffled per round
    assert all(4096 <= r.prefix_len <= 7680 and r.prompt_len > r.prefix_len for r in workload.requests)


def test_multi_round_qa_users_share_the_system_prompt_and_keep_their_context() -> None:
    """LMCache's multi-round QA: one 1,000-token system prompt for all, then each user's own context."""
    workload = make_workload("multi-round-qa", 60, 3.0, 0)
    assert workload.sessions is not None
    firsts = [plan.first_prompt for plan in workload.sessions.plans]
    assert len(firsts) >= 10 and len({f[:1000] for f in firsts}) == 1
    assert len({f[1000:1100] for f in firsts}) == len(firsts)  # each user's context is its own
    assert all(4 <= len(p.output_lens) <= 6 for p in workload.sessions.plans[:-1])


def test_jsonl_round_trip(tmp_path: Path) -> None:
    workload = make_workload("mixed", 30, 2.0, 3)
    path = tmp_path / "trace.jsonl"
    write_jsonl(workload, path)
    loaded = load_jsonl(path, seed=3)
    assert loaded.name == "trace" and loaded.requests == workload.requests
    assert [loaded.prompt_token_ids(i, 512) for i in range(30)] == [
        workload.prompt_token_ids(i, 512) for i in range(30)
    ]


def test_jsonl_explicit_tokens_and_sorting(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        {"arrival_s": 1.5, "prompt_tokens": [5, 6, 7], "output_len": 4},
        {},  # blank lines are skipped, see below
        {"arrival_s": 0, "prompt_len": 40, "output_len": 2, "prefix_group": 3, "prefix_len": 16},
    ]
    path.write_text("\n".join(json.dumps(r) if r else "" for r in rows) + "\n")
    workload = load_jsonl(path)
    assert workload.requests == [
        TraceRequest(0.0, 40, 2, "3", 16),
        TraceRequest(1.5, 3, 4, prompt_tokens=(5, 6, 7)),
    ]
    assert workload.prompt_token_ids(1, 512) == [5, 6, 7]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"arrival_s": 0, "prompt_len": 4}', "missing key 'output_len'"),
        ('{"arrival_s": 0, "output_len": 4}', "missing key 'prompt_len'"),
        ('{"arrival_s": -1, "prompt_len": 4, "output_len": 4}', "arrival_s=-1"),
        ('{"arrival_s": 0, "prompt_len": 0, "output_len": 4}', "prompt_len=0"),
        ('{"arrival_s": 0, "prompt_len": 4.5, "output_len": 4}', "prompt_len=4.5"),
        ('{"arrival_s": 0, "prompt_len": 4, "output_len": true}', "output_len=True"),
        ('{"arrival_s": 0, "prompt_len": 4, "output_len": 4, "prompt_lenn": 4}', "unknown key 'prompt_lenn'"),
        (
            '{"arrival_s": 0, "prompt_len": 4, "output_len": 4, "prefix_group": "a"}',
            "prefix_group and prefix_len",
        ),
        (
            '{"arrival_s": 0, "prompt_len": 4, "output_len": 4, "prefix_group": "a", "prefix_len": 9}',
            "prefix_len=9",
        ),
        ('{"arrival_s": 0, "prompt_tokens": [1, -2], "output_len": 4}', "prompt_tokens[1]=-2"),
        ('{"arrival_s": 0, "prompt_tokens": [1], "prompt_len": 2, "output_len": 4}', "prompt_len=2"),
    ],
)
def test_jsonl_errors_name_the_line_and_key(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_len": 4, "output_len": 4}\n\n' + line + "\n")
    with pytest.raises(ValueError) as err:
        load_jsonl(path)
    assert f"{path}:3:" in str(err.value) and message in str(err.value)


def test_empty_trace_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="no requests"):
        load_jsonl(path)


def test_config_names() -> None:
    names = [c.name for c in parse_configs("stock,bidkv+offload")]
    assert names == ["stock", "bidkv+offload", "unbounded"]
    with pytest.raises(ValueError, match="unknown config 'bidk'"):
        parse_configs("bidk")
    assert CONFIGS["stock"].kv_transfer_config("fcfs", 1) is None
    # The sync-loads variant differs from bidkv+offload by the threshold alone.
    base = CONFIGS["bidkv+offload"].connector_extra("fcfs", 1)
    assert base is not None and "async_load_min_tokens" not in base
    sync = CONFIGS["bidkv+offload-sync"].connector_extra("fcfs", 1)
    assert sync == {**base, "async_load_min_tokens": 2**31}
    assert CONFIGS["bidkv+offload-wait"].connector_extra("fcfs", 1) == {**base, "bid_step_cost": 0.0}
    assert CONFIGS["stock"].connector_extra("sjf", 1) == {
        "victim_policy": "vllm-default",
        "offload_mode": "off",
        "admission": "sjf",
    }


def test_bench_sim_runs_the_users_own_shape(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    offload_supported: None,  # every simulator matrix runs ideal-tier, an offload config
) -> None:
    """``bench sim`` with the engine runner's shape flags (a shape no preset has) and the cost
    model: vLLM's Scheduler runs under exactly that shape."""
    import logging

    # The command quiets vLLM's and our loggers for its run: not for the tests after this one
    # (setLevel, not the attribute: it also clears the loggers' cached verdicts).
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    loggers = {logger: logger.level for logger in map(logging.getLogger, ("vllm", "vllm_bidkv"))}
    from vllm_bidkv_bench.presets import PRESETS
    from vllm_bidkv_bench.report import read_json

    from vllm_bidkv.cli import main

    shape = {"num_gpu_blocks": 97, "block_size": 32, "max_num_seqs": 5, "max_num_batched_tokens": 1536}
    shape |= {"max_model_len": 3072, "cpu_bytes": 300 * 2**20, "cost_model": "h100-llama3-8b"}
    assert not any(all(getattr(p, k) == v for k, v in shape.items()) for p in PRESETS.values())
    out = tmp_path / "sim.json"
    argv = ["bench", "sim", "--configs", "stock,bidkv+offload", "--rates", "40", "--num-requests", "24"]
    argv += ["--runs", "1", "--num-gpu-blocks-override", "97", "--block-size", "32", "--max-num-seqs", "5"]
    argv += ["--max-num-batched-tokens", "1536", "--max-model-len", "3072", "--cpu-bytes", "300MiB"]
    argv += ["--cost-model", "h100-llama3-8b", "--json", str(out), "--no-progress"]
    try:
        assert main(argv) == 0
    finally:
        for logger, level in loggers.items():
            logger.setLevel(level)
    records, meta = read_json(out)
    assert {k: meta["preset"][k] for k in shape} == shape
    ran = {r["config"]: r for r in records}
    assert {"stock", "bidkv+offload", "unbounded"} <= set(ran) and not any("error" in r for r in records)
    assert all(r["max_running"] <= 5 for r in records) and ran["stock"]["max_running"] == 5, (
        "--max-num-seqs bounds the batch, and 40 req/s fills it"
    )
    assert ran["stock"]["preemptions"] > 0, "97 blocks of 32 tokens cannot hold 5 long requests"

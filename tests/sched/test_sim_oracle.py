"""The ``oracle`` config: Belady eviction of a tier of the preset's size, free copies, every block
offered; the bound no config may beat by more than the 2% tie.

What it bounds is the tier's work: prefill tokens the run still computed, throughput, and the
TTFT tail, on workloads whose future the trace decides (chat, multi-round QA). It keeps
``bidkv``'s victim rule and cannot know who will be preempted, so it is no bound on what a
victim rule changes (RESULTS.md says so), and these tests do not claim it.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from vllm_bidkv_bench.configs import CONFIGS
from vllm_bidkv_bench.costmodel import H100_LLAMA3_8B
from vllm_bidkv_bench.metrics import summarize
from vllm_bidkv_bench.oracle import NEVER, FutureUses, OracleTier
from vllm_bidkv_bench.presets import get_preset
from vllm_bidkv_bench.runner import add_oracle_distance
from vllm_bidkv_bench.sim import sim_token, simulate
from vllm_bidkv_bench.standalone import make_request
from vllm_bidkv_bench.workloads import make_workload

from tests.sched.test_sim_peers import PEER_RELEASES
from vllm_bidkv.counters import Counters

pytestmark = pytest.mark.sched

TIE = 1.02


def h(i: int) -> bytes:
    return i.to_bytes(8, "little")


def test_belady_evicts_the_entry_used_farthest_ahead_and_bypasses_what_is_used_later() -> None:
    future = FutureUses({"r0": 0, "r1": 1, "r2": 2, "r3": 3}, {h(1): [1], h(2): [3], h(3): [2]})
    tier = OracleTier(2, future, Counters())
    for block in (1, 2):
        slot = tier.reserve(h(block))
        assert slot is not None
        tier.commit(slot)
    assert future.next_use(h(4)) == NEVER
    assert tier.reserve(h(4)) is None, "never used again: bypassed, nothing evicted"
    slot = tier.reserve(h(3))  # used at 2: before h(2)'s use at 3
    assert slot is not None and not tier.contains(h(2)) and tier.contains(h(1))
    tier.commit(slot)
    tier.arrived("r1", [h(1)])  # h(1) is looked up when r1 is admitted: used now
    assert tier.next_use(h(1)) == future.now == 1
    tier.admitted("r1")
    assert tier.next_use(h(1)) == NEVER, "no later request holds it"
    assert tier.order.victim() == tier.lookup(h(1))
    tier.protect([h(1)])  # its request was preempted: it resumes from the tier
    assert tier.next_use(h(1)) == 1 and tier.order.victim() == tier.lookup(h(3))
    tier.check()


def test_a_block_the_gpu_holds_is_worth_nothing_in_the_tier_until_the_gpu_drops_it() -> None:
    """Two levels: a tier copy of what the GPU's prefix cache holds is evicted first, and what
    vLLM drops from the GPU is stored then (a free copy) if Belady keeps it."""
    on_gpu = {h(1)}
    future = FutureUses({"r0": 0, "r1": 1, "r2": 2}, {h(1): [1], h(2): [2], h(3): [1]})
    tier = OracleTier(2, future, Counters(), on_gpu=on_gpu.__contains__)
    for block in (1, 2):
        slot = tier.reserve(h(block))
        assert slot is not None
        tier.commit(slot)
    assert tier.next_use(h(1)) == NEVER and tier.order.victim() == tier.lookup(h(1))
    on_gpu.discard(h(1))
    tier.gpu_evicted(h(1))  # already held: its real next use (1) counts again
    assert tier.order.victim() == tier.lookup(h(2)) and tier.gpu_evictions_stored == 0
    tier.gpu_evicted(h(3))  # used at 1, before h(2) at 2: stored in h(2)'s place
    assert tier.lookup(h(3)) is not None and not tier.contains(h(2)) and tier.gpu_evictions_stored == 1
    on_gpu.add(h(3))
    tier.gpu_cached(h(3))
    assert tier.order.victim() == tier.lookup(h(3))
    tier.check()


def test_the_future_it_knows_is_the_closed_loop_the_run_plays() -> None:
    """Every turn a closed-loop run plays (prompts made of earlier turns' outputs) is a request
    the oracle listed up front, with the same block hashes."""
    preset = replace(get_preset("h100-llama3-8b"), num_gpu_blocks=160, max_num_seqs=8, max_model_len=8192)
    workload = make_workload("chat", 30, 4.0, 0, length_scale=0.3)
    played = simulate(workload, CONFIGS["stock"], preset, H100_LLAMA3_8B).played
    assert played is not None and len(played.requests) == workload.total_requests

    def hashes_of(request_id: str, prompt: list[int]) -> list[bytes]:
        return list(make_request(request_id, prompt, 1, block_size=preset.block_size).block_hashes)

    vocab = 512  # the tiny model's, which sim_token draws from
    future = FutureUses.of(workload, vocab, hashes_of, lambda rid, i: sim_token(rid, i, vocab))
    for index in range(len(played.requests)):
        request_id = played.request_id(index)
        position = future.position(request_id)
        assert position is not None, f"{request_id} was not foreseen"
        for block_hash in hashes_of(request_id, played.prompt_token_ids(index, vocab)):
            assert position in future.uses(block_hash), f"{request_id}: a block the oracle did not list"


@pytest.mark.parametrize(
    ("workload", "requests", "length_scale", "tier_blocks"),
    # Agentic sessions with a tier of the GPU pool's size: an inclusive tier holding what the
    # GPU holds lost to our lazy (exclusive) store there; the oracle is two levels since.
    [("chat", 60, 0.3, 160), ("multi-round-qa", 40, 0.4, 320), ("agentic", 24, 0.3, 160)],
)
def test_no_config_beats_the_oracle(
    workload: str, requests: int, length_scale: float, tier_blocks: int, offload_supported: None
) -> None:
    preset = replace(
        get_preset("h100-llama3-8b"),
        num_gpu_blocks=160,
        max_num_seqs=8,
        max_model_len=8192,
        cpu_bytes=tier_blocks * 16 * H100_LLAMA3_8B.kv_bytes_per_token,
    )
    trace = make_workload(workload, requests, 4.0, 0, length_scale=length_scale)
    from vllm_bidkv.patches.capabilities import probe

    # vLLM's own connector only where the simulator models its worker (test_sim_peers.py).
    peers = ("vllm-offloading",) if probe().vllm_version in PEER_RELEASES else ()
    records = []
    for name in ("oracle", "bidkv+offload", "bidkv+offload-lazy", *peers, "stock"):
        result = simulate(trace, CONFIGS[name], preset, H100_LLAMA3_8B)
        summary = summarize(
            name, 4.0, 0, 0, result.timings, result.counters, block_size=16, block_bytes=result.block_bytes
        )
        records.append({**vars(summary), "prefill_tokens_computed": result.prefill_tokens_computed})
    add_oracle_distance(records)
    for record in records:
        d = record["distance_to_oracle"]
        assert d["prefill_tokens"] >= 1 / TIE, f"{record['config']} computed less prefill than the oracle"
        assert d["throughput"] <= TIE, f"{record['config']} served more than the oracle"
        assert d["ttft_p99"] >= 1 / TIE, f"{record['config']} has a shorter TTFT tail than the oracle"
    by = {r["config"]: r for r in records}
    assert by["stock"]["distance_to_oracle"]["prefill_tokens"] > 1.5, "the tier must save work here"

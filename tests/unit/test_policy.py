"""vllm_bidkv.policy: candidates, δ, strategies, admission, counters — no vLLM."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from vllm_bidkv_bench.selection import run_selection_bench

from vllm_bidkv.config import ADMISSIONS, VICTIM_POLICIES, BidKVConfig
from vllm_bidkv.policy import (
    STRATEGIES,
    BidCostModel,
    Candidate,
    Decision,
    ScoredStrategy,
    VictimStrategy,
    admission_key,
    make_strategy,
)
from vllm_bidkv.policy.strategies import Bid01Strategy

CONFIG = BidKVConfig()
BLOCK = 16
NO_FACTS = Decision()
"""A decision with no requester and no known shortfall."""


def cand(order: int, computed: int = 256, **kw: Any) -> Candidate:
    """A private, fresh request holding exactly its computed tokens' blocks."""
    blocks = -(-computed // BLOCK)
    fields: dict[str, Any] = dict(
        request_id=f"r{order}",
        order=order,
        num_blocks=blocks,
        freeable_blocks=blocks,
        computed_tokens=computed,
        shared_tokens=0,
        cpu_tokens=0,
        offloadable_tokens=0,
        output_tokens=0,
        max_tokens=1024,
        num_preemptions=0,
    )
    fields.update(kw)
    return Candidate(**fields)


def choose(
    name: str, candidates: list[Candidate], config: BidKVConfig = CONFIG, decision: Decision = NO_FACTS
) -> str:
    chosen = make_strategy(name, config).choose(candidates, decision)
    assert chosen is not None
    return chosen.request_id


def preempt(
    strategy: VictimStrategy, candidates: list[Candidate], decision: Decision = NO_FACTS
) -> Candidate | None:
    """What the scheduler side does for one preemption: choose, then tell the strategy who
    was preempted (its pick, or vLLM's — the max ``order`` — when it abstained)."""
    chosen = strategy.choose(candidates, decision)
    strategy.preempted(chosen or max(candidates, key=lambda c: c.order))
    return chosen


# ---------------------------------------------------------------- registry


@pytest.mark.unit
def test_registry_matches_config_choices() -> None:
    assert set(STRATEGIES) == set(VICTIM_POLICIES)
    for name in VICTIM_POLICIES:
        assert make_strategy(name, CONFIG).name == name


@pytest.mark.unit
def test_unknown_strategy_names_it_and_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'lifo'") as err:
        make_strategy("lifo", CONFIG)
    for name in VICTIM_POLICIES:
        assert name in str(err.value)


@pytest.mark.unit
@pytest.mark.parametrize("name", VICTIM_POLICIES)
def test_empty_candidates_raise(name: str) -> None:
    with pytest.raises(ValueError, match="no preemptible candidates"):
        make_strategy(name, CONFIG).choose([], NO_FACTS)


@pytest.mark.unit
@pytest.mark.parametrize("name", [n for n in VICTIM_POLICIES if n != "random"])
def test_identical_candidates_go_to_the_newest(name: str) -> None:
    # Nothing to choose between: every strategy agrees with vLLM (max order), whatever the list order.
    candidates = [cand(2), cand(0), cand(3), cand(1)]
    assert choose(name, candidates) == "r3"


@pytest.mark.unit
@pytest.mark.parametrize("name", VICTIM_POLICIES)
def test_single_candidate_is_chosen(name: str) -> None:
    assert choose(name, [cand(7)]) == "r7"


# ---------------------------------------------------------------- baselines


@pytest.mark.unit
def test_vllm_default_is_max_order_whatever_else() -> None:
    candidates = [cand(0, computed=8000), cand(5, computed=16), cand(2, freeable_blocks=0)]
    assert choose("vllm-default", candidates) == "r5"


@pytest.mark.unit
def test_largest_first_most_blocks_then_computed_then_newest() -> None:
    assert choose("largest-first", [cand(0, computed=512), cand(1, computed=256)]) == "r0"
    # same blocks (33 each): more computed tokens wins
    assert choose("largest-first", [cand(0, computed=520), cand(1, computed=515)]) == "r0"
    # same blocks, same computed: newest
    assert choose("largest-first", [cand(1, computed=520), cand(0, computed=520)]) == "r1"


@pytest.mark.unit
def test_random_is_reproducible_with_a_seed_and_uniform_enough() -> None:
    candidates = [cand(i) for i in range(8)]
    picks = [[make_strategy("random", BidKVConfig(seed=s)) for _ in range(2)] for s in (1, 2)]
    runs = [
        [[preempt(st_, candidates).request_id for _ in range(400)] for st_ in pair]  # type: ignore[union-attr]
        for pair in picks
    ]
    assert runs[0][0] == runs[0][1]  # same seed, same sequence
    assert runs[1][0] == runs[1][1]
    assert runs[0][0] != runs[1][0]  # another seed, another sequence
    counts = {c.request_id: runs[0][0].count(c.request_id) for c in candidates}
    assert all(20 <= n <= 80 for n in counts.values()), counts  # 50 expected each


@pytest.mark.unit
def test_bidkv_01_formula_on_a_worked_example() -> None:
    s = Bid01Strategy()
    a = cand(0, computed=1000, output_tokens=256, max_tokens=512, num_preemptions=2)
    # completion 0.5: U = 1000 / (1 + 0.25 + 0.6 + 1e-6)
    assert s.key(a, NO_FACTS)[0] == pytest.approx(1000 / 1.850001, rel=1e-12)
    # unknown max_tokens -> 1024: completion 0.25, U = 512 / (1 + 0.125 + 1e-6)
    b = cand(1, computed=512, output_tokens=256, max_tokens=None)
    assert s.key(b, NO_FACTS)[0] == pytest.approx(512 / 1.125001, rel=1e-12)
    # completion is capped at 1
    c = cand(2, computed=100, output_tokens=4000, max_tokens=None)
    assert s.key(c, NO_FACTS)[0] == pytest.approx(100 / 1.500001, rel=1e-12)
    assert choose("bidkv-0.1", [a, b, c]) == "r0"


# ---------------------------------------------------------------- cost model and bidkv


@pytest.mark.unit
def test_cost_model_reads_the_config() -> None:
    cfg = BidKVConfig(
        bid_recompute_cost=2.0,
        bid_attention_cost=0.5,
        bid_load_cost=0.25,
        bid_progress_weight=3.0,
        bid_starvation_weight=7.0,
        bid_epsilon=1e-3,
    )
    assert BidCostModel.from_config(cfg) == BidCostModel(2.0, 0.5, 0.25, 3.0, 7.0, 1e-3)


@pytest.mark.unit
def test_delta_worked_example() -> None:
    m = BidCostModel(
        recompute_cost=1.0,
        attention_cost=0.01,
        load_cost=0.1,
        progress_weight=10.0,
        starvation_weight=100.0,
        epsilon=1e-6,
    )
    c = cand(
        0,
        computed=1000,
        shared_tokens=200,
        cpu_tokens=300,
        offloadable_tokens=100,
        output_tokens=50,
        max_tokens=200,
        num_preemptions=1,
        freeable_blocks=40,
    )
    recompute = 1.0 * 400 + 0.01 * (1000**2 - 600**2) / 2  # tail [600, 1000)
    expected = recompute + 0.1 * 400 + 10.0 * 0.25 + 100.0 * 1
    assert m.delta(c) == pytest.approx(expected)
    assert m.utility(c, None) == pytest.approx(40 / (expected + 1e-6))


@pytest.mark.unit
def test_delta_clamps_restorable_to_computed_and_handles_unknown_max_tokens() -> None:
    m = BidCostModel.from_config(CONFIG)
    over = cand(0, computed=100, shared_tokens=80, cpu_tokens=500, max_tokens=None, output_tokens=90)
    # 80 on GPU, only 20 loaded, nothing recomputed, no progress term without max_tokens
    assert m.delta(over) == pytest.approx(CONFIG.bid_load_cost * 20)
    nothing = cand(1, computed=0, freeable_blocks=3, num_blocks=3)
    assert m.delta(nothing) == 0.0
    assert math.isfinite(m.utility(nothing, None)) and m.utility(nothing, None) > 0


@pytest.mark.unit
def test_recompute_range_costs_more_at_the_tail() -> None:
    m = BidCostModel(1.0, 0.01, 0.0, 0.0, 0.0, 1e-6)
    assert m.recompute(5, 5) == 0.0
    assert m.recompute(0, 100) < m.recompute(900, 1000)
    assert m.recompute(0, 1000) == pytest.approx(m.recompute(0, 400) + m.recompute(400, 1000))
    flat = BidCostModel(1.0, 0.0, 0.0, 0.0, 0.0, 1e-6)
    assert flat.recompute(0, 100) == flat.recompute(900, 1000) == 100


@pytest.mark.unit
def test_bidkv_prefers_equal_tail_in_shorter_context() -> None:
    # Both free 16 blocks and lose 256 tokens of tail; the long one's tail sits after 3840 tokens
    # of GPU-shared prefix, so recomputing it attends to more context.
    cfg = BidKVConfig(bid_attention_cost=1e-3)
    short = cand(0, computed=256)
    long = cand(1, computed=4096, num_blocks=256, freeable_blocks=16, shared_tokens=3840)
    assert choose("bidkv", [short, long], cfg) == "r0"
    # without the length term they tie, and the tie goes to the newest
    assert choose("bidkv", [short, long], BidKVConfig(bid_attention_cost=0.0)) == "r1"


@pytest.mark.unit
def test_shared_prefix_request_is_avoided_by_bidkv_but_picked_by_largest_first() -> None:
    # r0 holds 128 blocks but 120 are a prefix shared with other requests: preempting it frees 8.
    shared = cand(0, computed=2048, freeable_blocks=8, shared_tokens=1920)
    private = cand(1, computed=1024)  # 64 blocks, all freed
    assert choose("largest-first", [shared, private]) == "r0"
    assert choose("bidkv-0.1", [shared, private]) == "r0"
    # Its loss is small too (the prefix comes back as a GPU hit), so per unit of loss it is close;
    # what tips it is that its 128-token tail is recomputed after 1920 tokens of context.
    assert choose("bidkv", [shared, private]) == "r1"
    # All blocks shared: preempting it frees nothing, U = 0.
    pinned = cand(0, computed=2048, freeable_blocks=0, shared_tokens=2048)
    assert BidCostModel.from_config(CONFIG).utility(pinned, None) == 0.0
    assert choose("largest-first", [pinned, private]) == "r0"
    assert choose("bidkv", [pinned, private]) == "r1"


@pytest.mark.unit
def test_bidkv_prefers_requests_already_in_the_cpu_tier() -> None:
    # Same size, same blocks freed; r0 is older (vLLM would not pick it) but the CPU tier holds
    # most of its KV, so bringing it back is a cheap load instead of a recompute.
    in_cpu = cand(0, computed=1024, cpu_tokens=768)
    cold = cand(1, computed=1024)
    m = BidCostModel.from_config(CONFIG)
    assert m.delta(in_cpu) < m.delta(cold)
    assert choose("bidkv", [in_cpu, cold]) == "r0"
    # offloadable tokens (parked before reuse) count the same way
    parked = cand(0, computed=1024, offloadable_tokens=768)
    assert m.delta(parked) == pytest.approx(m.delta(in_cpu))
    assert choose("bidkv", [parked, cold]) == "r0"


@pytest.mark.unit
def test_bidkv_progress_term_keeps_near_finished_requests() -> None:
    almost_done = cand(1, computed=1024, output_tokens=1000, max_tokens=1024)
    fresh = cand(0, computed=1024, output_tokens=10, max_tokens=1024)
    assert choose("vllm-default", [fresh, almost_done]) == "r1"
    assert choose("bidkv", [fresh, almost_done]) == "r0"
    # with the weight at 0 they tie and the newest goes
    assert choose("bidkv", [fresh, almost_done], BidKVConfig(bid_progress_weight=0.0)) == "r1"


@pytest.mark.unit
def test_bidkv_starvation_term_spares_repeat_victims() -> None:
    victim_before = cand(1, computed=512, num_preemptions=2)
    other = cand(0, computed=512)
    assert choose("bidkv", [other, victim_before]) == "r0"
    assert choose("bidkv", [other, victim_before], BidKVConfig(bid_starvation_weight=0.0)) == "r1"


@pytest.mark.unit
def test_bidkv_caps_r_at_the_shortfall() -> None:
    # big: 64 blocks, 960 of its 1024 tokens in the CPU tier (cheap to bring back per block);
    # small: 3 blocks, nothing restorable, 48 tokens to recompute.
    big = cand(0, computed=1024, cpu_tokens=960)
    small = cand(1, computed=48)
    m = BidCostModel.from_config(CONFIG)
    assert m.utility(big, None) > m.utility(small, None)  # uncapped: blocks per unit of loss
    assert choose("bidkv", [big, small]) == "r0"

    def need(n: int) -> Decision:
        return Decision(shortfall_blocks=n)

    # The requester lacks 1 (or 3) blocks: both cover it, so the cheaper to bring back goes.
    assert choose("bidkv", [big, small], decision=need(1)) == "r1"
    assert choose("bidkv", [big, small], decision=need(3)) == "r1"
    # 16 blocks: small covers 3 of them at 48 tokens' loss; big covers all 16 at ~196.
    assert choose("bidkv", [big, small], decision=need(16)) == "r0"
    assert m.utility(big, 16) == pytest.approx(16 / (m.delta(big) + CONFIG.bid_epsilon))


@pytest.mark.unit
def test_bidkv_capped_ties_go_to_the_newest() -> None:
    # Same loss, both cover the shortfall: equal bids although r0 frees 4x the blocks.
    a = cand(0, computed=256)
    b = cand(1, computed=256, num_blocks=4, freeable_blocks=4)
    need = Decision(shortfall_blocks=2)
    assert choose("bidkv", [a, b], decision=need) == "r1"
    assert choose("bidkv", [b, a], decision=need) == "r1"  # by order, not by list position


# ---------------------------------------------------------------- property


@st.composite
def candidate_lists(draw: st.DrawFn) -> list[Candidate]:
    n = draw(st.integers(1, 12))
    orders = draw(st.permutations(range(n)))
    out = []
    for order in orders:
        computed = draw(st.integers(0, 20000))
        blocks = draw(st.integers(0, 2000))
        out.append(
            Candidate(
                request_id=f"r{order}",
                order=order,
                num_blocks=blocks,
                freeable_blocks=draw(st.integers(0, blocks)),
                computed_tokens=computed,
                shared_tokens=draw(st.integers(0, 20000)),
                cpu_tokens=draw(st.integers(0, 20000)),
                offloadable_tokens=draw(st.integers(0, 20000)),
                output_tokens=draw(st.integers(0, 5000)),
                max_tokens=draw(st.none() | st.integers(1, 5000)),
                num_preemptions=draw(st.integers(0, 5)),
            )
        )
    return out


@pytest.mark.unit
@given(candidate_lists(), st.integers(0, 2**31), st.none() | st.integers(1, 64))
def test_property_choices(candidates: list[Candidate], seed: int, shortfall: int | None) -> None:
    cfg = BidKVConfig(seed=seed)
    decision = Decision(shortfall_blocks=shortfall)
    for name in VICTIM_POLICIES:
        assert make_strategy(name, cfg).choose(candidates, decision) in candidates
    default = make_strategy("vllm-default", cfg).choose(candidates, decision)
    assert default is not None and default.order == len(candidates) - 1
    model = BidCostModel.from_config(cfg)
    chosen = make_strategy("bidkv", cfg).choose(candidates, decision)
    assert chosen is not None
    best = max(model.utility(c, shortfall) for c in candidates)
    assert model.utility(chosen, shortfall) == best
    assert chosen.order == max(c.order for c in candidates if model.utility(c, shortfall) == best)
    assert all(model.delta(c) >= 0 for c in candidates)
    if shortfall is not None:
        assert all(
            model.utility(c, shortfall) <= shortfall / (model.delta(c) + model.epsilon) for c in candidates
        )


@pytest.mark.unit
@given(st.lists(candidate_lists(), min_size=1, max_size=6), st.integers(0, 2**31))
def test_property_choose_changes_nothing_until_a_preemption(
    decisions: list[list[Candidate]], seed: int
) -> None:
    """A pick may be priced and not taken (vLLM waits for a store's blocks instead): asking
    again, any number of times, gives the same answer, and a strategy asked in between picks
    what one never asked picks (random's draw, bidkv-0.2's counts move only on ``preempted``)."""
    cfg = BidKVConfig(seed=seed)
    for name in VICTIM_POLICIES:
        asked, fresh = make_strategy(name, cfg), make_strategy(name, cfg)
        for candidates in decisions:
            first = asked.choose(candidates, NO_FACTS)
            assert all(asked.choose(candidates, NO_FACTS) is first for _ in range(3)), name
            assert preempt(fresh, candidates) is first, name
            asked.preempted(first or max(candidates, key=lambda c: c.order))


@pytest.mark.unit
@given(candidate_lists())
def test_property_with_nothing_restorable_a_capped_bid_is_lcf(candidates: list[Candidate]) -> None:
    """No shared, CPU or offloadable tokens, no progress or starvation term, and every candidate
    covers the shortfall: δ grows with computed tokens only, so bidkv picks what lcf picks."""
    cfg = BidKVConfig(bid_progress_weight=0.0, bid_starvation_weight=0.0)
    plain = [
        c._replace(
            shared_tokens=0,
            cpu_tokens=0,
            offloadable_tokens=0,
            num_blocks=max(c.num_blocks, 1),
            freeable_blocks=max(c.num_blocks, 1),
        )
        for c in candidates
    ]
    need = Decision(shortfall_blocks=1)
    assert choose("bidkv", plain, cfg, need) == choose("lcf", plain, cfg, need)


@pytest.mark.unit
@given(candidate_lists(), st.none() | st.integers(1, 64))
def test_property_scored_strategies_choose_the_max_of_their_key(
    candidates: list[Candidate], shortfall: int | None
) -> None:
    """One key per strategy: what it reports of a candidate is what it ranks by, ties to the newest."""
    decision = Decision(shortfall_blocks=shortfall)
    for name in VICTIM_POLICIES:
        s = make_strategy(name, CONFIG)
        if not isinstance(s, ScoredStrategy):
            continue
        chosen = s.choose(candidates, decision)
        best = max(s.key(c, decision) for c in candidates)
        assert s.key(chosen, decision) == best, name
        assert chosen.order == max(c.order for c in candidates if s.key(c, decision) == best), name


@pytest.mark.unit
def test_only_random_and_the_abstaining_bidkv_02_are_not_one_key() -> None:
    unscored = {n for n in VICTIM_POLICIES if not isinstance(make_strategy(n, CONFIG), ScoredStrategy)}
    assert unscored == {"random", "bidkv-0.2"}


@pytest.mark.unit
def test_decision_rejects_a_shortfall_below_one_and_finds_its_requester() -> None:
    with pytest.raises(ValueError, match="shortfall_blocks"):
        Decision("r0", 0)
    candidates = [cand(0), cand(1)]
    assert Decision("r1", 2).requester(candidates) is candidates[1]
    assert Decision("r9").requester(candidates) is None  # not preemptible now
    assert NO_FACTS.requester(candidates) is None


# ---------------------------------------------------------------- admission


@dataclasses.dataclass
class Req:
    request_id: str
    num_prompt_tokens: int
    arrival_time: float


@pytest.mark.unit
def test_admission_keys() -> None:
    assert admission_key("fcfs") is None
    key = admission_key("sjf")
    assert key is not None
    waiting = [Req("c", 300, 1.0), Req("b", 50, 3.0), Req("a", 50, 2.0), Req("z", 50, 2.0)]
    assert [r.request_id for r in sorted(waiting, key=key)] == ["a", "z", "b", "c"]  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'srpt'") as err:
        admission_key("srpt")
    assert all(name in str(err.value) for name in ADMISSIONS)


# ---------------------------------------------------------------- packaging and bench


@pytest.mark.unit
def test_policy_imports_without_vllm() -> None:
    code = (
        "import sys, pkgutil, importlib\n"
        "sys.modules['vllm'] = None  # any vllm import now raises ImportError\n"
        "import vllm_bidkv.policy as p\n"
        "for m in pkgutil.iter_modules(p.__path__): importlib.import_module('vllm_bidkv.policy.' + m.name)\n"
        "assert not [m for m in sys.modules if m.startswith('vllm.')], 'vllm submodule imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.unit
def test_selection_bench_smoke(tmp_path: Any) -> None:
    path = tmp_path / "select.json"
    result = run_selection_bench(str(path), sizes=(8, 64), repeats=3)
    assert json.loads(path.read_text()) == result
    assert set(result["strategies"]) == set(VICTIM_POLICIES)
    for s in result["strategies"].values():
        assert s["n"] == [8, 64] and len(s["median_us"]) == 2 and all(t > 0 for t in s["per_candidate_ns"])

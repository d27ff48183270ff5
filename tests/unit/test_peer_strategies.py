"""Other projects' published victim rules: lcf, reclaim-score, remaining-output, bidkv-0.2."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_policy import CONFIG, NO_FACTS, cand, candidate_lists, choose, preempt
from vllm_bidkv.config import VICTIM_POLICIES
from vllm_bidkv.policy import STRATEGIES, Candidate, Decision, make_strategy
from vllm_bidkv.policy.strategies import (
    Bid01Strategy,
    Bid02Strategy,
    LcfStrategy,
    ReclaimScoreStrategy,
    RemainingOutputStrategy,
)

pytestmark = pytest.mark.unit

PEERS = ("lcf", "reclaim-score", "remaining-output", "bidkv-0.2")


def test_peers_are_registered_and_configurable() -> None:
    for name in PEERS:
        assert name in STRATEGIES and name in VICTIM_POLICIES
        assert make_strategy(name, CONFIG).name == name


@pytest.mark.parametrize("name", PEERS)
def test_empty_list_raises(name: str) -> None:
    with pytest.raises(ValueError, match="no preemptible candidates"):
        make_strategy(name, CONFIG).choose([], NO_FACTS)


# ---------------------------------------------------------------- lcf


def test_lcf_picks_least_computed_and_ties_go_to_the_newest() -> None:
    candidates = [cand(0, computed=300), cand(1, computed=40), cand(2, computed=900), cand(3, computed=40)]
    assert choose("lcf", candidates) == "r3"
    assert choose("lcf", candidates[:3]) == "r1"
    # Largest-first and LCF disagree on the same list: LCF is its opposite.
    assert choose("largest-first", candidates) == "r2"
    assert LcfStrategy().key(candidates[1], NO_FACTS) > LcfStrategy().key(candidates[0], NO_FACTS)


@given(candidate_lists())
def test_lcf_property_pick_has_min_computed_and_max_order_among_ties(candidates: list[Candidate]) -> None:
    chosen = LcfStrategy().choose(candidates, NO_FACTS)
    least = min(c.computed_tokens for c in candidates)
    assert chosen.computed_tokens == least
    assert chosen.order == max(c.order for c in candidates if c.computed_tokens == least)


# ---------------------------------------------------------------- reclaim-score


def test_reclaim_score_formula_on_a_worked_example() -> None:
    s = ReclaimScoreStrategy()
    # S = 10 / 200 · (1 − 50 / 100) = 0.025
    a = cand(0, computed=200, freeable_blocks=10, output_tokens=50, max_tokens=100)
    assert s.key(a, NO_FACTS)[0] == pytest.approx(0.025, rel=1e-12)
    # unknown max_tokens: no discount, S = 10 / 200
    b = cand(1, computed=200, freeable_blocks=10, output_tokens=50, max_tokens=None)
    assert s.key(b, NO_FACTS)[0] == pytest.approx(0.05, rel=1e-12)
    # nothing computed: T clamps to 1; S = 3 · (1 − 0)
    c = cand(2, computed=0, freeable_blocks=3, num_blocks=3, output_tokens=0, max_tokens=8)
    assert s.key(c, NO_FACTS)[0] == pytest.approx(3.0, rel=1e-12)
    # progress past the budget clamps the factor at 0 (never negative)
    d = cand(3, computed=64, freeable_blocks=4, output_tokens=30, max_tokens=10)
    assert s.key(d, NO_FACTS)[0] == 0.0
    assert choose("reclaim-score", [a, b, c, d]) == "r2"
    assert choose("reclaim-score", [a, b, d]) == "r1"


def test_reclaim_score_prefers_blocks_per_token_not_blocks() -> None:
    # A big request on a shared prefix frees little per computed token.
    big_shared = cand(0, computed=1600, freeable_blocks=10)  # 100 blocks held, 10 freeable
    small_private = cand(1, computed=160, freeable_blocks=10)
    assert choose("reclaim-score", [small_private, big_shared]) == "r1"
    assert choose("largest-first", [small_private, big_shared]) == "r0"


def test_reclaim_score_ties_go_to_the_newest() -> None:
    # Same S from different fields: 8/160·(1−0) = 4/80·(1−0) = 0.05.
    a = cand(5, computed=160, freeable_blocks=8)
    b = cand(2, computed=80, freeable_blocks=4)
    c = cand(9, computed=160, freeable_blocks=8, output_tokens=512, max_tokens=1024)  # S = 0.025
    assert ReclaimScoreStrategy().key(a, NO_FACTS) == ReclaimScoreStrategy().key(b, NO_FACTS)
    assert choose("reclaim-score", [b, c, a]) == "r5"


@given(candidate_lists())
def test_reclaim_score_property_pick_maximises_s(candidates: list[Candidate]) -> None:
    s = ReclaimScoreStrategy()
    chosen = s.choose(candidates, NO_FACTS)
    best = max(s.key(c, NO_FACTS) for c in candidates)
    assert s.key(chosen, NO_FACTS) == best and best[0] >= 0.0
    assert chosen.order == max(c.order for c in candidates if s.key(c, NO_FACTS) == best)


# ---------------------------------------------------------------- remaining-output


def test_remaining_output_picks_largest_remaining_budget() -> None:
    s = RemainingOutputStrategy()
    a = cand(0, output_tokens=10, max_tokens=100)  # 90 left
    b = cand(1, output_tokens=0, max_tokens=64)  # 64 left
    c = cand(2, output_tokens=500, max_tokens=600)  # 100 left
    assert [s.key(x, NO_FACTS)[0] for x in (a, b, c)] == [90.0, 64.0, 100.0]
    assert choose("remaining-output", [a, b, c]) == "r2"
    assert choose("remaining-output", [a, b]) == "r0"


def test_remaining_output_unknown_budget_uses_the_1024_fallback() -> None:
    s = RemainingOutputStrategy()
    unknown = cand(0, output_tokens=24, max_tokens=None)
    assert s.key(unknown, NO_FACTS)[0] == 1000.0
    assert choose("remaining-output", [unknown, cand(1, output_tokens=0, max_tokens=999)]) == "r0"
    assert choose("remaining-output", [unknown, cand(1, output_tokens=0, max_tokens=1001)]) == "r1"
    # past the fallback budget: remaining clamps to 0
    assert s.key(cand(2, output_tokens=2000, max_tokens=None), NO_FACTS)[0] == 0.0


def test_remaining_output_ties_go_to_the_newest() -> None:
    a = cand(3, output_tokens=0, max_tokens=50)
    b = cand(7, output_tokens=50, max_tokens=100)
    c = cand(1, output_tokens=0, max_tokens=10)
    assert choose("remaining-output", [b, a, c]) == "r7"


@given(candidate_lists())
def test_remaining_output_property(candidates: list[Candidate]) -> None:
    s = RemainingOutputStrategy()
    chosen = s.choose(candidates, NO_FACTS)
    best = max(s.key(c, NO_FACTS) for c in candidates)
    assert s.key(chosen, NO_FACTS) == best
    assert chosen.order == max(c.order for c in candidates if s.key(c, NO_FACTS) == best)
    known = chosen.max_tokens if chosen.max_tokens is not None else 1024
    assert s.key(chosen, NO_FACTS)[0] == max(0, known - chosen.output_tokens)


# ---------------------------------------------------------------- bidkv-0.2


def test_bidkv_02_without_guards_is_bidkv_01() -> None:
    candidates = [
        cand(0, computed=1000, output_tokens=256, max_tokens=512, num_preemptions=2),
        cand(1, computed=512, output_tokens=256, max_tokens=None),
        cand(2, computed=100),
    ]
    s = Bid02Strategy()
    assert s.key(candidates[0], NO_FACTS) == Bid01Strategy().key(candidates[0], NO_FACTS)
    assert preempt(s, candidates) is candidates[0] and s.last_guard is None
    assert choose("bidkv-0.1", candidates) == "r0"
    # lifetime num_preemptions (2 here) is U's business, not the liveness guard's
    assert s.preempted_this_epoch("r0") == 1


def test_bidkv_02_ties_go_to_the_newest() -> None:
    assert choose("bidkv-0.2", [cand(4), cand(9), cand(1)]) == "r9"


def test_bidkv_02_liveness_guard_abstains_on_the_third_pick_in_an_epoch() -> None:
    s = Bid02Strategy()
    big, small = cand(0, computed=2048), cand(1, computed=64)
    assert preempt(s, [big, small]) is big
    # a pick not taken (vLLM waited instead) counts nothing
    assert s.choose([big, small], NO_FACTS) is big and s.preempted_this_epoch("r0") == 1
    assert preempt(s, [big, small]) is big
    assert s.preempted_this_epoch("r0") == 2
    assert preempt(s, [big, small]) is None and s.last_guard == "liveness"
    # abstaining counts vLLM's victim (max order), not the top pick
    assert s.preempted_this_epoch("r0") == 2 and s.preempted_this_epoch("r1") == 1
    # another top pick is unaffected
    other = cand(2, computed=4096)
    assert preempt(s, [big, small, other]) is other and s.last_guard is None


def test_bidkv_02_liveness_counts_reset_when_the_epoch_ends() -> None:
    s = Bid02Strategy()
    big, small = cand(0, computed=2048), cand(1, computed=64)
    picks = [preempt(s, [big, small]) for _ in range(Bid02Strategy.EPOCH_DECISIONS)]
    assert picks[:3] == [big, big, None] and all(p is None for p in picks[2:])
    assert s.preempted_this_epoch("r1") == Bid02Strategy.EPOCH_DECISIONS - 2
    # preemption 33 opens a new epoch: big is picked again
    assert preempt(s, [big, small]) is big and s.preempted_this_epoch("r1") == 0
    # fresh instances share nothing
    assert Bid02Strategy().choose([big, small], NO_FACTS) is big


def test_bidkv_02_cascade_guard_fires_within_125_percent() -> None:
    top = cand(1, computed=4096, freeable_blocks=100, num_blocks=256)
    for requester_frees, abstains in ((80, True), (79, False), (100, True), (0, False)):
        requester = cand(0, computed=64, freeable_blocks=requester_frees, num_blocks=200)
        s = Bid02Strategy()
        assert s.choose([requester, top], Decision("r0")) == (None if abstains else top), requester_frees
        assert s.last_guard == ("cascade" if abstains else None)


def test_bidkv_02_cascade_guard_fires_when_the_requester_is_the_top_pick() -> None:
    requester = cand(1, computed=4096)
    other = cand(0, computed=64)
    s = Bid02Strategy()
    assert s.choose([other, requester], Decision("r1")) is None and s.last_guard == "cascade"
    # without the requester named the same list is not guarded
    unguarded = Bid02Strategy().choose([other, requester], NO_FACTS)
    assert unguarded is not None and unguarded.order == 1


def test_bidkv_02_cascade_guard_needs_the_requester_among_candidates() -> None:
    # same sizes as a firing case, but nobody is the requester
    a = cand(0, computed=64, freeable_blocks=90, num_blocks=90)
    top = cand(1, computed=4096, freeable_blocks=100, num_blocks=256)
    assert Bid02Strategy().choose([a, top], NO_FACTS) is top
    assert Bid02Strategy().choose([a, top], Decision("r9")) is top  # named, but not preemptible now
    assert Bid02Strategy().choose([a, top], Decision("r0")) is None


@given(candidate_lists(), st.data())
def test_bidkv_02_property_returns_bidkv_01_pick_or_abstains_by_a_guard(
    candidates: list[Candidate], data: st.DataObject
) -> None:
    requester = data.draw(st.none() | st.sampled_from(candidates))
    shortfall = data.draw(st.none() | st.integers(1, 64))  # bidkv-0.2 does not read it
    decision = Decision(None if requester is None else requester.request_id, shortfall)
    top = Bid01Strategy().choose(candidates, decision)
    s = Bid02Strategy()
    chosen = s.choose(candidates, decision)  # a fresh strategy: only the cascade guard can fire
    cascade = requester is not None and top.freeable_blocks <= 1.25 * requester.freeable_blocks
    assert chosen == (None if cascade else top)
    assert s.last_guard == ("cascade" if cascade else None)

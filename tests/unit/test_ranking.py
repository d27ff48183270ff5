"""``policy.ranking.best_by_bounded_key``: a victim priced in part picks what whole pricing picks.

At a failed allocation every preemptible request is priced without its restorable run
(``lookup.held_candidate``); the run is read only for candidates whose ``key_bound`` may
still win. These properties hold for every ``ScoredStrategy`` and any cost constants,
including a load dearer than the recompute it saves (δ then is least at either end).
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.policy import STRATEGIES, Candidate, Decision, ScoredStrategy
from vllm_bidkv.policy.ranking import best_by_bounded_key, best_by_key

BLOCK = 16
SCORED = [name for name, make in STRATEGIES.items() if isinstance(make(BidKVConfig()), ScoredStrategy)]


@st.composite
def held_and_whole(draw: Any) -> tuple[list[Candidate], dict[str, Candidate]]:
    """Candidates as ``held_candidate`` builds them, and each one's whole form (a restorable
    run of any length the invariants of ``Candidate`` allow)."""
    held, whole = [], {}
    for order in range(draw(st.integers(1, 12))):
        blocks = draw(st.integers(0, 40))
        computed = draw(st.integers(0, blocks * BLOCK))
        shared_blocks = draw(st.integers(0, blocks))
        max_tokens = draw(st.one_of(st.none(), st.integers(1, 2048)))
        c = Candidate(
            request_id=f"r{order}",
            order=order,
            num_blocks=blocks,
            freeable_blocks=draw(st.integers(0, blocks - shared_blocks)),
            computed_tokens=computed,
            shared_tokens=min(computed, shared_blocks * BLOCK),
            cpu_tokens=0,
            offloadable_tokens=0,
            output_tokens=draw(st.integers(0, max_tokens or 2048)),
            max_tokens=max_tokens,
            num_preemptions=draw(st.integers(0, 4)),
        )
        rest = computed - c.shared_tokens
        cpu = draw(st.integers(0, rest))
        held.append(c)
        whole[c.request_id] = c._replace(cpu_tokens=cpu, offloadable_tokens=draw(st.integers(0, rest - cpu)))
    return held, whole


costs = st.fixed_dictionaries(
    {
        "bid_recompute_cost": st.floats(0.0, 4.0),
        "bid_attention_cost": st.sampled_from([0.0, 3.3e-5, 1e-3]),
        "bid_load_cost": st.floats(0.0, 8.0),
        "bid_progress_weight": st.sampled_from([0.0, 64.0]),
        "bid_starvation_weight": st.sampled_from([0.0, 256.0]),
    }
)


@pytest.mark.unit
@pytest.mark.parametrize("name", SCORED)
@settings(max_examples=150, deadline=None)
@given(candidates=held_and_whole(), constants=costs, shortfall=st.one_of(st.none(), st.integers(1, 8)))
def test_pricing_in_part_picks_what_pricing_whole_picks(
    name: str,
    candidates: tuple[list[Candidate], dict[str, Candidate]],
    constants: dict[str, float],
    shortfall: int | None,
) -> None:
    held, whole = candidates
    strategy = STRATEGIES[name](BidKVConfig(**constants))
    assert isinstance(strategy, ScoredStrategy)
    decision = Decision("r0", shortfall)
    for c in held:  # the bound is a bound, whatever the run turns out to be
        assert strategy.key_bound(c, decision) >= strategy.key(whole[c.request_id], decision), c
    made: list[str] = []

    def make_whole(c: Candidate) -> Candidate:
        made.append(c.request_id)
        return whole[c.request_id]

    picked = best_by_bounded_key(held, decision, strategy.key, strategy.key_bound, make_whole)
    assert picked == best_by_key(list(whole.values()), decision, strategy.key)
    assert len(made) == len(set(made)), "a candidate made whole twice"


@pytest.mark.unit
def test_the_bid_reads_the_restorable_run_only_of_candidates_that_may_win() -> None:
    """Five requests, everything restorable: the cheapest to bring back (least computed) wins,
    and the bound, which is then exact, rules out every other before its run is read."""
    strategy = STRATEGIES["bidkv"](BidKVConfig())
    held = [Candidate(f"r{i}", i, 8, 8, 128 * (i + 1), 0, 0, 0, 0, 1024, 0) for i in range(5)]
    made: list[str] = []

    def make_whole(c: Candidate) -> Candidate:
        made.append(c.request_id)
        return c._replace(cpu_tokens=c.computed_tokens)

    picked = best_by_bounded_key(held, Decision("r4", 2), strategy.key, strategy.key_bound, make_whole)
    assert picked.request_id == "r0" and made == ["r0"]
    with pytest.raises(ValueError, match="no preemptible candidates"):
        best_by_bounded_key([], Decision(), strategy.key, strategy.key_bound, make_whole)

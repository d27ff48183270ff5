"""Victim strategies: given the preemptible candidates of one decision, which one vLLM preempts.

Every strategy except ``random`` is one key (``ScoredStrategy.key``): the candidate
with the max key is preempted, found by ``best_by_key`` in one O(n) pass (no sort:
the hook runs inside vLLM's allocation retry loop). Equal keys go to the newest
candidate (max ``order``), so when there is nothing to choose between, every strategy
picks vLLM's own victim. An empty candidate list raises ``ValueError``: the hook only
asks when vLLM has something to preempt. A strategy may abstain (``choose`` returns
None): vLLM's own victim stands; only ``bidkv-0.2`` does.

``choose`` changes nothing: a pick may be priced and not taken (vLLM waits for a store's
blocks instead). What a strategy remembers (``random``'s draw, ``bidkv-0.2``'s counts) moves
on only in ``preempted``, told the request that was preempted.

Published rules of other projects are here as baselines: ``lcf``,
``reclaim-score``, ``remaining-output`` and ``bidkv-0.2``.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Protocol

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.policy.candidate import Candidate, Decision
from vllm_bidkv.policy.cost import BidCostModel
from vllm_bidkv.policy.ranking import Key, best_by_key


class VictimStrategy(Protocol):
    """Chooses the victim among the candidates of one decision."""

    name: str

    def choose(self, candidates: Sequence[Candidate], decision: Decision) -> Candidate | None:
        """One member of ``candidates``, or None to abstain: vLLM's own victim stands (the
        candidate with the max ``order``). ``ValueError`` if ``candidates`` is empty.
        Changes nothing: the same call gives the same answer until ``preempted``."""
        ...

    def preempted(self, victim: Candidate) -> None:
        """``victim`` was preempted: the pick of the last ``choose``, or vLLM's if it abstained."""
        ...


class ScoredStrategy(ABC):
    """A strategy that is one key: ``choose`` is the max of ``key`` (``best_by_key``).

    The key is stated once so what ranks the candidates and what a report shows of that
    ranking cannot disagree.
    """

    name: str

    @abstractmethod
    def key(self, c: Candidate, decision: Decision) -> Key:
        """``c``'s rank in ``decision``; higher = preempted first, ``order`` breaks ties."""

    def key_bound(self, c: Candidate, decision: Decision) -> Key:
        """At least ``key`` of ``c`` with any restorable run (``cpu_tokens``,
        ``offloadable_tokens``), from ``c`` without one (``best_by_bounded_key``). The key
        itself where it does not read the run: every strategy's but ``bidkv``'s."""
        return self.key(c, decision)

    def choose(self, candidates: Sequence[Candidate], decision: Decision) -> Candidate:
        return best_by_key(candidates, decision, self.key)

    def preempted(self, victim: Candidate) -> None:
        """A key remembers nothing."""
        return None


class VllmDefaultStrategy(ScoredStrategy):
    """Exactly vLLM's FCFS victim: the last of the running list (max ``order``).

    The key is empty: every candidate ties, and ties go to the newest.
    """

    name = "vllm-default"

    def key(self, c: Candidate, decision: Decision) -> Key:
        return ()


class RandomStrategy:
    """Uniform among the candidates, from its own generator: same seed, same sequence of picks.

    One draw per preemption, taken when it happens: a pick priced and not taken (vLLM
    waited instead) leaves the next preemption the same draw.
    """

    name = "random"

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._draw = self._rng.random()  # in [0, 1): the next preemption's

    def choose(self, candidates: Sequence[Candidate], decision: Decision) -> Candidate:
        if not candidates:
            raise ValueError("no preemptible candidates to choose a victim from")
        return candidates[int(self._draw * len(candidates))]

    def preempted(self, victim: Candidate) -> None:
        self._draw = self._rng.random()


class LargestFirstStrategy(ScoredStrategy):
    """Most GPU blocks held; ties by computed tokens, then the newest.

    Counts held blocks, not freed ones: a request on a big shared prefix looks large
    here although preempting it frees little (the baseline ``bidkv`` improves on).
    """

    name = "largest-first"

    def key(self, c: Candidate, decision: Decision) -> Key:
        return (c.num_blocks, c.computed_tokens)


class BidStrategy(ScoredStrategy):
    """Ours: max U = min(freeable_blocks, shortfall_blocks) / (δ + ε), δ from ``BidCostModel``
    (see cost.py), the shortfall from the decision; ties to the newest."""

    name = "bidkv"

    def __init__(self, cost: BidCostModel) -> None:
        self.cost = cost

    def key(self, c: Candidate, decision: Decision) -> Key:
        return (self.cost.utility(c, decision.shortfall_blocks),)

    def key_bound(self, c: Candidate, decision: Decision) -> Key:
        return (self.cost.utility_bound(c, decision.shortfall_blocks),)


class Bid01Strategy(ScoredStrategy):
    """bidkv 0.1.0's published rule (the bidkv package on PyPI), as a baseline.

    U = computed_tokens / (1 + 0.5·completion + 0.3·num_preemptions + ε), ε = 1e-6,
    completion = output_tokens / max_tokens clamped to 1, with max_tokens = 1024 when
    unknown. Unlike 0.1.0 (oldest arrival first), ties go to the newest, like every
    strategy here.
    """

    name = "bidkv-0.1"
    COMPLETION_WEIGHT = 0.5
    PREEMPTION_WEIGHT = 0.3
    EPSILON = 1e-6
    FALLBACK_MAX_TOKENS = 1024

    def key(self, c: Candidate, decision: Decision) -> Key:
        completion = min(1.0, c.output_tokens / (c.max_tokens or self.FALLBACK_MAX_TOKENS))
        delta = 1.0 + self.COMPLETION_WEIGHT * completion + self.PREEMPTION_WEIGHT * c.num_preemptions
        return (c.computed_tokens / (delta + self.EPSILON),)


class LcfStrategy(ScoredStrategy):
    """Least computed tokens first: min ``computed_tokens`` (key ``-computed_tokens``); ties
    to the newest.

    Upstream vLLM RFC #54644 (least-computed-first is the best order under recompute)
    and PR #53723 (``--preemption-victim lcf``).
    """

    name = "lcf"

    def key(self, c: Candidate, decision: Decision) -> Key:
        return (-c.computed_tokens,)


class ReclaimScoreStrategy(ScoredStrategy):
    """Upstream vLLM PR #56897: max S = B / max(1, T) · (1 − O / max(1, M)); ties to the newest.

    B = ``freeable_blocks`` (the reclaimable blocks), T = ``computed_tokens``,
    O = ``output_tokens``, M = ``max_tokens``: reclaimable blocks per computed token,
    discounted by output progress. When M is unknown (None) there is no progress to
    discount by: the factor is 1. The progress O / max(1, M) is clamped to 1, so the
    factor stays in [0, 1] (O <= M for every real request; the clamp only matters for
    hand-built candidates).
    """

    name = "reclaim-score"

    def key(self, c: Candidate, decision: Decision) -> Key:
        per_token = c.freeable_blocks / max(1, c.computed_tokens)
        if c.max_tokens is None:
            return (per_token,)
        return (per_token * (1.0 - min(1.0, c.output_tokens / max(1, c.max_tokens))),)


class RemainingOutputStrategy(ScoredStrategy):
    """vllm-hust-dla 0.1.0: largest expected remaining output; ties to the newest.

    dla uses a learned prediction where it has one, else max_tokens − output_tokens;
    we have no predictor, so remaining = max(0, max_tokens − output_tokens). With
    max_tokens unknown (None) we use bidkv 0.1.0's fallback budget,
    ``FALLBACK_MAX_TOKENS`` = 1024 (the same constant as ``bidkv-0.1``).
    """

    name = "remaining-output"
    FALLBACK_MAX_TOKENS = Bid01Strategy.FALLBACK_MAX_TOKENS

    def key(self, c: Candidate, decision: Decision) -> Key:
        budget = self.FALLBACK_MAX_TOKENS if c.max_tokens is None else c.max_tokens
        return (max(0, budget - c.output_tokens),)


class Bid02Strategy:
    """vllm-hust-bidkv 0.2.1: ``bidkv-0.1``'s U unchanged, with two guards that abstain.

    The top pick is ``bidkv-0.1``'s choice (max U, ties to the newest; ``key`` is
    ``bidkv-0.1``'s). It is returned unless a guard fires; then ``choose`` returns None
    and vLLM's own victim stands.

    * Liveness guard: abstain if the top pick was already preempted ``LIVENESS_LIMIT``
      (2) or more times this epoch. An *epoch* is ``EPOCH_DECISIONS`` (32) consecutive
      preemptions heard by this strategy instance (``preempted``; our choice: 0.2.1's
      epoch length is not published); the counts are cleared when the next one begins,
      which also bounds them to at most 32 request ids. Each counts one preemption of the
      request preempted: the strategy's pick, or on abstaining vLLM's (the max ``order``).
      ``Candidate.num_preemptions`` (the lifetime count) is not used for this: it is
      already in U's δ.
    * Cascade guard: abstain if the requester (``Decision.requester_id``, the request
      whose allocation failed) would free within ``CASCADE_RATIO`` (1.25×) of the top
      pick, i.e. top.freeable_blocks <= 1.25 · requester.freeable_blocks: preempting
      the top pick gains little over the requester giving way. This includes the top
      pick being the requester itself (0.1.0's requester-preempts-itself cascade). If
      the requester is not among the candidates the guard does not fire.

    ``last_guard`` names the guard that fired in the last ``choose`` (``"liveness"``,
    ``"cascade"``) or is None when it returned its top pick.
    """

    name = "bidkv-0.2"
    LIVENESS_LIMIT = 2
    EPOCH_DECISIONS = 32
    CASCADE_RATIO = 1.25

    def __init__(self) -> None:
        self._bid01 = Bid01Strategy()
        self._preempted: dict[str, int] = {}
        self._decisions = 0  # preemptions counted in this epoch
        self.last_guard: str | None = None

    def key(self, c: Candidate, decision: Decision) -> Key:
        """``bidkv-0.1``'s key: the guards decide whether to abstain, not the rank."""
        return self._bid01.key(c, decision)

    def preempted_this_epoch(self, request_id: str) -> int:
        """Preemptions of ``request_id`` counted in the current epoch."""
        return self._preempted.get(request_id, 0)

    def choose(self, candidates: Sequence[Candidate], decision: Decision) -> Candidate | None:
        top = self._bid01.choose(candidates, decision)  # ValueError when empty
        # A full epoch is over: the preemption this decides opens the next, with no counts.
        counted = 0 if self._decisions == self.EPOCH_DECISIONS else self.preempted_this_epoch(top.request_id)
        requester = decision.requester(candidates)
        if counted >= self.LIVENESS_LIMIT:
            self.last_guard = "liveness"
        elif requester is not None and top.freeable_blocks <= self.CASCADE_RATIO * requester.freeable_blocks:
            self.last_guard = "cascade"
        else:
            self.last_guard = None
        return top if self.last_guard is None else None

    def preempted(self, victim: Candidate) -> None:
        if self._decisions == self.EPOCH_DECISIONS:
            self._preempted.clear()
            self._decisions = 0
        self._decisions += 1
        self._preempted[victim.request_id] = self.preempted_this_epoch(victim.request_id) + 1


STRATEGIES: dict[str, Callable[[BidKVConfig], VictimStrategy]] = {
    VllmDefaultStrategy.name: lambda config: VllmDefaultStrategy(),
    RandomStrategy.name: lambda config: RandomStrategy(config.seed),
    LargestFirstStrategy.name: lambda config: LargestFirstStrategy(),
    BidStrategy.name: lambda config: BidStrategy(BidCostModel.from_config(config)),
    Bid01Strategy.name: lambda config: Bid01Strategy(),
    LcfStrategy.name: lambda config: LcfStrategy(),
    ReclaimScoreStrategy.name: lambda config: ReclaimScoreStrategy(),
    RemainingOutputStrategy.name: lambda config: RemainingOutputStrategy(),
    Bid02Strategy.name: lambda config: Bid02Strategy(),
}
"""Strategy name (the ``victim_policy`` config value) -> factory."""


def make_strategy(name: str, config: BidKVConfig) -> VictimStrategy:
    """A fresh strategy; ``ValueError`` naming ``name`` and the known names if unknown."""
    try:
        factory = STRATEGIES[name]
    except KeyError:
        raise ValueError(
            f"vllm-bidkv: unknown victim strategy {name!r}; known: {', '.join(STRATEGIES)}"
        ) from None
    return factory(config)

"""Victim strategies: given the preemptible candidates, which one vLLM preempts.

Every strategy except ``random`` maximises a key in one O(n) pass (no sort: the hook
runs inside vLLM's allocation retry loop). Equal scores go to the newest candidate
(max ``order``), so when there is nothing to choose between, every strategy picks
vLLM's own victim. An empty candidate list raises ``ValueError``: the hook only asks
when vLLM has something to preempt.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Protocol

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.policy.candidate import Candidate
from vllm_bidkv.policy.cost import BidCostModel


class VictimStrategy(Protocol):
    """Chooses the victim among the candidates; scored strategies also expose ``score(c)``."""

    name: str

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        """One member of ``candidates``; ``ValueError`` if it is empty."""
        ...


def _best(candidates: Sequence[Candidate], key: Callable[[Candidate], tuple[float, ...]]) -> Candidate:
    if not candidates:
        raise ValueError("no preemptible candidates to choose a victim from")
    return max(candidates, key=key)


class VllmDefaultStrategy:
    """Exactly vLLM's FCFS victim: the last of the running list (max ``order``)."""

    name = "vllm-default"

    def score(self, c: Candidate) -> float:
        return float(c.order)

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        return _best(candidates, lambda c: (c.order,))


class RandomStrategy:
    """Uniform among the candidates, from its own generator: same seed, same sequence of picks."""

    name = "random"

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        if not candidates:
            raise ValueError("no preemptible candidates to choose a victim from")
        return self._rng.choice(candidates)


class LargestFirstStrategy:
    """Most GPU blocks held; ties by computed tokens, then the newest.

    Counts held blocks, not freed ones: a request on a big shared prefix looks large
    here although preempting it frees little (the baseline ``bidkv`` improves on).
    """

    name = "largest-first"

    def score(self, c: Candidate) -> float:
        return float(c.num_blocks)

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        return _best(candidates, lambda c: (c.num_blocks, c.computed_tokens, c.order))


class BidStrategy:
    """Ours: max U = freeable_blocks / (δ + ε), δ from ``BidCostModel`` (see cost.py)."""

    name = "bidkv"

    def __init__(self, cost: BidCostModel) -> None:
        self.cost = cost

    def score(self, c: Candidate) -> float:
        return self.cost.utility(c)

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        return _best(candidates, lambda c: (self.cost.utility(c), c.order))


class Bid01Strategy:
    """bidkv 0.1.0's published rule, as a baseline (PEERS.md, "bidkv in detail").

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

    def score(self, c: Candidate) -> float:
        completion = min(1.0, c.output_tokens / (c.max_tokens or self.FALLBACK_MAX_TOKENS))
        delta = 1.0 + self.COMPLETION_WEIGHT * completion + self.PREEMPTION_WEIGHT * c.num_preemptions
        return c.computed_tokens / (delta + self.EPSILON)

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        return _best(candidates, lambda c: (self.score(c), c.order))


STRATEGIES: dict[str, Callable[[BidKVConfig], VictimStrategy]] = {
    VllmDefaultStrategy.name: lambda config: VllmDefaultStrategy(),
    RandomStrategy.name: lambda config: RandomStrategy(config.seed),
    LargestFirstStrategy.name: lambda config: LargestFirstStrategy(),
    BidStrategy.name: lambda config: BidStrategy(BidCostModel.from_config(config)),
    Bid01Strategy.name: lambda config: Bid01Strategy(),
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

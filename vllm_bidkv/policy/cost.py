"""BidCostModel: δ, the cost of bringing a preempted request back, and the bid U = r / (δ + ε).

r is capped at the requester's shortfall when known (``utility``).

Units: δ is in *token-recompute equivalents* — the cost of recomputing one token with
no context before it is ``recompute_cost`` (1.0 by default, which makes it the unit).
Every other constant is expressed in that unit, so only ratios matter.

Bringing a victim back (vLLM recomputes from scratch what no cache returns):

* its first ``restorable`` tokens come back without compute: the GPU-shared ones as a
  prefix hit, then the CPU-tier ones (held already or parked by the offloader) by a
  load, at ``load_cost`` each;
* the tail ``[restorable, computed)`` is recomputed. Token ``t`` costs about
  ``recompute_cost + attention_cost · t`` (attention over the ``t`` tokens before it);
  integrated over ``[a, b)`` that is ``recompute_cost·(b−a) + attention_cost·(b²−a²)/2``,
  so the same number of tail tokens costs more in a longer context.

Two terms are not recompute but loss the victim's user sees, priced in the same unit:
``progress_weight · output_tokens / max_tokens`` keeps near-finished requests running,
``starvation_weight · num_preemptions`` keeps one request from being picked again and again.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.policy.candidate import Candidate


@dataclass(frozen=True, slots=True)
class BidCostModel:
    """The constants of δ; see the module doc. Build with ``from_config``."""

    recompute_cost: float
    """Cost of recomputing one token, context aside (the unit of δ)."""

    attention_cost: float
    """Extra recompute cost per token per token of context before it (attention's length term)."""

    load_cost: float
    """Cost of loading one token's KV from the CPU tier back into GPU blocks."""

    progress_weight: float
    """Added per unit of output progress (output_tokens / max_tokens, in [0, 1])."""

    starvation_weight: float
    """Added per earlier preemption of the same request."""

    epsilon: float
    """ε in U = r / (δ + ε): keeps U finite when δ is 0 (nothing computed, nothing to lose)."""

    @classmethod
    def from_config(cls, config: BidKVConfig) -> BidCostModel:
        return cls(
            recompute_cost=config.bid_recompute_cost,
            attention_cost=config.bid_attention_cost,
            load_cost=config.bid_load_cost,
            progress_weight=config.bid_progress_weight,
            starvation_weight=config.bid_starvation_weight,
            epsilon=config.bid_epsilon,
        )

    def recompute(self, start: int, end: int) -> float:
        """Cost of recomputing tokens ``[start, end)``; 0 for an empty range."""
        if end <= start:
            return 0.0
        return self.recompute_cost * (end - start) + self.attention_cost * (end * end - start * start) / 2

    def delta(self, c: Candidate) -> float:
        """δ: cost of bringing ``c`` back after preempting it (module doc), ``>= 0``.

        Restorable counts are clamped to ``computed_tokens``: only computed KV is lost,
        so tokens beyond it are neither recomputed nor loaded on account of the preemption.
        Progress is 0 when ``max_tokens`` is unknown (None or 0): there is no evidence the
        request is near its end, so it gets no protection for it.
        """
        on_gpu = min(c.shared_tokens, c.computed_tokens)
        return self._delta_loading(c, min(c.cpu_tokens + c.offloadable_tokens, c.computed_tokens - on_gpu))

    def _delta_loading(self, c: Candidate, loaded: int) -> float:
        """δ of ``c`` if the ``loaded`` tokens after its GPU prefix come back by a load."""
        computed = c.computed_tokens
        on_gpu = min(c.shared_tokens, computed)
        progress = min(1.0, c.output_tokens / c.max_tokens) if c.max_tokens else 0.0
        return (
            self.recompute(on_gpu + loaded, computed)
            + self.load_cost * loaded
            + self.progress_weight * progress
            + self.starvation_weight * c.num_preemptions
        )

    def utility(self, c: Candidate, shortfall_blocks: int | None) -> float:
        """The bid U = min(r, shortfall) / (δ + ε): blocks that serve the requester per unit of loss.

        r = ``freeable_blocks``, capped at the decision's ``shortfall_blocks`` when known:
        blocks beyond what the requester lacks serve nobody in this decision. Without the
        cap r and δ both grow with a victim's size, so with nothing restorable U is nearly
        flat and block rounding decides; with it, every victim that covers the shortfall
        alone bids the same r and the cheapest to bring back wins (least-computed-first
        when nothing is restorable, the most restorable when the tier holds victims).

        Args:
            c: The candidate to price.
            shortfall_blocks: ``Decision.shortfall_blocks``; None leaves r uncapped.

        Returns:
            U, ``>= 0`` and finite.
        """
        return self._freed(c, shortfall_blocks) / (self.delta(c) + self.epsilon)

    def utility_bound(self, c: Candidate, shortfall_blocks: int | None) -> float:
        """At least ``utility`` of ``c`` with any restorable run (whatever ``cpu_tokens`` and
        ``offloadable_tokens`` say): U with δ's least over the tokens a resume may load.

        δ is concave in them (the recompute each loaded token saves grows with its position),
        so the least is at an end: all ``computed - shared`` loaded, or none. With a load no
        dearer than the recompute it saves (``load_cost <= recompute_cost``: the default) it
        is all. The margin keeps float rounding from putting the bound below the exact U.
        """
        most = c.computed_tokens - min(c.shared_tokens, c.computed_tokens)
        least = self._delta_loading(c, most)
        if self.load_cost > self.recompute_cost:
            least = min(least, self._delta_loading(c, 0))
        return self._freed(c, shortfall_blocks) / (least + self.epsilon) * (1 + 1e-9)

    @staticmethod
    def _freed(c: Candidate, shortfall_blocks: int | None) -> int:
        """r: ``freeable_blocks``, capped at the shortfall when known (``utility``)."""
        return c.freeable_blocks if shortfall_blocks is None else min(c.freeable_blocks, shortfall_blocks)

"""VictimStats: what one strategy's decisions cost and freed, for logs and bench reports."""

from __future__ import annotations

import dataclasses

from vllm_bidkv.policy.candidate import Candidate


@dataclasses.dataclass
class VictimStats:
    """Running totals of the active strategy's decisions (mutable; one object per scheduler)."""

    preemptions: int = 0
    """Victims chosen."""

    blocks_freed: int = 0
    """Sum of the chosen victims' ``freeable_blocks``."""

    tokens_recomputed: int = 0
    """Tokens resumed victims had to compute again (reported by the connector on resume)."""

    selection_seconds: float = 0.0
    """Sum of the ``seconds`` given to ``record_choice``: the selection time as the hook measures it."""

    def record_choice(self, candidate: Candidate, seconds: float) -> None:
        """Count one decision: ``candidate`` was chosen, choosing took ``seconds``."""
        self.preemptions += 1
        self.blocks_freed += candidate.freeable_blocks
        self.selection_seconds += seconds

    def record_resume(self, recomputed_tokens: int) -> None:
        """Count the tokens a resumed victim computed again (neither GPU- nor CPU-restored)."""
        self.tokens_recomputed += recomputed_tokens

    def as_dict(self) -> dict[str, int | float]:
        return dataclasses.asdict(self)

"""LoadTrust: which GPU blocks a store may read, given the loads that wrote them.

A block a load wrote is *unverified* until that load finished on every worker: a store
never reads it (nor any later block of the request, which attends to it), and a store
issued while loads were unverified commits only if none of them failed meanwhile
(``failures`` then and now; see ``LedgerEntry.load_failures_at_issue``). A failed load's
blocks and the request's later blocks stay *distrusted* until vLLM reuses them for other
content: KV computed from a failed load is never stored into the tier.
"""

from __future__ import annotations

from vllm_bidkv.context import BlockHash, SchedulerContext
from vllm_bidkv.offload.jobs import TransferJob


class LoadTrust:
    """Unverified and distrusted GPU blocks. O(blocks of a job) per load issued or finished,
    O(1) per ``trusted`` question."""

    def __init__(self, ctx: SchedulerContext) -> None:
        self._ctx = ctx
        self._unverified_loads: dict[int, list[int]] = {}  # job id -> GPU blocks it writes
        self._unverified_blocks: dict[int, int] = {}  # GPU block -> unverified loads writing it
        self._distrusted: dict[int, BlockHash] = {}  # GPU block -> hash it had when its load failed
        self.failures = 0  # loads that failed so far

    @property
    def any_unverified(self) -> bool:
        return bool(self._unverified_loads)

    def load_issued(self, job: TransferJob) -> None:
        self._unverified_loads[job.job_id] = job.gpu_block_ids
        for block_id in job.gpu_block_ids:
            self._unverified_blocks[block_id] = self._unverified_blocks.get(block_id, 0) + 1

    def load_finished(self, job: TransferJob, ok: bool) -> None:
        """The load finished everywhere: its blocks are trusted again, or distrusted from the
        first failed one on (with the request's later blocks, which attended to it)."""
        for block_id in self._unverified_loads.pop(job.job_id, []):
            left = self._unverified_blocks[block_id] - 1
            if left:
                self._unverified_blocks[block_id] = left
            else:
                del self._unverified_blocks[block_id]
        if ok or not job.gpu_block_ids:
            return
        self.failures += 1
        first = job.gpu_block_ids[0]
        later: list[int] = []
        if job.request_id is not None:
            groups = self._ctx.request_block_ids(job.request_id)
            held = groups[0] if groups else []
            if first in held:
                later = held[held.index(first) :]
        for block_id in dict.fromkeys([*job.gpu_block_ids, *later]):
            block_hash = self._ctx.get_block(block_id).block_hash
            if block_hash is not None:
                self._distrusted[block_id] = block_hash

    def trusted(self, block_id: int, block_hash: BlockHash) -> bool:
        """Whether a store may read ``block_id`` while it carries ``block_hash``: not while a
        load into it is unfinished, nor after a load into it (or before it) failed."""
        if block_id in self._unverified_blocks:
            return False
        distrusted = self._distrusted.get(block_id)
        if distrusted is None:
            return True
        if distrusted == block_hash:
            return False
        del self._distrusted[block_id]  # reused for other content since: computed afresh
        return True

    def check(self) -> None:
        """Assert the invariants (tests): each block's count is the unverified loads writing it."""
        counts: dict[int, int] = {}
        for blocks in self._unverified_loads.values():
            for block_id in blocks:
                counts[block_id] = counts.get(block_id, 0) + 1
        assert counts == self._unverified_blocks

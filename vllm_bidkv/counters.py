"""The one counter sink of the scheduler side: every ``vllm:bidkv_*`` counter, by name.

Each counter is incremented where its event happens (the strategy's choice, the
planner's job completion, the tier's eviction) and nowhere else. All of them live
on the scheduler, which sees a transfer once however many workers ran it, so a
block is counted once at any parallelism. The connector hands vLLM the deltas
since its last report (``take_deltas``); vLLM sums them into Prometheus
``vllm:bidkv_<name>_total``. Pure: no vLLM import.
"""

from __future__ import annotations

COUNTERS: dict[str, str] = {
    "blocks_stored": "GPU blocks copied into the CPU tier (committed stores; a block once at any parallelism).",
    "blocks_rescued": "Of those, preempted requests' blocks copied before the step's forward.",
    "blocks_loaded": "CPU-tier blocks copied back into GPU blocks.",
    "bytes_stored": "Bytes copied into the CPU tier (all workers together).",
    "bytes_loaded": "Bytes copied back from the CPU tier (all workers together).",
    "cpu_hit_blocks": "Blocks a request was given from the CPU tier instead of computing them.",
    "cpu_evictions": "CPU-tier entries evicted to make room.",
    "tokens_loaded": "Tokens loaded from the CPU tier instead of recomputed.",
    "load_errors": "Blocks that could not be loaded (failed copy or entry lost); vLLM recomputes them.",
    "disk_blocks_written": "CPU-tier blocks written to the disk tier (every worker's share written).",
    "disk_blocks_read": "Disk-tier blocks read back into the CPU tier for a hit.",
    "disk_hit_blocks": "Of the CPU hits, blocks the disk tier supplied (the CPU tier lacked them).",
    "disk_store_drops": "Blocks the disk tier did not take: every slot busy, or the write failed (full or unwritable disk).",
    "disk_evictions": "Disk-tier entries evicted to make room.",
    "preemptions": "Preemptions whose victim the active policy chose.",
    "preempted_blocks_freed": "Blocks returned to the free pool by those preemptions.",
    "recomputed_tokens": "Tokens a resumed victim had to compute again.",
}


class Counters:
    """Cumulative totals of ``COUNTERS``; an unknown name is a bug (KeyError)."""

    __slots__ = ("_totals", "_reported", "_added")

    def __init__(self) -> None:
        self._totals = dict.fromkeys(COUNTERS, 0)
        self._reported = dict.fromkeys(COUNTERS, 0)
        self._added = False  # since the last take_deltas: a step without events reports in O(1)

    def add(self, name: str, value: int = 1) -> None:
        if name not in self._totals:
            raise KeyError(f"vllm-bidkv: unknown counter {name!r}; known: {', '.join(COUNTERS)}")
        self._totals[name] += value
        self._added = True

    def __getitem__(self, name: str) -> int:
        return self._totals[name]

    def totals(self) -> dict[str, int]:
        return dict(self._totals)

    def take_deltas(self) -> dict[str, int]:
        """The non-zero increases since the previous call (what one stats report carries)."""
        if not self._added:
            return {}
        deltas = {n: v - self._reported[n] for n, v in self._totals.items() if v != self._reported[n]}
        self._reported, self._added = dict(self._totals), False
        return deltas


GAUGES: dict[str, str] = {
    "tier_capacity_bytes": "Bytes the CPU tier can hold (all workers together).",
    "tier_used_bytes": "Bytes of CPU-tier slots holding or receiving an entry (all workers together).",
    "tier_entries": "CPU-tier slots holding an entry or a store in flight.",
    "tier_pinned_entries": "Pins held on CPU-tier entries by loads in flight (an entry pinned twice counts twice).",
    "disk_capacity_bytes": "Bytes the disk tier can hold (all workers together; 0: no disk tier).",
    "disk_used_bytes": "Bytes of disk-tier slots holding or receiving an entry (all workers together).",
    "stores_in_flight": "Store jobs (lazy, eager, rescues) planned and not yet finished by every worker.",
    "loads_in_flight": "Load jobs planned and not yet finished by every worker.",
    "gpu_blocks_held": "GPU blocks touched by transfer jobs in flight (vLLM gets them back when they finish).",
    "tracked_requests": "Requests the scheduler side keeps a record for (from first sight to finished/aborted).",
}
"""The scheduler side's current state, ``vllm:bidkv_<name>`` gauges (``BidKVSchedulerSide.gauges``)."""

IDLE_ZERO_GAUGES: tuple[str, ...] = (
    "tier_pinned_entries",
    "stores_in_flight",
    "loads_in_flight",
    "gpu_blocks_held",
    "tracked_requests",
)
"""Gauges that are 0 whenever the engine is idle; the tier's occupancy keeps what it cached
(``tier_used_bytes`` = ``tier_entries`` x block bytes, capacity constant)."""

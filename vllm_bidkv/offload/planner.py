"""OffloadPlanner: decides, each scheduler step, which GPU blocks go to the CPU tier and back.

It talks to a ``SchedulerContext`` (GPU blocks), a ``CpuBlockTier`` (CPU slots) and the
``DiskTier`` behind it, if any; the connector ships its ``TransferJob``s to the workers
(``plan_step``) and feeds their results back (``complete``).

Its parts keep the books: ``JobLedger`` (ledger.py) holds every job, and what it
owns, until every worker reported it; ``LoadTrust`` (trust.py) says which GPU blocks a
store may read given the loads that wrote them; ``LazyWalk`` (walk.py) keeps the lazy
store's place in vLLM's free queue. A job owns one ``touch`` per GPU block (vLLM cannot
hand the block out, so no copy races a reuse) and a hold per CPU slot (PENDING for a
store, a pin for a load: never evicted), each released once, when it finishes.

Victims are rescued: a preempted request's computed full blocks are copied before this
step's forward, the first thing that may write them, even if vLLM already gave them to
another request; a rescue owns no touch (taking blocks from vLLM just when it is short of
them would cause more preemptions). So a resumed victim loads every full block it had.

Stores: ``lazy`` parks hashed free blocks the tier lacks just before vLLM reuses them
(the walk), so the tier holds what HBM lost rather than a copy of HBM; ``eager`` also
stores a request's computed full blocks when it finishes; ``auto`` stores each block in
the step vLLM caches it while the tier has room, and leaves the rest to the walk (the
rule: ``offload.picks``). Loads: ``match`` finds the
hit, ``plan_load`` pins its slots and touches the destination blocks; a load is
synchronous (before the forward that reads it) or asynchronous (the request waits in
``WAITING_FOR_REMOTE_KVS`` while the batch runs on). No planner exists with offload off.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from vllm_bidkv.context import BlockHash, RequestView, SchedulerContext
from vllm_bidkv.counters import Counters
from vllm_bidkv.offload.cpu_tier import CpuBlockTier
from vllm_bidkv.offload.disk import DiskTier, hold_for_load, is_ready, release_load
from vllm_bidkv.offload.jobs import JobKind, JobResults, StepPlan
from vllm_bidkv.offload.ledger import JobLedger, LedgerEntry
from vllm_bidkv.offload.lookup import match_tokens
from vllm_bidkv.offload.picks import AUTO_MIN_IDLE_POOLS, park_visitor, pick_computed_blocks
from vllm_bidkv.offload.spec import OffloadSpec
from vllm_bidkv.offload.trust import LoadTrust
from vllm_bidkv.offload.walk import LazyWalk


class OffloadPlanner:
    """Scheduler-side planner of CPU-tier stores and loads (see module doc)."""

    def __init__(
        self,
        ctx: SchedulerContext,
        tier: CpuBlockTier,
        spec: OffloadSpec,
        counters: Counters,
        disk: DiskTier | None = None,
    ) -> None:
        """``tier`` is built from ``spec``; ``counters``: the scheduler side's counter sink;
        ``disk``: the disk tier behind the CPU tier (``offload.disk``), if any."""
        assert tier.num_slots == spec.num_slots, "the tier is built from the same spec"
        self._ctx = ctx
        self.tier = tier
        self.disk = disk
        self._spec = spec
        self._counters = counters
        self.ledger = JobLedger(spec.world_size)
        self.trust = LoadTrust(ctx)
        self.walk = LazyWalk(ctx, spec.lookahead_steps, spec.min_clean_blocks)
        self.aborted_store_blocks = 0  # stores that failed or went stale (a diagnostic)
        self._step_picks: list[tuple[int, int]] = []  # this step's stores, one job at plan_step

    # -- loads -----------------------------------------------------------------
    def match(self, request: RequestView, num_computed_tokens: int) -> int:
        """Tokens after the GPU prefix hit the tiers can supply (``lookup.match_tokens``)."""
        return match_tokens(
            self._ready_until, request, num_computed_tokens, self._ctx.block_size, self._spec.sliding_window
        )

    def _ready_until(self, hashes: Sequence[BlockHash], start: int, stop: int) -> int:
        i = self.tier.ready_until(hashes, start, stop)
        while self.disk is not None and i < stop and is_ready(self.tier, self.disk, hashes[i]):
            i += 1
        return i

    def plan_load(
        self,
        request_id: str,
        block_hashes: Sequence[BlockHash],
        gpu_block_ids: list[int],
        num_computed_tokens: int,
        num_external_tokens: int,
        asynchronous: bool = False,
    ) -> list[int]:
        """Queue the load of a ``match`` result into the blocks vLLM just allocated.

        ``gpu_block_ids``: all of the request's group-0 blocks (null ones, a sliding window's
        skipped blocks, are not loaded); ``asynchronous``: see ``TransferJob.asynchronous``.
        Returns the GPU blocks of the hit that left the tiers since ``match`` (the job's
        ``unavailable_gpu_block_ids``: load errors, recomputed by vLLM). Usually ``[]``.
        """
        if num_external_tokens <= 0:
            return []
        bs = self._ctx.block_size
        if num_computed_tokens % bs:
            raise ValueError(
                f"vllm-bidkv: load for request {request_id}: num_computed_tokens={num_computed_tokens} "
                f"is not a multiple of the block size {bs}"
            )
        first = num_computed_tokens // bs
        end = first + math.ceil(num_external_tokens / bs)
        if end > len(block_hashes) or end > len(gpu_block_ids):
            raise ValueError(
                f"vllm-bidkv: load for request {request_id}: blocks [{first}, {end}) but the request has "
                f"{len(block_hashes)} block hashes and {len(gpu_block_ids)} GPU blocks"
            )
        # Outside a sliding window vLLM gave a block the null block: nothing reads it, none loaded.
        window = self._spec.sliding_window
        wanted = [
            i
            for i in range(first, end)
            if window is None or not self._ctx.get_block(gpu_block_ids[i]).is_null
        ]
        # disk_slots: per slot, the disk slot it is promoted from, or -1
        slots, disk_slots = hold_for_load(self.tier, self.disk, [block_hashes[i] for i in wanted])
        promoted = sum(d >= 0 for d in disk_slots)
        gpu_ids = [gpu_block_ids[i] for i in wanted[: len(slots)]]
        lost = wanted[len(slots)] if len(slots) < len(wanted) else end
        unavailable = gpu_block_ids[lost:end]
        try:
            self._ctx.touch(gpu_ids)
        except BaseException:
            release_load(self.tier, self.disk, slots, disk_slots, ok=True, keep=False)
            raise
        # A load has disk slots iff it promotes.
        entry = self._issue("load", gpu_ids, slots, request_id, unavailable=unavailable,
                            asynchronous=asynchronous, disk_slots=disk_slots if promoted else None)  # fmt: skip
        entry.tokens = min(num_external_tokens, len(slots) * bs)
        self.trust.load_issued(entry.job)
        self._counters.add("cpu_hit_blocks", len(slots))
        self._counters.add("disk_hit_blocks", promoted)  # of which the disk supplied
        self._counters.add("load_errors", len(unavailable))
        return unavailable

    # -- stores ----------------------------------------------------------------
    def store_computed(self, request: RequestView, first: int) -> int:
        """``auto``: store the request's blocks from index ``first`` on that vLLM cached and the
        tier lacks, where it has room (``offload.picks``), in this step's store job. Returns the
        index to start from next step (``picks.pick_computed_blocks``); blocks without room are
        left to the walk."""
        if first >= len(request.block_hashes):
            return first
        min_idle = AUTO_MIN_IDLE_POOLS * self._ctx.num_gpu_blocks
        picks, index = pick_computed_blocks(
            self._ctx,
            self.tier,
            self.trust,
            self._ctx.request_block_ids_from(request.request_id, first),
            request.block_hashes,
            first,
            min_idle,
        )
        self._step_picks += picks
        return index

    def plan_step(self, blocks_allocated: int) -> StepPlan:
        """This step's jobs: every job planned since the previous call (once per step, from
        ``build_connector_meta``). ``blocks_allocated``: GPU blocks vLLM allocated since then
        (new blocks of scheduled requests); it drives the lazy walk and the tier's clock."""
        self.tier.order.clock += blocks_allocated
        # One store job a step for every request's blocks and the walk's (fewer, larger copies).
        picks, self._step_picks = self._step_picks, []
        if self._spec.mode in ("lazy", "auto"):
            self.walk.step(blocks_allocated, park_visitor(self.tier, self.trust, picks))
        self._queue_store(picks, None)
        if self.disk is not None:
            self.disk.sync()  # before any spill the plan sends may overwrite a journaled slot
        return self.ledger.take_step_plan()

    def store_finished(self, request: RequestView, block_ids: Sequence[int]) -> None:
        """vLLM finished or aborted the request (it still holds ``block_ids``): eager mode stores it."""
        if self._spec.mode == "eager":
            picks, _ = pick_computed_blocks(self._ctx, self.tier, self.trust, block_ids, request.block_hashes)
            self._queue_store(picks, request.request_id)

    def rescue(self, request_id: str, blocks: Sequence[tuple[int, BlockHash | None]]) -> None:
        """vLLM preempted the request in this ``schedule()``: rescue its blocks (module doc).

        ``blocks``: its group-0 blocks just before vLLM freed them (the victim hook
        records them), each with the hash it carried then (None: not computed and full).
        Call before this step's ``plan_step``: a rescue is valid until the forward.
        """
        picks: list[tuple[int, int]] = []
        earlier: set[BlockHash] = set()  # the victim's blocks before this one: never evicted for it
        for block_id, block_hash in blocks:
            view = self._ctx.get_block(block_id)
            if view.is_null:
                continue  # slid out of a sliding window: nothing to keep, nothing a resume loads
            if block_hash is None:
                break  # blocks after the first uncomputed one are not computed either
            if not self.trust.trusted(block_id, block_hash):
                break  # its KV, and that of every later block attending to it, is unsure
            if self.tier.contains(block_hash):
                ready = self.tier.lookup(block_hash)
                if ready is not None:
                    self.tier.mark_used(ready)  # the resume will read it: evict others first
                earlier.add(block_hash)
                continue
            if view.block_hash == block_hash and view.ref_cnt:
                earlier.add(block_hash)
                continue  # shared with a running request: stays on the GPU
            slot = self.tier.reserve(block_hash, keep=earlier)
            if slot is None:
                break
            picks.append((block_id, slot))
            earlier.add(block_hash)
        if picks:
            gpu_ids, slots = [b for b, _ in picks], [s for _, s in picks]
            self._issue("store", gpu_ids, slots, request_id, touched=False, rescue=True)

    def _queue_store(self, picks: list[tuple[int, int]], request_id: str | None) -> None:
        if not picks:
            return
        gpu_ids = [block_id for block_id, _ in picks]
        slots = [slot for _, slot in picks]
        try:
            self._ctx.touch(gpu_ids)
        except BaseException:
            for slot in slots:
                self.tier.abort(slot)
            raise
        self._issue("store", gpu_ids, slots, request_id)

    def _issue(
        self, kind: JobKind, gpu_ids: list[int], slots: list[int], request_id: str | None, **kw: Any
    ) -> LedgerEntry:
        entry = self.ledger.issue(kind, gpu_ids, slots, request_id, **kw)
        if kind == "store" and self.trust.any_unverified:
            entry.load_failures_at_issue = self.trust.failures
        return entry

    # -- completion --------------------------------------------------------------
    def complete(self, results: JobResults) -> None:
        """Apply worker results (``update_connector_output``); releases finished jobs.

        A job is finished once every worker reported it (``JobLedger.acknowledge``): a store
        commits its slots unless it failed, went stale or may have read KV computed from a
        failed load; a load releases its slots. Raises ValueError for a job never sent.
        """
        for entry, ok in self.ledger.acknowledge(results):
            self._finish(entry, ok=ok)

    def _finish(self, entry: LedgerEntry, *, ok: bool) -> None:
        job = entry.job
        n = len(job.cpu_slots)
        if job.kind == "spill":
            assert self.disk is not None
            self.disk.spill_finished(self.tier, job.cpu_slots, job.disk_slots, ok and not entry.stale)
        elif job.kind == "store":
            issued_at = entry.load_failures_at_issue
            commit = ok and not entry.stale and (issued_at is None or self.trust.failures == issued_at)
            for slot in job.cpu_slots:
                (self.tier.commit if commit else self.tier.abort)(slot)
            if commit:
                if self.disk is not None:  # write-through (offload.disk)
                    cpu_slots, disk_slots = self.disk.reserve_spills(self.tier, job.cpu_slots)
                    if cpu_slots:
                        self._issue("spill", [], cpu_slots, None, touched=False, disk_slots=disk_slots)
                self._counters.add("blocks_stored", n)
                self._counters.add("bytes_stored", n * self._spec.block_bytes)
                if entry.rescue:
                    self._counters.add("blocks_rescued", n)
            else:
                self.aborted_store_blocks += n
        else:
            self.trust.load_finished(job, ok)
            release_load(self.tier, self.disk, job.cpu_slots, job.disk_slots, ok=ok, keep=not entry.stale)
            if ok:
                self._counters.add("blocks_loaded", n)
                self._counters.add("bytes_loaded", n * self._spec.block_bytes)
                self._counters.add("tokens_loaded", entry.tokens)
            elif not entry.stale:  # a given-up load is not an error (see give_up_copies)
                self._counters.add("load_errors", n)
        if entry.touched:
            self._untouch(entry)

    def _untouch(self, entry: LedgerEntry) -> None:
        # Last block first, as vLLM frees a request's blocks: where the context lets vLLM
        # place a block (it was held when touched), the request's tail is evicted first.
        self._ctx.free_blocks(self.ledger.untouch(entry)[::-1])

    # -- resets ------------------------------------------------------------------
    def reset(self) -> None:
        """vLLM's ``reset_prefix_cache``: no block stored before it is a hit after it (after a
        weight update old KV would poison new requests). READY entries are dropped (pinned
        ones when their loads finish); copies in flight that would add entries never do."""
        self.tier.reset()
        if self.disk is not None:
            self.disk.reset()
        for entry in self.ledger.entries():
            if entry.job.kind != "load" or entry.job.disk_slots:  # spills and promotions too
                entry.stale = True

    def give_up_copies(self) -> None:
        """vLLM is about to empty its caches and the tier (``reset_prefix_cache`` with
        ``reset_connector``, e.g. after a weight update): give back the GPU blocks copies
        hold now, so the pool can be emptied.

        Jobs not sent are dropped. Sent stores and spills keep their PENDING slots until every
        worker reported them (a late write may land there), then abort; sent synchronous loads
        keep their pins until reported. Asynchronous loads are kept whole (vLLM holds their blocks).
        """
        for entry in self.ledger.entries():
            if entry.job.asynchronous:
                continue
            entry.stale = True
            if not entry.sent:
                self.ledger.drop(entry)
                self._finish(entry, ok=False)
            elif entry.touched:
                self._untouch(entry)

    def holds_free_blocks(self) -> bool:
        """Whether a store in flight holds a GPU block nothing else holds (vLLM gets it back
        when the store finishes; a running request's block it does not). O(blocks held)."""
        return any(self._ctx.get_block(b).ref_cnt == 1 for b in self.ledger.store_blocks())

    # -- for the gauges and tests ---------------------------------------------------
    def stats(self) -> dict[str, int]:
        """The counter sink's totals plus the diagnostics and the current holdings."""
        stats = self._counters.totals()
        stats["walked_blocks"] = self.walk.walked_blocks
        stats["aborted_store_blocks"] = self.aborted_store_blocks
        stats["cpu_blocks_used"] = self.tier.num_used
        stats["pending_jobs"] = len(self.ledger)
        stats["pins_held"] = self.tier.num_pins
        stats["gpu_blocks_held"] = self.ledger.held_gpu_blocks
        return stats

    def check(self) -> None:
        """Assert the invariants of the planner's parts and the tier (tests)."""
        self.ledger.check()
        self.trust.check()
        self.walk.check()
        self.tier.check()
        if self.disk is not None:
            self.disk.index.check()

"""OffloadPlanner: decides, each scheduler step, which GPU blocks go to the CPU tier and back.

It talks only to a ``SchedulerContext`` (GPU blocks) and a ``CpuBlockTier`` (CPU
slots) and turns its decisions into ``TransferJob``s; the connector ships them
to the workers (``plan_step``) and feeds their results back (``complete``).

Ownership rule: a job owns one ``touch`` per GPU block and one tier hold per
CPU slot (a PENDING reservation for a store, a pin for a load) from the moment
it is planned until ``complete`` sees it finished, which releases each exactly
once, whether the copy succeeded or failed and whatever happened to the request
meanwhile (finished, aborted, preempted). A touched block cannot be handed out
by vLLM, so no copy ever races a reuse; a PENDING or pinned slot is never evicted.
The one exception is a rescue (below): it owns no touch, only its reservations,
and runs before the step's forward, the first thing that may write its blocks.

Victims: when vLLM preempts a request, its computed full blocks are rescued in
every mode but ``off`` (``rescue``): copied before this step's
forward, whether vLLM already handed them to another request in the same
``schedule()`` (a victim's blocks are the first reused) or they are still free.
Touching them for a store after the forward instead would take them from vLLM
just when it is short of blocks, and cause more preemptions. So a resumed victim
loads every full block it had.

Stores:

* ``lazy``: each step walks the free GPU blocks in LRU order (next to be reused
  first) from a cursor and stores hashed blocks the tier lacks, so blocks are
  parked just before vLLM reuses them and the tier holds what HBM lost rather
  than a copy of HBM. The walk keeps about ``lookahead_steps`` steps of block
  consumption (an EMA of blocks allocated per step) "clean" ahead of reuse and
  resumes where it stopped, so its work per step follows the consumption, not
  the pool size.
* ``eager``: a request's computed full blocks are also stored when it finishes.
* ``off``: no stores (loads of whatever the tier holds still work).

Loads: ``match`` finds the longest run of READY hashes after the GPU prefix hit;
``plan_load`` pins those slots and touches the destination blocks. A load is
synchronous (before the forward that reads it) or asynchronous (the request waits
in ``WAITING_FOR_REMOTE_KVS`` while the batch runs on); the ledger is the same.

Completions arrive late (CUDA events, async scheduling, TP ranks finishing
apart), so nothing here assumes a copy is done before every worker said so:
a job is finished when all ``world_size`` workers reported it, done or failed,
and failed if any failed it. Until then its blocks stay touched and its slots
PENDING or pinned, so no rank's late copy can meet a reused block or slot.
A block a load wrote is *unverified* until that load finished everywhere: a
store never reads it (nor any later block of the request, which attends to it),
and a store issued while loads were unverified commits only if none of them
failed meanwhile. A failed load's blocks and the request's later blocks stay
*distrusted* until vLLM reuses them for other content: KV computed from a failed
load is never stored into the tier.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from vllm_bidkv.context import BlockHash, RequestView, SchedulerContext
from vllm_bidkv.offload.cpu_tier import CpuBlockTier
from vllm_bidkv.offload.jobs import JobKind, JobResults, StepPlan, TransferJob

MODES = ("lazy", "eager", "off")
_RATE_WEIGHT = 0.25  # EMA weight of the newest step's block consumption


_Mark = tuple[int, BlockHash | None]  # a block the lazy walk visited, with its hash then


@dataclass
class _Pending:
    job: TransferJob
    sent: bool = False  # emitted by plan_step; only sent jobs can be reported on
    done: int = 0  # workers that reported the job done
    failed: int = 0  # workers that reported the job failed
    tokens: int = 0  # loads: tokens the job saves from recompute
    stale: bool = False  # a store planned before reset(): aborted, never committed
    touched: bool = True  # owns a touch per GPU block (not rescues, nor given-up copies)
    rescue: bool = False  # a victim's store before the forward
    # Stores: the planner's load-failure count at issue, if loads were unverified then; a
    # failure since means the source blocks may hold KV computed from a failed load.
    load_failures_at_issue: int | None = None


class OffloadPlanner:
    """Scheduler-side planner of CPU-tier stores and loads (see module doc)."""

    def __init__(
        self,
        ctx: SchedulerContext,
        tier: CpuBlockTier,
        mode: str,
        lookahead_steps: float,
        world_size: int = 1,
        *,
        block_bytes: int = 0,
        min_clean_blocks: int = 16,
        sliding_window: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"vllm-bidkv: offload_mode={mode!r} is invalid; expected one of {MODES}")
        if lookahead_steps <= 0:
            raise ValueError(f"vllm-bidkv: lazy_lookahead_steps={lookahead_steps} must be > 0")
        if world_size < 1:
            raise ValueError(f"vllm-bidkv: world_size={world_size} must be >= 1")
        self._ctx = ctx
        self._tier = tier
        self._mode = mode
        self._lookahead = lookahead_steps
        self._world_size = world_size
        self._block_size = ctx.block_size
        self._block_bytes = block_bytes  # only for the byte counters; 0 = unknown
        self._min_clean = min_clean_blocks
        self._window = sliding_window  # tokens each layer attends to; None: all (full attention)
        self._jobs: dict[int, _Pending] = {}  # planned, not finished; ids increase
        self._next_job_id = 0
        self._queued_loads: list[TransferJob] = []
        self._queued_stores: list[TransferJob] = []
        self._queued_rescues: list[TransferJob] = []
        self._held_gpu_blocks = 0  # touches owned by pending jobs
        self._held_store_blocks = 0  # of which by stores
        self._async_loads: dict[str, int] = {}  # request id -> its asynchronous load's job id
        # Loads not finished everywhere: job id -> (request id, GPU blocks it writes).
        self._unverified_loads: dict[int, tuple[str | None, list[int]]] = {}
        self._unverified_blocks: dict[int, int] = {}  # GPU block -> unverified loads writing it
        self._distrusted: dict[int, BlockHash] = {}  # GPU block -> hash it had when its load failed
        self._load_failures = 0
        # The tier's counter sink (the scheduler side's): stores, loads, hits, errors.
        self._counters = tier.counters
        # Lazy walk: where it stopped — the last visited block, and the last visited one
        # that stayed free (each with its hash, to notice reuse) —, an estimate of the free
        # blocks before that point that were visited ("clean"), and the EMA of blocks
        # allocated per step.
        self._cursor: _Mark | None = None
        self._free_cursor: _Mark | None = None
        self._clean = 0
        self._rate = 0.0
        self.walked_blocks = 0  # free blocks the lazy walk visited (a diagnostic, not exported)
        self.aborted_store_blocks = 0  # stores that failed or went stale (a diagnostic)

    @property
    def tier(self) -> CpuBlockTier:
        return self._tier

    # -- loads -----------------------------------------------------------------
    def match(self, request: RequestView, num_computed_tokens: int) -> int:
        """Tokens after the GPU prefix hit the CPU tier can supply (vLLM's external hit).

        The longest hit from block ``num_computed_tokens // block_size`` whose blocks are
        READY in the tier, capped so one token is left to compute. With a sliding window,
        only the blocks of the window before the hit's end are needed (vLLM gives the
        others the null block), so a hit may start past blocks the tier lacks. 0 if
        ``num_computed_tokens`` is not block aligned (copies are whole blocks). O(hit
        length); changes nothing.
        """
        bs = self._block_size
        room = request.num_tokens - 1 - num_computed_tokens
        if num_computed_tokens % bs or room <= 0:
            return 0
        hashes = request.block_hashes
        first = num_computed_tokens // bs
        last = min(len(hashes), first + math.ceil(room / bs))
        run = hit = 0  # READY blocks in a row ending at block i; the best hit so far
        for i in range(first, last):
            if self._tier.lookup(hashes[i]) is None:
                if self._window is None:
                    break
                run = 0
                continue
            run += 1
            end = min((i + 1) * bs - num_computed_tokens, room)  # tokens the hit would supply
            needed_from = first  # the first block vLLM will not null (see get_num_skipped_tokens)
            if self._window is not None:
                needed_from = max(first, (num_computed_tokens + end - self._window + 1) // bs)
            if i + 1 - needed_from <= run:
                hit = end
        return hit

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

        Args:
            gpu_block_ids: all of the request's group-0 blocks; null ones (a sliding
                window's skipped blocks) are not loaded.
            asynchronous: the request waits in ``WAITING_FOR_REMOTE_KVS`` until every
                worker finished the load (``TransferJob.asynchronous``).

        Returns:
            The GPU blocks of the part of the hit that left the tier since ``match``
            (also in the job's ``unavailable_gpu_block_ids``), which the worker reports
            as load errors so vLLM recomputes them. Usually ``[]``.

        Pins the CPU slots and touches the destination blocks until the job finishes.
        """
        if num_external_tokens <= 0:
            return []
        bs = self._block_size
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
        slots: list[int] = []
        gpu_ids: list[int] = []
        lost = end
        for i in range(first, end):
            if self._window is not None and self._ctx.get_block(gpu_block_ids[i]).is_null:
                continue  # outside the sliding window: vLLM skipped the block, nothing reads it
            slot = self._tier.lookup(block_hashes[i])
            if slot is None:
                lost = i
                break
            slots.append(slot)
            gpu_ids.append(gpu_block_ids[i])
        unavailable = gpu_block_ids[lost:end]
        for slot in slots:
            self._tier.pin(slot)
        try:
            self._ctx.touch(gpu_ids)
        except BaseException:
            for slot in slots:
                self._tier.unpin(slot)
            raise
        pending = self._new_job("load", gpu_ids, slots, request_id, unavailable, asynchronous=asynchronous)
        pending.tokens = min(num_external_tokens, len(slots) * bs)
        self._unverified_loads[pending.job.job_id] = (request_id, gpu_ids)
        for block_id in gpu_ids:
            self._unverified_blocks[block_id] = self._unverified_blocks.get(block_id, 0) + 1
        if asynchronous:
            self._async_loads[request_id] = pending.job.job_id
        self._queued_loads.append(pending.job)
        self._counters.add("cpu_hit_blocks", len(slots))
        self._counters.add("load_errors", len(unavailable))
        return unavailable

    # -- stores ----------------------------------------------------------------
    def plan_step(self, blocks_allocated: int) -> StepPlan:
        """This step's jobs (call once per step, from ``build_connector_meta``).

        ``blocks_allocated``: GPU blocks vLLM allocated since the previous call (new
        blocks of scheduled requests); it drives the lazy walk. Returns every job
        planned since the previous call.
        """
        if self._mode == "lazy":
            self._walk(blocks_allocated)
        plan = StepPlan(
            pre_forward_loads=self._queued_loads,
            post_forward_stores=self._queued_stores,
            pre_forward_stores=self._queued_rescues,
        )
        self._queued_loads, self._queued_stores, self._queued_rescues = [], [], []
        for job in plan.jobs():
            self._jobs[job.job_id].sent = True
        return plan

    def _walk(self, blocks_allocated: int) -> None:
        """Lazy stores: keep ``lookahead × EMA(consumption)`` free blocks clean ahead of reuse."""
        self._rate += _RATE_WEIGHT * (blocks_allocated - self._rate)
        # The EMA lags a burst; this step's consumption is the better guess for the next one then.
        demand = max(self._rate, blocks_allocated)
        target = max(self._min_clean, math.ceil(self._lookahead * demand))
        self._clean -= blocks_allocated  # vLLM reuses free blocks from the LRU end
        after = self._resume_point()
        if after is None:
            self._cursor, self._free_cursor, self._clean = None, None, 0
        budget = target - self._clean
        if budget <= 0:
            return
        picks: list[tuple[int, int]] = []
        visited = 0
        for view in self._ctx.iter_free_blocks(after_block=after):
            block_hash = view.block_hash
            if (
                block_hash is not None
                and not self._tier.contains(block_hash)
                and self._trusted(view.block_id, block_hash)
            ):
                slot = self._tier.reserve(block_hash)
                if slot is None:  # every slot pinned or pending: resume here next step
                    break
                picks.append((view.block_id, slot))  # touched below: it leaves the queue
            else:
                self._free_cursor = (view.block_id, block_hash)
            self._cursor = (view.block_id, block_hash)
            # A stored block returns to its place before the cursor, so it counts as clean.
            self._clean += 1
            visited += 1
            if visited >= budget:
                break
        self.walked_blocks += visited
        self._queue_store(picks, None)

    def _resume_point(self) -> int | None:
        """Where the walk may resume; None to restart from the LRU end.

        After the last visited block if it is free again (its store, if any, finished
        and put it back in place), else after the last visited block that stayed free
        (the blocks stored since are out of the queue, so the walk continues behind
        them). Restart when consumption may have reached that point (the estimate ran
        out), or it left the queue or was reused meanwhile (its hash changed: a block
        reused and freed again within one step is back at the MRU end, or the LRU end).
        """
        if self._clean <= 0:
            return None
        for mark in (self._cursor, self._free_cursor):
            if mark is not None:
                view = self._ctx.get_block(mark[0])
                if view.ref_cnt == 0 and view.block_hash == mark[1]:
                    return mark[0]
        return None

    def store_finished(self, request: RequestView, block_ids: Sequence[int]) -> None:
        """vLLM finished or aborted the request (it still holds ``block_ids``): eager mode stores it."""
        if self._mode == "eager":
            self._store_request(request, block_ids)

    def rescue(self, request_id: str, blocks: Sequence[tuple[int, BlockHash | None]]) -> None:
        """vLLM preempted the request in this ``schedule()``; park its blocks (see module doc).

        ``blocks``: its group-0 blocks as they were just before vLLM freed them, each
        with the hash the GPU block carried then (None: not a computed full block).
        vLLM has freed them by the time the connector hears of the preemption, so
        the victim hook records them. Call before this step's ``plan_step``: a
        rescue is only valid until the step's forward.
        """
        if self._mode == "off":
            return
        picks: list[tuple[int, int]] = []
        earlier: set[BlockHash] = set()  # the victim's blocks before this one: never evicted for it
        for block_id, block_hash in blocks:
            view = self._ctx.get_block(block_id)
            if view.is_null:
                continue  # slid out of a sliding window: nothing to keep, nothing a resume loads
            if block_hash is None:
                break  # blocks after the first uncomputed one are not computed either
            if not self._trusted(block_id, block_hash):
                break  # its KV, and that of every later block attending to it, is unsure
            if self._tier.contains(block_hash):
                ready = self._tier.lookup(block_hash)
                if ready is not None:
                    self._tier.mark_used(ready)  # the resume will read it: evict others first
                earlier.add(block_hash)
                continue
            if view.block_hash == block_hash and view.ref_cnt:
                earlier.add(block_hash)
                continue  # shared with a running request: stays on the GPU
            slot = self._tier.reserve(block_hash, keep=earlier)
            if slot is None:
                break
            picks.append((block_id, slot))
            earlier.add(block_hash)
        if picks:
            gpu_ids, slots = [b for b, _ in picks], [s for _, s in picks]
            pending = self._new_job("store", gpu_ids, slots, request_id, touched=False)
            pending.rescue = True
            self._queued_rescues.append(pending.job)

    def _trusted(self, block_id: int, block_hash: BlockHash) -> bool:
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

    def async_load_in_flight(self, request_id: str) -> bool:
        """The request's asynchronous load is unfinished: vLLM must keep its blocks until the
        workers report it (``finished_recving``), even if the request is aborted meanwhile."""
        return request_id in self._async_loads

    def _store_request(self, request: RequestView, block_ids: Sequence[int]) -> None:
        picks: list[tuple[int, int]] = []
        # zip stops at the last full block: only full blocks have a hash.
        for block_id, block_hash in zip(block_ids, request.block_hashes, strict=False):
            if not self._trusted(block_id, block_hash):
                break
            if self._tier.contains(block_hash):
                continue
            view = self._ctx.get_block(block_id)
            # The GPU block must still carry this hash: it is computed and not reused.
            if view.is_null or view.block_hash != block_hash:
                continue
            slot = self._tier.reserve(block_hash)
            if slot is None:
                break
            picks.append((block_id, slot))
        self._queue_store(picks, request.request_id)

    def _queue_store(self, picks: list[tuple[int, int]], request_id: str | None) -> None:
        if not picks:
            return
        gpu_ids = [block_id for block_id, _ in picks]
        slots = [slot for _, slot in picks]
        try:
            self._ctx.touch(gpu_ids)
        except BaseException:
            for slot in slots:
                self._tier.abort(slot)
            raise
        self._queued_stores.append(self._new_job("store", gpu_ids, slots, request_id).job)

    # -- completion --------------------------------------------------------------
    def complete(self, results: JobResults) -> None:
        """Apply worker results (``update_connector_output``); releases finished jobs.

        A job is finished once every one of the ``world_size`` workers reported it,
        done or failed; it failed if any worker failed it. Each worker reports a job
        only when its own copy can no longer touch the job's blocks or slots, so
        releasing them then is safe on every rank. Reports on finished jobs are
        ignored (late duplicates); a job id never planned, or planned but not sent
        yet, raises ValueError (checked before anything changes).
        """
        for job_id in (*results.failed, *results.done):
            pending = self._jobs.get(job_id)
            if not 0 <= job_id < self._next_job_id or (pending is not None and not pending.sent):
                raise ValueError(f"vllm-bidkv: worker reported job {job_id}, which was never sent")
        for reports, failed in ((results.failed, True), (results.done, False)):
            for job_id in sorted(reports):
                pending = self._jobs.get(job_id)
                if pending is None:
                    continue
                if failed:
                    pending.failed += reports[job_id]
                else:
                    pending.done += reports[job_id]
                if pending.done + pending.failed >= self._world_size:
                    self._finish(pending, ok=not pending.failed)

    def _finish(self, pending: _Pending, *, ok: bool) -> None:
        job = pending.job
        del self._jobs[job.job_id]
        n = len(job.cpu_slots)
        if job.kind == "store":
            tainted = (
                pending.load_failures_at_issue is not None
                and self._load_failures > pending.load_failures_at_issue
            )
            commit = ok and not pending.stale and not tainted
            for slot in job.cpu_slots:
                if commit:
                    self._tier.commit(slot)
                else:
                    self._tier.abort(slot)
            if commit:
                self._counters.add("blocks_stored", n)
                self._counters.add("bytes_stored", n * self._block_bytes)
                if pending.rescue:
                    self._counters.add("blocks_rescued", n)
            else:
                self.aborted_store_blocks += n
        else:
            self._verified(job, ok)
            for slot in job.cpu_slots:
                self._tier.unpin(slot, drop=not ok)  # a failed load's data is suspect
            if ok:
                self._counters.add("blocks_loaded", n)
                self._counters.add("bytes_loaded", n * self._block_bytes)
                self._counters.add("tokens_loaded", pending.tokens)
            elif not pending.stale:  # a given-up load is not an error (see give_up_copies)
                self._counters.add("load_errors", n)
        if pending.touched:
            self._release_touches(pending)

    def _verified(self, job: TransferJob, ok: bool) -> None:
        """A load finished everywhere: its blocks are trusted again, or distrusted from the
        first failed one on (with the request's later blocks, which attended to it)."""
        self._unverified_loads.pop(job.job_id, None)
        for block_id in job.gpu_block_ids:
            left = self._unverified_blocks[block_id] - 1
            if left:
                self._unverified_blocks[block_id] = left
            else:
                del self._unverified_blocks[block_id]
        if job.request_id is not None and self._async_loads.get(job.request_id) == job.job_id:
            del self._async_loads[job.request_id]
        if ok or not job.gpu_block_ids:
            return
        self._load_failures += 1
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

    # -- misc --------------------------------------------------------------------
    def reset(self) -> None:
        """vLLM's ``reset_prefix_cache``: no block stored before it is a hit after it.

        READY entries are dropped (pinned ones when their loads finish) and stores in
        flight are aborted on completion: after a weight update, old KV in the CPU
        tier would silently poison new requests.
        """
        self._tier.reset()
        for pending in self._jobs.values():
            if pending.job.kind == "store":
                pending.stale = True

    def give_up_copies(self) -> None:
        """vLLM is about to empty its caches and the tier (``reset_prefix_cache`` with
        ``reset_connector``, as ``pause_generation(clear_cache=True)`` asks after a weight
        update): give back the GPU blocks the copies hold now, so the pool can be emptied.

        Jobs not sent yet are dropped (no worker has them). Sent stores keep their PENDING
        slots until every worker reported them (a late write may still land there) and are
        then aborted: what they read after vLLM reused a block is never committed. Sent
        synchronous loads keep their pins until reported; their GPU writes are ordered
        before any later compute on the stream that reuses the blocks. Asynchronous loads
        are kept whole: vLLM holds their requests' blocks until every worker reported them
        (and cannot reset before, as with any connector that loads asynchronously).
        """
        for pending in list(self._jobs.values()):
            job = pending.job
            if job.asynchronous:
                continue
            pending.stale = True
            if not pending.sent:
                self._finish(pending, ok=False)
            elif pending.touched:
                self._release_touches(pending)
        # Those not sent yet never will be.
        self._queued_loads = [job for job in self._queued_loads if job.job_id in self._jobs]
        self._queued_stores = [job for job in self._queued_stores if job.job_id in self._jobs]
        self._queued_rescues = [job for job in self._queued_rescues if job.job_id in self._jobs]

    def _release_touches(self, pending: _Pending) -> None:
        job = pending.job
        pending.touched = False
        self._held_gpu_blocks -= len(job.gpu_block_ids)
        if job.kind == "store":
            self._held_store_blocks -= len(job.gpu_block_ids)
        # Last block first, as vLLM frees a request's blocks: where the context lets vLLM
        # place a block (it was held when touched), the request's tail is evicted first.
        self._ctx.free_blocks(job.gpu_block_ids[::-1])

    def restorable(
        self, ref_counts: Sequence[int], block_hashes: Sequence[BlockHash], start: int, computed_blocks: int
    ) -> tuple[int, int]:
        """``(cpu_tokens, offloadable_tokens)`` of a running request, for the victim policy.

        ``ref_counts``: of the request's blocks in order; ``start``: how many leading
        blocks are shared (ref_cnt > 1: they stay on the GPU); ``computed_blocks``:
        full blocks whose KV is computed. From ``start`` on, each block counts as
        ``cpu`` if the tier holds (or is storing) its hash, else as ``offloadable`` if
        it is private, computed and offload is on (a preemption rescues it); the
        first block that is neither ends the run (a resume restores a prefix only).
        Offloadable is capped by the tier size. O(blocks), no context call.
        """
        cpu = offloadable = 0
        parks = self._mode != "off"
        end = min(len(ref_counts), len(block_hashes))
        for i in range(start, end):
            if self._tier.contains(block_hashes[i]):
                cpu += 1
            elif parks and ref_counts[i] == 1 and i < computed_blocks:
                offloadable += 1
            else:
                break
        offloadable = min(offloadable, max(0, self._tier.num_slots - cpu))
        return cpu * self._block_size, offloadable * self._block_size

    @property
    def has_jobs(self) -> bool:
        """Any job planned and not finished: the engine must keep stepping to hear of it."""
        return bool(self._jobs)

    def pending_jobs(self) -> list[TransferJob]:
        """Jobs planned and not finished (queued or sent), oldest first."""
        return [pending.job for pending in self._jobs.values()]

    @property
    def held_store_blocks(self) -> int:
        """GPU blocks touched by pending stores: vLLM gets them back when the stores finish."""
        return self._held_store_blocks

    @property
    def held_gpu_blocks(self) -> int:
        """GPU blocks touched by pending jobs (store sources return to the free queue on completion)."""
        return self._held_gpu_blocks

    def stats(self) -> dict[str, int]:
        """The counter sink's totals plus the diagnostics and the current holdings."""
        stats = self._counters.totals()
        stats["walked_blocks"] = self.walked_blocks
        stats["aborted_store_blocks"] = self.aborted_store_blocks
        stats["cpu_blocks_used"] = self._tier.num_used
        stats["pending_jobs"] = len(self._jobs)
        stats["pins_held"] = self._tier.num_pins
        stats["gpu_blocks_held"] = self._held_gpu_blocks
        return stats

    def _new_job(
        self,
        kind: JobKind,
        gpu_ids: list[int],
        slots: list[int],
        request_id: str | None,
        unavailable: list[int] | None = None,
        *,
        touched: bool = True,
        asynchronous: bool = False,
    ) -> _Pending:
        job = TransferJob(
            self._next_job_id, kind, gpu_ids, slots, request_id, unavailable or [], asynchronous
        )
        self._next_job_id += 1
        pending = _Pending(job, touched=touched)
        if kind == "store" and self._unverified_loads:
            pending.load_failures_at_issue = self._load_failures
        self._jobs[job.job_id] = pending
        if touched:
            self._held_gpu_blocks += len(gpu_ids)
            if kind == "store":
                self._held_store_blocks += len(gpu_ids)
        return pending

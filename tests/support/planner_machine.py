"""Shared test machinery: requests whose block hashes follow their tokens, and
``PlannerMachine``, the stateful property test of the planner that ``tests/unit`` runs on
the reference context and ``tests/sched`` reruns over vLLM's real BlockPool."""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

from hypothesis import strategies as st
from hypothesis import target
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.unit.reference_context import ReferenceContext
from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.context import BlockHash, RequestView, SchedulerContext
from vllm_bidkv.offload import JobResults, OffloadSpec, StepPlan, TransferJob
from vllm_bidkv.offload.disk import DiskSpec, DiskTier
from vllm_bidkv.scheduler_side import BidKVSchedulerSide
from vllm_bidkv.step_events import StepEvents

BS = 4  # tokens per block in these tests


def chain_hashes(tokens: Sequence[int], block_size: int = BS) -> list[BlockHash]:
    """Prefix-chained hashes of the full blocks (like vLLM's block hashes)."""
    hashes: list[BlockHash] = []
    parent = b""
    for start in range(0, len(tokens) - block_size + 1, block_size):
        data = parent + b",".join(str(t).encode() for t in tokens[start : start + block_size])
        parent = hashlib.blake2b(data, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class SimRequest:
    """A ``RequestView`` whose block hashes follow its tokens."""

    def __init__(self, request_id: str, prompt: list[int], max_tokens: int = 8, arrival_time: float = 0.0):
        self.request_id = request_id
        self.tokens = list(prompt)
        self.num_prompt_tokens = len(prompt)
        self.num_computed_tokens = 0
        self.max_tokens: int | None = max_tokens
        self.num_preemptions = 0
        self.priority = 0
        self.arrival_time = arrival_time

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_output_tokens(self) -> int:
        return len(self.tokens) - self.num_prompt_tokens

    @property
    def block_hashes(self) -> list[BlockHash]:
        return chain_hashes(self.tokens)


def tokens(tag: int, n: int) -> list[int]:
    return [tag * 1000 + i for i in range(n)]


# -- the stateful property test ----------------------------------------------------------
class VllmSide(Protocol):
    """What ``PlannerMachine`` drives as vLLM (``ReferenceContext`` has it; sched: a BlockPool)."""

    def allocate(self, request_id: str, num_blocks: int) -> list[int] | None: ...
    def acquire(self, request_id: str, block_ids: Sequence[int]) -> None: ...
    def release(self, request_id: str) -> list[int]: ...
    def cache(self, block_id: int, block_hash: BlockHash) -> None: ...
    def lookup(self, block_hash: BlockHash) -> int | None: ...
    def free_order(self) -> list[int]: ...
    def num_free_blocks(self) -> int: ...


PoolFactory = Callable[[int, int], tuple[SchedulerContext, VllmSide]]


def reference_pool(num_blocks: int, block_size: int) -> tuple[SchedulerContext, VllmSide]:
    ctx = ReferenceContext(num_blocks, block_size)
    return ctx, ctx


FAMILIES = [tokens(900 + f, 4 * BS) for f in range(2)]  # shared prompt prefixes
NUM_BLOCKS = 14  # including the null block: small, so vLLM evicts and the CPU tier gets hits


class MachineContext:
    """The machine's pool context plus the request views vLLM's Scheduler would give."""

    def __init__(self, pool: SchedulerContext, machine: PlannerMachine) -> None:
        self._pool = pool
        self._machine = machine

    def __getattr__(self, name: str) -> object:
        return getattr(self._pool, name)

    def request_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        held = self._machine.blocks.get(request_id)
        return (list(held),) if held else ()

    def request_ref_counts(self, request_id: str) -> list[int]:
        return [self._pool.get_block(b).ref_cnt for b in self._machine.blocks.get(request_id, ())]

    def get_request(self, request_id: str) -> RequestView | None:
        return self._machine.requests.get(request_id)

    def running(self) -> Sequence[RequestView]:
        return self._machine.running


class PlannerMachine(RuleBasedStateMachine):
    """A small vLLM around the planner: requests arrive, prefill (with GPU and CPU prefix
    hits), decode, finish, abort, get preempted and resume; workers complete or fail jobs
    late and in any order. Content is tracked per GPU block and CPU slot, so a copy from or
    into a block that was reused, or a load of a wrong slot, is caught. A shadow reference
    pool replays vLLM's operations without the planner: the free order must match it.
    With a disk tier (``disk_slots`` > 0) the disk slots' content is tracked too: a spill
    lands as late as possible, a promotion reads at issue; at the end a new disk tier on the
    same directory restores exactly the READY entries.
    """

    make_pool: PoolFactory = staticmethod(reference_pool)
    # The reference model keeps every block the planner holds at the place vLLM's LRU order
    # gives it; an adapter over real vLLM only promises that for blocks touched while free
    # and freed with nothing in between, and may compare the free set only.
    exact_free_order = True

    @initialize(
        mode=st.sampled_from(["auto", "lazy", "eager"]),
        eviction=st.sampled_from(["lru", "bid"]),
        world_size=st.sampled_from([1, 2]),
        slots=st.integers(2, 12),
        disk_slots=st.sampled_from([0, 0, 2, 6, 16]),
    )
    def setup(self, mode: str, eviction: str, world_size: int, slots: int, disk_slots: int) -> None:
        self.ctx, self.vllm = self.make_pool(NUM_BLOCKS, BS)
        self.shadow = ReferenceContext(NUM_BLOCKS, BS)
        config = BidKVConfig(
            victim_policy="vllm-default", offload_mode=mode, cpu_eviction=eviction, lazy_lookahead_steps=2.0
        )
        self.disk_dir = tempfile.mkdtemp(prefix="bidkv-machine-") if disk_slots else None
        disk = DiskSpec(self.disk_dir, disk_slots, (("model", "m"),)) if self.disk_dir else None
        spec = OffloadSpec.from_config(
            config, num_slots=slots, world_size=world_size, min_clean_blocks=3, disk=disk
        )
        self.side = BidKVSchedulerSide(config, offload=spec)
        self.side.bind(MachineContext(self.ctx, self))
        assert self.side.planner is not None
        self.planner, self.tier = self.side.planner, self.side.planner.tier
        if self.planner.disk is not None:
            assert self.planner.disk.open({"prefix_hash_root": "r"}) == 0
        self.disk: dict[int, BlockHash | None] = {}  # disk slot -> hash whose KV it holds
        self.world_size = world_size
        self.waiting: list[SimRequest] = []
        self.running: list[SimRequest] = []
        self.blocks: dict[str, list[int]] = {}  # running request -> its blocks (machine's own record)
        self.gpu: dict[int, BlockHash | None] = {}  # block -> hash whose KV its bytes hold
        self.written: set[int] = set()  # blocks whose bytes are their current owner's KV
        self.requests: dict[str, SimRequest] = {}  # live (waiting or running) requests
        self.preempted_now: list[str] = []  # preempted in this step (vLLM's preempted_req_ids)
        self.resumed_now: list[str] = []
        self.rescues: set[int] = set()  # job ids of rescues (copied when emitted; no touch)
        self.cpu: dict[int, BlockHash | None] = {}  # slot -> hash whose KV it holds
        self.sent: dict[int, tuple[TransferJob, int]] = {}  # job -> acks reported so far
        self.finished_jobs: list[int] = []
        self.emitted: set[int] = set()
        self.preempted: set[str] = set()
        self.allocated = 0
        self.next_id = 0

    # -- vLLM --------------------------------------------------------------------------
    def _allocate(self, request_id: str, n: int) -> list[int] | None:
        ids = self.vllm.allocate(request_id, n)
        if ids is not None:
            self.shadow.take(request_id, ids)
            self.blocks[request_id].extend(ids)
            self.allocated += n
            # The bytes stay what they were (a rescue may still read them) until computed or loaded.
            self.written.difference_update(ids)
        return ids

    def _release(self, request: SimRequest) -> list[int]:
        held = self.blocks.pop(request.request_id)
        self.vllm.release(request.request_id)
        self.shadow.release(request.request_id)
        return held

    def _admit(self, request: SimRequest, lose_hit: bool) -> bool:
        hashes = request.block_hashes
        hits: list[int] = []
        for block_hash in hashes[: (request.num_tokens - 1) // BS]:
            block_id = self.vllm.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        computed = len(hits) * BS
        self.requests[request.request_id] = request
        external = self.side.match(request, computed)
        need = math.ceil(request.num_tokens / BS) - len(hits)
        free_hits = sum(1 for b in hits if self.ctx.get_block(b).ref_cnt == 0)
        if self.vllm.num_free_blocks() - free_hits < need:
            return False
        self.blocks[request.request_id] = []
        self.vllm.acquire(request.request_id, hits)
        self.shadow.acquire(request.request_id, hits)
        self.blocks[request.request_id].extend(hits)
        for i, block_id in enumerate(hits):
            assert self.gpu[block_id] == hashes[i], f"GPU prefix hit on block {block_id} with wrong KV"
        assert self._allocate(request.request_id, need) is not None
        if request.request_id in self.preempted:
            self.preempted.discard(request.request_id)
            self.resumed_now.append(request.request_id)
        if external:
            ids = self.blocks[request.request_id]
            last = (computed + external - 1) // BS
            if lose_hit:  # the last matched entry leaves the tiers before the allocation
                self.tier.drop(hashes[last])
                if self.planner.disk is not None:
                    self.planner.disk.index.drop(hashes[last])
            unavailable = self.side.after_alloc(request, ids, external)
            if unavailable != (ids[last : last + 1] if lose_hit else []):
                # A CPU hit is always served; a disk hit is lost (recomputed) when its promotion
                # has no CPU slot (every one pinned or pending, or a store of it in flight).
                first = ids.index(unavailable[0])
                assert self.planner.disk is not None and self.tier.lookup(hashes[first]) is None
                assert self.tier.num_free == 0 or self.tier.contains(hashes[first])
                assert unavailable == ids[first : last + 1]
        request.num_computed_tokens = computed + external
        return True

    def _forward(self, request: SimRequest) -> None:
        """Compute what is not computed yet; full blocks enter the prefix cache."""
        ids = self.blocks[request.request_id]
        for i, block_hash in enumerate(request.block_hashes):
            block_id = ids[i]
            if block_id not in self.written:
                self.gpu[block_id] = block_hash
                self.written.add(block_id)
            assert self.gpu[block_id] == block_hash, f"block {block_id} holds wrong KV"
            if self.ctx.get_block(block_id).block_hash is None:
                self.vllm.cache(block_id, block_hash)
                self.shadow.cache(block_id, block_hash)
        request.num_computed_tokens = request.num_tokens

    def _preempt(self, preemptible: list[SimRequest], requester: SimRequest | None) -> SimRequest:
        """The victim hook asks the scheduler side, then vLLM preempts its pick."""
        request = self.side.choose_victim(preemptible, requester)
        assert request is preemptible[-1], "vllm-default keeps vLLM's victim"
        assert isinstance(request, SimRequest)
        self.running.remove(request)
        self._release(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.waiting.insert(0, request)
        self.preempted.add(request.request_id)
        self.preempted_now.append(request.request_id)  # the connector hears of it at the step's plan
        return request

    def _finish(self, request: SimRequest) -> None:
        held = self.blocks.get(request.request_id, [])
        self.side.finished(request, list(held))
        if request in self.running:
            self.running.remove(request)
            self._release(request)
        else:
            self.waiting.remove(request)
        self.preempted.discard(request.request_id)
        self.requests.pop(request.request_id, None)
        self.preempted_now = [r for r in self.preempted_now if r != request.request_id]

    def _plan(self, allocated: int) -> StepPlan:
        events = StepEvents(allocated, list(self.resumed_now), list(self.preempted_now))
        self.preempted_now, self.resumed_now = [], []
        return self.side.plan_step(events)

    def _emit(self, plan: StepPlan) -> None:
        for job in plan.rescues:  # rescues: the bytes must still be the victim's
            self.rescues.add(job.job_id)
            for block_id, slot in zip(job.gpu_block_ids, job.cpu_slots, strict=True):
                assert self.gpu[block_id] == self.tier.hash_of(slot), (
                    f"rescue of overwritten block {block_id}"
                )
                self.cpu[slot] = self.gpu[block_id]
        for job in plan.loads:
            ids = self.blocks[job.request_id or ""]
            request = next(r for r in self.running if r.request_id == job.request_id)
            for slot, disk_slot in zip(job.cpu_slots, job.disk_slots, strict=False):
                if disk_slot >= 0:  # a promotion: read from disk at issue, before the copy
                    assert self.planner.disk is not None
                    assert self.disk.get(disk_slot) == self.planner.disk.index.hash_of(disk_slot)
                    self.cpu[slot] = self.disk[disk_slot]
            for block_id, slot in zip(job.gpu_block_ids, job.cpu_slots, strict=True):
                expected = request.block_hashes[ids.index(block_id)]
                assert self.cpu.get(slot) == expected, f"load of slot {slot} into block {block_id}: wrong KV"
                self.gpu[block_id] = self.cpu[slot]
                self.written.add(block_id)
        for job in plan.stores:
            for block_id, slot in zip(job.gpu_block_ids, job.cpu_slots, strict=True):
                assert self.ctx.get_block(block_id).block_hash == self.tier.hash_of(slot)
        for job in plan.jobs():
            self.sent[job.job_id] = (job, 0)
            self.emitted.add(job.job_id)

    # -- rules ---------------------------------------------------------------------------
    @precondition(lambda self: len(self.waiting) + len(self.running) < 6)
    @rule(
        family=st.integers(0, 1),
        prefix_blocks=st.integers(0, 4),
        suffix=st.integers(1, 6),
        out=st.integers(1, 8),
    )
    def arrive(self, family: int, prefix_blocks: int, suffix: int, out: int) -> None:
        self.next_id += 1
        prompt = FAMILIES[family][: prefix_blocks * BS] + tokens(self.next_id, suffix)
        self.waiting.append(SimRequest(f"r{self.next_id}", prompt, max_tokens=out))

    @rule(steps=st.integers(1, 4), dice=st.integers(0, 2))
    def step(self, steps: int, dice: int) -> None:
        for _ in range(steps):
            self._step(lose_hit=dice == 0)

    def _step(self, lose_hit: bool) -> None:
        """One scheduler step: decode the running, admit the waiting, plan, forward."""
        for request in list(self.running):
            if request not in self.running:
                continue  # preempted below for an earlier request
            request.tokens.append(hash((request.request_id, request.num_tokens)) % 997)
            while len(self.blocks[request.request_id]) * BS < request.num_tokens:
                if self._allocate(request.request_id, 1) is not None:
                    break
                victim = self._preempt(self.running[self.running.index(request) :], request)
                if victim is request:
                    break
        while self.waiting and self._admit(self.waiting[0], lose_hit):
            self.running.append(self.waiting.pop(0))
        plan = self._plan(self.allocated)
        self.allocated = 0
        self._emit(plan)
        for request in self.running:
            self._forward(request)
        for request in [r for r in self.running if r.num_output_tokens >= (r.max_tokens or 0)]:
            self._finish(request)

    @rule(blocks=st.integers(1, NUM_BLOCKS))
    def flood(self, blocks: int) -> None:
        """A burst of unhashed allocations (a long prefill) pushes cached blocks out of HBM."""
        self.next_id += 1
        request_id = f"flood{self.next_id}"
        self.blocks[request_id] = []
        self._allocate(request_id, min(blocks, self.vllm.num_free_blocks()))
        self._release(SimRequest(request_id, []))

    @precondition(lambda self: self.sent)
    @rule(data=st.data(), jobs=st.integers(1, 4))
    def transfers_done(self, data: st.DataObject, jobs: int) -> None:
        for _ in range(jobs):
            if self.sent:
                self._transfer_done(data)

    def _transfer_done(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.sent)))
        job, acks = self.sent[job_id]
        count = data.draw(st.integers(1, self.world_size - acks))
        if acks + count == self.world_size:
            del self.sent[job_id]
            self.finished_jobs.append(job_id)
            if job.kind == "store" and job_id not in self.rescues:  # the copy lands now, as late as possible
                for block_id, slot in zip(job.gpu_block_ids, job.cpu_slots, strict=True):
                    assert self.gpu[block_id] == self.tier.hash_of(slot), (
                        f"store from reused block {block_id}"
                    )
                    self.cpu[slot] = self.gpu[block_id]
            if job.kind == "spill":  # the write reads the CPU row now: it must still be the entry's
                for slot, disk_slot in zip(job.cpu_slots, job.disk_slots, strict=True):
                    assert self.planner.disk is not None
                    # (the CPU entry may be orphaned by a reset meanwhile: the pin keeps its bytes)
                    assert self.cpu.get(slot) == self.planner.disk.index.hash_of(disk_slot)
                    self.disk[disk_slot] = self.cpu[slot]
        else:
            self.sent[job_id] = (job, acks + count)
        self.side.complete(JobResults(done={job_id: count}))

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def transfer_failed(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(sorted(self.sent)))
        job, acks = self.sent.pop(job_id)
        self.finished_jobs.append(job_id)
        if job.kind == "store":
            for slot in job.cpu_slots:
                self.cpu[slot] = None  # a torn copy
        for disk_slot in job.disk_slots if job.kind == "spill" else []:
            self.disk[disk_slot] = None
        # One worker failed it; the others report it done, in any order: the job ends with the last.
        failed_first = data.draw(st.booleans())
        rest = JobResults(done={job_id: self.world_size - acks - 1}) if self.world_size - acks > 1 else None
        if rest is not None and not failed_first:
            self.side.complete(rest)
            assert job in self.planner.ledger.jobs(), "finished before every worker reported"
        self.side.complete(JobResults(failed={job_id: 1}))
        if rest is not None and failed_first:
            assert job in self.planner.ledger.jobs(), "a failure on one worker finished the job early"
            self.side.complete(rest)

    @precondition(lambda self: self.finished_jobs)
    @rule(data=st.data())
    def duplicate_report(self, data: st.DataObject) -> None:
        job_id = data.draw(st.sampled_from(self.finished_jobs))
        before = self.planner.stats()
        self.side.complete(JobResults(done={job_id: 1}, failed={job_id: 1}))
        assert self.planner.stats() == before

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        self._finish(data.draw(st.sampled_from(self.running)))

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def abort_waiting(self, data: st.DataObject) -> None:
        self._finish(data.draw(st.sampled_from(self.waiting)))

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def preempt(self, data: st.DataObject) -> None:
        self._preempt([data.draw(st.sampled_from(self.running))], None)

    @rule(dice=st.integers(0, 9))
    def reset_cache(self, dice: int) -> None:
        if dice == 0:  # rare: it empties the CPU tier
            self.side.reset()

    # -- invariants ------------------------------------------------------------------------
    def _touched(self) -> Counter[int]:
        jobs = self.planner.ledger.jobs()
        return Counter(b for job in jobs if job.job_id not in self.rescues for b in job.gpu_block_ids)

    @invariant()
    def references_balance(self) -> None:
        if not hasattr(self, "planner"):
            return
        holders = Counter(b for ids in self.blocks.values() for b in ids)
        touched = self._touched()
        for block_id in range(1, NUM_BLOCKS):
            ref_cnt = self.ctx.get_block(block_id).ref_cnt
            assert ref_cnt == holders[block_id] + touched[block_id], (
                f"block {block_id}: ref_cnt {ref_cnt}, held by requests {holders[block_id]}, "
                f"by jobs {touched[block_id]}"
            )

    @invariant()
    def tier_consistent(self) -> None:
        if not hasattr(self, "planner"):
            return
        self.planner.check()  # the ledger, the load trust, the walk and the tier
        assert self.tier.num_used <= self.tier.num_slots
        pending = self.planner.ledger.jobs()
        loads = [job for job in pending if job.kind == "load"]
        promotions = sum(d >= 0 for job in loads for d in job.disk_slots)
        spilling = sum(len(job.cpu_slots) for job in pending if job.kind == "spill")
        # A load pins its CPU hits (its promotions' slots are PENDING); a spill pins its sources.
        assert self.tier.num_pins == sum(len(job.cpu_slots) for job in loads) - promotions + spilling
        if self.planner.disk is not None:
            assert self.planner.disk.index.num_pins == promotions
        # Sent jobs stay pending until every worker reported them (or one failed them).
        assert {job.job_id for job in pending if job.job_id in self.emitted} == set(self.sent)

    @invariant()
    def free_order_unchanged(self) -> None:
        if not hasattr(self, "planner"):
            return
        touched = self._touched()
        expected = [b for b in self.shadow.free_order() if b not in touched]
        self._same_free_queue(self.vllm.free_order(), expected)

    def _same_free_queue(self, actual: list[int], expected: list[int]) -> None:
        if self.exact_free_order:
            assert actual == expected
        else:
            assert sorted(actual) == sorted(expected)

    def teardown(self) -> None:
        """Drain: finish every request and job; then nothing is held and the order is stock."""
        if not hasattr(self, "planner"):
            return
        # Steer generation towards runs where the CPU tier serves hits.
        target(float(self.side.counters["cpu_hit_blocks"]), label="cpu hit blocks")
        for request in [*self.running, *self.waiting]:
            self._finish(request)
        for _ in range(100):
            self._emit(self._plan(0))
            if not self.sent:
                break
            for job_id, (_job, acks) in list(self.sent.items()):
                self.side.complete(JobResults(done={job_id: self.world_size - acks}))
            self.sent.clear()
        assert self.planner.ledger.jobs() == []
        assert self.side.requests == {}, "every request's record goes when it finishes"
        assert all(self.ctx.get_block(b).ref_cnt == 0 for b in range(1, NUM_BLOCKS))
        self._same_free_queue(self.vllm.free_order(), self.shadow.free_order())
        assert self.tier.num_pins == 0
        self.tier.check()
        disk = self.planner.disk
        if disk is not None and self.disk_dir is not None:
            disk.close()
            index = disk.index
            ready = {h: index.lookup(h) for h in map(index.hash_of, range(index.num_slots)) if h is not None}
            again = DiskTier(disk.spec, type(self.side.counters)())
            restored = again.open({"prefix_hash_root": "r"})
            assert {h: again.index.lookup(h) for h in ready} == ready, "each READY entry in its slot"
            assert restored == sum(slot is not None for slot in ready.values()), "and nothing else"
            again.close()
            shutil.rmtree(self.disk_dir)

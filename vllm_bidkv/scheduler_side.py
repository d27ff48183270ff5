"""The connector's scheduler side: victims, admission, the CPU tier's planner, one record per request.

``BidKVConnector`` (scheduler role) delegates every hook here. Pure: no vLLM import; it sees
vLLM only through the ``SchedulerContext`` it is bound to, vLLM's requests (``RequestView``)
and ``StepEvents``, which the ``patches`` layer reads out of each release's
``SchedulerOutput``. The planner's property tests drive this class as vLLM would.

The path of one request through it:

* ``match`` (``get_num_new_matched_tokens``, each time vLLM tries to admit it)
  creates its ``RequestState`` on first sight and looks its blocks up in the tier;
* ``after_alloc`` (``update_state_after_alloc``) plans the load of that hit;
* ``wait_for_frees`` (the victim hook, when allocation fails while a store holds free
  blocks) says whether vLLM waits for them: only when the victim would cost more than a step;
* ``choose_victim`` (the victim hook, when allocation fails) builds a ``Candidate``
  per preemptible request (once a step: ``StepCandidates``) and the ``Decision``
  (requester, shortfall), asks the strategy and records the victim's blocks;
* ``plan_step`` (``build_connector_meta``, once per step) rescues this step's
  victims, protects their CPU entries until they resume, counts what a resumed
  victim recomputes, offers running requests' newly cached blocks to the tier
  (``auto``) and returns the step's transfer plan;
* ``finished`` (``request_finished``, for finished and aborted requests alike)
  is the one place a record is removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.context import BlockHash, RequestView, SchedulerContext
from vllm_bidkv.counters import GAUGES, Counters
from vllm_bidkv.offload import CpuBlockTier, JobResults, OffloadPlanner, OffloadSpec, StepPlan
from vllm_bidkv.offload.disk import DiskTier
from vllm_bidkv.offload.lookup import StepCandidates, shortfall_blocks
from vllm_bidkv.policy import BidCostModel, Candidate, Decision, VictimStrategy, admission_key, make_strategy
from vllm_bidkv.policy.admission import AdmissionKey, CacheAwareAdmission
from vllm_bidkv.policy.strategies import ScoredStrategy
from vllm_bidkv.step_events import StepEvents


@dataclass(eq=False)  # identity: one record per request
class RequestState:
    """What the scheduler side knows about one request, from first sight to ``finished``."""

    matched_tokens: int = 0
    """Tokens its last ``match`` found computed (GPU hit + CPU hit)."""
    gpu_tokens_before_hit: int | None = None
    """GPU prefix hit behind the last CPU hit, until ``after_alloc`` plans its load; None: no hit."""
    load_asynchronously: bool = False
    """The last CPU hit is large enough to load while the batch runs on (``async_load_min_tokens``)."""
    computed_at_preemption: int | None = None
    """Computed tokens when our strategy chose it as a victim, until it resumes."""
    victim_blocks: list[tuple[int, BlockHash | None]] = field(default_factory=list)
    """Its blocks and their hashes when it was chosen: rescued at this step's plan, then dropped."""
    protected: list[BlockHash] = field(default_factory=list)
    """Hashes protected in the tier while it waits to resume (bid eviction)."""
    next_store_block: int = 0
    """``offload_mode`` auto: its first block not yet offered to the tier at compute time."""


class BidKVSchedulerSide:
    """Strategy, planner and per-request records of one scheduler (see module doc)."""

    def __init__(
        self,
        config: BidKVConfig,
        *,
        offload: OffloadSpec | None = None,
        async_scheduling: bool = False,
        frees_running_blocks: bool = False,
    ) -> None:
        """``offload``: what the CPU tier and its planner are built from, given exactly when
        offload is on (``OffloadSpec.from_config``); ``async_scheduling``: vLLM schedules a
        step ahead of the last output, so every load is asynchronous (below);
        ``frees_running_blocks``: vLLM's allocation may free blocks of requests it did not
        preempt (a sliding window's), so victim pricings do not last the step."""
        if config.offload_enabled != (offload is not None):
            raise ValueError(
                f"vllm-bidkv: offload_mode={config.offload_mode!r} "
                + ("needs the CPU tier's spec (slots)" if offload is None else "builds no CPU tier")
            )
        self.config = config
        self.counters = Counters()
        self.strategy: VictimStrategy = make_strategy(config.victim_policy, config)
        self._cost = BidCostModel.from_config(config)  # δ of a victim, for wait_for_frees
        self._wait: bool | None = None  # wait_for_frees' answer until vLLM asks for it
        # wait_for_frees' pick when it answered "preempt": choose_victim's for the same list
        self._priced: tuple[Sequence[RequestView], Candidate] | None = None
        self._candidates = StepCandidates(last_the_step=not frees_running_blocks)
        self.requests: dict[str, RequestState] = {}
        self.ctx: SchedulerContext | None = None
        self.planner: OffloadPlanner | None = None
        self._offload = offload
        self._victims: list[RequestState] = []  # chosen in this schedule(), blocks not yet rescued
        # ``auto``: requests with computed blocks not offered yet (vLLM had not hashed one: under
        # async scheduling a decode's token is known a step after it was scheduled), to be in
        # ``StepEvents.filled`` each step they are scheduled.
        self.offers_behind: set[str] = set()
        # Under async scheduling a synchronous load's failure arrives after the next step was
        # scheduled; if that step preempts the request, vLLM has cached the blocks and never
        # repairs them. An asynchronous load's blocks are cached only once it succeeded.
        self._async_load_min_tokens = 0 if async_scheduling else config.async_load_min_tokens

    def bind(self, ctx: SchedulerContext) -> None:
        self.ctx, spec = ctx, self._offload
        if spec is not None:
            tier = CpuBlockTier(spec.num_slots, spec.eviction, self.counters, announce=spec.announce)
            disk = (
                DiskTier(spec.disk, self.counters, announce=spec.announce) if spec.disk is not None else None
            )
            self.planner = OffloadPlanner(ctx, tier, spec, self.counters, disk)

    @property
    def active(self) -> bool:
        return self.config.active

    def admission_key(self) -> AdmissionKey | CacheAwareAdmission | None:
        config, tier_hit = self.config, (self.planner.match if self.planner is not None else None)
        return admission_key(config.admission, config.admission_max_bypass, tier_hit) if self.active else None

    def has_pending_block_frees(self) -> bool:
        """Asked by vLLM (0.30+) when an allocation failed: True, it waits a step instead of
        preempting. ``wait_for_frees`` answered for this failure if the victim hook saw its
        requester; else (PRIORITY policy) any free block a store in flight holds counts."""
        wait, self._wait = self._wait, None
        return wait if wait is not None else self.planner is not None and self.planner.holds_free_blocks()

    def wait_for_frees(self, requests: Sequence[RequestView], requester: RequestView) -> bool:
        """Whether vLLM should wait for a store's blocks rather than preempt for ``requester``.

        ``requests``: the preemptible ones, vLLM's pick last. A wait delays the requester and
        every request behind it by a step; a preemption costs its victim δ. So wait only
        while a store holds a free block and the victim ``choose_victim`` would pick costs
        more than a step (δ > ``bid_step_cost``). Asked by the victim hook, the answer is kept
        for vLLM's next ``has_pending_block_frees``; a source-patched vLLM asks this in its place
        and takes the return value. A pick it preempts is ``choose_victim``'s for the same
        ``requests`` (one decision).
        """
        self._wait, self._priced = False, None
        if self.active and requests and self.planner is not None and self.planner.holds_free_blocks():
            chosen = self._pick(requests, requester)
            self._wait = self._cost.delta(chosen) > self.config.bid_step_cost
            self._priced = None if self._wait else (requests, chosen)
        return self._wait

    def _state(self, request_id: str) -> RequestState:
        state = self.requests.get(request_id)
        if state is None:
            state = self.requests[request_id] = RequestState()
        return state

    # -- victims -------------------------------------------------------------------
    def choose_victim(
        self, requests: Sequence[RequestView], requester: RequestView | None = None
    ) -> RequestView | None:
        """The victim among vLLM's preemptible running requests (the last one is vLLM's pick).

        ``requester``: the request whose allocation failed, if known (it may be among
        ``requests``). None when inactive: vLLM's choice stands. A strategy that
        abstains also leaves vLLM's pick, which is then recorded like any other.
        """
        if not self.active or not requests:
            return None
        priced, self._priced = self._priced, None
        chosen = priced[1] if priced and priced[0] is requests else self._pick(requests, requester)
        victim = requests[chosen.order]
        self.strategy.preempted(chosen)
        self.counters.add("preemptions")
        self.counters.add("preempted_blocks_freed", chosen.freeable_blocks)
        state = self._state(victim.request_id)
        state.computed_at_preemption = chosen.computed_tokens
        ctx = self.ctx
        assert ctx is not None, "bind() first"
        self._candidates.preempting(ctx, victim.request_id)
        if self.planner is not None:
            groups = ctx.request_block_ids(victim.request_id)
            ids = groups[0] if groups else []
            state.victim_blocks = [(b, ctx.get_block(b).block_hash) for b in ids]
            self._victims.append(state)
        return victim

    def _pick(self, requests: Sequence[RequestView], requester: RequestView | None) -> Candidate:
        r, ctx, tier = requester, self.ctx, self.planner.tier if self.planner is not None else None
        assert ctx is not None, "bind() first"
        decision = Decision() if r is None else Decision(r.request_id, shortfall_blocks(ctx, r))
        if isinstance(self.strategy, ScoredStrategy):  # one key: priced only where it may win
            return self._candidates.best(ctx, tier, requests, self.strategy, decision)
        candidates = self._candidates.price(ctx, tier, requests)
        return self.strategy.choose(candidates, decision) or candidates[-1]

    # -- loads ---------------------------------------------------------------------
    def match(self, request: RequestView, num_computed_tokens: int) -> int:
        """Tokens after the GPU prefix hit the CPU tier supplies (vLLM's external hit)."""
        state = self._state(request.request_id)
        hit = self.planner.match(request, num_computed_tokens) if self.planner is not None else 0
        state.matched_tokens = num_computed_tokens + hit
        state.gpu_tokens_before_hit = num_computed_tokens if hit else None
        state.load_asynchronously = hit > 0 and hit >= self._async_load_min_tokens
        return hit

    def load_is_async(self, request_id: str) -> bool:
        """Whether the hit the last ``match`` found loads asynchronously (vLLM's ``load_kv_async``)."""
        state = self.requests.get(request_id)
        return state is not None and state.gpu_tokens_before_hit is not None and state.load_asynchronously

    def after_alloc(
        self, request: RequestView, gpu_block_ids: list[int], num_external_tokens: int
    ) -> list[int]:
        """vLLM allocated the request's blocks; load the CPU hit ``match`` promised into them.

        Returns the GPU blocks of the hit the tier lost since ``match`` (see
        ``OffloadPlanner.plan_load``; the worker reports them as load errors).
        """
        state = self.requests.get(request.request_id)
        if self.planner is None or state is None or state.gpu_tokens_before_hit is None:
            return []
        gpu_hit, state.gpu_tokens_before_hit = state.gpu_tokens_before_hit, None
        if not num_external_tokens:  # our hit was not taken (a MultiConnector sibling's was)
            state.matched_tokens = gpu_hit
            return []
        return self.planner.plan_load(
            request.request_id, request.block_hashes, gpu_block_ids, gpu_hit, num_external_tokens,
            asynchronous=state.load_asynchronously,
        )  # fmt: skip

    # -- steps -----------------------------------------------------------------------
    def plan_step(self, events: StepEvents) -> StepPlan:
        """The step's transfers (rescues of its victims, loads, stores); call once per step."""
        self._candidates.new_step()
        for request_id in events.resumed:
            state = self.requests.get(request_id)
            if state is None:
                continue
            self._unprotect(state)
            state.next_store_block = 0  # its blocks now: a load may have written the first ones
            if state.computed_at_preemption is not None:
                lost = state.computed_at_preemption - state.matched_tokens
                self.counters.add("recomputed_tokens", max(0, lost))
                state.computed_at_preemption = None
        if self.planner is None:
            return StepPlan()
        for request_id in events.preempted:
            request = self.ctx.get_request(request_id) if self.ctx is not None else None
            state = self.requests.get(request_id)
            if request is None or state is None:
                continue
            self._unprotect(state)
            state.protected = list(request.block_hashes)
            self.planner.tier.protect(state.protected)
            blocks = [(b, None if b in events.zeroed_blocks else h) for b, h in state.victim_blocks]
            self.planner.rescue(request_id, blocks)
        for state in self._victims:  # a rescue is valid only until this step's forward
            state.victim_blocks = []
        self._victims = []
        if self.config.offload_mode == "auto" and self.ctx is not None:
            self._offer_computed(events)
        return self.planner.plan_step(events.blocks_allocated)

    def _offer_computed(self, events: StepEvents) -> None:
        """``auto``: offer the tier the blocks this step's forward computes. Only ``events.filled``
        (with those behind) can have any: O(those), not O(scheduled) each step."""
        assert self.ctx is not None and self.planner is not None
        block_size, behind = self.ctx.block_size, self.offers_behind
        for request_id, computed in events.filled.items():
            state = self.requests.get(request_id)
            if state is None:
                continue
            full_blocks = computed // block_size
            if full_blocks > state.next_store_block:
                request = self.ctx.get_request(request_id)
                if request is not None:
                    state.next_store_block = self.planner.store_computed(request, state.next_store_block)
            if full_blocks > state.next_store_block:
                behind.add(request_id)
            else:
                behind.discard(request_id)

    def complete(self, results: JobResults) -> None:
        """Workers' job results (``update_connector_output``)."""
        if self.planner is not None:
            self.planner.complete(results)
            if self.planner.disk is not None and results:
                # Journal the disk writes just finished now: an engine that goes idle (and is
                # then killed) keeps them across a restart, without waiting for a next step.
                self.planner.disk.sync()

    def finished(self, request: RequestView, block_ids: Sequence[int]) -> bool:
        """vLLM finished or aborted the request (it still holds ``block_ids``): drop its record.

        Returns:
            True if vLLM must keep the request's blocks until the workers report its
            asynchronous load finished (``request_finished``'s ``delay_free_blocks``).
        """
        state = self.requests.pop(request.request_id, None)
        self.offers_behind.discard(request.request_id)
        if state is not None:
            self._unprotect(state)
            self._victims = [s for s in self._victims if s is not state]
        if self.planner is None:
            return False
        self.planner.store_finished(request, block_ids)
        return self.planner.ledger.async_load_in_flight(request.request_id)

    def has_jobs_in_flight(self) -> bool:
        """Copies planned and not finished on every worker: vLLM keeps stepping to hear of
        them (``has_pending_push_work``), so an idle engine holds no block, pin or slot."""
        return self.planner is not None and len(self.planner.ledger) > 0

    def reset(self) -> None:
        """vLLM's ``reset_prefix_cache``: nothing stored before it is a hit after it."""
        if self.planner is not None:
            self.planner.reset()

    def give_up_copies(self) -> None:
        """vLLM empties its caches and the tier next: see ``OffloadPlanner.give_up_copies``."""
        if self.planner is not None:
            self.planner.give_up_copies()

    def gauges(self) -> dict[str, int]:
        """The current values of every ``counters.GAUGES`` name (stats reports, ``/metrics``).

        O(1): read each step. Idle (no request, no job): the ``IDLE_ZERO_GAUGES`` are 0.
        """
        values = dict.fromkeys(GAUGES, 0)
        values["tracked_requests"] = len(self.requests)
        if self.planner is not None and self._offload is not None:
            tier, block_bytes, ledger = self.planner.tier, self._offload.block_bytes, self.planner.ledger
            values.update(
                tier_capacity_bytes=tier.num_slots * block_bytes,
                tier_used_bytes=tier.num_used * block_bytes,
                tier_entries=tier.num_used,
                tier_pinned_entries=tier.num_pins,
                stores_in_flight=ledger.in_flight.get("store", 0),
                loads_in_flight=ledger.in_flight.get("load", 0),
                gpu_blocks_held=ledger.held_gpu_blocks,
            )
            disk = self.planner.disk
            if disk is not None:
                values.update(
                    disk_capacity_bytes=disk.index.num_slots * block_bytes,
                    disk_used_bytes=disk.index.num_used * block_bytes,
                )
        return values

    def _unprotect(self, state: RequestState) -> None:
        if state.protected and self.planner is not None:
            self.planner.tier.unprotect(state.protected)
        state.protected = []

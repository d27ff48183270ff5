"""``cache-aware`` admission (vllm_bidkv.policy.admission), no vLLM: the work left, the aging
bound, and the order against a plain model of it under arbitrary arrivals, hits and pops."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.planner_machine import BS, SimRequest, tokens
from tests.unit.test_scheduler_side import Rig, park_prompt
from vllm_bidkv.config import ADMISSIONS, BidKVConfig
from vllm_bidkv.policy.admission import (
    CacheAwareAdmission,
    CacheAwareOrder,
    admission_key,
)
from vllm_bidkv.scheduler_side import BidKVSchedulerSide

pytestmark = pytest.mark.unit


@dataclasses.dataclass
class Req:
    request_id: str
    num_tokens: int
    arrival_time: float
    num_computed_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return self.num_tokens


def order_of(bound: int, work: dict[str, int], cap: int = 1000) -> CacheAwareOrder[Any]:
    return CacheAwareOrder(bound, lambda r: work[r.request_id], cap)


def drain(order: CacheAwareOrder[Any]) -> list[str]:
    popped = []
    while len(order):
        popped.append(order.pop().request_id)
    return popped


# -- the pieces ---------------------------------------------------------------------------
def test_cache_aware_is_an_admission_and_its_bound_is_validated() -> None:
    assert "cache-aware" in ADMISSIONS and BidKVConfig().admission == "fcfs"  # FCFS stays the default
    config = BidKVConfig.from_sources({"admission": "cache-aware", "admission_max_bypass": "7"}, {})
    assert config.admission_max_bypass == 7
    assert BidKVConfig.from_sources({}, {"BIDKV_ADMISSION_MAX_BYPASS": "0"}).admission_max_bypass == 0
    for value in (-1, 1.5, "many", True):
        with pytest.raises(ValueError) as err:
            BidKVConfig.from_sources({"admission_max_bypass": value}, {})
        message = str(err.value)
        assert message.startswith("vllm-bidkv config: admission_max_bypass=") and "\n" not in message
        assert message.endswith("expected an integer >= 0")
    with pytest.raises(
        ValueError, match="admission='srpt' is invalid; expected one of fcfs, sjf, cache-aware"
    ):
        BidKVConfig.from_sources({"admission": "srpt"}, {})
    with pytest.raises(ValueError, match="admission_max_bypass=-2 is invalid"):
        CacheAwareAdmission(-2)


def test_admission_key_and_the_scheduler_side_give_cache_aware_its_bound() -> None:
    key = admission_key("cache-aware", 5)
    assert isinstance(key, CacheAwareAdmission) and key.max_bypass == 5
    side = BidKVSchedulerSide(
        BidKVConfig(admission="cache-aware", admission_max_bypass=3, offload_mode="off")
    )
    key = side.admission_key()
    assert isinstance(key, CacheAwareAdmission) and key.max_bypass == 3
    off = BidKVConfig(admission="cache-aware", offload_mode="off", kill_switch=True)
    assert BidKVSchedulerSide(off).admission_key() is None  # inactive: vLLM's order


def test_called_as_a_fixed_key_it_refuses_in_one_line() -> None:
    """A queue that keys each request once (the source-patched Scheduler's) would keep a stale order."""
    with pytest.raises(ValueError) as err:
        CacheAwareAdmission(4)(Req("a", 10, 0.0))
    message = str(err.value)
    assert message.startswith(
        "vllm-bidkv config: admission='cache-aware' is invalid; expected one of fcfs, sjf ("
    )
    assert "\n" not in message


def test_remaining_work_counts_gpu_then_tier_hit_as_vllm_does() -> None:
    asked: list[int] = []

    def tier(request: Any, gpu_tokens: int) -> int:
        asked.append(gpu_tokens)
        return 48

    admission = CacheAwareAdmission(5, tier)
    request = Req("a", 200, 0.0)
    # GPU hit 40 (a partial block past 32): the tier's hit starts at 32 and is longer: 32 + 48 computed.
    assert admission.remaining_work(request, 40, 16) == 200 - 80 and asked == [32]
    assert CacheAwareAdmission(0, lambda r, g: 4).remaining_work(request, 40, 16) == 160  # GPU's longer
    assert CacheAwareAdmission(0).remaining_work(request, 64, 16) == 136  # no tier
    resumed = Req("b", 200, 0.0, num_computed_tokens=150)  # its asynchronous load arrived
    assert admission.remaining_work(resumed, 0, 16) == 50 and asked == [32]
    order = admission.order(lambda r: 1000, 16)  # a request with KV never asks the GPU either
    order.add(resumed)
    order.refresh()
    assert order.peek() is resumed and asked == [32]


def test_the_tier_is_asked_read_only() -> None:
    """The CPU-tier hit comes from the planner's match: no LRU move, no counter, no record."""
    rig = Rig(admission="cache-aware", admission_max_bypass=2)
    prompt = tokens(1, 16)
    park_prompt(rig, prompt)
    planner = rig.side.planner
    assert planner is not None
    tier = planner.tier
    before = (tier.order.slots(), tier.num_pins, rig.side.counters.totals())
    key = rig.side.admission_key()
    assert isinstance(key, CacheAwareAdmission)
    request = SimRequest("a", prompt + tokens(2, 6))
    assert key.remaining_work(request, 0, BS) == 6  # 16 prompt tokens in the tier
    assert key.remaining_work(SimRequest("b", tokens(3, 22)), 0, BS) == 22
    assert (tier.order.slots(), tier.num_pins, rig.side.counters.totals()) == before
    assert rig.side.requests == {}


def test_smallest_work_first_ties_by_arrival_and_keys_are_looked_up_again() -> None:
    work = {"a": 50, "b": 10, "c": 10, "d": 30}
    order = order_of(100, work)
    for i, rid in enumerate("abcd"):
        order.add(Req(rid, 100, float(i)))
    assert [r.request_id for r in order] == list("abcd")  # not looked up yet: no hit assumed, by arrival
    order.refresh()
    assert [r.request_id for r in order] == ["b", "c", "d", "a"]
    work["a"] = 5  # its prefix came into the GPU cache meanwhile
    order.refresh()
    assert drain(order) == ["a", "b", "c", "d"]


def test_each_step_looks_up_at_most_the_cap_never_looked_up_first() -> None:
    calls: list[str] = []

    def work(request: Any) -> int:
        calls.append(request.request_id)
        return 1

    order: CacheAwareOrder[Any] = CacheAwareOrder(100, work, refresh_cap=3)
    for i in range(5):
        order.add(Req(f"r{i}", 10, float(i)))
    order.refresh()
    assert calls == ["r0", "r1", "r2"]
    order.add(Req("new", 10, 9.0))
    order.refresh()
    assert calls[3:] == ["r3", "r4", "new"]
    order.refresh()
    assert calls[6:] == ["r0", "r1", "r2"]  # then the stalest


def test_a_long_request_goes_first_once_the_bound_is_reached() -> None:
    work = {"long": 1000} | {f"s{i}": 10 for i in range(6)}
    order = order_of(2, work)
    order.add(Req("long", 1000, 0.0))
    for i in range(6):
        order.add(Req(f"s{i}", 10, 1.0 + i))
    order.refresh()
    assert drain(order) == ["s0", "s1", "long", "s2", "s3", "s4", "s5"]


def test_bound_zero_is_first_come_first_served() -> None:
    order = order_of(0, {"a": 900, "b": 1, "c": 5})
    for i, rid in enumerate("abc"):
        order.add(Req(rid, 100, float(i)))
    order.refresh()
    assert drain(order) == ["a", "b", "c"]


def test_a_request_passed_over_ages_nobody() -> None:
    """vLLM pops a request it cannot schedule (blocked) and puts it back in the same step: that
    admitted nobody, so it must not push the requests behind it towards their bound."""
    order = order_of(1, {"long": 100, "short": 1, "other": 2})
    order.add(Req("long", 100, 0.0))
    order.add(Req("short", 1, 1.0))
    order.refresh()
    assert order.pop().request_id == "short"  # passed over ...
    assert order.peek().request_id == "long"  # (while out, "long" counts it)
    order.add(Req("short", 1, 1.0))  # ... and put back in the same step
    order.add(Req("other", 2, 2.0))
    order.refresh()
    assert order.peek().request_id == "short"
    assert drain(order) == ["short", "long", "other"]  # one real bypass, then "long" is due


def test_remove_and_iteration() -> None:
    order = order_of(10, {"a": 3, "b": 2, "c": 1})
    reqs = [Req(rid, 10, float(i)) for i, rid in enumerate("abc")]
    for r in reqs:
        order.add(r)
    order.refresh()
    order.remove([reqs[2], Req("absent", 1, 9.0)])
    assert [r.request_id for r in order] == ["b", "a"] and len(order) == 2
    assert drain(order) == ["b", "a"]
    with pytest.raises(IndexError):
        order.peek()


# -- the property: the order against a plain model ----------------------------------------
@dataclasses.dataclass
class Model:
    """A plain, linear-scan statement of the order (module doc of policy.admission)."""

    bound: int
    waiting: dict[str, Req] = dataclasses.field(default_factory=dict)
    work: dict[str, int] = dataclasses.field(default_factory=dict)  # as of the last look-up
    counted: dict[str, int] = dataclasses.field(default_factory=dict)  # later pops, skips too
    admitted_past: dict[str, int] = dataclasses.field(default_factory=dict)  # later admissions
    popped: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # rid -> whom it aged

    def head(self) -> str:
        due = [r for r in self.waiting.values() if self.counted[r.request_id] >= self.bound]
        if due:
            return min(due, key=lambda r: r.arrival_time).request_id
        return min(self.waiting.values(), key=lambda r: (self.work[r.request_id], r.arrival_time)).request_id

    def add(self, request: Req) -> None:
        rid = request.request_id
        aged = self.popped.pop(rid, None)
        if aged is None:  # new, or a new wait (preempted)
            self.work[rid] = request.num_tokens - request.num_computed_tokens
            self.counted[rid] = self.admitted_past[rid] = 0
        else:  # passed over: its pop counted for nobody
            for other in aged:
                if other in self.waiting or other in self.popped:
                    self.counted[other] -= 1
        self.waiting[rid] = request

    def pop(self, admitted: bool) -> str:
        rid = self.head()
        request = self.waiting.pop(rid)
        earlier = [o for o, r in self.waiting.items() if r.arrival_time < request.arrival_time]
        aged = [o for o in earlier if self.counted[o] < self.bound]
        for other in aged:
            self.counted[other] += 1
        if admitted:
            for other in earlier:
                self.admitted_past[other] += 1
        self.popped[rid] = aged
        return rid

    def refresh(self, current: dict[str, int]) -> None:
        self.popped.clear()
        for rid in self.waiting:
            if self.counted[rid] < self.bound:
                self.work[rid] = current[rid]


ACTIONS = st.sampled_from(["admit", "admit", "admit", "skip", "arrive", "preempt", "abort"])


@settings(max_examples=300, deadline=None)
@given(st.data(), st.integers(0, 4) | st.just(10**6))
def test_property_order_matches_the_model_and_no_request_is_bypassed_more_than_the_bound(
    data: st.DataObject, bound: int
) -> None:
    """Arbitrary arrivals, sizes, hits (changing between steps) and pops, some passed over and
    put back in the step, some requests preempted back or aborted: every pop is the model's head,
    and no waiting request ever saw more than ``bound`` later arrivals admitted ahead of it. With
    bound 0 every pop is the earliest arrival waiting; with a huge one, the least work left."""
    sizes: dict[str, int] = {}
    hits: dict[str, int] = {}
    admission = CacheAwareAdmission(bound)
    order = admission.order(lambda r: hits[r.request_id], 1, refresh_cap=10**6)
    model = Model(bound)
    clock = 0.0
    admitted: list[Req] = []  # in earlier steps: may be preempted back
    for _ in range(data.draw(st.integers(1, 8), "steps")):
        for rid in hits:
            hits[rid] = data.draw(st.integers(0, sizes[rid] - 1), "hit")
        order.refresh()
        model.refresh({rid: sizes[rid] - hits[rid] for rid in model.waiting})
        skipped: list[Req] = []
        admitted_now: list[Req] = []
        for action in data.draw(st.lists(ACTIONS, max_size=12), "actions"):
            if action == "arrive":
                clock += 1.0
                rid = f"r{len(sizes)}"
                sizes[rid] = data.draw(st.integers(1, 300), "size")
                hits[rid] = data.draw(st.integers(0, sizes[rid] - 1), "hit")
                request = Req(rid, sizes[rid], clock)
                order.add(request)
                model.add(request)
            elif action == "preempt" and admitted:
                request = admitted.pop(data.draw(st.integers(0, len(admitted) - 1), "victim"))
                order.add(request)
                model.add(request)
            elif action == "abort" and model.waiting:
                rid = data.draw(st.sampled_from(sorted(model.waiting)), "aborted")
                order.remove([model.waiting.pop(rid)])
            elif action in ("admit", "skip") and model.waiting:
                earliest = min(model.waiting.values(), key=lambda r: r.arrival_time)
                least = min(model.waiting.values(), key=lambda r: (model.work[r.request_id], r.arrival_time))
                expected = model.pop(admitted=action == "admit")
                request = order.pop()
                assert request.request_id == expected
                if bound == 0:
                    assert request is earliest
                if bound == 10**6:
                    assert request is least
                (admitted_now if action == "admit" else skipped).append(request)
                assert all(n <= bound for n in model.admitted_past.values())
            assert [r.request_id for r in order] == sorted_like_model(model)
        for request in skipped:  # vLLM puts the requests it passed over back at the step's end
            order.add(request)
            model.add(request)
        admitted += admitted_now


def sorted_like_model(model: Model) -> list[str]:
    due = sorted(
        (r for r in model.waiting.values() if model.counted[r.request_id] >= model.bound),
        key=lambda r: r.arrival_time,
    )
    rest = sorted(
        (r for r in model.waiting.values() if model.counted[r.request_id] < model.bound),
        key=lambda r: (model.work[r.request_id], r.arrival_time),
    )
    return [r.request_id for r in (*due, *rest)]

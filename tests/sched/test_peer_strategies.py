"""Victim rules in vLLM's real Scheduler: the peers' (lcf, reclaim-score, remaining-output,
bidkv-0.2) and ours (bidkv, offload off).

Each decision is checked against the rule recomputed here from the requests vLLM hands
the connector (``connector.choose_victim(requests, requester)``, looked up on the
connector at call time by the victim hook) and their block ref counts in the
SchedulerContext, independently of the strategy's code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest

from tests.sched.conftest import add_requests, run_to_completion
from vllm_bidkv.policy import STRATEGIES

pytestmark = pytest.mark.sched


def connector_config(policy: str) -> dict[str, Any]:
    return {
        "kv_connector": "BidKVConnector",
        "kv_connector_module_path": "vllm_bidkv",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {"victim_policy": policy, "offload_mode": "off"},
    }


def newest_max(requests: Sequence[Any], key: Callable[[Any], float]) -> Any:
    """The request with the max key; ties to the later one (the newest), like every strategy."""
    return max(enumerate(requests), key=lambda ir: (key(ir[1]), ir[0]))[1]


def freeable(ctx: Any, request: Any) -> int:
    return sum(1 for ref in ctx.request_ref_counts(request.request_id) if ref == 1)


def bid01_u(r: Any) -> float:
    completion = min(1.0, r.num_output_tokens / (r.max_tokens or 1024))
    return r.num_computed_tokens / (1.0 + 0.5 * completion + 0.3 * r.num_preemptions + 1e-6)


class Bid02Rule:
    """bidkv-0.2 as documented: bidkv-0.1's top pick unless a guard fires (then vLLM's pick)."""

    def __init__(self) -> None:
        self.preempted: dict[str, int] = {}
        self.decisions = 0
        self.guards: list[str | None] = []

    def __call__(self, ctx: Any, requests: Sequence[Any], requester: Any) -> Any:
        top = newest_max(requests, bid01_u)
        if self.decisions == 32:
            self.preempted.clear()
            self.decisions = 0
        self.decisions += 1
        guard = None
        if self.preempted.get(top.request_id, 0) >= 2:
            guard = "liveness"
        elif any(r is requester for r in requests) and freeable(ctx, top) <= 1.25 * freeable(ctx, requester):
            guard = "cascade"
        self.guards.append(guard)
        victim = top if guard is None else requests[-1]
        self.preempted[victim.request_id] = self.preempted.get(victim.request_id, 0) + 1
        return victim


def shortfall(ctx: Any, requester: Any) -> int:
    """Blocks the requester lacks beyond the free pool (at least 1: its allocation failed)."""
    groups = ctx.request_block_ids(requester.request_id)
    held = len(groups[0]) if groups else 0
    return max(1, -(-requester.num_tokens // ctx.block_size) - held - ctx.num_free_blocks())


def bidkv_u(ctx: Any, r: Any, need: int | None) -> float:
    """Our bid with offload off and the default constants: r capped at the requester's need
    (uncapped when ``need`` is None) over δ = recompute of what the GPU prefix cache does not
    keep + progress + starvation."""
    refs = ctx.request_ref_counts(r.request_id)
    shared_blocks = next((i for i, ref in enumerate(refs) if ref <= 1), len(refs))
    start, end = min(r.num_computed_tokens, shared_blocks * ctx.block_size), r.num_computed_tokens
    recompute = (end - start) + 3.3e-5 * (end * end - start * start) / 2
    progress = min(1.0, r.num_output_tokens / r.max_tokens)
    delta = recompute + 64.0 * progress + 256.0 * r.num_preemptions
    freed = sum(1 for ref in refs if ref == 1)
    return (freed if need is None else min(freed, need)) / (delta + 1e-6)


class BidRule:
    """bidkv as documented; also records whether the uncapped bid would have picked another."""

    def __init__(self) -> None:
        self.cap_decided: list[bool] = []

    def __call__(self, ctx: Any, requests: Sequence[Any], requester: Any) -> Any:
        need = shortfall(ctx, requester)
        pick = newest_max(requests, lambda r: bidkv_u(ctx, r, need))
        self.cap_decided.append(pick is not newest_max(requests, lambda r: bidkv_u(ctx, r, None)))
        return pick


def stateless(rule: Callable[[Any, Any], float]) -> Callable[[Any, Sequence[Any], Any], Any]:
    return lambda ctx, requests, requester: newest_max(requests, lambda r: rule(ctx, r))


RULES: dict[str, Callable[[], Callable[[Any, Sequence[Any], Any], Any]]] = {
    "lcf": lambda: stateless(lambda ctx, r: -r.num_computed_tokens),
    "reclaim-score": lambda: stateless(
        lambda ctx, r: (
            freeable(ctx, r)
            / max(1, r.num_computed_tokens)
            * (1.0 - min(1.0, r.num_output_tokens / max(1, r.max_tokens)))
        )
    ),
    "remaining-output": lambda: stateless(lambda ctx, r: max(0, r.max_tokens - r.num_output_tokens)),
    "bidkv-0.2": Bid02Rule,
    "bidkv": BidRule,
}


def run_checked(make_scheduler: Any, policy: str, rule: Any, **workload: Any) -> list[tuple[Any, Any]]:
    """Run a KV-pressure workload; every decision must equal ``rule``. Returns (vLLM's, chosen) pairs."""
    scheduler = make_scheduler(num_gpu_blocks=28, max_num_seqs=8, kv_transfer_config=connector_config(policy))
    connector = scheduler.connector
    ctx = connector.scheduler_context
    assert ctx is not None
    choose = connector.choose_victim
    decisions: list[tuple[Any, Any]] = []
    preempted_ids: list[str] = []

    def checking_choose(requests: list[Any], requester: Any = None) -> Any:
        assert requester is not None, "the hook names the request whose allocation failed"
        expected = rule(ctx, requests, requester)
        victim = choose(requests, requester)
        assert victim is expected, (policy, [r.request_id for r in requests], victim.request_id)
        decisions.append((requests[-1], victim))
        return victim

    connector.choose_victim = checking_choose  # the hook looks it up on the connector per call
    workload = workload or {"seed": 3, "prefix_len": 32, "lo": 40, "hi": 160, "max_out": 120}
    requests = add_requests(scheduler, 24, **workload)
    run_to_completion(
        scheduler, requests, on_step=lambda out: preempted_ids.extend(sorted(out.preempted_req_ids))
    )
    assert len(decisions) >= 5, "the workload must create KV pressure"
    assert sorted(v.request_id for _, v in decisions) == sorted(preempted_ids)  # each pick was preempted
    assert all(len(r.output_token_ids) == r.max_tokens for r in requests.values())
    return decisions


@pytest.mark.parametrize("policy", ["lcf", "reclaim-score", "remaining-output"])
def test_peer_rule_chooses_what_it_documents(make_scheduler: Any, patched: None, policy: str) -> None:
    assert policy in STRATEGIES
    decisions = run_checked(make_scheduler, policy, RULES[policy]())
    # the rule is live: at least one pick differs from vLLM's own (the last preemptible request)
    assert any(victim is not default for default, victim in decisions)


def test_bidkv_02_guards_on_the_real_scheduler(make_scheduler: Any, patched: None) -> None:
    assert "bidkv-0.2" in STRATEGIES
    rule = Bid02Rule()
    # No shared prefix, varied lengths: this workload exercises each outcome.
    decisions = run_checked(make_scheduler, "bidkv-0.2", rule, seed=4, lo=20, hi=200, max_out=150)
    # Each guard fired (leaving vLLM's pick), and an unguarded pick was not vLLM's.
    assert {"cascade", "liveness"} <= set(rule.guards)
    assert any(
        g is None and victim is not default
        for g, (default, victim) in zip(rule.guards, decisions, strict=True)
    )


def test_bidkv_caps_its_bid_at_the_requesters_shortfall(make_scheduler: Any, patched: None) -> None:
    """Every decision is U = min(r, shortfall) / (δ + ε), recomputed here; the cap is live:
    some picks differ from the uncapped bid's, and some from vLLM's own."""
    rule = BidRule()
    decisions = run_checked(make_scheduler, "bidkv", rule, seed=4, lo=20, hi=200, max_out=150)
    assert any(rule.cap_decided), "the cap changed no decision: this workload does not test it"
    assert any(victim is not default for default, victim in decisions)

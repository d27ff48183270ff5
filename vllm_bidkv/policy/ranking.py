"""The candidate a strategy's key ranks first: ``best_by_key`` over whole candidates, and
``best_by_bounded_key``, which makes whole only the candidates whose key bound may win."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vllm_bidkv.policy.candidate import Candidate, Decision

Key = tuple[float, ...]
"""A candidate's rank under one strategy, compared as a tuple: the max is preempted."""


def best_by_key(
    candidates: Sequence[Candidate], decision: Decision, key: Callable[[Candidate, Decision], Key]
) -> Candidate:
    """The candidate with the max ``key``; equal keys go to the newest (max ``order``).

    Args:
        candidates: The preemptible requests of this decision.
        decision: Passed to ``key`` with each candidate.
        key: The strategy's rank of one candidate.

    Returns:
        The chosen member of ``candidates``; ``ValueError`` if there is none.
    """
    if not candidates:
        raise ValueError("no preemptible candidates to choose a victim from")
    return max(candidates, key=lambda c: (key(c, decision), c.order))


def best_by_bounded_key(
    held: Sequence[Candidate],
    decision: Decision,
    key: Callable[[Candidate, Decision], Key],
    key_bound: Callable[[Candidate, Decision], Key],
    whole: Callable[[Candidate], Candidate],
) -> Candidate:
    """``best_by_key`` of the whole candidates, making whole only those that may win.

    Args:
        held: Candidates without their restorable run (``lookup.held_candidate``);
            ``order`` unique among them.
        key_bound: At least ``key`` of a held candidate made whole, whatever its run.
        whole: The held candidate with its restorable run.

    Returns:
        What ``best_by_key`` returns over ``[whole(c) for c in held]``: in descending
        (bound, order), a candidate is made whole until the next bound ranks below the best
        whole (key, order) so far. ``ValueError`` if ``held`` is empty.
    """
    if not held:
        raise ValueError("no preemptible candidates to choose a victim from")
    ranked = sorted(((key_bound(c, decision), c.order, c) for c in held), reverse=True)
    best: Candidate | None = None
    best_rank: tuple[Key, int] | None = None
    for bound, order, candidate in ranked:  # ``order`` is unique: no tie reaches ``candidate``
        if best_rank is not None and (bound, order) < best_rank:
            break
        made = whole(candidate)
        rank = (key(made, decision), order)
        if best_rank is None or rank > best_rank:
            best, best_rank = made, rank
    assert best is not None
    return best

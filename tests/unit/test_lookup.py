"""``lookup.match_tokens`` walks runs of ready blocks; it must find the hit a block-by-block
scan finds (the definition), for full attention and sliding windows alike."""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_bidkv.offload.cpu_tier import CpuBlockTier
from vllm_bidkv.offload.lookup import match_tokens

pytestmark = pytest.mark.unit


def scan(ready: Sequence[bool], num_tokens: int, computed: int, bs: int, window: int | None) -> int:
    """The hit by definition: the end of the last ready block from which every block back to
    the first one vLLM does not null is ready, scanning every block."""
    room = num_tokens - 1 - computed
    if computed % bs or room <= 0:
        return 0
    first = computed // bs
    last = min(len(ready), first + math.ceil(room / bs))
    hit = 0
    for i in range(first, last):
        end = min((i + 1) * bs - computed, room)
        needed_from = first if window is None else max(first, (computed + end - window + 1) // bs)
        if ready[i] and all(ready[needed_from : i + 1]):
            hit = end
    return hit


@given(
    ready=st.lists(st.booleans(), min_size=1, max_size=40),
    bs=st.sampled_from([1, 4, 16]),
    computed_blocks=st.integers(0, 10),
    partial=st.integers(0, 3),
    extra=st.integers(-20, 20),
    window=st.one_of(st.none(), st.integers(1, 80)),
)
def test_runs_find_the_hit_a_block_by_block_scan_finds(
    ready: list[bool], bs: int, computed_blocks: int, partial: int, extra: int, window: int | None
) -> None:
    hashes = [i.to_bytes(4, "little") for i in range(len(ready))]
    tier = CpuBlockTier(len(ready) + 1)
    for block_hash, is_ready in zip(hashes, ready, strict=True):
        slot = tier.reserve(block_hash)
        assert slot is not None
        if is_ready:
            tier.commit(slot)  # else PENDING: a store in flight is no hit
    computed = computed_blocks * bs + (partial if bs > 1 else 0)
    num_tokens = max(1, len(ready) * bs + extra)
    request = SimpleNamespace(num_tokens=num_tokens, block_hashes=hashes)
    got = match_tokens(tier.ready_until, request, computed, bs, window)  # type: ignore[arg-type]
    assert got == scan(ready, num_tokens, computed, bs, window)

"""The tiers' changes as vLLM KV cache events (``--kv-events-config``), and the hash root.

vLLM's Scheduler publishes what ``connector.take_events()`` returns beside its GPU block
pool's events, so a KV-aware router learns that this engine still holds a prefix its GPU
dropped. A block is named by the hash vLLM's GPU events give the same block
(``maybe_convert_block_hash``: bytes, or an int under VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES).
Like vLLM's OffloadingConnector without self-describing events, a CPU-tier event carries no
tokens (``token_ids=[]``, ``block_size=0``): a router has them from the GPU event of that hash.
"""

from __future__ import annotations

from itertools import groupby
from typing import Any

from vllm_bidkv.context import BlockHash
from vllm_bidkv.patches.capabilities import probe

# vllm.distributed.kv_events' names (releases before 0.26 lack them); STORAGE: vLLM's file tier's.
MEDIUM_CPU = "CPU"
MEDIUM_STORAGE = "STORAGE"


def tier_events(changes: list[tuple[BlockHash, bool]], medium: str = MEDIUM_CPU) -> list[Any]:
    """One ``BlockStored`` or ``BlockRemoved`` per run of like changes ((hash, stored), oldest
    first), in order: a hash stored and evicted in one step is announced and then removed."""
    if not changes:
        return []
    from vllm.distributed.kv_events import BlockRemoved, BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    caps = probe()
    group = {"group_idx": 0} if caps.kv_event_group_idx else {}  # the tier serves one KV cache group
    lora = {"lora_name": None} if caps.kv_event_lora_name else {}
    events: list[Any] = []
    for stored, run in groupby(changes, key=lambda change: change[1]):
        hashes = [maybe_convert_block_hash(block_hash) for block_hash, _ in run]
        if stored:
            events.append(
                BlockStored(
                    block_hashes=hashes,
                    parent_block_hash=None,
                    token_ids=[],
                    block_size=0,
                    lora_id=None,
                    medium=medium,
                    **lora,
                    **group,
                )
            )
        else:
            events.append(BlockRemoved(block_hashes=hashes, medium=medium, **group))
    return events


def prefix_hash_root() -> str:
    """vLLM's ``NONE_HASH`` (the root of every block-hash chain, set when the engine starts) as
    hex: block hashes match across restarts only under the same root. '' if unknown."""
    from vllm.v1.core import kv_cache_utils

    root = getattr(kv_cache_utils, "NONE_HASH", None)
    return bytes(root).hex() if isinstance(root, (bytes, bytearray)) else ""

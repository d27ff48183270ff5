"""What a KV-aware router learns from vLLM's KV event batches, for the CPU tier's tests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class Announced:
    """Replays events: hashes any GPU event stored, and the set the CPU tier holds (stored, not
    yet removed). Fails on a CPU store of a hash no GPU event announced, a second store without
    a removal, a removal of what was never stored, or a CPU store carrying tokens."""

    def __init__(self) -> None:
        self.gpu_seen: set[Any] = set()
        self.cpu: set[Any] = set()
        self.cpu_stored = self.cpu_removed = 0

    def take(self, events: Iterable[Any]) -> None:
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        for event in events:
            if isinstance(event, BlockStored) and event.medium == "CPU":
                assert event.token_ids == [] and event.block_size == 0 and event.parent_block_hash is None
                for block_hash in event.block_hashes:
                    assert block_hash in self.gpu_seen, "a CPU hash no GPU event announced"
                    assert block_hash not in self.cpu, "stored twice without a removal"
                    self.cpu.add(block_hash)
                    self.cpu_stored += 1
            elif isinstance(event, BlockRemoved) and event.medium == "CPU":
                for block_hash in event.block_hashes:
                    assert block_hash in self.cpu, "removed what was never stored"
                    self.cpu.remove(block_hash)
                    self.cpu_removed += 1
            elif isinstance(event, BlockStored):
                self.gpu_seen.update(event.block_hashes)

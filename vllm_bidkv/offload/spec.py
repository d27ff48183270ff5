"""OffloadSpec: what the CPU tier and the planner are built from, checked once.

The connector builds it where it checks the configuration against the engine (slots
from ``cpu_bytes`` and the KV layout, block bytes, world size, sliding window) and the
scheduler side passes it whole to the tier and the planner.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm_bidkv.config import CPU_EVICTIONS, OFFLOAD_MODES, BidKVConfig
from vllm_bidkv.offload.disk import DiskSpec


def num_slots_for(
    size: int, block_bytes: int, key: str = "cpu_bytes", instead: str = "set offload_mode='off'"
) -> int:
    """How many blocks of ``block_bytes`` fit in ``size`` (the value of config ``key``: a
    tier's size); ValueError if none, naming the key and ``instead``, the other way out."""
    if block_bytes <= 0:
        raise ValueError(f"vllm-bidkv: block size must be positive, got block_bytes={block_bytes}")
    slots = size // block_bytes
    if slots < 1:
        raise ValueError(
            f"vllm-bidkv: {key}={size} holds no block of {block_bytes} bytes; "
            f"raise {key} to at least {block_bytes} or {instead}"
        )
    return slots


@dataclass(frozen=True)
class OffloadSpec:
    mode: str
    """``offload_mode``: one of ``OFFLOAD_MODES`` but ``off`` (nothing is built then)."""
    num_slots: int
    """CPU-tier slots, one block each."""
    block_bytes: int = 0
    """Bytes of one block on all workers together (for the byte counters; 0: unknown)."""
    world_size: int = 1
    """Workers that must report each copy before it is finished."""
    eviction: str = "lru"
    """``cpu_eviction``: one of ``CPU_EVICTIONS``."""
    lookahead_steps: float = 2.0
    """``lazy_lookahead_steps``: steps of block consumption the lazy walk keeps clean."""
    min_clean_blocks: int = 16
    """The lazy walk's floor, whatever the consumption."""
    sliding_window: int | None = None
    """Tokens every layer attends to; None: full attention."""
    announce: bool = False
    """Keep the tier's changes for vLLM's KV events (``--kv-events-config`` is on)."""
    disk: DiskSpec | None = None
    """The disk tier behind the CPU tier (``disk_path``); None: none."""

    def __post_init__(self) -> None:
        checks = (
            (
                "offload_mode",
                self.mode,
                self.mode in OFFLOAD_MODES and self.mode != "off",
                "auto, lazy or eager",
            ),
            ("cpu_eviction", self.eviction, self.eviction in CPU_EVICTIONS, f"one of {CPU_EVICTIONS}"),
            ("CPU-tier slots", self.num_slots, self.num_slots >= 1, ">= 1"),
            ("world_size", self.world_size, self.world_size >= 1, ">= 1"),
            ("lazy_lookahead_steps", self.lookahead_steps, self.lookahead_steps > 0, "> 0"),
            ("min_clean_blocks", self.min_clean_blocks, self.min_clean_blocks >= 0, ">= 0"),
            (
                "disk tier slots",
                self.disk and self.disk.num_slots,
                not self.disk or self.disk.num_slots >= 1,
                ">= 1",
            ),
        )
        for key, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"vllm-bidkv: {key}={value!r} is invalid; expected {allowed}")

    @classmethod
    def from_config(
        cls,
        config: BidKVConfig,
        *,
        num_slots: int,
        block_bytes: int = 0,
        world_size: int = 1,
        sliding_window: int | None = None,
        min_clean_blocks: int = 16,
        announce: bool = False,
        disk: DiskSpec | None = None,
    ) -> OffloadSpec | None:
        """The spec of ``config`` with the engine's facts; None when offload is off."""
        if not config.offload_enabled:
            return None
        return cls(
            mode=config.offload_mode,
            num_slots=num_slots,
            block_bytes=block_bytes,
            world_size=world_size,
            eviction=config.cpu_eviction,
            lookahead_steps=config.lazy_lookahead_steps,
            min_clean_blocks=min_clean_blocks,
            sliding_window=sliding_window,
            announce=announce,
            disk=disk,
        )

"""The CPU tier's spec at start-up, and the configurations it cannot serve, refused.

Both roles of the connector need the tier's size in slots; the scheduler role builds its
tier and planner from the whole ``OffloadSpec``. A configuration the tier cannot serve is
refused here, naming what to change, before either role is built.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.offload import OffloadSpec, num_slots_for
from vllm_bidkv.offload.disk import DiskSpec
from vllm_bidkv.patches.capabilities import Capabilities

logger = logging.getLogger("vllm_bidkv")


def _block_bytes(kv_cache_config: Any) -> int:
    """Bytes of one block across every layer of the (single) KV cache group, on one worker."""
    group = kv_cache_config.kv_cache_groups[0]
    return int(group.kv_cache_spec.page_size_bytes) * len(group.layer_names)


def _check_offload(
    vllm_config: Any, kv_cache_config: Any, caps: Capabilities, config: BidKVConfig
) -> int | None:
    """Refuse configurations the CPU tier cannot serve; return the sliding window of a
    sliding-window group (None: full attention, which a hybrid model's one group is)."""
    if not caps.connector_worker_meta:
        raise ValueError(
            f"vllm-bidkv: offload_mode={config.offload_mode!r} needs build_connector_worker_meta "
            f"(vLLM >= 0.19); vLLM {caps.vllm_version} lacks it. Use offload_mode='off'."
        )
    if not vllm_config.cache_config.enable_prefix_caching:
        raise ValueError(
            "vllm-bidkv: the CPU tier is keyed by prefix-cache block hashes, but prefix caching is off. "
            "Enable it (drop --no-enable-prefix-caching) or set offload_mode='off'."
        )
    if kv_cache_config is None:
        raise ValueError("vllm-bidkv: offload needs the KV cache config (vLLM >= 0.13)")
    groups = kv_cache_config.kv_cache_groups
    kinds = [type(g.kv_cache_spec).__name__ for g in groups]
    if kinds not in (["FullAttentionSpec"], ["SlidingWindowSpec"]):
        # One group is what vLLM makes of any attention model while its hybrid allocator is
        # off, which it turns off for a connector without SupportsHMA (this one): sliding-window
        # layers mixed with full ones are allocated as full attention, every token kept.
        raise ValueError(
            f"vllm-bidkv: the CPU tier needs one attention KV cache group (full or sliding window); "
            f"this model has {len(groups)}: [{', '.join(kinds)}] (state-space / Mamba layers?). "
            "Set offload_mode='off'."
        )
    return groups[0].kv_cache_spec.sliding_window if kinds == ["SlidingWindowSpec"] else None


def frees_running_blocks(kv_cache_config: Any) -> bool:
    """Whether vLLM's allocation may free blocks of running requests it did not preempt: those
    a sliding window (or chunked local attention) left behind, or a state-space group's. Then
    a victim pricing does not last the step (``StepCandidates``). True when unknown."""
    if kv_cache_config is None:
        return True
    return not all(
        any(cls.__name__ == "FullAttentionSpec" for cls in type(group.kv_cache_spec).__mro__)
        for group in kv_cache_config.kv_cache_groups
    )


def disk_dir(config: BidKVConfig, vllm_config: Any) -> str:
    """This engine's disk directory: ``disk_path``, or a directory per data-parallel rank in it
    (each rank is an engine of its own)."""
    parallel = vllm_config.parallel_config
    if getattr(parallel, "data_parallel_size", 1) > 1:
        return os.path.join(config.disk_path, f"dp{parallel.data_parallel_rank}")
    return config.disk_path


def disk_spec(
    vllm_config: Any, kv_cache_config: Any, config: BidKVConfig, block_bytes: int
) -> DiskSpec | None:
    """The disk tier's spec (None: no ``disk_path``), with what its old contents must match;
    ``block_bytes``: a worker's share of a block."""
    if not config.disk_path:
        return None
    import vllm

    group = kv_cache_config.kv_cache_groups[0]
    fingerprint = {
        "model": str(vllm_config.model_config.model),
        "vllm": vllm.__version__,
        "kv_cache_spec": type(group.kv_cache_spec).__name__,
        "kv_dtype": str(group.kv_cache_spec.dtype),
        "block_size": str(group.kv_cache_spec.block_size),
        "layers": str(len(group.layer_names)),
        "block_bytes_per_worker": str(block_bytes),
        "world_size": str(vllm_config.parallel_config.world_size),
        "prefix_caching_hash_algo": str(getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "")),
    }
    num_slots = num_slots_for(config.disk_bytes, block_bytes, "disk_bytes", "leave disk_path unset")
    return DiskSpec(disk_dir(config, vllm_config), num_slots, tuple(sorted(fingerprint.items())))


def offload_spec(
    vllm_config: Any, kv_cache_config: Any, caps: Capabilities, config: BidKVConfig
) -> OffloadSpec | None:
    """The tier's spec (refusing what it cannot serve), None with offload off; with offload
    on, failed loads are set to be recomputed."""
    if not config.offload_enabled:
        return None
    window = _check_offload(vllm_config, kv_cache_config, caps, config)
    block_bytes = _block_bytes(kv_cache_config)  # one worker's share of a block
    world_size = vllm_config.parallel_config.world_size
    transfer = vllm_config.kv_transfer_config
    if getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
        # A CPU tier is a cache (recomputes_failed_loads); the Scheduler reads this after
        # building the connector.
        logger.warning(
            "vllm-bidkv: kv_load_failure_policy=%r -> 'recompute'", transfer.kv_load_failure_policy
        )
        transfer.kv_load_failure_policy = "recompute"
    return OffloadSpec.from_config(
        config,
        num_slots=num_slots_for(config.cpu_bytes, block_bytes),
        disk=disk_spec(vllm_config, kv_cache_config, config, block_bytes),
        # Every worker holds its share of each block (TP: its heads), so a block moved is
        # its bytes on one worker times the workers: the byte counters are engine-wide.
        block_bytes=block_bytes * world_size,
        world_size=world_size,
        sliding_window=window,
        # vLLM publishes what take_events returns (every release since 0.13) only with events on.
        announce=caps.connector_kv_events
        and bool(getattr(vllm_config.kv_events_config, "enable_kv_cache_events", False)),
    )

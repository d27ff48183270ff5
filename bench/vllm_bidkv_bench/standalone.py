"""vLLM's real Scheduler without an engine: the core of the `sched` tests and the simulator.

``build_scheduler`` makes a real ``Scheduler`` (with its KVCacheManager and
BlockPool) from a real ``VllmConfig`` of a local model, and a KV cache spec that
is free to describe a bigger model than the one loaded (the simulator describes
Llama-3-8B). ``make_request`` and ``model_output`` are the two other pieces a
driver loop needs: schedule() -> model_output(...) -> update_from_output().
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vllm_bidkv.patches.capabilities import probe


def build_scheduler(
    model_dir: str,
    *,
    num_gpu_blocks: int,
    block_size: int = 16,
    num_kv_heads: int = 8,
    head_size: int = 128,
    num_layers: int = 1,
    max_num_seqs: int = 32,
    max_num_batched_tokens: int = 2048,
    max_model_len: int = 4096,
    kv_transfer_config: Mapping[str, Any] | None = None,
    enable_prefix_caching: bool = True,
    log_stats: bool = False,
    sliding_window: int | None = None,
    async_scheduling: bool = False,
    kv_events_config: Mapping[str, Any] | None = None,
) -> Any:
    """``async_scheduling``: vLLM's ``AsyncScheduler`` (schedules step N+1 before step N's
    output arrives, as on GPUs); the driver then calls ``update_from_output`` one step late.
    ``kv_events_config``: vLLM's ``KVEventsConfig`` fields (the Scheduler publishes KV events)."""
    import torch
    from vllm.config import (
        CacheConfig,
        DeviceConfig,
        KVEventsConfig,
        KVTransferConfig,
        ModelConfig,
        SchedulerConfig,
        VllmConfig,
    )
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import (
        FullAttentionSpec,
        KVCacheConfig,
        KVCacheGroupSpec,
        KVCacheTensor,
        SlidingWindowSpec,
    )
    from vllm.v1.structured_output import StructuredOutputManager

    model_config = ModelConfig(model=str(model_dir), max_model_len=max_model_len, dtype="float32")
    scheduler_config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
        **({"async_scheduling": True} if async_scheduling else {}),
    )
    cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
    cache_config.num_gpu_blocks = num_gpu_blocks
    vllm_config = VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        device_config=DeviceConfig("cpu"),
        kv_transfer_config=KVTransferConfig(**kv_transfer_config) if kv_transfer_config else None,
        **({"kv_events_config": KVEventsConfig(**kv_events_config)} if kv_events_config else {}),
    )
    shape = {"block_size": block_size, "num_kv_heads": num_kv_heads, "head_size": head_size}
    spec = (  # every layer full attention, or every layer sliding window (one group either way)
        FullAttentionSpec(**shape, dtype=torch.bfloat16)
        if sliding_window is None
        else SlidingWindowSpec(**shape, dtype=torch.bfloat16, sliding_window=sliding_window)
    )
    layers = [f"layers.{i}.attn" for i in range(num_layers)]
    kv_cache_config = KVCacheConfig(
        num_blocks=num_gpu_blocks,
        kv_cache_tensors=_pool_tensors(KVCacheTensor, spec.page_size_bytes, num_gpu_blocks, layers),
        kv_cache_groups=[KVCacheGroupSpec(layers, spec)],
    )
    if async_scheduling:
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler as Scheduler  # noqa: N814
    if hasattr(vllm_config.scheduler_config, "async_scheduling"):
        # What the driver does, whatever the platform's config check chose (the CPU platform
        # turns it off, releases built for GPUs default to on): the Scheduler and its
        # connector read the flag afterwards.
        vllm_config.scheduler_config.async_scheduling = async_scheduling
    return Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        log_stats=log_stats,
    )


def _pool_tensors(tensor_cls: Any, page_bytes: int, num_blocks: int, layers: list[str]) -> list[Any]:
    """The pool as one layer-outer allocation, the layout vLLM's ``get_kv_cache_config`` gives
    a single full-attention group: layer ``l``'s page of block ``b`` at ``l·page·num_blocks +
    b·page``. A description only (no memory); connectors that size their tier from the GPU
    pool's bytes (SimpleCPUOffloadConnector's ``_derive_cpu_config``) read it. Releases whose
    ``KVCacheTensor`` has other fields (``shared_by`` up to 0.31) get the same size and layers.
    """
    import dataclasses

    size = page_bytes * num_blocks * len(layers)
    names = {f.name for f in dataclasses.fields(tensor_cls)}
    if "layer_stride" in names:
        return [
            tensor_cls(
                size=size, layers=list(layers), layer_stride=page_bytes * num_blocks, block_stride=page_bytes
            )
        ]
    if "shared_by" in names:
        return [tensor_cls(size=size // len(layers), shared_by=[name]) for name in layers]
    return []


_HASHERS: dict[int, Any] = {}


def make_request(
    request_id: str,
    prompt_token_ids: Sequence[int],
    max_tokens: int,
    *,
    block_size: int,
    arrival_time: float | None = None,
    priority: int = 0,
) -> Any:
    """A ``Request`` with greedy sampling and the block hasher prefix caching needs."""
    from vllm import SamplingParams
    from vllm.utils.hashing import sha256_cbor
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    if block_size not in _HASHERS:
        init_none_hash(sha256_cbor)
        _HASHERS[block_size] = get_request_block_hasher(block_size, sha256_cbor)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    version_args = {"eos_token_id": None} if probe().request_takes_eos_token_id else {}
    return Request(
        request_id=request_id,
        prompt_token_ids=list(prompt_token_ids),
        sampling_params=params,
        pooling_params=None,
        arrival_time=time.time() if arrival_time is None else arrival_time,
        priority=priority,
        block_hasher=_HASHERS[block_size],
        **version_args,
    )


def model_output(
    scheduler_output: Any,
    requests: Mapping[str, Any],
    token_id: int = 7,
    *,
    next_token: Callable[[Any], int] | None = None,
    **kwargs: Any,
) -> Any:
    """A ``ModelRunnerOutput`` sampling ``token_id`` (or ``next_token(request)``) for every
    request whose prefill completes."""
    from vllm.v1.outputs import ModelRunnerOutput

    req_ids = list(scheduler_output.num_scheduled_tokens)
    sampled: list[list[int]] = []
    for req_id in req_ids:
        req = requests[req_id]
        done = req.num_computed_tokens >= req.num_tokens  # already advanced by schedule()
        if not done:
            sampled.append([])
        else:
            sampled.append([token_id if next_token is None else next_token(req)])
    if probe().model_output_needs_logprobs:
        kwargs = {"logprobs": None, "prompt_logprobs_dict": {}, "pooler_output": [], **kwargs}
    return ModelRunnerOutput(
        req_ids=req_ids,
        req_id_to_index={r: i for i, r in enumerate(req_ids)},
        sampled_token_ids=sampled,
        **kwargs,
    )


def watch_prefix_cache(
    scheduler: Any,
    block_size: int,
    cached: Callable[[bytes], None] | None = None,
    dropped: Callable[[bytes], None] | None = None,
) -> None:
    """Tell ``cached(hash)`` / ``dropped(hash)`` each full block the scheduler's GPU prefix cache
    takes or drops (``dropped``: no GPU block holds the hash any more).

    Wraps that ``BlockPool``'s ``cached_block_hash_to_block`` instance, whose ``insert`` and
    ``pop`` every release 0.13+ has. A key is a full block's when it is its block's primary
    hash over a whole block (0.25+ also caches partial blocks, under other keys).
    """
    from vllm.v1.core.kv_cache_utils import get_block_hash

    cache = scheduler.kv_cache_manager.block_pool.cached_block_hash_to_block
    insert, pop = cache.insert, cache.pop

    def full(block: Any, key: Any) -> bool:
        tokens = getattr(block, "block_hash_num_tokens", None)
        return bool(block.block_hash == key and (tokens is None or tokens % block_size == 0))

    def watched_insert(key: Any, block: Any) -> None:
        insert(key, block)
        if cached is not None and full(block, key):
            cached(get_block_hash(key))

    def watched_pop(key: Any, block_id: int) -> Any:
        block = pop(key, block_id)
        if (
            dropped is not None
            and block is not None
            and full(block, key)
            and cache.get_one_block(key) is None
        ):
            dropped(get_block_hash(key))
        return block

    cache.insert, cache.pop = watched_insert, watched_pop

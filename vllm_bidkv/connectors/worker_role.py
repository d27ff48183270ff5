"""The connector's worker role: what vLLM's model runner calls, in vLLM's terms.

Every worker checks the scheduler's configuration (sent with the first step) against its
own. With offload on, ``CopyWorker`` (``connectors.worker``) holds the CPU tier and runs
each step's plan: rescues when the metadata is bound, loads in ``start_load_kv``, stores
in ``wait_for_save``; its reports go back as ``BidKVWorkerMetadata``.
"""

from __future__ import annotations

from typing import Any

import torch

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.connectors.metadata import BidKVConnectorMetadata, BidKVWorkerMetadata
from vllm_bidkv.connectors.worker import CopyWorker
from vllm_bidkv.offload import OffloadSpec
from vllm_bidkv.patches.capabilities import Capabilities
from vllm_bidkv.patches.scheduler_output import step_has_no_forward

# The keys a worker acts on (whether it copies, the tier's size, how it copies); the others
# (victim rule, admission, bid weights) are the scheduler's alone.
WORKER_KEYS = (
    "enabled",
    "kill_switch",
    "offload_mode",
    "cpu_bytes",
    "copy_backend",
    "disk_path",
    "disk_bytes",
)


def check_same_config(mine: BidKVConfig, scheduler: dict[str, Any]) -> None:
    """Refuse a worker whose configuration differs from the scheduler's where the worker acts
    on it: a Ray worker on another node reads its own environment, and with another
    ``cpu_bytes`` every copy would address slots the scheduler never planned."""
    differ = {key: getattr(mine, key) for key in WORKER_KEYS if scheduler.get(key) != getattr(mine, key)}
    if differ:
        pairs = ", ".join(
            f"{key}={value!r} here but {scheduler.get(key)!r} in the scheduler"
            for key, value in differ.items()
        )
        raise ValueError(
            f"vllm-bidkv: this worker's configuration differs from the scheduler's: {pairs}. "
            "Give every process of the engine the same BIDKV_* environment."
        )


class WorkerRole:
    """The worker-role half of ``BidKVConnector`` (see module doc). The hooks that act on a
    step's plan take the connector's bound metadata (None: none bound)."""

    def __init__(
        self,
        config: BidKVConfig,
        caps: Capabilities,
        vllm_config: Any,
        kv_cache_config: Any,
        offload: OffloadSpec | None,
    ) -> None:
        self.config = config
        self.copies: CopyWorker | None = None  # with offload on, once the KV caches are registered
        self._vllm_config = vllm_config
        self._kv_cache_config = kv_cache_config
        self._offload = offload
        self._saves_without_forward = caps.no_forward_step_saves

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        if self.config.offload_enabled:
            # Assumes one host per engine; a multi-node engine over-counts and refuses early.
            workers = self._vllm_config.parallel_config.world_size
            assert self._offload is not None
            self.copies = CopyWorker(
                kv_caches,
                self._kv_cache_config.num_blocks,
                self._offload.num_slots,
                self.config,
                workers,
                disk=self._offload.disk,
            )

    def bind_connector_metadata(self, meta: Any) -> None:
        if isinstance(meta, BidKVConnectorMetadata) and meta.scheduler_config:
            check_same_config(self.config, meta.scheduler_config)
        # Every release binds before the forward, while start_load_kv may come after it (0.32+
        # when the step has no load): rescues run here, before a load or the forward
        # overwrites their blocks.
        if self.copies is not None and isinstance(meta, BidKVConnectorMetadata):
            self.copies.run_rescues(meta.plan)
            self.copies.run_spills(meta.plan)

    def start_load_kv(self, meta: Any) -> None:
        if self.copies is not None and meta is not None:
            self.copies.run_loads(meta.plan)

    def wait_for_save(self, meta: Any) -> None:
        if self.copies is not None and meta is not None:
            self.copies.run_stores(meta.plan)

    def saves_in_get_finished(self) -> bool:
        """Up to 0.30 a step that runs no forward skips wait_for_save: its stores would never
        run and their blocks would stay pinned (the eager engine run hangs). Nothing to wait
        for, so ``get_finished`` runs them."""
        return not self._saves_without_forward and step_has_no_forward()

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        if self.copies is None:
            return None, None
        return None, self.copies.take_finished_loads() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.copies.take_load_errors() if self.copies is not None else set()

    def build_connector_worker_meta(self) -> BidKVWorkerMetadata | None:
        if self.copies is None:
            return None
        results = self.copies.take_results()
        return BidKVWorkerMetadata(results) if results else None

    def shutdown(self) -> None:
        if self.copies is not None:
            self.copies.close()
            self.copies = None

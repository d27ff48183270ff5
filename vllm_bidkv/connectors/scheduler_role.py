"""The connector's scheduler role: what vLLM's Scheduler calls, in vLLM's terms.

``BidKVSchedulerSide`` (``vllm_bidkv.scheduler_side``, pure: no vLLM import) owns the
strategy, the offload planner and one record per request; this class speaks vLLM to it.
It reads each step's ``SchedulerOutput`` (``patches.scheduler_output``) and sends the
plan as ``BidKVConnectorMetadata`` (the first with the configuration, for the workers to
check), hands the workers' ``BidKVWorkerMetadata`` back as job results, and reports the
counters as ``BidKVStats``. Where no bind hook ran (the connector loaded by module path
without the plugin) it binds the Scheduler itself, on the first call that needs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from vllm_bidkv.config import BidKVConfig
from vllm_bidkv.connectors.metadata import BidKVConnectorMetadata, BidKVWorkerMetadata
from vllm_bidkv.connectors.stats import BidKVStats, StatsReporter
from vllm_bidkv.context import SchedulerContext
from vllm_bidkv.offload import OffloadSpec
from vllm_bidkv.patches import hooks
from vllm_bidkv.patches.kv_events import MEDIUM_CPU, MEDIUM_STORAGE, prefix_hash_root, tier_events
from vllm_bidkv.patches.scheduler_output import step_events
from vllm_bidkv.scheduler_side import BidKVSchedulerSide
from vllm_bidkv.step_events import StepEvents


class SchedulerRole:
    """The scheduler-role half of ``BidKVConnector`` (see module doc)."""

    def __init__(
        self,
        config: BidKVConfig,
        vllm_config: Any,
        offload: OffloadSpec | None,
        *,
        frees_running_blocks: bool,
    ) -> None:
        self.config = config
        self.side = BidKVSchedulerSide(
            config,
            offload=offload,
            async_scheduling=bool(getattr(vllm_config.scheduler_config, "async_scheduling", False)),
            frees_running_blocks=frees_running_blocks,
        )
        self._unbound_scheduler: Any = None
        if not hooks.bind_hook_installed():
            # Loaded by module path without the plugin: bind on the first scheduler-side call.
            self._unbound_scheduler = hooks.find_scheduler_under_construction()
        self._config_sent = False  # the first step's metadata carries the config
        self._stats_reporter: StatsReporter | None = None

    @property
    def _bound(self) -> BidKVSchedulerSide:
        """The scheduler side, bound to its Scheduler first if no bind hook did."""
        if self.side.ctx is None and self._unbound_scheduler is not None:
            hooks.bind_late(self._unbound_scheduler)
        return self.side

    def _open_disk(self) -> None:
        """Open the disk tier at the first request: its old contents are reusable only under the
        same prefix-hash root, which vLLM sets after it built the Scheduler (and this role)."""
        disk = self._bound.planner.disk if self._bound.planner is not None else None
        if disk is not None and not disk.opened:
            disk.open({"prefix_hash_root": prefix_hash_root()})

    # -- asked by the patches' hooks -------------------------------------------------
    def bind_scheduler_context(self, ctx: SchedulerContext) -> None:
        self._unbound_scheduler = None
        self.side.bind(ctx)

    def loads_ordered_on_compute_stream(self) -> bool:
        """True while active: our loads cannot race an in-flight step, so frees need not wait."""
        return self.config.active

    def recomputes_failed_loads(self) -> bool:
        """A CPU tier is a cache: a block that fails to load is recomputed, never fatal."""
        return self.config.offload_enabled

    def chooses_victims(self) -> bool:
        return self.config.active

    def choose_victim(self, requests: list[Any], requester: Any = None) -> Any:
        """vLLM's next victim among ``requests`` (its own pick is the last); None keeps it."""
        return self._bound.choose_victim(requests, requester)

    def has_pending_block_frees(self) -> bool:
        return self._bound.has_pending_block_frees()

    def wait_for_frees(self, requests: list[Any], requester: Any) -> bool:
        return self._bound.wait_for_frees(requests, requester)

    def admission_key(self) -> Callable[[Any], Any] | None:
        return self._bound.admission_key()

    def give_up_copies(self) -> None:
        """Called by the reset hook before vLLM empties its caches and the tier."""
        self._bound.give_up_copies()

    # -- vLLM's scheduler-side connector hooks -----------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        self._open_disk()
        hit = self._bound.match(request, num_computed_tokens)
        return hit, self._bound.load_is_async(request.request_id)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        block_ids = blocks.get_block_ids()[0] if num_external_tokens else []
        self._bound.after_alloc(request, block_ids, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> BidKVConnectorMetadata:
        self._open_disk()
        side = self._bound
        if not side.active:
            events = StepEvents()  # inert: a step changes nothing of ours
        else:  # a tier exists once bound, and then the context's block size is the Scheduler's
            block_size = side.ctx.block_size if side.planner is not None and side.ctx is not None else None
            events = step_events(scheduler_output, block_size, side.offers_behind)
        meta = BidKVConnectorMetadata(side.plan_step(events))
        if not self._config_sent:
            meta.scheduler_config, self._config_sent = asdict(self.config), True
        return meta

    def update_connector_output(self, connector_output: Any) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(meta, BidKVWorkerMetadata):
            self._bound.complete(meta.results)

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # True while its asynchronous load is in flight: vLLM frees the blocks when every
        # worker reported it (finished_recving), not under a copy still writing them.
        return self._bound.finished(request, list(block_ids)), None

    def has_pending_push_work(self) -> bool:
        """Copies in flight: vLLM keeps stepping until every worker reported them, so an idle
        engine holds no touched block, pin or slot (and reset_prefix_cache succeeds)."""
        return self.side.has_jobs_in_flight()

    def reset_cache(self) -> bool:
        self._open_disk()  # a reset before the first request (new weights) empties it too
        self._bound.reset()
        return True

    def take_events(self) -> list[Any]:
        """The tiers' changes since the last call as KV events (medium CPU, and STORAGE for the
        disk tier); vLLM's Scheduler publishes them after each step's output (the tiers keep
        none unless vLLM's KV events are on)."""
        planner = self.side.planner
        if planner is None:
            return []
        events = tier_events(planner.tier.take_announcements(), MEDIUM_CPU)
        if planner.disk is not None:
            events += tier_events(planner.disk.take_events(), MEDIUM_STORAGE)
        return events

    def shutdown(self) -> None:
        """Release the disk directory (its journal is already up to date) for the next engine."""
        planner = self.side.planner
        if planner is not None and planner.disk is not None:
            planner.disk.close()

    def get_kv_connector_stats(self) -> BidKVStats | None:
        """Counter deltas, and the gauges when they changed; None when nothing changed."""
        if self._stats_reporter is None:
            self._stats_reporter = StatsReporter(self.side)
        return self._stats_reporter.take()

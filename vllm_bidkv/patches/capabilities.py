"""The capability table: what the installed vLLM offers, found by probing it.

Every version difference the rest of ``patches/`` cares about is one field here,
read from the live classes (signatures, attributes, source text), never guessed from
the version string. A vLLM installed without its ``.py`` files has no source text:
each such check then reads the names the compiled function uses instead, and one
that cannot is reported as unknown (``Capabilities.unknown``, taken as absent). How
each is read: ``patches.code_reading``.

Whether CI tested a release is a separate fact: the matrix's rows, shipped as
``vllm_bidkv/compat.json`` (written by ci/matrix.py with docs/COMPAT.md). A release
with no passing row works if the probe finds every required capability (with an
"untested release" warning) and is refused naming the missing one otherwise.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import re
from importlib import resources
from typing import Any

from vllm_bidkv.patches.code_reading import (
    Reading,
    code_names,
    contains,
    has_no_default,
    signature_params,
    source_mentions,
    source_of,
)

logger = logging.getLogger("vllm_bidkv")


@functools.cache
def ci_facts() -> dict[str, Any]:
    """The last committed matrix run: its date, commit and one row per tested release."""
    facts: dict[str, Any] = json.loads(resources.files("vllm_bidkv").joinpath("compat.json").read_text())
    return facts


def release_tuple(version: str) -> tuple[int, ...]:
    """0.32.0 of '0.32.0', '0.32.0+cpu' or '0.33.1.dev4+g12ab': the release part only."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(p) for p in match.group(0).split(".")) if match else ()


def ci_status(version: str, source_patched: bool) -> dict[str, Any]:
    """``tested`` with the passing row, its date and commit, or ``untested`` with the nearest
    tested releases on either side (a source-patched vLLM needs a passing patched row)."""
    facts = ci_facts()
    row = next(
        (
            r
            for r in facts["rows"]
            if r["passed"] and r["version"] == version and r["source_patch"] == source_patched
        ),
        None,
    )
    if row is not None:
        return {"status": "tested", "row": row, "date": facts["date"], "commit": facts["commit"]}
    passed = sorted({r["version"] for r in facts["rows"] if r["passed"]}, key=release_tuple)
    here = release_tuple(version)
    return {
        "status": "untested",
        "nearest_below": next((v for v in reversed(passed) if release_tuple(v) < here), None),
        "nearest_above": next((v for v in passed if release_tuple(v) > here), None),
        "date": facts["date"],
        "commit": facts["commit"],
    }


class UnsupportedVLLMError(RuntimeError):
    """The installed vLLM lacks something vllm-bidkv needs; the message names it."""


@dataclasses.dataclass(frozen=True)
class Capabilities:
    vllm_version: str
    # Required: without these the plugin cannot work at all.
    connector_base_v1: bool  # KVConnectorBase_V1 importable
    connector_factory_register: bool  # KVConnectorFactory.register_connector
    scheduler_running_list: bool  # Scheduler keeps `running` as a list and `kv_cache_manager`
    allocate_slots: bool  # KVCacheManager.allocate_slots (the victim hook wraps it)
    free_queue_linked_list: bool  # FreeKVCacheBlockQueue with fake_free_list_head (LRU walk)
    connector_prom_metrics: bool  # KVConnectorPromMetrics (0.13+): the connector's metrics subclass it
    # Shape differences the adapter handles.
    touch_takes_group_tuple: bool  # BlockPool.touch((blocks,)) up to 0.13; flat list after
    free_queue_iter_blocks_after: bool  # iter_blocks_after (0.28+); else walk the links by hand
    # BlockPool.free_blocks puts unhashed blocks at the LRU head (0.24+); before, every freed
    # block goes to the MRU tail. Only tests that predict vLLM's free order need it.
    free_blocks_prepends_unhashed: bool
    bind_hook: str  # "bind_kv_cache_manager" (0.30+), "bind_gpu_block_pool" (0.19+), "" before
    preempt_drop_stale_output: bool  # _preempt_request(..., drop_stale_output) (0.28+)
    request_blocks_can_be_freed: bool  # Scheduler._request_blocks_can_be_freed guard (0.30+)
    connector_worker_meta: bool  # build_connector_worker_meta (0.19+): async store completions
    # Scheduler waits instead of preempting while connector.has_pending_block_frees() (0.30+).
    connector_pending_block_frees: bool
    # A step that schedules no tokens still calls the worker's wait_for_save (0.31+); up to
    # 0.30 it does not, so work queued for wait_for_save waits for the next forward.
    no_forward_step_saves: bool
    connector_takes_kv_cache_config: bool  # __init__(vllm_config, role, kv_cache_config) (0.13+)
    # Scheduler.has_requests() asks connector.has_pending_push_work(), so the engine keeps
    # stepping while copies are in flight (0.32+); before, the bind hook wraps has_requests.
    connector_keeps_engine_stepping: bool
    # The Scheduler publishes connector.take_events() with its own KV events (the CPU tier's
    # BlockStored/BlockRemoved); BlockStored takes lora_name (0.18+) and both take group_idx (0.24+).
    connector_kv_events: bool
    kv_event_lora_name: bool
    kv_event_group_idx: bool
    # A vLLM carrying patches/vllm-*-scheduler-context.patch binds the connector itself
    # (and asks it for victims and admission order): the runtime patches stand down.
    vllm_binds_context: bool
    # Only the standalone Scheduler driver needs these.
    request_takes_eos_token_id: bool  # Request(..., eos_token_id) is required up to 0.15
    model_output_needs_logprobs: bool  # ModelRunnerOutput(logprobs=, ...) has no defaults up to 0.13
    # Without vLLM's source (compiled files only): the capabilities read from compiled code
    # instead, and those neither could answer (unknown, taken as absent). Empty otherwise.
    from_compiled_code: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()

    REQUIRED = (
        "connector_base_v1",
        "connector_factory_register",
        "scheduler_running_list",
        "allocate_slots",
        "free_queue_linked_list",
        "connector_prom_metrics",
    )

    def missing(self) -> list[str]:
        return [name for name in self.REQUIRED if not getattr(self, name)]

    @property
    def supported(self) -> bool:
        return not self.missing()

    @property
    def ci(self) -> dict[str, Any]:
        return ci_status(self.vllm_version, self.vllm_binds_context)

    @property
    def tested(self) -> bool:
        return self.ci["status"] == "tested"

    def verdict(self) -> str:
        if not self.supported:
            lacks = [name for name in self.missing() if name not in self.unknown]
            unprobed = [name for name in self.missing() if name in self.unknown]
            reasons = [f"lacks {', '.join(lacks)}"] if lacks else []
            if unprobed:
                reasons.append(f"cannot probe {', '.join(unprobed)} ({_UNKNOWN_WHY})")
            return f"unsupported: vLLM {self.vllm_version} {'; '.join(reasons)}"
        ci = self.ci
        patch = " + source patch" if self.vllm_binds_context else ""
        unknown = f"; could not probe {', '.join(self.unknown)}: {_UNKNOWN_WHY}" if self.unknown else ""
        if ci["status"] != "tested":
            return (
                f"supported (untested release {self.vllm_version}{patch}; nearest tested: "
                f"{ci['nearest_below'] or 'none'} below, {ci['nearest_above'] or 'none'} above; "
                f"every required capability found{unknown})"
            )
        return (
            f"supported (tested: the CI row for vLLM {self.vllm_version}{patch} passed "
            f"{', '.join(ci['row']['tiers'])} on {ci['date']} at commit {ci['commit']}{unknown})"
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_UNKNOWN_WHY = "vLLM's source is not installed and its compiled code does not tell; taken as absent"


def _no_forward_step_saves(read: Reading) -> bool:
    try:
        from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin
    except ImportError:
        return False
    fn = KVConnectorModelRunnerMixin.kv_connector_no_forward
    # Up to 0.30 it passes wait_for_save=False; later releases pass no such keyword.
    skips = contains(source_of(fn), "wait_for_save=False")
    passes_keyword = contains(code_names(fn), "wait_for_save")
    return read(
        "no_forward_step_saves",
        None if skips is None else not skips,
        None if passes_keyword is None else not passes_keyword,
    )


def _touch_takes_group_tuple(read: Reading, touch: Any) -> bool:
    source = source_of(touch)
    names = code_names(touch)
    return read(
        "touch_takes_group_tuple",
        None if source is None else "tuple[" in source.split(")")[0] or "for blocks_per_group in" in source,
        None if names is None else "tuple[" in str(inspect.signature(touch)) or "blocks_per_group" in names,
    )


@functools.cache
def probe() -> Capabilities:
    """Probe the installed vLLM once per process."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1
    except ImportError:
        KVConnectorBase_V1 = None  # noqa: N806
    try:
        from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

        has_register = hasattr(KVConnectorFactory, "register_connector")
    except ImportError:
        has_register = False
    try:
        from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics  # noqa: F401

        has_prom_metrics = True
    except ImportError:
        has_prom_metrics = False
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request

    try:
        from vllm.distributed.kv_events import BlockStored

        event_fields = set(getattr(BlockStored, "__struct_fields__", ()))  # a msgspec Struct
    except ImportError:
        event_fields = set()
    read = Reading()
    queue_init = kv_cache_utils.FreeKVCacheBlockQueue.__init__
    init = inspect.unwrap(Scheduler.__init__)  # vLLM's, not our bind hook
    init_src, init_names = source_of(init), code_names(init)
    schedule_src, schedule_names = source_of(Scheduler.schedule), code_names(Scheduler.schedule)
    has_requests = getattr(Scheduler, "has_requests", None)
    base = KVConnectorBase_V1
    # Built before the Capabilities: reading them fills `read`'s record of how each was read.
    caps = dict(
        vllm_version=version,
        connector_base_v1=base is not None,
        connector_factory_register=has_register,
        # Compiled code keeps no annotation of a local: it shows `running` is set, not its type.
        scheduler_running_list=read(
            "scheduler_running_list",
            contains(init_src, "self.running: list[Request]", "self.kv_cache_manager"),
            contains(init_names, "running", "kv_cache_manager"),
        ),
        allocate_slots=hasattr(KVCacheManager, "allocate_slots")
        and read(
            "allocate_slots",
            contains(schedule_src, "kv_cache_manager.allocate_slots"),
            contains(schedule_names, "allocate_slots"),
        ),
        free_queue_linked_list=read(
            "free_queue_linked_list",
            source_mentions(queue_init, "fake_free_list_head"),
            contains(code_names(queue_init), "fake_free_list_head"),
        ),
        connector_prom_metrics=has_prom_metrics,
        touch_takes_group_tuple=_touch_takes_group_tuple(read, BlockPool.touch),
        free_queue_iter_blocks_after=hasattr(kv_cache_utils.FreeKVCacheBlockQueue, "iter_blocks_after"),
        # 0.23 has prepend_n behind a `prepend` flag; 0.24+ prepends whatever has no hash. The
        # names compiled code uses cannot tell a flag from that test: without source, unknown
        # (only tests that predict vLLM's free order read it).
        free_blocks_prepends_unhashed=read(
            "free_blocks_prepends_unhashed",
            contains(source_of(BlockPool.free_blocks), "prepend_n", "block_hash is None"),
            None,
        ),
        bind_hook=next(
            (
                name
                for name in ("bind_kv_cache_manager", "bind_gpu_block_pool")
                if read("bind_hook", contains(init_src, f".{name}("), contains(init_names, name))
            ),
            "",
        ),
        preempt_drop_stale_output="drop_stale_output"
        in signature_params(getattr(Scheduler, "_preempt_request", None)),
        request_blocks_can_be_freed=hasattr(Scheduler, "_request_blocks_can_be_freed"),
        connector_worker_meta=base is not None and hasattr(base, "build_connector_worker_meta"),
        no_forward_step_saves=_no_forward_step_saves(read),
        connector_pending_block_frees=read(
            "connector_pending_block_frees",
            contains(schedule_src, ".has_pending_block_frees()"),
            contains(schedule_names, "has_pending_block_frees"),
        ),
        connector_takes_kv_cache_config=base is not None
        and "kv_cache_config" in signature_params(base.__init__),
        connector_keeps_engine_stepping=has_requests is not None
        and read(
            "connector_keeps_engine_stepping",
            source_mentions(has_requests, ".has_pending_push_work()"),
            contains(code_names(has_requests), "has_pending_push_work"),
        ),
        connector_kv_events=bool(event_fields)
        and read(
            "connector_kv_events",
            source_mentions(Scheduler.update_from_output, "connector.take_events()"),
            contains(code_names(Scheduler.update_from_output), "take_events"),
        ),
        kv_event_lora_name="lora_name" in event_fields,
        kv_event_group_idx="group_idx" in event_fields,
        vllm_binds_context=hasattr(base, "bind_scheduler_context")
        and read(
            "vllm_binds_context",
            contains(init_src, ".bind_scheduler_context("),
            contains(init_names, "bind_scheduler_context"),
        ),
        request_takes_eos_token_id="eos_token_id" in signature_params(Request.__init__),
        model_output_needs_logprobs=has_no_default(ModelRunnerOutput, "logprobs"),
    )
    return Capabilities(
        **caps,
        from_compiled_code=tuple(read.from_compiled_code),
        unknown=tuple(read.unknown),
    )


def require_supported() -> Capabilities:
    """The capabilities, or ``UnsupportedVLLMError`` naming what is missing; warns when untested."""
    caps = probe()
    if not caps.supported:
        raise UnsupportedVLLMError(f"vllm-bidkv: {caps.verdict()}")
    if not caps.tested:
        logger.warning("vllm-bidkv: %s", caps.verdict())
    return caps

"""The capability table: what the installed vLLM offers, found by probing it.

Every version difference the rest of ``patches/`` cares about is one field here,
read from the live classes (signatures, attributes), never guessed from the
version string. Whether CI tested a release is a separate fact: the matrix's rows,
shipped as ``vllm_bidkv/compat.json`` (written by ci/matrix.py with docs/COMPAT.md). A
release with no passing row works if the probe finds every required capability (with an
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
    # A vLLM carrying patches/vllm-*-scheduler-context.patch binds the connector itself
    # (and asks it for victims and admission order): the runtime patches stand down.
    vllm_binds_context: bool
    # Only the standalone Scheduler driver needs these.
    request_takes_eos_token_id: bool  # Request(..., eos_token_id) is required up to 0.15
    model_output_needs_logprobs: bool  # ModelRunnerOutput(logprobs=, ...) has no defaults up to 0.13

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
            return f"unsupported: vLLM {self.vllm_version} lacks {', '.join(self.missing())}"
        ci = self.ci
        patch = " + source patch" if self.vllm_binds_context else ""
        if ci["status"] != "tested":
            return (
                f"supported (untested release {self.vllm_version}{patch}; nearest tested: "
                f"{ci['nearest_below'] or 'none'} below, {ci['nearest_above'] or 'none'} above; "
                "every required capability found)"
            )
        return (
            f"supported (tested: the CI row for vLLM {self.vllm_version}{patch} passed "
            f"{', '.join(ci['row']['tiers'])} on {ci['date']} at commit {ci['commit']})"
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _params(fn: Any) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def _has_no_default(cls: Any, field: str) -> bool:
    try:
        param = inspect.signature(cls).parameters.get(field)
    except (TypeError, ValueError):
        return False
    return param is not None and param.default is inspect.Parameter.empty


def _no_forward_step_saves() -> bool:
    try:
        from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin
    except ImportError:
        return False
    return "wait_for_save=False" not in inspect.getsource(KVConnectorModelRunnerMixin.kv_connector_no_forward)


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

    queue_cls = kv_cache_utils.FreeKVCacheBlockQueue
    init_src = inspect.getsource(inspect.unwrap(Scheduler.__init__))  # vLLM's, not our bind hook
    schedule_src = inspect.getsource(Scheduler.schedule)
    touch_src = inspect.getsource(BlockPool.touch)
    base = KVConnectorBase_V1
    return Capabilities(
        vllm_version=version,
        connector_base_v1=base is not None,
        connector_factory_register=has_register,
        scheduler_running_list="self.running: list[Request]" in init_src
        and "self.kv_cache_manager" in init_src,
        allocate_slots=hasattr(KVCacheManager, "allocate_slots")
        and "kv_cache_manager.allocate_slots" in schedule_src,
        free_queue_linked_list="fake_free_list_head" in inspect.getsource(queue_cls.__init__),
        connector_prom_metrics=has_prom_metrics,
        touch_takes_group_tuple="tuple[" in touch_src.split(")")[0] or "for blocks_per_group in" in touch_src,
        free_queue_iter_blocks_after=hasattr(queue_cls, "iter_blocks_after"),
        # 0.23 has prepend_n behind a `prepend` flag; 0.24+ prepends whatever has no hash.
        free_blocks_prepends_unhashed=all(
            key in inspect.getsource(BlockPool.free_blocks) for key in ("prepend_n", "block_hash is None")
        ),
        bind_hook=next(
            (name for name in ("bind_kv_cache_manager", "bind_gpu_block_pool") if f".{name}(" in init_src), ""
        ),
        preempt_drop_stale_output="drop_stale_output"
        in _params(getattr(Scheduler, "_preempt_request", None)),
        request_blocks_can_be_freed=hasattr(Scheduler, "_request_blocks_can_be_freed"),
        connector_worker_meta=base is not None and hasattr(base, "build_connector_worker_meta"),
        no_forward_step_saves=_no_forward_step_saves(),
        connector_pending_block_frees=".has_pending_block_frees()" in schedule_src,
        connector_takes_kv_cache_config=base is not None and "kv_cache_config" in _params(base.__init__),
        vllm_binds_context=hasattr(base, "bind_scheduler_context") and ".bind_scheduler_context(" in init_src,
        request_takes_eos_token_id="eos_token_id" in _params(Request.__init__),
        model_output_needs_logprobs=_has_no_default(ModelRunnerOutput, "logprobs"),
    )


def require_supported() -> Capabilities:
    """The capabilities, or ``UnsupportedVLLMError`` naming what is missing; warns when untested."""
    caps = probe()
    if not caps.supported:
        raise UnsupportedVLLMError(f"vllm-bidkv: {caps.verdict()}")
    if not caps.tested:
        logger.warning("vllm-bidkv: %s", caps.verdict())
    return caps

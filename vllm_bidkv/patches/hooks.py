"""Runtime patches on vLLM's Scheduler: the bind, victim, stepping and reset hooks.

Only one class attribute is ever patched, ``Scheduler.__init__`` (the bind hook);
the rest is installed per Scheduler instance, only on one whose connector is ours
(the victim hook and the admission queue, ``patches.admission``, only when it asks
for them; ``cache-aware`` admission also wraps the instance's ``schedule`` to look its
order up again each step), so a scheduler without BidKVConnector is untouched. Every patch is
idempotent and reversible (``revert``).

The victim hook. vLLM (FCFS policy) preempts ``running[-1]`` when
``allocate_slots`` fails for ``running[req_index]``. Requests before ``req_index``
are already scheduled this step (their token budget is spent), so only
``running[req_index:]`` can be preempted without corrupting step accounting.
The hook wraps ``allocate_slots`` on the instance: when it returns None for a
running request, the connector picks among those requests (and, on 0.25+, only
ones whose blocks can be freed now) and the pick is moved to the end of
``running``; vLLM then preempts it through its own path. Relative order of the
other unscheduled requests is unchanged. First, on 0.30+ (vLLM then asks
``has_pending_block_frees``), the connector says whether vLLM should rather wait a step
for blocks its stores hold (``wait_for_frees``). Under the PRIORITY policy vLLM's own
choice stands (the hook is not installed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from vllm_bidkv.patches.adapter import BlockPoolContext
from vllm_bidkv.patches.admission import install_admission
from vllm_bidkv.patches.capabilities import probe

logger = logging.getLogger("vllm_bidkv")

_ORIGINAL_INIT = "_bidkv_original_init"


def install_bind_hook() -> bool:
    """Patch ``Scheduler.__init__`` to bind a SchedulerContext; False if already patched."""
    from vllm.v1.core.sched.scheduler import Scheduler

    if _ORIGINAL_INIT in Scheduler.__dict__:
        return False
    original = Scheduler.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        _bind(self)

    __init__.__wrapped__ = original  # type: ignore[attr-defined]
    setattr(Scheduler, _ORIGINAL_INIT, original)
    Scheduler.__init__ = __init__  # type: ignore[method-assign]
    return True


def remove_bind_hook() -> bool:
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.__dict__.get(_ORIGINAL_INIT)
    if original is None:
        return False
    Scheduler.__init__ = original  # type: ignore[method-assign]
    delattr(Scheduler, _ORIGINAL_INIT)
    return True


def bind_hook_installed() -> bool:
    from vllm.v1.core.sched.scheduler import Scheduler

    return _ORIGINAL_INIT in Scheduler.__dict__


class BoundConnector(Protocol):
    """What the hooks ask of the connector a Scheduler holds (``BidKVConnector`` is one).

    The hooks look the connector up on the scheduler at every call, so the call
    path goes from the hook straight to these methods.
    """

    def bind_scheduler_context(self, ctx: Any) -> None: ...

    def loads_ordered_on_compute_stream(self) -> bool: ...

    def recomputes_failed_loads(self) -> bool: ...

    def chooses_victims(self) -> bool: ...

    def choose_victim(self, requests: list[Any], requester: Any = None) -> Any:
        """The victim among ``requests`` (vLLM's own pick is the last); None keeps vLLM's."""
        ...

    def has_pending_block_frees(self) -> bool: ...

    def wait_for_frees(self, requests: list[Any], requester: Any) -> bool:
        """Whether vLLM waits for a store's blocks instead of preempting for ``requester``
        (what ``has_pending_block_frees`` answers next)."""
        ...

    def has_pending_push_work(self) -> bool: ...

    def give_up_copies(self) -> None: ...

    def admission_key(self) -> Callable[[Any], Any] | None:
        """A sort key (``sjf``), a ``CacheAwareAdmission`` (``cache-aware``, refused where it
        cannot run) or None (vLLM's order); ``patches.admission.install_admission`` applies it."""
        ...


def bound_connector(scheduler: Any) -> BoundConnector | None:
    """The scheduler's connector if it is ours, else our child of its ``MultiConnector``; None
    if neither. A MultiConnector forwards every connector hook to each child, but these
    calls are not connector hooks, so they go to our child directly."""
    connector = getattr(scheduler, "connector", None)
    for candidate in (connector, *getattr(connector, "_connectors", ())):
        if hasattr(candidate, "bind_scheduler_context"):
            return candidate  # type: ignore[no-any-return]
    return None


def _bind(scheduler: Any) -> None:
    connector = bound_connector(scheduler)
    if connector is None:
        return
    connector.bind_scheduler_context(BlockPoolContext.for_scheduler(scheduler))
    if connector.recomputes_failed_loads() and not getattr(scheduler, "recompute_kv_load_failures", True):
        # Our connector sets kv_load_failure_policy='recompute' on its own config; under a
        # MultiConnector that is a child's copy, which vLLM's Scheduler never reads.
        logger.warning("vllm-bidkv: kv_load_failure_policy -> 'recompute' for every child connector")
        scheduler.recompute_kv_load_failures = True
    if getattr(scheduler, "defer_block_free", False) and connector.loads_ordered_on_compute_stream():
        # vLLM defers frees for kv_both/consumer connectors under async scheduling, in case
        # a load into a freed block races the in-flight step still writing it. Our loads run
        # on the compute stream, ordered after that step, so stock's immediate frees are
        # safe, and keep the schedule identical to stock vLLM's.
        scheduler.defer_block_free = False
    install_stepping_hook(scheduler)
    install_reset_hook(scheduler)
    if connector.chooses_victims():
        install_victim_hook(scheduler)
    key = connector.admission_key()
    if key is not None:
        install_admission(scheduler, key)


# -- stepping hook ------------------------------------------------------------
def install_stepping_hook(scheduler: Any) -> bool:
    """Keep the engine stepping while our copies are in flight, on releases whose
    ``has_requests()`` does not ask the connector (``has_pending_push_work``): else the
    engine idles with blocks touched, slots pinned and ``reset_prefix_cache()`` failing."""
    if probe().connector_keeps_engine_stepping or not hasattr(scheduler, "has_requests"):
        return False
    if "has_requests" in vars(scheduler):
        return False
    original = scheduler.has_requests

    def has_requests() -> bool:
        connector = bound_connector(scheduler)
        return bool(original()) or (connector is not None and connector.has_pending_push_work())

    scheduler.has_requests = has_requests
    return True


def install_reset_hook(scheduler: Any) -> bool:
    """Before vLLM resets its caches *and* the connector's (``reset_connector=True``, which
    ``pause_generation(clear_cache=True)`` uses after a weight update), the copies in flight
    give back their blocks: else the GPU pool cannot be emptied right after a burst (vLLM
    resets the pool before the connector) and the pause raises. A plain reset keeps the
    tier, whose stores are then worth waiting for."""
    if "reset_prefix_cache" in vars(scheduler) or not hasattr(scheduler, "reset_prefix_cache"):
        return False
    original = scheduler.reset_prefix_cache

    def reset_prefix_cache(*args: Any, **kwargs: Any) -> Any:
        reset_connector = kwargs.get("reset_connector", args[1] if len(args) > 1 else False)
        connector = bound_connector(scheduler)
        if reset_connector and connector is not None:
            connector.give_up_copies()
        return original(*args, **kwargs)

    scheduler.reset_prefix_cache = reset_prefix_cache
    return True


# -- victim hook --------------------------------------------------------------
def install_victim_hook(scheduler: Any) -> bool:
    """Let our connector say whether vLLM waits for a store's blocks and pick vLLM's next
    victim (see module doc)."""
    from vllm.v1.core.sched.request_queue import SchedulingPolicy
    from vllm.v1.request import RequestStatus

    if probe().vllm_binds_context:  # the source-patched Scheduler asks wait_for_frees, choose_victim
        return False
    if scheduler.policy != SchedulingPolicy.FCFS:
        logger.warning("vllm-bidkv: scheduling policy %s keeps vLLM's own victims", scheduler.policy)
        return False
    manager = scheduler.kv_cache_manager
    if "allocate_slots" in vars(manager):
        return False
    original = manager.allocate_slots
    can_free = getattr(scheduler, "_request_blocks_can_be_freed", None)
    caps = probe()

    def allocate_slots(request: Any, *args: Any, **kwargs: Any) -> Any:
        blocks = original(request, *args, **kwargs)
        if blocks is not None or request.status != RequestStatus.RUNNING:
            return blocks  # allocated, or a waiting request: no victim (the common case: cheap)
        connector = bound_connector(scheduler)
        assert connector is not None, "the hook is installed only for a scheduler with our connector"
        for observer in _victim_choice_observers:
            observer.victim_choice_started()
        try:
            preemptible = _preemptible(scheduler.running, request, can_free)
            # vLLM (0.30+) asks has_pending_block_frees next and waits rather than preempt if true.
            waits = caps.connector_pending_block_frees and connector.wait_for_frees(preemptible, request)
            if preemptible and not waits:
                _reorder_for_victim(scheduler.running, preemptible, request, connector)
        finally:
            for observer in _victim_choice_observers:
                observer.victim_choice_finished()
        return blocks

    manager.allocate_slots = allocate_slots
    return True


class VictimChoiceObserver(Protocol):
    """Told when the victim hook starts and stops choosing: how a benchmark times victim
    choice (it is the connector's time too) without replacing the hook's functions."""

    def victim_choice_started(self) -> None: ...

    def victim_choice_finished(self) -> None: ...


_victim_choice_observers: list[VictimChoiceObserver] = []


def add_victim_choice_observer(observer: VictimChoiceObserver) -> None:
    _victim_choice_observers.append(observer)


def remove_victim_choice_observer(observer: VictimChoiceObserver) -> None:
    _victim_choice_observers.remove(observer)


def _preemptible(running: list[Any], request: Any, can_free: Any) -> list[Any]:
    """``running[req_index:]`` (not scheduled yet this step) whose blocks can be freed now."""
    start = next((i for i in range(len(running) - 1, -1, -1) if running[i] is request), None)
    return [] if start is None else [r for r in running[start:] if can_free is None or can_free(r)]


def _reorder_for_victim(
    running: list[Any], preemptible: list[Any], request: Any, connector: BoundConnector
) -> None:
    victim = connector.choose_victim(preemptible, request)
    if victim is None or victim is running[-1]:  # None: keep vLLM's choice
        return
    index = next(i for i in range(len(running) - 1, -1, -1) if running[i] is victim)
    running.append(running.pop(index))


def remove_victim_hook(scheduler: Any) -> bool:
    return vars(scheduler.kv_cache_manager).pop("allocate_slots", None) is not None


def find_scheduler_under_construction() -> Any:
    """The Scheduler whose ``__init__`` is on the stack (it is building our connector).

    Used when the connector is loaded by module path without the plugin, so no
    bind hook ran: the connector binds itself on its first scheduler-side call.
    """
    import inspect

    from vllm.v1.core.sched.scheduler import Scheduler

    frame = inspect.currentframe()
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Scheduler) and frame.f_code.co_name == "__init__":
            return candidate
        frame = frame.f_back
    return None


def bind_late(scheduler: Any) -> None:
    """Bind a scheduler whose construction finished without the bind hook."""
    _bind(scheduler)

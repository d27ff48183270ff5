"""The admission queue: vLLM's waiting queue, reordered by the connector's ``admission_key``.

Installed per Scheduler instance by the bind hook (``hooks``), only when its connector
asks for an order and only under vLLM's FCFS policy; ``remove_admission`` gives the
Scheduler back its own queue, with the requests still waiting. Two kinds:

* a key (``sjf``): a heap, each request keyed once, when it is queued;
* ``cache-aware`` (``policy.admission.CacheAwareAdmission``): a ``CacheAwareOrder`` whose
  work left is looked up again at the start of every ``schedule()`` (a wrapper on the
  instance's ``schedule``), from vLLM's prefix cache (``gpu_prefix_hit``) and the CPU tier,
  both read-only. Where it cannot run (``cache_aware_missing``) it is refused in one line.

vLLM (0.32 and before) peeks and pops the waiting queue in ``schedule()``, puts the
requests it passed over back at the end of the same call, and prepends preempted ones;
in a keyed order a prepended request re-enters at its place.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from vllm_bidkv.patches.capabilities import probe
from vllm_bidkv.policy.admission import CacheAwareAdmission, CacheAwareOrder, admission_refusal

logger = logging.getLogger("vllm_bidkv")

_REFRESHES_ORDER = "_bidkv_refreshes_admission"  # marks our ``schedule`` wrapper


def _request_queue_base() -> type:
    from vllm.v1.core.sched.request_queue import RequestQueue

    return RequestQueue


def make_keyed_queue(key: Callable[[Any], Any], requests: Iterable[Any] = ()) -> Any:
    """A vLLM ``RequestQueue`` ordered by ``key`` (e.g. SJF: shortest prompt first).

    Prepending has no meaning in a keyed order: a preempted request re-enters at
    its key, as in vLLM's PriorityRequestQueue.
    """

    class KeyedRequestQueue(_request_queue_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            self._heap: list[tuple[Any, int, Any]] = []
            self._seq = itertools.count()

        def add_request(self, request: Any) -> None:
            heapq.heappush(self._heap, (key(request), next(self._seq), request))

        def pop_request(self) -> Any:
            if not self._heap:
                raise IndexError("pop from empty queue")
            return heapq.heappop(self._heap)[2]

        def peek_request(self) -> Any:
            if not self._heap:
                raise IndexError("peek from empty queue")
            return self._heap[0][2]

        def prepend_request(self, request: Any) -> None:
            self.add_request(request)

        def prepend_requests(self, requests: Iterable[Any]) -> None:
            for request in requests:
                self.add_request(request)

        def remove_request(self, request: Any) -> None:
            self.remove_requests((request,))

        def remove_requests(self, requests: Iterable[Any]) -> None:
            drop = {id(r) for r in requests}
            self._heap = [entry for entry in self._heap if id(entry[2]) not in drop]
            heapq.heapify(self._heap)

        def __bool__(self) -> bool:
            return bool(self._heap)

        def __len__(self) -> int:
            return len(self._heap)

        def __iter__(self) -> Iterator[Any]:
            return (entry[2] for entry in sorted(self._heap))

        def __reversed__(self) -> Iterator[Any]:  # abstract in RequestQueue up to 0.13
            return (entry[2] for entry in sorted(self._heap, reverse=True))

    queue = KeyedRequestQueue()
    queue.prepend_requests(requests)
    return queue


def make_cache_aware_queue(order: CacheAwareOrder[Any], requests: Iterable[Any] = ()) -> Any:
    """A vLLM ``RequestQueue`` in ``order`` (``policy.admission.CacheAwareOrder``); its
    ``refresh_order()`` starts a step (the ``schedule`` wrapper calls it)."""

    class CacheAwareRequestQueue(_request_queue_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            self.order = order

        def refresh_order(self) -> None:
            self.order.refresh()

        def add_request(self, request: Any) -> None:
            self.order.add(request)

        def pop_request(self) -> Any:
            return self.order.pop()

        def peek_request(self) -> Any:
            return self.order.peek()

        def prepend_request(self, request: Any) -> None:
            self.order.add(request)

        def prepend_requests(self, requests: Iterable[Any]) -> None:
            for request in requests:
                self.order.add(request)

        def remove_request(self, request: Any) -> None:
            self.order.remove((request,))

        def remove_requests(self, requests: Iterable[Any]) -> None:
            self.order.remove(requests)

        def __bool__(self) -> bool:
            return len(self.order) > 0

        def __len__(self) -> int:
            return len(self.order)

        def __iter__(self) -> Iterator[Any]:
            return iter(self.order)

        def __reversed__(self) -> Iterator[Any]:  # abstract in RequestQueue up to 0.13
            return reversed(list(self.order))

    queue = CacheAwareRequestQueue()
    queue.prepend_requests(requests)
    return queue


def gpu_prefix_hit(manager: Any, request: Any) -> int:
    """Tokens of ``request`` vLLM's prefix cache would give it if admitted now.

    The look-up ``KVCacheManager.get_computed_blocks`` makes (``find_longest_cache_hit``, the
    last token left to compute), without its side effects (prefix-cache stats up to 0.31, KV
    events in 0.32): hash probes only, O(blocks of the hit); no block is touched.
    """
    lookup_enabled = getattr(manager, "prefix_cache_lookup_enabled", None)  # 0.32+
    if lookup_enabled is not None:
        if not lookup_enabled(request):
            return 0
    elif not manager.enable_caching or getattr(request, "skip_reading_prefix_cache", False):
        return 0
    found = manager.coordinator.find_longest_cache_hit(request.block_hashes, request.num_tokens - 1)
    return int(found[1])  # (blocks, tokens) up to 0.31, (blocks, tokens, uncached) after


def cache_aware_missing() -> str | None:
    """Why ``admission: cache-aware`` cannot run on this vLLM, or None."""
    caps = probe()
    if caps.vllm_binds_context:
        return "the source-patched Scheduler sorts its waiting queue once, by keys fixed at insertion"
    try:
        from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    except ImportError:
        KVCacheCoordinator = None  # noqa: N806
    if not hasattr(KVCacheCoordinator, "find_longest_cache_hit"):
        return f"vLLM {caps.vllm_version} has no KVCacheCoordinator.find_longest_cache_hit"
    return None


def refuse_unsupported_admission(admission: str) -> None:
    """Raise the one-line refusal where ``admission`` cannot run here (the connector's start)."""
    why = cache_aware_missing() if admission == "cache-aware" else None
    if why is not None:
        raise admission_refusal(why)


def install_admission(scheduler: Any, key: Callable[[Any], Any]) -> bool:
    """Order ``scheduler``'s waiting queue by ``key`` (see module doc); False if it keeps
    vLLM's (PRIORITY policy) or is ordered already. Where ``cache-aware`` cannot run, the
    connector refused it at its start (``refuse_unsupported_admission``)."""
    from vllm.v1.core.sched.request_queue import SchedulingPolicy

    if scheduler.policy != SchedulingPolicy.FCFS:
        logger.warning("vllm-bidkv: scheduling policy %s keeps vLLM's admission order", scheduler.policy)
        return False
    if "_bidkv_fcfs_waiting" in vars(scheduler):
        return False
    scheduler._bidkv_fcfs_waiting = scheduler.waiting
    if not isinstance(key, CacheAwareAdmission):
        scheduler.waiting = make_keyed_queue(key, scheduler.waiting)
        return True
    manager = scheduler.kv_cache_manager
    block_size = (
        scheduler.block_size if hasattr(scheduler, "block_size") else scheduler.cache_config.block_size
    )
    order: CacheAwareOrder[Any] = key.order(partial(gpu_prefix_hit, manager), block_size)
    scheduler.waiting = make_cache_aware_queue(order, scheduler.waiting)
    _install_refresh(scheduler)
    return True


def _install_refresh(scheduler: Any) -> None:
    """Look the waiting requests' work up again as each ``schedule()`` starts, before vLLM
    peeks at the queue (keys change while requests wait)."""
    if getattr(vars(scheduler).get("schedule"), _REFRESHES_ORDER, False):
        return
    original = scheduler.schedule

    def schedule(*args: Any, **kwargs: Any) -> Any:
        refresh = getattr(scheduler.waiting, "refresh_order", None)
        if refresh is not None:
            refresh()
        return original(*args, **kwargs)

    setattr(schedule, _REFRESHES_ORDER, True)
    scheduler.schedule = schedule


def remove_admission(scheduler: Any) -> bool:
    original = vars(scheduler).pop("_bidkv_fcfs_waiting", None)
    if original is None:
        return False
    if getattr(vars(scheduler).get("schedule"), _REFRESHES_ORDER, False):
        del scheduler.schedule  # a wrapper put on top of ours stays: ours then refreshes nothing
    original.clear()
    original.extend(scheduler.waiting)
    scheduler.waiting = original
    return True

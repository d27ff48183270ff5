"""The admission queue: vLLM's waiting queue, reordered by the connector's ``admission_key``.

Installed per Scheduler instance by the bind hook (``hooks``), only when its connector
asks for an order (e.g. SJF) and only under vLLM's FCFS policy; ``remove_admission``
gives the Scheduler back its own queue, with the requests still waiting.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

logger = logging.getLogger("vllm_bidkv")


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


def install_admission(scheduler: Any, key: Callable[[Any], Any]) -> bool:
    from vllm.v1.core.sched.request_queue import SchedulingPolicy

    if scheduler.policy != SchedulingPolicy.FCFS:
        logger.warning("vllm-bidkv: scheduling policy %s keeps vLLM's admission order", scheduler.policy)
        return False
    if "_bidkv_fcfs_waiting" in vars(scheduler):
        return False
    scheduler._bidkv_fcfs_waiting = scheduler.waiting
    scheduler.waiting = make_keyed_queue(key, scheduler.waiting)
    return True


def remove_admission(scheduler: Any) -> bool:
    original = vars(scheduler).pop("_bidkv_fcfs_waiting", None)
    if original is None:
        return False
    original.clear()
    original.extend(scheduler.waiting)
    scheduler.waiting = original
    return True

"""SchedulerContext: what a KV connector may see and do inside vLLM's scheduler.

The API of vLLM PR #41120 (closed, "revisit in connector v2") — ``get_block``,
``touch``, ``free_blocks``, ``iter_free_blocks`` — extended with the per-request
and queue views a preemption policy needs. Pure typing: no vLLM import, so the
policy and offload packages are written and tested against this file alone.
``vllm_bidkv.patches.adapter`` implements it over each vLLM release.

Invariants every implementation keeps:

* Block ids are GPU block ids of KV cache group 0 unless a method says otherwise;
  the null block is never yielded and never touched.
* ``touch(ids)`` adds one reference to each block; a block that was free leaves
  the free queue, so vLLM cannot hand it out while a copy uses it.
* ``free_blocks(ids)`` drops one reference each; a block whose count reaches 0
  returns to the free queue. A block that was free when it was touched returns to
  the place it held in the LRU order, so ``touch`` followed by ``free_blocks``
  with nothing in between leaves the queue exactly as it was: offloading never
  changes which blocks vLLM evicts next. (If vLLM took its predecessor out of the
  queue meanwhile, the block returns at the LRU end; if vLLM itself referenced
  the block meanwhile, it was used, and vLLM's own free places it.)
* ``iter_free_blocks(after_block)`` yields free blocks from the LRU end (next to
  be reused) towards the MRU end. With ``after_block`` it resumes right after
  that block if the block is still free; if the block left the free queue since
  (reused or touched), it starts again from the LRU end.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol, runtime_checkable

BlockHash = bytes


@runtime_checkable
class KVCacheBlockView(Protocol):
    """Read-only view of one GPU KV cache block."""

    @property
    def block_id(self) -> int: ...

    @property
    def ref_cnt(self) -> int: ...

    @property
    def block_hash(self) -> BlockHash | None:
        """Content hash of a full, cached block; None while the block is partial."""
        ...

    @property
    def is_null(self) -> bool: ...


@runtime_checkable
class RequestView(Protocol):
    """Read-only view of a request as the scheduler holds it.

    vLLM's own ``Request`` satisfies this structurally; implementations hand
    requests out as they are, never copies.
    """

    @property
    def request_id(self) -> str: ...

    @property
    def num_prompt_tokens(self) -> int: ...

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens so far."""
        ...

    @property
    def num_computed_tokens(self) -> int: ...

    @property
    def num_output_tokens(self) -> int: ...

    @property
    def max_tokens(self) -> int | None: ...

    @property
    def num_preemptions(self) -> int: ...

    @property
    def priority(self) -> int: ...

    @property
    def arrival_time(self) -> float: ...

    @property
    def block_hashes(self) -> Sequence[BlockHash]:
        """Hashes of the request's full blocks, in token order."""
        ...


@runtime_checkable
class SchedulerContext(Protocol):
    """The scheduler-side state a connector is bound to (``bind_scheduler_context``)."""

    @property
    def block_size(self) -> int:
        """Tokens per GPU block."""
        ...

    @property
    def num_gpu_blocks(self) -> int: ...

    def get_block(self, block_id: int) -> KVCacheBlockView:
        """The block with this id; ``IndexError`` naming the id if out of range."""
        ...

    def touch(self, block_ids: Sequence[int]) -> None:
        """Add one reference to each block (pins it; a free block leaves the queue)."""
        ...

    def free_blocks(self, block_ids: Sequence[int]) -> None:
        """Drop one reference from each block; ``ValueError`` if a count would go below 0."""
        ...

    def iter_free_blocks(self, after_block: int | None = None) -> Iterator[KVCacheBlockView]:
        """Free blocks in LRU order, resuming after ``after_block`` (see module doc)."""
        ...

    def num_free_blocks(self) -> int: ...

    def request_block_ids(self, request_id: str) -> tuple[list[int], ...]:
        """Block ids the request holds, one list per KV cache group; () if it holds none."""
        ...

    def request_block_ids_from(self, request_id: str, start: int) -> list[int]:
        """The request's group-0 block ids from index ``start`` on; [] if it holds none there.

        A request's newest blocks without a copy of all of them: ``offload_mode`` auto asks
        this for each running request that filled a block, every step.
        """
        ...

    def request_ref_counts(self, request_id: str) -> list[int]:
        """Reference counts of the request's group-0 blocks, in order; [] if it holds none.
        The null block (in place of a sliding window's skipped blocks) counts 0: it frees nothing.

        One call for what a ``get_block`` per block would give: the victim policy reads
        it for every preemptible request each time an allocation fails.
        """
        ...

    def get_request(self, request_id: str) -> RequestView | None:
        """The scheduler's request with this id (waiting, running or preempted), if any."""
        ...

    def waiting(self) -> Sequence[RequestView]:
        """Requests waiting to be scheduled, in the order vLLM will consider them."""
        ...

    def running(self) -> Sequence[RequestView]:
        """Running requests in vLLM's order (the last is vLLM's default victim)."""
        ...

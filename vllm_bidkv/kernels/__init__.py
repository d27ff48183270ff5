"""Block-copy kernels: every KV block copy in vllm_bidkv goes through :func:`copy_blocks`.

Importing this package needs only torch; the Triton kernel is imported on first use.

A CPU tier from ``allocate_like(..., pin_memory=True)`` is page-locked until its last tensor
is freed; a worker shutting down calls ``release_pinned(tier)`` once its copies are done.
"""

from vllm_bidkv.kernels.block_copy import BACKENDS, Backend, copy_blocks
from vllm_bidkv.kernels.layout import allocate_like, block_views, release_pinned

__all__ = ["BACKENDS", "Backend", "allocate_like", "block_views", "copy_blocks", "release_pinned"]

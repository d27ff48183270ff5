"""Block-copy kernels: every KV block copy in vllm_bidkv goes through :func:`copy_blocks`.

Importing this package needs only torch; the Triton kernel is imported on first use.
"""

from vllm_bidkv.kernels.block_copy import BACKENDS, Backend, copy_blocks
from vllm_bidkv.kernels.layout import allocate_like, block_views

__all__ = ["BACKENDS", "Backend", "allocate_like", "block_views", "copy_blocks"]
